"""Byte-level BPE kernels: a batch of documents (one UTF-8 buffer + offsets) to
flat token ids + offsets, with the exact semantics of HF `tokenizers` 0.23.3.

Per document: decode UTF-8 (bad bytes -> U+FFFD, flagged), cut out added
tokens (non-normalized ones first, then normalized ones in the gaps, each
leftmost-longest like HF's Aho-Corasick), split the rest with the
pre-tokenizer regex (optionally after Digits), and BPE-merge each piece's
bytes: lowest merge rank first, leftmost on ties (HF's heap order). Pieces
are looked up in a per-thread word cache first, as HF does.

All lookup structures are open-addressing hash tables in numpy arrays
(see bpe_tables.py), passed in as one tuple `T`; the scalar settings as `P`.
"""

import numba
import numpy as np
from numba import njit, prange

from .regex_pretok import digits_end, piece_end
from .utf8 import decode_range, encode_one
from .bpe_tables import (CACHE_MAX_PIECE, EMPTY, cache_get, cache_new, cache_put,
                         find_bytes, hash_bytes, lookup, trie_step)

SMALL = 24  # pieces up to this many bytes merge by linear scan; longer ones use a heap
NO_RANK = np.int64(1) << 62

CACHE_MIN, CACHE_MAX = 1024, 1 << 16  # word cache entries per thread, by the bytes it will see
# T = (cls, fold, byte_ids, mtab, vslots, tok_bytes, tok_off, ttab, term, first)
#   cls/fold: regex_tables.npz (fold = exact_fold() for GPT-2); byte_ids: id of each byte's
#   symbol; mtab: merges; vslots/tok_bytes/tok_off: vocab spellings; ttab/term:
#   added-token trie (root 0: non-normalized tokens, root 1: normalized ones); first: bit r
#   set for code points that start a token under root r.
# P = (mode, digits, ignore_merges, unk_id, roots_used)


@njit(nogil=True, cache=True, inline="always")
def _pair(mtab, a, b):
    """(rank, new_id) of merging ids a, b, or (NO_RANK, -1)."""
    v = lookup(mtab, (np.int64(a) << 32) | b)
    if v == EMPTY:
        return NO_RANK, -1
    return v >> 32, np.int32(v & 0xFFFFFFFF)


@njit(nogil=True, cache=True)
def _merge_scan(sym, nxt, prv, n, mtab, rank, new):
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
def _merge_heap(sym, nxt, prv, n, mtab, rank, new, hk):
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


@njit(nogil=True, cache=True)
def _bpe(pb, nb, T, P, S, out, o):
    """BPE-merge the bytes pb[:nb] of one piece; append the ids to out[o:]. Returns o."""
    byte_ids, mtab = T[2], T[3]
    sym, nxt, prv, rank, new, hk = S
    if P[2]:  # ignore_merges: a piece that is a whole vocab token is emitted as is
        t = find_bytes(T[4], T[5], T[6], pb, nb)
        if t >= 0:
            out[o] = t
            return o + 1
    n = 0
    for k in range(nb):
        b = byte_ids[pb[k]]
        if b < 0:
            b = P[3]  # unk (HF drops the byte when the model has no unk token)
        if b >= 0:
            sym[n] = b
            n += 1
    if n == 0:
        return o
    for k in range(n):
        nxt[k] = k + 1
        prv[k] = k - 1
    nxt[n - 1] = -1
    if n <= SMALL:
        _merge_scan(sym, nxt, prv, n, mtab, rank, new)
    else:
        _merge_heap(sym, nxt, prv, n, mtab, rank, new, hk)
    k = 0
    while k >= 0:
        out[o] = sym[k]
        o += 1
        k = nxt[k]
    return o


@njit(nogil=True, cache=True, inline="always")
def _piece(cps, a, b, T, P, S, C, pb, work, o):
    """Encode one pre-tokenized piece cps[a:b] into work[o:]; returns the new o."""
    nb = 0
    for k in range(a, b):
        nb = encode_one(cps[k], pb, nb)
    if nb == 1 and T[2][pb[0]] >= 0:
        work[o] = T[2][pb[0]]
        return o + 1
    if nb > CACHE_MAX_PIECE:
        return _bpe(pb, nb, T, P, S, work, o)
    h = hash_bytes(pb, 0, nb)
    r = cache_get(C, h, pb, nb, work, o)
    if r >= 0:
        return r
    r = _bpe(pb, nb, T, P, S, work, o)
    cache_put(C, h, pb, nb, work, o, r)
    return r


@njit(nogil=True, cache=True)
def _plain(cps, a, b, T, P, S, C, pb, work, o, o0, limit):
    """Pre-tokenize and BPE the text cps[a:b] between added tokens. Stops past `limit` ids."""
    cls, fold = T[0], T[1]
    i = a
    while i < b:
        e = digits_end(cps, i, b, cls) if P[1] else b
        while i < e:
            k = piece_end(P[0], cps, i, e, cls, fold)
            o = _piece(cps, i, k, T, P, S, C, pb, work, o)
            if limit >= 0 and o - o0 > limit:
                return o
            i = k
    return o


@njit(nogil=True, cache=True)
def _find_added(cps, i, n, T, P, root):
    """Leftmost-longest added token of trie `root` in cps[i:n]: (start, end, id); (n, n, -1) if none."""
    ttab, term, first = T[7], T[8], T[9]
    bit = 1 << root
    if not (P[4] & bit):
        return n, n, -1
    for s in range(i, n):
        if first[cps[s]] & bit:
            node, best_e, best_id, t = root, -1, -1, s
            while t < n:
                node = trie_step(ttab, node, cps[t])
                if node < 0:
                    break
                t += 1
                if term[node] >= 0:
                    best_e, best_id = t, np.int64(term[node])
            if best_e > 0:
                return s, best_e, best_id
    return n, n, -1


@njit(nogil=True, cache=True)
def _encode_doc(cps, a, n, T, P, S, C, pb, work, limit):
    """All content ids of one document (code points cps[a:n]) into work; returns the count.

    A count above `limit` (>= 0) means the document was cut there (the rest is not encoded).
    """
    o = 0
    i = a
    while i < n:
        s1, e1, id1 = _find_added(cps, i, n, T, P, 0)
        j = i
        while j < s1:  # normalized added tokens are looked for in the gaps only
            s2, e2, id2 = _find_added(cps, j, s1, T, P, 1)
            o = _plain(cps, j, s2, T, P, S, C, pb, work, o, 0, limit)
            if s2 < s1:
                work[o] = id2
                o += 1
            if limit >= 0 and o > limit:
                return o
            j = e2
        if s1 < n:
            work[o] = id1
            o += 1
            if limit >= 0 and o > limit:
                return o
        i = e1
    return o


@njit(nogil=True, cache=True)
def _scratch(nb):
    """Per-thread buffers for pieces of up to nb bytes."""
    m = max(nb, 1)
    S = (np.empty(m, np.int32), np.empty(m, np.int32), np.empty(m, np.int32),
         np.empty(m, np.int64), np.empty(m, np.int32),
         np.empty(3 * m, np.int64))
    return S, np.empty(m, np.uint8), np.empty(m + 1, np.int32)


@njit(nogil=True, cache=True)
def _decode_all(buf, offsets, cps, ncp, nbytes, bad):
    """Decode each document into cps at its byte offset; count its code points and re-encoded bytes."""
    base = offsets[0]
    for d in range(len(offsets) - 1):
        a = offsets[d] - base
        n, b = decode_range(buf, offsets[d], offsets[d + 1], cps[a:])
        ncp[d] = n
        bad[d] = b
        m = 0
        for k in range(a, a + n):
            c = cps[k]
            m += 1 if c < 0x80 else (2 if c < 0x800 else (3 if c < 0x10000 else 4))
        nbytes[d] = m


def _chunks(nbytes, n_chunks):
    """Contiguous document ranges of about equal byte size: n_chunks + 1 bounds."""
    cum = np.cumsum(nbytes)
    total = max(int(cum[-1]), 1)
    cut = np.searchsorted(cum, np.arange(1, n_chunks) * (total / n_chunks), side="left") + 1
    return np.concatenate(([0], np.minimum(cut, len(nbytes)), [len(nbytes)])).astype(np.int64)


@njit(nogil=True, cache=True)
def _encode_chunk(d0, d1, cps, offsets, ncp, nbytes, slot_off, limit, T, P, tmp, counts):
    """Content ids of documents d0..d1-1 into tmp[slot_off[d]:], with this thread's buffers."""
    if d0 == d1:
        return
    base = offsets[0]
    S, pb, work = _scratch(np.max(nbytes[d0:d1]))
    entries = CACHE_MIN
    total = np.sum(nbytes[d0:d1])
    while entries < CACHE_MAX and entries * 16 < total:
        entries *= 2
    C = cache_new(entries)
    for d in range(d0, d1):
        a = offsets[d] - base
        cnt = _encode_doc(cps, a, a + ncp[d], T, P, S, C, pb, work, limit)
        counts[d] = cnt
        keep = cnt if limit < 0 else min(cnt, limit)
        tmp[slot_off[d]:slot_off[d] + keep] = work[:keep]


@njit(parallel=True, nogil=True, cache=True)
def _encode_parallel(bounds, cps, offsets, ncp, nbytes, slot_off, limit, T, P, tmp, counts):
    for c in prange(len(bounds) - 1):
        _encode_chunk(bounds[c], bounds[c + 1], cps, offsets, ncp, nbytes, slot_off, limit, T, P, tmp, counts)


# Launching a parallel region costs more than a small batch takes (far more on a busy
# node, where OpenMP threads wait for a core), so small batches run on the calling thread.
PARALLEL_MIN_BYTES = 1 << 18


@njit(nogil=True, cache=True)
def _assemble(tmp, slot_off, counts, limit, prefix, suffix, bad):
    """Final ids (prefix + content + suffix per document), offsets and flags."""
    nd = len(counts)
    out_off = np.zeros(nd + 1, np.int64)
    flags = np.zeros(nd, np.uint8)
    extra = len(prefix) + len(suffix)
    for d in range(nd):
        keep = counts[d] if limit < 0 else min(counts[d], limit)
        out_off[d + 1] = out_off[d] + keep + extra
    ids = np.empty(out_off[nd], np.int32)
    for d in range(nd):
        o = out_off[d]
        keep = out_off[d + 1] - o - extra
        ids[o:o + len(prefix)] = prefix
        o += len(prefix)
        ids[o:o + keep] = tmp[slot_off[d]:slot_off[d] + keep]
        ids[o + keep:o + keep + len(suffix)] = suffix
        flags[d] = (1 if limit >= 0 and counts[d] > limit else 0) | (2 if bad[d] else 0)
    return ids, out_off, flags


def encode_batch(buf, offsets, limit, T, P, prefix, suffix):
    """Encode documents buf[offsets[d]:offsets[d+1]] (UTF-8 bytes).

    limit: the most content ids a document keeps (-1: no limit); prefix/suffix:
    the special ids the post-processor puts around each document (int32).
    Returns (ids int32, offsets int64 n+1, flags uint8: 1 truncated, 2 bad UTF-8).
    """
    nd = len(offsets) - 1
    cps = np.empty(offsets[-1] - offsets[0], np.int32)
    ncp = np.empty(nd, np.int64)
    nbytes = np.empty(nd, np.int64)
    bad = np.zeros(nd, np.bool_)
    if nd:
        _decode_all(buf, offsets, cps, ncp, nbytes, bad)
    slots = nbytes if limit < 0 else np.minimum(nbytes, limit)
    slot_off = np.zeros(nd + 1, np.int64)
    np.cumsum(slots, out=slot_off[1:])
    tmp = np.empty(slot_off[-1], np.int32)
    counts = np.zeros(nd, np.int64)
    if nd:
        threads = numba.get_num_threads()
        parallel = threads > 1 and nd > 1 and len(cps) >= PARALLEL_MIN_BYTES
        args = (cps, offsets, ncp, nbytes, slot_off, np.int64(limit), T, P, tmp, counts)
        if parallel:
            _encode_parallel(_chunks(nbytes, min(nd, 4 * threads)), *args)
        else:
            _encode_chunk(0, nd, *args)
    return _assemble(tmp, slot_off, counts, np.int64(limit), prefix, suffix, bad)
