"""Band records (key, row) of one rank, held up to a memory budget and spilled to disk as sorted runs.

A record is two uint64 (band key, global row).  ``add`` keeps records in
memory until they pass the budget, then sorts them by key and writes them as
one run (``run-N.npy``); ``chunks`` gives every record in key order, merging
the runs block by block from memory-mapped files, so at most the budget is
held whatever the corpus.  A chunk ends on any key: a bucket may continue in
the next chunk, which ``hpcllm.dedup.lsh.bucket_edges`` handles.
"""

from __future__ import annotations

import os

import numpy as np

# bytes a record costs while it is sorted: held, joined into one array, the argsort's index, the sorted copy
RECORD_BYTES = 16 + 16 + 8 + 16
# a chunk handed on is at most this share of the records held: turning it into pairs costs ~100 bytes a record
CHUNK_SHARE = 8


def sort_records(rec: np.ndarray) -> np.ndarray:
    return rec[np.argsort(rec[:, 0], kind="stable")]


class SortedRuns:
    def __init__(self, directory: str, budget_bytes: int):
        self.directory = directory
        self.capacity = max(1024, budget_bytes // RECORD_BYTES)   # records held in memory
        self._buffer, self._held, self.runs = [], 0, []
        self.spilled = 0     # runs written so far

    def add(self, rec: np.ndarray) -> None:
        self._buffer.append(rec)
        self._held += len(rec)
        if self._held > self.capacity:
            self._spill()

    def _spill(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"run-{len(self.runs)}.npy")
        np.save(path, sort_records(np.concatenate(self._buffer)))
        self.runs.append(path)
        self.spilled += 1
        self._buffer, self._held = [], 0

    def chunks(self):
        """Every record in key order, as sorted (n, 2) uint64 arrays; then the run files are removed."""
        step = max(1, self.capacity // CHUNK_SHARE)
        if not self.runs:
            if self._held:
                rec = sort_records(np.concatenate(self._buffer))
                self._buffer, self._held = [], 0
                yield from (rec[i:i + step] for i in range(0, len(rec), step))
            return
        if self._held:
            self._spill()
        try:
            for rec in self._merge():
                yield from (rec[i:i + step] for i in range(0, len(rec), step))
        finally:
            for path in self.runs:
                os.unlink(path)
            self.runs = []

    def _merge(self):
        """Blocked k-way merge: each round takes every run's records up to the smallest of the keys
        that end the runs' current blocks (so nothing later can sort before them)."""
        runs = [np.load(p, mmap_mode="r") for p in self.runs]
        block = max(1, self.capacity // (4 * len(runs)))
        pos = [0] * len(runs)
        pending = [np.zeros((0, 2), np.uint64) for _ in runs]
        while True:
            for i, run in enumerate(runs):
                if len(pending[i]) == 0 and pos[i] < len(run):
                    pending[i] = np.array(run[pos[i]:pos[i] + block])
                    pos[i] += len(pending[i])
            live = [i for i in range(len(runs)) if len(pending[i])]
            if not live:
                return
            # a run whose block is its last ends at +inf: only runs with more to read bound the round
            bound = min((pending[i][-1, 0] for i in live if pos[i] < len(runs[i])), default=None)
            take = []
            for i in live:
                cut = len(pending[i]) if bound is None else np.searchsorted(pending[i][:, 0], bound, "right")
                take.append(pending[i][:cut])
                pending[i] = pending[i][cut:]
            yield sort_records(np.concatenate(take))
