"""WordPiece (BERT) tokenizer kernels: bytes in, token ids out, one pass per document.

Per document, in the order HF tokenizers applies them:
  decode UTF-8 (U+FFFD for bad bytes) -> match added tokens in the raw text
  (leftmost-longest) -> BertNormalizer per code point (clean text, pad CJK,
  NFD + drop Mn marks, lowercase) -> BertPreTokenizer (split on whitespace,
  isolate punctuation) -> greedy longest-match-first WordPiece per word.
Everything streams through a word buffer of max_input_chars_per_word + 1
code points, so time is linear in the input whatever its shape. NFD's
canonical reordering only moves the few spacing marks with a non-zero
combining class that survive accent stripping; those wait in `pend` until the
next starter and are put in class order there.

A vocabulary is a trie over code points whose edges live in one open-address
hash table: key = node * 0x110000 + code point. Continuation pieces ("##x")
are found by walking the same trie from the node of the "##" prefix.

Kernels take the tokenizer as one `WordPieceTables` (W) and each thread's
buffers and per-document state as one `Doc` (D), except on the hot path:
encode_doc's per-character loop reads W and D's arrays into locals once per
document, and the per-word calls (_end_word, _wordpiece, _emit) take only the
arrays they touch. Every array a compiled call receives, also inside a
NamedTuple, costs an atomic NRT incref and decref per call: handing all of W
and D to a call per character and per word made the kernel 3.5x slower
(commit 379d727, found in issue 20).
"""

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from hpcllm.kernels.trie import Trie, child
from hpcllm.kernels.unicode_tables import BertArrays
from hpcllm.kernels.utf8 import decode_range

DROP, SPACE, CHINESE, WS, PUNCT, MN = 1, 2, 4, 8, 16, 32
FM_DROP, FM_SPLIT, FM_SLOW, FM_ISOLATE, FM_SEQ = -1, -2, -3, -16, -0x200000  # unicode_tables.fast_map
# Doc.st: tokens written, word length, pending marks, where the document's output starts, its capacity
S_N, S_W, S_P, S_BASE, S_CAP = range(5)


class WordPieceConfig(NamedTuple):
    """Settings (np.int64 each)."""
    clean: int            # BertNormalizer clean_text
    chinese: int          # handle_chinese_chars
    strip: int            # strip_accents
    lower: int            # lowercase
    max_chars: int        # max_input_chars_per_word
    unk_id: int
    cont: int             # trie node of the continuing-subword prefix ("##"), -1 none
    max_nfd: int          # longest NFD expansion of one code point


class FastMap(NamedTuple):
    fm: np.ndarray        # unicode_tables.fast_map: int32 code per code point
    seq_off: np.ndarray   # its multi-code-point rows
    seq_data: np.ndarray
    afirst: np.ndarray    # bool[4096]: code point & 4095 may start an added token


class WordPieceTables(NamedTuple):
    ut: BertArrays
    fast: FastMap
    vocab: Trie
    added: Trie
    cfg: WordPieceConfig


class Batch(NamedTuple):
    buf: np.ndarray       # uint8 UTF-8 documents
    offsets: np.ndarray   # int64 document d is buf[offsets[d]:offsets[d + 1]]
    blocks: np.ndarray    # int64 document ranges, one thread each
    out_base: np.ndarray  # int64 where document d's output starts in out
    caps: np.ndarray      # int64 content tokens document d may store
    out: np.ndarray       # int32 output
    counts: np.ndarray    # int64 tokens kept per document
    flags: np.ndarray     # uint8 per document


class Doc(NamedTuple):
    """One thread's buffers; st is the state of the document being encoded."""
    out: np.ndarray       # int32 output of the whole batch (shared)
    cps: np.ndarray       # int32 decoded code points
    pend: np.ndarray      # int32 non-starters waiting for canonical ordering
    wbuf: np.ndarray      # int32 the current word (max_chars + 1)
    st: np.ndarray        # int64[5], indexed by S_*


# ---------------------------------------------------------------- emitting
@njit(nogil=True, cache=True, inline="always")
def _emit(out, st, tok):
    # Writes past the capacity are dropped but counted: the caller sees
    # truncation (or an overflow it reports) from st[S_N] > cap.
    if st[S_N] < st[S_CAP]:
        out[st[S_BASE] + st[S_N]] = tok
    st[S_N] += 1


@njit(nogil=True, cache=True)
def _wordpiece(n, vt, cfg, wbuf, out, st):
    """Greedy longest-match-first pieces of wbuf[:n]; one [UNK] if any piece fails."""
    start_n = st[S_N]
    pos = 0
    while pos < n:
        node = 0 if pos == 0 else cfg.cont
        best_end = -1
        best_id = -1
        j = pos
        while j < n and node >= 0:
            node = child(vt, node, wbuf[j])
            j += 1
            if node >= 0 and vt.node_id[node] >= 0:
                best_end = j
                best_id = vt.node_id[node]
        if best_id < 0:
            st[S_N] = start_n
            _emit(out, st, cfg.unk_id)
            return
        _emit(out, st, best_id)
        pos = best_end


@njit(nogil=True, cache=True)
def _end_word(vt, cfg, wbuf, out, st):
    n = st[S_W]
    if n == 0:
        return
    st[S_W] = 0
    if n > cfg.max_chars:
        _emit(out, st, cfg.unk_id)
    else:
        _wordpiece(n, vt, cfg, wbuf, out, st)


@njit(nogil=True, cache=True)
def _end_word_of(vt, cfg, D):
    """_end_word from the general (rare) path, which holds D."""
    _end_word(vt, cfg, D.wbuf, D.out, D.st)


@njit(nogil=True, cache=True, inline="always")
def _append(D, c):
    w = D.st[S_W]
    if w < len(D.wbuf):   # longer words only need their length
        D.wbuf[w] = c
    D.st[S_W] = w + 1


@njit(nogil=True, cache=True)
def _split(c, W, D):
    """BertPreTokenizer on one normalized code point."""
    cls = W.ut.cls[c]
    if cls & (WS | PUNCT):
        _end_word_of(W.vocab, W.cfg, D)
        if cls & PUNCT:
            D.wbuf[0] = c
            D.st[S_W] = 1
            _end_word_of(W.vocab, W.cfg, D)
    else:
        _append(D, c)


@njit(nogil=True, cache=True)
def _pretok(cp, W, D):
    """Lowercase (the last normalizer step) then pre-tokenize."""
    ut = W.ut
    li = ut.low_idx[cp] if W.cfg.lower else -1
    if li < 0:
        _split(cp, W, D)
    else:
        for m in range(ut.low_off[li], ut.low_off[li + 1]):
            _split(ut.low_data[m], W, D)


@njit(nogil=True, cache=True)
def _flush_pending(W, D):
    """Emit the waiting non-starters in canonical order (stable by combining class)."""
    pend, st = D.pend, D.st
    n = st[S_P]
    st[S_P] = 0
    if n == 1:
        _pretok(pend[0], W, D)
        return
    ccc = W.ut.ccc
    present = np.zeros(256, np.bool_)
    for i in range(n):
        present[ccc[pend[i]]] = True
    for r in range(256):   # linear: at most 255 passes whatever the run length
        if present[r]:
            for i in range(n):
                if ccc[pend[i]] == r:
                    _pretok(pend[i], W, D)


@njit(nogil=True, cache=True)
def _decomposed(x, W, D):
    """One code point of the NFD stream, with accents stripped."""
    if W.ut.ccc[x] == 0:
        if D.st[S_P] > 0:
            _flush_pending(W, D)
        if not W.ut.cls[x] & MN:
            _pretok(x, W, D)
    elif not W.ut.cls[x] & MN:
        D.pend[D.st[S_P]] = x
        D.st[S_P] += 1


@njit(nogil=True, cache=True)
def _normalized(cp, W, D):
    if not W.cfg.strip:
        _pretok(cp, W, D)
        return
    ut = W.ut
    i = ut.nfd_idx[cp]
    if i < 0:
        _decomposed(cp, W, D)
    else:
        for k in range(ut.nfd_off[i], ut.nfd_off[i + 1]):
            _decomposed(ut.nfd_data[k], W, D)


@njit(nogil=True, cache=True)
def _raw_char(cp, W, D):
    """BertNormalizer's clean_text and handle_chinese_chars on one raw code point."""
    cls = W.ut.cls[cp]
    if W.cfg.clean:
        if cls & DROP:
            return
        if cls & SPACE:
            cp = 0x20
    if W.cfg.chinese and cls & CHINESE:
        _normalized(0x20, W, D)
        _normalized(cp, W, D)
        _normalized(0x20, W, D)
    else:
        _normalized(cp, W, D)


@njit(nogil=True, cache=True, inline="always")
def _end_segment(W, D):
    if D.st[S_P] > 0:
        _flush_pending(W, D)
    _end_word(W.vocab, W.cfg, D.wbuf, D.out, D.st)


@njit(nogil=True, cache=True)
def _match_added(cps, i, n, at):
    """Longest added token starting at cps[i]: (length, id), length 0 if none."""
    node = 0
    best_len, best_id = 0, -1
    j = i
    while j < n:
        node = child(at, node, cps[j])
        if node < 0:
            break
        j += 1
        if at.node_id[node] >= 0:
            best_len, best_id = j - i, at.node_id[node]
    return best_len, best_id


@njit(nogil=True, cache=True)
def encode_doc(buf, b0, b1, W, D, max_content):
    """Content tokens of document buf[b0:b1] into D.out[st[S_BASE]:] (at most st[S_CAP] kept).

    Returns (n, bad): n tokens produced (stops once n > max_content, the sign
    of truncation) and the bad-UTF-8 flag. Most characters take the fast path
    through W.fast (one lookup, see unicode_tables.fast_map); the rest go
    through _raw_char.
    """
    cps, st, wbuf, out = D.cps, D.st, D.wbuf, D.out
    n, bad = decode_range(buf, b0, b1, cps)
    st[S_N] = 0
    st[S_W] = 0
    st[S_P] = 0
    has_added = len(W.added.node_id) > 1
    vt, cfg = W.vocab, W.cfg
    fm, seq_off, seq_data, afirst = W.fast
    i = 0
    while i < n and st[S_N] <= max_content:
        cp = cps[i]
        if has_added and afirst[cp & 4095]:
            m, tok = _match_added(cps, i, n, W.added)
            if m > 0:   # an added token ends the segment before it
                _end_segment(W, D)
                _emit(out, st, tok)
                i += m
                continue
        i += 1
        f = fm[cp] if st[S_P] == 0 else FM_SLOW
        if f >= 0:
            _append(D, f)
        elif f == FM_DROP:
            pass
        elif f == FM_SPLIT:
            _end_word(vt, cfg, wbuf, out, st)
        elif f <= FM_SEQ:
            for k in range(seq_off[FM_SEQ - f], seq_off[FM_SEQ - f + 1]):
                _append(D, seq_data[k])
        elif f <= FM_ISOLATE:
            _end_word(vt, cfg, wbuf, out, st)
            _append(D, FM_ISOLATE - f)
            _end_word(vt, cfg, wbuf, out, st)
        else:
            _raw_char(cp, W, D)
    if st[S_N] <= max_content:
        _end_segment(W, D)
    return st[S_N], bad


@njit(nogil=True, cache=True)
def _encode_block(b, B, W, prefix, suffix, max_content):
    """Documents B.blocks[b]:B.blocks[b + 1], with buffers of their own."""
    npre, nsuf = len(prefix), len(suffix)
    d0, d1 = B.blocks[b], B.blocks[b + 1]
    longest = 1
    for d in range(d0, d1):
        longest = max(longest, B.offsets[d + 1] - B.offsets[d])
    D = Doc(B.out, np.empty(longest, np.int32), np.empty(longest * W.cfg.max_nfd + 1, np.int32),
            np.empty(W.cfg.max_chars + 1, np.int32), np.zeros(5, np.int64))
    for d in range(d0, d1):
        base = B.out_base[d]
        B.out[base:base + npre] = prefix
        D.st[S_BASE] = base + npre
        D.st[S_CAP] = B.caps[d]
        n, bad = encode_doc(B.buf, B.offsets[d], B.offsets[d + 1], W, D, max_content)
        f = 2 if bad else 0
        if n > max_content:
            f |= 1
        elif n > B.caps[d]:
            f |= 128
        B.flags[d] = f
        n = min(n, max_content, B.caps[d])
        B.out[base + npre + n:base + npre + n + nsuf] = suffix
        B.counts[d] = npre + n + nsuf


@njit(nogil=True, cache=True, parallel=True)
def _encode_blocks(B, ut, fast, vocab, added, cfg, prefix, suffix, max_content):
    # A parallel loop cannot take a tuple nested in a tuple (numba 0.6x: "scalar type
    # given for non scalar argument"), so WordPieceTables travels in parts.
    for b in prange(len(B.blocks) - 1):
        _encode_block(b, B, WordPieceTables(ut, fast, vocab, added, cfg), prefix, suffix, max_content)


def encode_batch(buf, offsets, blocks, out_base, caps, W, prefix, suffix, max_content):
    """Tokenize every document; block b (docs blocks[b]:blocks[b+1]) runs on one thread.

    Document d owns out[out_base[d]:...]: prefix, up to caps[d] content
    tokens, suffix. Returns (out, counts, flags): counts[d] = tokens kept;
    flags[d] bits: 1 content cut at max_content, 2 bad UTF-8 replaced,
    128 more tokens than caps[d] without truncation (a sizing bug the caller reports).
    """
    n_docs = len(offsets) - 1
    B = Batch(buf, offsets, blocks, out_base, caps, np.empty(out_base[n_docs], np.int32),
              np.zeros(n_docs, np.int64), np.zeros(n_docs, np.uint8))
    _encode_blocks(B, W.ut, W.fast, W.vocab, W.added, W.cfg, prefix, suffix, max_content)
    return B.out, B.counts, B.flags


@njit(nogil=True, cache=True)
def compact(out, out_base, counts):
    """Concatenate each document's kept tokens: (ids, offsets)."""
    n_docs = len(counts)
    offs = np.zeros(n_docs + 1, np.int64)
    for d in range(n_docs):
        offs[d + 1] = offs[d] + counts[d]
    ids = np.empty(offs[n_docs], np.int32)
    for d in range(n_docs):
        ids[offs[d]:offs[d + 1]] = out[out_base[d]:out_base[d] + counts[d]]
    return ids, offs
