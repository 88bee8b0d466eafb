"""Open-addressing hash tables in numpy arrays, for the BPE kernels.

- int table: int64 key -> int64 value, (capacity, 2) array (merges: (a << 32 | b) -> rank << 32 | new id;
  added-token trie: node * 0x110000 + code point -> child node).
- bytes table: token byte strings -> token id (for `ignore_merges`).
- word cache: piece bytes -> its ids, one per worker thread, cleared when full
  (HF caches words too; most pieces of real text repeat).
"""

from typing import NamedTuple

import numpy as np
from numba import njit

EMPTY = np.int64(-(1 << 62))
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
CACHE_MAX_PIECE = 48  # bytes; longer pieces are rare and not worth storing


@njit(nogil=True, cache=True, inline="always")
def _slot(key, mask):
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(40)) & mask


def _capacity(n):
    """Power of two with load factor <= 1/2."""
    cap = 16
    while cap < 2 * n:
        cap *= 2
    return cap


@njit(nogil=True, cache=True)
def lookup(tab, key):
    """tab[:, 0] keys, tab[:, 1] values, side by side: one cache line per probe."""
    mask = len(tab) - 1
    s = _slot(key, mask)
    while True:
        k = tab[s, 0]
        if k == key:
            return tab[s, 1]
        if k == EMPTY:
            return EMPTY
        s = (s + 1) & mask


@njit(nogil=True, cache=True)
def _fill_int(tab, ks, vs):
    mask = len(tab) - 1
    for i in range(len(ks)):
        s = _slot(ks[i], mask)
        while tab[s, 0] != EMPTY and tab[s, 0] != ks[i]:
            s = (s + 1) & mask
        tab[s, 0] = ks[i]  # a later duplicate key overwrites, like HF's merge map
        tab[s, 1] = vs[i]


def int_table(ks, vs):
    """A (capacity, 2) int64 table holding ks[i] -> vs[i]; the last of duplicate keys wins."""
    tab = np.zeros((_capacity(len(ks)), 2), dtype=np.int64)
    tab[:, 0] = EMPTY
    _fill_int(tab, np.asarray(ks, dtype=np.int64), np.asarray(vs, dtype=np.int64))
    return tab


@njit(nogil=True, cache=True)
def trie_step(ttab, node, cp):
    v = lookup(ttab, np.int64(node) * 0x110000 + cp)
    return -1 if v == EMPTY else v


@njit(nogil=True, cache=True, inline="always")
def hash_bytes(b, start, n):
    """FNV-1a, 64 bit."""
    h = np.uint64(0xCBF29CE484222325)
    for i in range(start, start + n):
        h = (h ^ np.uint64(b[i])) * np.uint64(0x100000001B3)
    return np.int64(h >> np.uint64(1))


@njit(nogil=True, cache=True, inline="always")
def _same(a, a0, b, b0, n):
    for i in range(n):
        if a[a0 + i] != b[b0 + i]:
            return False
    return True


@njit(nogil=True, cache=True)
def _fill_bytes(slots, tok_bytes, tok_off):
    mask = len(slots) - 1
    for t in range(len(tok_off) - 1):
        a, n = tok_off[t], tok_off[t + 1] - tok_off[t]
        s = _slot(hash_bytes(tok_bytes, a, n), mask)
        while slots[s] >= 0:
            u = slots[s]
            if tok_off[u + 1] - tok_off[u] == n and _same(tok_bytes, tok_off[u], tok_bytes, a, n):
                break  # duplicate spelling: keep the first id
            s = (s + 1) & mask
        if slots[s] < 0:
            slots[s] = t


def bytes_table(tok_bytes, tok_off):
    """Slots (token id or -1) indexing the byte strings tok_bytes[tok_off[t]:tok_off[t+1]]."""
    slots = np.full(_capacity(len(tok_off) - 1), -1, dtype=np.int32)
    _fill_bytes(slots, tok_bytes, tok_off)
    return slots


@njit(nogil=True, cache=True)
def find_bytes(slots, tok_bytes, tok_off, pb, nb):
    """Id of the token spelled pb[:nb], or -1."""
    mask = len(slots) - 1
    s = _slot(hash_bytes(pb, 0, nb), mask)
    while slots[s] >= 0:
        u = slots[s]
        if tok_off[u + 1] - tok_off[u] == nb and _same(tok_bytes, tok_off[u], pb, 0, nb):
            return u
        s = (s + 1) & mask
    return -1


class WordCache(NamedTuple):
    slots: np.ndarray     # int32 hash slots -> entry, -1 empty (twice the entries)
    entries: np.ndarray   # int64 (n, 5): hash, key start, key length, ids start, ids count
    keys: np.ndarray      # uint8 pool of piece bytes
    ids: np.ndarray       # int32 pool of their ids
    state: np.ndarray     # int64 [entries used, key bytes used, ids used]


@njit(nogil=True, cache=True)
def cache_new(n_entries):
    """A word cache for up to n_entries pieces (a power of two)."""
    return WordCache(np.full(2 * n_entries, -1, dtype=np.int32), np.empty((n_entries, 5), dtype=np.int64),
                     np.empty(n_entries * 16, dtype=np.uint8), np.empty(n_entries * 8, dtype=np.int32),
                     np.zeros(3, dtype=np.int64))


@njit(nogil=True, cache=True)
def cache_get(C, h, pb, nb, out, o):
    """Append the cached ids of piece pb[:nb] (hash h) to out[o:]; -1 on a miss."""
    slots, entries, keys, ids = C.slots, C.entries, C.keys, C.ids
    mask = len(slots) - 1
    s = _slot(h, mask)
    while slots[s] >= 0:
        e = entries[slots[s]]
        if e[0] == h and e[2] == nb and _same(keys, e[1], pb, 0, nb):
            for i in range(e[4]):
                out[o + i] = ids[e[3] + i]
            return o + e[4]
        s = (s + 1) & mask
    return -1


@njit(nogil=True, cache=True)
def cache_put(C, h, pb, nb, out, o0, o1):
    """Remember piece pb[:nb] -> out[o0:o1]; clears the cache when it is full."""
    slots, entries, keys, ids, state = C.slots, C.entries, C.keys, C.ids, C.state
    if state[0] == len(entries) or state[1] + nb > len(keys) or state[2] + (o1 - o0) > len(ids):
        slots[:] = -1
        state[:] = 0
    e = state[0]
    entries[e, 0] = h
    entries[e, 1] = state[1]
    entries[e, 2] = nb
    entries[e, 3] = state[2]
    entries[e, 4] = o1 - o0
    keys[state[1]:state[1] + nb] = pb[:nb]
    ids[state[2]:state[2] + o1 - o0] = out[o0:o1]
    state[0] += 1
    state[1] += nb
    state[2] += o1 - o0
    mask = len(slots) - 1
    s = _slot(h, mask)
    while slots[s] >= 0:
        s = (s + 1) & mask
    slots[s] = e
