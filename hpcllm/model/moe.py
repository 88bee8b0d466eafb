"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): a replicated router picks
``top_k`` of ``n_experts`` gated MLPs per token; their outputs, weighted, are summed, plus an
optional shared expert every token goes through (Qwen2-MoE: scaled by a sigmoid gate).

Routing (``route``), from the config's ``moe`` entry (``hpcllm.checkpoint.sources.moe_config``):
"softmax_topk" takes the softmax over all experts, then the k largest (Mixtral, Qwen-MoE, OLMoE;
``norm_topk`` renormalises them to sum 1), "topk_softmax" the softmax over the k largest logits.
Both in float32, as transformers routes.

Weights: the experts stacked, gate and up [E, ffn, hidden], down [E, hidden, ffn] (``Weights``);
the shared expert as [ffn, hidden] / [hidden, ffn]. Under tensor parallelism (the plan in
``architectures.py``, ``MOE_UNIT``) a rank holds 1/tp of every expert's columns, or whole experts
(``first``: the global index of its first one); either way its output is a partial sum that
the block's one all-reduce completes (``comm``, the layer's only one for the MLP, as the dense
MLP's row-parallel down projection has). The shared expert's partial product joins the same sum
(its sigmoid gate is a per-token scalar: it commutes with the sum).

Tokens are grouped per expert (one sort), so each expert is one matmul over its tokens and the
Python loop runs over experts, never tokens. ``load`` counts, per expert, the tokens routed to
it (padding included) since the model was built: ``expert_load`` gathers them per layer.
Shapes: T tokens, H hidden, E experts (local: E_l), F expert ffn (local: F_l), k top_k.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcllm.model.layers import linear, pack_weight
from hpcllm.world.comm import LocalComm


class Weights(nn.Module):
    """One weight tensor of any rank ([E, out, in] stacked experts, or [out, in]) that cuts itself
    for a tp rank (``cut``, called by ``parallel.parallelize``)."""

    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.first = 0      # global index of the first expert held (whole experts per rank)

    def cut(self, axis: int, start: int, stop: int):
        shape = list(self.weight.shape)
        shape[axis] = stop - start
        self.weight = nn.Parameter(torch.empty(shape, device=self.weight.device), requires_grad=False)
        if axis == 0 and self.weight.ndim == 3:
            self.first = start


class ProjectionNorm(nn.Module):
    """OLMoE's q / k norm: an RMSNorm over a whole projection (all heads) of ``dim`` features, of
    which this rank holds a slice (its heads' weights). The mean square is taken over all ``dim``:
    the attention adds up the ranks' sums of squares (``sum_squares``) with one all-reduce."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.dim, self.eps = dim, eps

    def cut(self, axis: int, start: int, stop: int):
        self.weight = nn.Parameter(torch.empty(stop - start, device=self.weight.device), requires_grad=False)

    @staticmethod
    def sum_squares(x):
        return x.float().pow(2).sum(-1, keepdim=True)

    def forward(self, x, total_squares):
        h = x.float() * torch.rsqrt(total_squares / self.dim + self.eps)
        return self.weight * h.to(x.dtype)


def projection_norms(attn, q, k):
    """q, k [B, L, local features] normalised by ``attn.q_proj_norm`` / ``k_proj_norm`` over the whole
    projections: one all-reduce of the two sums of squares [B, L, 2] across the tp group (a KV head
    held by several ranks counts once: each copy adds 1 / ``kv_copies`` of its sum)."""
    sq = torch.cat([ProjectionNorm.sum_squares(q), ProjectionNorm.sum_squares(k) / attn.kv_copies], dim=-1)
    attn.comm.all_reduce(sq)
    return attn.q_proj_norm(q, sq[..., :1]), attn.k_proj_norm(k, sq[..., 1:])


def route(logits, top_k: int, router: str, norm_topk: bool):
    """(weights [T, k] float32, experts [T, k] int64) from router logits [T, E]."""
    if router == "topk_softmax":
        top, experts = torch.topk(logits.float(), top_k, dim=-1)
        return torch.softmax(top, dim=-1), experts
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def is_moe_layer(cfg: dict, index: int) -> bool:
    moe = cfg.get("moe")
    return bool(moe) and index not in moe["dense_layers"]


class MoE(nn.Module):
    def __init__(self, cfg: dict, act):
        super().__init__()
        m, hidden = cfg["moe"], cfg["hidden"]
        self.act, self.top_k, self.router_kind, self.norm_topk = act, m["top_k"], m["router"], m["norm_topk"]
        self.n_experts = m["n_experts"]
        self.router = nn.Linear(hidden, self.n_experts, bias=False)
        self.gate_exps = Weights(self.n_experts, m["expert_ffn"], hidden)
        self.up_exps = Weights(self.n_experts, m["expert_ffn"], hidden)
        self.down_exps = Weights(self.n_experts, hidden, m["expert_ffn"])
        self.shared = bool(m["shared_ffn"])
        if self.shared:
            self.shared_gate = Weights(m["shared_ffn"], hidden)
            self.shared_up = Weights(m["shared_ffn"], hidden)
            self.shared_down = Weights(hidden, m["shared_ffn"])
            if m["shared_gate"]:
                self.shared_router = nn.Linear(hidden, 1, bias=False)
        self.comm = LocalComm()     # the tp group's (parallelize): the block's one all-reduce
        self.register_buffer("load", torch.zeros(self.n_experts, dtype=torch.int64), persistent=False)

    def fuse(self):
        """After loading: each expert's gate and up rows become one matmul ([E_l, 2 F_l, H]), as the
        shared expert's do ([2 F_shared_l, H])."""
        gate_up = torch.cat([self.gate_exps.weight, self.up_exps.weight], dim=1)
        self.first = self.gate_exps.first
        # plain attributes (moved by _apply): (gate|up [2 F_l, H], down [H, F_l]) per local expert
        self.experts = list(zip(gate_up.unbind(), self.down_exps.weight.unbind()))
        del self.gate_exps, self.up_exps, self.down_exps
        if self.shared:
            self.shared_mlp = (torch.cat([self.shared_gate.weight, self.shared_up.weight]), self.shared_down.weight)
            del self.shared_gate, self.shared_up, self.shared_down
        self.load = torch.zeros(self.n_experts, dtype=torch.int64, device=gate_up.device)

    def _apply(self, fn, *args, **kwargs):
        """``.to(device)`` / ``.to(dtype)`` move the fused weights (plain attributes) too."""
        super()._apply(fn, *args, **kwargs)
        if hasattr(self, "experts"):
            self.experts = [(fn(gu), fn(d)) for gu, d in self.experts]
            self.shared_mlp = tuple(fn(w) for w in self.shared_mlp) if self.shared else None
        return self

    def pack(self):
        """Each expert's (and the shared expert's) weights packed for oneDNN where that runs
        (``layers.pack_weight``: a token group per expert is small, where MKL repacks its weight on
        every call)."""
        self.experts = [(pack_weight(gu.contiguous()), pack_weight(d.contiguous())) for gu, d in self.experts]
        if self.shared:
            self.shared_mlp = tuple(pack_weight(w) for w in self.shared_mlp)

    def _mlp(self, x, gate_up, down):
        gate, up = linear(x, gate_up).chunk(2, dim=-1)
        return linear(self.act(gate) * up, down)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = route(F.linear(x, self.router.weight), self.top_k, self.router_kind, self.norm_topk)
        flat = experts.reshape(-1)
        counts = torch.bincount(flat, minlength=self.n_experts)
        self.load += counts
        order = torch.argsort(flat, stable=True)            # assignments grouped by expert
        tokens, w = order // self.top_k, weights.reshape(-1)[order].to(x.dtype)
        ends = torch.cumsum(counts, 0).tolist()
        y = torch.zeros_like(x)
        for j, (gate_up, down) in enumerate(self.experts):   # this rank's experts
            e = self.first + j
            start, stop = (ends[e - 1] if e else 0), ends[e]
            if start == stop:
                continue
            idx = tokens[start:stop]
            y.index_add_(0, idx, self._mlp(x[idx], gate_up, down) * w[start:stop, None])
        if self.shared:
            s = self._mlp(x, *self.shared_mlp)
            if hasattr(self, "shared_router"):
                s = s * torch.sigmoid(F.linear(x, self.shared_router.weight))
            y = y + s
        self.comm.all_reduce(y)     # the layer's one all-reduce for its MLP
        return y.reshape(shape)


def expert_load(model) -> np.ndarray:
    """[MoE layers, E] tokens routed to each expert since the model was built (this rank's count;
    every tp rank of a group routes the same tokens)."""
    loads = [layer.mlp.load.cpu().numpy() for layer in model.layers if isinstance(layer.mlp, MoE)]
    return np.stack(loads) if loads else np.zeros((0, 0), np.int64)


def rank_load(model) -> int:
    """Token-expert assignments this tp rank computed (the experts it holds; all of them when each
    rank holds 1/tp of every expert)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            m = layer.mlp
            total += int(m.load[m.first:m.first + len(m.experts)].sum())
    return total


def group_loads(model, tp_size: int) -> list[int]:
    """Token-expert assignments each rank of a tp group of ``tp_size`` computes (whole experts: the
    counts of its experts, from any rank's counters, every rank routing the same tokens), e.g. for a
    job summary's "expert load per tp rank"."""
    from hpcllm.model.partition import even_split

    load = expert_load(model).sum(axis=0)
    return [int(load[slice(*even_split(len(load), tp_size, r))].sum()) for r in range(tp_size)]


def expert_bytes(model) -> int:
    """Bytes of expert weights (routed and shared) resident on this rank."""
    total = 0
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            m = layer.mlp
            ws = [w for pair in m.experts for w in pair] + (list(m.shared_mlp) if m.shared else [])
            total += sum(w.numel() * w.element_size() for w in ws)
    return total
