"""`dedup --verify`: candidate links kept only where the two documents' exact Jaccard similarity is high enough.

A link (two rows that shared an LSH bucket) lives on the rank that held the
bucket; the rows' shingle sets (saved per shard with the signatures) live with
the ranks that own their shards (``hpcllm.dedup.lsh.local_shards``).  So each
rank asks the owners for the sets its links need and answers the others'
requests (two ``alltoall`` of arrays), then compares each link's two sets.
Two empty documents (equal after normalisation) count as similarity 1.
"""

from __future__ import annotations

import numpy as np

from hpcllm.world.collective import world_size


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 and len(b) == 0:
        return 1.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def _alltoall(comm, parts: list) -> list:
    return comm.alltoall(parts) if world_size(comm) > 1 else parts


def fetch_sets(comm, plan, rows: np.ndarray, load_sets) -> dict:
    """{row: its sorted distinct shingle hashes} for ``rows``, wherever their shards are (collective).

    ``load_sets(shard)`` -> (flat, offsets) of one of this rank's shards."""
    shards = sorted(plan, key=lambda s: s.index)
    starts = np.array([s.row_start for s in shards], np.int64)
    size = world_size(comm)
    where = lambda r: np.searchsorted(starts, r, "right") - 1   # noqa: E731  shard position of rows r
    owner = where(rows) % size
    asked = _alltoall(comm, [rows[owner == k] for k in range(size)])
    wanted = np.unique(np.concatenate(asked)) if asked else np.zeros(0, np.int64)
    sets = {}
    for pos in np.unique(where(wanted)):
        flat, off = load_sets(shards[pos])
        for r in wanted[where(wanted) == pos].tolist():
            i = r - shards[pos].row_start
            sets[r] = flat[off[i]:off[i + 1]].copy()
    got = {}
    for part in _alltoall(comm, [{r: sets[r] for r in a.tolist()} for a in asked]):
        got.update(part)
    return got


def verified(comm, plan, links: np.ndarray, load_sets, threshold: float) -> np.ndarray:
    """Which ``links`` (row, row) join documents of exact Jaccard similarity >= ``threshold`` (collective)."""
    sets = fetch_sets(comm, plan, np.unique(links), load_sets)
    return np.array([jaccard(sets[a], sets[b]) >= threshold for a, b in links.tolist()], bool)
