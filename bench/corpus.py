"""Benchmark: the corpus pipeline at scale (not a test).

    python bench/corpus.py [--mb 300] [--docs 1500] [--skip tokenize,embed,spread]
    python bench/corpus.py make PATH --mb 5200       # only write a fortunes JSONL corpus

Three measurements, printed as one table:

1. tokenize: ``mpiexec -n {1,2} hpcllm tokenize`` (MiniLM's tokenizer.json, no
   length limit) over a fortunes-based JSONL of ``--mb`` MB; MB/s of JSONL
   input, over the whole command (startup included) and over the job loop
   (the longest rank's read + tokenize + write + idle).
2. overlap: ``hpcllm embed`` (all-MiniLM-L6-v2, 1 rank, all its threads) over
   ``--docs`` single fortunes, docs/s of the job loop (rank 0's final
   progress line), against compute-only: the same model forward over the same
   documents pre-tokenized and packed into the same batches, in this
   process, with the same thread count.
3. spread: the same embed at 2 ranks (2 dp groups) with group 1 slowed 3x
   (run under bench/duty.py, stopped 2/3 of the time); the spread of the ranks' finish times
   (results.h5 ``timings``) against the time one shard takes the slow group.

Everything runs on this machine's CPUs; numbers move with other load on it.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # bench/common.py, also under PYTHONSAFEPATH=1

from common import REPO, corpora, minilm_dir  # noqa: E402


def make_corpus(path, mb, seed=0):
    """JSONL of documents made of 2..12 fortunes (all installed languages), ``mb`` MB or a bit more.

    A 64 MB block of random documents is written repeatedly, so any size is fast to make.
    """
    texts = [t for pool in corpora.all_fortunes().values() for t in pool]
    rng = random.Random(seed)
    lines, size = [], 0
    while size < min(mb, 64) * 1e6:
        doc = "\n\n".join(rng.choice(texts) for _ in range(rng.randint(2, 12)))
        lines.append((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode())
        size += len(lines[-1])
    block = b"".join(lines)
    written = 0
    with open(path, "wb") as f:
        while written < mb * 1e6:
            f.write(block)
            written += len(block)
    return written


def hpcllm(n, args, env=None, slow_last=None):
    """Run `mpiexec -n N python -m hpcllm ARGS`; returns (wall seconds, stderr).

    ``slow_last=F``: the last rank runs under bench/duty.py, at 1/F of the CPU time.
    """
    run = [sys.executable, "-m", "hpcllm", *map(str, args)]
    cmd = ["mpiexec", "-n", str(n), *run]
    if slow_last:
        cmd = ["mpiexec", "-n", str(n - 1), *run, ":", "-n", "1", sys.executable,
               os.path.join(HERE, "duty.py"), str(slow_last), *run]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return wall, proc.stderr


def bench_tokenize(tmp, mb, table):
    corpus = os.path.join(tmp, "tok.jsonl")
    size = make_corpus(corpus, mb)
    tok = os.path.join(minilm_dir(), "tokenizer.json")
    for n in (1, 2):
        out = os.path.join(tmp, f"tok-{n}")
        wall, _ = hpcllm(n, ["tokenize", "--tokenizer", tok, "--input", corpus, "--output", out, "--progress", 0])
        with open(os.path.join(out, "tokens.json")) as f:
            info = json.load(f)
        rows = info["timings"]
        job = max(sum(r["seconds"][p] for p in ("tokenize", "write", "idle")) for r in rows)
        peak = max(r["peak_rss_mb"] for r in rows)
        table.append((f"tokenize, {n} rank(s)", f"{size / 1e6 / wall:.1f} MB/s",
                      f"job loop {size / 1e6 / job:.1f} MB/s; {size / 1e6:.0f} MB, {info['n_docs']} docs, "
                      f"{info['n_tokens']} tokens, wall {wall:.1f} s, peak RSS/rank {peak:.0f} MiB"))
        shutil.rmtree(out)
    os.remove(corpus)


def _fortunes_corpus(tmp, n_docs):
    texts = [t for t in corpora.fortunes("fortunes") if t.strip()][:n_docs]
    path = os.path.join(tmp, "embed.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path, texts


def _rate(stderr):
    """docs/s of rank 0's final progress line (the job loop, startup excluded)."""
    return float(re.findall(r"([\d,.]+) docs/s", stderr)[-1].replace(",", ""))


def compute_only(model_path, texts, threads, batch_tokens, window, shard_docs):
    """docs/s of the model forward alone over the embed job's batches (pre-tokenized, packed):
    [first pass, second pass] (the job, like the first pass, meets each batch shape for the first time)."""
    import torch

    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.corpus.batching import make_batches, pack_batch
    from hpcllm.world.comm import LocalComm
    from hpcllm.model.build import build_model
    from hpcllm.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    ckpt = Checkpoint(model_path)
    model = build_model(ckpt, 0, 1, LocalComm(), torch.float32)
    max_length = min(ckpt.config["max_length"], ckpt.config["max_positions"])
    enc = Tokenizer.from_str(ckpt.tokenizer_json, apply_file_settings=False).encode_batch(texts, max_length=max_length)
    batches = []   # the job's batches: formed inside each shard
    for a in range(0, len(texts), shard_docs):
        batches += [pack_batch(enc.ids, enc.offsets, a + b)
                     for b in make_batches(enc.lengths()[a:a + shard_docs], batch_tokens, window, padded=False)]
    batches = [(torch.from_numpy(i), torch.from_numpy(m)) for i, m in batches]
    rates = []
    with torch.inference_mode():
        for _ in range(2):   # the first pass pays for every new batch shape, as the job does
            start = time.perf_counter()
            for ids, lengths in batches:
                model(ids, lengths)
            rates.append(len(texts) / (time.perf_counter() - start))
    return rates


def bench_embed(tmp, n_docs, table, spread=True, overlap=True):
    from hpcllm.config import JobConfig
    from hpcllm.world.mesh import cores_per_rank
    from hpcllm.checkpoint.convert import convert

    model = os.path.join(tmp, "minilm.h5")
    convert(minilm_dir(), model)
    corpus, texts = _fortunes_corpus(tmp, n_docs)
    common = ["embed", "--model", model, "--input", corpus, "--progress", 1000]
    if overlap:   # 4 shards: overlap needs a next shard; batches are formed inside a shard
        shard_docs = max(1, len(texts) // 4)
        _, err = hpcllm(1, common + ["--shard-docs", shard_docs, "--output", os.path.join(tmp, "e2e")])
        e2e = _rate(err)
        cold, warm = compute_only(model, texts, cores_per_rank(1), JobConfig.batch_tokens, JobConfig.window,
                                  shard_docs)
        table.append(("embed end-to-end, 1 rank", f"{e2e:.1f} docs/s",
                      f"compute-only {cold:.1f} docs/s first pass: {100 * e2e / cold:.0f}%, {warm:.1f} docs/s "
                      f"second pass: {100 * e2e / warm:.0f}% ({len(texts)} fortunes in "
                      f"{shard_docs}-doc shards, all-MiniLM-L6-v2, {cores_per_rank(1)} threads)"))
    if spread:    # 16 shards: the unit of claiming
        out = os.path.join(tmp, "spread")
        hpcllm(2, common + ["--shard-docs", max(1, len(texts) // 16), "--output", out], slow_last=3)
        import h5py
        with h5py.File(os.path.join(out, "results.h5"), "r") as f:
            rows = json.loads(f.attrs["timings"])
        ends = [r["finished_at"] for r in rows]
        slow = [r for r in rows if r["dp_rank"] == 1][0]
        per_shard = sum(slow["seconds"].values()) / max(1, slow["shards"])    # wall time, stopped time included
        table.append(("finish spread, group 1 slowed 3x", f"{max(ends) - min(ends):.2f} s",
                      f"one shard of the slow group {per_shard:.2f} s; shards per group "
                      + ", ".join(f"{r['dp_rank']}:{r['shards']}" for r in rows)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("make", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--mb", type=float, default=300, help="size of the tokenize corpus (MB)")
    p.add_argument("--docs", type=int, default=1500, help="fortunes embedded in the embed benchmarks")
    p.add_argument("--skip", default="", help="comma list of: tokenize, overlap, spread")
    args = p.parse_args()
    if args.make:
        if args.make != "make" or not args.path:
            p.error("usage: corpus.py make PATH --mb N")
        print(f"wrote {make_corpus(args.path, args.mb) / 1e6:.0f} MB to {args.path}")
        return
    skip = set(filter(None, args.skip.split(",")))
    table = []
    with tempfile.TemporaryDirectory(prefix="hpcllm-bench-") as tmp:
        if "tokenize" not in skip:
            bench_tokenize(tmp, args.mb, table)
        if not {"overlap", "spread"} <= skip:
            bench_embed(tmp, args.docs, table, spread="spread" not in skip, overlap="overlap" not in skip)
    width = max(len(r[0]) for r in table)
    print(f"{'measurement':<{width}}  {'result':>14}  details")
    for name, value, detail in table:
        print(f"{name:<{width}}  {value:>14}  {detail}")


if __name__ == "__main__":
    main()
