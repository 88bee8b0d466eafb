"""The validation split: exactly stratified, and a function of (doc id, label, seed) only."""

import numpy as np
import pytest

from hpcllm.train.split import data_fingerprint, row_hashes, validation_mask
from test_train_fixtures import one_torch_thread, warm_kernel_cache  # noqa: F401 (autouse)



def _data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.choice(5, size=n, p=[0.5, 0.3, 0.15, 0.049, 0.001])
    y[rng.choice(n, 40, replace=False)] = -1            # unlabelled rows
    return np.array([f"doc/{i}" for i in range(n)]), y


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25])
def test_each_class_sends_round_fraction_of_its_rows(fraction):
    ids, y = _data()
    mask = validation_mask(ids, y, fraction, seed=1)
    assert not mask[y < 0].any()
    for c in range(5):
        n = (y == c).sum()
        assert mask[y == c].sum() == min(int(np.floor(fraction * n + 0.5)), max(n - 1, 0)), c


def test_independent_of_row_order_and_sharding():
    ids, y = _data()
    mask = validation_mask(ids, y, 0.2, seed=3)
    perm = np.random.default_rng(5).permutation(len(y))
    np.testing.assert_array_equal(validation_mask(ids[perm], y[perm], 0.2, seed=3), mask[perm])
    # validation rows are the smallest hashes of their class: any shard's rows are judged alike
    h = row_hashes(ids, 3)
    for c in range(5):
        inside, outside = h[(y == c) & mask], h[(y == c) & ~mask]
        assert len(inside) == 0 or len(outside) == 0 or inside.max() < outside.min()


def test_seed_changes_the_split_and_bad_fraction_is_an_error():
    ids, y = _data()
    assert (validation_mask(ids, y, 0.2, seed=0) != validation_mask(ids, y, 0.2, seed=1)).sum() > 100
    with pytest.raises(ValueError, match="fraction"):
        validation_mask(ids, y, 1.0)


def test_fingerprint_ignores_order_but_not_labels():
    ids, y = _data(50)
    fp = data_fingerprint(ids, y)
    assert data_fingerprint(ids[::-1], y[::-1]) == fp
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 5
    assert data_fingerprint(ids, y2) != fp
