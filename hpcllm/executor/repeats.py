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

Whether a job's results of a row depend on nothing else is the job's to say
(``Job.repeats``): "same" shares by default; "seeded" (sampled generation:
the seed is the document id's, so copies differ) only with ``--repeats
share``; None never.  ``--repeats compute`` turns it off.

Nothing is exchanged between dp groups: each keeps its own cache, so a
document is computed at most once per group that meets it while the cache
holds it, and a resumed run starts with an empty one (results do not depend
on the cache: a copy gets what computing it would give).  A shard split into
parts (hpcllm.executor.parts) is narrowed within itself only, as every part's
group must make the same batches.  The rows filled count in the shard file's
``repeats_filled`` attribute and in the job's summary (``filled_total``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict

import numpy as np

from hpcllm.store.results import ragged_rows

FILLED = "repeats_filled"      # shard file and results.h5 attribute: rows filled from another row


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
    """One group's repeated documents: its cache (hash -> a computed row's values) and the two steps."""

    def __init__(self, job, cfg):
        self.on = shares(job, cfg)
        self.budget = int(cfg.repeat_cache_mb * 2**20)
        self.ragged = {c.name: c.offsets for c in job.schema() if c.offsets} if self.on else {}
        self.cache, self.held = OrderedDict(), 0

    def key(self, data) -> None:
        """The prefetch thread: ``data.keys``, one per processed row."""
        if self.on:
            data.keys = row_keys(data.ids, data.offsets, data.process, getattr(data.docs, "params", None))

    def narrow(self, data, across: bool = True):
        """The shard's Work, computing each distinct row once (``across``: and none the cache holds)."""
        if not self.on or data.keys is None:   # no keys: a shard not read (follow mode: its file changed)
            return data.for_workers()
        first, keep, copies, sources, cached = {}, [], [], [], []
        for row, k in zip(data.process.tolist(), data.keys):
            if k in first:
                copies.append(row)
                sources.append(first[k])
                continue
            first[k] = row
            if across and k in self.cache:
                self.cache.move_to_end(k)
                cached.append((row, self.cache[k]))
            else:
                keep.append(row)
        data.narrowed = Narrowed(np.array(keep, np.int64), np.array(copies, np.int64), np.array(sources, np.int64),
                                 cached, across)
        return data.for_workers(data.narrowed.keep)

    def fill(self, data, result):
        """``result`` with every row not computed filled from its source; the computed rows cached."""
        n = getattr(data, "narrowed", None)
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
            self._remember(data, n.keep, cols, fixed, flats, status)
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

    def _remember(self, data, rows, cols, fixed, flats, status):
        """The computed rows' values into the cache (the least recently used leave it when it is full)."""
        if self.budget <= 0:
            return
        keys = dict(zip(data.process.tolist(), data.keys))
        for row in rows.tolist():
            values = {name: cols[name][row:row + 1].copy() for name in fixed}
            for name in flats:
                o = cols[self.ragged[name]]
                values[name] = cols[name][o[row]:o[row + 1]].copy()
            size = 64 + sum(_nbytes(v) for v in values.values())
            k = keys[row]
            if k in self.cache or size > self.budget:
                continue
            self.cache[k] = (values, status.get(row), size)
            self.held += size
            while self.held > self.budget:
                self.held -= self.cache.popitem(last=False)[1][2]


def _nbytes(a: np.ndarray) -> int:
    if a.dtype.kind == "O":
        return 64 * a.size + sum(len(x) if isinstance(x, (str, bytes)) else _nbytes(np.asarray(x)) for x in a.flat)
    return a.nbytes


def filled_total(out_dir: str) -> int | None:
    """Rows filled from a repeated document over the stored shards (None: this job never shares)."""
    from hpcllm.store.chunks import shard_attrs

    got = [int(a[FILLED]) for a in shard_attrs(out_dir) if FILLED in a]
    return sum(got) if got else None
