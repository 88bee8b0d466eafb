"""One shard of the corpus plan: a run of consecutive lines of one input file.

A leaf of the corpus package: the planner (hpcllm.corpus.plan) makes Shards,
the readers (hpcllm.corpus.readers) read them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Most documents per shard when no one says (``JobConfig.shard_docs``, ``--shard-docs``, defaults to it).
DEFAULT_SHARD_DOCS = 10_000


@dataclass(frozen=True)
class Shard:
    index: int          # position in the plan (also names the result file)
    path: str           # absolute path of the input file
    fmt: str            # "jsonl", "text", "parquet" or "arrow"
    compressed: bool    # .gz / .zst read as a stream, and Parquet / Arrow: a line (row) range only
    byte_start: int     # plain (and seekable .zst: decompressed) files: first byte (a line start); else 0
    byte_end: int       # plain (seekable .zst) files: end byte (a line start or EOF); else the file's size
    line_start: int     # 0-based line (columnar: row) number, within the file, of the first document
    n_docs: int         # number of lines (rows) in the shard
    row_start: int      # global row of the first document, in input order
    file_index: int = 0  # position of `path` in the plan's input list
    parts: int = 1      # work units the shard's batches are split into (hpcllm.executor.parts)
    part: int = 0       # a work unit: which of them (0 in the plan)
