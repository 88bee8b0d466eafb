"""Metrics from confusion counts against sklearn.metrics (single process; 3 ranks in test_train_fit.py)."""

import numpy as np
import pytest

from hpcllm.train.metrics import evaluate
from test_train_fixtures import one_torch_thread, warm_kernel_cache  # noqa: F401 (autouse)



@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn_with_absent_and_never_predicted_classes(seed):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    y_true = rng.choice(6, size=300, p=[0.4, 0.3, 0.2, 0.1, 0.0, 0.0])   # classes 4, 5 never true
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.choice([0, 1, 2, 4], size=300))  # 3, 5 rarely / never
    got = evaluate(y_true, y_pred, 6)
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-15)
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-15)
    np.testing.assert_array_equal(got["confusion"], confusion_matrix(y_true, y_pred, labels=range(6)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(6), zero_division=0)
    np.testing.assert_allclose(got["precision"], p)
    np.testing.assert_allclose(got["recall"], r)
    np.testing.assert_allclose(got["f1"], f)
    assert got["support"] == s.tolist() and got["n"] == 300


def test_no_rows():
    got = evaluate(np.zeros(0, np.int64), np.zeros(0, np.int64), 3)
    assert got["n"] == 0 and np.isnan(got["accuracy"]) and got["confusion"] == [[0] * 3] * 3
