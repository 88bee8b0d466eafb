"""Hand-compiled byte-level BPE pre-tokenizer regexes (GPT-2, Llama-3, Qwen2), on code points.

HF `tokenizers` splits text with Oniguruma regexes (leftmost match, first
matching alternative, backtracking). The two patterns below cover GPT-2-style
and Llama-3-style vocabularies; each `*_end` function returns where the match
that starts at i ends, replaying the alternatives in order, including the
backtracking of ``\\s+(?!\\S)`` and ``\\s*[\\r\\n]+``. Both patterns match
every character, so the pieces tile the segment (no gaps to keep).

Classes come from regex_tables.npz, probed from the installed `tokenizers`
(see gen_regex_tables.py): bit 1 \\p{L}, 2 \\p{N}, 4 \\s, 8 Rust is_numeric.
"""

import os

import numpy as np
from numba import njit

GPT2, LLAMA3, QWEN2 = 0, 1, 2

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's is Llama-3's with single digits (\p{N} instead of \p{N}{1,3})
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
PATTERNS = {GPT2_PATTERN: GPT2, LLAMA3_PATTERN: LLAMA3, QWEN2_PATTERN: QWEN2}
PATTERN_OF = {mode: pattern for pattern, mode in PATTERNS.items()}

_L, _N, _S, _DIGIT = 1, 2, 4, 8
_OTHER = 0  # pseudo-class: not \s, not \p{L}, not \p{N}
_CR, _LF, _SP, _APOS = 13, 10, 32, 39


def load_tables():
    """(classes, fold, tokenizers_version) from the committed probe tables."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regex_tables.npz")
    with np.load(path) as d:
        return d["classes"], d["fold"], str(d["tokenizers_version"])


@njit(nogil=True, cache=True, inline="always")
def _kind(cls, c):
    """One of _L, _N, _S, _OTHER (the probe checked that the classes are disjoint)."""
    return cls[c] & (_L | _N | _S)


@njit(nogil=True, cache=True)
def _run_end(cp, j, n, cls, kind):
    """End of the run of characters of `kind` starting at j."""
    while j < n and _kind(cls, cp[j]) == kind:
        j += 1
    return j


@njit(nogil=True, cache=True)
def _contraction_end(cp, i, n, fold):
    """'s 't 're 've 'm 'll 'd at i (fold maps the letters, case folded or not); else -1."""
    if cp[i] != _APOS or i + 1 >= n:
        return -1
    a = fold[cp[i + 1]]
    if a == 115 or a == 116 or a == 109 or a == 100:  # s t m d
        return i + 2
    if i + 2 < n:
        b = fold[cp[i + 2]]
        if (a == 114 and b == 101) or (a == 118 and b == 101) or (a == 108 and b == 108):  # re ve ll
            return i + 3
    return -1


@njit(nogil=True, cache=True)
def _space_tail(cp, i, n, cls):
    """\\s+(?!\\S)|\\s+ at whitespace i: leave the last space of a run to the next piece."""
    j = _run_end(cp, i, n, cls, _S)
    if j == n or j - 1 == i:
        return j
    return j - 1


@njit(nogil=True, cache=True)
def gpt2_end(cp, i, n, cls, exact):
    """End of the GPT-2 match at i; `exact` (see exact_fold) keeps contractions case-sensitive."""
    e = _contraction_end(cp, i, n, exact)
    if e >= 0:
        return e
    # ' ?\p{L}+' | ' ?\p{N}+' | ' ?[^\s\p{L}\p{N}]+': an optional ASCII space, then a run.
    if cp[i] == _SP and i + 1 < n:
        k = _kind(cls, cp[i + 1])
        if k != _S:
            return _run_end(cp, i + 1, n, cls, k)
    k = _kind(cls, cp[i])
    if k != _S:
        return _run_end(cp, i, n, cls, k)
    return _space_tail(cp, i, n, cls)


@njit(nogil=True, cache=True)
def _crlf_run_end(cp, j, n):
    while j < n and (cp[j] == _CR or cp[j] == _LF):
        j += 1
    return j


@njit(nogil=True, cache=True)
def llama3_end(cp, i, n, cls, fold, max_digits):
    """End of the Llama-3 (max_digits 3) or Qwen2 (1) match at i; `fold` case-folds contractions."""
    e = _contraction_end(cp, i, n, fold)
    if e >= 0:
        return e
    c = cp[i]
    k = _kind(cls, c)
    # [^\r\n\p{L}\p{N}]?\p{L}+
    if k != _L and k != _N and c != _CR and c != _LF and i + 1 < n and _kind(cls, cp[i + 1]) == _L:
        return _run_end(cp, i + 1, n, cls, _L)
    if k == _L:
        return _run_end(cp, i, n, cls, _L)
    # \p{N}{1,3} (Qwen2: \p{N})
    if k == _N:
        j = i + 1
        while j < n and j < i + max_digits and _kind(cls, cp[j]) == _N:
            j += 1
        return j
    # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    if c == _SP and i + 1 < n and _kind(cls, cp[i + 1]) == _OTHER:
        return _crlf_run_end(cp, _run_end(cp, i + 1, n, cls, _OTHER), n)
    if k == _OTHER:
        return _crlf_run_end(cp, _run_end(cp, i, n, cls, _OTHER), n)
    # \s*[\r\n]+ : \s* backtracks to the last CR/LF of the whitespace run.
    j = _run_end(cp, i, n, cls, _S)
    for m in range(j - 1, i - 1, -1):
        if cp[m] == _CR or cp[m] == _LF:
            return m + 1
    return _space_tail(cp, i, n, cls)


@njit(nogil=True, cache=True)
def piece_end(mode, cp, i, n, cls, fold):
    """End of the pre-tokenizer piece starting at i in the segment ending at n.

    `fold` is the probed case-fold table for LLAMA3/QWEN2 and exact_fold() for GPT2.
    """
    if mode == GPT2:
        return gpt2_end(cp, i, n, cls, fold)
    return llama3_end(cp, i, n, cls, fold, 3 if mode == LLAMA3 else 1)


@njit(nogil=True, cache=True)
def digits_end(cp, i, n, cls):
    """Digits(individual_digits=True): each Rust-numeric char alone, other runs whole."""
    if cls[cp[i]] & _DIGIT:
        return i + 1
    j = i + 1
    while j < n and not (cls[cp[j]] & _DIGIT):
        j += 1
    return j


def exact_fold():
    """The GPT-2 pattern is case-sensitive: only the lower-case letters themselves."""
    t = np.zeros(0x110000, dtype=np.uint8)
    for ch in "strevmld'":
        t[ord(ch)] = ord(ch)
    return t
