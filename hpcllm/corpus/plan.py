"""The shard plan: the corpus cut into contiguous document ranges, and its manifest.

A shard is a run of at most ``shard_docs`` consecutive lines of one input file.
For a plain file it is a byte range ``[byte_start, byte_end)`` that starts and
ends on line starts, so a rank reads only its own part; a seekable ``.zst`` file
likewise, in its decompressed bytes.  A ``.gz`` / other ``.zst`` file cannot
be entered in the middle, so its shards are line ranges read by decompressing
from the start of the file; a many-file compressed corpus is parallel because whole
files go to different shards.  A Parquet / Arrow file's units are its row groups
/ record batches (hpcllm.corpus.columnar), counted from metadata: a unit larger
than ``shard_docs`` is cut into row ranges and consecutive small ones are
packed into one shard, as plain-file runs are.

Planning scans the files once.  Plain files are cut into fixed-size byte blocks
(independent of the number of ranks, so the plan is identical at any world
size); each block's lines are cut into runs of about ``shard_docs / 16`` lines
(see _stride; the block's last run may be shorter), and consecutive runs of a file are packed
greedily into shards of at most ``shard_docs`` lines.  So every shard but a
file's last holds more than ``shard_docs * 15/16`` lines, and only the line
starts at run boundaries are ever held in memory.  With an mpi4py communicator, blocks are scanned round-robin
across ranks and gathered, and every rank assembles the same plan.
"""

from __future__ import annotations

import os

import numpy as np

from hpcllm.corpus.columnar import columnar_errors, columnar_kind, unit_rows
from hpcllm.corpus.readers import format_of, list_inputs
from hpcllm.corpus.shard import DEFAULT_SHARD_DOCS, Shard
from hpcllm.corpus.streams import data_size, open_stream, random_access, stream_errors
from hpcllm.errors import HpcllmError
from hpcllm.world.collective import agree_error, gather_all, world_rank, world_size

SCAN_BLOCK = 64 << 20      # bytes of a plain file scanned as one unit of work
READ_SIZE = 4 << 20        # bytes per read() while scanning


class Plan(list):
    """The list of Shards, plus ``inputs``: every input file (file_index order), also those with no lines."""

    def __init__(self, shards=(), inputs=()):
        super().__init__(shards)
        self.inputs = list(inputs)


# --------------------------------------------------------------------------- scanning

def _count_lines_stream(path: str) -> int:
    """Lines of a compressed file: newlines, plus a final line without one."""
    count, last = 0, b"\n"
    with open_stream(path) as f:
        while block := f.read(READ_SIZE):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _next_line_start(f, pos: int, size: int) -> int:
    """First line start at or after ``pos`` (``size`` if none)."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    f.seek(pos - 1)
    at = pos - 1
    while block := f.read(1 << 16):
        i = block.find(b"\n")
        if i >= 0:
            return at + i + 1
        at += len(block)
    return size


def _scan_block(path: str, start: int, end: int, size: int, stride: int) -> list[tuple]:
    """Runs of <= stride lines among the lines that START in [start, end).

    Returns (byte_start, byte_end, n_lines) triples covering those lines.  Line
    j>0 of the block starts one byte after the j-th newline found at positions
    [first, end - 1); only run boundaries are located, so memory stays small.
    """
    with open_stream(path) as f:
        first = _next_line_start(f, start, size)
        if first >= end:
            return []          # a long line from an earlier block covers this one
        stop = _next_line_start(f, end, size)
        cuts, n_lines, pos = [first], 1, first
        f.seek(first)
        while pos < end - 1:
            block = f.read(min(READ_SIZE, end - 1 - pos))
            c = block.count(b"\n")
            next_cut = len(cuts) * stride     # line index of the next run start
            if n_lines + c > next_cut:
                nl = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
                # newline k (0-based) of this block begins line n_lines + k
                for k in range(next_cut - n_lines, c, stride):
                    cuts.append(pos + int(nl[k]) + 1)
            n_lines += c
            pos += len(block)
    bounds = cuts + [stop]
    counts = [stride] * (len(cuts) - 1) + [n_lines - stride * (len(cuts) - 1)]
    return [(bounds[i], bounds[i + 1], counts[i]) for i in range(len(cuts))]


def _work_items(files: list[str]) -> list[tuple]:
    """Units of scanning work: (file_index, start, end, size) blocks; a stream or columnar file is one item."""
    items = []
    for fi, path in enumerate(files):
        if not random_access(path) or columnar_kind(path):
            size = os.path.getsize(path)
            items.append((fi, 0, size, size))
        else:
            size = data_size(path)
            items += [(fi, s, min(s + SCAN_BLOCK, size), size) for s in range(0, size, SCAN_BLOCK)]
    return items


def _scan_item(files, item, shard_docs) -> list[tuple]:
    fi, start, end, size = item
    path = files[fi]
    if columnar_kind(path):      # units from metadata: a large one cut into row ranges
        return [(0, size, min(shard_docs, n - r)) for n in unit_rows(path) for r in range(0, n, shard_docs)]
    if not random_access(path):
        n, runs = _count_lines_stream(path), []
        for ls in range(0, n, shard_docs):
            runs.append((0, size, min(shard_docs, n - ls)))
        return runs
    return _scan_block(path, start, end, size, _stride(shard_docs))


def _stride(shard_docs: int) -> int:
    """Run length for plain-file scanning: about shard_docs/16, a divisor when one is near
    (then shards inside one scan block are exactly shard_docs long)."""
    for k in range(16, 65):
        if shard_docs % k == 0:
            return shard_docs // k
    return max(1, shard_docs // 16)


def _scan_all(files, items, shard_docs, comm) -> list[list[tuple]]:
    """Scan every work item (round-robin over ranks); identical result on all ranks.

    Errors are gathered rather than raised locally, so that every rank raises
    the same one-line error instead of some ranks waiting in the collective.
    """
    rank, size = world_rank(comm), world_size(comm)
    mine, error = {}, None
    try:
        for i in range(rank, len(items), size):
            mine[i] = _scan_item(files, items[i], shard_docs)
    except stream_errors() + columnar_errors() as e:
        error = f"cannot read input {files[items[i][0]]}: {e}"
    agree_error(comm, error)
    merged = {}
    for m in gather_all(comm, mine):
        merged.update(m)
    return [merged[i] for i in range(len(items))]


def make_plan(inputs, shard_docs: int = DEFAULT_SHARD_DOCS, comm=None, fmt: str = "auto") -> Plan:
    """Cut the inputs (files, dirs, globs) into shards of at most ``shard_docs`` lines.

    Collective when ``comm`` is given: call it on every rank; all get the same plan.
    """
    if shard_docs < 1:
        raise HpcllmError(f"shard_docs must be >= 1, got {shard_docs}")
    files = list_inputs(inputs)
    fmts = [format_of(p, fmt) for p in files]
    items = _work_items(files)
    scanned = _scan_all(files, items, shard_docs, comm)
    shards: list[Shard] = []
    line_in_file = [0] * len(files)
    row = 0
    pending = None  # the shard being packed: consecutive runs of one plain file
    for item, runs in zip(items, scanned):
        fi = item[0]
        for bs, be, n in runs:
            if pending and pending[0] == fi and pending[3] + n <= shard_docs and random_access(files[fi]):
                pending = (fi, pending[1], be, pending[3] + n)
                continue
            if pending:
                shards.append(_finish(pending, files, fmts, line_in_file, len(shards), row))
                row += pending[3]
            pending = (fi, bs, be, n)
    if pending:
        shards.append(_finish(pending, files, fmts, line_in_file, len(shards), row))
    return Plan(shards, files)


def _finish(run, files, fmts, line_in_file, index, row) -> Shard:
    fi, bs, be, n = run
    path = files[fi]
    shard = Shard(index=index, path=path, fmt=fmts[fi],
                  compressed=not random_access(path) or columnar_kind(path) is not None,
                  byte_start=bs, byte_end=be, line_start=line_in_file[fi], n_docs=n,
                  row_start=row, file_index=fi)
    line_in_file[fi] += n
    return shard
