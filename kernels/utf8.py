"""UTF-8 decoding and encoding for the tokenizer kernels (shared by WordPiece and BPE).

Invalid input never raises: each maximal subpart of an ill-formed sequence
becomes one U+FFFD, exactly like Python's ``bytes.decode('utf-8', 'replace')``
and the WHATWG decoder (Unicode "best practice" for U+FFFD substitution). A
lone surrogate that Python encoded with 'surrogatepass' (ED A0..BF xx) is
ill-formed UTF-8, so it arrives here as three U+FFFD and sets the bad flag.
"""

import numpy as np
from numba import njit

REPLACEMENT = 0xFFFD


@njit(nogil=True, cache=True, inline="always")
def _cont(buf, i, end, lo, hi):
    """True when buf[i] exists and lies in [lo, hi] (a valid continuation byte here)."""
    return i < end and lo <= buf[i] <= hi


@njit(nogil=True, cache=True)
def decode_one(buf, pos, end):
    """Decode the code point at buf[pos] (pos < end).

    Returns (cp, next_pos, bad): bad is True when cp is a U+FFFD that replaced
    ill-formed bytes buf[pos:next_pos] (a maximal subpart, at least one byte).
    """
    b0 = np.int32(buf[pos])
    if b0 < 0x80:
        return b0, pos + 1, False
    # The allowed range of the second byte depends on the lead byte: this is
    # what rules out overlongs, surrogates (ED A0..) and code points > 10FFFF.
    if 0xC2 <= b0 <= 0xDF:
        n, lo, hi = 1, 0x80, 0xBF
    elif b0 == 0xE0:
        n, lo, hi = 2, 0xA0, 0xBF
    elif b0 == 0xED:
        n, lo, hi = 2, 0x80, 0x9F
    elif 0xE1 <= b0 <= 0xEF:
        n, lo, hi = 2, 0x80, 0xBF
    elif b0 == 0xF0:
        n, lo, hi = 3, 0x90, 0xBF
    elif 0xF1 <= b0 <= 0xF3:
        n, lo, hi = 3, 0x80, 0xBF
    elif b0 == 0xF4:
        n, lo, hi = 3, 0x80, 0x8F
    else:
        return np.int32(REPLACEMENT), pos + 1, True
    if not _cont(buf, pos + 1, end, lo, hi):
        return np.int32(REPLACEMENT), pos + 1, True
    if n == 1:
        cp = ((b0 & 0x1F) << 6) | (np.int32(buf[pos + 1]) & 0x3F)
        return np.int32(cp), pos + 2, False
    if n == 2:
        cp = (b0 & 0x0F) << 12
    else:
        cp = (b0 & 0x07) << 18
    cp |= (np.int32(buf[pos + 1]) & 0x3F) << ((n - 1) * 6)
    for k in range(2, n + 1):
        if not _cont(buf, pos + k, end, 0x80, 0xBF):
            return np.int32(REPLACEMENT), pos + k, True
        cp |= (np.int32(buf[pos + k]) & 0x3F) << ((n - k) * 6)
    return np.int32(cp), pos + n + 1, False


@njit(nogil=True, cache=True)
def decode_range(buf, start, end, out):
    """Decode buf[start:end] into out[0:n] (int32, len >= end - start).

    Returns (n, bad): the number of code points written and whether any
    ill-formed bytes were replaced by U+FFFD.
    """
    n = 0
    pos = start
    bad = False
    while pos < end:
        b0 = buf[pos]
        if b0 < 0x80:  # ASCII fast path
            out[n] = b0
            pos += 1
        else:
            cp, pos, b = decode_one(buf, pos, end)
            out[n] = cp
            bad |= b
        n += 1
    return n, bad


@njit(nogil=True, cache=True)
def encode_one(cp, out, pos):
    """Write code point cp as UTF-8 into out[pos:]; returns the new position."""
    if cp < 0x80:
        out[pos] = cp
        return pos + 1
    if cp < 0x800:
        out[pos] = 0xC0 | (cp >> 6)
        out[pos + 1] = 0x80 | (cp & 0x3F)
        return pos + 2
    if cp < 0x10000:
        out[pos] = 0xE0 | (cp >> 12)
        out[pos + 1] = 0x80 | ((cp >> 6) & 0x3F)
        out[pos + 2] = 0x80 | (cp & 0x3F)
        return pos + 3
    out[pos] = 0xF0 | (cp >> 18)
    out[pos + 1] = 0x80 | ((cp >> 12) & 0x3F)
    out[pos + 2] = 0x80 | ((cp >> 6) & 0x3F)
    out[pos + 3] = 0x80 | (cp & 0x3F)
    return pos + 4
