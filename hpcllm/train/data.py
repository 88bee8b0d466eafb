"""A rank's share of the training data, from the embed phase's result shards and the corpus' labels.

Rank r of a world of size W takes the shards whose index is r mod W (not the
ones its group happened to claim: claiming is dynamic, this is not), reads
their embeddings and statuses, and reads the label field of the same lines
from the source files (for token-shard input, the raw corpus their
``source_path`` attribute names).  So memory per rank is about 1/W of the
embeddings, and which rows a rank holds depends only on the plan and W.

A row trains when its status is one the model embedded from real text (OK,
TRUNCATED, BAD_UTF8) and it has a label; EMPTY texts, reader errors (bad JSON,
missing text field, too long) and rows without a label are counted, per
reason, and skipped.
"""

import dataclasses
import json

import h5py
import numpy as np

from hpcllm.corpus.columnar import ColumnarFile, columnar_kind
from hpcllm.corpus.readers import format_of
from hpcllm.corpus.streams import open_stream
from hpcllm.errors import HpcllmError
from hpcllm.status import Status
from hpcllm.store.chunks import open_shard
from hpcllm.train.labels import MISSING
from hpcllm.world.collective import sum_all, world_rank, world_size

TRAINABLE = (Status.OK, Status.TRUNCATED, Status.BAD_UTF8)


@dataclasses.dataclass
class LocalRows:
    X: np.ndarray          # [n_local, d] float32 embeddings of the rows that train
    labels: list           # their label values (JSON values)
    doc_ids: list          # their document ids
    skipped: dict          # global counts of rows skipped: status name (lower case) or "unlabelled" -> rows
    where: list = dataclasses.field(default_factory=list)   # (shard, its rows taken), in the order of X


def my_shards(plan, rank: int, size: int) -> list:
    return [s for s in sorted(plan, key=lambda s: s.index) if s.index % size == rank]


def _source_of(shard) -> tuple:
    """(raw corpus path, format, first byte, 1-based number of the line at that byte) of a shard."""
    if shard.fmt == "tokens":      # a token shard: its raw corpus
        with h5py.File(shard.path, "r") as f:
            return str(f.attrs["source_path"]), str(f.attrs["source_format"]), 0, 1
    if shard.compressed:
        return shard.path, shard.fmt, 0, 1
    return shard.path, shard.fmt, shard.byte_start, shard.line_start + 1


def read_labels(path: str, fmt: str, lines: np.ndarray, field: str, byte_start: int = 0, first_line: int = 1) -> list:
    """The ``field`` value of each 1-based line number in ``lines`` (MISSING if absent / not JSON)."""
    if columnar_kind(path):       # Parquet / Arrow: the rows' values of the label column
        values = _column_labels(path, np.asarray(lines, np.int64), field)
        return [MISSING if v is None else v for v in values]
    if format_of(path, fmt) != "jsonl":
        raise HpcllmError(f"train-classifier: {path} is plain text; labels need JSONL input with a "
                          f"{field!r} field")
    want = {int(n): None for n in lines}
    last = max(want, default=0)
    with open_stream(path) as f:
        if byte_start:
            f.seek(byte_start)
        for number, raw in enumerate(f, start=first_line):
            if number > last:
                break
            if number in want:
                want[number] = _field(raw, field)
    return [MISSING if want[int(n)] is None else want[int(n)] for n in lines]


def _column_labels(path: str, lines: np.ndarray, field: str) -> list:
    if not len(lines):
        return []
    lo, hi = int(lines.min()), int(lines.max())
    arr = ColumnarFile(path).fields(lo - 1, hi - lo + 1, [field])[field]
    values = arr.to_pylist() if arr is not None else [None] * (hi - lo + 1)
    return [values[int(n) - lo] for n in lines]


def _field(raw: bytes, field: str):
    try:
        row = json.loads(raw)
    except ValueError:
        return MISSING
    return row.get(field, MISSING) if isinstance(row, dict) else MISSING


def load_local_rows(out_dir: str, plan, field: str, dim: int, comm) -> LocalRows:
    """This rank's training rows, ``dim`` features each (collective: the counts are summed over ``comm``)."""
    parts, labels, doc_ids, where = [], [], [], []
    counts = np.zeros(len(Status) + 1, np.int64)      # one per status, then unlabelled
    for shard in my_shards(plan, world_rank(comm), world_size(comm)):
        with open_shard(out_dir, shard) as f:
            emb, status, line = f["embedding"][()], f["status"][()], f["line"][()]
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in f["doc_id"][()]]
        ok = np.isin(status, TRAINABLE)
        for code in np.unique(status[~ok]):
            counts[list(Status).index(Status(code))] += int((status[~ok] == code).sum())
        path, fmt, byte_start, first_line = _source_of(shard)
        values = read_labels(path, fmt, line[ok], field, byte_start, first_line)
        has = np.array([v is not MISSING and v is not None for v in values], bool)
        counts[-1] += int((~has).sum())
        rows = np.flatnonzero(ok)[has]
        parts.append(emb[rows])
        where.append((shard, rows))
        labels += [v for v, h in zip(values, has) if h]
        doc_ids += [ids[r] for r in rows]
    total = sum_all(comm, counts)
    skipped = {s.name.lower(): int(total[i]) for i, s in enumerate(Status) if total[i]}
    skipped["unlabelled"] = int(total[-1])
    skipped.pop("ok", None)
    X = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return LocalRows(X, labels, doc_ids, skipped, where)
