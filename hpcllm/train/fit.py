"""Train a head on embeddings sharded over the ranks: full-batch L-BFGS (or Adam), all-reduced.

Every rank passes only its shard ``X [n_local, d]``, ``y [n_local]`` (and
optionally its shard of the validation rows); nothing is gathered, so memory
per rank is 1/world of the data.  The loss and gradient are global
(``objective.ShardedObjective``): one float64 reduction per evaluation, the
same bits on every rank, so every rank takes the same steps and the same
branches.

Determinism: for a given seed, data and world size the result is bit-for-bit
reproducible (fixed initialisation from ``seed``, full-batch optimisers with
no sampling, fixed-order reductions).  Across world sizes only the
floating-point summation order of the per-rank partial sums changes (the
rows a rank sums, then the tree over ranks), so the gradients differ in the
last bits.  What that does to the result (measured in tests/test_train_fit.py,
1 vs 2 vs 3 ranks):

* converged (convex logistic regression; an MLP run to its gradient
  tolerance): weights agree to ~1e-6, loss curves to ~1e-6 relative;
* stopped mid-descent in float32 (early stopping): probabilities ~1e-5;
* a float32 MLP stopped by ``max_iter`` (non-convex, L-BFGS's line-search
  branches amplify the drift): probabilities ~1e-3, labels agree.

``X``'s dtype is the compute dtype: float32 embeddings train in float32 with
float64 reductions; pass float64 for the tighter agreement above.

Early stopping: with validation rows, the class-weighted validation loss is
measured every ``eval_every`` iterations; after ``patience`` rounds without
improvement training stops, and the head of the best round is kept.
"""

import copy
import dataclasses
import math

import numpy as np
import torch

from hpcllm.train.heads import build_head
from hpcllm.train.objective import ShardedObjective, class_weights, standardisation
from hpcllm.world.collective import sum_all


@dataclasses.dataclass
class FitOptions:
    head: str = "linear"            # "linear" (multinomial logistic regression) | "mlp"
    l2: float = 1e-4                # on weight matrices; sklearn C = 1 / (l2 * sum of row weights)
    class_weight: object = None     # None | "balanced" | {class_id: weight}
    optimizer: str = "lbfgs"        # "lbfgs" (full batch, strong Wolfe) | "adam" (full batch)
    max_iter: int = 1000            # L-BFGS iterations or Adam steps
    tol: float = 1e-6               # L-BFGS: stop when every gradient entry is below this
    history_size: int = 20          # L-BFGS memory
    lr: float = 1e-2                # Adam step size
    hidden: int = 256               # MLP hidden units
    activation: str = "gelu"        # MLP: "gelu" | "relu"
    dropout: float = 0.0            # MLP; > 0 makes the forward pass random (seeded per rank)
    standardise: bool = True        # fold the training data's mean / std into the head
    seed: int = 0
    patience: int = 5               # rounds without validation improvement before stopping
    eval_every: int = 20            # iterations per round (validation, history)


@dataclasses.dataclass
class FitResult:
    head: torch.nn.Module
    class_weights: np.ndarray       # [n_classes] float64, as used in the loss
    history: list                   # per round: iteration, train_loss, val_loss
    n_iter: int
    converged: bool                 # the optimiser's own stopping test fired
    stopped_early: bool             # validation patience ran out
    best_iteration: int             # the iteration whose head is returned
    n_train: int                    # global counts
    n_val: int


def _new_head(d: int, n_classes: int, options: FitOptions, dtype) -> torch.nn.Module:
    config = {"kind": options.head, "d": d, "n_classes": n_classes}
    if options.head == "mlp":
        config.update(hidden=options.hidden, activation=options.activation, dropout=options.dropout)
    return build_head(config, seed=options.seed).to(dtype)


class _LBFGSRounds:
    """torch's L-BFGS, run ``k`` iterations at a time, keeping its memory between rounds."""

    def __init__(self, objective: ShardedObjective, options: FitOptions):
        self.opt = torch.optim.LBFGS(objective.params, lr=1.0, max_iter=options.eval_every,
                                     tolerance_grad=options.tol, tolerance_change=1e-12,
                                     history_size=options.history_size, line_search_fn="strong_wolfe")
        self.closure = objective.loss_and_grad

    def __call__(self, k: int) -> tuple:
        group = self.opt.param_groups[0]
        group["max_iter"], group["max_eval"] = k, 4 * k
        state = self.opt.state[self.opt._params[0]]
        before_iter, before_evals = state.get("n_iter", 0), state.get("func_evals", 0)
        self.opt.step(self.closure)
        done, evals = state["n_iter"] - before_iter, state["func_evals"] - before_evals
        return done, done < k and evals < 4 * k     # stopped on its own: converged or no progress


class _AdamRounds:
    def __init__(self, objective: ShardedObjective, options: FitOptions):
        self.opt = torch.optim.Adam(objective.params, lr=options.lr)
        self.objective = objective

    def __call__(self, k: int) -> tuple:
        for _ in range(k):
            self.objective.loss_and_grad()
            self.opt.step()
        return k, False


class _EarlyStopping:
    """Keeps the head with the lowest validation loss; says when ``patience`` rounds brought none lower."""

    def __init__(self, patience: int):
        self.patience, self.best, self.bad = patience, math.inf, 0
        self.best_state, self.best_iteration = None, 0

    def update(self, val_loss: float, head, iteration: int) -> bool:
        if val_loss < self.best:
            self.best, self.bad, self.best_iteration = val_loss, 0, iteration
            self.best_state = copy.deepcopy(head.state_dict())
            return False
        self.bad += 1
        return self.bad >= self.patience


def fit(X: np.ndarray, y: np.ndarray, n_classes: int, comm=None, options: FitOptions = None,
        X_val: np.ndarray = None, y_val: np.ndarray = None) -> FitResult:
    """Train a head on this rank's shard ``(X, y)`` of the training rows (labels 0..n_classes-1).

    Collective: every rank of ``comm`` must call it (``comm=None``: one process),
    with the same ``n_classes`` and ``options``; shards may be empty.
    """
    options = options or FitOptions()
    if options.optimizer not in ("lbfgs", "adam") or options.head not in ("linear", "mlp"):
        raise ValueError(f"unknown optimizer {options.optimizer!r} or head {options.head!r}")
    X = np.ascontiguousarray(X)
    y = np.asarray(y, dtype=np.int64)
    if X_val is None:
        X_val, y_val = X[:0], y[:0]
    head = _new_head(X.shape[1], n_classes, options, torch.float64 if X.dtype == np.float64 else torch.float32)
    if options.standardise:
        head.set_standardisation(*standardisation(X, comm))
    weights = class_weights(y, n_classes, options.class_weight, comm)
    objective = ShardedObjective(head, X, y, weights, options.l2, comm)
    n_train, n_val = (int(v) for v in sum_all(comm, np.array([len(y), len(y_val)], np.int64)))
    rounds = {"lbfgs": _LBFGSRounds, "adam": _AdamRounds}[options.optimizer](objective, options)
    stopping = _EarlyStopping(options.patience) if n_val else None
    history, n_iter, converged, stopped = [], 0, False, False
    while n_iter < options.max_iter and not (converged or stopped):
        done, converged = rounds(min(options.eval_every, options.max_iter - n_iter))
        n_iter += done
        val_loss = objective.mean_loss(X_val, y_val) if n_val else None
        history.append({"iteration": n_iter, "train_loss": objective.loss(), "val_loss": val_loss})
        stopped = stopping is not None and stopping.update(val_loss, head, n_iter)
    best_iteration = n_iter
    if stopping is not None and stopping.best_state is not None:
        head.load_state_dict(stopping.best_state)
        best_iteration = stopping.best_iteration
    head.eval()
    return FitResult(head, weights, history, n_iter, converged, stopped, best_iteration, n_train, n_val)
