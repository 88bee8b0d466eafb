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
"""

import numpy as np
from numba import njit, prange

from hpcllm.kernels.utf8 import decode_range

N_CP = 0x110000
DROP, SPACE, CHINESE, WS, PUNCT, MN = 1, 2, 4, 8, 16, 32
FM_DROP, FM_SPLIT, FM_SLOW, FM_ISOLATE, FM_SEQ = -1, -2, -3, -16, -0x200000  # unicode_tables.fast_map
# cfg: int64 settings array; st: int64 per-document state
C_CLEAN, C_CHINESE, C_STRIP, C_LOWER, C_MAXCHARS, C_UNK, C_CONT = range(7)
S_N, S_W, S_P = range(3)   # tokens written, word length, pending marks
_MULT = np.uint64(0x9E3779B97F4A7C15)


# ---------------------------------------------------------------- tries
@njit(nogil=True, cache=True, inline="always")
def _slot(key, mask):
    return np.int64((np.uint64(key) * _MULT) >> np.uint64(32)) & mask


@njit(nogil=True, cache=True, inline="always")
def child(keys, vals, mask, node, cp):
    """Child of trie node `node` along code point cp, or -1."""
    key = np.int64(node) * N_CP + cp
    s = _slot(key, mask)
    while True:
        k = keys[s]
        if k == key:
            return vals[s]
        if k < 0:
            return -1
        s = (s + 1) & mask


@njit(nogil=True, cache=True)
def build_trie(data, off, ids):
    """Trie of strings data[off[t]:off[t+1]] (code points) -> ids[t].

    Returns (keys, vals, node_id, mask): edge hash table and each node's id (-1: none).
    """
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
    return keys, vals, node_id[:n_nodes].copy(), mask


@njit(nogil=True, cache=True)
def walk(trie, cps):
    """Node reached from the root along cps, or -1."""
    node = 0
    for cp in cps:
        node = child(trie[0], trie[1], trie[3], node, cp)
        if node < 0:
            return -1
    return node


# ---------------------------------------------------------------- emitting
@njit(nogil=True, cache=True, inline="always")
def _emit(out, base, cap, st, tok):
    # Writes past cap are dropped but counted: the caller sees truncation (or
    # an overflow it reports) from st[S_N] > cap.
    if st[S_N] < cap:
        out[base + st[S_N]] = tok
    st[S_N] += 1


@njit(nogil=True, cache=True)
def _wordpiece(wbuf, n, vt, cfg, out, base, cap, st):
    """Greedy longest-match-first pieces of wbuf[:n]; one [UNK] if any piece fails."""
    keys, vals, node_id, mask = vt
    start_n = st[S_N]
    pos = 0
    while pos < n:
        node = 0 if pos == 0 else cfg[C_CONT]
        best_end = -1
        best_id = -1
        j = pos
        while j < n and node >= 0:
            node = child(keys, vals, mask, node, wbuf[j])
            j += 1
            if node >= 0 and node_id[node] >= 0:
                best_end = j
                best_id = node_id[node]
        if best_id < 0:
            st[S_N] = start_n
            _emit(out, base, cap, st, cfg[C_UNK])
            return
        _emit(out, base, cap, st, best_id)
        pos = best_end


@njit(nogil=True, cache=True)
def _end_word(wbuf, vt, cfg, out, base, cap, st):
    n = st[S_W]
    if n == 0:
        return
    st[S_W] = 0
    if n > cfg[C_MAXCHARS]:
        _emit(out, base, cap, st, cfg[C_UNK])
    else:
        _wordpiece(wbuf, n, vt, cfg, out, base, cap, st)


@njit(nogil=True, cache=True, inline="always")
def _append(wbuf, st, c):
    w = st[S_W]
    if w < len(wbuf):   # longer words only need their length
        wbuf[w] = c
    st[S_W] = w + 1


@njit(nogil=True, cache=True)
def _split(c, ut, wbuf, vt, cfg, out, base, cap, st):
    """BertPreTokenizer on one normalized code point."""
    cls = ut[0][c]
    if cls & (WS | PUNCT):
        _end_word(wbuf, vt, cfg, out, base, cap, st)
        if cls & PUNCT:
            wbuf[0] = c
            st[S_W] = 1
            _end_word(wbuf, vt, cfg, out, base, cap, st)
    else:
        _append(wbuf, st, c)


@njit(nogil=True, cache=True)
def _pretok(cp, ut, wbuf, vt, cfg, out, base, cap, st):
    """Lowercase (the last normalizer step) then pre-tokenize."""
    li = ut[5][cp] if cfg[C_LOWER] else -1
    if li < 0:
        _split(cp, ut, wbuf, vt, cfg, out, base, cap, st)
    else:
        for m in range(ut[6][li], ut[6][li + 1]):
            _split(ut[7][m], ut, wbuf, vt, cfg, out, base, cap, st)


@njit(nogil=True, cache=True)
def _flush_pending(pend, ut, wbuf, vt, cfg, out, base, cap, st):
    """Emit the waiting non-starters in canonical order (stable by combining class)."""
    n = st[S_P]
    st[S_P] = 0
    if n == 1:
        _pretok(pend[0], ut, wbuf, vt, cfg, out, base, cap, st)
        return
    ccc = ut[1]
    present = np.zeros(256, np.bool_)
    for i in range(n):
        present[ccc[pend[i]]] = True
    for r in range(256):   # linear: at most 255 passes whatever the run length
        if present[r]:
            for i in range(n):
                if ccc[pend[i]] == r:
                    _pretok(pend[i], ut, wbuf, vt, cfg, out, base, cap, st)


@njit(nogil=True, cache=True)
def _decomposed(x, pend, ut, wbuf, vt, cfg, out, base, cap, st):
    """One code point of the NFD stream, with accents stripped."""
    if ut[1][x] == 0:
        if st[S_P] > 0:
            _flush_pending(pend, ut, wbuf, vt, cfg, out, base, cap, st)
        if not ut[0][x] & MN:
            _pretok(x, ut, wbuf, vt, cfg, out, base, cap, st)
    elif not ut[0][x] & MN:
        pend[st[S_P]] = x
        st[S_P] += 1


@njit(nogil=True, cache=True)
def _normalized(cp, pend, ut, wbuf, vt, cfg, out, base, cap, st):
    if not cfg[C_STRIP]:
        _pretok(cp, ut, wbuf, vt, cfg, out, base, cap, st)
        return
    i = ut[2][cp]
    if i < 0:
        _decomposed(cp, pend, ut, wbuf, vt, cfg, out, base, cap, st)
    else:
        for k in range(ut[3][i], ut[3][i + 1]):
            _decomposed(ut[4][k], pend, ut, wbuf, vt, cfg, out, base, cap, st)


@njit(nogil=True, cache=True)
def _raw_char(cp, pend, ut, wbuf, vt, cfg, out, base, cap, st):
    """BertNormalizer's clean_text and handle_chinese_chars on one raw code point."""
    cls = ut[0][cp]
    if cfg[C_CLEAN]:
        if cls & DROP:
            return
        if cls & SPACE:
            cp = 0x20
    if cfg[C_CHINESE] and cls & CHINESE:
        _normalized(0x20, pend, ut, wbuf, vt, cfg, out, base, cap, st)
        _normalized(cp, pend, ut, wbuf, vt, cfg, out, base, cap, st)
        _normalized(0x20, pend, ut, wbuf, vt, cfg, out, base, cap, st)
    else:
        _normalized(cp, pend, ut, wbuf, vt, cfg, out, base, cap, st)


@njit(nogil=True, cache=True)
def _end_segment(pend, ut, wbuf, vt, cfg, out, base, cap, st):
    if st[S_P] > 0:
        _flush_pending(pend, ut, wbuf, vt, cfg, out, base, cap, st)
    _end_word(wbuf, vt, cfg, out, base, cap, st)


@njit(nogil=True, cache=True)
def _match_added(cps, i, n, at):
    """Longest added token starting at cps[i]: (length, id), length 0 if none."""
    keys, vals, node_id, mask = at
    node = 0
    best_len, best_id = 0, -1
    j = i
    while j < n:
        node = child(keys, vals, mask, node, cps[j])
        if node < 0:
            break
        j += 1
        if node_id[node] >= 0:
            best_len, best_id = j - i, node_id[node]
    return best_len, best_id


@njit(nogil=True, cache=True)
def encode_doc(buf, b0, b1, cps, pend, wbuf, st, ut, ft, vt, at, cfg, out, base, cap, max_content):
    """Content tokens of document buf[b0:b1] into out[base:base+cap].

    Returns (n, bad): n tokens produced (stops once n > max_content, the sign
    of truncation; only the first cap are stored) and the bad-UTF-8 flag.
    Most characters take the fast path through ft = (fast_map, seq_off,
    seq_data) (see unicode_tables.fast_map); the rest go through _raw_char.
    """
    n, bad = decode_range(buf, b0, b1, cps)
    fm, seq_off, seq_data, afirst = ft
    st[:] = 0   # scratch state, reused across a block's documents
    has_added = len(at[2]) > 1
    i = 0
    while i < n and st[S_N] <= max_content:
        cp = cps[i]
        if has_added and afirst[cp & 4095]:
            m, tok = _match_added(cps, i, n, at)
            if m > 0:   # an added token ends the segment before it
                _end_segment(pend, ut, wbuf, vt, cfg, out, base, cap, st)
                _emit(out, base, cap, st, tok)
                i += m
                continue
        i += 1
        f = fm[cp] if st[S_P] == 0 else FM_SLOW
        if f >= 0:
            _append(wbuf, st, f)
        elif f == FM_DROP:
            pass
        elif f == FM_SPLIT:
            _end_word(wbuf, vt, cfg, out, base, cap, st)
        elif f <= FM_SEQ:
            for k in range(seq_off[FM_SEQ - f], seq_off[FM_SEQ - f + 1]):
                _append(wbuf, st, seq_data[k])
        elif f <= FM_ISOLATE:
            _end_word(wbuf, vt, cfg, out, base, cap, st)
            _append(wbuf, st, FM_ISOLATE - f)
            _end_word(wbuf, vt, cfg, out, base, cap, st)
        else:
            _raw_char(cp, pend, ut, wbuf, vt, cfg, out, base, cap, st)
    if st[S_N] <= max_content:
        _end_segment(pend, ut, wbuf, vt, cfg, out, base, cap, st)
    return st[S_N], bad


@njit(nogil=True, cache=True, parallel=True)
def encode_batch(buf, offsets, blocks, out_base, caps, ut, ft, vt, at, cfg, prefix, suffix,
                 max_content, max_nfd):
    """Tokenize every document; block b (docs blocks[b]:blocks[b+1]) runs on one thread.

    Document d owns out[out_base[d]:...]: prefix, up to caps[d] content
    tokens, suffix. Returns (out, counts, flags): counts[d] = tokens kept;
    flags[d] bits: 1 content cut at max_content, 2 bad UTF-8 replaced,
    128 more tokens than caps[d] without truncation (a sizing bug the caller reports).
    """
    n_docs = len(offsets) - 1
    out = np.empty(out_base[n_docs], np.int32)
    counts = np.zeros(n_docs, np.int64)
    flags = np.zeros(n_docs, np.uint8)
    npre, nsuf = len(prefix), len(suffix)
    for b in prange(len(blocks) - 1):
        longest = 1
        for d in range(blocks[b], blocks[b + 1]):
            longest = max(longest, offsets[d + 1] - offsets[d])
        cps = np.empty(longest, np.int32)
        pend = np.empty(longest * max_nfd + 1, np.int32)
        wbuf = np.empty(cfg[C_MAXCHARS] + 1, np.int32)
        st = np.zeros(3, np.int64)
        for d in range(blocks[b], blocks[b + 1]):
            base = out_base[d]
            out[base:base + npre] = prefix
            n, bad = encode_doc(buf, offsets[d], offsets[d + 1], cps, pend, wbuf, st, ut, ft,
                                vt, at, cfg, out, base + npre, caps[d], max_content)
            f = 2 if bad else 0
            if n > max_content:
                f |= 1
            elif n > caps[d]:
                f |= 128
            flags[d] = f
            n = min(n, max_content, caps[d])
            out[base + npre + n:base + npre + n + nsuf] = suffix
            counts[d] = npre + n + nsuf
    return out, counts, flags


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
