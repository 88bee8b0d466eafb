"""`dedup --embeddings DIR`: semantic duplicates (SemDeDup) over an `embed` result of the same corpus.

    each rank: its shards' rows of DIR/results.h5 (dequantised, L2-normalised;
    rows without a finite embedding are left out) -> spherical k-means over
    every rank (``--kmeans`` centroids, ``--kmeans-iter`` rounds) -> rows sent
    to rank ``cluster % world`` (alltoall) -> inside each k-means cluster,
    pairs of cosine similarity >= ``--cosine`` link rows -> the links'
    components, as the MinHash path's (``hpcllm.dedup.lsh.Clusters``).

Same result at any number of ranks: the centroid sums are exact (embeddings
as int64 fixed point, 2**-30 steps: integer sums do not depend on the order),
and every product is computed per shard or per k-means cluster, whose shapes
do not depend on the ranks.  The first centroids are the rows at evenly spaced
positions of the corpus.
"""

from __future__ import annotations

import numpy as np

from hpcllm.dedup.lsh import Clusters, gather_pairs, smallest_of
from hpcllm.errors import HpcllmError
from hpcllm.world.collective import agree_max, sum_all, world_size

SCALE = float(1 << 30)


def load_embeddings(path: str, plan, shards) -> list:
    """[(global rows, normalised float32 embeddings)] of ``shards``' rows with a finite embedding in ``path``."""
    from hpcllm.analysis.columns import Results, dequantize

    res = Results([path])
    n_rows = sum(s.n_docs for s in plan)
    if res.n_rows != n_rows or "embedding" not in res.columns:
        raise HpcllmError(f"dedup: --embeddings {path} holds {res.n_rows} rows"
                          f"{'' if 'embedding' in res.columns else ' and no embedding column'}; this corpus has "
                          f"{n_rows}: give the `hpcllm embed` output of the same --input")
    info = res.info("embedding")
    names = ["embedding"] + ([info.scale] if info.scale else [])
    out = []
    for s in shards:
        block = res.read(names, s.row_start, s.row_start + s.n_docs)
        x = np.asarray(dequantize(info, block["embedding"], block.get(info.scale)), np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        ok = np.isfinite(x).all(axis=1)
        out.append((s.row_start + np.flatnonzero(ok), x[ok]))
    return out


def kmeans(comm, parts: list, k: int, iters: int, n_rows: int) -> list:
    """Spherical k-means over every rank's ``parts``; each part's cluster labels (int64)."""
    dim = agree_max(comm, next((x.shape[1] for _, x in parts if len(x)), 0))
    seeds = np.linspace(0, n_rows - 1, k).astype(np.int64)
    fixed = np.zeros((k, dim), np.int64)
    for rows, x in parts:
        hit = np.isin(seeds, rows)
        fixed[hit] = np.rint(x[np.searchsorted(rows, seeds[hit])] * SCALE).astype(np.int64)
    centroids = _normalised(sum_all(comm, fixed))
    labels = []
    for _ in range(iters):
        labels = [_nearest(x, centroids) for _, x in parts]
        sums, counts = np.zeros((k, dim), np.int64), np.zeros(k, np.int64)
        for (_, x), lab in zip(parts, labels):
            order = np.argsort(lab, kind="stable")
            ids, starts = np.unique(lab[order], return_index=True)
            if len(ids):
                sums[ids] += np.add.reduceat(np.rint(x[order] * SCALE).astype(np.int64), starts)
                counts[ids] += np.diff(np.r_[starts, len(lab)])
        sums, counts = sum_all(comm, sums), sum_all(comm, counts)
        centroids = np.where(counts[:, None] > 0, _normalised(sums), centroids)
    return labels or [_nearest(x, centroids) for _, x in parts]


def _normalised(fixed: np.ndarray) -> np.ndarray:
    c = fixed.astype(np.float64)
    return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-300)).astype(np.float32)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmax(x @ centroids.T, axis=1).astype(np.int64) if len(x) else np.zeros(0, np.int64)


def semantic_clusters(comm, parts: list, labels: list, cosine: float, block: int = 4096) -> Clusters:
    """Rows of each k-means cluster sent to rank ``cluster % world``; links of cosine >= ``cosine``; clusters."""
    size = world_size(comm)
    rows = np.concatenate([r for r, _ in parts]) if parts else np.zeros(0, np.int64)
    x = np.concatenate([v for _, v in parts]) if parts else np.zeros((0, 0), np.float32)
    lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    dest = lab % size
    sent = [(rows[dest == r], lab[dest == r], x[dest == r]) for r in range(size)]
    got = comm.alltoall(sent) if size > 1 else sent
    rows = np.concatenate([g[0] for g in got])
    lab = np.concatenate([g[1] for g in got])
    x = np.concatenate([g[2] for g in got if len(g[0])]) if len(rows) else np.zeros((0, 1), np.float32)
    links = []
    order = np.lexsort((rows, lab))
    rows, lab, x = rows[order], lab[order], x[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if len(lab) else np.zeros(0, np.int64)
    for a, b in zip(starts, np.r_[starts[1:], len(lab)]):
        for i in range(a, b, block):         # one block of rows against every later row of the cluster
            sim = x[i:i + block] @ x[i:b].T
            bi, bj = np.nonzero(np.triu(sim >= cosine, 1))
            links.append(np.stack([rows[i + bj], rows[i + bi]], axis=1))
    pairs = smallest_of(np.concatenate(links)) if links else np.zeros((0, 2), np.int64)
    return Clusters(smallest_of(gather_pairs(comm, pairs)))
