"""Columnar inputs: Parquet files and Arrow IPC files (Hugging Face ``datasets.save_to_disk``), via pyarrow.

A columnar file is cut into *units*, its row groups (Parquet) or record
batches (Arrow), whose row counts come from metadata alone: planning never
reads a value.  The planner cuts a large unit into row ranges and packs small
consecutive ones into one shard (hpcllm.corpus.plan), so a shard is a row
range ``[line_start, line_start + n_docs)`` of one file.  Reading a shard
reads only the units it overlaps and only the columns the job needs: the text
field, the id field (or ``id`` where the file has that column) and any extra
field a job asks for (generate's ``--messages-field``).  A dotted name
(``meta.title``) is a path into struct columns unless the file has a
top-level column of that exact name.

Every row is one document with a status, as a JSONL line is: a null or
non-string text is MISSING_FIELD, invalid UTF-8 in a binary text column is
BAD_UTF8, a text over ``max_doc_bytes`` is TOO_LONG.  ``line`` is the 1-based
row number within the file, and a row without an id is ``<file>:<row>``.

A ``datasets.save_to_disk`` directory (``state.json`` + ``dataset_info.json``
+ ``data-0000k-of-0000N.arrow`` Arrow IPC stream files) is read as its data
files in ``state.json`` order, without importing ``datasets``.  Arrow files
are memory-mapped, so reading a shard's rows copies only those rows' values.
"""

from __future__ import annotations

import json
import os

import numpy as np

from hpcllm.errors import HpcllmError

COLUMNAR_EXTS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow"}
DATASET_FILES = ("state.json", "dataset_info.json")


def _pa():
    try:
        import pyarrow
        import pyarrow.parquet   # noqa: F401  (registers pyarrow.parquet)
    except ImportError:
        raise HpcllmError("Parquet / Arrow input needs pyarrow: pip install pyarrow") from None
    return pyarrow


def columnar_kind(path: str) -> str | None:
    """"parquet", "arrow" or None, from the file name."""
    for ext, kind in COLUMNAR_EXTS.items():
        if path.endswith(ext):
            return kind
    return None


def columnar_errors() -> tuple:
    """Exceptions a damaged or unreadable columnar file raises."""
    return (_pa().ArrowException, OSError)


def dataset_files(directory: str) -> list[str] | None:
    """The data files of a ``datasets.save_to_disk`` directory in their order, or None if it is not one."""
    if not all(os.path.isfile(os.path.join(directory, f)) for f in DATASET_FILES):
        return None
    state_path = os.path.join(directory, "state.json")
    try:
        with open(state_path) as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise HpcllmError(f"{state_path}: not a datasets state.json ({e!r}); expected "
                          "'_data_files': [{'filename': ...}]") from None
    return [os.path.join(directory, n) for n in names]


# --------------------------------------------------------------------------- files

def _open_arrow(path: str):
    """The whole table of an Arrow IPC file (stream or file format), memory-mapped (no copy)."""
    pa = _pa()
    source = pa.memory_map(path, "r")
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def unit_rows(path: str) -> list[int]:
    """Rows of each unit (Parquet row group / Arrow record batch), from metadata."""
    if columnar_kind(path) == "parquet":
        meta = _pa().parquet.ParquetFile(path).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return [len(b) for b in _open_arrow(path).to_batches()]


def _column_names(schema, fields) -> tuple[list[str], dict]:
    """The column specs to read and, per field, its path (or None where the file has no such field)."""
    names = set(schema.names)
    read, paths = [], {}
    for field in dict.fromkeys(f for f in fields if f):
        if field in names:
            path = [field]
        else:
            path = field.split(".")
            t = schema.field(path[0]).type if path[0] in names else None
            for p in path[1:]:
                t = t.field(p).type if t is not None and _pa().types.is_struct(t) and t.get_field_index(p) >= 0 else None
            if t is None:
                paths[field] = None
                continue
        paths[field] = path
        read.append(field)
    return read, paths


class ColumnarFile:
    """One open columnar file; ``rows(start, n, fields)`` -> {field: list of Python values or None}."""

    def __init__(self, path: str):
        self.path, self.kind = path, columnar_kind(path)
        pa = _pa()
        if self.kind == "parquet":
            self._pf = pa.parquet.ParquetFile(path)
            self.schema = self._pf.schema_arrow
            counts = [self._pf.metadata.row_group(i).num_rows for i in range(self._pf.metadata.num_row_groups)]
        else:
            self._table = _open_arrow(path)
            self.schema = self._table.schema
            counts = [len(b) for b in self._table.to_batches()]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._cache = None      # (row groups, columns, table): a split row group is read once

    @property
    def n_rows(self) -> int:
        return int(self.starts[-1])

    def table(self, start: int, n: int, columns=None):
        """Rows [start, start + n) as a pyarrow Table (all columns when ``columns`` is None)."""
        if self.kind != "parquet":
            t = self._table if columns is None else self._table.select(columns)
            return t.slice(start, n)
        first = int(np.searchsorted(self.starts, start, "right")) - 1
        last = int(np.searchsorted(self.starts, start + n, "left"))
        groups = list(range(first, max(last, first + 1)))
        key = (groups, columns)
        if self._cache is None or self._cache[:2] != key:
            self._cache = (groups, columns, self._pf.read_row_groups(groups, columns=columns))
        return self._cache[2].slice(start - int(self.starts[first]), n)

    def fields(self, start: int, n: int, fields) -> dict:
        """{field: pyarrow Array or None (field absent)} for rows [start, start + n); dotted paths resolved."""
        pa = _pa()
        read, paths = _column_names(self.schema, fields)
        t = self.table(start, n, read)
        out = {}
        for field, path in paths.items():
            if path is None:
                out[field] = None
                continue
            arr = t.column(path[0]).combine_chunks()
            for p in path[1:]:
                arr = pa.compute.struct_field(arr, p)   # a null struct gives a null field
            out[field] = arr
        return out


def text_values(arr) -> tuple[list, bool]:
    """(values, all_valid_utf8): bytes per row for string / binary columns, None for null rows;
    None for arrays of another type (every row a non-string)."""
    pa = _pa()
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda t: False), getattr(pa.types, "is_binary_view", lambda t: False)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or is_view[0](t):
        try:
            arr.validate(full=True)     # pyarrow does not check UTF-8 when it reads Parquet
            valid = True
        except pa.ArrowInvalid:
            valid = False
        return arr.cast(pa.large_binary()).to_pylist(), valid
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or is_view[1](t):
        return arr.cast(pa.large_binary()).to_pylist(), False
    return None, True
