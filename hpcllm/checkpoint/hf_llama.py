"""Import a Hugging Face decoder directory (config.json, *.safetensors, tokenizer.json) of a
family in ``architectures.DECODER_FAMILIES`` (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2,
Gemma 3) into hpcllm's decoder names and config. What a family fixes comes from its
``DecoderFeatures`` entry; what each model sets (windows, soft-caps, RoPE) from its config.json.

Which optional weights exist (q/k/v bias, o bias, Qwen3's per-head q/k norms,
an untied LM head) is read from the tensors themselves, so Qwen2's q/k/v bias,
Llama's ``attention_bias`` and Qwen3's ``qk_norm`` need no per-family code. Phi-3's
fused ``qkv_proj`` (Q rows, then K, then V) and ``gate_up_proj`` (gate rows, then up)
are split at import (``sources.unfuse``) into hpcllm's q/k/v and gate/up weights, so the decoder, the loader
and the tp split plan see a Llama.

Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): each expert's weights
(``experts.<e>.w1/w3/w2`` or ``gate_proj/up_proj/down_proj``; transformers' stacked
``experts.gate_up_proj`` / ``down_proj`` too) are stacked into ``mlp.gate_exps`` / ``up_exps``
[E, ffn, hidden] and ``down_exps`` [E, hidden, ffn]; the routing comes from ``moe_from_hf``.
"""

import json
import os
import re

import numpy as np

from hpcllm.checkpoint.sources import (decoder_config, moe_config, read_json, read_tokenizer_json, rename,
                                       safetensors_files, unfuse)
from hpcllm.errors import HpcllmError
from hpcllm.model.architectures import decoder_family

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
    "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o", "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm",
    "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
    # Phi-3's fused weights: renamed here, then split row-wise by sources.unfuse
    "self_attn.qkv_proj": "attn.qkv", "mlp.gate_up_proj": "mlp.gate_up",
}
_TOP_NAMES = {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "lm_head"}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def _rope_pair(src: str, params: dict, theta_default: float):
    """(theta, scaling or None) of one RoPE parameter set."""
    params = dict(params)
    theta = params.pop("rope_theta", theta_default)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise HpcllmError(f"{src}/config.json: rope scaling type {kind!r} is not supported ({', '.join(_ROPE_TYPES)})")
    return float(theta), (None if kind == "default" else params)


def _complete_scaling(hf: dict, scaling):
    """llama3 / yarn parameters transformers fills from the config: the pre-training context (the
    config's original_max_position_embeddings, else max_position_embeddings) and yarn's factor."""
    if not scaling or scaling.get("rope_type", scaling.get("type")) not in ("llama3", "yarn"):
        return scaling
    scaling = dict(scaling)
    if hf.get("original_max_position_embeddings"):
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    scaling.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    if scaling.get("factor") is None:
        scaling["factor"] = hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return scaling


def _rope(src: str, hf: dict, local: bool):
    """(theta, scaling, local theta): transformers 5 nests RoPE in rope_parameters (per layer type for
    Gemma 3: "full_attention" / "sliding_attention"), 4.x kept rope_theta / rope_scaling /
    rope_local_base_freq flat."""
    params = hf.get("rope_parameters") or {}
    theta0 = hf.get("rope_theta", 10000.0)
    if "full_attention" in params:
        theta, scaling = _rope_pair(src, params["full_attention"], theta0)
        local_theta = _rope_pair(src, params.get("sliding_attention", {}), 10000.0)[0]
    else:
        theta, scaling = _rope_pair(src, hf.get("rope_scaling") or params, theta0)
        if "rope_theta" in params:
            theta = float(params["rope_theta"])
        local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    return theta, _complete_scaling(hf, scaling), local_theta if local else None


def _layer_types(src: str, hf: dict, windows: str) -> list:
    """Per layer "full" or "sliding", as transformers builds the family's masks."""
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    if windows == "all":
        return ["sliding" if window else "full"] * n
    if windows == "none" or not window or hf.get("use_sliding_window") is False:
        return ["full"] * n
    if hf.get("layer_types"):
        unknown = set(hf["layer_types"]) - set(_LAYER_TYPES)
        if unknown:
            raise HpcllmError(f"{src}/config.json: layer_types {sorted(unknown)} are not supported "
                              f"({', '.join(_LAYER_TYPES)})")
        return [_LAYER_TYPES[t] for t in hf["layer_types"]]
    if "use_sliding_window" in hf:   # Qwen2/3 (4.x configs): layers from max_window_layers on slide
        return ["sliding" if i >= hf.get("max_window_layers", n) else "full" for i in range(n)]
    pattern = hf.get("sliding_window_pattern", 2)    # Gemma 2: every other layer; Gemma 3: 5 of 6
    return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n)]


def _add_bos(src: str, tokenizer: dict) -> bool:
    """tokenizer_config.json's add_bos_token, else whether tokenizer.json's template starts with a special token."""
    tcfg = read_json(os.path.join(src, "tokenizer_config.json"), default={})
    if "add_bos_token" in tcfg:
        return bool(tcfg["add_bos_token"])
    post = tokenizer.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    template = next((s.get("single") for s in steps if s.get("type") == "TemplateProcessing"), None)
    return bool(template) and "SpecialToken" in template[0]


def moe_from_hf(src: str, hf: dict, features):
    """The ``moe`` config entry of a mixture-of-experts family (``features.moe``), or None."""
    where, n_layers = f"{src}/config.json", hf["num_hidden_layers"]
    if not features.moe:
        return None
    n_experts = hf.get("num_local_experts") or hf.get("num_experts")   # transformers 5 / 4.x names
    if features.moe == "mixtral":
        return moe_config(n_experts=n_experts, top_k=hf["num_experts_per_tok"],
                          expert_ffn=hf["intermediate_size"], shared_ffn=0, shared_gate=False,
                          router="softmax_topk", norm_topk=True, dense_layers=[], n_layers=n_layers, where=where)
    if features.moe == "olmoe":
        if hf.get("clip_qkv") is not None:
            raise HpcllmError(f"{where}: clip_qkv {hf['clip_qkv']} is not supported (null only)")
        return moe_config(n_experts=n_experts, top_k=hf["num_experts_per_tok"],
                          expert_ffn=hf["intermediate_size"], shared_ffn=0, shared_gate=False,
                          router="softmax_topk", norm_topk=bool(hf.get("norm_topk_prob")), dense_layers=[],
                          n_layers=n_layers, where=where)
    # Qwen2-MoE / Qwen3-MoE: dense layers where mlp_only_layers says or decoder_sparse_step skips
    step = hf.get("decoder_sparse_step") or 1
    dense = [i for i in range(n_layers) if i in (hf.get("mlp_only_layers") or []) or (i + 1) % step]
    shared = hf.get("shared_expert_intermediate_size") or 0
    return moe_config(n_experts=n_experts, top_k=hf["num_experts_per_tok"],
                      expert_ffn=hf["moe_intermediate_size"], shared_ffn=shared, shared_gate=bool(shared),
                      router="softmax_topk", norm_topk=bool(hf.get("norm_topk_prob")), dense_layers=dense,
                      n_layers=n_layers, where=where)


def llama_config(src: str, hf: dict, names: set, tokenizer: dict, features) -> dict:
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if _ACTIVATIONS.get(act) != features.activation:
        raise HpcllmError(f"{src}/config.json: hidden_act {act!r} is not supported for {features.family} "
                          f"({next(k for k, v in _ACTIVATIONS.items() if v == features.activation)})")
    if {"model.layers.0.mlp.gate_proj.bias", "model.layers.0.mlp.gate_up_proj.bias"} & names:
        raise HpcllmError(f"{src}: MLP biases (mlp_bias=true) are not supported")
    partial = hf.get("partial_rotary_factor") or (hf.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0
    if float(partial) != 1.0:
        raise HpcllmError(f"{src}/config.json: partial_rotary_factor {partial} is not supported (1.0 only)")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    theta, scaling, local_theta = _rope(src, hf, features.local_rope)
    scalar = hf.get("query_pre_attn_scalar") if features.norm == "gemma" else None
    bos = hf.get("bos_token_id")
    return decoder_config(
        vocab=hf["vocab_size"], hidden=hidden, n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, ffn=hf["intermediate_size"],
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_positions=hf["max_position_embeddings"], tie_embeddings="lm_head.weight" not in names,
        qkv_bias=bool({"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.qkv_proj.bias"} & names),
        o_bias="model.layers.0.self_attn.o_proj.bias" in names,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in names and features.qk_norm_over == "head",
        add_bos=_add_bos(src, tokenizer) and bos is not None, bos_id=bos,
        eos_id=hf.get("eos_token_id"), pad_id=hf.get("pad_token_id"),
        eos_ids=_eos_ids(src, hf), chat_template=_chat_template(src), features=features,
        layer_types=_layer_types(src, hf, features.windows), sliding_window=hf.get("sliding_window"),
        rope_local_theta=local_theta, attn_scale=float(scalar) ** -0.5 if scalar else None,
        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
        moe=moe_from_hf(src, hf, features),
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


# one expert's weight (Mixtral's w1 / w3 / w2, the others' gate/up/down_proj), or all experts stacked
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(?:(\d+)\.)?"
                     r"(w1|w3|w2|gate_proj|up_proj|down_proj|gate_up_proj)(?:\.weight)?$")
_EXPERT_NAMES = {"w1": "gate_exps", "gate_proj": "gate_exps", "w3": "up_exps", "up_proj": "up_exps",
                 "w2": "down_exps", "down_proj": "down_exps"}


def _stack_experts(path: str, experts: dict, cfg: dict) -> dict:
    """(layer, hpcllm name) -> {expert: [out, in]} (or {None: stacked [E, out, in]}) -> stacked tensors."""
    if not experts:
        return {}
    n, ffn = cfg["moe"]["n_experts"], cfg["moe"]["expert_ffn"]
    out = {}
    for (layer, name), parts in experts.items():
        if None in parts:
            w = parts[None]
            pieces = {"gate_exps": w[:, :ffn], "up_exps": w[:, ffn:]} if name == "gate_up" else {name: w}
        else:
            if sorted(parts) != list(range(n)):
                raise HpcllmError(f"{path}: layer {layer} {name}: experts {sorted(parts)}, the config says {n}")
            pieces = {name: np.stack([parts[e] for e in range(n)])}
        for part, w in pieces.items():
            out[f"layers.{layer}.mlp.{part}.weight"] = np.ascontiguousarray(w)
    return out


def llama_tensors(src: str, files, cfg: dict, features) -> dict:
    """hpcllm name -> float32 numpy array (bf16/fp16 files are widened through torch). Gemma's norm
    weights w become the multiplier 1 + w its RMSNorm applies (as GGUF stores them)."""
    import torch
    from safetensors import safe_open

    layer_names = {**_LAYER_NAMES, **dict(features.hf_names)}
    out, experts = {}, {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue  # derived from the config
                m = _EXPERT.match(key) if cfg.get("moe") else None
                if m:
                    layer, e, w = m.groups()
                    name = "gate_up" if w == "gate_up_proj" else _EXPERT_NAMES[w]
                    parts = experts.setdefault((int(layer), name), {})
                    parts[None if e is None else int(e)] = f.get_tensor(key).to(torch.float32).numpy()
                    continue
                name = rename(key, _TOP_NAMES, layer_names, "model.layers.")
                if name is None:
                    raise HpcllmError(f"{path}: unexpected tensor {key!r} for a {features.family} model")
                w = f.get_tensor(key).to(torch.float32)
                if features.norm == "gemma" and name.endswith("norm.weight"):
                    w = w + 1.0
                out.update(unfuse(path, name, w.numpy(), cfg))
    out.update(_stack_experts(src, experts, cfg))
    return out


def import_llama(src: str):
    """-> (architecture, config, tensors, tokenizer_json)"""
    from safetensors import safe_open

    hf = read_json(os.path.join(src, "config.json"))
    features = decoder_family(hf.get("model_type"))
    if "text_config" in hf:
        raise HpcllmError(f"{src}/config.json: a multimodal {hf.get('model_type')} model; hpcllm runs text "
                          f"decoders (convert the text model, e.g. Gemma3ForCausalLM's directory)")
    tokenizer_json = read_tokenizer_json(src)
    files = safetensors_files(src)
    names = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            names.update(f.keys())
    cfg = llama_config(src, hf, names, json.loads(tokenizer_json), features)
    tensors = llama_tensors(src, files, cfg, features)
    missing = [n for n in ("embed.weight", "norm.weight") if n not in tensors]
    if missing:
        raise HpcllmError(f"{src}: weights missing from the safetensors files: {', '.join(missing)}")
    return "llama", cfg, tensors, tokenizer_json
