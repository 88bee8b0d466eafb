"""Streaming statistics of one numeric column: a mergeable quantile sketch and exact quantiles.

``Sketch`` (one pass, mergeable by adding counts) is a fixed-bin histogram
over the bit pattern of the values, a relative-error sketch in the spirit of
DDSketch / HDR histograms.  A float64's magnitude is cut to its exponent and
the top ``MANTISSA_BITS`` = 8 bits of its mantissa, so each bin spans
``[m, m * (1 + 2**-8))``; bins cover magnitudes 2**-126 .. 2**130 (float32's
range) for each sign, ``2**17`` bins, 1 MiB of int64 counts whatever the
number of rows.  A quantile is read at the lower edge (in magnitude) of the
bins that hold the two order statistics numpy's default ("linear") method
interpolates between, then clamped to the exact min/max, so

    |sketch.quantile(p) - numpy.quantile(x, p)| <= 2**-8 * max(|x_lo|, |x_hi|)

(0.39 % relative; ``RELATIVE_ERROR``), exact for integers below 512 and for
any value that is a bin edge.  Magnitudes below 2**-126 read as 0 (absolute
error < 1.2e-38) and above 2**130 as the top bin.  Count, NaN count, min, max,
mean and variance (Chan's merge of per-block moments) are exact.

``exact_quantiles`` gives numpy.quantile's value exactly with bounded memory:
starting from a Sketch it narrows each wanted order statistic's bin, in the
space of order-preserving 64-bit keys, by 2**16 sub-bins per further pass
over the data (at most 3 more passes, usually one), and sorts a bin's values
once it holds at most ``COLLECT_LIMIT`` of them (or reads the value when a bin
holds only one distinct value).
"""

from __future__ import annotations

import numpy as np

MANTISSA_BITS = 8
RELATIVE_ERROR = 2.0 ** -MANTISSA_BITS
_SHIFT = 52 - MANTISSA_BITS                 # float64 magnitude bits >> _SHIFT = exponent, top mantissa
_E0 = (1023 - 126) << MANTISSA_BITS          # lowest binned magnitude: 2**-126
_HALF = 1 << 16                              # bins per sign
N_BINS = 2 * _HALF
COLLECT_LIMIT = 1 << 21
_SIGN = np.uint64(1 << 63)


def _bins(x: np.ndarray) -> np.ndarray:
    """Bin index of each finite value (negatives below _HALF, in value order)."""
    mag = (np.abs(x).view(np.uint64) >> np.uint64(_SHIFT)).astype(np.int64)
    r = np.clip(mag - _E0, 0, _HALF - 1)
    return np.where(x < 0, _HALF - 1 - r, _HALF + r)


def _bin_value(idx: np.ndarray) -> np.ndarray:
    """The representative (magnitude lower edge, signed) of bins ``idx``; bin r=0 reads as 0."""
    idx = np.asarray(idx, np.int64)
    r = np.where(idx >= _HALF, idx - _HALF, _HALF - 1 - idx)
    mag = ((r + _E0).astype(np.uint64) << np.uint64(_SHIFT)).view(np.float64)
    mag = np.where(r == 0, 0.0, mag)
    return np.where(idx >= _HALF, mag, -mag)


def keys(x: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 keys of float64 values (-0.0 as 0.0; NaN must be removed)."""
    u = (np.asarray(x, np.float64) + 0.0).view(np.uint64)
    return np.where(u & _SIGN, ~u, u | _SIGN)


def from_keys(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, np.uint64)
    return np.where(k & _SIGN, k ^ _SIGN, ~k).view(np.float64)


def _bin_key_range(idx: int) -> tuple[int, int]:
    """Inclusive uint64 key range of the values that fall in bin ``idx``."""
    r = idx - _HALF if idx >= _HALF else _HALF - 1 - idx
    lo = 0 if r == 0 else (r + _E0) << _SHIFT
    hi = (0x7FF << 52) if r == _HALF - 1 else ((r + 1 + _E0) << _SHIFT) - 1   # top bin: up to +inf
    if idx >= _HALF:
        return lo | (1 << 63), hi | (1 << 63)
    return (1 << 63) - 1 - hi, (1 << 63) - 1 - lo        # keys of negatives: ~(sign | magnitude)


def linear_quantile(a: float, b: float, t: float) -> float:
    """numpy's "linear" interpolation between order statistics a <= b (numpy._lerp, same rounding)."""
    d = b - a
    return float(b - d * (1 - t)) if t >= 0.5 else float(a + d * t)


def ranks(n: int, p: float) -> tuple[int, int, float]:
    """The two 0-based order statistics numpy.quantile(method="linear") uses, and the weight."""
    h = (n - 1) * p
    lo = int(np.floor(h))
    return lo, min(lo + 1, n - 1), h - lo


class Sketch:
    """Exact moments + the bit-pattern histogram of one column (see the module notes)."""

    def __init__(self):
        self.counts = np.zeros(N_BINS, np.int64)
        self.n = 0
        self.nan = 0
        self.min = np.inf
        self.max = -np.inf
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, values) -> None:
        x = np.asarray(values, np.float64).ravel()
        finite = ~np.isnan(x)
        self.nan += int(x.size - finite.sum())
        x = x[finite]
        if not x.size:
            return
        self.counts += np.bincount(_bins(x), minlength=N_BINS)
        self._merge_moments(x.size, float(x.mean()), float(((x - x.mean()) ** 2).sum()))
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))

    def _merge_moments(self, n: int, mean: float, m2: float) -> None:
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def merge(self, other: "Sketch") -> "Sketch":
        self.counts += other.counts
        self.nan += other.nan
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        if other.n:
            self._merge_moments(other.n, other.mean, other.m2)
        return self

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else float("nan")

    def bin_of_rank(self, rank: int) -> tuple[int, int]:
        """(bin index, rank within that bin) of the 0-based order statistic ``rank``."""
        cum = np.cumsum(self.counts)
        idx = int(np.searchsorted(cum, rank, side="right"))
        return idx, rank - (int(cum[idx - 1]) if idx else 0)

    def quantile(self, p: float) -> float:
        if not self.n:
            return float("nan")
        lo, hi, t = ranks(self.n, p)
        a, b = (float(np.clip(_bin_value(self.bin_of_rank(r)[0]), self.min, self.max)) for r in (lo, hi))
        return linear_quantile(a, b, t)

    def histogram(self, n_bins: int = 60, lo: float | None = None, hi: float | None = None,
                  log: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Counts on ``n_bins`` equal bins (log-spaced with ``log``) over [lo, hi], from the sketch bins."""
        lo = self.min if lo is None else lo
        hi = self.max if hi is None else hi
        if hi <= lo:
            hi = lo + 1.0
        edges = np.geomspace(lo, hi, n_bins + 1) if log else np.linspace(lo, hi, n_bins + 1)
        used = np.flatnonzero(self.counts)
        at = np.clip(_bin_value(used), self.min, self.max)
        where = np.clip(np.searchsorted(edges, at, side="right") - 1, 0, n_bins - 1)
        keep = (at >= lo) & (at <= hi)
        return np.bincount(where[keep], weights=self.counts[used][keep], minlength=n_bins), edges


# --------------------------------------------------------------------------- exact quantiles

class Local:
    """Reductions across the processes that share a computation: here, just one process.
    (hpcllm.analysis.filter passes an MPI version with the same methods.)"""

    def sum(self, a):
        return a

    def min(self, a):
        return a

    def max(self, a):
        return a

    def concat(self, a):
        return a


class _Target:
    """One wanted order statistic of one group, narrowed to a key range pass by pass."""

    def __init__(self, group, rank: int, sketch: Sketch):
        idx, self.rank = sketch.bin_of_rank(rank)
        self.group, self.count = group, int(sketch.counts[idx])
        self.klo, self.khi = _bin_key_range(idx)
        self.value = None

    def start_pass(self):
        self.width = -(-(self.khi - self.klo + 1) // _HALF)
        self.parts, self.sub = [], np.zeros(_HALF, np.int64)
        self.kmin, self.kmax = (1 << 64) - 1, 0

    def add(self, k: np.ndarray):
        k = k[(k >= np.uint64(self.klo)) & (k <= np.uint64(self.khi))]
        if not k.size:
            return
        self.kmin, self.kmax = min(self.kmin, int(k.min())), max(self.kmax, int(k.max()))
        if self.count <= COLLECT_LIMIT:
            self.parts.append(k)
        else:
            self.sub += np.bincount(((k - np.uint64(self.klo)) // np.uint64(self.width)).astype(np.int64),
                                    minlength=_HALF)

    def finish_pass(self, red):
        kmin = int(red.min(np.array([self.kmin], np.uint64))[0])
        kmax = int(red.max(np.array([self.kmax], np.uint64))[0])
        if kmin == kmax:
            self.value = float(from_keys(np.array([kmin], np.uint64))[0])
        elif self.count <= COLLECT_LIMIT:
            k = np.sort(red.concat(np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint64)))
            self.value = float(from_keys(k[self.rank:self.rank + 1])[0])
        else:
            cum = np.cumsum(red.sum(self.sub))
            b = int(np.searchsorted(cum, self.rank, side="right"))
            self.rank -= int(cum[b - 1]) if b else 0
            self.count = int(cum[b] - (cum[b - 1] if b else 0))
            self.klo += b * self.width
            self.khi = min(self.khi, self.klo + self.width - 1)
        self.parts = self.sub = None


def exact_quantiles(blocks, sketches: dict, probs, red=None) -> dict:
    """``{group: {p: numpy.quantile(values of group, p)}}`` exactly, in bounded memory.

    ``blocks()`` yields ``(values float64, groups)`` over the data again on
    every call (``groups`` an array of group keys, or None for one group
    ``None``); ``sketches`` holds each group's Sketch of the same values (NaN
    rows are skipped, as the Sketch skips them).  ``red`` reduces across MPI
    ranks when the data is split between them (default: one process).
    """
    red = red or Local()
    targets, want = {}, {}
    for g, sk in sketches.items():
        for p in probs:
            if sk.n:
                lo, hi, t = ranks(sk.n, p)
                for r in (lo, hi):
                    targets.setdefault((g, r), None)
                want[g, p] = (lo, hi, t)
    targets = {key: _Target(key[0], key[1], sketches[key[0]]) for key in targets}
    while active := [t for t in targets.values() if t.value is None]:
        for t in active:
            t.start_pass()
        for values, groups in blocks():
            x = np.asarray(values, np.float64)
            ok = ~np.isnan(x)
            for g in {t.group for t in active}:
                sel = ok if groups is None else ok & (groups == g)
                k = keys(x[sel])
                for t in active:
                    if t.group == g:
                        t.add(k)
        for t in active:
            t.finish_pass(red)
    out = {g: {} for g in sketches}
    for (g, p), (lo, hi, t) in want.items():
        out[g][p] = linear_quantile(targets[g, lo].value, targets[g, hi].value, t)
    for g, sk in sketches.items():
        for p in probs:
            out[g].setdefault(p, float("nan"))
    return out
