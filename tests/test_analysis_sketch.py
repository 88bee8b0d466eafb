"""The quantile sketch against numpy.quantile on millions of values: within its stated relative error
(one pass, mergeable), and exact after refinement, also per group and when one bin holds millions."""

import numpy as np
import pytest

from hpcllm.analysis.sketch import COLLECT_LIMIT, RELATIVE_ERROR, Sketch, exact_quantiles

PROBS = [0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 0.99, 0.999, 1.0]
RNG = np.random.default_rng(7)
DATA = {
    "lognormal": RNG.lognormal(3.0, 1.5, 2_000_000),
    "normal": RNG.normal(-2.0, 30.0, 1_500_000),
    "integers": RNG.integers(0, 5000, 1_200_000).astype(np.float64),
    "zeros-and-tail": np.concatenate([np.zeros(1_000_000), RNG.exponential(1e-3, 200_000)]),
}


def sketch_of(x, parts=5):
    sketches = [Sketch() for _ in range(parts)]
    for s, block in zip(sketches, np.array_split(x, parts)):
        s.add(block)
    total = Sketch()
    for s in sketches:
        total.merge(s)               # mergeable: the sum of per-block sketches
    return total


@pytest.mark.parametrize("name", list(DATA))
def test_sketch_within_stated_error(name):
    x = DATA[name].copy()
    x[::1000] = np.nan                                 # NaN rows are counted apart, never ranked
    sk = sketch_of(x)
    clean = x[~np.isnan(x)]
    assert sk.n == clean.size and sk.nan == x.size - clean.size
    assert sk.min == clean.min() and sk.max == clean.max()
    np.testing.assert_allclose([sk.mean, sk.std], [clean.mean(), clean.std()], rtol=1e-9, atol=1e-12)
    srt = np.sort(clean)
    for p in PROBS:
        ref = np.quantile(clean, p)
        h = (clean.size - 1) * p
        bound = RELATIVE_ERROR * max(abs(srt[int(np.floor(h))]), abs(srt[min(int(np.floor(h)) + 1, clean.size - 1)]))
        assert abs(sk.quantile(p) - ref) <= bound + 1.2e-38, (p, sk.quantile(p), ref)


def test_integers_below_512_are_exact():
    x = RNG.integers(0, 512, 300_000).astype(np.float64)
    sk = sketch_of(x)
    for p in [0.0, 0.1, 0.5, 0.9, 1.0]:
        if ((x.size - 1) * p) % 1 == 0:
            assert sk.quantile(p) == np.quantile(x, p)


@pytest.mark.parametrize("name", list(DATA))
def test_exact_quantiles_equal_numpy(name):
    x = DATA[name]
    blocks = lambda: ((b, None) for b in np.array_split(x, 4))     # noqa: E731
    got = exact_quantiles(blocks, {None: sketch_of(x)}, PROBS)[None]
    assert [got[p] for p in PROBS] == list(np.quantile(x, PROBS))


def test_exact_quantiles_when_one_bin_holds_millions_and_per_group():
    x = 1.0 + RNG.random(COLLECT_LIMIT + 500_000) * 0.003          # all in one 2**-8-wide bin
    g = RNG.integers(0, 3, x.size)
    sketches = {k: sketch_of(x[g == k], 2) for k in range(3)}
    sketches[None] = sketch_of(x, 2)
    blocks = lambda: ((b, gb) for b, gb in zip(np.array_split(x, 3), np.array_split(g, 3)))  # noqa: E731
    got = exact_quantiles(blocks, {k: sketches[k] for k in range(3)}, [0.2, 0.6])
    for k in range(3):
        assert got[k] == {p: np.quantile(x[g == k], p) for p in (0.2, 0.6)}
    whole = exact_quantiles(lambda: ((b, None) for b in np.array_split(x, 3)), {None: sketches[None]}, [0.6])
    assert whole[None][0.6] == np.quantile(x, 0.6)
