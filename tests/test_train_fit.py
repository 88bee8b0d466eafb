"""The training core against scikit-learn and across world sizes (1, 2, 3 mpiexec ranks)."""

import json
import os

import numpy as np
import pytest

from conftest import REPO, mpirun
from hpcllm.train.fit import FitOptions, fit
from hpcllm.train.heads import predict, predict_proba
from test_train_fixtures import one_torch_thread, warm_kernel_cache  # noqa: F401 (autouse)

SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "train_fit.py")
L2 = 1e-3
WORLDS = (1, 2, 3)


def blobs(n=600, d=8, seed=0):
    """4 overlapping gaussian classes of unequal size (40/30/20/10 %), off-centre, unequal feature scales."""
    rng = np.random.default_rng(seed)
    y = rng.choice(4, size=n, p=[0.4, 0.3, 0.2, 0.1])
    centres = rng.normal(size=(4, d)) * 1.2
    X = (centres[y] + rng.normal(size=(n, d))) * rng.uniform(0.5, 3.0, d) + 4.0
    return X.astype(np.float32), y.astype(np.int64)


def xor(n=400, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    return X, (X[:, 0] * X[:, 1] > 0).astype(np.int64)


def standardised(X):
    X = X.astype(np.float64)
    return (X - X.mean(0)) / X.std(0)


def sklearn_lr(X, y, class_weight=None):
    """scikit-learn's multinomial L-BFGS logistic regression with the C equal to our l2 (objective.py)."""
    from sklearn.linear_model import LogisticRegression

    counts = np.bincount(y)
    row_w = np.ones(len(y)) if class_weight is None else (len(y) / (len(counts) * counts))[y]
    lr = LogisticRegression(C=1.0 / (L2 * row_w.sum()), tol=1e-12, max_iter=10000, class_weight=class_weight)
    return lr.fit(standardised(X), y)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """world size -> the script's saved outputs."""
    d = tmp_path_factory.mktemp("train_fit")
    X, y = blobs()
    Xm, ym = xor()
    ids = np.array([f"doc-{i}" for i in range(len(y))])
    values = [None if i % 17 == 0 else (int(c) if c % 2 else f"class {c}") for i, c in enumerate(y)]
    np.savez(d / "in.npz", X=X, y=y, ids=ids, n_classes=4, l2=L2, Xm=Xm, ym=ym,
             label_json=np.array([json.dumps(v) for v in values]))
    out = {}
    for k in WORLDS:
        mpirun(k, [SCRIPT, d / "in.npz", d / f"out{k}.npz"], python_module="mpi4py", timeout=120)
        got = dict(np.load(d / f"out{k}.npz"))
        got["info"] = json.loads(str(got["info"]))
        out[k] = got
    return out


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_linear_head_matches_sklearn(worlds, world, class_weight):
    X, y = blobs()
    sk = sklearn_lr(X, y, class_weight)
    name = "plain" if class_weight is None else "balanced"
    W, b = worlds[world][f"{name}_W"], worlds[world][f"{name}_b"]
    assert np.abs(W - sk.coef_).max() <= 1e-3 * np.abs(sk.coef_).max()
    # multinomial intercepts are defined up to a common shift: ours sum to 0 (gradients do)
    assert abs(b.sum()) < 1e-9
    np.testing.assert_allclose(b, sk.intercept_ - sk.intercept_.mean(), atol=1e-3 * np.abs(sk.intercept_).max())
    np.testing.assert_array_equal(worlds[world][f"{name}_pred"], sk.predict(standardised(X)))


def test_balanced_weights_are_sklearns(worlds):
    from sklearn.utils.class_weight import compute_class_weight

    _, y = blobs()
    expected = compute_class_weight("balanced", classes=np.arange(4), y=y)
    for k in WORLDS:
        np.testing.assert_allclose(worlds[k]["balanced_weights"], expected, rtol=1e-12)
        np.testing.assert_array_equal(worlds[k]["plain_weights"], np.ones(4))


@pytest.mark.parametrize("world", WORLDS[1:])
def test_all_reduced_training_equals_single_rank(worlds, world):
    one, many = worlds[1], worlds[world]
    for name in ("plain", "balanced"):
        np.testing.assert_allclose(many[f"{name}_W"], one[f"{name}_W"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(many[f"{name}_curve"], one[f"{name}_curve"], rtol=1e-6)
    np.testing.assert_allclose(many["empty_rank_W"], one["plain_W"], rtol=0, atol=1e-6)   # a rank without rows
    # float32 compute, stopped early mid-descent: the summation-order drift is not damped by convergence
    for key, atol in (("f32_probs", 1e-4), ("mlp_probs", 1e-5), ("adam_probs", 1e-5), ):
        diff = np.abs(many[key] - one[key]).max()
        print(f"world {world}: {key} differs from world 1 by {diff:.2e}")
        assert diff <= atol, key
    np.testing.assert_allclose(many["f32_val_curve"], one["f32_val_curve"], rtol=1e-4)
    # float32, non-convex, stopped by max_iter: the drift grows (~2e-3 in probabilities), labels still agree
    assert (many["mlp32_probs"].argmax(1) == one["mlp32_probs"].argmax(1)).mean() >= 0.99
    for key in ("val_mask", "label_ids"):
        np.testing.assert_array_equal(many[key], one[key])
    for key in ("scores", "best_iteration", "n_train", "n_val", "class_names", "n_missing", "fingerprint"):
        assert many["info"][key] == one["info"][key], key


def test_distributed_metrics_match_sklearn(worlds):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    _, y = blobs()
    got = worlds[3]
    val = got["val_mask"]
    pred = got["f32_probs"][val].argmax(1)
    scores = got["info"]["scores"]
    assert scores["n"] == val.sum() == got["info"]["n_val"]
    assert scores["accuracy"] == pytest.approx(accuracy_score(y[val], pred), abs=1e-12)
    assert scores["macro_f1"] == pytest.approx(f1_score(y[val], pred, average="macro"), abs=1e-12)
    np.testing.assert_array_equal(scores["confusion"], confusion_matrix(y[val], pred, labels=range(4)))
    assert scores["accuracy"] > 0.7        # well above the 40 % majority class


def test_early_stopping_keeps_the_best_validation_round(worlds):
    info, curve = worlds[1]["info"], worlds[1]["f32_val_curve"]
    rounds = 2 * np.arange(1, len(curve) + 1)      # eval_every=2 in the script
    assert info["best_iteration"] == rounds[np.argmin(curve)]
    if info["stopped_early"]:
        assert len(curve) - 1 - np.argmin(curve) == 2  # patience=2


def test_labels_and_missing_across_ranks(worlds):
    info = worlds[2]["info"]
    assert info["class_names"] == ["1", "3", "class 0", "class 2"]   # numbers first, then strings
    _, y = blobs()
    assert info["n_missing"] == len(range(0, len(y), 17))


def test_mlp_learns_xor_that_a_linear_head_cannot(worlds):
    X, y = xor()
    linear = fit(X, y, 2, options=FitOptions(l2=1e-4))
    assert (predict(linear.head, X) == y).mean() < 0.7
    assert (worlds[1]["mlp_probs"].argmax(1) == y).mean() > 0.95
    assert (worlds[1]["adam_probs"].argmax(1) == y).mean() > 0.9


def test_mlp_rerun_is_bit_identical():
    X, y = xor()
    options = FitOptions(head="mlp", hidden=8, max_iter=30, seed=5)
    a, b = fit(X, y, 2, options=options), fit(X, y, 2, options=options)
    np.testing.assert_array_equal(predict_proba(a.head, X), predict_proba(b.head, X))
    c = fit(X, y, 2, options=FitOptions(head="mlp", hidden=8, max_iter=30, seed=6))
    assert not np.array_equal(predict_proba(a.head, X), predict_proba(c.head, X))


def test_bad_options_are_errors():
    X, y = xor(20)
    with pytest.raises(ValueError, match="optimizer"):
        fit(X, y, 2, options=FitOptions(optimizer="sgd"))
    with pytest.raises(ValueError, match="class_weight"):
        fit(X, y, 2, options=FitOptions(class_weight="inverse"))


FORTUNES = "/usr/share/games/fortunes"


def test_real_text_topics_from_fortune_files():
    """Debian's fortune files as topics, hashed bag-of-words features: the head beats the majority class
    clearly on a seeded stratified split (the oracle comparison is on the blobs above)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    from hpcllm.train.metrics import evaluate
    from hpcllm.train.split import validation_mask

    topics = ["computers", "food", "law", "medicine", "sports"]
    missing = [t for t in topics if not os.path.exists(os.path.join(FORTUNES, t))]
    assert not missing, f"{FORTUNES}: no {missing}; install Debian's fortunes package (tests/run.sh does)"
    texts, y = [], []
    for c, topic in enumerate(topics):
        with open(os.path.join(FORTUNES, topic), encoding="utf-8", errors="replace") as f:
            docs = [d.strip() for d in f.read().split("\n%\n") if d.strip()][:200]
        texts += docs
        y += [c] * len(docs)
    y = np.array(y)
    X = HashingVectorizer(n_features=1024, alternate_sign=False).transform(texts).toarray().astype(np.float32)
    val = validation_mask([f"{topics[c]}/{i}" for i, c in enumerate(y)], y, 0.2, seed=0)
    result = fit(X[~val], y[~val], len(topics), options=FitOptions(l2=1e-2))
    scores = evaluate(y[val], predict(result.head, X[val]), len(topics))
    majority = np.bincount(y[val]).max() / val.sum()
    print(f"fortunes, {len(topics)} topics, {val.sum()} held out: accuracy {scores['accuracy']:.3f}, "
          f"macro-F1 {scores['macro_f1']:.3f}, majority class {majority:.3f}")
    assert scores["accuracy"] > majority + 0.2
