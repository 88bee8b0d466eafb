"""BERT-family encoder (MiniLM, BGE, E5, XLM-R, ...): absolute positions, post-LN, GELU,
bidirectional attention, then pooling (mean / CLS) and optional L2 normalisation.
(XLM-)RoBERTa's positions start after its pad index (``position_offset``,
hpcllm.checkpoint.hf_bert); a cross-encoder passes token types.

Plain PyTorch at full size: the model knows nothing about ranks.
``parallel.parallelize`` cuts it for a tp rank with the plan in
``architectures.py`` (q/k/v/up column-parallel, o/down row-parallel, token
embedding vocab-parallel, local ``n_heads`` per layer). After loading, ``fuse``
turns Q, K, V into one matmul, and on the model's device ``pack`` holds the
linears' weights as oneDNN tensors where that runs (fp32 on the CPU; bf16
where the CPU has native bf16).
Shapes: T tokens of the batch packed, B documents, L the longest, H local heads,
D head dim.
"""

import torch
import torch.nn.functional as F
from torch import nn

from hpcllm.model.layers import frozen_embedding, fuse_linears, linear_gelu, pack


class EncoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, d = cfg["hidden"], cfg["head_dim"]
        self.n_heads = self.n_kv_heads = cfg["n_heads"]  # BERT: one K/V head per query head
        self.head_dim = d
        self.q = nn.Linear(hidden, self.n_heads * d)
        self.k = nn.Linear(hidden, self.n_kv_heads * d)
        self.v = nn.Linear(hidden, self.n_kv_heads * d)
        self.o = nn.Linear(self.n_heads * d, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=cfg["norm_eps"])
        self.up = nn.Linear(hidden, cfg["ffn"])
        self.down = nn.Linear(cfg["ffn"], hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=cfg["norm_eps"])

    def fuse(self):
        """After loading: Q, K and V become one matmul."""
        self.qkv = fuse_linears(self.q, self.k, self.v)
        del self.q, self.k, self.v

    def forward(self, x, seqs: "Packed"):
        """x: [T, hidden], the batch's tokens packed without padding."""
        H, D = self.n_heads, self.head_dim
        qkv = self.qkv(x)
        a = qkv.new_empty(x.shape[0], H * D)
        for c in seqs.chunks:
            t = c.pad(qkv[c.t0:c.t1]).view(c.n, c.width, 3, H, D)
            q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))  # [n, H, width, D] views
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=c.mask)
            a[c.t0:c.t1] = c.unpad(o.transpose(1, 2).reshape(c.n * c.width, H * D))
        x = self.attn_norm(x + self.o(a))                       # all-reduce 1 (row-parallel o)
        h = self.down(linear_gelu(x, self.up))                  # all-reduce 2 (row-parallel down)
        return self.mlp_norm(x + h)


class Packed:
    """A batch of variable-length documents as one [T] token run (no padding).

    The linear layers, norms and activations work on all T tokens at once;
    only attention needs the documents apart. The documents come longest
    first, so the batch is cut into *chunks* of consecutive documents of
    similar length (each at least ``ratio`` times its chunk's longest), and a
    chunk is one contiguous token range. Attention runs per chunk on a padded
    [n, width] view: padding costs only there, and little.
    """

    def __init__(self, lengths: torch.Tensor, ratio: float = 0.9):
        lengths = lengths.to(torch.int64).cpu()
        self.lengths = lengths
        self.n = len(lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        self.starts = starts                                                 # first token of each document
        self.doc = torch.repeat_interleave(torch.arange(self.n), lengths)   # document of each token
        self.position = torch.arange(int(lengths.sum())) - starts[self.doc]  # position in its document
        self.chunks = []
        lens, a = lengths.tolist(), 0
        while a < self.n:
            b = a + 1
            while b < self.n and lens[b] >= ratio * lens[a] and lens[b] <= lens[a]:
                b += 1
            self.chunks.append(_Chunk(lengths[a:b], int(starts[a]), int(starts[b - 1]) + lens[b - 1]))
            a = b

    def to(self, device):
        self.lengths, self.starts, self.doc, self.position = (
            t.to(device) for t in (self.lengths, self.starts, self.doc, self.position))
        for c in self.chunks:
            c.to(device)
        return self


class _Chunk:
    """Documents a..b of a Packed batch: tokens [t0, t1), padded to the longest for attention."""

    def __init__(self, lengths, t0, t1):
        self.t0, self.t1, self.n = t0, t1, len(lengths)
        self.width = max(1, int(lengths.max()))
        self.uniform = bool((lengths == self.width).all())
        keep = torch.arange(self.width)[None, :] < lengths[:, None]
        self.mask = None if self.uniform else keep[:, None, None, :]  # keys that may be attended to
        self.index = None if self.uniform else keep.flatten().nonzero().squeeze(1)  # token -> slot in [n * width]

    def to(self, device):
        if not self.uniform:
            self.mask, self.index = self.mask.to(device), self.index.to(device)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[t1 - t0, C] -> [n * width, C]."""
        if self.uniform:
            return t
        return t.new_zeros(self.n * self.width, t.shape[-1]).index_copy_(0, self.index, t)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.uniform else t.index_select(0, self.index)


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tokens = frozen_embedding(cfg["vocab"], cfg["hidden"])
        self.positions = frozen_embedding(cfg["max_positions"] + cfg.get("position_offset", 0), cfg["hidden"])
        self.types = frozen_embedding(cfg["type_vocab"], cfg["hidden"])
        self.norm = nn.LayerNorm(cfg["hidden"], eps=cfg["norm_eps"])

    def forward(self, ids, position, types=None):
        """types: [T] token type ids, or None for type 0 everywhere."""
        x = self.tokens(ids) + self.positions(position) + (self.types.weight[0] if types is None else self.types(types))
        return self.norm(x)


class Encoder(nn.Module):
    """Packed token ids [T] + document lengths [B] -> pooled embeddings [B, hidden] (float32)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg["n_layers"]))

    def fuse(self):
        for layer in self.layers:
            layer.fuse()

    def pack(self):
        """On its device: the linears' weights packed for oneDNN where that runs (fp32 on the CPU, bf16
        where it has native bf16; ``hpcllm.model.layers.pack``), a no-op elsewhere."""
        for layer in self.layers:
            pack(layer.qkv, layer.o, layer.up, layer.down)

    @torch.inference_mode()
    def forward(self, ids, lengths, types=None):
        return self.encode(ids, lengths, types)

    def encode(self, ids, lengths, types=None):
        """``forward`` outside inference mode: what fine-tuning differentiates (hpcllm.train.finetune)."""
        seqs = Packed(lengths).to(ids.device)
        x = self.embed(ids, self.positions(ids, seqs), types)
        for layer in self.layers:
            x = layer(x, seqs)
        return pool(x.float(), seqs, self.cfg["pooling"], self.cfg["normalize"])

    def positions(self, ids, seqs: Packed):
        """Each token's position id: its place in its document, or for (XLM-)RoBERTa (``position_offset``
        = pad + 1) pad + its count of non-pad tokens so far, and pad itself on a pad token (as HF)."""
        offset = self.cfg.get("position_offset", 0)
        if not offset:
            return seqs.position
        real = (ids != self.cfg["pad_id"]).to(torch.int64)
        count = real.cumsum(0)
        count = count - (count[seqs.starts] - real[seqs.starts])[seqs.doc]   # restart at each document
        return count * real + (offset - 1)


def pool(x, seqs: Packed, mode: str, normalize: bool):
    """x: [T, hidden] packed tokens -> [B, hidden]."""
    if mode == "cls":
        out = x[seqs.starts]
    elif mode == "mean":
        out = x.new_zeros(seqs.n, x.shape[-1]).index_add_(0, seqs.doc, x)
        out = out / seqs.lengths.clamp(min=1).unsqueeze(-1).to(x.dtype)
    else:
        raise ValueError(f"unknown pooling {mode!r}")
    return F.normalize(out, p=2, dim=-1) if normalize else out
