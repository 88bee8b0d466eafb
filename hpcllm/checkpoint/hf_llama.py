"""Import a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Phi-3 directory (config.json,
*.safetensors, tokenizer.json) into hpcllm's decoder names and config.

Which optional weights exist (q/k/v bias, o bias, Qwen3's per-head q/k norms,
an untied LM head) is read from the tensors themselves, so Qwen2's q/k/v bias,
Llama's ``attention_bias`` and Qwen3's ``qk_norm`` need no per-family code. Phi-3's
fused ``qkv_proj`` (Q rows, then K, then V) and ``gate_up_proj`` (gate rows, then up)
are split here into hpcllm's q/k/v and gate/up weights, so the decoder, the loader
and the tp split plan see a Llama.
"""

import json
import os

from hpcllm.checkpoint.sources import decoder_config, read_json, read_tokenizer_json, rename, safetensors_files
from hpcllm.errors import HpcllmError

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o", "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
    "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
    # Phi-3's fused weights: renamed here, then split row-wise by _unfuse
    "self_attn.qkv_proj": "attn.qkv", "mlp.gate_up_proj": "mlp.gate_up",
}
_TOP_NAMES = {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "lm_head"}
_ROPE_TYPES = ("default", "linear", "llama3")


def _rope(src: str, hf: dict):
    """(theta, scaling or None): transformers 5 nests both in rope_parameters, 4.x kept them flat."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params or None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in _ROPE_TYPES:
            raise HpcllmError(f"{src}/config.json: rope scaling type {kind!r} is not supported ({', '.join(_ROPE_TYPES)})")
        scaling = None if kind == "default" else {k: v for k, v in scaling.items() if k != "rope_theta"}
    return float(theta), scaling


def _add_bos(src: str, tokenizer: dict) -> bool:
    """tokenizer_config.json's add_bos_token, else whether tokenizer.json's template starts with a special token."""
    tcfg = read_json(os.path.join(src, "tokenizer_config.json"), default={})
    if "add_bos_token" in tcfg:
        return bool(tcfg["add_bos_token"])
    post = tokenizer.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    template = next((s.get("single") for s in steps if s.get("type") == "TemplateProcessing"), None)
    return bool(template) and "SpecialToken" in template[0]


def llama_config(src: str, hf: dict, names: set, tokenizer: dict) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise HpcllmError(f"{src}/config.json: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
        raise HpcllmError(f"{src}/config.json: use_sliding_window=true (Qwen2/Qwen3 layer-wise sliding windows) "
                          f"is not supported")
    if {"model.layers.0.mlp.gate_proj.bias", "model.layers.0.mlp.gate_up_proj.bias"} & names:
        raise HpcllmError(f"{src}: MLP biases (mlp_bias=true) are not supported")
    partial = hf.get("partial_rotary_factor") or (hf.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0
    if float(partial) != 1.0:
        raise HpcllmError(f"{src}/config.json: partial_rotary_factor {partial} is not supported (1.0 only)")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    theta, scaling = _rope(src, hf)
    context = hf["max_position_embeddings"]
    # Mistral and Phi-3 (every layer windowed, no use_sliding_window key): windows no longer than the
    # attention window keep attention exact; Qwen2/3 window no layer
    # (use_sliding_window false, refused above when true) whatever sliding_window says
    if hf.get("sliding_window") and "use_sliding_window" not in hf:
        context = min(context, int(hf["sliding_window"]))
    bos = hf.get("bos_token_id")
    return decoder_config(
        vocab=hf["vocab_size"], hidden=hidden, n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads, ffn=hf["intermediate_size"],
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_positions=context, tie_embeddings="lm_head.weight" not in names,
        qkv_bias=bool({"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.qkv_proj.bias"} & names),
        o_bias="model.layers.0.self_attn.o_proj.bias" in names,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in names,
        add_bos=_add_bos(src, tokenizer) and bos is not None, bos_id=bos,
        eos_id=hf.get("eos_token_id"), pad_id=hf.get("pad_token_id"),
        eos_ids=_eos_ids(src, hf), chat_template=_chat_template(src),
    )


def _ids(value) -> set:
    return set() if value is None else {int(v) for v in (value if isinstance(value, list) else [value])}


def _eos_ids(src: str, hf: dict) -> set:
    """The ids that end generation: config.json's and generation_config.json's eos_token_id."""
    gen = read_json(os.path.join(src, "generation_config.json"), default={})
    return _ids(hf.get("eos_token_id")) | _ids(gen.get("eos_token_id"))


def _chat_template(src: str):
    """tokenizer_config.json's chat_template (a string, or the "default" of named ones), else
    chat_template.jinja / chat_template.json (newer transformers), else None."""
    template = read_json(os.path.join(src, "tokenizer_config.json"), default={}).get("chat_template")
    if template is None:
        template = read_json(os.path.join(src, "chat_template.json"), default={}).get("chat_template")
    if template is None and os.path.exists(os.path.join(src, "chat_template.jinja")):
        with open(os.path.join(src, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _unfuse(path: str, name: str, w, cfg: dict) -> dict:
    """hpcllm name -> array for one source tensor: Phi-3's fused attn.qkv / mlp.gate_up rows
    split into q, k, v (n_heads, n_kv_heads, n_kv_heads heads of head_dim) / gate, up (ffn each)."""
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


def llama_tensors(src: str, files, cfg: dict) -> dict:
    """hpcllm name -> float32 numpy array (bf16/fp16 files are widened through torch)."""
    import torch
    from safetensors import safe_open

    out = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # derived from the config
                name = rename(key, _TOP_NAMES, _LAYER_NAMES, "model.layers.")
                if name is None:
                    raise HpcllmError(f"{path}: unexpected tensor {key!r} for a Llama-family model")
                out.update(_unfuse(path, name, f.get_tensor(key).to(torch.float32).numpy(), cfg))
    return out


def import_llama(src: str):
    """-> (architecture, config, tensors, tokenizer_json)"""
    from safetensors import safe_open

    hf = read_json(os.path.join(src, "config.json"))
    tokenizer_json = read_tokenizer_json(src)
    files = safetensors_files(src)
    names = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            names.update(f.keys())
    cfg = llama_config(src, hf, names, json.loads(tokenizer_json))
    tensors = llama_tensors(src, files, cfg)
    missing = [n for n in ("embed.weight", "norm.weight") if n not in tensors]
    if missing:
        raise HpcllmError(f"{src}: weights missing from the safetensors files: {', '.join(missing)}")
    return "llama", cfg, tensors, tokenizer_json
