"""Import a GGUF file (llama.cpp's format) of a Llama-family model (llama, qwen2, qwen3).

Weights are dequantised to float32 with the ``gguf`` package (F32, F16,
BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants, whatever
``gguf.quants.dequantize`` handles); config and tokenizer come from the file's
metadata. llama.cpp's converter interleaves the rows of each q/k head for its
RoPE kernel (for the "llama" architecture only); we undo that so the weights
are in HF's rotate-half order, which the decoder uses.
"""

import json

import numpy as np

from hpcllm.checkpoint.sources import decoder_config, rename
from hpcllm.errors import HpcllmError
from hpcllm.model.architectures import gguf_architecture

# GGUF tensor name (after "blk.{i}.") -> hpcllm decoder name (after "layers.{i}.")
_LAYER_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v",
    "attn_output": "attn.o", "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm",
    "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down",
}
_TOP_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
# architectures whose q/k rows llama.cpp permuted on conversion
_PERMUTED = {"llama"}


def _field(reader, key, default=None, where=""):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise HpcllmError(f"{where}: GGUF metadata key {key!r} missing")
        return default
    return f.contents()


def gguf_config(reader, path: str) -> dict:
    arch = _field(reader, "general.architecture", where=path)
    gguf_architecture(arch, path)  # a one-line error for an architecture no importer reads
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default, path)  # noqa: E731
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise HpcllmError(f"{path}: partial rotary embeddings (rope.dimension_count != head dim) are not supported")
    if reader.fields.get(f"{arch}.rope.scaling.type") is not None and get("rope.scaling.type") != "none":
        raise HpcllmError(f"{path}: GGUF rope scaling {get('rope.scaling.type')!r} is not supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise HpcllmError(f"{path}: per-dimension rope_freqs (Llama-3.1 style GGUF) are not supported; "
                          f"convert from the HF directory instead")
    tok_model = _field(reader, "tokenizer.ggml.model", "", path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", len(tokens.data) if tokens is not None else 0))
    bos = _field(reader, "tokenizer.ggml.bos_token_id", -1, path)
    return decoder_config(
        vocab=vocab, hidden=hidden, n_layers=int(get("block_count")),
        n_heads=heads, n_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        ffn=int(get("feed_forward_length")), rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=None,
        max_positions=int(get("context_length")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        # llama.cpp's default: SentencePiece vocabularies add BOS, byte-level BPE ones do not
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", tok_model == "llama", path)),
        bos_id=int(bos) if bos >= 0 else None,
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", -1, path)),
        pad_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0, path)),
        # generate: the ids that end a reply (EOS, end-of-turn) and the chat template (untrusted jinja)
        eos_ids={int(_field(reader, f"tokenizer.ggml.{k}_token_id", -1, path)) for k in ("eos", "eot", "eom")} - {-1},
        chat_template=_field(reader, "tokenizer.chat_template", "", path) or None,
    )


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, rows (i, half) -> (half, i)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader, cfg: dict, arch: str, path: str) -> dict:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        name = rename(t.name, _TOP_NAMES, _LAYER_NAMES, "blk.")
        if name is None:
            raise HpcllmError(f"{path}: unexpected GGUF tensor {t.name!r} for a {arch} model")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise HpcllmError(f"{path}: tensor {t.name}: GGUF type {t.tensor_type.name} cannot be dequantised "
                              f"by the installed gguf package") from None
        w = w.reshape(tuple(int(x) for x in reversed(t.shape)))  # GGUF lists dims innermost first
        if arch in _PERMUTED and name.endswith(("attn.q.weight", "attn.q.bias")):
            w = unpermute_rows(w, cfg["n_heads"])
        elif arch in _PERMUTED and name.endswith(("attn.k.weight", "attn.k.bias")):
            w = unpermute_rows(w, cfg["n_kv_heads"])
        out[name] = w
    return out


def import_gguf(path: str):
    """-> (architecture, config, tensors, tokenizer_json) of a GGUF file."""
    from gguf import GGUFReader

    from hpcllm.tokenizer.bpe import ByteLevelBPE

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise HpcllmError(f"{path}: not a readable GGUF file ({exc})") from None
    cfg = gguf_config(reader, path)
    gguf_arch = _field(reader, "general.architecture")
    tensors = gguf_tensors(reader, cfg, gguf_arch, path)
    if tensors["embed.weight"].shape[0] != cfg["vocab"]:
        cfg["vocab"] = int(tensors["embed.weight"].shape[0])
    tokenizer_json = json.dumps(ByteLevelBPE.from_gguf(path).to_json_dict(), ensure_ascii=False)
    return gguf_architecture(gguf_arch, path).name, cfg, tensors, tokenizer_json
