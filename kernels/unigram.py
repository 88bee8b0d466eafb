"""SentencePiece Unigram kernels (XLM-RoBERTa, T5, ALBERT shapes; HF's Unigram model): a batch of
documents (one UTF-8 buffer + offsets) to flat token ids + offsets, with the exact semantics of HF
`tokenizers` 0.23.3.

Per document: decode UTF-8 (bad bytes -> U+FFFD, flagged), cut out the added tokens
(leftmost-longest, kernels/bpe.py's `_find_added`), and normalize each segment between them:
the Precompiled normalizer first where the model has one (kernels/precompiled.py), then as
kernels/spm_bpe.py does (spaces -> the mark "▁", the mark put in front by the Prepend /
Metaspace rules; Metaspace(split=true) cuts before every mark). Each word is then
tokenized as HF's `Unigram::encode_optimized`:

- Viterbi over the piece lattice, position by code point: from each start s, every vocab
  piece that starts there (a walk down a code-point trie of all pieces) proposes
  score[s] + piece score for its end; a start without a one-character piece also proposes
  the unk node (score min_score - 10, one character). An end takes a proposal only if it is
  strictly better: on ties the earliest start, then the shortest piece from it, wins.
- Back from the end along the best path; consecutive unk nodes are fused into one string
  (fuse_unk is always on in HF's Unigram). Each string is looked up in the vocab again (HF's
  token_to_ids: a fused run may spell a piece); a string that is not a piece becomes its
  UTF-8 bytes' <0xNN> ids when the model has byte_fallback and all of them exist, else unk.

Words are looked up in a per-thread word cache first (HF caches them too).
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import precompiled
from .bpe import CACHE_MAX, CACHE_MIN, _find_added, run_batch
from .bpe_tables import CACHE_MAX_PIECE, WordCache, cache_get, cache_new, cache_put, hash_bytes
from .trie import child
from .utf8 import encode_one

PREPEND_NONE, PREPEND_NONEMPTY, PREPEND_ALWAYS, PREPEND_FIRST = 0, 1, 2, 3   # as kernels/spm_bpe.py


class UnigramTables(NamedTuple):
    """The lookup arrays of one tokenizer (built once, read by every thread)."""
    keys: np.ndarray       # the trie of every vocab piece over code points (kernels/trie.Trie's fields,
    vals: np.ndarray       # flat: a parallel region takes no nested tuple); node_id: the piece's id,
    node_id: np.ndarray    # the last of equal spellings as in HF's token_to_ids
    mask: np.int64
    scores: np.ndarray     # float64 per id: the piece's score (log-probability)
    byte_ids: np.ndarray   # int32[256]: id of <0xNN>, -1 if absent or byte_fallback is off
    ttab: np.ndarray       # added-token trie edges (root 0 only: non-normalized tokens)
    term: np.ndarray       # int32 per trie node: the token id ending there, or -1
    first: np.ndarray      # uint8 per code point: bit 0 set if it starts an added token
    pc_units: np.ndarray   # the Precompiled normalizer (kernels/precompiled.py): its double array,
    pc_strings: np.ndarray  # its strings as code points, byte offset -> code point offset,
    pc_offsets: np.ndarray  # the grapheme classes, and each BMP character's own value
    gcb: np.ndarray         # (precompiled.single_values); 1-element dummies without one
    pc_single: np.ndarray


class UnigramParams(NamedTuple):
    """Scalar settings."""
    unk_id: np.int64       # the model's unk id
    unk_score: np.float64  # min score - 10 (HF's K_UNK_PENALTY)
    replace: np.int64      # code point spaces become (the mark), -1: spaces stay
    mark: np.int64         # code point put in front of a segment, and split before
    prepend: np.int64      # PREPEND_*
    split: np.int64        # 1: a new word starts at every mark
    roots: np.int64        # 1 if there are added tokens
    per_byte: np.int64     # at most this many ids per input byte (a space becoming an unknown mark: 3)
    per_prepend: np.int64  # most ids of the prepended mark
    min_added: np.int64    # bytes of the shortest added token (segments <= bytes / min_added + 1)
    precompiled: np.int64  # 1: the Precompiled normalizer runs first on each segment
    strip: np.int64        # then Strip: bit 0 left, bit 1 right (Unicode White_Space)
    collapse: np.int64     # then Replace(Regex(" {2,}")) with this code point, -1: none
    expand: np.int64       # most code points one input byte becomes after normalizing (1 without)


class Scratch(NamedTuple):
    """One thread's buffers, for documents of up to nb bytes, and its word cache."""
    pre: np.ndarray        # int32 code points of the segment after the Precompiled normalizer
    norm: np.ndarray       # int32 code points of the normalized segment
    best: np.ndarray       # float64 best path score ending at each position of the word
    start: np.ndarray      # int32 where the best path's last node starts (-1: none yet)
    node: np.ndarray       # int32 that node's id
    path: np.ndarray       # int32 the best path's node ends, last first
    piece: np.ndarray      # uint8 UTF-8 bytes of the word (the cache key) or of one output string
    work: np.ndarray       # int32 content ids of the document being encoded
    tmp: np.ndarray        # uint8 UTF-8 of one grapheme cluster (the Precompiled lookups)
    cache: WordCache


@njit(nogil=True, cache=True)
def id_bound(nb, P):
    """The most content ids a document of nb bytes can give."""
    segments = 1 + (nb // P.min_added if P.roots else 0)
    return nb * P.per_byte + segments * P.per_prepend


@njit(nogil=True, cache=True)
def _utf8(cps, a, b, out):
    """UTF-8 of cps[a:b] into out; returns its length."""
    nb = 0
    for k in range(a, b):
        c = cps[k]
        if c < 0x80:
            out[nb] = c
            nb += 1
        else:
            nb = encode_one(c, out, nb)
    return nb


@njit(nogil=True, cache=True)
def _viterbi(norm, a, n, T, P, S):
    """Best path over the lattice of norm[a:a + n]: S.start / S.node at each end position."""
    best, start, node = S.best, S.start, S.node
    scores = T.scores
    best[0] = 0.0
    start[1:n + 1] = -1
    for s in range(n):
        here = best[s]
        single = False
        t = 0
        for k in range(s, n):
            t = child(T, t, norm[a + k])
            if t < 0:
                break
            i = T.node_id[t]
            if i < 0:
                continue
            e = k + 1
            cand = scores[i] + here
            if start[e] < 0 or cand > best[e]:
                best[e], start[e], node[e] = cand, s, i
            if e == s + 1:
                single = True
        if not single:
            cand = P.unk_score + here
            if start[s + 1] < 0 or cand > best[s + 1]:
                best[s + 1], start[s + 1], node[s + 1] = cand, s, P.unk_id


@njit(nogil=True, cache=True)
def _emit(norm, a, s, e, T, P, S, o):
    """Ids of the output string norm[a + s:a + e] (a fused unk run or a piece) into S.work[o:]."""
    out = S.work
    t = 0
    for k in range(a + s, a + e):
        t = child(T, t, norm[k])
        if t < 0:
            break
    if t >= 0 and T.node_id[t] >= 0:
        out[o] = T.node_id[t]
        return o + 1
    pb = S.piece
    nb = _utf8(norm, a + s, a + e, pb)
    ok = True
    for j in range(nb):
        ok = ok and T.byte_ids[pb[j]] >= 0
    if ok:   # byte_ids are all -1 without byte_fallback
        for j in range(nb):
            out[o + j] = T.byte_ids[pb[j]]
        return o + nb
    out[o] = P.unk_id
    return o + 1


@njit(nogil=True, cache=True)
def _word(norm, a, b, T, P, S, o):
    """Unigram ids of the word norm[a:b] into S.work[o:]; returns the new o."""
    n = b - a
    if n == 0:
        return o
    _viterbi(norm, a, n, T, P, S)
    start, node, ends = S.start, S.node, S.path
    m = 0
    e = n
    while e > 0:
        ends[m] = e
        m += 1
        e = start[e]
    k = m - 1
    s = np.int64(0)
    while k >= 0:
        e = np.int64(ends[k])
        if node[e] == P.unk_id:   # fuse the run of unk nodes
            while k > 0 and node[ends[k - 1]] == P.unk_id:
                k -= 1
            e = np.int64(ends[k])
            o = _emit(norm, a, s, e, T, P, S, o)
        else:
            S.work[o] = node[e]
            o += 1
        s = e
        k -= 1
    return o


@njit(nogil=True, cache=True)
def _cached_word(norm, a, b, T, P, S, o):
    """_word through the word cache."""
    pb = S.piece
    if b - a > CACHE_MAX_PIECE:
        return _word(norm, a, b, T, P, S, o)
    nb = _utf8(norm, a, b, pb)
    if nb > CACHE_MAX_PIECE:
        return _word(norm, a, b, T, P, S, o)
    h = hash_bytes(pb, 0, nb)
    r = cache_get(S.cache, h, pb, nb, S.work, o)
    if r >= 0:
        return r
    r = _word(norm, a, b, T, P, S, o)
    nb = _utf8(norm, a, b, pb)   # _emit used S.piece as scratch
    cache_put(S.cache, h, pb, nb, S.work, o, r)
    return r


@njit(nogil=True, cache=True)
def _white(c):
    """Unicode White_Space (Rust's char::is_whitespace, which HF's Strip uses)."""
    return (9 <= c <= 13 or c == 32 or c == 0x85 or c == 0xA0 or c == 0x1680 or 0x2000 <= c <= 0x200A
            or c == 0x2028 or c == 0x2029 or c == 0x202F or c == 0x205F or c == 0x3000)


@njit(nogil=True, cache=True)
def _prenormalize(cps, a, b, T, P, S):
    """The normalizer steps before the spacing, on cps[a:b] into S.pre: Precompiled, Strip, then
    Replace(Regex(" {2,}")) (each run of two or more spaces becomes P.collapse). Returns the length and
    whether Strip removed characters in front (HF's Metaspace "first" then sees the segment start past
    the document's first character and prepends nothing; Precompiled's removals keep offset 0)."""
    pre = S.pre
    if P.precompiled:
        n = precompiled.normalize(cps, a, b, T.pc_units, T.pc_single, T.pc_strings, T.pc_offsets, T.gcb, pre, S.tmp)
    else:
        n = b - a
        for k in range(n):   # a loop: a slice copy compiles its shape checks (seconds, once)
            pre[k] = cps[a + k]
    s, e = 0, n
    if P.strip & 1:
        while s < e and _white(pre[s]):
            s += 1
    if P.strip & 2:
        while e > s and _white(pre[e - 1]):
            e -= 1
    w = 0
    k = s
    while k < e:
        if P.collapse >= 0 and pre[k] == 32 and k + 1 < e and pre[k + 1] == 32:
            while k < e and pre[k] == 32:
                k += 1
            pre[w] = P.collapse
        else:
            pre[w] = pre[k]
            k += 1
        w += 1
    return w, s > 0


@njit(nogil=True, cache=True)
def _segment(cps, a, b, at_start, T, P, S, o, limit):
    """Normalize, split and tokenize the text cps[a:b] between added tokens. Stops past `limit` ids."""
    if a == b:
        return o
    if P.precompiled != 0 or P.strip != 0 or P.collapse >= 0:
        b, shifted = _prenormalize(cps, a, b, T, P, S)
        cps, a = S.pre, 0
        at_start = at_start and not shifted
        if b == 0:   # HF prepends nothing to an empty string
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
    if not P.split:   # np.int64(0): a literal 0 would compile a second specialization of each callee
        return _cached_word(norm, np.int64(0), n, T, P, S, o)
    s = np.int64(0)
    for k in range(1, n + 1):
        if k == n or norm[k] == P.mark:
            o = _cached_word(norm, s, k, T, P, S, o)
            if limit >= 0 and o > limit:
                return o
            s = k
    return o


@njit(nogil=True, cache=True)
def _encode_doc(cps, a, n, T, P, S, limit):
    """All content ids of one document (code points cps[a:n]) into S.work; returns the count.

    A count above `limit` (>= 0) means the document was cut there (the rest is not encoded).
    """
    o = np.int64(0)
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
    m = nb * P.expand + 2
    pre = P.precompiled != 0 or P.strip != 0 or P.collapse >= 0
    return Scratch(np.empty(m if pre else 1, np.int32), np.empty(m, np.int32),
                   np.empty(m + 1, np.float64), np.empty(m + 1, np.int32), np.empty(m + 1, np.int32),
                   np.empty(m + 1, np.int32), np.empty(max(4 * m, CACHE_MAX_PIECE + 4), np.uint8),
                   np.empty(id_bound(nb, P) + 1, np.int32), np.empty(64, np.uint8), cache_new(cache_entries))


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
        base_d = B.slot_off[d]
        for k in range(keep):   # a loop: a slice copy compiles its shape checks (seconds, once)
            B.tmp[base_d + k] = S.work[k]


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
