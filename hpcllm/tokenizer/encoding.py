"""The batch types of the tokenizers: UTF-8 documents in, ragged token ids out."""

import numpy as np

from hpcllm.errors import HpcllmError

FLAG_TRUNCATED = 1   # content was cut to fit max_length
FLAG_BAD_UTF8 = 2    # invalid UTF-8 / lone surrogates were replaced by U+FFFD


class Encoding:
    """A ragged batch of token ids: document i is ids[offsets[i]:offsets[i+1]].

    attention_mask (uint8, aligned with ids) is 0 on padding; None when the
    batch was not padded (every token is real).
    """

    def __init__(self, ids, offsets, flags, attention_mask=None):
        self.ids = np.asarray(ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.flags = np.asarray(flags, dtype=np.uint8)
        self.attention_mask = None if attention_mask is None else np.asarray(attention_mask, np.uint8)

    @classmethod
    def concat(cls, parts):
        """One Encoding of consecutive batches (without attention masks)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.uint8))
        lens = np.concatenate([p.lengths() for p in parts])
        offs = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offs[1:])
        return cls(np.concatenate([p.ids for p in parts]), offs, np.concatenate([p.flags for p in parts]))

    def __len__(self):
        return len(self.offsets) - 1

    def lengths(self):
        return np.diff(self.offsets)

    def positions(self):
        """Each token's index within its document (int64, aligned with ids)."""
        return np.arange(len(self.ids), dtype=np.int64) - np.repeat(self.offsets[:-1], self.lengths())

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of a batch of {len(self)}")
        i %= len(self)
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def to_lists(self):
        return [self[i].tolist() for i in range(len(self))]

    def __repr__(self):
        return f"Encoding({len(self)} documents, {len(self.ids)} tokens)"


def pack_texts(texts):
    """(buf uint8, offsets int64) for a list of str/bytes; str keeps lone surrogates
    ('surrogatepass') so the kernel replaces and flags them instead of Python raising."""
    parts = [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else bytes(t) for t in texts]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    buf = np.frombuffer(bytearray(b"".join(parts)), np.uint8)   # writable: one kernel signature
    return buf, offsets


def check_batch(buf, offsets):
    """(buf, offsets) as the kernels take them: writable contiguous uint8, rising int64 offsets."""
    buf = np.asarray(buf, np.uint8)
    if buf.ndim != 1 or not buf.flags.writeable or not buf.flags.c_contiguous:
        buf = np.array(buf, np.uint8).ravel()
    offsets = np.ascontiguousarray(offsets, np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] < 0 or offsets[-1] > len(buf) \
            or np.any(offsets[1:] < offsets[:-1]):
        raise HpcllmError(f"encode_bytes: offsets must be a rising 1-d array from >= 0 to <= len(buf)={len(buf)}")
    return buf, offsets


def content_limit(max_length, n_special):
    """Content tokens a document keeps under max_length (which counts the special tokens,
    as in HF truncation); None: no limit."""
    if max_length is None:
        return None
    if max_length < n_special:
        raise HpcllmError(f"max_length={max_length} is shorter than the {n_special} special tokens "
                          "the tokenizer adds")
    return int(max_length) - n_special


def encode_merges(encode_batch, tables, params, prefix, suffix, buf, offsets, max_length=None,
                  add_special_tokens=True) -> Encoding:
    """A merge-based kernel's ``encode_batch`` over documents buf[offsets[d]:offsets[d+1]] (UTF-8)
    -> Encoding (the byte-level and SentencePiece BPE facades).  flags per document: 1 truncated,
    2 bad UTF-8 replaced by U+FFFD; max_length counts the special tokens added."""
    buf, offsets = check_batch(buf, offsets)
    if not add_special_tokens:
        prefix, suffix = prefix[:0], suffix[:0]
    limit = content_limit(max_length, len(prefix) + len(suffix))
    return Encoding(*encode_batch(buf, offsets, -1 if limit is None else limit, tables, params, prefix, suffix))


def decodable_ids(ids, vocab_size: int, special_ids, skip_special_tokens: bool) -> list:
    """The ids a decoder spells: those in the vocabulary, special ones dropped when asked."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    ids = ids[(ids >= 0) & (ids < vocab_size)]
    if skip_special_tokens and len(special_ids):
        ids = ids[~np.isin(ids, special_ids)]
    return ids.tolist()
