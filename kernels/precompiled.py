"""The Precompiled normalizer of SentencePiece models (the `precompiled_charsmap` of XLM-R, T5,
ALBERT tokenizer.json files), as HF `tokenizers` 0.23.3 applies it.

The charsmap is a little-endian u32 byte size, a Darts double-array trie of that many bytes
(u32 units) over UTF-8 keys, then the normalized strings, each ended by a NUL byte; a key's
leaf value is its string's byte offset. HF walks the text by extended grapheme clusters
(UAX #29): a cluster of fewer than 6 UTF-8 bytes is looked up whole, and if some prefix of it
is a key, the shortest such prefix's string replaces the whole cluster (so "\\r\\n" becomes
what "\\r" becomes, and a ligature's accent is dropped: HF keeps SentencePiece's behaviour);
otherwise each character is replaced by its own string where it is a key.

Clusters follow GB3-GB13 from a per-code-point class table (kernels/grapheme_break.npz);
GB9c (Indic conjuncts) is left out: it only joins clusters of 6 bytes or more, which are
looked up per character either way.
"""

import os

import numpy as np
from numba import njit

from .utf8 import encode_one

OTHER, CR, LF, CONTROL, EXTEND, ZWJ, RI, PREPEND, SPACING_MARK, L, V, T, LV, LVT = range(14)
PICT = 0x80


def grapheme_table():
    """uint8 per code point: its Grapheme_Cluster_Break class | PICT (kernels/gen_grapheme_table.py)."""
    with np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "grapheme_break.npz")) as f:
        return f["gcb"]


def parse_charsmap(raw):
    """(units uint32, strings as code points int32, byte offset -> code point offset int64) of a charsmap."""
    raw = bytes(raw)
    if len(raw) < 4:
        raise ValueError("a precompiled_charsmap of %d bytes has no trie size" % len(raw))
    size = int.from_bytes(raw[:4], "little")
    if size % 4 or 4 + size > len(raw):
        raise ValueError("precompiled_charsmap: trie size %d does not fit its %d bytes" % (size, len(raw)))
    units = np.frombuffer(raw[4:4 + size], dtype="<u4").astype(np.uint32)
    blob = raw[4 + size:]
    text = blob.decode("utf-8")   # HF requires valid UTF-8
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int32)
    lens = np.array([len(c.encode("utf-8")) for c in text], dtype=np.int64)
    byte_to_cp = np.full(len(blob) + 1, -1, dtype=np.int64)
    byte_to_cp[np.concatenate(([0], np.cumsum(lens)))] = np.arange(len(text) + 1)
    return units, cps, byte_to_cp


@njit(nogil=True, cache=True)
def _gcb(G, c):
    return G[c] & 0x7F


@njit(nogil=True, cache=True)
def grapheme_end(cps, i, n, G):
    """End of the extended grapheme cluster that starts at cps[i] (i < n)."""
    prev = _gcb(G, cps[i])
    pict = (G[cps[i]] & PICT) != 0   # the cluster so far is ExtPict Extend* (GB11)
    zwj_pict = False                 # ... ExtPict Extend* ZWJ
    ris = 1 if prev == RI else 0
    k = i + 1
    while k < n:
        c = cps[k]
        cur = _gcb(G, c)
        if prev == CR and cur == LF:
            join = True
        elif prev == CR or prev == LF or prev == CONTROL or cur == CR or cur == LF or cur == CONTROL:
            join = False
        elif prev == L and (cur == L or cur == V or cur == LV or cur == LVT):
            join = True
        elif (prev == LV or prev == V) and (cur == V or cur == T):
            join = True
        elif (prev == LVT or prev == T) and cur == T:
            join = True
        elif cur == EXTEND or cur == ZWJ or cur == SPACING_MARK or prev == PREPEND:
            join = True
        elif zwj_pict and (G[c] & PICT):
            join = True
        elif prev == RI and cur == RI and ris % 2 == 1:
            join = True
        else:
            join = False
        if not join:
            return k
        zwj_pict = pict and cur == ZWJ
        pict = (pict and cur == EXTEND) or ((G[c] & PICT) != 0 and cur != ZWJ)
        ris = ris + 1 if cur == RI else 0
        prev = cur
        k += 1
    return n


@njit(nogil=True, cache=True)
def _lookup(units, cps, a, b, tmp):
    """Leaf value of the shortest key that is a prefix of the UTF-8 of cps[a:b], or -1 (Darts'
    common prefix search; a NUL byte ends the key)."""
    nb = 0
    for k in range(a, b):
        nb = encode_one(cps[k], tmp, nb)
    pos = np.int64(0)
    unit = np.int64(units[0])
    pos ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
    for j in range(nb):
        c = np.int64(tmp[j])
        if c == 0:
            break
        pos ^= c
        if pos >= len(units):
            return -1
        unit = np.int64(units[pos])
        if (unit & ((1 << 31) | 0xFF)) != c:
            return -1
        pos ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
        if (unit >> 8) & 1:
            return np.int64(units[pos]) & ((1 << 31) - 1)
    return -1


@njit(nogil=True, cache=True)
def _put(strings, byte_to_cp, v, out, o):
    """Append the normalized string at byte offset v (up to its NUL) to out[o:]; returns o."""
    s = byte_to_cp[v] if v < len(byte_to_cp) else len(strings)
    while s < len(strings) and strings[s] != 0:
        out[o] = strings[s]
        o += 1
        s += 1
    return o


@njit(nogil=True, cache=True)
def single_values(units):
    """Per BMP code point: the leaf value of the key that is that one character (or a prefix of its
    UTF-8), -1 if none: most clusters are one such character, looked up once here."""
    out = np.full(0x10000, -1, np.int64)
    one = np.empty(1, np.int32)
    tmp = np.empty(8, np.uint8)
    for c in range(0x10000):
        if not 0xD800 <= c <= 0xDFFF:
            one[0] = c
            out[c] = _lookup(units, one, 0, 1, tmp)
    return out


@njit(nogil=True, cache=True)
def _char_value(cps, k, units, single, tmp):
    c = cps[k]
    return single[c] if c < 0x10000 else _lookup(units, cps, k, k + 1, tmp)


@njit(nogil=True, cache=True)
def normalize(cps, a, b, units, single, strings, byte_to_cp, G, out, tmp):
    """The Precompiled normalization of cps[a:b] into out; returns its length. single: single_values(units);
    tmp: >= 24 bytes."""
    o = 0
    i = a
    while i < b:
        j = grapheme_end(cps, i, b, G)
        if j == i + 1:   # one character: its own key or itself
            v = _char_value(cps, i, units, single, tmp)
            if v >= 0:
                o = _put(strings, byte_to_cp, v, out, o)
            else:
                out[o] = cps[i]
                o += 1
            i = j
            continue
        nb = 0
        for k in range(i, j):
            c = cps[k]
            nb += 1 if c < 0x80 else (2 if c < 0x800 else (3 if c < 0x10000 else 4))
            if nb >= 6:
                break
        v = _lookup(units, cps, i, j, tmp) if nb < 6 else -1
        if v >= 0:
            o = _put(strings, byte_to_cp, v, out, o)
        else:
            for k in range(i, j):
                v = _char_value(cps, k, units, single, tmp)
                if v >= 0:
                    o = _put(strings, byte_to_cp, v, out, o)
                else:
                    out[o] = cps[k]
                    o += 1
        i = j
    return o


@njit(nogil=True, cache=True)
def expansion(units, strings, byte_to_cp):
    """The most code points one input byte can become: max over the keys of len(string) / key bytes
    (at least 1). A depth-first walk over the double array to keys of 8 bytes (a child of node pos
    along byte c sits at pos ^ offset ^ c and carries the label c); a longer key counts as 9 bytes."""
    best = 1.0
    run = 0
    for k in range(len(strings)):   # the longest string over 9 bytes: the bound for keys past the walk
        run = run + 1 if strings[k] != 0 else 0
        best = max(best, run / 9)
    stack = np.empty((64 + 256 * 8, 2), np.int64)   # (node position after its offset, depth)
    u0 = np.int64(units[0])
    stack[0, 0] = (u0 >> 10) << ((u0 & (1 << 9)) >> 6)
    stack[0, 1] = 0
    top = 1
    while top > 0:
        top -= 1
        pos, depth = stack[top, 0], stack[top, 1]
        for c in range(1, 256):
            p = pos ^ c
            if p >= len(units):
                continue
            unit = np.int64(units[p])
            if (unit & ((1 << 31) | 0xFF)) != c:
                continue
            q = p ^ ((unit >> 10) << ((unit & (1 << 9)) >> 6))
            if (unit >> 8) & 1 and q < len(units):
                v = np.int64(units[q]) & ((1 << 31) - 1)
                s = byte_to_cp[v] if v < len(byte_to_cp) else len(strings)
                e = s
                while e < len(strings) and strings[e] != 0:
                    e += 1
                best = max(best, (e - s) / (depth + 1))
            if depth + 1 < 8 and top < len(stack):
                stack[top, 0], stack[top, 1] = q, depth + 1
                top += 1
    return best
