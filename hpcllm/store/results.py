"""Result files: the HDF5 schema, per-shard files and the master ``results.h5``.

Layout of an output directory::

    out/manifest.json               the plan (hpcllm.corpus.plan)
    out/shards/shard-00012.h5       one file per corpus shard, rows in input order
    out/results.h5                  one virtual dataset (VDS) per column joining
                                    all shard files in input order

Decisions, in one place:

* Every column has a sentinel fill value (NaN embeddings, n_tokens -1, status
  MISSING=255, line -1, source -1, doc_id "").  A VDS whose source file is
  missing reads as fill without any error, so ``build_master`` first checks
  every source and refuses to build over a hole; a reader that still sees
  MISSING knows a source went away later.
* ``doc_id`` is a variable-length UTF-8 string in every file.  HDF5 virtual
  datasets map vlen strings fine (checked with h5py 3.16 / HDF5 2.0), so ids
  of any length survive; fixed-length bytes would truncate long ids.
* Integer columns are gzip(4)+shuffle compressed (portable: every HDF5 build
  has it; shuffle makes small ints compress well).  Float columns (embeddings)
  are stored uncompressed: they barely compress and the write is on the
  critical path.
* VDS source paths are relative (``shards/shard-00012.h5``); HDF5 resolves
  them against the master file's directory, so the output dir can be moved.
* HDF5 opens every source file one VDS read touches at the same time, and a
  source it cannot open (past ``ulimit -n``) silently reads as fill: measured
  with 1500 shard files and a limit of 256 open files, 2500 of 3000 rows of
  ``f["status"][:]`` came back as 255.  A dataset handle also keeps the
  sources it has read open until it is closed.  So read big masters in blocks
  of rows that span few sources, each through a fresh handle
  (``read_dataset(f, name)``), or raise the limit (``raise_open_file_limit``); a
  MISSING status always flags such a row.
* Files are written under a temporary name in the same directory and
  ``os.replace``d into place: a final name always holds a complete file.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from hpcllm import __version__
from hpcllm.corpus.plan import Shard, shard_file, shard_filename
from hpcllm.corpus.readers import Docs
from hpcllm.errors import HpcllmError
from hpcllm.status import Status

RESULTS_NAME = "results.h5"
RESULTS_FORMAT = "hpcllm-results"
RESULTS_VERSION = 1
STRING = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Column:
    name: str
    dtype: Any                     # a numpy dtype, or STRING
    shape_tail: tuple = ()         # per-row shape, e.g. (384,) for an embedding
    fill: Any = None               # what a row reads as when no source covers it

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


# Columns every job writes: the provenance and outcome of each input line.
BASE_COLUMNS = (
    Column("status", np.uint8, (), int(Status.MISSING)),
    Column("doc_id", STRING, (), ""),
    Column("line", np.int64, (), -1),       # 1-based line in the source file
    Column("source", np.int32, (), -1),     # index into the root attribute "sources"
)


def embed_schema(dim: int, dtype="float32") -> tuple[Column, ...]:
    """Columns of an embed job: embedding [N, dim] (float32/float16), n_tokens, base columns."""
    if np.dtype(dtype) not in (np.float32, np.float16):
        raise HpcllmError(f"embedding dtype must be float32 or float16, got {dtype}")
    return (Column("embedding", np.dtype(dtype), (int(dim),), np.nan),
            Column("n_tokens", np.int32, (), -1)) + BASE_COLUMNS


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


def _set_attrs(obj, attrs: dict | None) -> None:
    for k, v in (attrs or {}).items():
        obj.attrs[k] = _attr_value(v)


@contextlib.contextmanager
def _atomic_h5(final: str):
    """Open ``final`` for writing under a temporary name; rename into place on success."""
    d, name = os.path.split(final)
    tmp = os.path.join(d, f".{name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)           # data on disk before the name says "complete"
        finally:
            os.close(fd)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_column(f: h5py.File, col: Column | None, name: str, data) -> None:
    if (col.is_object if col is not None else np.asarray(data).dtype == object):
        f.create_dataset(name, data=np.asarray(data, dtype=object), dtype=col.dtype if col is not None else STRING)
        return
    arr = np.ascontiguousarray(data, dtype=col.np_dtype if col is not None else None)
    if np.issubdtype(arr.dtype, np.integer) and arr.size:
        f.create_dataset(name, data=arr, compression="gzip", compression_opts=4, shuffle=True)
    else:
        f.create_dataset(name, data=arr)


def write_shard(out_dir: str, shard: Shard, columns: dict[str, np.ndarray],
                attrs: dict | None = None, schema: tuple[Column, ...] | None = None) -> str:
    """Write ``<out>/shards/shard-NNNNN.h5`` atomically; returns its path.

    Every column must have ``shard.n_docs`` rows in input order.  With a
    schema, the columns must be exactly the schema's and are cast to its dtypes.
    """
    by_name = {c.name: c for c in schema} if schema else {}
    if schema and set(columns) != set(by_name):
        raise ValueError(f"shard {shard.index}: columns {sorted(columns)} != schema {sorted(by_name)}")
    for name, data in columns.items():
        shape = (shard.n_docs,) + (by_name[name].shape_tail if name in by_name else np.shape(data)[1:])
        if np.shape(data) != shape:
            raise ValueError(f"shard {shard.index}: column {name} has shape {np.shape(data)}, expected {shape}")
    path = shard_file(out_dir, shard.index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _atomic_h5(path) as f:
        for name, data in columns.items():
            _write_column(f, by_name.get(name), name, data)
        f.attrs.update({"format": RESULTS_FORMAT + "-shard", "version": RESULTS_VERSION,
                        "shard_index": shard.index, "row_start": shard.row_start,
                        "n_docs": shard.n_docs, "source_path": shard.path,
                        "line_start": shard.line_start, "code_version": __version__})
        _set_attrs(f, attrs)
    return path


# --------------------------------------------------------------------------- the master file

def status_counts(status: np.ndarray) -> dict[str, int]:
    """Documents per status name (only statuses that occur), e.g. {"OK": 998, "BAD_JSON": 2}."""
    return _named_counts(np.bincount(np.asarray(status, dtype=np.uint8).ravel(), minlength=256))


def _named_counts(counts: np.ndarray) -> dict[str, int]:
    out = {}
    for code in np.flatnonzero(counts):
        name = Status(code).name if code in Status._value2member_map_ else f"code_{code}"
        out[name] = int(counts[code])
    return out


def _check_source(path: str, shard: Shard, schema) -> str | None:
    """Why a shard file cannot serve as a VDS source, or None if it can."""
    if not os.path.exists(path):
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            for col in schema:
                if col.name not in f:
                    return f"has no dataset {col.name}"
                ds, want = f[col.name], (shard.n_docs,) + tuple(col.shape_tail)
                if ds.shape != want:
                    return f"dataset {col.name} has shape {ds.shape}, expected {want}"
                ok = (h5py.check_string_dtype(ds.dtype) is not None) if col.is_string else ds.dtype == col.np_dtype
                if not ok:
                    return f"dataset {col.name} has dtype {ds.dtype}, expected {col.np_dtype}"
    except OSError as e:
        return f"is not a readable HDF5 file ({e})"
    return None


def _verify_sources(out_dir: str, plan: list[Shard], schema) -> np.ndarray:
    """Check every shard file; return the status counts over all of them (uint64[256])."""
    bad = []
    for s in plan:
        why = _check_source(shard_file(out_dir, s.index), s, schema)
        if why:
            bad.append(f"{shard_file(out_dir, s.index)} {why}")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise HpcllmError(f"cannot build {os.path.join(out_dir, RESULTS_NAME)}: {bad[0]}{more}; "
                          "rerun the job to complete the missing shards")
    counts = np.zeros(256, np.int64)
    if any(c.name == "status" for c in schema):
        for s in plan:
            with h5py.File(shard_file(out_dir, s.index), "r") as f:
                counts += np.bincount(f["status"][:], minlength=256)
    return counts


def _sources(plan: list[Shard], inputs: list[str] | None) -> list[str | None]:
    if inputs is not None:
        return list(inputs)
    n = max((s.file_index for s in plan), default=-1) + 1
    out: list[str | None] = [None] * n
    for s in plan:
        out[s.file_index] = s.path
    return out


def _virtual_column(f: h5py.File, col: Column, plan: list[Shard], n_rows: int) -> None:
    shape = (n_rows,) + tuple(col.shape_tail)
    fill = None if col.is_object else np.array(col.fill, dtype=col.np_dtype)
    if n_rows == 0:   # nothing to map; an empty plain dataset keeps the schema visible
        f.create_dataset(col.name, shape=shape, dtype=STRING if col.is_string else col.np_dtype)
        return
    layout = h5py.VirtualLayout(shape=shape, dtype=STRING if col.is_string else col.np_dtype)
    for s in plan:
        src = h5py.VirtualSource(os.path.join("shards", shard_filename(s.index)), col.name,
                                 shape=(s.n_docs,) + tuple(col.shape_tail))
        layout[s.row_start:s.row_start + s.n_docs] = src
    f.create_virtual_dataset(col.name, layout, fillvalue=fill)


def build_master(out_dir: str, plan: list[Shard], schema: tuple[Column, ...],
                 attrs: dict | None = None, inputs: list[str] | None = None) -> str:
    """Verify all shard files, then write ``<out>/results.h5`` (one VDS per column).

    ``attrs`` (model, model hash, job config, world layout, timings, ...) go on
    the root; non-scalars are stored as JSON.  The root also gets the status
    counts computed from the shard files and the list of input files
    (``sources``, indexed by the ``source`` column).
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
    counts = _verify_sources(out_dir, plan, schema)
    path = os.path.join(out_dir, RESULTS_NAME)
    with _atomic_h5(path) as f:
        for col in schema:
            _virtual_column(f, col, plan, n_rows)
        f.attrs.update({"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "n_docs": n_rows,
                        "n_shards": len(plan), "code_version": __version__})
        _set_attrs(f, attrs)
        f.attrs["status_counts"] = json.dumps(_named_counts(counts))
        f.attrs["sources"] = json.dumps(_sources(plan, inputs))
    return path


# --------------------------------------------------------------------------- reading

def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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


# --------------------------------------------------------------------------- inspection

def _short(v, width: int = 160) -> str:
    s = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return s if len(s) <= width else s[:width - 3] + "..."


def summarize(path: str) -> str:
    """A human-readable summary of a result file (used by ``hpcllm inspect``)."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise HpcllmError(f"cannot open {path} as HDF5: {e}") from None
    lines = [f"{path}"]
    with f:
        lines.append("attributes:")
        lines += [f"  {k} = {_short(f.attrs[k])}" for k in sorted(f.attrs)]
        lines.append("datasets:")

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                kind = (f"virtual, {len(obj.virtual_sources())} sources" if obj.is_virtual
                        else f"compression={obj.compression}")
                lines.append(f"  {name}  shape={obj.shape}  dtype={obj.dtype}  ({kind})")
        f.visititems(visit)
        if "status" in f and f["status"].ndim == 1:
            counts = np.zeros(256, np.int64)
            for rows in row_blocks(f, "status"):
                counts += np.bincount(f["status"][rows], minlength=256)
            lines.append("status counts: " + json.dumps(_named_counts(counts)))
    return "\n".join(lines)
