"""SentencePiece-style BPE kernels (Llama-2, Mistral-7B-v0.1, TinyLlama; HF's
SentencePieceBPETokenizer): a batch of documents (one UTF-8 buffer + offsets) to
flat token ids + offsets, with the exact semantics of HF `tokenizers` 0.23.3.

Per document: decode UTF-8 (bad bytes -> U+FFFD, flagged), cut out the added
tokens (leftmost-longest, as kernels/bpe.py does), and normalize each segment
between them on its own, as HF does: spaces become the mark "▁" and the mark is
put in front (the Prepend normalizer: every non-empty segment; Metaspace
"always": unless the segment starts with the mark; "first": the same, only for
the segment at the start of the document). Metaspace(split=true) then cuts
before every mark; without it the whole segment is one word, which is cut (as
an optimization only) before a mark wherever no merge can span that place: a
merge (l, r) spans "x|▁" only if r starts with the mark and l ends with x (or,
for a character without a token of its own, with its <0xNN> / unk token), so
the cuts come from one table per character (Llama-2's and Gemma's
vocabularies: "▁" starts tokens, it rarely ends one), and the word cache
serves most of a segment. Each word's
characters become their vocab ids, or with byte_fallback their UTF-8 bytes'
<0xNN> ids, or the unk id (fused with a preceding unk when fuse_unk), and merge
lowest rank first, leftmost on ties (kernels/bpe_merge.py: a heap on long
words, so a whole document without pre-tokenizer stays O(n log n)).
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .bpe import CACHE_MAX, CACHE_MIN, SMALL, _find_added, run_batch
from .bpe_merge import merge_heap, merge_scan
from .bpe_tables import CACHE_MAX_PIECE, WordCache, cache_get, cache_new, cache_put, hash_bytes
from .utf8 import encode_one

PREPEND_NONE, PREPEND_NONEMPTY, PREPEND_ALWAYS, PREPEND_FIRST = 0, 1, 2, 3


class SpmTables(NamedTuple):
    """The lookup arrays of one tokenizer (built once, read by every thread)."""
    char_ids: np.ndarray   # int32 per code point: the vocab id of that one-character token, -1 if none
    byte_ids: np.ndarray   # int32[256]: id of <0xNN>, -1 if absent or byte_fallback is off
    merges: np.ndarray     # int table (a << 32 | b) -> rank << 32 | merged id (bpe_tables.int_table)
    ttab: np.ndarray       # added-token trie edges (root 0 only: non-normalized tokens)
    term: np.ndarray       # int32 per trie node: the token id ending there, or -1
    first: np.ndarray      # uint8 per code point: bit 0 set if it starts an added token
    nocut: np.ndarray      # uint8 per code point: 1 if a merge may join it to a mark that follows


class SpmParams(NamedTuple):
    """Scalar settings (np.int64 each)."""
    unk_id: int            # the model's unk id, -1: characters without a token are dropped
    fuse_unk: int          # 1: consecutive unknown characters give one unk
    replace: int           # code point spaces become (the mark), -1: spaces stay
    mark: int              # code point put in front of a segment, and split before
    prepend: int           # PREPEND_*
    split: int             # 1: Metaspace(split=true): a new word starts at every mark
    cut: int               # 1: words may be cut before a mark after a character x where nocut[x] == 0
    roots: int             # 1 if there are added tokens
    per_byte: int          # at most this many ids per input byte (a space becoming the mark)
    per_prepend: int       # ids of the prepended mark
    min_added: int         # bytes of the shortest added token (segments <= bytes / min_added + 1)


class Scratch(NamedTuple):
    """One thread's buffers, for documents of up to nb bytes, and its word cache."""
    norm: np.ndarray       # int32 code points of the normalized segment
    sym: np.ndarray        # int32 symbol ids of the word being merged
    nxt: np.ndarray        # int32 linked list of live symbols
    prv: np.ndarray
    rank: np.ndarray       # int64 rank of the pair starting at each symbol
    new: np.ndarray        # int32 id that pair merges into
    heap: np.ndarray       # int64 heap keys (long words)
    piece: np.ndarray      # uint8 UTF-8 bytes of the word (the cache key)
    work: np.ndarray       # int32 content ids of the document being encoded
    cache: WordCache


@njit(nogil=True, cache=True)
def id_bound(nb, P):
    """The most content ids a document of nb bytes can give."""
    segments = 1 + (nb // P.min_added if P.roots else 0)
    return nb * P.per_byte + segments * P.per_prepend


@njit(nogil=True, cache=True, inline="always")
def _symbols(norm, a, b, T, P, S):
    """HF's BPE merge_word start: the symbols of the word norm[a:b] into S.sym; returns their count."""
    sym, pb = S.sym, S.piece
    n = 0
    unk = 0  # pending unknown characters (HF adds the unk when a known character follows)
    for k in range(a, b):
        t = T.char_ids[norm[k]]
        if t >= 0:
            if unk > 0:
                sym[n] = P.unk_id
                n += 1
                unk = 0
            sym[n] = t
            n += 1
            continue
        nb = encode_one(norm[k], pb, 0)
        ok = True
        for j in range(nb):
            ok = ok and T.byte_ids[pb[j]] >= 0
        if ok:  # byte fallback; as in HF it does not end a pending unk
            for j in range(nb):
                sym[n] = T.byte_ids[pb[j]]
                n += 1
        elif P.unk_id >= 0:
            if unk > 0 and not P.fuse_unk:
                sym[n] = P.unk_id
                n += 1
            unk = 1
    if unk > 0:
        sym[n] = P.unk_id
        n += 1
    return n


@njit(nogil=True, cache=True, inline="always")
def _bpe(norm, a, b, T, P, S, o):
    """BPE of the word norm[a:b]; appends its ids to S.work[o:]. Returns o."""
    sym, nxt, prv = S.sym, S.nxt, S.prv
    n = _symbols(norm, a, b, T, P, S)
    if n == 0:
        return o
    for k in range(n):
        nxt[k] = k + 1
        prv[k] = k - 1
    nxt[n - 1] = -1
    if n <= SMALL:
        merge_scan(sym, nxt, prv, n, T.merges, S.rank, S.new)
    else:
        merge_heap(sym, nxt, prv, n, T.merges, S.rank, S.new, S.heap)
    out = S.work
    k = 0
    while k >= 0:
        out[o] = sym[k]
        o += 1
        k = nxt[k]
    return o


@njit(nogil=True, cache=True, inline="always")
def _utf8(cps, a, b, out):
    """UTF-8 of cps[a:b] into out; returns its length (ASCII without a call)."""
    nb = 0
    for k in range(a, b):
        c = cps[k]
        if c < 0x80:
            out[nb] = c
            nb += 1
        else:
            nb = encode_one(c, out, nb)
    return nb


@njit(nogil=True, cache=True, inline="always")
def _cached(norm, a, b, pb, work, C, o):
    """Append the cached ids of the word norm[a:b] to work[o:]; -1 if it is not cached.

    Runs once per word, so it takes no tables: passing a NamedTuple of arrays
    counts a reference for each of them, which costs more than the lookup."""
    if b - a > CACHE_MAX_PIECE:
        return -1
    nb = _utf8(norm, a, b, pb)
    if nb > CACHE_MAX_PIECE:
        return -1
    return cache_get(C, hash_bytes(pb, 0, nb), pb, nb, work, o)


@njit(nogil=True, cache=True)
def _word(norm, a, b, T, P, S, o):
    """Encode the word norm[a:b] (not cached) and cache it; returns the new o."""
    r = _bpe(norm, a, b, T, P, S, o)
    pb = S.piece
    nb = _utf8(norm, a, b, pb)  # _symbols used S.piece as scratch
    if nb <= CACHE_MAX_PIECE:
        cache_put(S.cache, hash_bytes(pb, 0, nb), pb, nb, S.work, o, r)
    return r


@njit(nogil=True, cache=True)
def _segment(cps, a, b, at_start, T, P, S, o, limit):
    """Normalize, split and BPE the text cps[a:b] between added tokens. Stops past `limit` ids."""
    if a == b:
        return o
    norm = S.norm
    c0 = cps[a]
    if c0 == 32 and P.replace >= 0:
        c0 = P.replace
    n = 0
    if P.prepend == PREPEND_NONEMPTY or (c0 != P.mark and (P.prepend == PREPEND_ALWAYS or
                                                           (P.prepend == PREPEND_FIRST and at_start))):
        norm[0] = P.mark
        n = 1
    for k in range(a, b):
        c = cps[k]
        norm[n] = P.replace if c == 32 and P.replace >= 0 else c
        n += 1
    pb, work, C = S.piece, S.work, S.cache
    split, cut, mark, nocut = P.split, P.cut, P.mark, T.nocut
    if not split and not cut:
        r = _cached(norm, 0, n, pb, work, C, o)
        return r if r >= 0 else _word(norm, 0, n, T, P, S, o)
    s = 0
    for k in range(1, n + 1):
        if k == n or (norm[k] == mark and (split or not nocut[norm[k - 1]])):
            r = _cached(norm, s, k, pb, work, C, o)
            o = r if r >= 0 else _word(norm, s, k, T, P, S, o)
            if limit >= 0 and o > limit:
                return o
            s = k
    return o


@njit(nogil=True, cache=True)
def _encode_doc(cps, a, n, T, P, S, limit):
    """All content ids of one document (code points cps[a:n]) into S.work; returns the count.

    A count above `limit` (>= 0) means the document was cut there (the rest is not encoded).
    """
    o = 0
    i = a
    while i < n:
        s, e, t = _find_added(cps, i, n, T, P, 0)
        o = _segment(cps, i, s, i == a, T, P, S, o, limit)
        if s < n:
            S.work[o] = t
            o += 1
        if limit >= 0 and o > limit:
            return o
        i = e
    return o


@njit(nogil=True, cache=True)
def _scratch(nb, P, cache_entries):
    """Per-thread buffers for documents of up to nb bytes."""
    m = nb + 2
    s = 4 * m  # symbols: byte fallback gives up to 4 per code point
    return Scratch(np.empty(m, np.int32), np.empty(s, np.int32), np.empty(s, np.int32), np.empty(s, np.int32),
                   np.empty(s, np.int64), np.empty(s, np.int32), np.empty(3 * s, np.int64),
                   np.empty(max(4 * m, CACHE_MAX_PIECE + 4), np.uint8), np.empty(id_bound(nb, P) + 1, np.int32),
                   cache_new(cache_entries))


@njit(nogil=True, cache=True)
def _encode_chunk(d0, d1, B, limit, T, P):
    """Content ids of documents d0..d1-1 into B.tmp[B.slot_off[d]:], with this thread's buffers."""
    if d0 == d1:
        return
    base = B.offsets[0]
    entries = CACHE_MIN
    total = np.sum(B.nbytes[d0:d1])
    while entries < CACHE_MAX and entries * 16 < total:
        entries *= 2
    S = _scratch(np.max(B.nbytes[d0:d1]), P, entries)
    for d in range(d0, d1):
        a = B.offsets[d] - base
        cnt = _encode_doc(B.cps, a, a + B.ncp[d], T, P, S, limit)
        B.counts[d] = cnt
        keep = cnt if limit < 0 else min(cnt, limit)
        B.tmp[B.slot_off[d]:B.slot_off[d] + keep] = S.work[:keep]


@njit(parallel=True, nogil=True, cache=True)
def _encode_parallel(bounds, B, limit, T, P):
    for c in prange(len(bounds) - 1):
        _encode_chunk(bounds[c], bounds[c + 1], B, limit, T, P)


@njit(nogil=True, cache=True)
def _slots(nbytes, limit, P):
    out = np.empty(len(nbytes), np.int64)
    for d in range(len(nbytes)):
        out[d] = id_bound(nbytes[d], P)
        if limit >= 0:
            out[d] = min(out[d], limit)
    return out


def encode_batch(buf, offsets, limit, T, P, prefix, suffix):
    """Encode documents buf[offsets[d]:offsets[d+1]] (UTF-8 bytes) with tables T, settings P
    (``kernels.bpe.run_batch``). limit: the most content ids a document keeps (-1: no limit);
    prefix/suffix: the special ids around each document (int32).
    Returns (ids int32, offsets int64 n+1, flags uint8: 1 truncated, 2 bad UTF-8).
    """
    return run_batch(buf, offsets, limit, T, P, prefix, suffix, _slots, _encode_chunk, _encode_parallel)


# ---- loading: the merges' token ids -----------------------------------------------------------
# A 262k-token vocabulary has ~515k merges: three dict lookups each (left, right, left + right) are
# most of a load in Python, so the strings come in as code points (one buffer + offsets) instead.

@njit(nogil=True, cache=True, inline="always")
def _seq_hash(cps, a, b):
    h = np.uint64(0xCBF29CE484222325)   # FNV-1a over the code points
    for k in range(a, b):
        h = (h ^ np.uint64(cps[k])) * np.uint64(0x100000001B3)
    return h


@njit(nogil=True, cache=True)
def _find_seq(tab, vcps, cps, a, b):
    """Index of the vocab token equal to cps[a:b], or -1 (tab rows: hash, index, start, length)."""
    mask = len(tab) - 1
    h = np.int64(_seq_hash(cps, a, b))
    s = h & mask
    while tab[s, 1] >= 0:
        if tab[s, 0] == h and tab[s, 3] == b - a:
            start = tab[s, 2]
            same = True
            for k in range(b - a):
                if vcps[start + k] != cps[a + k]:
                    same = False
                    break
            if same:
                return tab[s, 1]
        s = (s + 1) & mask
    return -1


@njit(nogil=True, cache=True)
def merge_ids(vcps, voff, vids, mcps, moff):
    """Per merge i (left = mcps[moff[2i]:moff[2i+1]], right = mcps[moff[2i+1]:moff[2i+2]]): the ids of
    left, right and left + right among the vocab tokens vcps[voff[t]:voff[t+1]] (id vids[t]), -1 if absent.
    One row per slot (hash, index, start, length): a probe reads one cache line, a hit one more."""
    cap = 16
    while cap < 2 * len(vids):
        cap *= 2
    tab = np.full((cap, 4), -1, np.int64)
    mask = cap - 1
    for t in range(len(vids)):
        h = np.int64(_seq_hash(vcps, voff[t], voff[t + 1]))
        s = h & mask
        while tab[s, 1] >= 0:
            s = (s + 1) & mask
        tab[s, 0], tab[s, 1], tab[s, 2], tab[s, 3] = h, t, voff[t], voff[t + 1] - voff[t]
    n = (len(moff) - 1) // 2
    out = np.full((n, 3), -1, np.int64)
    for i in range(n):
        a, m, b = moff[2 * i], moff[2 * i + 1], moff[2 * i + 2]
        left, right, both = _find_seq(tab, vcps, mcps, a, m), _find_seq(tab, vcps, mcps, m, b), \
            _find_seq(tab, vcps, mcps, a, b)
        out[i, 0] = vids[left] if left >= 0 else -1
        out[i, 1] = vids[right] if right >= 0 else -1
        out[i, 2] = vids[both] if both >= 0 else -1
    return out
