"""Benchmark skeleton for issue 11: the head-training step, hpcllm vs scikit-learn, same embeddings.

    python bench/classify.py [--rows 50000] [--dim 384] [--classes 20] [--ranks 1,2] [--l2 1e-4]

Synthetic "embeddings": unit-normalised gaussian blobs (as MiniLM's normalised
outputs), 20 classes, float32.  Timed, fit only (data loaded, imports done):
scikit-learn ``LogisticRegression`` (multinomial L-BFGS, the same objective:
``C = 1 / (l2 * n)``, on the standardised features) against
``hpcllm.train.fit`` under ``mpiexec -n K`` with each rank holding 1/K of the
rows.  Both use all the machine's cores (sklearn: BLAS threads; hpcllm: torch
threads = cores / K).  Prints seconds, iterations, final objective and
held-out accuracy of each, and the ratio sklearn / hpcllm.

The whole pipelines on the fortunes topic task (pyspark, sentence-transformers +
scikit-learn, hpcllm train-classifier + classify) are in bench/classify_pipeline.py.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_data(path, rows, dim, classes, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, size=rows + rows // 5)
    X = centres[y] * 0.15 + rng.normal(size=(len(y), dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    np.savez(path, X=X[:rows].astype(np.float32), y=y[:rows], X_test=X[rows:].astype(np.float32), y_test=y[rows:])


def sklearn_fit(path, l2):
    from sklearn.linear_model import LogisticRegression

    d = np.load(path)
    mean, std = d["X"].astype(np.float64).mean(0), d["X"].astype(np.float64).std(0)
    start = time.perf_counter()
    Z = (d["X"] - mean) / std
    lr = LogisticRegression(C=1.0 / (l2 * len(Z)), tol=1e-6, max_iter=1000).fit(Z, d["y"])
    seconds = time.perf_counter() - start
    acc = float((lr.predict((d["X_test"] - mean) / std) == d["y_test"]).mean())
    return {"seconds": seconds, "iterations": int(lr.n_iter_.max()), "accuracy": acc}


def worker(path, l2):
    """Run under mpiexec: each rank loads only its slice of the rows (a real job would read only its shard)."""
    import torch
    from mpi4py import MPI

    from hpcllm.train.fit import FitOptions, fit
    from hpcllm.train.heads import predict

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
    d = np.load(path)
    lo, hi = (len(d["y"]) * rank) // size, (len(d["y"]) * (rank + 1)) // size
    X, y = d["X"][lo:hi], d["y"][lo:hi]
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])     # torch's one-off optimiser import, not timed
    comm.Barrier()
    start = time.perf_counter()
    result = fit(X, y, int(d["y"].max()) + 1, comm, FitOptions(l2=l2, tol=1e-6, max_iter=1000))
    seconds = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    if rank == 0:
        acc = float((predict(result.head, d["X_test"]) == d["y_test"]).mean())
        print(json.dumps({"seconds": seconds, "iterations": result.n_iter, "accuracy": acc,
                          "loss": result.history[-1]["train_loss"]}))


def hpcllm_fit(path, l2, ranks):
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--worker", path, "--l2", str(l2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, MPIEXEC_TIMEOUT="1800"))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--l2", type=float, default=1e-4)
    ap.add_argument("--worker", metavar="DATA.npz", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.l2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "embeddings.npz")
        make_data(path, args.rows, args.dim, args.classes)
        print(f"head training, {args.rows} x {args.dim} float32, {args.classes} classes, l2={args.l2}, "
              f"{len(os.sched_getaffinity(0))} cores")
        sk = sklearn_fit(path, args.l2)
        print(f"  sklearn LogisticRegression  {sk['seconds']:7.2f} s  {sk['iterations']:4d} it  acc {sk['accuracy']:.4f}")
        for k in (int(r) for r in args.ranks.split(",")):
            got = hpcllm_fit(path, args.l2, k)
            print(f"  hpcllm fit, {k} rank(s)       {got['seconds']:7.2f} s  {got['iterations']:4d} it  "
                  f"acc {got['accuracy']:.4f}  -> {sk['seconds'] / got['seconds']:.2f}x sklearn")


if __name__ == "__main__":
    main()
