"""Tries over code points for the WordPiece kernels: every edge in one open-address hash
table, key = node * 0x110000 + code point."""

from typing import NamedTuple

import numpy as np
from numba import njit

N_CP = 0x110000
_MULT = np.uint64(0x9E3779B97F4A7C15)


class Trie(NamedTuple):
    keys: np.ndarray      # int64 edge keys node * N_CP + code point, -1 empty
    vals: np.ndarray      # int32 child node of each edge
    node_id: np.ndarray   # int32 token id of each node, -1 none
    mask: int             # len(keys) - 1


@njit(nogil=True, cache=True, inline="always")
def _slot(key, mask):
    return np.int64((np.uint64(key) * _MULT) >> np.uint64(32)) & mask


@njit(nogil=True, cache=True, inline="always")
def child(t, node, cp):
    """Child of trie node `node` along code point cp, or -1."""
    key = np.int64(node) * N_CP + cp
    s = _slot(key, t.mask)
    while True:
        k = t.keys[s]
        if k == key:
            return t.vals[s]
        if k < 0:
            return -1
        s = (s + 1) & t.mask


@njit(nogil=True, cache=True)
def build_trie(data, off, ids):
    """Trie of strings data[off[t]:off[t+1]] (code points) -> ids[t]."""
    size = 16
    while size < 2 * len(data) + 2:
        size *= 2
    mask = size - 1
    keys = np.full(size, -1, np.int64)
    vals = np.zeros(size, np.int32)
    node_id = np.full(len(data) + 1, -1, np.int32)
    n_nodes = 1
    for t in range(len(off) - 1):
        node = 0
        for j in range(off[t], off[t + 1]):
            key = np.int64(node) * N_CP + data[j]
            s = _slot(key, mask)
            while keys[s] >= 0 and keys[s] != key:
                s = (s + 1) & mask
            if keys[s] < 0:
                keys[s] = key
                vals[s] = n_nodes
                n_nodes += 1
            node = vals[s]
        node_id[node] = ids[t]
    return Trie(keys, vals, node_id[:n_nodes].copy(), np.int64(mask))


@njit(nogil=True, cache=True)
def walk(trie, cps):
    """Node reached from the root along cps, or -1."""
    node = 0
    for cp in cps:
        node = child(trie, node, cp)
        if node < 0:
            return -1
    return node
