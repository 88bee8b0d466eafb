"""The normalised text documents are compared on, given to the executor in place of a tokenizer.

Always: Unicode NFC and whitespace collapsed (every run of whitespace one
space, none at the ends), so words are separated by one ASCII space, which
is what the shingling kernel (``hpcllm.kernels.minhash``) splits on.  With
``simplify`` also what datatrove's ``simplify_text`` does with its default
``TextNormConfig``: lowercase, punctuation removed, diacritics stripped (NFD,
combining marks dropped), digit runs replaced by ``0``.  One difference:
punctuation here is every Unicode punctuation character (categories P*) and
control character (Cc), where datatrove lists its own set.
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

import numpy as np

from hpcllm.tokenizer.encoding import FLAG_BAD_UTF8

DIGITS = re.compile(r"\d+")


def _punctuation_table() -> dict:
    """Unicode punctuation (P*, all below U+20000) and control characters (Cc) but whitespace -> None."""
    return {c: None for c in range(0x20000) if (unicodedata.category(chr(c))[0] == "P"
                                                 or unicodedata.category(chr(c)) == "Cc") and not chr(c).isspace()}


_PUNCT = None


def normalise(text: str, simplify: bool) -> str:
    global _PUNCT
    if simplify:
        if _PUNCT is None:
            _PUNCT = _punctuation_table()
        text = unicodedata.normalize("NFD", text.lower().translate(_PUNCT))
        text = DIGITS.sub("0", "".join(c for c in text if unicodedata.category(c) != "Mn"))
    return " ".join(unicodedata.normalize("NFC", text).split())    # str.split(): runs of str.isspace()


class Normalised(NamedTuple):
    """What ``encode_bytes`` gives: the documents' normalised UTF-8 bytes (uint8) cut by offsets."""
    ids: np.ndarray
    offsets: np.ndarray
    flags: np.ndarray


class TextNormaliser:
    """Stands in for the executor's tokenizer (``Job.tokenizer``): documents -> normalised bytes.

    Invalid UTF-8 is replaced by U+FFFD and flagged (status BAD_UTF8), as the tokenizers do.
    """

    def __init__(self, simplify: bool):
        self.simplify = simplify

    def encode_bytes(self, buf, offsets, max_length=None, add_special_tokens=True) -> Normalised:
        raw = memoryview(np.ascontiguousarray(buf, np.uint8))
        flags = np.zeros(len(offsets) - 1, np.uint8)
        out = []
        for d in range(len(offsets) - 1):
            data = bytes(raw[offsets[d]:offsets[d + 1]])
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text, flags[d] = data.decode("utf-8", "replace"), FLAG_BAD_UTF8
            out.append(normalise(text, self.simplify).encode("utf-8", "surrogatepass"))
        lens = np.fromiter(map(len, out), np.int64, len(out))
        new = np.zeros(len(out) + 1, np.int64)
        np.cumsum(lens, out=new[1:])
        return Normalised(np.frombuffer(b"".join(out), np.uint8), new, flags)
