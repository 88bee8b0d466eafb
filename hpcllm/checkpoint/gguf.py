"""Import a GGUF file (llama.cpp's format) of a decoder (llama, qwen2, qwen3, gemma2, gemma3).

Weights are dequantised to float32 with the ``gguf`` package (F32, F16,
BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants, whatever
``gguf.quants.dequantize`` handles); config and tokenizer come from the file's
metadata. llama.cpp's converter interleaves the rows of each q/k head for its
RoPE kernel (for the "llama" architecture only); we undo that so the weights
are in HF's rotate-half order, which the decoder uses. Gemma's norm weights are stored by
llama.cpp as the multiplier 1 + w, which is what hpcllm stores too.
"""


import mmap
import struct
from typing import NamedTuple

import numpy as np

from hpcllm.checkpoint.sources import decoder_config, moe_config, rename, unfuse
from hpcllm.errors import HpcllmError
from hpcllm.model.architectures import decoder_family, gguf_architecture

# GGUF tensor name (after "blk.{i}.") -> hpcllm decoder name (after "layers.{i}.")
_LAYER_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v",
    "attn_output": "attn.o", "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",
    "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down",
}
_TOP_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
# architectures whose q/k rows llama.cpp permuted on conversion
_PERMUTED = {"llama"}


class GGUFTensor(NamedTuple):
    name: str
    shape: tuple          # GGUF's order: innermost dimension first
    qtype: int            # gguf.GGMLQuantizationType value
    data: np.ndarray      # uint8 [rows, bytes per row], a view of the memory-mapped file


def read_gguf(path: str) -> tuple[dict, list]:
    """(metadata key -> value, tensors) of a GGUF v2/v3 file, the tensor data memory-mapped.

    gguf.GGUFReader builds a numpy view of every metadata string on open: 21 s of a 36 s convert of
    Gemma 3 270M (262144 vocabulary strings, measured). This reads the same header with the
    tokenizer's small reader (``hpcllm.tokenizer.gguf_meta``) and leaves dequantising to ``gguf``."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from hpcllm.tokenizer.gguf_meta import _value

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", mm, 0)
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError("not a little-endian GGUF v2/v3 file")
            meta, pos = {}, 24
            for _ in range(n_kv):
                key, pos = _value(mm, pos, 8)
                (vtype,) = struct.unpack_from("<I", mm, pos)
                meta[key], pos = _value(mm, pos + 4, vtype)
            infos = []
            for _ in range(n_tensors):
                name, pos = _value(mm, pos, 8)
                (n_dims,) = struct.unpack_from("<I", mm, pos)
                shape = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
                qtype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 12
                infos.append((name, shape, qtype, offset))
        align = int(meta.get("general.alignment", 32))
        start = -(-pos // align) * align
        data = np.memmap(path, dtype=np.uint8, mode="r")
        tensors = []
        for name, shape, qtype, offset in infos:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            row = shape[0] // block * size
            rows = int(np.prod(shape[1:], dtype=np.int64))
            at = start + offset
            tensors.append(GGUFTensor(name, tuple(int(d) for d in shape), qtype,
                                      data[at:at + rows * row].reshape(rows, row)))
    except (OSError, ValueError, struct.error, KeyError) as exc:
        raise HpcllmError(f"{path}: not a readable GGUF file ({exc})") from None
    return meta, tensors


def _field(meta: dict, key, default=None, where=""):
    if key not in meta:
        if default is None:
            raise HpcllmError(f"{where}: GGUF metadata key {key!r} missing")
        return default
    return meta[key]


def _layer_types(arch: str, n: int, window) -> list:
    """Which layers slide: every one where the family windows all (Phi-3), else llama.cpp's fixed
    patterns: Gemma 2 every other layer from the first, Gemma 3 five of every six (both as
    transformers' configs default them)."""
    if not window:
        return ["full"] * n
    if decoder_family(arch).windows == "all":
        return ["sliding"] * n
    pattern = {"gemma2": 2, "gemma3": 6}.get(arch)
    if pattern is None:
        return ["full"] * n
    return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n)]


def _rope_scaling(meta, tensors, arch: str, path: str, names: set, head_dim: int):
    """None, {"rope_type": "linear", "factor": f}, or Llama-3.1's per-dimension frequency factors
    (the ``rope_freqs`` tensor llama.cpp's converter writes from the llama3 rope_scaling): inverse
    frequencies are divided by them, as llama.cpp does."""
    kind = _field(meta, f"{arch}.rope.scaling.type", "none", path)
    if "rope_freqs.weight" in names:
        t = next(t for t in tensors if t.name == "rope_freqs.weight")
        factors = np.asarray(_dequantize(t, path), dtype=np.float32).reshape(-1)
        if len(factors) != head_dim // 2:
            raise HpcllmError(f"{path}: rope_freqs has {len(factors)} factors, the head dim {head_dim} needs "
                              f"{head_dim // 2}")
        return {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_field(meta, f"{arch}.rope.scaling.factor", where=path))}
    if kind != "none":
        raise HpcllmError(f"{path}: GGUF rope scaling {kind!r} is not supported (none, linear, rope_freqs)")
    return None


def _moe(meta, arch: str, features, path: str, names: set, n_layers: int):
    """The ``moe`` config entry of a GGUF with experts (``{arch}.expert_count``), or None. A layer
    without ``ffn_gate_inp`` (the router) is dense; the top-k weights are renormalised where
    ``expert_weights_norm`` says, else as llama.cpp does per architecture (Mixtral's "llama" and
    qwen3moe yes, qwen2moe no)."""
    get = lambda key, default=None: _field(meta, f"{arch}.{key}", default, path)  # noqa: E731
    n_experts = int(get("expert_count", 0))
    if not n_experts:
        return None
    if not features.moe:
        raise HpcllmError(f"{path}: a {arch} GGUF with {n_experts} experts is not supported "
                          f"(llama: Mixtral, qwen2moe, qwen3moe)")
    shared = int(get("expert_shared_feed_forward_length", 0)) if "blk.0.ffn_up_shexp.weight" in names else 0
    return moe_config(
        n_experts=n_experts, top_k=int(get("expert_used_count")),
        expert_ffn=int(get("expert_feed_forward_length", get("feed_forward_length"))),
        shared_ffn=shared, shared_gate="blk.0.ffn_gate_inp_shexp.weight" in names, router="softmax_topk",
        norm_topk=bool(get("expert_weights_norm", arch in ("llama", "qwen3moe"))),
        dense_layers=[i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in names],
        n_layers=n_layers, where=path)


# llama.cpp's Gemma 2 / 3 27B (their block counts): queries scaled by 1/sqrt(hidden / heads), which
# is their query_pre_attn_scalar (144, 168); every other size by 1/sqrt(head_dim) (256 = head_dim)
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_query_scale(arch: str, n_layers: int, hidden: int, heads: int, head_dim: int) -> float:
    if _GEMMA_27B_LAYERS.get(arch) == n_layers:
        return (hidden / heads) ** -0.5
    return head_dim ** -0.5


def _end_of_turn(meta: dict, features) -> set:
    """Gemma's <end_of_turn> ends a reply (its generation_config lists it beside EOS), though its GGUFs
    name no eot id."""
    if features.norm != "gemma":
        return set()
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return {i for i, t in enumerate(tokens) if t == "<end_of_turn>"}


def gguf_config(meta: dict, tensors: list, path: str) -> dict:
    arch = _field(meta, "general.architecture", where=path)
    gguf_architecture(arch, path)  # a one-line error for an architecture no importer reads
    get = lambda key, default=None: _field(meta, f"{arch}.{key}", default, path)  # noqa: E731
    # llama.cpp writes Mixtral as "llama" with experts
    features = decoder_family("mixtral" if arch == "llama" and get("expert_count", 0) else arch)
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise HpcllmError(f"{path}: partial rotary embeddings (rope.dimension_count != head dim) are not supported")
    names = {t.name for t in tensors}
    if "rope_factors_long.weight" in names:
        raise HpcllmError(f"{path}: longrope (rope_factors_long / rope_factors_short: Phi-3 128k) is not supported")
    n_layers = int(get("block_count"))
    window = int(get("attention.sliding_window", 0)) or None
    layer_types = _layer_types(arch, n_layers, window)
    softcap = lambda key: float(get(key, 0.0)) or None  # noqa: E731
    tok_model = _field(meta, "tokenizer.ggml.model", "", path)
    vocab = int(get("vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))))
    bos = _field(meta, "tokenizer.ggml.bos_token_id", -1, path)
    return decoder_config(
        vocab=vocab, hidden=hidden, n_layers=n_layers,
        n_heads=heads, n_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        ffn=int(get("feed_forward_length")), rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, tensors, arch, path, names, head_dim),
        max_positions=int(get("context_length")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        # llama.cpp's default: SentencePiece vocabularies add BOS, byte-level BPE ones do not
        add_bos=bool(_field(meta, "tokenizer.ggml.add_bos_token", tok_model == "llama", path)),
        bos_id=int(bos) if bos >= 0 else None,
        eos_id=int(_field(meta, "tokenizer.ggml.eos_token_id", -1, path)),
        pad_id=int(_field(meta, "tokenizer.ggml.padding_token_id", 0, path)),
        # generate: the ids that end a reply (EOS, end-of-turn) and the chat template (untrusted jinja)
        eos_ids=({int(_field(meta, f"tokenizer.ggml.{k}_token_id", -1, path)) for k in ("eos", "eot", "eom")}
                 | _end_of_turn(meta, features)) - {-1},
        chat_template=_field(meta, "tokenizer.chat_template", "", path) or None,
        features=features, layer_types=layer_types, sliding_window=window,
        # Gemma 3's local layers: llama.cpp's fixed base 10000
        rope_local_theta=10000.0 if features.local_rope else None,
        attn_scale=_gemma_query_scale(arch, n_layers, hidden, heads, head_dim) if features.norm == "gemma" else None,
        attn_softcap=softcap("attn_logit_softcapping"), final_softcap=softcap("final_logit_softcapping"),
        moe=_moe(meta, arch, features, path, names, n_layers),
    )


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, rows (i, half) -> (half, i)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t: GGUFTensor, path: str) -> np.ndarray:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(t.qtype)
    try:
        w = np.asarray(dequantize(t.data, qtype), dtype=np.float32)
    except NotImplementedError:
        raise HpcllmError(f"{path}: tensor {t.name}: GGUF type {qtype.name} cannot be dequantised "
                          f"by the installed gguf package") from None
    return w.reshape(tuple(reversed(t.shape)))  # GGUF lists dims innermost first


def gguf_tensors(tensors: list, cfg: dict, arch: str, path: str) -> dict:
    layer_names = {**_LAYER_NAMES, **dict(decoder_family(cfg["family"]).gguf_names)}
    out = {}
    for t in tensors:
        if t.name == "rope_freqs.weight":
            continue   # in the config (rope_scaling "freq_factors")
        name = rename(t.name, _TOP_NAMES, layer_names, "blk.")
        if name is None:
            raise HpcllmError(f"{path}: unexpected GGUF tensor {t.name!r} for a {arch} model")
        w = _dequantize(t, path)
        if arch in _PERMUTED and name.endswith(("attn.q.weight", "attn.q.bias")):
            w = unpermute_rows(w, cfg["n_heads"])
        elif arch in _PERMUTED and name.endswith(("attn.k.weight", "attn.k.bias")):
            w = unpermute_rows(w, cfg["n_kv_heads"])
        if name.endswith("mlp.shared_router.weight"):
            w = w.reshape(1, -1)   # llama.cpp stores the shared expert's gate [hidden]
        out.update(unfuse(path, name, w, cfg))   # Phi-3's fused attn_qkv and ffn_up (gate | up)
    return out


def import_gguf(path: str):
    """-> (architecture, config, tensors, tokenizer_json) of a GGUF file."""
    from hpcllm.tokenizer.gguf import tokenizer_json as gguf_tokenizer_json

    meta, tensors = read_gguf(path)
    cfg = gguf_config(meta, tensors, path)
    gguf_arch = meta["general.architecture"]
    out = gguf_tensors(tensors, cfg, gguf_arch, path)
    if out["embed.weight"].shape[0] != cfg["vocab"]:
        cfg["vocab"] = int(out["embed.weight"].shape[0])
    return gguf_architecture(gguf_arch, path).name, cfg, out, gguf_tokenizer_json(path)
