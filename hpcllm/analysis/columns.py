"""Reading result directories column by column, in blocks of rows (bounded memory).

A results dir is ``OUT/results.h5`` (VDS over ``OUT/shards/*.h5``) plus
``OUT/manifest.json``.  Columns are classified once from the master's
datasets, so jobs that do not exist yet are read the same way:

* ``numeric``: 1-D int / float rows (``n_tokens``, ``perplexity``, ``label``, ...)
* ``enum``: a 1-D integer column with names, from an HDF5 enum dtype or a
  dataset attribute ``names`` (a JSON list indexed by code, or ``{code: name}``),
  and ``status`` (hpcllm.status.Status)
* ``string``: vlen strings (``doc_id``, ``text``)
* ``vector``: fixed-width rows ``[N, d]`` (``embedding``); quantised ones (embed --out-dtype int8 /
  binary) name it in an attribute ``quantization`` ("int8": codes times the row's scale, the column
  named by ``scale``; "ubinary": sign bits packed 8 to a byte, ``dim`` of them): ``dequantize``
* ``ragged``: per-row runs, either a flat dataset cut by an ``..._offsets``
  dataset of ``N + 1`` int64 (``token_logprobs`` + ``token_offsets``,
  ``output_ids`` + ``output_offsets``; a flat dataset names its offsets in an
  attribute ``offsets``, or shares the prefix before the first ``_``), or an
  older vlen dataset: both read as ``Ragged(values, offsets)``.

Several dirs of one corpus (score + classify) join by row: their manifests'
shard plans must be the same.  A name two dirs share (``n_tokens``) is the
first dir's; every column is also reachable as ``JOB.NAME`` (``score.n_tokens``).
Blocks follow ``row_blocks`` (few VDS sources per read, a fresh dataset handle
per read) and hold about ``BLOCK_BYTES`` of the requested columns.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.status import Status
from hpcllm.store.chunks import shard_attrs
from hpcllm.store.results import row_blocks

RESULTS_NAME = "results.h5"
MANIFEST_NAME = "manifest.json"
BLOCK_BYTES = 64 << 20
MIN_BLOCK, MAX_BLOCK = 1024, 1 << 18
NAME_ATTR = "names"         # the dataset attribute naming an enum column's codes (_enum_names)
STATUS_NAMES = [Status(c).name if c in Status._value2member_map_ else None for c in range(256)]


@dataclass
class Ragged:
    """Rows of varying length: row i is ``values[offsets[i]:offsets[i+1]]`` (offsets start at 0)."""
    values: np.ndarray
    offsets: np.ndarray

    def __len__(self):
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self) -> list:
        return np.split(self.values, self.offsets[1:-1]) if len(self) else []


@dataclass
class ColumnInfo:
    name: str                      # dataset name in its results.h5
    kind: str                      # numeric | enum | string | vector | ragged
    dtype: np.dtype
    width: int = 1                 # vector: d
    names: list | None = None      # enum: name of each code (None for unnamed codes)
    offsets: str | None = None     # ragged (flat): its offsets dataset
    row_bytes: float = 8.0         # average bytes per row, for block sizing
    quantization: str | None = None  # vector: "int8" or "ubinary" (embed --out-dtype), None for floats
    scale: str | None = None       # vector, int8: the column of each row's scale
    dim: int | None = None         # vector, ubinary: dimensions (bits) per row


def _enum_names(ds) -> list | None:
    """Name of each code (None for codes without one), from the HDF5 enum dtype or the ``names``
    attribute: a JSON list indexed by code, or a JSON object ``{code: name}``; None if neither."""
    mapping = h5py.check_enum_dtype(ds.dtype)            # {name: code}
    if mapping is not None:
        by_code = {int(code): str(name) for name, code in mapping.items()}
    elif NAME_ATTR in ds.attrs:
        v = ds.attrs[NAME_ATTR]
        where = f"{ds.file.filename}: dataset {ds.name.lstrip('/')}: attribute {NAME_ATTR}"
        try:
            v = json.loads(v) if isinstance(v, (str, bytes)) else [x.decode() if isinstance(x, bytes) else str(x)
                                                                   for x in v]
            by_code = {int(k): str(n) for k, n in v.items()} if isinstance(v, dict) else dict(enumerate(map(str, v)))
        except (ValueError, TypeError):
            raise HpcllmError(f"{where} is neither a JSON list of names nor a JSON object {{code: name}}") from None
    else:
        return None
    names = [None] * (max(by_code, default=-1) + 1)
    for code, name in by_code.items():
        names[code] = name
    return names


def _quantization(ds) -> dict:
    """A vector dataset's quantization attributes, as ColumnInfo fields."""
    a = {k: v.decode() if isinstance(v, bytes) else v for k, v in ds.attrs.items()}
    if "quantization" not in a:
        return {}
    return {"quantization": str(a["quantization"]), "scale": a.get("scale"),
            "dim": int(a["dim"]) if "dim" in a else None}


def dequantize(info: ColumnInfo, values: np.ndarray, scale=None) -> np.ndarray:
    """Rows of a vector column as float32: int8 codes times their row's ``scale`` (NaN for a row no
    document filled), packed sign bits as -1 / +1 per dimension, float rows as they are."""
    if info.quantization == "int8":
        return values.astype(np.float32) * np.asarray(scale, np.float32)[:, None]
    if info.quantization == "ubinary":
        return np.unpackbits(values, axis=-1, count=info.dim).astype(np.float32) * 2 - 1
    return np.asarray(values, np.float32)


def _offsets_of(f, name: str, n: int) -> str | None:
    ds = f[name]
    if "offsets" in ds.attrs:
        o = ds.attrs["offsets"]
        return o.decode() if isinstance(o, bytes) else str(o)
    guess = name.split("_")[0] + "_offsets"
    if guess in f and f[guess].shape == (n + 1,):
        return guess
    return None


def classify(f: h5py.File, n: int) -> dict[str, ColumnInfo]:
    """ColumnInfo of every per-row dataset of a master file with ``n`` rows."""
    out = {}
    for name, ds in f.items():
        if not isinstance(ds, h5py.Dataset) or ds.ndim == 0 or name.endswith("_offsets"):
            continue
        dt = ds.dtype
        if ds.shape[0] != n or (ds.ndim == 1 and dt.kind not in "OS" and "offsets" in ds.attrs):
            off = _offsets_of(f, name, n)
            if off is None or ds.ndim != 1:
                continue
            total = max(1, int(f[off][n]) if n else 0)
            out[name] = ColumnInfo(name, "ragged", dt, offsets=off, row_bytes=8 + dt.itemsize * total / max(n, 1))
        elif h5py.check_string_dtype(dt) is not None:
            out[name] = ColumnInfo(name, "string", dt, row_bytes=64)
        elif h5py.check_vlen_dtype(dt) is not None:
            out[name] = ColumnInfo(name, "ragged", np.dtype(h5py.check_vlen_dtype(dt)), row_bytes=1024)
        elif ds.ndim == 2:
            out[name] = ColumnInfo(name, "vector", dt, width=ds.shape[1], row_bytes=dt.itemsize * ds.shape[1],
                                   **_quantization(ds))
        elif ds.ndim == 1 and dt.kind in "iufb":
            names = STATUS_NAMES if name == "status" else _enum_names(ds)
            out[name] = ColumnInfo(name, "enum" if names and dt.kind in "iu" else "numeric", dt,
                                   names=names, row_bytes=dt.itemsize)
    return out


def _attrs(f) -> dict:
    out = {}
    for k, v in f.attrs.items():
        v = v.decode() if isinstance(v, bytes) else v
        if isinstance(v, str) and v[:1] in "[{":
            with contextlib.suppress(ValueError):
                v = json.loads(v)
        out[k] = v.item() if isinstance(v, np.generic) else v
    return out


@dataclass
class ResultsDir:
    path: str
    file: str
    attrs: dict
    n_rows: int
    columns: dict
    manifest: dict | None = field(default=None, repr=False)

    @property
    def job(self) -> str:
        return str(self.attrs.get("job", os.path.basename(os.path.normpath(self.path))))

    @property
    def sources(self) -> list:
        return list(self.attrs.get("sources") or [])

    def shards(self) -> list[dict]:
        """The shard plan: from the manifest, else from the shard files' attributes (kept in chunks)."""
        if self.manifest and self.manifest.get("shards"):
            return sorted(self.manifest["shards"], key=lambda s: s["row_start"])
        out = []
        for a in shard_attrs(self.path):
            out.append({"index": int(a.get("shard_index", len(out))), "path": a.get("source_path"),
                        "row_start": int(a["row_start"]), "n_docs": int(a["n_docs"]),
                        "line_start": int(a.get("line_start", 0)), "compressed": False})
        return sorted(out, key=lambda s: s["row_start"])


def open_dir(path: str) -> ResultsDir:
    """A results dir (or its results.h5) checked for being an hpcllm results file."""
    path = os.fspath(path)
    file = path if path.endswith(".h5") else os.path.join(path, RESULTS_NAME)
    d = os.path.dirname(os.path.abspath(file))
    if not os.path.exists(file):
        raise HpcllmError(f"{path}: no {RESULTS_NAME} (not a finished hpcllm results dir; rerun the job to finish it)")
    try:
        with h5py.File(file, "r") as f:
            attrs = _attrs(f)
            n = int(attrs.get("n_docs", f["status"].shape[0] if "status" in f else 0))
            cols = classify(f, n)
    except OSError as e:
        raise HpcllmError(f"{file}: not a readable HDF5 file ({e})") from None
    if "status" not in cols:
        raise HpcllmError(f"{file}: not an hpcllm results file (no status dataset)")
    manifest = None
    mpath = os.path.join(d, MANIFEST_NAME)
    if os.path.exists(mpath):
        try:
            with open(mpath, encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (OSError, ValueError) as e:
            raise HpcllmError(f"{mpath}: not a readable manifest ({e})") from None
    return ResultsDir(d, file, attrs, n, cols, manifest)


def _plan_key(d: ResultsDir) -> list:
    return [(s["row_start"], s["n_docs"], os.path.basename(str(s.get("path"))), s.get("line_start"))
            for s in d.shards()]


class Results:
    """One or more results dirs of the same corpus, joined by row; columns read in blocks."""

    def __init__(self, paths):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise HpcllmError("no results dir given")
        self.dirs = [open_dir(p) for p in paths]
        first = self.dirs[0]
        for d in self.dirs[1:]:
            if d.n_rows != first.n_rows or _plan_key(d) != _plan_key(first):
                raise HpcllmError(f"{d.path} and {first.path} are not results of the same corpus plan "
                                  f"({d.n_rows} and {first.n_rows} rows, or different shards); "
                                  "run both jobs over the same input with the same --shard-docs")
        self.n_rows = first.n_rows
        self.columns: dict[str, tuple[ResultsDir, ColumnInfo]] = {}
        jobs = [d.job for d in self.dirs]
        for i, d in enumerate(self.dirs):
            prefix = d.job if jobs.count(d.job) == 1 else f"{d.job}{i}"
            for name, info in d.columns.items():
                self.columns.setdefault(name, (d, info))
                self.columns[f"{prefix}.{name}"] = (d, info)

    @property
    def names(self) -> list[str]:
        """Column names without the JOB. aliases, in file order."""
        return [n for n in self.columns if "." not in n]

    def info(self, name: str) -> ColumnInfo:
        return self.column(name)[1]

    def column(self, name: str) -> tuple[ResultsDir, ColumnInfo]:
        if name not in self.columns:
            raise HpcllmError(f"unknown column {name!r} in {', '.join(d.path for d in self.dirs)} "
                              f"(columns: {', '.join(self.names)})")
        return self.columns[name]

    def block_rows(self, names) -> int:
        per_row = sum(self.info(n).row_bytes for n in names) or 8
        return int(np.clip(BLOCK_BYTES // per_row, MIN_BLOCK, MAX_BLOCK))

    def blocks(self, names, start: int = 0, stop: int | None = None, rows: int | None = None):
        """Yield ``(row slice, {name: array or Ragged})`` over rows [start, stop) in order."""
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        rows = rows or self.block_rows(names)
        first = self.dirs[0]
        with contextlib.ExitStack() as stack:
            files = {d.file: stack.enter_context(h5py.File(d.file, "r")) for d in self.dirs}
            cuts = {start, stop}
            for b in row_blocks(files[first.file], "status", max_rows=rows):
                cuts.update((b.start, b.stop))
            edges = sorted(c for c in cuts if start <= c <= stop)
            for a, b in zip(edges, edges[1:]):
                if b > a:
                    yield slice(a, b), {n: self._read(files, n, a, b) for n in names}

    def _read(self, files, name, a, b):
        d, info = self.column(name)
        f = files[d.file]
        if info.kind == "string":
            return f[info.name].asstr()[a:b]
        if info.kind != "ragged":
            return f[info.name][a:b]
        if info.offsets is None:            # older vlen layout: one object per row
            rows = f[info.name][a:b]
            lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            values = np.concatenate(list(rows)).astype(info.dtype) if len(rows) and offsets[-1] else \
                np.zeros(0, info.dtype)
            return Ragged(values, offsets)
        off = f[info.offsets][a:b + 1]
        return Ragged(f[info.name][off[0]:off[-1]] if off[-1] > off[0] else np.zeros(0, info.dtype), off - off[0])

    def read(self, names, start: int = 0, stop: int | None = None) -> dict:
        """Whole columns for rows [start, stop) (numpy arrays / Ragged), concatenated from blocks."""
        parts = {n: [] for n in names}
        for _, block in self.blocks(names, start, stop):
            for n in names:
                parts[n].append(block[n])
        return {n: _concat(v, self.info(n)) for n, v in parts.items()}


def _concat(parts: list, info: ColumnInfo):
    if info.kind == "ragged":
        if not parts:
            return Ragged(np.zeros(0, info.dtype), np.zeros(1, np.int64))
        ends = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + e for p, e in zip(parts, ends)])
        return Ragged(np.concatenate([p.values for p in parts]), offsets)
    return np.concatenate(parts) if parts else np.zeros(0, info.dtype)


def distinct_columns(res: Results) -> list[str]:
    """Every column once: its bare name where that resolves to it, else ``JOB.NAME``."""
    out = []
    for name, (d, info) in res.columns.items():
        if "." not in name:
            out.append(name)
    for name, (d, info) in res.columns.items():
        if "." in name:
            bare = name.split(".", 1)[1]
            if res.columns[bare][0] is not d:
                out.append(name)
    return out
