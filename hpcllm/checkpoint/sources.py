"""What the importers (hf_bert, hf_llama, gguf) share: reading a model directory's
files, mapping source tensor names onto hpcllm's, and the decoder config schema
(``decoder_config``) that the HF and GGUF importers of the Llama family both fill."""

import json
import os

from hpcllm.errors import HpcllmError


def read_json(path, default=None):
    """The JSON file at ``path``; ``default`` when it is absent (an error when no default is given)."""
    if not os.path.exists(path):
        if default is not None:
            return default
        raise HpcllmError(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_tokenizer_json(src: str) -> str:
    path = os.path.join(src, "tokenizer.json")
    if not os.path.exists(path):
        raise HpcllmError(f"{src}: tokenizer.json missing (hpcllm needs the fast-tokenizer file)")
    with open(path, encoding="utf-8") as f:
        return f.read()


def safetensors_files(src: str) -> list[str]:
    files = sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(".safetensors"))
    if not files:
        raise HpcllmError(f"{src}: no *.safetensors weights found")
    return files


def rename(key: str, top: dict, layers: dict, layer_prefix: str):
    """hpcllm's name for source tensor ``key`` ("<module>.<weight|bias>"), or None when unknown.

    ``top``: source module -> ours outside the layers; ``layers``: source module inside layer i
    (after ``layer_prefix`` + "i.") -> ours inside "layers.i.".
    """
    base, _, kind = key.rpartition(".")
    if base in top:
        return f"{top[base]}.{kind}"
    if base.startswith(layer_prefix):
        i, _, rest = base[len(layer_prefix):].partition(".")
        if rest in layers:
            return f"layers.{i}.{layers[rest]}.{kind}"
    return None


def unfuse(path: str, name: str, w, cfg: dict) -> dict:
    """hpcllm name -> array for one source tensor: Phi-3's fused attn.qkv / mlp.gate_up rows (HF and
    GGUF alike) split into q, k, v (n_heads, n_kv_heads, n_kv_heads heads of head_dim) / gate, up (ffn each)."""
    q, kv, ffn = cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"], cfg["ffn"]
    pieces = {"attn.qkv": (("attn.q", q), ("attn.k", kv), ("attn.v", kv)),
              "mlp.gate_up": (("mlp.gate", ffn), ("mlp.up", ffn))}
    fused = next((f for f in pieces if f".{f}." in name), None)
    if fused is None:
        return {name: w}
    rows = [n for _, n in pieces[fused]]
    if w.shape[0] != sum(rows):
        raise HpcllmError(f"{path}: {name} has {w.shape[0]} rows, the config says {' + '.join(map(str, rows))}")
    out, start = {}, 0
    for part, n in pieces[fused]:
        out[name.replace(f".{fused}.", f".{part}.")] = w[start:start + n]
        start += n
    return out


def decoder_config(*, vocab: int, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                   ffn: int, rms_eps: float, rope_theta: float, rope_scaling: dict | None, max_positions: int,
                   tie_embeddings: bool, qkv_bias: bool, o_bias: bool, qk_norm: bool, add_bos: bool, bos_id,
                   eos_id, pad_id, eos_ids, chat_template: str | None, features, layer_types: list,
                   sliding_window: int | None, rope_local_theta: float | None, attn_scale: float | None,
                   attn_softcap: float | None, final_softcap: float | None, moe: dict | None) -> dict:
    """The config a decoder checkpoint stores (JSON in its ``config`` attribute) and the decoder
    reads, from fields each importer has already normalised from its source (HF config.json, GGUF
    metadata).  Every field is required, so an importer cannot leave one out.

    ``features``: the family's fixed features (``hpcllm.model.architectures.DecoderFeatures``:
    family name, norm kind and placement, embedding scale, activation);
    ``qk_norm``: an RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3);
    ``layer_types``: per layer "full" (causal over the whole context) or "sliding" (each token
    attends its last ``sliding_window`` tokens, itself included, as transformers masks it);
    ``rope_scaling``: None, or the HF ``rope_scaling`` dict (linear, llama3) without ``rope_theta``,
    for the full layers; ``rope_local_theta``: the sliding layers' own RoPE base, unscaled (Gemma 3),
    or None when they share the full layers' RoPE;
    ``attn_scale``: the query scale (None: 1 / sqrt(head_dim)); ``attn_softcap`` / ``final_softcap``:
    ``cap * tanh(x / cap)`` on attention scores / logits (Gemma 2), or None;
    ``max_positions``: the context the model attends;
    ``bos_id`` / ``pad_id``: None when the source names none; ``eos_id``: the source's own
    (HF: an id or a list of ids); ``eos_ids``: every id that ends a reply (stored sorted);
    ``chat_template``: jinja text, or None;
    ``moe``: None (a dense model) or ``moe_config(...)``: the mixture-of-experts layers.
    Stored only where set (``moe``, and a family's ``qk_norm_over`` "projection"), so dense models'
    configs and content hashes stay what they were."""
    if len(layer_types) != n_layers or set(layer_types) - {"full", "sliding"}:
        raise HpcllmError(f"decoder config: layer_types {layer_types} must be {n_layers} of 'full' / 'sliding'")
    if "sliding" in layer_types and not sliding_window:
        raise HpcllmError("decoder config: sliding layers need a sliding_window")
    return {
        "family": features.family, "vocab": vocab, "hidden": hidden, "n_layers": n_layers,
        "n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim, "ffn": ffn,
        "rms_eps": rms_eps, "norm": features.norm, "sandwich_norms": features.sandwich_norms,
        "embed_scale": float(hidden) ** 0.5 if features.embed_scale else None, "activation": features.activation,
        "rope_theta": rope_theta, "rope_scaling": rope_scaling, "rope_local_theta": rope_local_theta,
        "max_positions": max_positions, "layer_types": list(layer_types),
        "sliding_window": int(sliding_window) if "sliding" in layer_types else None,
        "attn_scale": attn_scale, "attn_softcap": attn_softcap, "final_softcap": final_softcap,
        "tie_embeddings": tie_embeddings, "qkv_bias": qkv_bias, "o_bias": o_bias, "qk_norm": qk_norm,
        "add_bos": add_bos, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id,
        "eos_ids": sorted(eos_ids), "chat_template": chat_template,
        **({"moe": moe} if moe else {}),
        **({"qk_norm_over": features.qk_norm_over} if features.qk_norm_over != "head" else {}),
    }


ROUTERS = ("softmax_topk", "topk_softmax")


def moe_config(*, n_experts: int, top_k: int, expert_ffn: int, shared_ffn: int, shared_gate: bool,
               router: str, norm_topk: bool, dense_layers: list, n_layers: int, where: str) -> dict:
    """The ``moe`` entry of a decoder config (``hpcllm.model.moe`` reads it).

    ``n_experts`` routed experts of intermediate size ``expert_ffn``, ``top_k`` of them per token;
    ``router``: "softmax_topk" (softmax over all experts, then the top k: Mixtral, Qwen-MoE, OLMoE)
    or "topk_softmax" (top k logits, softmax over them); ``norm_topk``: the k weights renormalised
    to sum 1 (Mixtral always, Qwen3-MoE / OLMoE per config); ``shared_ffn``: a shared expert every
    token goes through (0: none), scaled by sigmoid(w . x) when ``shared_gate`` (Qwen2-MoE);
    ``dense_layers``: layers with the dense MLP (``ffn``) instead (Qwen-MoE's mlp_only_layers /
    decoder_sparse_step)."""
    if router not in ROUTERS:
        raise HpcllmError(f"{where}: router {router!r} is not supported ({', '.join(ROUTERS)})")
    if not 0 < top_k <= n_experts:
        raise HpcllmError(f"{where}: {top_k} experts per token of {n_experts} experts")
    if any(not 0 <= i < n_layers for i in dense_layers):
        raise HpcllmError(f"{where}: dense layers {sorted(dense_layers)} outside the {n_layers} layers")
    return {"n_experts": int(n_experts), "top_k": int(top_k), "expert_ffn": int(expert_ffn),
            "shared_ffn": int(shared_ffn), "shared_gate": bool(shared_gate and shared_ffn), "router": router,
            "norm_topk": bool(norm_topk), "dense_layers": sorted(int(i) for i in dense_layers)}
