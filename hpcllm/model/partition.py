"""How each weight is split across a tensor-parallel group (no torch: the
checkpoint writer and the tokenize job use it too).

``Partition``: what one tp rank owns (query / KV heads on GQA boundaries, MLP
columns, vocabulary rows) and the hyperslab it reads. ``Split`` and its
helpers: the rows of an architecture's plan (``architectures.py``) and the
per-tensor split they give the loader and the checkpoint's attributes. See
``parallel.py`` for the layers the split kinds become.
"""

from dataclasses import dataclass

from hpcllm.errors import HpcllmError


def even_split(n: int, runs: int, index: int) -> tuple[int, int]:
    """[start, stop) of run ``index`` when n items are cut into ``runs`` near-equal runs (larger first)."""
    base, extra = divmod(n, runs)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class Partition:
    """What tp rank ``rank`` of ``size`` owns, for a model with these shapes."""

    rank: int
    size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    n_experts: int = 0     # mixture of experts (hpcllm.model.moe): routed experts per MoE layer,
    expert_ffn: int = 0    # their intermediate size,
    shared_ffn: int = 0    # and the shared expert's (0: none)

    def __post_init__(self):
        if self.size > self.n_heads:
            raise HpcllmError(f"--tp {self.size} exceeds the model's {self.n_heads} attention heads; use tp <= {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise HpcllmError(f"model config: {self.n_heads} heads is not a multiple of {self.n_kv_heads} KV heads")

    @property
    def q_heads(self) -> tuple[int, int]:
        """[start, stop) of this rank's query heads."""
        group = self.n_heads // self.n_kv_heads  # query heads per KV head
        if self.size <= self.n_kv_heads:
            g0, g1 = even_split(self.n_kv_heads, self.size, self.rank)
            return g0 * group, g1 * group
        kv = self.kv_heads[0]
        first = self._first_rank_of_kv(kv)
        n_ranks = self._first_rank_of_kv(kv + 1) - first
        h0, h1 = even_split(group, n_ranks, self.rank - first)
        return kv * group + h0, kv * group + h1

    @property
    def kv_heads(self) -> tuple[int, int]:
        """[start, stop) of this rank's KV heads (one replicated head when tp > n_kv_heads)."""
        if self.size <= self.n_kv_heads:
            return even_split(self.n_kv_heads, self.size, self.rank)
        kv = next(k for k in range(self.n_kv_heads) if self._first_rank_of_kv(k + 1) > self.rank)
        return kv, kv + 1

    def _first_rank_of_kv(self, kv: int) -> int:
        # tp > n_kv: ranks are dealt to KV heads in near-equal consecutive runs
        return sum(even_split(self.size, self.n_kv_heads, k)[1] - even_split(self.size, self.n_kv_heads, k)[0]
                   for k in range(kv))

    def range(self, unit: str) -> tuple[int, int]:
        """[start, stop) along the split axis, in elements."""
        if unit == "q":
            h0, h1 = self.q_heads
            return h0 * self.head_dim, h1 * self.head_dim
        if unit == "kv":
            h0, h1 = self.kv_heads
            return h0 * self.head_dim, h1 * self.head_dim
        if unit == "ffn":
            return even_split(self.ffn, self.size, self.rank)
        if unit == "vocab":
            return even_split(self.vocab, self.size, self.rank)
        if unit == "experts":       # whole experts, near-equal (uneven) counts per rank
            return even_split(self.n_experts, self.size, self.rank)
        if unit == "expert_ffn":    # 1/tp of every expert's intermediate columns
            return even_split(self.expert_ffn, self.size, self.rank)
        if unit == "shared_ffn":
            return even_split(self.shared_ffn, self.size, self.rank)
        raise ValueError(f"unknown split unit {unit!r}")

    def slice(self, split, shape) -> tuple[slice, ...]:
        """The hyperslab of a full tensor of ``shape`` that this rank loads."""
        full = tuple(slice(None) for _ in shape)
        if split == "replicate" or self.size == 1:
            return full
        kind, unit = split
        start, stop = self.range(unit)
        if kind == "row" and len(shape) == 1:
            return full  # row-parallel bias: replicated, added after the all-reduce
        axis = split_axis(split, len(shape))
        return full[:axis] + (slice(start, stop),) + full[axis + 1:]

    @property
    def kv_copies(self) -> int:
        """How many ranks hold this rank's KV heads (1 unless tp > n_kv_heads replicates them)."""
        if self.size <= self.n_kv_heads:
            return 1
        kv = self.kv_heads[0]
        return self._first_rank_of_kv(kv + 1) - self._first_rank_of_kv(kv)


def partition_for(config, rank: int, size: int) -> Partition:
    moe = config.get("moe") or {}
    return Partition(rank, size, config["n_heads"], config["n_kv_heads"], config["head_dim"],
                     config["ffn"], config["vocab"], moe.get("n_experts", 0), moe.get("expert_ffn", 0),
                     moe.get("shared_ffn", 0))


def split_axis(split, ndim: int = 2) -> int:
    """The axis a (kind, unit) split cuts in a tensor of ``ndim`` axes: col / vocab axis 0 of an
    [out, in] weight or a bias, row axis 1; a stacked expert tensor [E, out, in] (``moe.py``) one
    axis further, except for whole experts (unit "experts"), cut on E."""
    kind, unit = split
    if unit == "experts":
        return 0
    return (1 if kind == "row" else 0) + max(ndim - 2, 0)


@dataclass(frozen=True)
class Split:
    """One row of a split plan: how a module is cut across the tp group.

    kind "col" / "row" / "vocab" (a linear or embedding, see ``parallel.py``), "heads" (a module
    whose ``n_heads`` / ``n_kv_heads`` become this rank's local counts) or "reduce" (a module that
    sums its partial outputs with one all-reduce of its own ``comm``: a mixture-of-experts block);
    unit "q", "kv", "ffn", "vocab", "experts", "expert_ffn", "shared_ffn".
    """

    kind: str
    unit: str = ""


def col(unit: str) -> Split:
    return Split("col", unit)


def row(unit: str) -> Split:
    return Split("row", unit)


VOCAB = Split("vocab", "vocab")
HEADS = Split("heads")
REDUCE = Split("reduce")


def matches(pattern: str, name: str) -> bool:
    """Plan keys are module names in which "*" stands for one dotted component (a layer index)."""
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(a == "*" or a == b for a, b in zip(p, n))


def module_split(plan: dict, module_name: str) -> Split | None:
    return next((split for pattern, split in plan.items() if matches(pattern, module_name)), None)


def tensor_split(plan: dict, name: str):
    """Split of tensor ``name`` ("<module>.weight" / "<module>.bias"): ("col" | "row" | "vocab", unit)
    or "replicate" (norms, position embeddings, anything the plan does not name)."""
    split = module_split(plan, name.rpartition(".")[0])
    if split is None or split.kind in ("heads", "reduce"):
        return "replicate"
    return split.kind, split.unit


def split_attrs(split, ndim: int = 2) -> dict:
    """The attributes a checkpoint stores on a tensor of ``ndim`` axes with this split (and checks on
    load; a bias stores the axis of its weight, as it always has)."""
    if split == "replicate":
        return {"split": "replicate", "unit": "", "axis": -1}
    kind, unit = split
    return {"split": kind, "unit": unit, "axis": split_axis(split, max(ndim, 2))}
