"""Repeated documents computed once: a row whose token ids (and per-row parameters) its group has met
already gets the results of the first one instead of running the model again.

    prefetch thread   each processed row's key: a 128-bit blake2b of its token ids and its
                      ``Work.params`` (two prompts with other sampling options stay apart)
    group leader,     ``narrow``: the tp group computes the first row of each key in the shard
    before the        that the group's cache does not hold (every tp rank gets that narrowed
    broadcast         ``Work.process``)
    after             ``fill``: every job column (ragged ones too) and the job's status of the
    ``Job.result``    computed row, or of the cached one, into the other rows; the rows computed
                      go into the cache (least recently used out first, ``--repeat-cache-mb``)
    after the write   ``publish``: their keys (and rows, job statuses) in OUT/repeats/, where
                      every group looks before narrowing its next shard: a key found there is
                      read from that shard's file, whichever group (or earlier run) wrote it

Whether a job's results of a row depend on nothing else is the job's to say
(``Job.repeats``): "same" shares by default; "seeded" (sampled generation:
the seed is the document id's, so copies differ) only with ``--repeats
share``; None never.  ``--repeats compute`` turns it off.

The dp groups share through the files only: a document whose first copy
another group is still computing is computed again (results do not depend on
who computed what: a copy gets what computing it would give).  The keys read
are bounded as the cache is (``INDEX_BYTES`` each; past the budget no more
key files are read), and a shard file consolidated into a chunk no longer
gives its rows (they are computed).  A shard split into parts
(hpcllm.executor.parts) is narrowed within itself only, as every part's group
must make the same batches.  The rows filled count in the shard file's
``repeats_filled`` attribute and in the job's summary (``filled_total``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict

import h5py
import numpy as np

from hpcllm.status import Status
from hpcllm.store.atomic import atomic_h5
from hpcllm.store.layout import REPEATS_DIR, keys_file, shard_file
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, ragged_rows

FILLED = "repeats_filled"      # shard file and results.h5 attribute: rows filled from another row
INDEX_BYTES = 160              # memory of one key read from OUT/repeats (a dict entry), for the budget
NO_STATUS = 255                # a key file's status of a row the job gave none


def shares(job, cfg) -> bool:
    """Does this run compute a repeated document once (``Job.repeats`` and ``--repeats``)?"""
    if job.repeats is None or cfg.repeats == "compute":
        return False
    return cfg.repeats == "share" or job.repeats == "same"


def row_keys(ids, offsets, rows, params=None) -> list[bytes]:
    """A 16-byte key per row of ``rows``: blake2b of its length, its token ids (int32) and its params."""
    flat = memoryview(np.ascontiguousarray(ids, "<i4")).cast("B")
    out = []
    for r in rows.tolist():
        a, b = int(offsets[r]), int(offsets[r + 1])
        h = hashlib.blake2b((b - a).to_bytes(8, "little"), digest_size=16)
        h.update(flat[4 * a:4 * b])
        if params is not None and params[r]:
            h.update(json.dumps(params[r], sort_keys=True, default=str).encode())
        out.append(h.digest())
    return out


@dataclasses.dataclass
class Narrowed:
    """Which rows of a shard run, and where the others' results come from."""
    keep: np.ndarray        # rows computed (``Work.process``)
    copies: np.ndarray      # rows filled from another row of the shard ...
    sources: np.ndarray     # ... this one (computed, or filled from the cache)
    cached: list            # (row, cache entry: (values, status, bytes)) filled from the cache
    across: bool            # the cache was looked up (and is filled from the rows computed)

    @property
    def filled(self) -> int:
        return len(self.copies) + len(self.cached)


class Repeats:
    """One group's repeated documents: its cache (key -> a computed row's values), the keys the groups
    published (key -> where its row is), and the steps above."""

    def __init__(self, job, cfg):
        self.on = shares(job, cfg)
        self.budget = int(cfg.repeat_cache_mb * 2**20)
        schema = job.schema() if self.on else ()
        self.ragged = {c.name: c.offsets for c in schema if c.offsets}
        base = {c.name for c in BASE_COLUMNS + (N_TOKENS,)} | set(self.ragged.values())
        self.columns = [(c.name, c.is_string) for c in schema if c.name not in base]   # what a shard file gives
        self.cache, self.held = OrderedDict(), 0
        self.out_dir, self.indexed, self.elsewhere = cfg.output, set(), {}   # key -> (shard, row, job status)

    def key(self, data) -> None:
        """The prefetch thread: ``data.keys``, one per processed row."""
        if self.on:
            data.keys = row_keys(data.ids, data.offsets, data.process, getattr(data.docs, "params", None))

    def narrow(self, data, across: bool = True):
        """The shard's Work, computing each distinct row once (``across``: and none the cache holds)."""
        if not self.on or data.keys is None:   # no keys: a shard not read (follow mode: its file changed)
            return data.for_workers()
        if across:
            self._index()
        first, keep, copies, sources, cached, fetch = {}, [], [], [], [], []
        for row, k in zip(data.process.tolist(), data.keys):
            if k in first:
                copies.append(row)
                sources.append(first[k])
                continue
            first[k] = row
            if across and k in self.cache:
                self.cache.move_to_end(k)
                cached.append((row, self.cache[k]))
            elif across and k in self.elsewhere:
                fetch.append((row, k))
            else:
                keep.append(row)
        got, missed = self._fetch(fetch)
        data.narrowed = Narrowed(np.sort(np.array(keep + missed, np.int64)), np.array(copies, np.int64),
                                 np.array(sources, np.int64), cached + got, across)
        return data.for_workers(data.narrowed.keep)

    def fill(self, data, result):
        """``result`` with every row not computed filled from its source; the computed rows cached."""
        n = data.narrowed
        if n is None:
            return result
        cols, status = dict(result.columns), dict(result.status)
        flats = [name for name in cols if name in self.ragged]
        offsets = set(self.ragged[name] for name in flats)
        fixed = [name for name in cols if name not in self.ragged and name not in self.ragged.values()]
        for row, (values, st, _) in n.cached:
            for name in fixed:
                cols[name][row:row + 1] = values[name]
            if st is not None:
                status[row] = st
        for name in fixed:
            cols[name][n.copies] = cols[name][n.sources]
        for row, src in zip(n.copies.tolist(), n.sources.tolist()):
            if src in status:
                status[row] = status[src]
        for off in offsets:
            self._fill_ragged(cols, off, [f for f in flats if self.ragged[f] == off], n)
        if n.across:
            keys = dict(zip(data.process.tolist(), data.keys))
            self._remember(keys, n.keep, cols, fixed, flats, status)
            data.computed = ([keys[r] for r in n.keep.tolist()], n.keep,
                             np.array([status.get(r, NO_STATUS) for r in n.keep.tolist()], np.uint8))
        return dataclasses.replace(result, columns=cols, status=status, attrs={**result.attrs, FILLED: n.filled})

    def _fill_ragged(self, cols, off, flats, n):
        """The flat columns cut by ``off``, their filled rows' runs in place, and ``off`` again."""
        o = cols[off]
        for name in flats:
            runs = [cols[name][o[i]:o[i + 1]] for i in range(len(o) - 1)]
            for row, (values, _, _) in n.cached:
                runs[row] = values[name]
            for row, src in zip(n.copies.tolist(), n.sources.tolist()):
                runs[row] = runs[src]
            cols[name], cols[off] = ragged_rows(runs, cols[name].dtype)

    def _remember(self, keys, rows, cols, fixed, flats, status):
        """The computed rows' values (``keys``: row -> key) into the cache (the least recently used leave it
        when it is full)."""
        if self.budget <= 0:
            return
        for row in rows.tolist():
            values = {name: cols[name][row:row + 1].copy() for name in fixed}
            for name in flats:
                o = cols[self.ragged[name]]
                values[name] = cols[name][o[row]:o[row + 1]].copy()
            self._add(keys[row], values, status.get(row))

    def _add(self, k, values, st) -> tuple:
        """A cache entry (values, job status, bytes), kept while the budget allows."""
        entry = (values, st, 64 + sum(_nbytes(v) for v in values.values()))
        if k not in self.cache and entry[2] <= self.budget:
            self.cache[k] = entry
            self.held += entry[2]
            while self.held > self.budget:
                self.held -= self.cache.popitem(last=False)[1][2]
        return entry

    # ------------------------------------------------------------------ shared through OUT/repeats

    def publish(self, data) -> None:
        """After the shard file is written: the keys, rows and job statuses of the rows computed in it."""
        if data.computed is None:
            return
        keys, rows, status = data.computed
        os.makedirs(os.path.join(self.out_dir, REPEATS_DIR), exist_ok=True)
        with atomic_h5(keys_file(self.out_dir, data.shard.index)) as f:
            f["key"] = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16)
            f["row"], f["status"] = rows, status

    def _index(self) -> None:
        """The keys published since the last look, while the budget holds them (a listing of OUT/repeats per
        shard: 47 ms at 10,000 files on a busy machine)."""
        d = os.path.join(self.out_dir, REPEATS_DIR)
        if len(self.elsewhere) * INDEX_BYTES >= self.budget or not os.path.isdir(d):
            return
        for name in sorted(set(os.listdir(d)) - self.indexed):
            if name.startswith(".") or len(self.elsewhere) * INDEX_BYTES >= self.budget:
                continue     # a file being written; or no room
            self.indexed.add(name)
            shard = int(name[len("keys-"):-len(".h5")])
            with h5py.File(os.path.join(d, name), "r") as f:
                keys, rows, status = f["key"][()], f["row"][()].tolist(), f["status"][()].tolist()
            for k, r, st in zip(keys, rows, status):
                self.elsewhere.setdefault(k.tobytes(), (shard, r, st))

    def _fetch(self, wanted):
        """(row, cache entry) for the (row, key) pairs whose results a shard file holds, and the rows whose
        shard file is gone (consolidated into a chunk: they are computed)."""
        by_shard = {}
        for row, k in wanted:
            by_shard.setdefault(self.elsewhere[k][0], []).append((row, k))
        got, missed = [], []
        for shard, pairs in by_shard.items():
            try:
                with h5py.File(shard_file(self.out_dir, shard), "r") as f:
                    rows = [self._row(f, self.elsewhere[k][1]) for _, k in pairs]
            except (OSError, KeyError):
                missed += [row for row, _ in pairs]
                continue
            for (row, k), values in zip(pairs, rows):
                st = self.elsewhere[k][2]
                got.append((row, self._add(k, values, None if st == NO_STATUS else Status(st))))
        return got, missed

    def _row(self, f, r) -> dict:
        """Row ``r``'s job columns in a shard file, as ``_remember`` keeps them."""
        values = {}
        for name, is_string in self.columns:
            if name in self.ragged:
                o = f[self.ragged[name]]
                values[name] = f[name][o[r]:o[r + 1]]
            else:
                values[name] = (f[name].asstr() if is_string else f[name])[r:r + 1]
        return values


def _nbytes(a: np.ndarray) -> int:
    if a.dtype.kind == "O":
        return 64 * a.size + sum(len(x) if isinstance(x, (str, bytes)) else _nbytes(np.asarray(x)) for x in a.flat)
    return a.nbytes


def filled_total(out_dir: str) -> int | None:
    """Rows filled from a repeated document over the stored shards (None: this job never shares)."""
    from hpcllm.store.chunks import shard_attrs

    got = [int(a[FILLED]) for a in shard_attrs(out_dir) if FILLED in a]
    return sum(got) if got else None
