"""Llama-family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2, Qwen3): RoPE, RMSNorm,
SwiGLU, grouped-query causal attention, tied or untied LM head. Per-family
features are config fields (``hpcllm.checkpoint.sources.decoder_config``):
q/k/v and o biases, and ``qk_norm`` (Qwen3: an RMSNorm over each query and
key head, weights of size D shared by all heads, before RoPE; replicated on
every tp rank, which applies them to its own heads).

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
``hpcllm.scoring``, which reads ``head``, ``vocab_start`` and ``comm``.
Weights use HF's q/k row order (rotate-half RoPE); the GGUF importer undoes
llama.cpp's interleaving permutation.
Shapes: B batch, L tokens, Hq / Hkv local query / KV heads, D head dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpcllm.model.layers import frozen_embedding, fuse_linears, pack, pack_weight
from hpcllm.world.comm import LocalComm


class RMSNorm(nn.Module):
    """Normalised in float32, scaled in the input dtype (as HF Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(cfg: dict) -> torch.Tensor:
    """Inverse frequencies [D/2] from rope_theta, with Llama-3 scaling when configured."""
    d = cfg["head_dim"]
    # explicit device: models are built under torch.device("meta") and this buffer is not loaded
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        inv = _llama3_scaling(inv, scaling)
    elif kind == "linear":
        inv = inv / scaling["factor"]
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return inv


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


def rope_tables(inv_freq, positions, dtype):
    """cos, sin [B or 1, 1, L, D] for integer positions [B or 1, L] (computed in float32)."""
    angles = positions[..., None].float() * inv_freq  # [B, L, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: dict):
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
            self.q_norm = RMSNorm(d, cfg["rms_eps"])
            self.k_norm = RMSNorm(d, cfg["rms_eps"])

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
        q, k, v = q.view(B, L, Hq, D), k.view(B, L, Hkv, D), v.view(B, L, Hkv, D)
        if self.qk_norm:   # over D, the last axis: each head on its own
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, kv=None):
        B, L, _ = x.shape
        q, k, v = self.heads(x, cos, sin)
        if kv is not None:   # generation: k, v go into the cache, attention reads it (hpcllm.generate.kv_cache)
            a = kv.attend(q, k, v)
        else:   # right padding only: with a causal mask no real token ever sees a pad
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o(a.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))  # all-reduce 1 (row-parallel o)


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.gate = nn.Linear(cfg["hidden"], cfg["ffn"], bias=False)
        self.up = nn.Linear(cfg["hidden"], cfg["ffn"], bias=False)
        self.down = nn.Linear(cfg["ffn"], cfg["hidden"], bias=False)

    def fuse(self):
        """After loading: gate and up become one matmul."""
        self.gate_up = fuse_linears(self.gate, self.up)
        del self.gate, self.up

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)  # all-reduce 2 (row-parallel down)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attn_norm = RMSNorm(cfg["hidden"], cfg["rms_eps"])
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg["hidden"], cfg["rms_eps"])
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv)
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
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["n_layers"]))
        self.norm = RMSNorm(cfg["hidden"], cfg["rms_eps"])
        if not cfg.get("tie_embeddings", False):
            self.lm_head = nn.Linear(cfg["hidden"], cfg["vocab"], bias=False)
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.packed_head = None   # set by pack when the head is tied to the embedding

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.cfg.get("tie_embeddings", False) else self.lm_head.weight

    @property
    def head(self) -> torch.Tensor:
        """The LM head as ``hpcllm.model.layers.linear`` takes it: after ``pack``, a packed copy (the
        embedding itself stays dense for its lookups), else ``head_weight``."""
        return self.head_weight if self.packed_head is None else self.packed_head

    @property
    def vocab_start(self) -> int:
        """First vocabulary id of this rank's embedding and LM-head rows (both split alike)."""
        return getattr(self.embed, "start", 0)

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def fuse(self):
        for layer in self.layers:
            layer.attn.fuse()
            layer.mlp.fuse()

    def pack(self):
        """On its device: the fused linears' weights packed for oneDNN where that runs (fp32 on the CPU,
        bf16 where it has native bf16; ``hpcllm.model.layers.pack``), a no-op elsewhere."""
        for layer in self.layers:
            pack(layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)
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
        cos, sin = rope_tables(self.inv_freq.to(ids.device), positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layer(i))
        return self.norm(x)
