"""Classification metrics over rows sharded across ranks: one all-reduce of the confusion counts.

Conventions follow ``sklearn.metrics``: the confusion matrix has true classes
as rows and predicted classes as columns; macro-F1 averages the per-class F1
over the classes that occur as a true or a predicted label (a class with
neither is left out; one with zero precision and recall scores 0).
"""

import numpy as np

from hpcllm.world.collective import sum_all


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, comm=None) -> np.ndarray:
    """int64 ``[n_classes, n_classes]`` global counts (collective)."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    local = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return sum_all(comm, local.astype(np.int64)).reshape(n_classes, n_classes)


def scores(confusion: np.ndarray) -> dict:
    """accuracy, macro_f1, per-class precision / recall / f1 / support from a confusion matrix."""
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    total = confusion.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    present = (support + predicted) > 0
    return {"n": int(total), "accuracy": float(tp.sum() / total) if total else float("nan"),
            "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
            "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": support.astype(int).tolist()}


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, comm=None) -> dict:
    """``scores`` of the sharded predictions plus the confusion matrix (as nested lists, JSON-ready)."""
    confusion = confusion_matrix(y_true, y_pred, n_classes, comm)
    return dict(scores(confusion), confusion=confusion.tolist())
