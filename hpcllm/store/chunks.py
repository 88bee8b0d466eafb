"""Chunk files: finished shard files consolidated into few large files, which results.h5 points at.

HDF5 opens every VDS source a read touches at the same time, and a source it
cannot open (past ``ulimit -n``) silently reads as the fill value: a master
over 2,000 shard files gives a plain ``h5py.File(...)["status"][:]`` wrong rows
under a limit of 256.  So when shards are done (the end of a job; each
finished prefix of files in follow mode), they are copied, in row order, into
chunk files (at the end of a job every rank copies some: rank 0 cuts the
shards into runs, ``consolidate(..., comm)``), rank 0 writes results.h5 over
those, and only then deletes the shard files a chunk holds whole (a token
shard's tokens are not in its chunk: token shards stay)::

    OUT/chunks/chunk-00000-00957.h5   shards 0..957: every column, rows in input order (offsets
                                      columns start at 0 in each chunk); shard_index, shard_n_docs
                                      and shard_attrs (JSON) say whose rows they are

Crash safety: every file is written atomically and a chunk's name says which
shards it holds, so shard i is done when its file exists or a chunk holds it
whole (``done_shards``; a removed token shard is made again; the shard indices of a plan are its row order).  A kill at
any point leaves the previous master over files that still exist, or the new
one over chunks that exist; a rerun computes nothing that is done and
consolidates what is not.

Few sources: a job's chunks are at least ``CHUNK_BYTES`` and at most about
``MAX_CHUNKS`` (larger files for larger results), or one per rank that copies
(at most ``MAX_CHUNKS // 2``: a file costs ~10 ms to copy however small, so
100,000 small shards are 15+ minutes for one rank).  Follow mode adds a chunk
per finished prefix, then merges the last two while both are under the size
and the older is at most twice the newer and was not cut for its size
(``full``): sizes fall geometrically, so few chunks are small and a row is
copied a few times.  A merged chunk is written
before the ones it replaces go; where chunks overlap the widest counts
(``cover``), and the others are deleted once the master no longer uses them.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.store.atomic import atomic_h5
from hpcllm.store.layout import CHUNKS_DIR, SHARDS_DIR, chunk_filename, chunk_range, shard_file, shard_filename
from hpcllm.store.results import (RESULTS_FORMAT, RESULTS_VERSION, STRING, check_file, check_source, compressed,
                                  offsets_names)
from hpcllm.world.collective import gather_all, on_every_rank, on_root, world_rank, world_size

CHUNK_FORMAT = RESULTS_FORMAT + "-chunk"
CHUNK_BYTES = 1 << 30        # a chunk is cut once its shard files reach this size
MAX_CHUNKS = 64              # a job's chunks grow beyond CHUNK_BYTES to stay about this few
SHARE_BYTES = 64 << 20       # ranks sharing a consolidation copy at least this much of shard files each,
SHARE_SHARDS = 128           # or at least this many shard files each (a file costs ~10 ms however small)
BLOCK_ROWS = 1 << 16         # rows copied at a time: memory stays bounded whatever the chunk size
SHARD_INFO = ("shard_index", "shard_n_docs", "shard_attrs")


@dataclass(frozen=True)
class Chunk:
    first: int      # the first and last shard index it holds
    last: int
    path: str

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)


def list_chunks(out_dir: str) -> list[Chunk]:
    d = os.path.join(out_dir, CHUNKS_DIR)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    return [Chunk(*r, os.path.join(d, n)) for n in names if (r := chunk_range(n))]


def cover(chunks: list[Chunk]) -> tuple[list[Chunk], list[Chunk]]:
    """(the chunks that count, in row order; stale ones): of overlapping chunks (a merge killed before
    it deleted what it replaced) the widest counts."""
    kept, stale = [], []
    for c in sorted(chunks, key=lambda c: (c.first, -c.last)):
        (stale if kept and c.first <= kept[-1].last else kept).append(c)
    return kept, stale


def _held(chunks: list[Chunk]) -> set[int]:
    return {i for c in chunks for i in range(c.first, c.last + 1)}


def _attr(chunk: Chunk, name: str) -> bool:
    """A chunk's flag: ``whole`` (it holds its shard files whole; a token directory's chunks lack the
    tokens), ``full`` (cut for its size; older chunks lack it: False)."""
    with h5py.File(chunk.path, "r") as f:
        return bool(f.attrs.get(name, False))


def done_shards(out_dir: str, plan) -> set[int]:
    """Indices of the shards of ``plan`` whose rows are stored: in their own file or in a chunk that holds
    them whole.  Files are looked at first: a chunk is written before the shard files it holds go."""
    d = os.path.join(out_dir, SHARDS_DIR)
    names = set(os.listdir(d)) if os.path.isdir(d) else set()
    done = {s.index for s in plan if shard_filename(s.index) in names}
    held = _held([c for c in cover(list_chunks(out_dir))[0] if _attr(c, "whole")])
    return done | {s.index for s in plan if s.index in held}


def shard_done(out_dir: str, index: int) -> bool:
    return os.path.exists(shard_file(out_dir, index)) or \
        any(c.first <= index <= c.last and _attr(c, "whole") for c in cover(list_chunks(out_dir))[0])


# --------------------------------------------------------------------------- writing chunks

def _verify(out_dir: str, shards, schema) -> None:
    """Every shard file can be copied (as ``check_source`` says), or one error naming the first bad one."""
    bad = [f"{shard_file(out_dir, s.index)} {why}" for s in shards
           if (why := check_source(shard_file(out_dir, s.index), s, schema))]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise HpcllmError(f"cannot build {os.path.join(out_dir, 'results.h5')}: {bad[0]}{more}; "
                          "rerun the job to complete the missing shards")


def _json_attrs(attrs) -> str:
    """A shard file's attributes as JSON (numpy values as Python ones), kept in its chunk."""
    return json.dumps(dict(attrs.items()), default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))


class _BadSource(Exception):
    """A shard file that cannot be copied (consolidate then names every such file in one error)."""


class _ChunkWriter:
    """Appends sources (shard files or chunks) to one chunk file; small ones are gathered in memory
    up to ``BLOCK_ROWS`` rows and written together (one write per column, not one per shard)."""

    def __init__(self, f: h5py.File, schema, n_rows: int):
        self.f, self.schema, self.n_rows = f, schema, n_rows
        self.offsets = offsets_names(schema)
        self.flats = {o: [c.name for c in schema if c.offsets == o] for o in self.offsets}
        self.base = dict.fromkeys(self.offsets, 0)
        self.pending, self.pending_rows = {}, 0
        self.counts = np.zeros(256, np.int64)
        self.index, self.n_docs, self.attrs, self.whole = [], [], [], True
        for col in schema:
            ds = self._create(col.name, STRING if col.is_string else col.np_dtype, tuple(col.shape_tail))
            if col.offsets:
                ds.attrs["offsets"] = col.offsets      # what ShardView cuts a flat column's rows by
        for name in self.offsets:
            self._create(name, np.dtype(np.int64), ()).resize((1,))
            f[name][0] = 0

    def _create(self, name, dtype, tail):
        width = int(np.prod(tail, dtype=np.int64)) * max(1, np.dtype(dtype).itemsize)
        rows = max(1, min(BLOCK_ROWS, (1 << 20) // width, self.n_rows))   # <= 1 MiB, and no larger than the file
        opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True} if compressed(dtype) else {}
        return self.f.create_dataset(name, shape=(0,) + tail, maxshape=(None,) + tail, chunks=(rows,) + tail,
                                     dtype=dtype, **opts)

    def _put(self, name, data) -> None:
        self.pending.setdefault(name, []).append(data)

    def flush(self) -> None:
        for name, parts in self.pending.items():
            data = np.concatenate(parts)
            ds = self.f[name]
            n = ds.shape[0]
            ds.resize(n + len(data), axis=0)
            ds[n:] = data
        self.pending, self.pending_rows = {}, 0

    def add(self, g: dict, n_rows: int) -> None:
        """Rows 0..n_rows of the datasets ``g`` of a shard file or chunk, after those added so far."""
        for a in range(0, n_rows, BLOCK_ROWS):
            b = min(n_rows, a + BLOCK_ROWS)
            for col in self.schema:
                if not col.offsets:
                    self._put(col.name, g[col.name][a:b])
            if "status" in self.pending:
                self.counts += np.bincount(self.pending["status"][-1], minlength=256)
            for name in self.offsets:
                o = g[name][a:b + 1]
                self._put(name, o[1:] - o[0] + self.base[name])
                for flat in self.flats[name]:
                    self._put(flat, g[flat][o[0]:o[-1]])
                self.base[name] += int(o[-1] - o[0])
            self.pending_rows += b - a
            if self.pending_rows >= BLOCK_ROWS:
                self.flush()

    def finish(self, first: int, last: int, row_start: int) -> None:
        self.flush()
        f = self.f
        f.create_dataset("shard_index", data=np.array(self.index, np.int64))
        f.create_dataset("shard_n_docs", data=np.array(self.n_docs, np.int64))
        f.create_dataset("shard_attrs", data=np.array(self.attrs, dtype=object), dtype=STRING)
        f.attrs.update({"format": CHUNK_FORMAT, "version": RESULTS_VERSION, "first_shard": first,
                        "last_shard": last, "row_start": row_start, "n_docs": int(sum(self.n_docs)),
                        "status_counts": self.counts, "whole": self.whole})


def _n_docs(chunk: Chunk) -> int:
    with h5py.File(chunk.path, "r") as f:
        return int(f.attrs["n_docs"])


@contextlib.contextmanager
def _open_source(out_dir: str, src, schema, names: set[str]):
    """(the open file, its datasets of ``names`` by name: each looked up once, a lookup costs as much
    as a small read, and whether it has no other datasets) of a chunk, or of a shard file checked to
    hold the shard's rows (else _BadSource)."""
    path = src.path if isinstance(src, Chunk) else shard_file(out_dir, src.index)
    try:
        g = h5py.File(path, "r")
    except OSError:
        raise _BadSource(path) from None
    with g:
        keys = list(g)
        datasets = {k: g[k] for k in keys if k in names}
        if not isinstance(src, Chunk) and check_file(datasets, src, schema):
            raise _BadSource(path)
        yield g, datasets, len(datasets) == len(keys)


def write_chunk(out_dir: str, sources: list, schema, full: bool = False) -> Chunk:
    """One chunk file holding ``sources`` (Shards with files, or Chunks), consecutive, in row order;
    ``full``: cut for its size (consolidate's tail merge leaves it alone)."""
    first = sources[0].index if not isinstance(sources[0], Chunk) else sources[0].first
    last = sources[-1].index if not isinstance(sources[-1], Chunk) else sources[-1].last
    path = os.path.join(out_dir, CHUNKS_DIR, chunk_filename(first, last))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    row_start = None
    names = set(offsets_names(schema)) | {c.name for c in schema} | set(SHARD_INFO)
    n_rows = sum(src.n_docs if not isinstance(src, Chunk) else _n_docs(src) for src in sources)
    with atomic_h5(path) as f:
        w = _ChunkWriter(f, schema, n_rows)
        for src in sources:
            with _open_source(out_dir, src, schema, names) as (g, ds, only):
                if row_start is None:
                    row_start = int(g.attrs["row_start"])
                if isinstance(src, Chunk):
                    w.index += ds["shard_index"][:].tolist()
                    w.n_docs += ds["shard_n_docs"][:].tolist()
                    w.attrs += ds["shard_attrs"].asstr()[:].tolist()
                    w.whole &= bool(g.attrs["whole"])
                    n = int(g.attrs["n_docs"])
                else:
                    w.index.append(src.index)
                    w.n_docs.append(src.n_docs)
                    w.attrs.append(_json_attrs(g.attrs))
                    w.whole &= only
                    n = src.n_docs
                w.add(ds, n)
        w.finish(first, last, row_start)
        f.attrs["full"] = full
    return Chunk(first, last, path)


def consolidate(out_dir: str, plan, schema, target: int | None = None, comm=None):
    """The chunks holding every shard of ``plan`` (in row order, indices 0..n-1), written where missing;
    and the files the master no longer needs once it points at them (delete them after).

    ``target``: bytes of shard files per chunk (default: ``CHUNK_BYTES``, more for a result over
    ``MAX_CHUNKS`` of that size).  ``comm``: the ranks share the copying (a collective; rank 0
    cuts the shards into chunks, each rank writes some, rank 0 merges the tail and alone gets the
    answer, the others None).
    """
    if [s.index for s in plan] != list(range(len(plan))):
        raise ValueError("consolidate: the plan's shard indices must be 0..n-1 in row order")
    rank, size = world_rank(comm), world_size(comm)
    kept, stale, groups, target = on_root(comm, lambda: _layout(out_dir, plan, schema, target, size))
    made = on_every_rank(comm, lambda: _write_groups(out_dir, plan, groups[rank::size], schema))
    made = gather_all(comm, made)
    if rank != 0:
        return None
    chunks = sorted(kept + [c for cs in made for c in cs], key=lambda c: c.first)
    while len(chunks) >= 2 and max(chunks[-2].size, chunks[-1].size) < target \
            and chunks[-2].size <= 2 * chunks[-1].size and not _attr(chunks[-2], "full"):
        stale += chunks[-2:]
        chunks[-2:] = [write_chunk(out_dir, chunks[-2:], schema)]
    return chunks, [c.path for c in stale] + _held_shard_files(out_dir, chunks)


def _layout(out_dir, plan, schema, target, ways):
    """(kept chunks, stale chunks, the loose shards cut into groups, the target): consolidate's plan.

    A group is (first, last, full): consecutive shards up to ``target`` bytes of shard files, or
    fewer where ``ways`` ranks share the copying (``SHARE_BYTES`` or ``SHARE_SHARDS`` each, at most
    ``MAX_CHUNKS // 2`` ranks); full: cut for its size, so the tail merge leaves it alone.
    """
    kept, stale = cover(list_chunks(out_dir))
    if kept and kept[-1].last >= len(plan):
        raise HpcllmError(f"{kept[-1].path} holds shards beyond the plan's {len(plan)}; use a new --output")
    held = _held(kept)
    loose = [s for s in plan if s.index not in held]
    try:
        sizes = [os.path.getsize(shard_file(out_dir, s.index)) for s in loose]
    except FileNotFoundError:
        _verify(out_dir, loose, schema)      # one error naming the first bad file, and how many more
        raise
    if target is None:
        target = max(CHUNK_BYTES, (sum(sizes) + sum(c.size for c in kept)) // MAX_CHUNKS)
    ways = min(ways, MAX_CHUNKS // 2, max(1, len(loose) // SHARE_SHARDS, sum(sizes) // SHARE_BYTES))
    cut = min(target, -(-sum(sizes) // ways) + max(sizes, default=0))     # so at most ``ways`` groups
    groups, first, size = [], None, 0
    for k, s in enumerate(loose):
        if first is not None and (s.index != loose[k - 1].index + 1 or size + sizes[k] > cut):
            groups.append((first, loose[k - 1].index, s.index == loose[k - 1].index + 1))
            first = None
        if first is None:
            first, size = s.index, 0
        size += sizes[k]
    if first is not None:
        groups.append((first, loose[-1].index, False))
    return kept, stale, groups, target


def _write_groups(out_dir, plan, groups, schema) -> list[Chunk]:
    """The chunks of ``groups`` (from _layout), written; a shard file that cannot be copied is one error."""
    try:
        return [write_chunk(out_dir, plan[a:b + 1], schema, full) for a, b, full in groups]
    except (_BadSource, FileNotFoundError):
        _verify(out_dir, [s for a, b, _ in groups for s in plan[a:b + 1]], schema)
        raise


def _held_shard_files(out_dir: str, chunks: list[Chunk]) -> list[str]:
    """Shard files that a chunk holds whole (every dataset of the file is in the chunk)."""
    d = os.path.join(out_dir, SHARDS_DIR)
    names = set(os.listdir(d)) if os.path.isdir(d) else set()
    out = []
    for c in chunks:
        here = [shard_filename(i) for i in range(c.first, c.last + 1) if shard_filename(i) in names]
        if here and _attr(c, "whole"):
            out += [os.path.join(d, n) for n in here]
    return out


def remove(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


# --------------------------------------------------------------------------- reading a shard's rows

class ShardView:
    """One shard's rows of a chunk file, read as its own file would be: ``view[name][()]``, ``view.attrs``."""

    def __init__(self, f: h5py.File, index: int):
        k = int(np.searchsorted(f["shard_index"][:], index))
        n = f["shard_n_docs"][:]
        self.rows = slice(int(n[:k].sum()), int(n[:k + 1].sum()))
        self.attrs = json.loads(f["shard_attrs"].asstr()[k])
        self._f = f

    def __contains__(self, name) -> bool:
        return name in self._f and name not in SHARD_INFO

    def __iter__(self):
        return (k for k in self._f if k not in SHARD_INFO)

    def __getitem__(self, name) -> np.ndarray:
        f, r = self._f, self.rows
        if name not in self:
            raise KeyError(name)
        ds = f[name]
        owner = ds.attrs.get("offsets")
        if owner is not None:                 # a flat column: the values its rows' offsets cut out
            o = f[owner]
            return ds[o[r.start]:o[r.stop]]
        if name in offsets_names_of(f):
            o = ds[r.start:r.stop + 1]
            return o - o[0]
        return ds[r]


def offsets_names_of(f: h5py.File) -> set[str]:
    return {str(f[k].attrs["offsets"]) for k in f if "offsets" in f[k].attrs}


@contextlib.contextmanager
def open_shard(out_dir: str, shard):
    """Shard ``shard``'s datasets and attributes wherever they are: its own file, or the chunk holding it."""
    path = shard_file(out_dir, shard.index)
    if os.path.exists(path):
        with h5py.File(path, "r") as f:
            yield f
        return
    chunk = next((c for c in cover(list_chunks(out_dir))[0] if c.first <= shard.index <= c.last), None)
    if chunk is None:
        raise HpcllmError(f"{out_dir}: shard {shard.index} is neither in {path} nor in a chunk; rerun the job")
    with h5py.File(chunk.path, "r") as f:
        yield ShardView(f, shard.index)


def shard_attrs(out_dir: str) -> list[dict]:
    """Every stored shard's file attributes (row_start, n_docs, source_path, ...), from files and chunks."""
    out = []
    d = os.path.join(out_dir, SHARDS_DIR)
    held = _held(cover(list_chunks(out_dir))[0])
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.startswith("shard-") and name.endswith(".h5"):
            with h5py.File(os.path.join(d, name), "r") as f:
                if int(f.attrs.get("shard_index", -1)) not in held:
                    out.append(dict(f.attrs))
    for c in cover(list_chunks(out_dir))[0]:
        with h5py.File(c.path, "r") as f:
            out += [json.loads(a) for a in f["shard_attrs"].asstr()[:]]
    return out
