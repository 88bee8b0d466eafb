"""Benchmark: sentence-transformers' CrossEncoder vs `hpcllm rerank`, same pairs, same cores, one run.

    python bench/rerank.py [--pairs 2000] [--ranks 2] [--arch bert|xlmr]

The model: a random cross-encoder of ms-marco-MiniLM-L6-v2's shape (BERT, 6
layers, 384 wide, 12 heads, MiniLM's WordPiece, max length 256); ``--arch
xlmr`` an XLM-R of that size with the Unigram tokenizer the tests train on the
fortunes (bench/embed.py's ``xlmr_of_minilm_size``).  Pairs: a fortune's first
100 characters as the query, another fortune as the document.  Both sides are
timed as whole processes from JSONL to an HDF5 file, imports included:
``CrossEncoder.predict`` (batch 64, torch threads = cores) in a fresh
`python`, and `mpiexec -n RANKS hpcllm rerank`.  Prints pairs/s, the ratio,
the model-only ratio (predict vs the slowest rank's forward passes) and the
largest score difference.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # bench/common.py, also under PYTHONSAFEPATH=1

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import corpora, minilm_dir  # noqa: E402
from embed import MINILM_DIMS, xlmr_of_minilm_size  # noqa: E402


def bert_cross_encoder(tmp) -> str:
    """A random BertForSequenceClassification (one label) of MiniLM's shape, saved by CrossEncoder."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    hf = pathlib.Path(tmp) / "bert-hf"
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=1, **MINILM_DIMS)
    BertForSequenceClassification(cfg).eval().save_pretrained(hf)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(hf)
    out = pathlib.Path(tmp) / "bert-ce"
    CrossEncoder(str(hf), max_length=256).save(str(out))
    return str(out)


def st_worker(model_dir, path, out):
    from sentence_transformers import CrossEncoder

    torch.set_num_threads(os.cpu_count())
    with open(path, encoding="utf-8") as f:
        pairs = [(r["query"], r["text"]) for r in map(json.loads, f)]
    model = CrossEncoder(model_dir, device="cpu")
    start = time.perf_counter()
    scores = model.predict(pairs, batch_size=64)
    predict = time.perf_counter() - start
    with h5py.File(out, "w") as f:
        f["score"] = scores
        f.attrs["predict_seconds"] = predict


def run_st(model, path, out):
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--st-worker", model, path, out], check=True,
                   stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    with h5py.File(out) as f:
        return elapsed, f["score"][:], f.attrs["predict_seconds"]


def run_hpcllm(path, ckpt, ranks, out):
    start = time.perf_counter()
    subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, "-m", "hpcllm", "rerank", "--model", ckpt,
                    "--input", path, "--output", out, "--progress", "0"],
                   check=True, env=dict(os.environ, MPIEXEC_TIMEOUT="3600"), stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    with h5py.File(os.path.join(out, "results.h5")) as f:
        scores = f["score"][:]
        ranks = json.loads(f.attrs["timings"])
    return elapsed, scores, max(r["seconds"]["compute"] + r["seconds"]["comm"] for r in ranks)


def main():
    if sys.argv[1:2] == ["--st-worker"]:
        return st_worker(*sys.argv[2:5])
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--ranks", type=int, default=2, help="hpcllm ranks (threads per rank = cores / ranks)")
    ap.add_argument("--arch", default="bert", choices=("bert", "xlmr"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hpcllm-bench-")
    try:
        texts = corpora.mixed(args.pairs + 1)
        path = os.path.join(tmp, "pairs.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i in range(args.pairs):
                f.write(json.dumps({"query": texts[i][:100], "text": texts[i + 1]}, ensure_ascii=False) + "\n")
        model = bert_cross_encoder(tmp) if args.arch == "bert" else xlmr_of_minilm_size(tmp, "cross-encoder")
        ckpt = os.path.join(tmp, "model.h5")
        subprocess.run([sys.executable, "-m", "hpcllm", "convert", model, ckpt], check=True, stdout=subprocess.DEVNULL)
        run_hpcllm(path, ckpt, args.ranks, os.path.join(tmp, "warm"))   # Numba cache, page cache
        t_st, s_st, m_st = run_st(model, path, os.path.join(tmp, "st.h5"))
        t_h, s_h, m_h = run_hpcllm(path, ckpt, args.ranks, os.path.join(tmp, "h"))
        print(f"{args.arch} cross-encoder of MiniLM's size: {args.pairs} fortunes pairs, {os.cpu_count()} cores, "
              f"hpcllm on {args.ranks} ranks")
        print(f"CrossEncoder {args.pairs / t_st:.1f} pairs/s, hpcllm {args.pairs / t_h:.1f} pairs/s: "
              f"{t_st / t_h:.2f}x; model only {m_st:.1f} s / {m_h:.1f} s = {m_st / m_h:.2f}x; "
              f"largest score difference {np.abs(s_st - s_h).max():.2e}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
