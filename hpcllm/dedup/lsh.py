"""The global phase of `hpcllm dedup`: band buckets across ranks, candidate pairs, clusters.

    each rank: its shards' signatures (persisted per shard) -> band keys, plus
    the exact-text hash as one more key -> records (key, global row) sent to
    rank ``key % world`` (alltoallv, one shard per rank per round) -> kept in
    memory up to --memory-mb, else spilled as sorted runs (hpcllm.dedup.runs)
    -> read back in key order: each bucket links its rows to its smallest ->
    connected components of those links on the rank (union-find), then of
    every rank's (row, smallest row) pairs, gathered on every rank.

A cluster is a connected component of "shares a bucket" (LSH candidates are
not verified): its id, and the row kept, is its smallest global row, so the
result does not depend on the number of ranks or the order of the rounds.
Memory: --memory-mb bounds the band records (``bands + 1`` per document, 16
bytes each), the bulk; what is held beyond them is the duplicates found, a
(row, smallest row) pair of 16 bytes per duplicate row, at the end on every
rank.
"""

from __future__ import annotations

import numpy as np

from hpcllm.kernels.minhash import band_keys, components
from hpcllm.world.collective import agree_max, world_rank, world_size


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.1) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false positive plus false negative
    probability mass around ``threshold``: datasketch's MinHashLSH choice, but with false negatives weighing
    9x (datasketch: equally), as candidates are not verified and a missed duplicate stays in the corpus
    (at 0.7 / 128 permutations: 20 x 6, a pair at the threshold is found with probability 0.92)."""
    def area(f, lo, hi):
        x = np.linspace(lo, hi, 513)
        return np.trapezoid(f(x), x)
    best, out = np.inf, (1, 1)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = area(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)
            fn = area(lambda s: (1 - s ** r) ** b, threshold, 1.0)
            cost = fp_weight * fp + (1 - fp_weight) * fn
            if cost < best:
                best, out = cost, (b, r)
    return out


def shard_records(sig: np.ndarray, count: np.ndarray, exact: np.ndarray, processed: np.ndarray,
                  row_start: int, bands: int, rows: int) -> np.ndarray:
    """(key, global row) uint64 records of one shard: a band key per band of every document with shingles,
    the exact-text hash of every processed document."""
    rows_g = np.arange(row_start, row_start + len(sig), dtype=np.uint64)
    has = np.flatnonzero(count > 0)
    keys = band_keys(sig[has], bands, rows)
    band = np.stack([keys.ravel(), np.repeat(rows_g[has], bands)], axis=1)
    ex = np.stack([exact[processed], rows_g[processed]], axis=1)
    return np.concatenate([band, ex]).astype(np.uint64, copy=False)


def exchange(comm, rec: np.ndarray) -> np.ndarray:
    """Every rank's records sent to rank ``key % world`` (alltoallv); what this rank receives."""
    size = world_size(comm)
    if size == 1:
        return rec
    from mpi4py import MPI

    dest = (rec[:, 0] % np.uint64(size)).astype(np.int64)
    rec = np.ascontiguousarray(rec[np.argsort(dest, kind="stable")])
    send = np.bincount(dest, minlength=size).astype(np.int64) * 2
    recv = np.array(comm.alltoall(send.tolist()), np.int64)
    out = np.empty((int(recv.sum()) // 2, 2), np.uint64)
    displ = lambda c: np.concatenate([[0], np.cumsum(c)[:-1]])   # noqa: E731
    comm.Alltoallv([rec, send, displ(send), MPI.UINT64_T], [out, recv, displ(recv), MPI.UINT64_T])
    return out


def bucket_edges(chunks, fold: int | None = 1 << 16) -> np.ndarray:
    """(row, smallest row linked to it) int64 pairs joining the rows of every bucket of more than one row;
    ``chunks``: the records in key order (a bucket may span chunks: its smallest row so far is carried on).
    The pairs are folded into components (``smallest_of``) whenever they double, so what is held stays
    about two pairs per duplicate row, not one per duplicate row and band.  ``fold=None``: the distinct
    links themselves (to verify them), each (row, smallest of a bucket), not folded."""
    edges, held, folded, carry = [], 0, 0, None
    for rec in chunks:
        if carry is not None and rec[0, 0] == carry[0]:
            rec = np.concatenate([carry[None], rec])
        keys, rows = rec[:, 0], rec[:, 1].astype(np.int64)
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        low = np.minimum.reduceat(rows, starts)
        lowest = np.repeat(low, np.diff(np.r_[starts, len(rows)]))
        linked = rows != lowest
        edges.append(np.stack([rows[linked], lowest[linked]], axis=1))
        held += int(linked.sum())
        carry = np.array([keys[-1], low[-1]], np.uint64)
        if fold is not None and held > max(fold, 2 * folded):
            edges = [smallest_of(np.concatenate(edges))]
            held = folded = len(edges[0])
    if not edges:
        return np.zeros((0, 2), np.int64)
    return smallest_of(np.concatenate(edges)) if fold is not None else np.unique(np.concatenate(edges), axis=0)


def smallest_of(edges: np.ndarray) -> np.ndarray:
    """(row, smallest row of its component) for every row of ``edges`` but the smallest ones, sorted."""
    if len(edges) == 0:
        return np.zeros((0, 2), np.int64)
    nodes, inv = np.unique(edges, return_inverse=True)
    inv = inv.reshape(edges.shape)
    root = nodes[components(len(nodes), inv[:, 0], inv[:, 1])]
    linked = root != nodes
    return np.stack([nodes[linked], root[linked]], axis=1)


def gather_pairs(comm, pairs: np.ndarray) -> np.ndarray:
    """Every rank's (row, root) pairs, on every rank (Allgatherv)."""
    if world_size(comm) == 1:
        return pairs
    from mpi4py import MPI

    counts = np.array(comm.allgather(pairs.size), np.int64)
    out = np.empty(int(counts.sum()), np.int64)
    displ = np.concatenate([[0], np.cumsum(counts)[:-1]])
    comm.Allgatherv([np.ascontiguousarray(pairs, np.int64), MPI.INT64_T], [out, counts, displ, MPI.INT64_T])
    return out.reshape(-1, 2)


class Clusters:
    """The duplicate rows' clusters: lookup by global row."""

    def __init__(self, pairs: np.ndarray):
        self.rows, self.root = pairs[:, 0], pairs[:, 1]
        self.roots = np.unique(self.root)

    @classmethod
    def find(cls, comm, load_shard, local: list, bands: int, rows: int, runs, stop,
             verify=None) -> "Clusters | None":
        """Bucket every rank's shards' records and join the buckets into clusters; None if stopped.

        ``load_shard(shard)`` -> the records of one of ``local`` (this rank's shards); ``verify(links)``
        (collective) -> which (row, row) links to keep (None: every one)."""
        rounds = agree_max(comm, len(local))
        for k in range(rounds):
            if stop.should_stop(comm):
                return None
            rec = load_shard(local[k]) if k < len(local) else np.zeros((0, 2), np.uint64)
            runs.add(exchange(comm, rec))
        if verify is None:
            pairs = bucket_edges(runs.chunks())
        else:
            links = bucket_edges(runs.chunks(), fold=None)
            pairs = smallest_of(links[verify(links)])
        return cls(smallest_of(gather_pairs(comm, pairs)))

    def columns(self, row_start: int, n: int) -> dict:
        """dup_cluster (-1: unique), dup_of (the row kept), keep, for rows row_start..row_start + n."""
        rows = np.arange(row_start, row_start + n, dtype=np.int64)
        i = np.minimum(np.searchsorted(self.rows, rows), max(len(self.rows) - 1, 0))
        dup = (self.rows[i] == rows) if len(self.rows) else np.zeros(n, bool)
        root = np.where(dup, self.root[i] if len(self.rows) else rows, rows)
        kept = np.isin(rows, self.roots)
        cluster = np.where(dup | kept, root, -1)
        return {"dup_cluster": cluster, "dup_of": root, "keep": root == rows}


def local_shards(plan, comm) -> list:
    """This rank's share of the shards for the global phase: every world-th in plan order."""
    return [s for s in sorted(plan, key=lambda s: s.index)][world_rank(comm)::world_size(comm)]
