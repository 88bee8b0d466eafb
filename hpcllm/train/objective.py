"""The training objective over data sharded across ranks.

    loss(theta) = sum_i w_i CE(head(x_i), y_i) / sum_i w_i  +  l2/2 * sum ||W||^2

where the sums run over the GLOBAL training rows (every rank's shard), ``w_i``
is the class weight of row i's class, and ``W`` are the head's weight matrices
(biases are not penalised).  A rank computes its shard's weighted sum and its
gradient, and one reduction (``hpcllm.world.collective.sum_all``, float64) of the packed
``[loss, grads...]`` vector gives every rank the same global loss and gradient,
bit for bit, so all ranks take identical optimiser steps.  Nothing but that
vector (one float per parameter, plus one) crosses the network.

Relation to scikit-learn: ``LogisticRegression(C)`` minimises
``C * sum_i w_i CE_i + ||W||^2 / 2``, the same minimiser as ``l2 = 1 / (C * sum_i w_i)``.
"""

import numpy as np
import torch
import torch.nn.functional as F

from hpcllm.world.collective import sum_all


def class_weights(y: np.ndarray, n_classes: int, spec, comm) -> np.ndarray:
    """Per-class weights float64 ``[n_classes]`` from ``spec``.

    ``None``: all 1.  ``"balanced"``: ``n_samples / (n_present * count_c)`` with
    the counts all-reduced over the ranks and ``n_present`` the number of
    classes with at least one training row (scikit-learn's rule); a class
    without rows gets 0.  A dict ``{class_id: weight}``: those weights, 1 for
    the classes it does not name.
    """
    if spec is None:
        return np.ones(n_classes)
    if isinstance(spec, dict):
        weights = np.ones(n_classes)
        for cid, w in spec.items():
            if not 0 <= int(cid) < n_classes:
                raise ValueError(f"class weight for class id {cid}, but there are {n_classes} classes")
            weights[int(cid)] = float(w)
        return weights
    if spec != "balanced":
        raise ValueError(f"class_weight must be None, 'balanced' or a dict, not {spec!r}")
    counts = sum_all(comm, np.bincount(y, minlength=n_classes).astype(np.int64))
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def standardisation(X: np.ndarray, comm) -> tuple:
    """Global mean and standard deviation (population, as StandardScaler) of the columns of the
    sharded ``X``, in two passes of float64 sums; a constant column gets scale 1."""
    n = sum_all(comm, np.array([X.shape[0]], np.int64))[0]
    mean = sum_all(comm, X.sum(axis=0, dtype=np.float64)) / max(n, 1)
    sq = sum_all(comm, np.square(X - mean).sum(axis=0, dtype=np.float64)) / max(n, 1)
    std = np.sqrt(sq)
    return mean, np.where(std > 0, std, 1.0)


class ShardedObjective:
    """The loss above for ``head`` on this rank's shard ``(X, y)`` of the training data."""

    def __init__(self, head, X: np.ndarray, y: np.ndarray, weights: np.ndarray, l2: float, comm):
        self.head, self.l2, self.comm = head, float(l2), comm
        self.params = [p for p in head.parameters() if p.requires_grad]
        self.penalised = {id(p) for p in head.penalised()}
        self.X = torch.as_tensor(X)
        self.y = torch.as_tensor(y, dtype=torch.int64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.row_w = self.weights[self.y]
        self.weight_sum = float(sum_all(comm, np.array([self.row_w.sum().item()]))[0])
        if self.weight_sum <= 0:
            raise ValueError("no training rows with a positive class weight on any rank")
        self.evaluations = 0

    def _local_sum(self) -> torch.Tensor:
        """This shard's weighted cross-entropy sum, divided by the global weight sum (float64)."""
        ce = F.cross_entropy(self.head(self.X), self.y, reduction="none")
        return (ce.double() * self.row_w).sum() / self.weight_sum

    def penalty(self) -> float:
        return 0.5 * self.l2 * sum(float(p.detach().double().square().sum()) for p in self.head.penalised())

    def loss_and_grad(self) -> float:
        """Set every parameter's ``.grad`` to the global gradient; return the global loss."""
        self.evaluations += 1
        self.head.train()
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            local = self._local_sum()
            local.backward()
        packed = np.concatenate([[float(local.detach())]]
                                + [p.grad.detach().double().reshape(-1).numpy() for p in self.params])
        total = sum_all(self.comm, packed)
        offset = 1
        for p in self.params:
            g = torch.from_numpy(total[offset:offset + p.numel()]).view_as(p)
            if id(p) in self.penalised:
                g = g + self.l2 * p.detach().double()
            p.grad = g.to(p.dtype)
            offset += p.numel()
        return float(total[0]) + self.penalty()

    @torch.no_grad()
    def mean_loss(self, X, y) -> float:
        """Class-weighted mean cross-entropy (no penalty) over the sharded rows ``(X, y)``; NaN if none."""
        self.head.eval()
        y = torch.as_tensor(y, dtype=torch.int64)
        row_w = self.weights[y]
        local = 0.0
        if len(y):
            ce = F.cross_entropy(self.head(torch.as_tensor(X)), y, reduction="none")
            local = float((ce.double() * row_w).sum())
        total, weight = sum_all(self.comm, np.array([local, float(row_w.sum())]))
        return total / weight if weight > 0 else float("nan")

    def loss(self) -> float:
        """The training objective at the current parameters, without a gradient."""
        return self.mean_loss(self.X, self.y) + self.penalty()
