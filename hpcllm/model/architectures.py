"""The architecture registry: one entry per architecture a checkpoint can name.

An entry says which family it is (what jobs may run it), which plain model
class builds it, its tensor-parallel split plan (torchtitan-style: module
name -> column / row / vocab parallel, and where the local head counts
live), and which sources its importers read (HF ``model_type`` values, GGUF
``general.architecture`` values). The plan is read by ``parallel.parallelize``
(the layers), ``parallel.load_state`` (the hyperslab each rank reads) and the
checkpoint writer (the split attributes it stores). Adding an architecture
means adding an entry here, a model file and an importer.

No torch here: the checkpoint writer, ``inspect`` and the tokenize job use it.
"""

import importlib
from dataclasses import dataclass

from hpcllm.errors import HpcllmError
from hpcllm.model.partition import HEADS, REDUCE, VOCAB, col, row

# Module names of hpcllm's BERT encoder ("*" = layer index). q/k/v/up are column-parallel,
# o/down row-parallel (one all-reduce after each), the token embedding vocab-parallel;
# the layer itself holds the attention's head counts.
BERT_PLAN = {
    "embed.tokens": VOCAB,
    "layers.*": HEADS,
    "layers.*.q": col("q"), "layers.*.k": col("kv"), "layers.*.v": col("kv"), "layers.*.o": row("q"),
    "layers.*.up": col("ffn"), "layers.*.down": row("ffn"),
}

# How experts are split over a tp group: "experts" (whole experts, near-equal uneven counts: a rank
# runs only the tokens routed to its own experts) or "expert_ffn" (1/tp of every expert's columns:
# every rank runs every routed token on its columns). bench/moe_split.py at tp 2 (2 CPU cores, 1
# thread per rank, a random Mixtral-shaped model): on a quiet machine equal (prefill 4428 vs 4415
# tokens/s, 8-row decode 543 vs 531), on a loaded one 1.28-1.34x in decode for whole experts (half
# the token x expert products per rank, each matmul twice as wide). The price: a rank waits for the
# group's busiest experts, and uneven counts hold ceil(E / tp) / E of the experts.
MOE_UNIT = "experts"

# hpcllm's decoder (every family of DECODER_FAMILIES): the same Megatron split, GQA heads on group
# boundaries, vocab-parallel embedding and LM head (tied or not). Not in the plan, so replicated: the
# norms, the per-head attn.q_norm / attn.k_norm included (every rank applies them to its own heads).
LLAMA_PLAN = {
    "embed": VOCAB, "lm_head": VOCAB,
    "layers.*.attn": HEADS,
    "layers.*.attn.q": col("q"), "layers.*.attn.k": col("kv"), "layers.*.attn.v": col("kv"),
    "layers.*.attn.o": row("q"),
    "layers.*.mlp.gate": col("ffn"), "layers.*.mlp.up": col("ffn"), "layers.*.mlp.down": row("ffn"),
    # OLMoE's q/k norms span the whole projections: their weights follow the heads
    "layers.*.attn.q_proj_norm": col("q"), "layers.*.attn.k_proj_norm": col("kv"),
    # mixture of experts (moe.py): the router replicated; 1/tp of every expert's columns (stacked
    # [E, ffn, hidden] gate/up, [E, hidden, ffn] down) and of the shared expert's; the block sums its
    # experts' and shared expert's partial products with the layer's one all-reduce
    "layers.*.mlp": REDUCE,
    **{f"layers.*.mlp.{w}_exps": (row if w == "down" else col)(MOE_UNIT) for w in ("gate", "up", "down")},
    **{f"layers.*.mlp.shared_{w}": (row if w == "down" else col)("shared_ffn") for w in ("gate", "up", "down")},
}

FAMILIES = {"encoder": "an encoder", "decoder": "a decoder"}


@dataclass(frozen=True)
class DecoderFeatures:
    """What a decoder family fixes (the rest, window sizes, soft-caps, RoPE bases, biases, comes from
    each checkpoint's own config). One decoder (``decoder.py``), one loader and the one plan above
    read them; adding a dense family is an entry here and, where its names differ, an importer mapping.

    ``norm``: "llama" (RMSNorm scaled in the activation dtype) or "gemma" (scaled in float32; weights
    stored as the multiplier 1 + w, as GGUF stores them); ``sandwich_norms``: a norm after the
    attention and after the MLP as well as before them (Gemma 2/3); ``embed_scale``: embeddings times
    sqrt(hidden) (Gemma); ``activation``: the gated MLP's, "silu" or "gelu_tanh";
    ``windows``: which layers slide when the config has a window: "all" (Mistral, Phi-3),
    "layer_types" (the config's per-layer list: Gemma 2/3, Qwen2/3's use_sliding_window) or "none";
    ``local_rope``: sliding layers use their own RoPE base (Gemma 3's rope_local_base_freq);
    ``qk_norm_over``: what the q/k norms span, "head" (each head: Qwen3, Gemma 3) or "projection"
    (the whole q and k projections, all heads at once: OLMoE);
    ``moe``: the family's mixture-of-experts routing, as ``hf_llama.moe_from_hf`` reads it
    ("" dense; "mixtral", "qwen_moe", "olmoe");
    ``hf_names`` / ``gguf_names``: source layer names that differ from the Llama mapping."""

    family: str
    norm: str = "llama"
    sandwich_norms: bool = False
    embed_scale: bool = False
    activation: str = "silu"
    windows: str = "none"
    local_rope: bool = False
    qk_norm_over: str = "head"
    moe: str = ""
    hf_names: tuple = ()
    gguf_names: tuple = ()
    aliases: tuple = ()     # other HF model_type values of the family
    gguf: tuple = ()        # its GGUF general.architecture values, where they differ from ``family``


def decoder_family(model_type: str) -> "DecoderFeatures | None":
    """The family an HF ``model_type`` or a GGUF architecture names, or None."""
    return next((f for f in DECODER_FAMILIES.values()
                 if model_type == f.family or model_type in f.aliases or model_type in f.gguf), None)


_GEMMA_HF = (("post_attention_layernorm", "attn_post_norm"), ("pre_feedforward_layernorm", "mlp_norm"),
             ("post_feedforward_layernorm", "mlp_post_norm"))
_GEMMA_GGUF = (("post_attention_norm", "attn_post_norm"), ("post_ffw_norm", "mlp_post_norm"))
_GEMMA = dict(norm="gemma", sandwich_norms=True, embed_scale=True, activation="gelu_tanh", windows="layer_types",
              hf_names=_GEMMA_HF, gguf_names=_GEMMA_GGUF)

_MIXTRAL_HF = (("block_sparse_moe.gate", "mlp.router"),)
_QWEN_MOE_HF = (("mlp.gate", "mlp.router"), ("mlp.shared_expert.gate_proj", "mlp.shared_gate"),
                ("mlp.shared_expert.up_proj", "mlp.shared_up"), ("mlp.shared_expert.down_proj", "mlp.shared_down"),
                ("mlp.shared_expert_gate", "mlp.shared_router"))
_OLMOE_HF = (("mlp.gate", "mlp.router"), ("self_attn.q_norm", "attn.q_proj_norm"),
             ("self_attn.k_norm", "attn.k_proj_norm"))
_MOE_GGUF = (("ffn_gate_inp", "mlp.router"), ("ffn_gate_exps", "mlp.gate_exps"), ("ffn_up_exps", "mlp.up_exps"),
             ("ffn_down_exps", "mlp.down_exps"), ("ffn_gate_shexp", "mlp.shared_gate"),
             ("ffn_up_shexp", "mlp.shared_up"), ("ffn_down_shexp", "mlp.shared_down"),
             ("ffn_gate_inp_shexp", "mlp.shared_router"))

# HF model_type / GGUF general.architecture -> features (llama.cpp writes Mistral as "llama")
DECODER_FAMILIES = {f.family: f for f in (
    DecoderFeatures("llama"),
    DecoderFeatures("mistral", windows="all"),
    DecoderFeatures("qwen2", windows="layer_types"),
    DecoderFeatures("qwen3", windows="layer_types"),
    DecoderFeatures("phi3", windows="all", gguf_names=(("attn_qkv", "attn.qkv"), ("ffn_up", "mlp.gate_up"))),
    DecoderFeatures("gemma2", **_GEMMA),
    DecoderFeatures("gemma3", local_rope=True, aliases=("gemma3_text",), **_GEMMA),
    # mixture of experts (hpcllm.model.moe); GGUF writes Mixtral as "llama" with ffn_*_exps tensors
    DecoderFeatures("mixtral", windows="all", moe="mixtral", hf_names=_MIXTRAL_HF, gguf_names=_MOE_GGUF),
    DecoderFeatures("qwen2_moe", windows="layer_types", moe="qwen_moe", hf_names=_QWEN_MOE_HF,
                    gguf_names=_MOE_GGUF, gguf=("qwen2moe",)),
    DecoderFeatures("qwen3_moe", windows="layer_types", moe="qwen_moe", hf_names=_QWEN_MOE_HF,
                    gguf_names=_MOE_GGUF, gguf=("qwen3moe",)),
    DecoderFeatures("olmoe", qk_norm_over="projection", moe="olmoe", hf_names=_OLMOE_HF),
)}


@dataclass(frozen=True)
class Architecture:
    name: str                      # the checkpoint's ``architecture`` attribute
    family: str                    # "encoder" | "decoder"
    model: str                     # "module:Class" of the plain model, imported when built
    plan: dict                     # module-name pattern -> Split
    hf_model_types: tuple = ()     # config.json model_type values the HF importer reads
    hf_importer: str = ""          # "module:function", src -> (architecture, config, tensors, tokenizer_json)
    gguf_architectures: tuple = ()  # GGUF general.architecture values (hpcllm.checkpoint.gguf)

    def model_class(self):
        return _load(self.model)


ARCHITECTURES = {a.name: a for a in (
    Architecture("bert", "encoder", "hpcllm.model.encoder:Encoder", BERT_PLAN,
                 hf_model_types=("bert", "roberta", "xlm-roberta"), hf_importer="hpcllm.checkpoint.hf_bert:import_bert"),
    Architecture("llama", "decoder", "hpcllm.model.decoder:Decoder", LLAMA_PLAN,
                 hf_model_types=tuple(t for f in DECODER_FAMILIES.values() for t in (f.family, *f.aliases)), hf_importer="hpcllm.checkpoint.hf_llama:import_llama",
                 gguf_architectures=("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "qwen2moe", "qwen3moe")),
)}


def _load(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise HpcllmError(f"unknown architecture {name!r} (this hpcllm knows {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def plan_for(name: str) -> dict:
    return architecture(name).plan


def family_members(family: str) -> list[str]:
    return [a.name for a in ARCHITECTURES.values() if a.family == family]


def require_family(ckpt, family: str, job: str) -> Architecture:
    """The checkpoint's architecture, or a one-line error when ``job`` cannot run it, e.g.
    "score: m.h5 is a bert model; score needs a decoder (llama)"."""
    arch = architecture(ckpt.architecture)
    if arch.family != family:
        raise HpcllmError(f"{job}: {ckpt.path} is a {arch.name} model; {job} needs "
                          f"{FAMILIES[family]} ({', '.join(family_members(family))})")
    return arch


def hf_importer(model_type, where: str):
    """The import function for an HF directory whose config.json says ``model_type``."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.hf_model_types:
            return _load(arch.hf_importer)
    known = sorted(t for a in ARCHITECTURES.values() for t in a.hf_model_types)
    raise HpcllmError(f"{where}: model_type {model_type!r} is not supported ({', '.join(known)})")


def gguf_architecture(gguf_arch: str, where: str) -> Architecture:
    """The architecture a GGUF file with ``general.architecture = gguf_arch`` is imported as."""
    for arch in ARCHITECTURES.values():
        if gguf_arch in arch.gguf_architectures:
            return arch
    known = sorted(g for a in ARCHITECTURES.values() for g in a.gguf_architectures)
    raise HpcllmError(f"{where}: GGUF architecture {gguf_arch!r} is not supported ({', '.join(known)})")
