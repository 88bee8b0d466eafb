"""`hpcllm filter`: the original input lines of the documents that satisfy ``--where``.

Rows join input lines by source file and line: each shard of the plan (the
manifest, else the shard files' attributes) is a run of consecutive lines of
one input file, read from its byte range (plain files) or by skipping lines
(gzip), and its rows' ``source`` / ``line`` columns must say exactly that.
A corpus file whose size differs from the manifest's, that was modified after
the job planned it, or whose line count does not match the rows, is a
one-line error (and nothing is written).

Lines are written byte for byte (a last line without a newline gets one), in
input order, gzip-compressed when the output name ends with ``.gz``.  Over
Parquet / Arrow input (rows, hpcllm.corpus.columnar) the output is Parquet
(``.parquet``) with the input's schema and the kept rows' values unchanged.  The work
is split by shard: under ``mpiexec -n N`` each rank filters a contiguous run of
shards into part files (gzip members concatenate into one valid gzip stream)
and rank 0 joins them, so the output equals the single-rank run;
``--per-shard`` keeps one file per shard instead (``NAME-NNNNN.EXT``).

``q(p)`` cut-offs are exact quantiles over the rows with status ok (NaN left
out), per value of ``--by`` when given: one pass builds Sketches, usually one
more pass pins the exact order statistics (hpcllm.analysis.sketch).
"""

from __future__ import annotations

import datetime
import gzip
import os
import shutil

import numpy as np

from hpcllm.analysis.columns import Results
from hpcllm.analysis.expr import Bound
from hpcllm.analysis.sketch import Local, Sketch, exact_quantiles
from hpcllm.corpus.columnar import ColumnarFile, columnar_kind
from hpcllm.corpus.streams import open_stream, random_access
from hpcllm.errors import HpcllmError
from hpcllm.status import Status
from hpcllm.store.atomic import atomic_path
from hpcllm.world.collective import (gather_all, max_all, min_all, on_every_rank, sum_all, world_rank,
                                     world_size)
from hpcllm.world.launch import launched_world

MAX_GROUPS = 10_000


class MpiReduce(Local):
    """Local's reductions over an mpi4py communicator (hpcllm.world.collective)."""

    def __init__(self, comm):
        self.comm = comm

    def sum(self, a):
        return sum_all(self.comm, a)

    def min(self, a):
        return min_all(self.comm, a)

    def max(self, a):
        return max_all(self.comm, a)

    def concat(self, a):
        return np.concatenate(gather_all(self.comm, a))


# --------------------------------------------------------------------------- quantiles

def _group_keys(values) -> np.ndarray:
    return np.asarray(values, dtype=object) if getattr(values, "dtype", None) == object else np.asarray(values)


def _quantile_blocks(res, rows, col, by):
    """A function yielding (values, groups) of ``col`` over the ok rows in my ``rows`` ranges."""
    names = ["status", col] + ([by] if by else [])

    def gen():
        for a, b in rows:
            for _, blk in res.blocks(names, a, b):
                ok = blk["status"] == Status.OK
                yield blk[col][ok], (_group_keys(blk[by])[ok] if by else None)
    return gen


def _sketches(blocks, red) -> dict:
    local = {}
    for values, groups in blocks():
        if groups is None:
            local.setdefault(None, Sketch()).add(values)
            continue
        for g in np.unique(groups):
            local.setdefault(g.item() if hasattr(g, "item") else g, Sketch()).add(values[groups == g])
        if len(local) > MAX_GROUPS:
            raise HpcllmError(f"--by has more than {MAX_GROUPS} distinct values; group by a coarser column")
    parts = gather_all(red.comm, local) if isinstance(red, MpiReduce) else [local]
    merged = {}
    for part in parts:
        for g, sk in part.items():
            merged.setdefault(g, Sketch()).merge(sk)
    return merged


def quantiles(res, bound: Bound, rows, by, red) -> dict:
    """``{column: {group: {p: value}}}`` for every q() of the expression."""
    out = {}
    for col, probs in bound.quantiles.items():
        blocks = _quantile_blocks(res, rows, col, by)
        sketches = _sketches(blocks, red)
        out[col] = exact_quantiles(blocks, sketches, sorted(probs), red)
    return out


def _lookup(qs: dict, by):
    def qv(col, p, block):
        table = qs[col]
        if not by:
            return table[None][p] if None in table else np.nan
        keys = _group_keys(block[by])
        uniq, inv = np.unique(keys, return_inverse=True)
        vals = np.array([table.get(u.item() if hasattr(u, "item") else u, {}).get(p, np.nan) for u in uniq])
        return vals[inv.ravel()]
    return qv


# --------------------------------------------------------------------------- input files

def _match_inputs(res, inputs) -> list[str]:
    """Paths to read for each source index: the job's sources, or --input files matched by path or name."""
    sources = res.dirs[0].sources or sorted({s.get("path") for s in res.dirs[0].shards()})
    if not inputs:
        return list(sources)
    out = list(sources)
    for p in inputs:
        ap = os.path.abspath(p)
        hits = [i for i, s in enumerate(sources) if s and (os.path.abspath(s) == ap)] or \
               [i for i, s in enumerate(sources) if s and os.path.basename(s) == os.path.basename(p)]
        if len(hits) != 1:
            raise HpcllmError(f"--input {p}: not one of the job's inputs ({', '.join(map(str, sources))})")
        out[hits[0]] = ap
    return out


def check_inputs(res, files: list[str], used: set[int]) -> None:
    """Every used corpus file exists and is unchanged since the job (size and mtime vs the manifest)."""
    m = res.dirs[0].manifest or {}
    sizes = m.get("input_sizes") or []
    created = m.get("created")
    t0 = datetime.datetime.fromisoformat(created).timestamp() if created else None
    for i in sorted(used):
        path = files[i]
        if not path or not os.path.exists(path):
            raise HpcllmError(f"input {path} of {res.dirs[0].path} is missing; pass its new place with --input")
        st = os.stat(path)
        if i < len(sizes) and st.st_size != sizes[i]:
            raise HpcllmError(f"{path} has {st.st_size} bytes, the job read {sizes[i]}: the corpus changed "
                              f"since {res.dirs[0].path} was computed; rerun the job")
        if t0 is not None and st.st_mtime > t0 + 1:
            raise HpcllmError(f"{path} was modified after {res.dirs[0].path} was planned ({created}): the "
                              "corpus may have changed since the job; rerun the job")


class LineReader:
    """Lines of one input file, shard by shard, in plan order (plain, seekable .zst: seek; .gz / .zst: stream on)."""

    def __init__(self, path: str):
        self.path, self.gz = path, not random_access(path)
        self.fh = open_stream(path)
        self.line = 0

    def lines(self, shard: dict):
        if not self.gz and "byte_start" in shard:
            self.fh.seek(int(shard["byte_start"]))
            self.line = int(shard["line_start"])
        elif self.line > int(shard["line_start"]):
            self.fh.close()
            self.__init__(self.path)
        while self.line < int(shard["line_start"]):
            if not self.fh.readline():
                break
            self.line += 1
        for _ in range(int(shard["n_docs"])):
            raw = self.fh.readline()
            if not raw:
                raise HpcllmError(f"{self.path} has {self.line} lines, the results have rows for line "
                                  f"{self.line + 1} (shard {shard['index']}): the corpus changed since the job")
            self.line += 1
            yield raw if raw.endswith(b"\n") else raw + b"\n"

    def check_end(self, shard: dict) -> None:
        """The shard's lines ended where the plan says (a plain file's byte_end)."""
        if not self.gz and "byte_end" in shard and self.fh.tell() != int(shard["byte_end"]):
            raise HpcllmError(f"{self.path}: shard {shard['index']} ends at byte {self.fh.tell()}, the job's "
                              f"plan says {shard['byte_end']}: the corpus changed since the job")

    def close(self):
        self.fh.close()


def _shard_mask(res, bound, qv, shard: dict) -> np.ndarray:
    a, b = int(shard["row_start"]), int(shard["row_start"]) + int(shard["n_docs"])
    names = list(dict.fromkeys(bound.columns + ["line", "source"] + ([qv.by] if qv.by else [])))
    masks = []
    for rows, blk in res.blocks(names, a, b):
        want = np.arange(rows.start - a, rows.stop - a) + int(shard["line_start"]) + 1
        if not np.array_equal(blk["line"], want) or \
                ("file_index" in shard and (blk["source"] != int(shard["file_index"])).any()):
            raise HpcllmError(f"{res.dirs[0].path}: rows {rows.start}..{rows.stop - 1} do not hold lines "
                              f"{want[0]}..{want[-1]} of {shard.get('path')} as its plan says (damaged results?)")
        masks.append(np.asarray(bound.evaluate(blk, qv), bool))
    return np.concatenate(masks) if masks else np.zeros(0, bool)


def _open_out(path: str):
    return gzip.open(path, "wb", compresslevel=6) if path.endswith(".gz") else open(path, "wb")


def _columnar_output(files: list[str], used: set[int], outputs: dict) -> bool:
    """Whether the corpus is Parquet / Arrow (then every output is Parquet); mixed inputs are an error."""
    kinds = {columnar_kind(files[i]) is not None for i in used}
    if kinds != {True}:
        if True in kinds:
            raise HpcllmError("filter: the job's inputs mix Parquet / Arrow files with line files; filter "
                              "each kind from its own job")
        return False
    for out in filter(None, outputs.values()):
        if not out.endswith(".parquet"):
            raise HpcllmError(f"filter over Parquet / Arrow input writes Parquet: name the output .parquet, not {out}")
    return True


def _write_rows(table, mask, part_dir, shard, outputs) -> None:
    """A columnar shard's kept (and rejected) rows, values and schema unchanged, as Parquet part files."""
    import pyarrow.parquet as pq

    for which, sel in (("kept", mask), ("rejected", ~mask)):
        if outputs[which]:
            pq.write_table(table.filter(sel), _part(part_dir, which, shard, outputs[which]))


def _filter_shards(res, bound, qv, shards, files, part_dir, outputs: dict) -> tuple[int, int]:
    """Write each of ``shards``' kept (and, with outputs["rejected"], rejected) lines to part files."""
    kept = dropped = 0
    readers: dict[int, LineReader] = {}
    try:
        for s in shards:
            fi = int(s.get("file_index", 0))
            mask = _shard_mask(res, bound, qv, s)
            if columnar_kind(files[fi]):
                table = ColumnarFile(files[fi]).table(int(s["line_start"]), int(s["n_docs"]))
                _write_rows(table, mask, part_dir, s, outputs)
                kept += int(mask.sum())
                dropped += int((~mask).sum())
                continue
            reader = readers.setdefault(fi, LineReader(files[fi]))
            with _open_out(_part(part_dir, "kept", s, outputs["kept"])) as out, \
                    (_open_out(_part(part_dir, "rejected", s, outputs["rejected"])) if outputs["rejected"]
                     else open(os.devnull, "wb")) as rej:
                bufs = ([], [])                      # rejected, kept: written in chunks (one compress call each)
                for keep, line in zip(mask.tolist(), reader.lines(s)):
                    bufs[keep].append(line)
                    if len(bufs[keep]) >= 4096:
                        (out if keep else rej).write(b"".join(bufs[keep]))
                        bufs[keep].clear()
                out.write(b"".join(bufs[1]))
                rej.write(b"".join(bufs[0]))
            reader.check_end(s)
            kept += int(mask.sum())
            dropped += int((~mask).sum())
    finally:
        for r in readers.values():
            r.close()
    return kept, dropped


def _part(part_dir: str, which: str, shard: dict, output: str) -> str:
    return os.path.join(part_dir, f"{which}-{int(shard['index']):05d}" + (".gz" if output.endswith(".gz") else ""))


def _per_shard_name(path: str, index: int) -> str:
    for ext in (".jsonl.gz", ".txt.gz", ".jsonl", ".txt", ".gz"):
        if path.endswith(ext):
            return f"{path[:-len(ext)]}-{index:05d}{ext}"
    root, ext = os.path.splitext(path)
    return f"{root}-{index:05d}{ext}"


def _join_parts(part_dir: str, which: str, shards, output: str, per_shard: bool) -> None:
    if per_shard:
        for s in shards:
            with atomic_path(_per_shard_name(output, int(s["index"]))) as tmp:
                shutil.move(_part(part_dir, which, s, output), tmp)
        return
    if output.endswith(".parquet"):
        _join_parquet(part_dir, which, shards, output)
        return
    with atomic_path(output) as tmp, open(tmp, "wb") as out:
        for s in shards:                 # gzip members concatenate into one valid stream
            with open(_part(part_dir, which, s, output), "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)


def _join_parquet(part_dir: str, which: str, shards, output: str) -> None:
    """The shards' Parquet parts as one file, in shard order (each part's rows one row group or more)."""
    import pyarrow.parquet as pq

    parts = [pq.read_table(_part(part_dir, which, s, output)) for s in shards[:1]]
    with atomic_path(output) as tmp, pq.ParquetWriter(tmp, parts[0].schema) as writer:
        for s in shards:
            table = pq.read_table(_part(part_dir, which, s, output))
            if not table.schema.equals(writer.schema, check_metadata=False):
                raise HpcllmError(f"filter: {s.get('path')} has another schema than the first input; pass "
                                  "--per-shard to write one Parquet file per shard")
            if table.num_rows:
                writer.write_table(table)


def _my_shards(shards, rank: int, size: int) -> list:
    """A contiguous run of shards per rank, balanced by rows."""
    total = sum(int(s["n_docs"]) for s in shards) or 1
    out, acc = [], 0
    for s in shards:
        if min(size - 1, acc * size // total) == rank:
            out.append(s)
        acc += int(s["n_docs"])
    return out


def run_filter(paths, where: str, output: str, inputs=None, rejected: str | None = None,
               by: str | None = None, per_shard: bool = False) -> str:
    """Filter the corpus of the results dir(s); returns the one-line summary (rank 0) or ''."""
    comm = launched_world()
    rank, size = world_rank(comm), world_size(comm)
    res = Results(paths)
    bound = Bound(where, res)
    if by:
        res.column(by)
    shards = res.dirs[0].shards()
    files = _match_inputs(res, inputs)
    used = {int(s.get("file_index", 0)) for s in shards}
    check_inputs(res, files, used)
    _columnar_output(files, used, {"kept": output, "rejected": rejected})
    mine = _my_shards(shards, rank, size)
    red = MpiReduce(comm) if comm is not None else Local()
    rows = [(int(s["row_start"]), int(s["row_start"]) + int(s["n_docs"])) for s in mine]
    qv = _lookup(on_every_rank(comm, lambda: quantiles(res, bound, rows, by, red)), by)
    qv.by = by
    part_dir = os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.parts")
    if rank == 0:
        os.makedirs(part_dir, exist_ok=True)
    on_every_rank(comm, lambda: None)                                  # the part dir exists before anyone writes
    counts = on_every_rank(comm, lambda: _filter_shards(res, bound, qv, mine, files, part_dir,
                                                           {"kept": output, "rejected": rejected}))
    totals = sum_all(comm, np.array(counts))
    if rank == 0:
        try:
            _join_parts(part_dir, "kept", shards, output, per_shard)
            if rejected:
                _join_parts(part_dir, "rejected", shards, rejected, per_shard)
        finally:
            shutil.rmtree(part_dir, ignore_errors=True)
    on_every_rank(comm, lambda: None)
    if rank:
        return ""
    kept, dropped = int(totals[0]), int(totals[1])
    return (f"kept {kept} of {kept + dropped} lines ({100 * kept / max(1, kept + dropped):.1f} %) -> {output}"
            + (f"; rejected -> {rejected}" if rejected else ""))
