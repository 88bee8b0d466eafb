"""A stratified validation split that depends only on the document ids, labels and seed.

Each row gets a 64-bit hash ``h = blake2b(seed, doc_id)``.  Class ``c`` with
``n_c`` labelled rows (counted over all ranks) sends its ``k_c = round(fraction * n_c)``
rows of smallest hash to validation (capped at ``n_c - 1``, so a class with
rows always trains).  The per-class threshold is found by bisection over the
64-bit hash range with all-reduced counts (64 reductions of ``n_classes``
integers), so the split is exactly stratified and the same whatever the world
size and however the rows are sharded or ordered; nothing is gathered.
Rows with equal ids hash equally and fall on the same side (a duplicated id
may push its class one row over ``k_c``).
"""

import hashlib

import numpy as np

from hpcllm.world.collective import max_all, sum_all


def row_hashes(doc_ids, seed: int) -> np.ndarray:
    """uint64 hash of each document id (``str(id)``, UTF-8) under ``seed``."""
    key = int(seed).to_bytes(8, "little", signed=True)
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode("utf-8"), digest_size=8, key=key).digest(),
                                    "little") for i in doc_ids], dtype=np.uint64)


def _count_below(sorted_by_class: list, thresholds: list) -> np.ndarray:
    return np.array([np.searchsorted(h, np.uint64(t), side="left") for h, t in zip(sorted_by_class, thresholds)],
                    dtype=np.int64)


def validation_mask(doc_ids, y: np.ndarray, fraction: float, seed: int = 0, comm=None) -> np.ndarray:
    """bool ``[n_local]``: True for this rank's rows that go to validation (collective).

    ``y`` holds class ids 0..C-1, or -1 for rows without a label (never validation).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), not {fraction}")
    y = np.asarray(y, dtype=np.int64)
    h = row_hashes(doc_ids, seed)
    n_classes = int(max_all(comm, np.array([y.max(initial=-1)], np.int64))[0]) + 1
    per_class = [np.sort(h[y == c]) for c in range(n_classes)]
    counts = sum_all(comm, np.array([len(p) for p in per_class], np.int64))
    target = np.minimum(np.floor(fraction * counts + 0.5), np.maximum(counts - 1, 0)).astype(np.int64)
    lo, hi = [0] * n_classes, [2 ** 64] * n_classes    # invariant: count(< lo) <= target < count(< hi) or hi = 2^64
    for _ in range(64):
        mid = [(a + b) // 2 for a, b in zip(lo, hi)]
        below = sum_all(comm, _count_below(per_class, mid))
        lo = [m if n <= t else a for a, m, n, t in zip(lo, mid, below, target)]
        hi = [b if n <= t else m for b, m, n, t in zip(hi, mid, below, target)]
    # lo is the largest threshold with count(< lo) <= target: exactly target unless ids repeat.
    thresholds = np.array(lo, dtype=np.uint64)
    mask = np.zeros(len(y), dtype=bool)
    labelled = y >= 0
    mask[labelled] = h[labelled] < thresholds[y[labelled]]
    return mask



def data_fingerprint(doc_ids, labels, seed: int = 0, comm=None) -> str:
    """A hex digest of the (doc id, label) pairs that ignores their order, sharding and world size:
    the sum mod 2^64 of one hash per pair, all-reduced (collective). ``labels``: names or ids."""
    pairs = [f"{i}\x00{label}" for i, label in zip(doc_ids, labels)]
    local = row_hashes(pairs, seed).sum(dtype=np.uint64) if pairs else np.uint64(0)
    both = sum_all(comm, np.array([local, len(pairs)], dtype=np.uint64))   # wraps mod 2^64 on every rank alike
    return f"{int(both[0]):016x}-{int(both[1])}"
