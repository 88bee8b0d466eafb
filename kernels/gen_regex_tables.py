"""Generate kernels/regex_tables.npz by probing the installed HF `tokenizers`.

The byte-level BPE pre-tokenizer regexes (GPT-2, Llama-3) use \\p{L}, \\p{N},
\\s and (for Llama-3) case-insensitive letters, as the Oniguruma engine inside
`tokenizers` classifies them; the Digits pre-tokenizer uses Rust's
char::is_numeric. Neither matches Python's unicodedata or the latest Unicode
exactly, so we do not derive the tables from a Unicode database: we ask the
engine itself, one probe string holding every code point, and record what it
answered. Run (test-time dependency `tokenizers` needed only here):

    python -m hpcllm.kernels.gen_regex_tables      # or: python kernels/gen_regex_tables.py

Output arrays (one entry per code point 0..0x10FFFF):
  classes  uint8  bit 1 = \\p{L}, 2 = \\p{N}, 4 = \\s, 8 = Rust is_numeric
  fold     uint8  the ASCII letter (or "'") a code point equals under (?i:),
                  for the letters of the contractions 's 't 're 've 'm 'll 'd; else 0
  tokenizers_version  str
"""

import os
import sys

import numpy as np

N_CP = 0x110000
L, N, S, DIGIT = 1, 2, 4, 8
FOLD_LETTERS = "strevmld'"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regex_tables.npz")


def _all_code_points():
    """Every scalar value (surrogates can not be in a Rust string) and their positions."""
    cps = np.array([c for c in range(N_CP) if not 0xD800 <= c <= 0xDFFF], dtype=np.int64)
    return cps, "".join(map(chr, cps))


def _matched(pattern, cps, text):
    """Boolean per code point: does `pattern` (one char wide) match it, per Oniguruma."""
    from tokenizers import Regex, pre_tokenizers

    kept = np.zeros(len(cps), dtype=bool)
    # 'removed' drops every match; what survives (char offsets) did not match.
    for _, (a, b) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text):
        kept[a:b] = True
    out = np.zeros(N_CP, dtype=bool)
    out[cps] = ~kept
    return out


def _rust_numeric(cps):
    """Digits(individual_digits=True) isolates each char::is_numeric char.

    Probe 'a c0 a c1 a ...': a numeric c_i comes back as a one-char piece at an
    odd offset; non-numeric ones merge with the 'a's into longer runs.
    """
    from tokenizers import pre_tokenizers

    text = "".join("a" + chr(c) for c in cps) + "a"
    out = np.zeros(N_CP, dtype=bool)
    for _, (a, b) in pre_tokenizers.Digits(individual_digits=True).pre_tokenize_str(text):
        if b - a == 1 and a % 2 == 1:
            out[cps[a // 2]] = True
    return out


def build():
    import tokenizers

    cps, text = _all_code_points()
    classes = np.zeros(N_CP, dtype=np.uint8)
    classes[_matched(r"\p{L}", cps, text)] |= L
    classes[_matched(r"\p{N}", cps, text)] |= N
    classes[_matched(r"\s", cps, text)] |= S
    classes[_rust_numeric(cps)] |= DIGIT
    fold = np.zeros(N_CP, dtype=np.uint8)
    for letter in FOLD_LETTERS:
        hit = _matched("(?i:%s)" % letter, cps, text)
        if np.any(fold[hit] != 0):
            raise RuntimeError("a code point folds to two contraction letters: %r" % letter)
        fold[hit] = ord(letter)
    return classes, fold, tokenizers.__version__


def main(path=OUT):
    classes, fold, version = build()
    np.savez_compressed(path, classes=classes, fold=fold, tokenizers_version=np.array(version))
    counts = {name: int(np.count_nonzero(classes & bit)) for name, bit in
              (("L", L), ("N", N), ("S", S), ("digit", DIGIT))}
    print("wrote %s (tokenizers %s): %s, fold %d" % (path, version, counts, np.count_nonzero(fold)))


if __name__ == "__main__":
    main(*sys.argv[1:])
