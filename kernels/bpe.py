"""Byte-level BPE kernels: a batch of documents (one UTF-8 buffer + offsets) to
flat token ids + offsets, with the exact semantics of HF `tokenizers` 0.23.3.

Per document: decode UTF-8 (bad bytes -> U+FFFD, flagged), cut out added
tokens (non-normalized ones first, then normalized ones in the gaps, each
leftmost-longest like HF's Aho-Corasick), split the rest with the
pre-tokenizer regex (optionally after Digits), and BPE-merge each piece's
bytes: lowest merge rank first, leftmost on ties (HF's heap order). Pieces
are looked up in a per-thread word cache first, as HF does.

All lookup structures are open-addressing hash tables in numpy arrays
(see bpe_tables.py), passed in as one `BpeTables`; the scalar settings as
one `BpeParams`; each thread's buffers and word cache as one `Scratch`.
"""

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from .bpe_merge import merge_heap, merge_scan
from .regex_pretok import digits_end, piece_end
from .utf8 import decode_range, encode_one
from .bpe_tables import (CACHE_MAX_PIECE, WordCache, cache_get, cache_new, cache_put, find_bytes, hash_bytes,
                         trie_step)

SMALL = 24  # pieces up to this many bytes merge by linear scan; longer ones use a heap

CACHE_MIN, CACHE_MAX = 1024, 1 << 16  # word cache entries per thread, by the bytes it will see


class BpeTables(NamedTuple):
    """The lookup arrays of one tokenizer (built once, read by every thread)."""
    cls: np.ndarray        # uint8 per code point: regex classes (regex_tables.npz)
    fold: np.ndarray       # case fold of the contraction letters (exact_fold() for GPT-2)
    byte_ids: np.ndarray   # int32[256]: id of each byte's symbol, -1 if the vocab lacks it
    merges: np.ndarray     # int table (a << 32 | b) -> rank << 32 | merged id
    vslots: np.ndarray     # bytes table over the vocab spellings below (ignore_merges)
    tok_bytes: np.ndarray  # uint8: every vocab token's bytes, concatenated
    tok_off: np.ndarray    # int64: token t is tok_bytes[tok_off[t]:tok_off[t + 1]]
    ttab: np.ndarray       # added-token trie edges (root 0: non-normalized, root 1: normalized)
    term: np.ndarray       # int32 per trie node: the token id ending there, or -1
    first: np.ndarray      # uint8 per code point: bit r set if it starts a token under root r


class BpeParams(NamedTuple):
    """Scalar settings (np.int64 each)."""
    mode: int              # pre-tokenizer regex: regex_pretok.GPT2 / LLAMA3 / QWEN2
    digits: int            # 1: HF's Digits(individual_digits) step first
    ignore_merges: int     # 1: a piece that is a whole vocab token is emitted as is
    unk_id: int            # the model's unk id for bytes without a symbol, -1: drop them
    roots: int             # bit r set if trie root r has any token


class Scratch(NamedTuple):
    """One thread's buffers for pieces of up to len(piece) bytes, and its word cache."""
    sym: np.ndarray        # int32 symbol ids of the piece being merged
    nxt: np.ndarray        # int32 linked list of live symbols
    prv: np.ndarray
    rank: np.ndarray       # int64 rank of the pair starting at each symbol
    new: np.ndarray        # int32 id that pair merges into
    heap: np.ndarray       # int64 heap keys (long pieces)
    piece: np.ndarray      # uint8 bytes of the piece
    work: np.ndarray       # int32 content ids of the document being encoded
    cache: WordCache


class Batch(NamedTuple):
    """Per-document arrays of one encode_batch call."""
    cps: np.ndarray        # int32 code points, document d at its byte offset
    offsets: np.ndarray    # int64 byte offsets into the caller's buffer
    ncp: np.ndarray        # int64 code points per document
    nbytes: np.ndarray     # int64 UTF-8 bytes after decoding (U+FFFD counts 3)
    bad: np.ndarray        # bool: ill-formed UTF-8 was replaced
    slot_off: np.ndarray   # int64 where each document's content ids go in tmp
    tmp: np.ndarray        # int32 content ids
    counts: np.ndarray     # int64 content ids each document produced


@njit(nogil=True, cache=True)
def _bpe(nb, T, P, S, o):
    """BPE-merge the bytes S.piece[:nb] of one piece; append the ids to S.work[o:]. Returns o."""
    pb, out, mtab = S.piece, S.work, T.merges
    sym, nxt, prv = S.sym, S.nxt, S.prv
    if P.ignore_merges:
        t = find_bytes(T.vslots, T.tok_bytes, T.tok_off, pb, nb)
        if t >= 0:
            out[o] = t
            return o + 1
    n = 0
    for k in range(nb):
        b = T.byte_ids[pb[k]]
        if b < 0:
            b = P.unk_id  # HF drops the byte when the model has no unk token
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
        merge_scan(sym, nxt, prv, n, mtab, S.rank, S.new)
    else:
        merge_heap(sym, nxt, prv, n, mtab, S.rank, S.new, S.heap)
    k = 0
    while k >= 0:
        out[o] = sym[k]
        o += 1
        k = nxt[k]
    return o


@njit(nogil=True, cache=True, inline="always")
def _piece(cps, a, b, T, P, S, o):
    """Encode one pre-tokenized piece cps[a:b] into S.work[o:]; returns the new o."""
    pb, work = S.piece, S.work
    nb = 0
    for k in range(a, b):
        nb = encode_one(cps[k], pb, nb)
    if nb == 1 and T.byte_ids[pb[0]] >= 0:
        work[o] = T.byte_ids[pb[0]]
        return o + 1
    if nb > CACHE_MAX_PIECE:
        return _bpe(nb, T, P, S, o)
    h = hash_bytes(pb, 0, nb)
    r = cache_get(S.cache, h, pb, nb, work, o)
    if r >= 0:
        return r
    r = _bpe(nb, T, P, S, o)
    cache_put(S.cache, h, pb, nb, work, o, r)
    return r


@njit(nogil=True, cache=True)
def _plain(cps, a, b, T, P, S, o, limit):
    """Pre-tokenize and BPE the text cps[a:b] between added tokens. Stops past `limit` ids."""
    i = a
    while i < b:
        e = digits_end(cps, i, b, T.cls) if P.digits else b
        while i < e:
            k = piece_end(P.mode, cps, i, e, T.cls, T.fold)
            o = _piece(cps, i, k, T, P, S, o)
            if limit >= 0 and o > limit:
                return o
            i = k
    return o


@njit(nogil=True, cache=True)
def _find_added(cps, i, n, T, P, root):
    """Leftmost-longest added token of trie `root` in cps[i:n]: (start, end, id); (n, n, -1) if none."""
    ttab, term, first = T.ttab, T.term, T.first
    bit = 1 << root
    if not (P.roots & bit):
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
def _encode_doc(cps, a, n, T, P, S, limit):
    """All content ids of one document (code points cps[a:n]) into S.work; returns the count.

    A count above `limit` (>= 0) means the document was cut there (the rest is not encoded).
    """
    o = 0
    i = a
    while i < n:
        s1, e1, id1 = _find_added(cps, i, n, T, P, 0)
        j = i
        while j < s1:  # normalized added tokens are looked for in the gaps only
            s2, e2, id2 = _find_added(cps, j, s1, T, P, 1)
            o = _plain(cps, j, s2, T, P, S, o, limit)
            if s2 < s1:
                S.work[o] = id2
                o += 1
            if limit >= 0 and o > limit:
                return o
            j = e2
        if s1 < n:
            S.work[o] = id1
            o += 1
            if limit >= 0 and o > limit:
                return o
        i = e1
    return o


@njit(nogil=True, cache=True)
def _scratch(nb, cache_entries):
    """Per-thread buffers for pieces of up to nb bytes."""
    m = max(nb, 1)
    return Scratch(np.empty(m, np.int32), np.empty(m, np.int32), np.empty(m, np.int32),
                   np.empty(m, np.int64), np.empty(m, np.int32), np.empty(3 * m, np.int64),
                   np.empty(m, np.uint8), np.empty(m + 1, np.int32), cache_new(cache_entries))


@njit(nogil=True, cache=True)
def _decode_all(buf, B):
    """Decode each document into B.cps at its byte offset; count its code points and re-encoded bytes."""
    offsets, cps = B.offsets, B.cps
    base = offsets[0]
    for d in range(len(offsets) - 1):
        a = offsets[d] - base
        n, b = decode_range(buf, offsets[d], offsets[d + 1], cps[a:])
        B.ncp[d] = n
        B.bad[d] = b
        m = 0
        for k in range(a, a + n):
            c = cps[k]
            m += 1 if c < 0x80 else (2 if c < 0x800 else (3 if c < 0x10000 else 4))
        B.nbytes[d] = m


def _chunks(nbytes, n_chunks):
    """Contiguous document ranges of about equal byte size: n_chunks + 1 bounds."""
    cum = np.cumsum(nbytes)
    total = max(int(cum[-1]), 1)
    cut = np.searchsorted(cum, np.arange(1, n_chunks) * (total / n_chunks), side="left") + 1
    return np.concatenate(([0], np.minimum(cut, len(nbytes)), [len(nbytes)])).astype(np.int64)


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
    S = _scratch(np.max(B.nbytes[d0:d1]), entries)
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


# Launching a parallel region costs more than a small batch takes (far more on a busy
# node, where OpenMP threads wait for a core), so small batches run on the calling thread.
PARALLEL_MIN_BYTES = 1 << 18


@njit(nogil=True, cache=True)
def _assemble(B, limit, prefix, suffix):
    """Final ids (prefix + content + suffix per document), offsets and flags."""
    tmp, slot_off, counts, bad = B.tmp, B.slot_off, B.counts, B.bad
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


def run_batch(buf, offsets, limit, T, P, prefix, suffix, slots, encode_chunk, encode_parallel):
    """The batch driver of a merge kernel (this one, spm_bpe): decode the documents' UTF-8, size
    each document's id slots (``slots(nbytes, limit, P)``), encode runs of documents on the calling
    thread or in parallel (``encode_chunk`` / ``encode_parallel``), assemble with prefix/suffix."""
    nd = len(offsets) - 1
    nbytes = np.empty(nd, np.int64)
    B = Batch(np.empty(offsets[-1] - offsets[0], np.int32), offsets, np.empty(nd, np.int64), nbytes,
              np.zeros(nd, np.bool_), np.zeros(nd + 1, np.int64), np.empty(0, np.int32), np.zeros(nd, np.int64))
    if nd:
        _decode_all(buf, B)
    limit = np.int64(limit)
    np.cumsum(slots(nbytes, limit, P), out=B.slot_off[1:])
    B = B._replace(tmp=np.empty(B.slot_off[-1], np.int32))
    if nd:
        threads = numba.get_num_threads()
        if threads > 1 and nd > 1 and len(B.cps) >= PARALLEL_MIN_BYTES:
            encode_parallel(_chunks(nbytes, min(nd, 4 * threads)), B, limit, T, P)
        else:
            encode_chunk(0, nd, B, limit, T, P)
    return _assemble(B, limit, prefix, suffix)


def _content_slots(nbytes, limit, P):
    """A byte-level document has at most one id per byte (its content limit aside)."""
    return nbytes if limit < 0 else np.minimum(nbytes, limit)


def encode_batch(buf, offsets, limit, T, P, prefix, suffix):
    """Encode documents buf[offsets[d]:offsets[d+1]] (UTF-8 bytes) with tables T, settings P.

    limit: the most content ids a document keeps (-1: no limit); prefix/suffix:
    the special ids the post-processor puts around each document (int32).
    Returns (ids int32, offsets int64 n+1, flags uint8: 1 truncated, 2 bad UTF-8).
    """
    return run_batch(buf, offsets, limit, T, P, prefix, suffix, _content_slots, _encode_chunk, _encode_parallel)
