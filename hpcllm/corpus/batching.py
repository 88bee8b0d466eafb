"""Token-budget batches: sort by length inside windows, then pack.

A shard's documents are taken in consecutive windows of ``window`` documents;
inside a window they are sorted by token count (longest first, stable, so the
largest padded batch comes first and memory problems show at once) and packed
greedily into batches whose padded size ``n_docs * max_len`` stays within
``max_tokens``.  Batches never cross a window, so a window can be tokenized and
run while the next one is read.  The batches are index arrays into the shard;
the caller restores input order by writing row ``batch[i]`` for result ``i``.
"""

from __future__ import annotations

import numpy as np

from hpcllm.errors import HpcllmError


def make_batches(lengths: np.ndarray, max_tokens: int, window: int,
                 max_batch: int | None = None, padded: bool = True) -> list[np.ndarray]:
    """Index arrays (int64) whose union is a permutation of ``range(len(lengths))``.

    Every batch satisfies ``len(b) * max(lengths[b]) <= max_tokens`` (or, with
    ``padded=False``, for a model that packs documents without padding,
    ``sum(lengths[b]) <= max_tokens``), except a single document longer than
    ``max_tokens``, which is a batch of its own. A length of 0 counts as 1 so
    empty documents still use up the budget.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_tokens < 1 or window < 1 or (max_batch is not None and max_batch < 1):
        raise HpcllmError(f"batching needs max_tokens, window and max_batch >= 1 "
                          f"(got {max_tokens}, {window}, {max_batch})")
    cap = len(lengths) if max_batch is None else max_batch
    batches: list[np.ndarray] = []
    for w0 in range(0, len(lengths), window):
        lens = np.maximum(lengths[w0:w0 + window], 1)
        order = np.argsort(-lens, kind="stable")
        pack = _pack_sorted if padded else _pack_sum
        batches += [w0 + order[a:b] for a, b in pack(lens[order], max_tokens, cap)]
    return batches


def _pack_sorted(lens_desc: np.ndarray, max_tokens: int, cap: int) -> list[tuple[int, int]]:
    """Cut lengths sorted longest-first into [a, b) runs within the budget.

    With longest first, a run starting at a has padded size (b - a) * lens[a],
    so the run can hold max(1, max_tokens // lens[a]) documents.
    """
    runs, a, n = [], 0, len(lens_desc)
    while a < n:
        b = a + min(cap, max(1, max_tokens // int(lens_desc[a])))
        runs.append((a, min(b, n)))
        a = b
    return runs


def _pack_sum(lens_desc: np.ndarray, max_tokens: int, cap: int) -> list[tuple[int, int]]:
    """Cut lengths into [a, b) runs whose sum stays within the budget (at least one document each)."""
    ends = np.cumsum(lens_desc)
    runs, a, n = [], 0, len(lens_desc)
    while a < n:
        base = ends[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(ends, base + max_tokens, side="right")))
        b = min(b, a + cap, n)
        runs.append((a, b))
        a = b
    return runs


def pack_batch(ids: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Documents ``index`` of a ragged encoding as one flat int64 token run and their int64 lengths."""
    index = np.asarray(index, dtype=np.int64)
    starts = offsets[index].astype(np.int64)
    lens = offsets[index + 1].astype(np.int64) - starts
    ends = np.cumsum(lens)
    src = np.arange(int(ends[-1]) if len(index) else 0) + np.repeat(starts - (ends - lens), lens)
    return ids[src].astype(np.int64, copy=False), lens
