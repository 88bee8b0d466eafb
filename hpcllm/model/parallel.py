"""Tensor parallelism: the layers a split plan turns plain modules into, and the loader.

A *plan* (one per architecture, ``architectures.py``) maps module names to a
``Split``. ``parallelize`` applies it to a plain model (built by encoder.py /
decoder.py, which know nothing about ranks) and ``load_state`` reads, for each
parameter, the hyperslab the same plan gives this rank (``Partition.slice``).
Split kinds:

    ("col", unit)      output features split: rows of a [out, in] weight, and its bias
    ("row", unit)      input features split: columns of a [out, in] weight; the partial
                       products are summed by one all-reduce, then the bias is added once
    ("vocab", "vocab") rows of an embedding (mask, look up, all-reduce) or LM head, split evenly
    ("heads", "")      the module's ``n_heads`` / ``n_kv_heads`` become this rank's local counts
    ("reduce", "")     the module sums partial outputs itself: its ``comm`` becomes the group's
                       (a mixture-of-experts block, ``moe.py``)
    not in the plan    replicated (norms, position embeddings)

A module that is neither a linear nor an embedding but has a ``cut(axis, start, stop)`` method
(stacked expert weights, a norm over a whole split projection) keeps its class and cuts its own
weights along the split's axis; whoever owns it sums the partial products (no all-reduce here).

Units say what is split: "q" (query heads), "kv" (key/value heads), "ffn"
(MLP intermediate columns), "vocab". Heads are split on GQA group
boundaries, unevenly when tp does not divide the group count (9 heads / 3 KV
heads at tp=2 gives 6 + 3 query heads). When tp exceeds the KV head count the
KV heads are replicated: each rank keeps the one KV head its query heads use.
The plan is applied at tp = 1 too, where every collective is a no-op.
"""

import numpy as np
import torch
from torch import nn

from hpcllm.model.quant import SCALE
from hpcllm.errors import HpcllmError
from hpcllm.model.layers import Linear, embedding, linear, with_scale
from hpcllm.model.partition import Partition, Split, module_split, split_attrs, split_axis, tensor_split
from hpcllm.world.comm import Comm, LocalComm


class ColumnParallelLinear(Linear):
    """Output features split across the tp group; no communication."""


class RowParallelLinear(nn.Module):
    """Input features split; partial products summed by one all-reduce, then the bias."""

    def __init__(self, in_local: int, out_features: int, bias: bool, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_local), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.comm = comm

    def forward(self, x):
        y = linear(x, self.weight)   # the weight may be packed (hpcllm.model.layers.pack)
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
            return embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.comm.all_reduce(out)


def parallelize(model: nn.Module, plan: dict, partition: Partition, comm: Comm) -> nn.Module:
    """Apply ``plan`` to the plain ``model`` for tp rank ``partition.rank``: linears and embeddings become
    their parallel layers (sized for this rank's slice), head counts become local, and the root
    keeps ``comm`` (``model.comm``) for the collectives outside the layers (scoring)."""
    for name, module in list(model.named_modules()):
        split = module_split(plan, name)
        if split is None:
            continue
        if split.kind == "heads":
            q0, q1 = partition.q_heads
            k0, k1 = partition.kv_heads
            module.n_heads, module.n_kv_heads = q1 - q0, k1 - k0
            if hasattr(module, "comm"):     # a collective of its own (OLMoE's q/k norms over all heads)
                module.comm, module.kv_copies = comm, partition.kv_copies
        elif split.kind == "reduce":
            module.comm = comm
        else:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, _parallel_layer(name, module, split, partition, comm))
    model.comm = comm
    return model


def _parallel_layer(name: str, module: nn.Module, split: Split, partition: Partition, comm: Comm) -> nn.Module:
    start, stop = partition.range(split.unit)
    if hasattr(module, "cut") and not isinstance(module, (nn.Linear, nn.Embedding)):
        module.cut(split_axis((split.kind, split.unit), module.weight.ndim), start, stop)
        return module
    with torch.device(module.weight.device):
        if split.kind == "vocab" and isinstance(module, nn.Embedding):
            return VocabParallelEmbedding((start, stop), module.embedding_dim, comm)
        if split.kind in ("col", "vocab") and isinstance(module, nn.Linear):
            return ColumnParallelLinear(module.in_features, stop - start, bias=module.bias is not None)
        if split.kind == "row" and isinstance(module, nn.Linear):
            return RowParallelLinear(stop - start, module.out_features, module.bias is not None, comm)
    raise TypeError(f"split plan: {name} is a {type(module).__name__}; a {split.kind!r} split needs a "
                    f"{'Linear or Embedding' if split.kind == 'vocab' else 'Linear'}")


def load_state(module: nn.Module, ckpt, plan: dict, partition: Partition, dtype: torch.dtype):
    """Fill every parameter of ``module`` from the checkpoint, this rank's hyperslab only.

    ``ckpt.read(name, slicer) -> np.ndarray`` loads the hyperslab ``slicer(full_shape)`` (h5py);
    ``ckpt.split_attrs(name)`` are the split attributes stored with the tensor, which must be
    the plan's: a checkpoint split another way would load the wrong rows silently.
    int8 codes (``hpcllm.model.quant``) stay int8, their scales (split as the weight's rows
    are) in ``dtype`` beside them (``hpcllm.model.layers.with_scale``).
    """
    for name, param in list(module.named_parameters()):
        split = tensor_split(plan, name)
        stored, expected = ckpt.split_attrs(name), split_attrs(split, param.ndim)
        if stored != expected:
            raise HpcllmError(f"{ckpt.path}: tensor {name} is stored with split {_show(stored)} but the "
                              f"{ckpt.architecture} plan splits it {_show(expected)}; convert the model again")
        data = ckpt.read(name, lambda shape, s=split: partition.slice(s, shape))
        if tuple(data.shape) != tuple(param.shape):
            raise HpcllmError(f"{ckpt.path}: tensor {name}: shape {tuple(data.shape)} does not fit the model's "
                              f"{tuple(param.shape)} at tp rank {partition.rank}/{partition.size}")
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        scale = None
        if data.dtype == np.int8:
            scale = _tensor(ckpt.read(name + SCALE, lambda shape, s=split: partition.slice(s, shape)), dtype)
        setattr(owner, attr, with_scale(_tensor(data, dtype), scale))


def _tensor(data: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A loaded slab as a tensor: float in ``dtype``, int8 codes as they are."""
    tensor = torch.from_numpy(np.ascontiguousarray(data))
    return tensor if tensor.dtype == torch.int8 else tensor.to(dtype)


def _show(attrs: dict) -> str:
    return "/".join(str(attrs[k]) for k in ("split", "unit", "axis") if attrs.get(k) not in ("", None))
