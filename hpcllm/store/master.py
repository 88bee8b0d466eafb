"""The master ``results.h5``: one virtual dataset per column over the chunk files.

``build_master`` consolidates a job's finished shard files into chunks
(hpcllm.store.chunks), then writes ``results.h5`` over them and only then
deletes what the new master no longer points at.  The layout and the reasons
for it: hpcllm.store.results.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

from hpcllm import __version__
from hpcllm.corpus.plan import Shard
from hpcllm.errors import HpcllmError
from hpcllm.status import named_counts
from hpcllm.store import chunks as chunk_files
from hpcllm.store.atomic import atomic_h5
from hpcllm.store.layout import CHUNKS_DIR, RESULTS_NAME
from hpcllm.store.results import (RESULTS_FORMAT, RESULTS_VERSION, STRING, Column, set_attrs, offsets_names)


def _write_offsets(f: h5py.File, name: str, chunks, n_rows: int) -> list[tuple]:
    """The master's ``name``: every chunk's offsets shifted by the values before it (a plain dataset).

    Returns each chunk's (start, length) in the flat columns these offsets cut.
    """
    ds = f.create_dataset(name, shape=(n_rows + 1,), dtype=np.int64, compression="gzip",
                          compression_opts=4, shuffle=True)
    ds[0], base, spans = 0, 0, []
    for c in chunks:
        with h5py.File(c.path, "r") as src:
            start, n = int(src.attrs["row_start"]), int(src.attrs["n_docs"])
            for a in range(0, n, 1 << 20):      # in blocks: memory stays bounded
                b = min(n, a + (1 << 20))
                ds[start + a + 1:start + b + 1] = src[name][a + 1:b + 1] + base
            end = int(src[name][-1])
        spans.append((base, end))
        base += end
    return spans


def _virtual_column(f: h5py.File, col: Column, chunks, rows: list[tuple], spans: list[tuple] | None) -> None:
    """One VDS joining the chunks' ``col``: rows at each chunk's row_start, or flat values at its span."""
    spans = rows if spans is None else spans
    shape = (sum(n for _, n in spans),) + tuple(col.shape_tail)
    fill = None if col.is_object else np.array(col.fill, dtype=col.np_dtype)
    dtype = STRING if col.is_string else col.np_dtype
    if shape[0] == 0:   # nothing to map; an empty plain dataset keeps the schema visible
        f.create_dataset(col.name, shape=shape, dtype=dtype)
        return
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    for c, (start, n) in zip(chunks, spans):
        if n:
            src = h5py.VirtualSource(os.path.join(CHUNKS_DIR, os.path.basename(c.path)), col.name,
                                     shape=(n,) + tuple(col.shape_tail))
            layout[start:start + n] = src
    f.create_virtual_dataset(col.name, layout, fillvalue=fill)


def _chunk_rows(chunks, plan: list[Shard]) -> tuple[list[tuple], np.ndarray]:
    """Each chunk's (row_start, n_docs), checked against the plan, and the status counts of all of them."""
    rows, counts = [], np.zeros(256, np.int64)
    for c in chunks:
        with h5py.File(c.path, "r") as f:
            start, n = int(f.attrs["row_start"]), int(f.attrs["n_docs"])
            counts += f.attrs["status_counts"]
        want = sum(s.n_docs for s in plan[c.first:c.last + 1])
        if start != plan[c.first].row_start or n != want:
            raise HpcllmError(f"{c.path} holds rows {start}..{start + n}, the plan's shards {c.first}..{c.last} "
                              f"are rows {plan[c.first].row_start}..{plan[c.first].row_start + want}; "
                              "use a new --output")
        rows.append((start, n))
    return rows, counts


def _sources(plan: list[Shard], inputs: list[str] | None) -> list[str | None]:
    if inputs is not None:
        return list(inputs)
    n = max((s.file_index for s in plan), default=-1) + 1
    out: list[str | None] = [None] * n
    for s in plan:
        out[s.file_index] = s.path
    return out


def consolidate(out_dir: str, plan: list[Shard], schema: tuple[Column, ...], chunk_mb: float | None = None,
                comm=None):
    """The shard files copied into chunks of ``chunk_mb`` (the job's --chunk-mb; None: the default
    size), shared by the ranks of ``comm``: a collective, run by every rank before rank 0's
    build_master, which then finds them done.  Rank 0 gets (chunks, files to delete once the master
    no longer points at them), the others None."""
    return chunk_files.consolidate(out_dir, sorted(plan, key=lambda s: s.row_start), schema,
                                   None if chunk_mb is None else int(chunk_mb * 2**20), comm)


def build_master(out_dir: str, plan: list[Shard], schema: tuple[Column, ...],
                 attrs: dict | None = None, inputs: list[str] | None = None) -> str:
    """Consolidate the shard files into chunks (hpcllm.store.chunks), then write ``<out>/results.h5``
    over them (one VDS per column) and delete what it no longer needs.

    ``attrs`` (model, model hash, job config, world layout, timings, ...) go on
    the root; non-scalars are stored as JSON.  The root also gets the status
    counts and the list of input files (``sources``, indexed by the ``source`` column).
    The chunks' size is the job's ``--chunk-mb`` where ``attrs["config"]`` has it.
    """
    if inputs is None:
        inputs = getattr(plan, "inputs", None)       # a Plan knows its input files
    plan = sorted(plan, key=lambda s: s.row_start)
    n_rows = sum(s.n_docs for s in plan)
    expect = 0
    for s in plan:
        if s.row_start != expect:
            raise ValueError(f"plan rows are not contiguous at shard {s.index}")
        expect += s.n_docs
    chunks, obsolete = consolidate(out_dir, plan, schema, ((attrs or {}).get("config") or {}).get("chunk_mb"))
    rows, counts = _chunk_rows(chunks, plan)
    path = os.path.join(out_dir, RESULTS_NAME)
    with atomic_h5(path) as f:
        spans = {name: _write_offsets(f, name, chunks, n_rows) for name in offsets_names(schema)}
        for col in schema:
            _virtual_column(f, col, chunks, rows, spans.get(col.offsets))
            set_attrs(f[col.name], col.attrs)
        f.attrs.update({"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "n_docs": n_rows,
                        "n_shards": len(plan), "n_chunks": len(chunks), "code_version": __version__})
        set_attrs(f, attrs)
        f.attrs["status_counts"] = json.dumps(named_counts(counts))
        f.attrs["sources"] = json.dumps(_sources(plan, inputs))
    chunk_files.remove(obsolete)                     # only now: the master no longer points at them
    return path
