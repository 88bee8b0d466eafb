"""The BPE merge loop of one piece: symbols in a linked list, merged lowest rank first,
leftmost on ties (HF's order). Short pieces scan; long ones use a heap (O(n log n))."""

import numpy as np
from numba import njit

from .bpe_tables import EMPTY, lookup

NO_RANK = np.int64(1) << 62


@njit(nogil=True, cache=True, inline="always")
def _pair(mtab, a, b):
    """(rank, new_id) of merging ids a, b, or (NO_RANK, -1)."""
    v = lookup(mtab, (np.int64(a) << 32) | b)
    if v == EMPTY:
        return NO_RANK, -1
    return v >> 32, np.int32(v & 0xFFFFFFFF)


@njit(nogil=True, cache=True)
def merge_scan(sym, nxt, prv, n, mtab, rank, new):
    """Short pieces: repeatedly merge the lowest-rank, leftmost adjacent pair."""
    for k in range(n - 1):
        rank[k], new[k] = _pair(mtab, sym[k], sym[k + 1])
    rank[n - 1] = NO_RANK
    while True:
        best = -1
        br = NO_RANK
        k = 0
        while k >= 0:
            if rank[k] < br:
                br = rank[k]
                best = k
            k = nxt[k]
        if best < 0:
            return
        r = nxt[best]
        sym[best] = new[best]
        nxt[best] = nxt[r]
        if nxt[r] >= 0:
            prv[nxt[r]] = best
            rank[best], new[best] = _pair(mtab, sym[best], sym[nxt[r]])
        else:
            rank[best] = NO_RANK
        p = prv[best]
        if p >= 0:
            rank[p], new[p] = _pair(mtab, sym[p], sym[best])


# A 4-ary min-heap of int64 keys: half the depth of a binary heap, and the four
# children share a cache line, which matters for pieces of a million bytes.
@njit(nogil=True, cache=True)
def _heap_push(hk, size, key):
    i = size
    while i > 0:
        p = (i - 1) >> 2
        if hk[p] <= key:
            break
        hk[i] = hk[p]
        i = p
    hk[i] = key
    return size + 1


@njit(nogil=True, cache=True)
def _heap_pop(hk, size):
    """Remove the root (the caller read hk[0]); returns the new size."""
    size -= 1
    key = hk[size]
    i = 0
    while True:
        c = 4 * i + 1
        if c >= size:
            break
        m = c
        for j in range(c + 1, min(c + 4, size)):
            if hk[j] < hk[m]:
                m = j
        if key <= hk[m]:
            break
        hk[i] = hk[m]
        i = m
    hk[i] = key
    return size


@njit(nogil=True, cache=True)
def merge_heap(sym, nxt, prv, n, mtab, rank, new, hk):
    """Long pieces: HF's merge loop, a heap keyed (rank, position), O(n log n).

    rank[k]/new[k] always describe the current pair at k. A popped entry is
    stale when its left symbol was merged away or the pair at its position has
    changed since the push; a changed pair spans more bytes, so it is another
    pair with another rank, and comparing ranks is HF's check (same new id).
    """
    size = 0
    for k in range(n - 1):
        rank[k], new[k] = _pair(mtab, sym[k], sym[k + 1])
        if new[k] >= 0:
            size = _heap_push(hk, size, (rank[k] << 32) | k)
    rank[n - 1] = NO_RANK
    while size > 0:
        key = hk[0]
        size = _heap_pop(hk, size)
        pos = key & 0xFFFFFFFF
        if sym[pos] < 0 or rank[pos] != key >> 32:
            continue
        r = nxt[pos]
        sym[pos] = new[pos]
        sym[r] = -1
        nxt[pos] = nxt[r]
        if nxt[r] >= 0:
            prv[nxt[r]] = pos
            rank[pos], new[pos] = _pair(mtab, sym[pos], sym[nxt[r]])
            if new[pos] >= 0:
                size = _heap_push(hk, size, (rank[pos] << 32) | pos)
        else:
            rank[pos] = NO_RANK
        p = prv[pos]
        if p >= 0:
            rank[p], new[p] = _pair(mtab, sym[p], sym[pos])
            if new[p] >= 0:
                size = _heap_push(hk, size, (rank[p] << 32) | p)
