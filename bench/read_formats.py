"""Benchmark: corpus reading speed per input format (not a test).

    python bench/read_formats.py [--docs 200000] [--chars 600]

Writes one synthetic corpus (random words, ``--docs`` documents of about
``--chars`` characters, an ``id`` column) as JSONL, JSONL.gz, JSONL.zst (one
frame, and zstd's seekable format in 1 MB frames),
Parquet (row groups of 65,536 rows, zstd pages) and a save_to_disk-style
Arrow directory, then times hpcllm's DocReader over a plan of 10,000-row
shards of each (plan time printed apart) against pyarrow / pandas reading the
same columns.  Prints rows/s and MB/s of text for each.  Numbers are for one
process on this machine and move with other load on it.
"""

import argparse
import gzip
import json
import os
import random
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pyzstd

from hpcllm.corpus.plan import make_plan
from hpcllm.corpus.readers import DocReader

WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do",
         "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua", "\u00e9t\u00e9"]


def make(d, n, chars):
    rng = random.Random(0)
    texts = []
    for i in range(n):
        words, size = [], 0
        while size < chars:
            w = rng.choice(WORDS)
            words.append(w)
            size += len(w) + 1
        texts.append(" ".join(words))
    table = pa.table({"id": [f"d{i}" for i in range(n)], "text": texts})
    lines = "".join(json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)).encode()
    paths = {"jsonl": os.path.join(d, "c.jsonl"), "jsonl.gz": os.path.join(d, "c.jsonl.gz"),
             "jsonl.zst": os.path.join(d, "c.jsonl.zst"), "jsonl.zst seekable": os.path.join(d, "s", "c.jsonl.zst"),
             "parquet": os.path.join(d, "c.parquet"),
             "arrow dir": os.path.join(d, "ds")}
    with open(paths["jsonl"], "wb") as f:
        f.write(lines)
    with gzip.open(paths["jsonl.gz"], "wb", compresslevel=6) as f:
        f.write(lines)
    with open(paths["jsonl.zst"], "wb") as f:
        f.write(pyzstd.compress(lines, 3))
    os.makedirs(os.path.dirname(paths["jsonl.zst seekable"]))
    with pyzstd.SeekableZstdFile(paths["jsonl.zst seekable"], "w", level_or_option=3, max_frame_content_size=1 << 20) as f:
        f.write(lines)
    pq.write_table(table, paths["parquet"], row_group_size=65536, compression="zstd")
    os.makedirs(paths["arrow dir"])
    with pa.ipc.new_stream(os.path.join(paths["arrow dir"], "data-00000-of-00001.arrow"), table.schema) as w:
        for b in table.to_batches(max_chunksize=1000):
            w.write_batch(b)
    for name, body in (("state.json", {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}),
                       ("dataset_info.json", {})):
        with open(os.path.join(paths["arrow dir"], name), "w") as f:
            json.dump(body, f)
    return paths, sum(len(t.encode()) for t in texts)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def hpcllm_read(path):
    plan_s, plan = timed(lambda: make_plan(path, shard_docs=10_000))

    def read():
        n = 0
        with DocReader() as r:
            for s in plan:
                n += len(r.read(s))
        return n
    read_s, n = timed(read)
    return plan_s, read_s, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--chars", type=int, default=600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths, text_bytes = make(d, args.docs, args.chars)
        mb = text_bytes / 1e6
        print(f"{args.docs} documents, {mb:.1f} MB of text")
        print(f"{'reader':<40} {'plan s':>7} {'read s':>7} {'rows/s':>10} {'MB/s':>7}")

        def row(name, plan_s, read_s):
            print(f"{name:<40} {plan_s:>7.2f} {read_s:>7.2f} {args.docs / read_s:>10,.0f} {mb / read_s:>7.1f}")
        for fmt, path in paths.items():
            plan_s, read_s, n = hpcllm_read(path)
            assert n == args.docs, (fmt, n)
            row(f"hpcllm DocReader, {fmt}", plan_s, read_s)
        row("pyarrow read_table(text,id).to_pylist", 0,
            timed(lambda: [c.to_pylist() for c in pq.read_table(paths["parquet"], columns=["text", "id"]).columns])[0])
        try:
            import pandas as pd
        except ImportError:
            return
        row("pandas read_parquet(text,id)", 0, timed(lambda: pd.read_parquet(paths["parquet"], columns=["text", "id"]))[0])
        row("pandas read_json(lines=True), jsonl", 0, timed(lambda: pd.read_json(paths["jsonl"], lines=True))[0])


if __name__ == "__main__":
    main()
