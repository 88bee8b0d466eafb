"""The decoder of every family in ``architectures.DECODER_FAMILIES`` (SmolLM2, Llama 2/3,
Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3): RoPE, RMSNorm, a gated MLP, grouped-query
causal attention, tied or untied LM head. What differs between families is config
(``hpcllm.checkpoint.sources.decoder_config``), read here and nowhere else:

- norms: "llama" (scaled in the activation dtype) or "gemma" (scaled in float32), before
  attention and MLP, and with ``sandwich_norms`` after them too (Gemma 2/3);
- ``qk_norm``: an RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3; weights of
  size D shared by all heads, replicated on every tp rank, which applies them to its own heads);
- ``embed_scale`` (Gemma: sqrt(hidden)), the MLP's ``activation`` (silu or tanh-GELU), q/k/v and o
  biases, the query scale ``attn_scale``, soft-capping of attention scores (``attn_softcap``) and
  of logits (``final_softcap``, applied by ``soften`` where the logits are made);
- per layer (``layer_types``): "full" causal attention, or "sliding": each token attends its last
  ``sliding_window`` positions, itself included (Mistral, Phi-3, Gemma), with its own RoPE base
  where ``rope_local_theta`` is set (Gemma 3). The KV cache keeps only a sliding layer's window
  (``hpcllm.generate.kv_cache``).

Plain PyTorch at full size: the model knows nothing about ranks.
``parallel.parallelize`` cuts it for a tp rank with the plan in
``architectures.py`` (q/k/v and gate/up column-parallel, o and down
row-parallel: two all-reduces per layer; embedding and LM head
vocab-parallel; local ``n_heads`` / ``n_kv_heads`` per attention); after
loading, ``fuse`` makes Q|K|V and gate|up one matmul each, and on the
model's device ``pack`` holds their weights (and o, down, and the LM head:
``head``) as oneDNN tensors where that runs (fp32 on the CPU; bf16 where
the CPU has native bf16). The model returns final hidden states; turning
them into log-probabilities without gathering the vocabulary is
``hpcllm.scoring``, which reads ``head``, ``vocab_start``, ``soften`` and ``comm``.
Weights use HF's q/k row order (rotate-half RoPE); the GGUF importer undoes
llama.cpp's interleaving permutation.
Shapes: B batch, L tokens, Hq / Hkv local query / KV heads, D head dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpcllm.model.layers import frozen_embedding, fuse_linears, pack, pack_weight
from hpcllm.model.moe import MoE, ProjectionNorm, is_moe_layer, projection_norms
from hpcllm.world.comm import LocalComm


class RMSNorm(nn.Module):
    """Normalised in float32, then scaled in the input dtype (kind "llama", as HF Llama does) or in
    float32 and cast (kind "gemma": its weight is the multiplier 1 + w)."""

    def __init__(self, dim: int, eps: float, kind: str = "llama"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.in_float = eps, kind == "gemma"

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.in_float:
            return (h * self.weight.float()).to(x.dtype)
        return self.weight * h.to(x.dtype)


def norm(cfg: dict, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or cfg["hidden"], cfg["rms_eps"], cfg.get("norm", "llama"))


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [D/2] from the base ``theta``, scaled as ``scaling`` says: "linear",
    "llama3", or "freq_factors" (per-dimension divisors: a GGUF's rope_freqs)."""
    d = head_dim
    # explicit device: models are built under torch.device("meta") and this buffer is not loaded
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        inv = _llama3_scaling(inv, scaling)
    elif kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "freq_factors":
        inv = inv / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
    elif kind == "yarn":
        inv = _yarn_scaling(inv, d, theta, scaling)
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3, yarn, freq_factors)")
    return inv


def rope_attention_factor(scaling: dict | None) -> float:
    """What YaRN multiplies cos and sin by (1 for every other kind): the configured attention_factor,
    else 0.1 * ln(factor) + 1 (scaled by mscale / mscale_all_dim where both are given)."""
    scaling = scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(m=1.0):
        return 1.0 if scaling["factor"] <= 1 else 0.1 * m * math.log(scaling["factor"]) + 1.0
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"]))
    return mscale()


def _yarn_scaling(inv: torch.Tensor, d: int, theta: float, s: dict) -> torch.Tensor:
    # YaRN: dimensions rotating fewer than beta_slow times over the original context are interpolated
    # (divided by factor), those rotating more than beta_fast times kept, a linear ramp between
    old_ctx, factor = s["original_max_position_embeddings"], s["factor"]

    def dim_of(rotations):
        return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / ((high - low) or 0.001), 0, 1)
    keep = 1 - ramp
    return inv / factor * (1 - keep) + inv * keep


def _llama3_scaling(inv: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, blended, scaled)


def rope_tables(inv_freq, positions, dtype, scale: float = 1.0):
    """cos, sin [B or 1, 1, L, D] for integer positions [B or 1, L] (computed in float32, times ``scale``:
    YaRN's attention factor)."""
    angles = positions[..., None].float() * inv_freq  # [B, L, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(q, k, v, q_pos, k_pos, *, scale=None, window=None, softcap=None):
    """Causal attention of q [B, Hq, Lq, D] at positions q_pos [Lq] over k, v [B, Hkv, Lk, D] at
    k_pos [Lk] (GQA: query head j reads KV head j // (Hq / Hkv)): key j is seen by query i when
    k_pos[j] <= q_pos[i], and with a ``window`` W when k_pos[j] > q_pos[i] - W (transformers'
    sliding-window mask). ``scale``: of q.k (None: 1 / sqrt(D)); ``softcap``: scores become
    softcap * tanh(scores / softcap) before the mask, which SDPA cannot do, so that path is eager."""
    gqa = q.shape[1] != k.shape[1]
    same = window is None and len(q_pos) == len(k_pos)    # positions are consecutive: plain causal
    if softcap is None:
        if same:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(q_pos, k_pos, window), scale=scale,
                                              enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible(q_pos, k_pos, window), float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def visible(q_pos, k_pos, window=None):
    """[Lq, Lk] bool: which keys each query sees (causal, and within ``window``)."""
    mask = k_pos[None] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None] > q_pos[:, None] - window
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: dict, index: int = 0):
        super().__init__()
        hidden, d = cfg["hidden"], cfg["head_dim"]
        self.n_heads, self.n_kv_heads, self.head_dim = cfg["n_heads"], cfg["n_kv_heads"], d
        bias = cfg.get("qkv_bias", False)
        self.q = nn.Linear(hidden, self.n_heads * d, bias=bias)
        self.k = nn.Linear(hidden, self.n_kv_heads * d, bias=bias)
        self.v = nn.Linear(hidden, self.n_kv_heads * d, bias=bias)
        self.o = nn.Linear(self.n_heads * d, hidden, bias=cfg.get("o_bias", False))
        self.qk_norm = cfg.get("qk_norm", False)
        if self.qk_norm:
            self.q_norm = norm(cfg, d)
            self.k_norm = norm(cfg, d)
        self.proj_norm = cfg.get("qk_norm_over") == "projection"
        if self.proj_norm:   # OLMoE: over all heads of q and of k (moe.projection_norms)
            self.q_proj_norm = ProjectionNorm(self.n_heads * d, cfg["rms_eps"])
            self.k_proj_norm = ProjectionNorm(self.n_kv_heads * d, cfg["rms_eps"])
            self.comm, self.kv_copies = LocalComm(), 1    # the tp group's (parallelize)
        sliding = layer_type(cfg, index) == "sliding"
        self.window = cfg["sliding_window"] if sliding else None
        self.local_rope = sliding and cfg.get("rope_local_theta") is not None
        self.scale, self.softcap = cfg.get("attn_scale"), cfg.get("attn_softcap")

    def fuse(self):
        """After loading: this rank's Q, K and V become one matmul (fewer, larger GEMMs per token)."""
        self.qkv = fuse_linears(self.q, self.k, self.v)
        del self.q, self.k, self.v

    def heads(self, x, cos, sin):
        """q [B, Hq, L, D], k and v [B, Hkv, L, D] of x [B, L, hidden]; q and k normalised per head
        (``qk_norm``), then RoPE applied to them."""
        B, L, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split((Hq * D, Hkv * D, Hkv * D), dim=-1)
        if self.proj_norm:
            q, k = projection_norms(self, q, k)
        q, k, v = q.view(B, L, Hq, D), k.view(B, L, Hkv, D), v.view(B, L, Hkv, D)
        if self.qk_norm:   # over D, the last axis: each head on its own
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, rope, kv=None):
        """``rope``: (cos, sin) of the full and of the sliding layers (``Decoder.forward``)."""
        B, L, _ = x.shape
        cos, sin = rope[1] if self.local_rope else rope[0]
        q, k, v = self.heads(x, cos, sin)
        if kv is not None:   # generation: k, v go into the cache, attention reads it (hpcllm.generate.kv_cache)
            a = kv.attend(q, k, v, self)
        else:   # right padding only: with a causal mask no real token ever sees a pad
            pos = torch.arange(L, device=x.device)
            a = attention(q, k, v, pos, pos, scale=self.scale, window=self.window, softcap=self.softcap)
        return self.o(a.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))  # all-reduce 1 (row-parallel o)


def layer_type(cfg: dict, index: int) -> str:
    return (cfg.get("layer_types") or ["full"] * cfg["n_layers"])[index]


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.act = ACTIVATIONS[cfg.get("activation", "silu")]
        self.gate = nn.Linear(cfg["hidden"], cfg["ffn"], bias=False)
        self.up = nn.Linear(cfg["hidden"], cfg["ffn"], bias=False)
        self.down = nn.Linear(cfg["ffn"], cfg["hidden"], bias=False)

    def fuse(self):
        """After loading: gate and up become one matmul."""
        self.gate_up = fuse_linears(self.gate, self.up)
        del self.gate, self.up

    def pack(self):
        pack(self.gate_up, self.down)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)  # all-reduce 2 (row-parallel down)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, index: int = 0):
        super().__init__()
        self.attn_norm = norm(cfg)
        self.attn = Attention(cfg, index)
        self.mlp_norm = norm(cfg)
        act = ACTIVATIONS[cfg.get("activation", "silu")]
        self.mlp = MoE(cfg, act) if is_moe_layer(cfg, index) else MLP(cfg)   # MoE: all-reduce 2 in the block
        self.sandwich = cfg.get("sandwich_norms", False)
        if self.sandwich:   # Gemma 2/3: the sublayers' outputs are normalised before the residual add
            self.attn_post_norm = norm(cfg)
            self.mlp_post_norm = norm(cfg)

    def forward(self, x, rope, kv=None):
        if self.sandwich:
            x = x + self.attn_post_norm(self.attn(self.attn_norm(x), rope, kv))
            return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.attn(self.attn_norm(x), rope, kv)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """ids [B, L] (right-padded) -> final hidden states [B, L, hidden] after the last norm.

    ``head_weight`` is this rank's rows [V_local, hidden] of the LM head
    (the embedding itself when tied); ``vocab_start`` is their first id;
    ``comm`` the tp group's collectives (a no-op one until ``parallelize``).
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.comm = LocalComm()
        self.embed = frozen_embedding(cfg["vocab"], cfg["hidden"])
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg["n_layers"]))
        self.norm = norm(cfg)
        if not cfg.get("tie_embeddings", False):
            self.lm_head = nn.Linear(cfg["hidden"], cfg["vocab"], bias=False)
        self.register_buffer("inv_freq", rope_frequencies(cfg["head_dim"], cfg["rope_theta"], cfg.get("rope_scaling")),
                             persistent=False)
        local = cfg.get("rope_local_theta")
        self.register_buffer("inv_freq_local", None if local is None else rope_frequencies(cfg["head_dim"], local, None),
                             persistent=False)
        self.embed_scale, self.final_softcap = cfg.get("embed_scale"), cfg.get("final_softcap")
        self.rope_scale = rope_attention_factor(cfg.get("rope_scaling"))
        self.packed_head = None   # set by pack when the head is tied to the embedding

    @property
    def has_experts(self) -> bool:
        """Whether any layer is a mixture of experts (its load: ``hpcllm.model.moe.rank_load``)."""
        return any(isinstance(layer.mlp, MoE) for layer in self.layers)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.cfg.get("tie_embeddings", False) else self.lm_head.weight

    @property
    def head(self) -> torch.Tensor:
        """The LM head as ``hpcllm.model.layers.linear`` takes it: after ``pack``, a packed copy (the
        embedding itself stays dense for its lookups), else ``head_weight``."""
        return self.head_weight if self.packed_head is None else self.packed_head

    def soften(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits as the model gives them: soft-capped (``final_softcap``: Gemma 2) or unchanged."""
        if self.final_softcap is None:
            return logits
        return torch.tanh(logits / self.final_softcap) * self.final_softcap

    @property
    def vocab_start(self) -> int:
        """First vocabulary id of this rank's embedding and LM-head rows (both split alike)."""
        return getattr(self.embed, "start", 0)

    @property
    def dtype(self):
        """The compute dtype (the final norm's: the embedding may hold int8 codes)."""
        return self.norm.weight.dtype

    def fuse(self):
        for layer in self.layers:
            layer.attn.fuse()
            layer.mlp.fuse()

    def pack(self):
        """On its device: the fused linears' weights packed for oneDNN where that runs (fp32 on the CPU,
        bf16 where it has native bf16; ``hpcllm.model.layers.pack``), a no-op elsewhere."""
        for layer in self.layers:
            pack(layer.attn.qkv, layer.attn.o)
            layer.mlp.pack()
        if self.cfg.get("tie_embeddings", False):
            self.packed_head = pack_weight(self.embed.weight)   # a plain tensor attribute: not in the state
        else:
            pack(self.lm_head)

    @torch.inference_mode()
    def forward(self, ids, positions=None, cache=None):
        """``cache``: a KV cache step (``hpcllm.generate.kv_cache.Step``) for generation; ids [1, T]
        are then the step's tokens of all its sequences packed, ``positions`` [1, T] theirs."""
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
        x = self.embed(ids)
        if self.embed_scale is not None:   # Gemma: the scale rounded to the activation dtype, as HF does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        rope = rope_tables(self.inv_freq.to(ids.device), positions, x.dtype, self.rope_scale)
        rope = (rope, rope if self.inv_freq_local is None else
                rope_tables(self.inv_freq_local.to(ids.device), positions, x.dtype))
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if cache is None else cache.layer(i))
        return self.norm(x)
