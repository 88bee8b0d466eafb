"""Benchmark: `hpcllm embed` over a corpus with repeated documents, repeats computed once (the default)
vs every copy computed (`--repeats compute`), same corpus, same ranks, one run.

    python bench/repeats.py [--docs 4000] [--repeat-share 0.3] [--ranks 1] [--rounds 2]

The corpus: ``--docs`` lines of the fortunes (all corpora, round-robin), of
which a ``--repeat-share`` fraction are copies of other lines at random
places (inside a shard and across shards).  Model: all-MiniLM-L6-v2.  The
two settings run alternately ``--rounds`` times (the best of each counts), as
whole processes from raw JSONL to results.h5.  Prints the model time (the
slowest rank's forward passes, from results.h5's timings), the wall time,
their ratios, the rows filled from a repeat, and the largest difference of a
copy's embedding from computing it (batches differ, so float rounding does).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # bench/common.py, also under PYTHONSAFEPATH=1

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from common import converted, corpora, minilm_dir  # noqa: E402
from embed import run_hpcllm  # noqa: E402


def write_corpus(path, n, share, seed=0):
    """``n`` lines: ``n - round(share * n)`` distinct fortunes and copies of them at random places."""
    rng = np.random.default_rng(seed)
    n_copies = round(share * n)
    texts = corpora.mixed(n - n_copies)
    rows = texts + [texts[i] for i in rng.integers(0, len(texts), n_copies)]
    with open(path, "w", encoding="utf-8") as f:
        for i in rng.permutation(n):
            f.write(json.dumps({"text": rows[i]}, ensure_ascii=False) + "\n")


def run_embed(path, ckpt, ranks, out, repeats):
    """(wall s, the slowest rank's model s, rows filled, embeddings) of one `hpcllm embed` (bench/embed.py's)."""
    wall, _, model = run_hpcllm(path, ckpt, "float32", ranks, out, ("--repeats", repeats))
    with h5py.File(os.path.join(out, "results.h5")) as f:
        emb, filled = f["embedding"][()], int(f.attrs.get("repeats_filled", 0))
    shutil.rmtree(out)
    return wall, model, filled, emb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--repeat-share", type=float, default=0.3, help="fraction of the lines that repeat another")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hpcllm-bench-")
    try:
        path = os.path.join(tmp, "corpus.jsonl")
        write_corpus(path, args.docs, args.repeat_share)
        ckpt = converted(minilm_dir())
        best = {}
        for k in range(args.rounds):
            for repeats in ("compute", "auto"):
                got = run_embed(path, ckpt, args.ranks, os.path.join(tmp, f"{repeats}{k}"), repeats)
                old = best.get(repeats)
                best[repeats] = got if old is None else (min(old[0], got[0]), min(old[1], got[1]), *got[2:])
        (w_c, m_c, _, e_c), (w_s, m_s, filled, e_s) = best["compute"], best["auto"]
        print(f"all-MiniLM-L6-v2: {args.docs} fortunes lines, {args.repeat_share:.0%} repeats, {os.cpu_count()} "
              f"cores, {args.ranks} rank(s), best of {args.rounds}")
        print(f"{'':22}{'model s':>10}{'wall s':>10}")
        print(f"{'--repeats compute':22}{m_c:>10.2f}{w_c:>10.2f}")
        print(f"{'repeats shared':22}{m_s:>10.2f}{w_s:>10.2f}")
        print(f"{'shared / compute':22}{m_s / m_c:>10.2f}{w_s / w_c:>10.2f}   (1 - repeat share = "
              f"{1 - args.repeat_share:.2f})")
        print(f"rows filled from a repeat: {filled} of {args.docs}; largest |difference| of an embedding from "
              f"computing it: {np.abs(e_s - e_c).max():.2e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
