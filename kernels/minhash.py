"""MinHash signatures of normalised documents, band keys, and connected components, as Numba kernels.

Documents are flat UTF-8 bytes cut by offsets (``buf[offsets[d]:offsets[d+1]]``),
already normalised (``hpcllm.dedup.text``: words separated by one ASCII space).
A shingle is ``n`` consecutive words (the bytes from the first word's start to
the last one's end, single spaces included) or ``n`` consecutive characters
(UTF-8 code points); a document shorter than ``n`` is one shingle, an empty one
has none (its signature stays all 0xFFFFFFFF).

Signatures follow datasketch 2.0's default scheme ("affine32"): a shingle's
32-bit hash ``h`` is mixed by MurmurHash3's fmix32, then permutation ``i`` is
``a[i] * h + b[i] mod 2**32`` with ``a`` odd; ``a, b`` are drawn as datasketch
draws them from ``numpy.random.RandomState(seed)`` (``permutations``).  The
shingle hash is not datasketch's sha1 of the bytes (the slow part there): each
word (character) is hashed once, FNV-1a 64 of its bytes, and a shingle's hash
combines its units' hashes (``_shingle_hash``), so a word is read once, not
``n`` times.  The signatures equal ``datasketch.MinHash(num_perm, seed,
hashfunc=shingle_hash(words))``'s for the same shingles (tests/test_dedup.py
holds them equal).
"""

import numpy as np
from numba import njit, prange

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
M32 = np.uint64(0xFFFFFFFF)
COMBINE = np.uint64(0x9E3779B97F4A7C15)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch 2.0's affine32 parameters (a odd, b) for ``num_perm`` permutations, uint32."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


@njit(nogil=True, cache=True)
def fnv1a64(buf, start, end):
    h = FNV_OFFSET
    for i in range(start, end):
        h = (h ^ np.uint64(buf[i])) * FNV_PRIME
    return h


def shingle_hash(words: bool):
    """The kernel's shingle hash as a Python function of a shingle's UTF-8 bytes (datasketch's ``hashfunc``)."""
    def hash32(data: bytes) -> int:
        units = data.split(b" ") if words else [c.encode() for c in data.decode()]
        uh = np.array([fnv1a64(np.frombuffer(u, np.uint8), 0, len(u)) for u in units], np.uint64)
        return int(_shingle_hash(uh, 0, len(uh)))
    return hash32


@njit(nogil=True, cache=True, inline="always")
def _fmix32(h):
    """MurmurHash3's finalizer on a uint64 holding a value < 2**32 (Numba widens uint32 products)."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & M32
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & M32
    return h ^ (h >> np.uint64(16))


@njit(nogil=True, cache=True, inline="always")
def _fmix64(h):
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


@njit(nogil=True, cache=True, inline="always")
def _shingle_hash(uh, first, last):
    """The shingle of units first..last-1: their FNV-1a 64 hashes combined (xor, multiply), fmix64, low 32 bits."""
    h = np.uint64(0)
    for t in range(first, last):
        h = (h ^ uh[t]) * COMBINE
    return _fmix64(h) & M32


@njit(nogil=True, cache=True, inline="always")
def _update(sig, a, b, h32):
    h = _fmix32(h32)
    for i in range(sig.shape[0]):
        sig[i] = min(sig[i], np.uint32((np.uint64(a[i]) * h + np.uint64(b[i])) & M32))   # branch-free: vectorises


@njit(nogil=True, cache=True)
def _units(buf, start, end, words, out_s, out_e):
    """Word (or character) starts and ends of one document into out_s / out_e; returns how many."""
    k = 0
    if words:
        i = start
        while i < end:
            while i < end and buf[i] == 32:
                i += 1
            if i == end:
                break
            out_s[k] = i
            while i < end and buf[i] != 32:
                i += 1
            out_e[k] = i
            k += 1
    else:
        for i in range(start, end):
            if (buf[i] & 0xC0) != 0x80:     # a code point starts here
                if k:
                    out_e[k - 1] = i
                out_s[k] = i
                k += 1
        if k:
            out_e[k - 1] = end
    return k


@njit(nogil=True, cache=True)
def _unit_hashes(buf, s, e, words):
    """FNV-1a 64 of each word (character) of one document, in order."""
    us = np.empty(e - s, np.int64)
    ue = np.empty(e - s, np.int64)
    k = _units(buf, s, e, words, us, ue)
    uh = np.empty(k, np.uint64)
    for t in range(k):
        uh[t] = fnv1a64(buf, us[t], ue[t])
    return uh


@njit(nogil=True, cache=True)
def _doc_shingles(buf, s, e, n, words):
    """The 32-bit hashes (uint64) of one document's shingles, in order (none for an empty document)."""
    uh = _unit_hashes(buf, s, e, words)
    k = len(uh)
    out = np.empty(max(k - n + 1, 1) if k else 0, np.uint64)
    for j in range(len(out)):
        out[j] = _shingle_hash(uh, j, min(j + n, k))
    return out


@njit(nogil=True, cache=True, parallel=True)
def signatures(buf, offsets, n, words, a, b):
    """uint32[n_docs, num_perm] signatures and int64[n_docs] shingle counts (see the module notes)."""
    n_docs, num_perm = len(offsets) - 1, len(a)
    sig = np.full((n_docs, num_perm), np.uint32(0xFFFFFFFF), np.uint32)
    count = np.zeros(n_docs, np.int64)
    for d in prange(n_docs):
        uh = _unit_hashes(buf, offsets[d], offsets[d + 1], words)
        k = len(uh)
        count[d] = max(k - n + 1, 1) if k else 0
        for j in range(count[d]):
            _update(sig[d], a, b, _shingle_hash(uh, j, min(j + n, k)))
    return sig, count


@njit(nogil=True, cache=True, parallel=True)
def shingle_sets(buf, offsets, n, words):
    """Each document's distinct shingle hashes, sorted: (uint32 flat values, int64 offsets [n_docs + 1])."""
    n_docs = len(offsets) - 1
    lens = np.zeros(n_docs + 1, np.int64)
    for d in prange(n_docs):
        lens[d + 1] = len(np.unique(_doc_shingles(buf, offsets[d], offsets[d + 1], n, words)))
    out_off = np.cumsum(lens)
    flat = np.empty(out_off[-1], np.uint32)
    for d in prange(n_docs):
        u = np.unique(_doc_shingles(buf, offsets[d], offsets[d + 1], n, words))
        flat[out_off[d]:out_off[d + 1]] = u.astype(np.uint32)
    return flat, out_off


@njit(nogil=True, cache=True, parallel=True)
def band_keys(sig, bands, rows):
    """uint64[n_docs, bands]: FNV-1a 64 of band j's ``rows`` values (j mixed in), per document."""
    n_docs = sig.shape[0]
    out = np.empty((n_docs, bands), np.uint64)
    for d in prange(n_docs):
        for j in range(bands):
            h = (FNV_OFFSET ^ np.uint64(j)) * FNV_PRIME
            for r in range(j * rows, (j + 1) * rows):
                v = np.uint64(sig[d, r])
                for s in range(4):
                    h = (h ^ ((v >> np.uint64(8 * s)) & np.uint64(0xFF))) * FNV_PRIME
            out[d, j] = h
    return out


@njit(nogil=True, cache=True, parallel=True)
def doc_hashes(buf, offsets):
    """uint64 FNV-1a 64 of each whole document (exact duplicates), fmix64 to spread the bits."""
    n_docs = len(offsets) - 1
    out = np.empty(n_docs, np.uint64)
    for d in prange(n_docs):
        out[d] = _fmix64(fnv1a64(buf, offsets[d], offsets[d + 1]))
    return out


@njit(nogil=True, cache=True)
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(nogil=True, cache=True)
def components(n, a, b):
    """Connected components of nodes 0..n-1 under edges (a[i], b[i]): each node's smallest node."""
    parent = np.arange(n)
    for i in range(len(a)):
        ra, rb = _find(parent, a[i]), _find(parent, b[i])
        if ra < rb:
            parent[rb] = ra
        elif rb < ra:
            parent[ra] = rb
    for x in range(n):
        parent[x] = _find(parent, x)
    return parent
