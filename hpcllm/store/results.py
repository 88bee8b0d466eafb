"""Result files: the HDF5 schema, per-shard files, and reading the master ``results.h5``
(written by hpcllm.store.master over the chunks of hpcllm.store.chunks).

Layout of an output directory::

    out/manifest.json               the plan (hpcllm.store.manifest)
    out/shards/shard-00012.h5       one file per corpus shard, rows in input order, while the job runs
    out/chunks/chunk-00000-00957.h5 finished shards consolidated into few large files (hpcllm.store.chunks)
    out/results.h5                  one virtual dataset (VDS) per column joining
                                    all chunks in input order

Decisions, in one place:

* Every column has a sentinel fill value (NaN embeddings, n_tokens -1, status
  MISSING=255, line -1, source -1, doc_id "").  A VDS whose source file is
  missing reads as fill without any error, so ``store.master.build_master`` checks
  every shard file and refuses to build over a hole; a reader that still sees
  MISSING knows a source went away later.
* ``doc_id`` is a variable-length UTF-8 string in every file.  HDF5 virtual
  datasets map vlen strings fine (checked with h5py 3.16 / HDF5 2.0), so ids
  of any length survive; fixed-length bytes would truncate long ids.
* Ragged per-document values (score's per-token log-probabilities,
  generate's output ids) are a flat dataset plus an offsets dataset of
  ``n_docs + 1`` int64 (row i is ``flat[offsets[i]:offsets[i+1]]``), as token
  shards are: one flat VDS in the master, and the master's offsets are a
  plain dataset (each shard's offsets shifted by the values before it).
  Several flat columns may share one offsets column.
* Integer columns are gzip(4)+shuffle compressed (portable: every HDF5 build
  has it; shuffle makes small ints compress well).  Float columns (embeddings)
  are stored uncompressed: they barely compress and the write is on the
  critical path.
* VDS source paths are relative (``chunks/chunk-00000-00957.h5``); HDF5
  resolves them against the master file's directory, so the output dir can be moved.
* HDF5 opens every source file one VDS read touches at the same time, and a
  source it cannot open (past ``ulimit -n``) silently reads as fill: measured
  with 1500 shard files and a limit of 256 open files, 2500 of 3000 rows of
  ``f["status"][:]`` came back as 255.  So the master never points at shard
  files: they are consolidated into few chunks first (hpcllm.store.chunks),
  and a plain ``h5py.File(...)["status"][:]`` opens only those.  Our own
  readers still read in blocks of rows (``read_dataset``, ``row_blocks``):
  memory stays bounded, and a master someone built over many sources reads right.
* Files are written through ``hpcllm.store.atomic``: a final name always
  holds a complete file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from hpcllm import __version__
from hpcllm.corpus.plan import Shard
from hpcllm.corpus.readers import Docs
from hpcllm.status import Status
from hpcllm.store.atomic import atomic_h5
from hpcllm.store.layout import shard_file

RESULTS_FORMAT = "hpcllm-results"
RESULTS_VERSION = 1
STRING = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Column:
    name: str
    dtype: Any                     # a numpy dtype, or STRING
    shape_tail: tuple = ()         # per-row shape, e.g. (384,) for an embedding
    fill: Any = None               # what a row reads as when no source covers it
    offsets: str | None = None     # ragged: a flat column whose rows are cut by this offsets column
    # the dataset's attributes in results.h5, e.g. {"names": ...} (JSON where not a scalar or string):
    # what a reader needs to read the column, such as the name of each code or class
    attrs: dict = field(default_factory=dict, hash=False)

    @property
    def is_string(self) -> bool:
        return h5py.check_string_dtype(np.dtype(self.dtype)) is not None

    @property
    def is_object(self) -> bool:
        """Variable-length rows (strings, or h5py.vlen_dtype arrays such as per-token values)."""
        return self.np_dtype.kind == "O"

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


def ragged(name: str, dtype, offsets: str, fill=np.nan) -> Column:
    """A flat column of per-document runs cut by the ``offsets`` column (n_docs + 1 int64)."""
    return Column(name, np.dtype(dtype), (), fill, offsets=offsets)


def offsets_names(schema) -> list[str]:
    """The offsets columns the ragged columns of ``schema`` use, in schema order."""
    return list(dict.fromkeys(c.offsets for c in schema if c.offsets))


def ragged_rows(values: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-document arrays -> (flat values, offsets [n + 1] int64)."""
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.concatenate(values).astype(dtype, copy=False) if len(values) else np.zeros(0, dtype)
    return flat, offsets


# Columns every job writes: the provenance and outcome of each input line.
BASE_COLUMNS = (
    Column("status", np.uint8, (), int(Status.MISSING)),
    Column("doc_id", STRING, (), ""),
    Column("line", np.int64, (), -1),       # 1-based line in the source file
    Column("source", np.int32, (), -1),     # index into the root attribute "sources"
)
# Tokens fed to the model per document (model jobs; the executor fills it).
N_TOKENS = Column("n_tokens", np.int32, (), -1)


def base_columns(shard: Shard, docs: Docs) -> dict[str, np.ndarray]:
    """The BASE_COLUMNS values of a shard read by hpcllm.corpus.readers.read_docs.

    ``status`` is a copy: the job updates it (e.g. TRUNCATED after tokenizing).
    """
    return {"status": docs.status.copy(),
            "doc_id": np.array(docs.doc_id, dtype=object),
            "line": docs.line,
            "source": np.full(len(docs), shard.file_index, dtype=np.int32)}


# --------------------------------------------------------------------------- writing

def _attr_value(v):
    """HDF5 attributes hold scalars and strings; anything structured is stored as JSON."""
    if isinstance(v, (str, bytes, int, float, bool, np.generic)):
        return v
    return json.dumps(v, sort_keys=True, default=str)


def set_attrs(obj, attrs: dict | None) -> None:
    for k, v in (attrs or {}).items():
        obj.attrs[k] = _attr_value(v)


def compressed(dtype) -> bool:
    """Integer columns are gzip+shuffle compressed, the others (floats, strings) stored as they are."""
    return np.issubdtype(np.dtype(dtype), np.integer)


def write_column(f: h5py.File, col: Column | None, name: str, data) -> None:
    """One dataset of a shard file, with the column's dtype and the compression rules above."""
    if (col.is_object if col is not None else np.asarray(data).dtype == object):
        f.create_dataset(name, data=np.asarray(data, dtype=object), dtype=col.dtype if col is not None else STRING)
        return
    arr = np.ascontiguousarray(data, dtype=col.np_dtype if col is not None else None)
    if compressed(arr.dtype) and arr.size:
        f.create_dataset(name, data=arr, compression="gzip", compression_opts=4, shuffle=True)
    else:
        f.create_dataset(name, data=arr)


def _check_shapes(shard: Shard, columns: dict, by_name: dict) -> None:
    """Every row column has n_docs rows; every offsets column is n_docs + 1 and fits its flat columns."""
    flat_of = {}
    for c in by_name.values():
        if c.offsets:
            flat_of.setdefault(c.offsets, []).append(c.name)
    for name, data in columns.items():
        col = by_name.get(name)
        if name in flat_of:
            shape = (shard.n_docs + 1,)
        elif col is not None and col.offsets:
            continue                       # checked with its offsets
        else:
            shape = (shard.n_docs,) + (col.shape_tail if col is not None else np.shape(data)[1:])
        if np.shape(data) != shape:
            raise ValueError(f"shard {shard.index}: column {name} has shape {np.shape(data)}, expected {shape}")
    for off, flats in flat_of.items():
        o = np.asarray(columns[off])
        if o[0] != 0 or np.any(np.diff(o) < 0):
            raise ValueError(f"shard {shard.index}: {off} must start at 0 and never decrease")
        for name in flats:
            if len(columns[name]) != o[-1]:
                raise ValueError(f"shard {shard.index}: column {name} has {len(columns[name])} values, "
                                 f"{off} ends at {o[-1]}")


def write_shard(out_dir: str, shard: Shard, columns: dict[str, np.ndarray],
                attrs: dict | None = None, schema: tuple[Column, ...] | None = None) -> str:
    """Write ``<out>/shards/shard-NNNNN.h5`` atomically; returns its path.

    Every column must have ``shard.n_docs`` rows in input order (ragged
    columns: their flat values, and their offsets column ``n_docs + 1``).
    With a schema, the columns must be exactly the schema's plus its offsets
    columns, and are cast to the schema's dtypes.
    """
    by_name = {c.name: c for c in schema} if schema else {}
    if schema:
        want = set(by_name) | set(offsets_names(schema))
        if set(columns) != want:
            raise ValueError(f"shard {shard.index}: columns {sorted(columns)} != schema {sorted(want)}")
    _check_shapes(shard, columns, by_name)
    offsets_col = {n: Column(n, np.int64) for n in offsets_names(schema or ())}
    path = shard_file(out_dir, shard.index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_h5(path) as f:
        for name, data in columns.items():
            write_column(f, by_name.get(name) or offsets_col.get(name), name, data)
        f.attrs.update({"format": RESULTS_FORMAT + "-shard", "version": RESULTS_VERSION,
                        "shard_index": shard.index, "row_start": shard.row_start,
                        "n_docs": shard.n_docs, "source_path": shard.path,
                        "line_start": shard.line_start, "code_version": __version__})
        set_attrs(f, attrs)
    return path


# --------------------------------------------------------------------------- the master file

def check_source(path: str, shard: Shard, schema) -> str | None:
    """Why a shard file cannot be consolidated into the master's chunks, or None if it can."""
    if not os.path.exists(path):
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            return check_file(f, shard, schema)
    except OSError as e:
        return f"is not a readable HDF5 file ({e})"


def check_file(f, shard: Shard, schema) -> str | None:
    """Why the open shard file ``f`` (or its datasets by name) does not hold ``shard``'s rows of ``schema``,
    or None."""
    ends = {}
    for name in offsets_names(schema):
        if name not in f or f[name].shape != (shard.n_docs + 1,):
            return f"has no dataset {name} of {shard.n_docs + 1} offsets"
        ends[name] = int(f[name][-1])
    for col in schema:
        if col.name not in f:
            return f"has no dataset {col.name}"
        ds = f[col.name]
        want = (ends[col.offsets],) if col.offsets else (shard.n_docs,) + tuple(col.shape_tail)
        if ds.shape != want:
            return f"dataset {col.name} has shape {ds.shape}, expected {want}"
        ok = (h5py.check_string_dtype(ds.dtype) is not None) if col.is_string else ds.dtype == col.np_dtype
        if not ok:
            return f"dataset {col.name} has dtype {ds.dtype}, expected {col.np_dtype}"
    return None


# --------------------------------------------------------------------------- reading

def row_blocks(f: h5py.File, name: str, max_sources: int = 64, max_rows: int = 1 << 22) -> list[slice]:
    """Row slices covering dataset ``name`` such that each read touches at most
    ``max_sources`` VDS source files (see the module notes) and ``max_rows`` rows."""
    ds = f[name]
    n = ds.shape[0] if ds.ndim else 0
    cuts = {0, n}
    if ds.is_virtual:
        starts = sorted(int(m.vspace.get_select_bounds()[0][0]) for m in ds.virtual_sources())
        cuts.update(starts[::max_sources])
    cuts.update(range(0, n, max_rows))
    edges = sorted(c for c in cuts if 0 <= c <= n)
    return [slice(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def read_dataset(f: h5py.File, name: str, max_sources: int = 64) -> np.ndarray:
    """The whole dataset ``name`` of ``f`` (a master VDS or plain), read in safe blocks.

    HDF5 keeps every source a VDS has read open while any handle to that
    dataset is open (handles share that state), so hold no handle to it while
    calling this: each block goes through a fresh handle dropped at once.
    """
    blocks = row_blocks(f, name, max_sources)
    if not blocks:
        return f[name][()]
    return np.concatenate([f[name][b] for b in blocks])
