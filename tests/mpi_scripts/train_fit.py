"""mpiexec -n K python -m mpi4py train_fit.py IN.npz OUT.npz: the training core on K ranks.

Each rank keeps only its contiguous slice of the rows (np.array_split, uneven);
rank 0 saves what every test in tests/test_train_fit.py compares across world sizes.
"""

import json
import sys

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.train.fit import FitOptions, fit
from hpcllm.train.heads import predict, predict_proba
from hpcllm.train.labels import encode_labels
from hpcllm.train.metrics import evaluate
from hpcllm.train.split import data_fingerprint, validation_mask

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
torch.set_num_threads(1)   # tiny problems: a thread pool only spins on a shared machine
data = np.load(sys.argv[1], allow_pickle=False)
out = {}


def shard(a):
    return np.array_split(a, size)[rank]


def gather_rows(a):
    return np.concatenate(comm.allgather(a))


X, y, ids = shard(data["X"]), shard(data["y"]), shard(data["ids"])
for name, options in {
    "plain": FitOptions(l2=float(data["l2"]), tol=1e-9, max_iter=2000),
    "balanced": FitOptions(l2=float(data["l2"]), tol=1e-9, max_iter=2000, class_weight="balanced"),
}.items():
    result = fit(X.astype(np.float64), y, int(data["n_classes"]), comm, options)
    out[f"{name}_W"] = result.head.linear.weight.detach().numpy()
    out[f"{name}_b"] = result.head.linear.bias.detach().numpy()
    out[f"{name}_weights"] = result.class_weights
    out[f"{name}_pred"] = gather_rows(predict(result.head, X))
    out[f"{name}_curve"] = np.array([h["train_loss"] for h in result.history])

# the last rank holds no rows at all (a job with more ranks than shards)
parts = np.array_split(np.arange(len(data["y"])), max(size - 1, 1)) + [np.arange(0)]
mine = parts[rank]
result = fit(data["X"][mine].astype(np.float64), data["y"][mine], int(data["n_classes"]), comm,
             FitOptions(l2=float(data["l2"]), tol=1e-9, max_iter=2000))
out["empty_rank_W"] = result.head.linear.weight.detach().numpy()

# float32 embeddings (the default path), validation split, early stopping, metrics
val = validation_mask(ids, y, 0.25, seed=7, comm=comm)
out["val_mask"] = gather_rows(val)
result = fit(X[~val], y[~val], int(data["n_classes"]), comm, FitOptions(l2=1e-6, eval_every=2, patience=2),
             X[val], y[val])
out["f32_probs"] = gather_rows(predict_proba(result.head, X))
out["f32_val_curve"] = np.array([h["val_loss"] for h in result.history])
scores = evaluate(y[val], predict(result.head, X[val]), int(data["n_classes"]), comm)
labels = encode_labels([json.loads(t) for t in shard(data["label_json"])], comm)
out["label_ids"] = gather_rows(labels.ids)

Xm, ym = shard(data["Xm"]), shard(data["ym"])
mlp = fit(Xm.astype(np.float64), ym, 2, comm, FitOptions(head="mlp", hidden=16, l2=1e-2, max_iter=2000, tol=1e-8, seed=3))
out["mlp_converged"] = np.array([mlp.converged, mlp.n_iter])
out["mlp_probs"] = gather_rows(predict_proba(mlp.head, Xm))
mlp32 = fit(Xm, ym, 2, comm, FitOptions(head="mlp", hidden=16, l2=1e-4, max_iter=300, seed=3))
out["mlp32_probs"] = gather_rows(predict_proba(mlp32.head, Xm))
adam = fit(Xm.astype(np.float64), ym, 2, comm, FitOptions(head="mlp", hidden=16, optimizer="adam", lr=0.05, max_iter=60, seed=3))
out["adam_probs"] = gather_rows(predict_proba(adam.head, Xm))

info = {"scores": scores, "best_iteration": result.best_iteration, "stopped_early": result.stopped_early,
        "n_iter": result.n_iter, "n_train": result.n_train, "n_val": result.n_val,
        "class_names": labels.class_names, "n_missing": labels.n_missing,
        "fingerprint": data_fingerprint(ids, y, comm=comm)}
if rank == 0:
    np.savez(sys.argv[2], info=json.dumps(info), **out)
