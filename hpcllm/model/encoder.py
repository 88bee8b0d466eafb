"""BERT-family encoder (MiniLM, BGE, E5, ...): absolute positions, post-LN, GELU,
bidirectional attention, then pooling (mean / CLS) and optional L2 normalisation.

Plain PyTorch. Tensor parallelism enters only through the layer classes from
``parallel.py`` and the ``PLAN`` table below; at tp = 1 the comm is a no-op.
Shapes: B batch, L tokens, H local heads, D head dim.
"""

import torch
import torch.nn.functional as F
from torch import nn

from hpcllm.dist.comm import Comm
from hpcllm.model.parallel import ColumnParallelLinear, Partition, RowParallelLinear, VocabParallelEmbedding

# weight-name suffix -> split (see parallel.py). Everything else is replicated.
PLAN = {
    "embed.tokens.weight": ("vocab", "vocab"),
    "q.weight": ("col", "q"), "q.bias": ("col", "q"),
    "k.weight": ("col", "kv"), "k.bias": ("col", "kv"),
    "v.weight": ("col", "kv"), "v.bias": ("col", "kv"),
    "o.weight": ("row", "q"), "o.bias": ("row", "q"),
    "up.weight": ("col", "ffn"), "up.bias": ("col", "ffn"),
    "down.weight": ("row", "ffn"), "down.bias": ("row", "ffn"),
}


class EncoderLayer(nn.Module):
    def __init__(self, cfg: dict, part: Partition, comm: Comm):
        super().__init__()
        hidden, d = cfg["hidden"], cfg["head_dim"]
        q0, q1 = part.range("q")
        kv0, kv1 = part.range("kv")
        ffn0, ffn1 = part.range("ffn")
        self.n_heads = (q1 - q0) // d
        self.head_dim = d
        self.q = ColumnParallelLinear(hidden, q1 - q0)
        self.k = ColumnParallelLinear(hidden, kv1 - kv0)
        self.v = ColumnParallelLinear(hidden, kv1 - kv0)
        self.o = RowParallelLinear(q1 - q0, hidden, True, comm)
        self.attn_norm = nn.LayerNorm(hidden, eps=cfg["norm_eps"])
        self.up = ColumnParallelLinear(hidden, ffn1 - ffn0)
        self.down = RowParallelLinear(ffn1 - ffn0, hidden, True, comm)
        self.mlp_norm = nn.LayerNorm(hidden, eps=cfg["norm_eps"])

    def forward(self, x, mask):
        B, L, _ = x.shape
        heads = lambda t: t.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
        x = self.attn_norm(x + self.o(a))        # all-reduce 1
        h = self.down(F.gelu(self.up(x)))         # all-reduce 2
        return self.mlp_norm(x + h)


class Embeddings(nn.Module):
    def __init__(self, cfg, part: Partition, comm: Comm):
        super().__init__()
        self.tokens = VocabParallelEmbedding(part.range("vocab"), cfg["hidden"], comm)
        self.positions = nn.Embedding(cfg["max_positions"], cfg["hidden"])
        self.types = nn.Embedding(cfg["type_vocab"], cfg["hidden"])
        self.norm = nn.LayerNorm(cfg["hidden"], eps=cfg["norm_eps"])

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(pos)[None] + self.types.weight[0]
        return self.norm(x)


class Encoder(nn.Module):
    """ids [B, L] + attention mask [B, L] -> pooled embeddings [B, hidden] (float32)."""

    def __init__(self, cfg: dict, part: Partition, comm: Comm):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg, part, comm)
        self.layers = nn.ModuleList(EncoderLayer(cfg, part, comm) for _ in range(cfg["n_layers"]))

    @torch.inference_mode()
    def forward(self, ids, attention_mask):
        keep = attention_mask.bool()
        mask = keep[:, None, None, :]  # keys that may be attended to
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, mask)
        return pool(x.float(), keep, self.cfg["pooling"], self.cfg["normalize"])


def pool(x, keep, mode: str, normalize: bool):
    if mode == "cls":
        out = x[:, 0]
    elif mode == "mean":
        w = keep.unsqueeze(-1).to(x.dtype)
        out = (x * w).sum(1) / w.sum(1).clamp(min=1e-9)
    else:
        raise ValueError(f"unknown pooling {mode!r}")
    return F.normalize(out, p=2, dim=-1) if normalize else out
