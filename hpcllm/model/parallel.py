"""Tensor parallelism: how each weight is split, and the layers that use the splits.

A *plan* (one per architecture, in the model file) maps a weight name to a
split kind. The same plan drives the loader (which hyperslab of the full
tensor a rank reads, ``Partition.slice``) and the layers (how many local
heads, where the all-reduce goes). Split kinds:

    "replicate"        whole tensor on every rank (norms, position embeddings)
    ("col", unit)      output features split: rows of a [out, in] weight, and its bias
    ("row", unit)      input features split: columns of a [out, in] weight; the bias
                       is added once, after the all-reduce
    ("vocab", "vocab") rows of an embedding / LM head, split evenly

Units say what is split: "q" (query heads), "kv" (key/value heads), "ffn"
(MLP intermediate columns), "vocab". Heads are split on GQA group
boundaries, unevenly when tp does not divide the group count (9 heads / 3 KV
heads at tp=2 gives 6 + 3 query heads). When tp exceeds the KV head count the
KV heads are replicated: each rank keeps the one KV head its query heads use.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcllm.world.comm import Comm, LocalComm
from hpcllm.errors import HpcllmError
from hpcllm.model.partition import Partition, lookup_split


class ColumnParallelLinear(nn.Linear):
    """Output features split across the tp group; no communication."""


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear_gelu(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``gelu(layer(x))`` (exact, erf form); on CPU one oneDNN call with the GELU fused into the matmul's
    epilogue (measured 24% faster than linear then gelu at [16384, 384] x [384, 1536]), elsewhere two ops."""
    if _ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], "none")
    return F.gelu(F.linear(x, layer.weight, layer.bias))


def fuse_linears(*layers: nn.Linear) -> nn.Linear:
    """One linear whose output is the concatenation of ``layers``' outputs (same input), e.g. Q|K|V."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


class RowParallelLinear(nn.Module):
    """Input features split; partial products summed by one all-reduce, then the bias."""

    def __init__(self, in_local: int, out_features: int, bias: bool, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_local), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.comm = comm

    def forward(self, x):
        y = F.linear(x, self.weight)
        self.comm.all_reduce(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range: mask, look up, all-reduce."""

    def __init__(self, vocab_range: tuple[int, int], dim: int, comm: Comm):
        super().__init__()
        self.start, self.stop = vocab_range
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, dim), requires_grad=False)
        self.comm = comm

    def forward(self, ids):
        if isinstance(self.comm, LocalComm) or self.comm.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.comm.all_reduce(out)


def load_state(module: nn.Module, read, plan: dict, part: Partition, dtype: torch.dtype):
    """Fill every parameter of ``module`` from ``read(name, hyperslab) -> np.ndarray``.

    ``read`` loads only the rank's part of the full tensor (h5py hyperslab).
    """
    for name, param in list(module.named_parameters()):
        split = lookup_split(plan, name)
        data = read(name, lambda shape, s=split: part.slice(s, shape))
        if tuple(data.shape) != tuple(param.shape):
            raise HpcllmError(f"checkpoint tensor {name}: shape {tuple(data.shape)} does not fit the model's "
                              f"{tuple(param.shape)} at tp rank {part.rank}/{part.size}")
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        tensor = torch.from_numpy(np.ascontiguousarray(data)).to(dtype)
        setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
