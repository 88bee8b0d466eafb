"""Tokenizers for the models hpcllm runs: a typed facade over the Numba kernels.

`Tokenizer.from_file("tokenizer.json")` reads a HF tokenizer.json and picks
the implementation from `model.type`: "WordPiece" (BERT family,
hpcllm.tokenizer.wordpiece) or "BPE": byte-level when the pre-tokenizer has a
ByteLevel step (GPT-2, Llama-3; hpcllm.tokenizer.bpe), else SentencePiece style
(byte_fallback, "\u2581" for spaces: Llama-2, Mistral; hpcllm.tokenizer.spm), or "Unigram"
(SentencePiece Unigram: XLM-R / T5 shapes, Precompiled normalizer; hpcllm.tokenizer.unigram);
`Tokenizer.from_gguf` reads a GGUF file's tokenizer metadata (byte-level or
SentencePiece BPE, hpcllm.tokenizer.gguf). Batches go in
as one UTF-8 byte buffer plus offsets and come out as a ragged `Encoding`
(flat ids + offsets + per-document flags).

As HF `tokenizers` does, the file's "truncation" and "padding" sections are
applied unless `apply_file_settings=False` (what the jobs use: they pass
max_length themselves and batch without padding). `no_truncation()`,
`no_padding()`, `enable_truncation()` and `enable_padding()` change them.
"""

import json

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.tokenizer.encoding import (FLAG_BAD_UTF8, FLAG_TRUNCATED, Encoding, check_batch, content_limit,
                                       pack_texts)
from hpcllm.tokenizer.settings import Padding, Truncation, pad, parse_padding, parse_truncation, truncate_left

__all__ = ["Tokenizer", "Encoding", "Truncation", "Padding", "FLAG_BAD_UTF8", "FLAG_TRUNCATED", "pack_texts"]

CHUNK_BYTES = 16 << 20   # bytes per kernel call: bounds the temporary output buffers (4 B/byte)
_IDS = ("vocab_size", "pad_id", "unk_id", "cls_id", "sep_id", "bos_id", "eos_id", "kind")


def chunk_ranges(offsets, limit=None):
    """Consecutive document ranges of at most `limit` bytes (at least one document each)."""
    limit = CHUNK_BYTES if limit is None else limit
    n_docs = len(offsets) - 1
    start = 0
    while start < n_docs:
        end = int(np.searchsorted(offsets, offsets[start] + limit, side="right")) - 1
        end = min(max(end, start + 1), n_docs)
        yield start, end
        start = end


def _sentencepiece_style(spec):
    """A BPE tokenizer.json over characters with "\u2581" for spaces (Llama-2, Mistral), not byte-level:
    its pre-tokenizer has no ByteLevel step."""
    return "ByteLevel" not in json.dumps(spec.get("pre_tokenizer"))


class Tokenizer:
    """Public tokenizer API; delegates to the WordPiece, SentencePiece BPE or byte-level BPE implementation."""

    def __init__(self, impl, json_text=None, truncation=None, padding=None):
        self._impl = impl
        self._json = json_text
        self.truncation = truncation   # Truncation or None
        self.padding = padding         # Padding or None

    # ------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path, apply_file_settings=True):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise HpcllmError(f"cannot read tokenizer file {path}: {e.strerror}") from None
        return cls.from_str(text, source=str(path), apply_file_settings=apply_file_settings)

    @classmethod
    def from_str(cls, json_text, source="tokenizer.json text", apply_file_settings=True):
        """apply_file_settings=False: ignore the file's truncation and padding sections."""
        try:
            spec = json.loads(json_text)
            kind = spec["model"]["type"]
        except (ValueError, KeyError, TypeError):
            raise HpcllmError(f"{source}: not a HF tokenizer.json (no model.type)") from None
        if kind == "WordPiece":
            from hpcllm.tokenizer.wordpiece import WordPiece
            impl = WordPiece(spec, source)
        elif kind == "BPE" and _sentencepiece_style(spec):
            from hpcllm.tokenizer.spm import SentencePieceBPE
            impl = SentencePieceBPE.from_json_dict(spec)
        elif kind == "BPE":
            from hpcllm.tokenizer.bpe import ByteLevelBPE
            impl = ByteLevelBPE.from_json_dict(spec)
        elif kind == "Unigram":
            from hpcllm.tokenizer.unigram import Unigram
            impl = Unigram.from_json_text(json_text)
        else:
            raise HpcllmError(f"{source}: tokenizer model type {kind!r} is not supported (WordPiece, BPE, Unigram)")
        if not apply_file_settings:
            return cls(impl, json_text)
        return cls(impl, json_text, parse_truncation(spec.get("truncation"), source),
                   parse_padding(spec.get("padding"), source))

    @classmethod
    def from_gguf(cls, source, split_digits=False):
        """A GGUF path or gguf.GGUFReader: byte-level BPE ("gpt2", split_digits as ByteLevelBPE.from_gguf)
        or SentencePiece BPE ("llama"), as transformers builds them; GGUF declares no truncation or padding."""
        from hpcllm.tokenizer import gguf, gguf_meta
        meta, where = gguf_meta.read(source)
        if meta.get("model") == "gpt2":
            from hpcllm.tokenizer.bpe import ByteLevelBPE
            return cls(ByteLevelBPE(**gguf_meta.bpe_arguments_of(meta, where, split_digits)))
        return cls.from_str(gguf.json_of(meta, where), source=where, apply_file_settings=False)

    def to_str(self):
        """tokenizer.json text that from_str() loads back to the same tokenizer."""
        if self._json is None:
            self._json = json.dumps(self._impl.to_json_dict(), ensure_ascii=False)
        return self._json

    # ------------------------------------------------------------ settings
    def no_truncation(self):
        self.truncation = None
        return self

    def no_padding(self):
        self.padding = None
        return self

    def enable_truncation(self, max_length, direction="right"):
        self.truncation = Truncation(int(max_length), direction)
        return self

    def enable_padding(self, length=None, direction="right", pad_id=None, pad_to_multiple_of=None):
        """Pad every batch to `length` (None: its longest document) with pad_id (default: the tokenizer's)."""
        pad_id = self.pad_id if pad_id is None else pad_id
        self.padding = Padding(0 if pad_id is None else int(pad_id), length, direction, pad_to_multiple_of)
        return self

    # ------------------------------------------------------------ encoding
    def encode_bytes(self, buf, offsets, max_length=None, add_special_tokens=True):
        """Documents buf[offsets[d]:offsets[d+1]] (UTF-8) -> Encoding.

        max_length (counting special tokens) overrides the truncation setting's; with
        neither, documents are not cut. Padding, when set, applies to the whole batch.
        """
        buf, offsets = check_batch(buf, offsets)
        trunc = self.truncation
        if max_length is None and trunc is not None:
            max_length = trunc.max_length
        left = max_length is not None and trunc is not None and trunc.direction == "left"
        n_pre, n_suf = (len(self._impl.prefix), len(self._impl.suffix)) if add_special_tokens else (0, 0)
        limit = content_limit(max_length, n_pre + n_suf)
        enc = Encoding.concat([self._impl.encode_bytes(buf, offsets[a:b + 1], None if left else max_length,
                                                       add_special_tokens)
                               for a, b in chunk_ranges(offsets)])
        if left:
            enc = truncate_left(enc, n_pre, n_suf, limit)
        return enc if self.padding is None else pad(enc, self.padding)

    def encode_batch(self, texts, max_length=None, add_special_tokens=True):
        buf, offsets = pack_texts(texts)
        return self.encode_bytes(buf, offsets, max_length, add_special_tokens)

    def encode(self, text, max_length=None, add_special_tokens=True):
        return self.encode_batch([text], max_length, add_special_tokens)[0].tolist()

    def decode(self, ids, skip_special_tokens=True):
        return self._impl.decode(ids, skip_special_tokens)

    def decode_bytes(self, ids, skip_special_tokens=True, at_start=True):
        """The UTF-8 bytes of ids, possibly ending inside a character (byte-level BPE): for
        incremental detokenizing, keep the bytes and decode only what is complete. ``at_start=False``:
        the ids continue a text, so a decoder's rule for a text's start (SentencePiece drops the
        prepended space there) does not apply."""
        return self._impl.decode_bytes(ids, skip_special_tokens, at_start)

    # ------------------------------------------------------------ ids
    def __getattr__(self, name):
        if name in _IDS:
            return getattr(self._impl, name, None)
        raise AttributeError(name)

    def __repr__(self):
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size})"
