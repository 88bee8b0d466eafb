"""Incremental detokenizing and stop strings.

Tokens decode one by one into bytes that concatenate to the decode of the
whole sequence (the first as the start of a text: SentencePiece drops its
prepended space there only), so a completion keeps its UTF-8 bytes and
appends each new token's; a token may end inside a character, and the text
is decoded (invalid sequences replaced, as HF ``tokenizers`` does) only at
the end. Stop strings are matched on those bytes (UTF-8 is self-synchronising,
so a match of the encoded stop string is a match of the text), searching only
the tail a new token can complete: across token boundaries, O(stop length)
per step.
"""

from __future__ import annotations


class Completion:
    """The text side of one completion: its bytes so far and where a stop string ended it."""

    def __init__(self, tokenizer, stops: list[bytes]):
        self.tokenizer, self.stops = tokenizer, stops
        self.longest = max((len(s) for s in stops), default=0)
        self.buf = bytearray()
        self.cut = None       # byte length of the text once a stop string matched

    def add(self, token: int) -> bool:
        """Append a token's bytes; True when the text now contains a stop string (the text is cut before it)."""
        start = len(self.buf)
        self.buf += self.tokenizer.decode_bytes([token], at_start=not self.buf)
        if not self.stops:
            return False
        lo = max(0, start - self.longest + 1)
        hits = [i for i in (self.buf.find(s, lo) for s in self.stops) if i >= 0]
        if hits:
            self.cut = min(hits)
            return True
        return False

    def data(self) -> bytes:
        return bytes(self.buf if self.cut is None else self.buf[:self.cut])

    def text(self) -> str:
        return self.data().decode("utf-8", "replace")
