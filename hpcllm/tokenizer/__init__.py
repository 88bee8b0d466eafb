"""Tokenizers for the models hpcllm runs: a typed wrapper around the Numba kernels.

`Tokenizer.from_file("tokenizer.json")` reads a HF tokenizer.json and picks
the implementation from `model.type`: "WordPiece" (BERT family, here, with
kernels/wordpiece.py) or "BPE" (byte-level, hpcllm.tokenizer_bpe). Batches go
in as one UTF-8 byte buffer plus offsets and come out as a ragged
`Encoding` (flat ids + offsets + per-document flags).

The `truncation` and `padding` sections of tokenizer.json are not applied:
callers pass max_length and pad batches themselves.
"""

import json

import numba
import numpy as np

from hpcllm.errors import HpcllmError

FLAG_TRUNCATED = 1   # content was cut to fit max_length
FLAG_BAD_UTF8 = 2    # invalid UTF-8 / lone surrogates were replaced by U+FFFD
CHUNK_BYTES = 16 << 20   # bytes per kernel call: bounds the temporary output buffer (4 B/byte)


class Encoding:
    """A ragged batch of token ids: document i is ids[offsets[i]:offsets[i+1]]."""

    def __init__(self, ids, offsets, flags):
        self.ids = np.asarray(ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.flags = np.asarray(flags, dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def lengths(self):
        return np.diff(self.offsets)

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


def doc_blocks(offsets, n_threads):
    """Cut documents into ~8 blocks per thread of about equal bytes (load balance)."""
    n_docs = len(offsets) - 1
    n_blocks = max(1, min(n_docs, 8 * n_threads))
    targets = np.linspace(offsets[0], offsets[-1], n_blocks + 1)[1:-1]
    inner = np.searchsorted(offsets[1:], targets)
    return np.unique(np.concatenate(([0], inner, [n_docs]))).astype(np.int64)


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


class Tokenizer:
    """Public tokenizer API; delegates to the WordPiece or byte-level BPE implementation."""

    def __init__(self, impl, json_text=None):
        self._impl = impl
        self._json = json_text

    # ------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise HpcllmError(f"cannot read tokenizer file {path}: {e.strerror}") from None
        return cls.from_str(text, source=str(path))

    @classmethod
    def from_str(cls, json_text, source="tokenizer.json text"):
        try:
            spec = json.loads(json_text)
            kind = spec["model"]["type"]
        except (ValueError, KeyError, TypeError):
            raise HpcllmError(f"{source}: not a HF tokenizer.json (no model.type)") from None
        if kind == "WordPiece":
            return cls(WordPiece(spec, json_text, source))
        if kind == "BPE":
            from hpcllm.tokenizer_bpe import ByteLevelBPE
            if hasattr(ByteLevelBPE, "from_str"):
                return cls(ByteLevelBPE.from_str(json_text), json_text)
            return cls(ByteLevelBPE.from_json_dict(spec), json_text)
        raise HpcllmError(f"{source}: tokenizer model type {kind!r} is not supported (WordPiece, BPE)")

    @classmethod
    def from_gguf(cls, path):
        from hpcllm.tokenizer_bpe import ByteLevelBPE
        return cls(ByteLevelBPE.from_gguf(path))

    def to_str(self):
        """tokenizer.json text that from_str() loads back to the same tokenizer."""
        if self._json is not None:
            return self._json
        if hasattr(self._impl, "to_str"):
            return self._impl.to_str()
        return json.dumps(self._impl.to_json_dict(), ensure_ascii=False)

    # ------------------------------------------------------------ encoding
    def encode_bytes(self, buf, offsets, max_length=None, add_special_tokens=True):
        enc = self._impl.encode_bytes(buf, offsets, max_length, add_special_tokens)
        return enc if isinstance(enc, Encoding) else Encoding(*enc)   # (ids, offsets, flags)

    def encode_batch(self, texts, max_length=None, add_special_tokens=True):
        buf, offsets = pack_texts(texts)
        return self.encode_bytes(buf, offsets, max_length, add_special_tokens)

    def encode(self, text, max_length=None, add_special_tokens=True):
        return self.encode_batch([text], max_length, add_special_tokens)[0].tolist()

    def decode(self, ids, skip_special_tokens=True):
        return self._impl.decode(ids, skip_special_tokens)

    # ------------------------------------------------------------ ids
    def __getattr__(self, name):
        if name in ("vocab_size", "pad_id", "unk_id", "cls_id", "sep_id", "bos_id", "eos_id", "kind"):
            return getattr(self._impl, name, None)
        raise AttributeError(name)

    def __repr__(self):
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size})"


def check_max_length(max_length, n_special):
    """Content budget for max_length (which counts special tokens, as in HF truncation)."""
    if max_length is None:
        return np.int64(1) << 62
    if max_length < n_special:
        raise HpcllmError(f"max_length={max_length} is smaller than the {n_special} special tokens added")
    return np.int64(max_length - n_special)


def n_threads():
    return numba.get_num_threads()


# ---------------------------------------------------------------- WordPiece
def _cps(strings):
    """CSR code points of a list of str: (data int32, off int64)."""
    data = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), np.int32)
    off = np.zeros(len(strings) + 1, np.int64)
    np.cumsum([len(s) for s in strings], out=off[1:])
    return data.copy(), off


def _trie(strings, ids):
    from hpcllm.kernels.wordpiece import build_trie
    data, off = _cps(strings)
    return build_trie(data, off, np.asarray(ids, np.int32))


def _template_ids(post, token_id, source):
    """(prefix, suffix) special token ids that the post-processor puts around one sequence."""
    if post is None:
        return [], []
    kind = post.get("type")
    if kind == "BertProcessing":
        return [post["cls"][1]], [post["sep"][1]]
    if kind != "TemplateProcessing":
        raise HpcllmError(f"{source}: post_processor {kind!r} is not supported with WordPiece")
    pre, suf, seen = [], [], False
    for piece in post["single"]:
        if "Sequence" in piece:
            seen = True
            continue
        name = piece["SpecialToken"]["id"]
        ids = post["special_tokens"].get(name, {}).get("ids") or [token_id(name)]
        (suf if seen else pre).extend(ids)
    return pre, suf


def _cleanup(tok):
    """The WordPiece decoder's cleanup (applied per token, as HF does)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        tok = tok.replace(a, b)
    return tok


class WordPiece:
    """BERT-style tokenizer: BertNormalizer + BertPreTokenizer + WordPiece model."""

    kind = "wordpiece"
    bos_id = None
    eos_id = None

    def __init__(self, spec, json_text, source):
        from hpcllm.kernels.unicode_tables import bert_tables, fast_map, max_expansion, max_nfd_len
        from hpcllm.kernels.wordpiece import walk
        self._json = json_text
        model = spec["model"]
        vocab = model["vocab"]
        added = spec.get("added_tokens") or []
        for t in added:
            if t.get("normalized") or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                raise HpcllmError(f"{source}: added token {t['content']!r} uses normalized/lstrip/rstrip/"
                                  "single_word, which hpcllm's WordPiece does not support")
        self._id_to_tok = {i: t for t, i in vocab.items()}
        self._id_to_tok.update({t["id"]: t["content"] for t in added})
        self._special = {t["id"] for t in added if t.get("special")}
        self.vocab_size = max(self._id_to_tok) + 1

        def token_id(name):
            i = vocab.get(name, next((t["id"] for t in added if t["content"] == name), None))
            if i is None:
                raise HpcllmError(f"{source}: token {name!r} is not in the vocabulary")
            return i

        self.unk_id = token_id(model.get("unk_token", "[UNK]"))
        self._prefix, self._suffix = (np.asarray(x, np.int32) for x in
                                      _template_ids(spec.get("post_processor"), token_id, source))
        self.cls_id = int(self._prefix[0]) if len(self._prefix) else vocab.get("[CLS]")
        self.sep_id = int(self._suffix[-1]) if len(self._suffix) else vocab.get("[SEP]")
        self.pad_id = (spec.get("padding") or {}).get("pad_id", vocab.get("[PAD]"))
        flags = self._normalizer_flags(spec.get("normalizer"), source)
        if (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
            raise HpcllmError(f"{source}: WordPiece needs pre_tokenizer BertPreTokenizer")
        toks = list(vocab)
        self._vt = _trie(toks, [vocab[t] for t in toks])
        plain = [t for t in added if t["content"]]
        self._at = _trie([t["content"] for t in plain], [t["id"] for t in plain])
        cprefix = model.get("continuing_subword_prefix", "##")
        cont = walk(self._vt, np.array([ord(c) for c in cprefix], np.int32))
        self._cfg = np.array([*flags, model.get("max_input_chars_per_word", 100), self.unk_id, cont],
                             np.int64)
        self._ut = bert_tables().as_kernel_args()
        afirst = np.zeros(4096, np.bool_)   # cheap filter before the added-token trie
        afirst[np.array([ord(t["content"][0]) & 4095 for t in plain], np.int64)] = True
        self._ft = (*fast_map(*flags), afirst)
        self._expand = max_expansion(*flags)
        self._max_nfd = max_nfd_len()
        dec = spec.get("decoder") or {}
        self._dec_prefix = dec.get("prefix", cprefix) if dec.get("type") == "WordPiece" else None
        self._dec_cleanup = bool(dec.get("cleanup", True))

    @staticmethod
    def _normalizer_flags(norm, source):
        if norm is None:
            return (0, 0, 0, 0)
        if norm.get("type") != "BertNormalizer":
            raise HpcllmError(f"{source}: normalizer {norm.get('type')!r} is not supported with WordPiece")
        lower = bool(norm.get("lowercase", True))
        strip = norm.get("strip_accents")
        strip = lower if strip is None else bool(strip)   # HF: strip_accents defaults to lowercase
        return (int(norm.get("clean_text", True)), int(norm.get("handle_chinese_chars", True)),
                int(strip), int(lower))

    def to_str(self):
        return self._json

    def encode_bytes(self, buf, offsets, max_length=None, add_special_tokens=True):
        buf = np.asarray(buf, np.uint8)
        if not buf.flags.writeable or not buf.flags.c_contiguous:
            buf = np.array(buf, np.uint8)
        offsets = np.ascontiguousarray(offsets, np.int64)
        if len(offsets) < 1 or offsets[0] < 0 or offsets[-1] > len(buf) or np.any(np.diff(offsets) < 0):
            raise HpcllmError(f"encode_bytes: offsets must rise from >= 0 to <= len(buf)={len(buf)}")
        empty = np.zeros(0, np.int32)
        pre, suf = (self._prefix, self._suffix) if add_special_tokens else (empty, empty)
        max_content = check_max_length(max_length, len(pre) + len(suf))
        parts = [self._encode_chunk(buf, offsets[a:b + 1], pre, suf, max_content)
                 for a, b in chunk_ranges(offsets)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return Encoding(empty, np.zeros(1, np.int64), np.zeros(0, np.uint8))
        lens = np.concatenate([p.lengths() for p in parts])
        offs = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offs[1:])
        return Encoding(np.concatenate([p.ids for p in parts]), offs,
                        np.concatenate([p.flags for p in parts]))

    def _encode_chunk(self, buf, offsets, pre, suf, max_content):
        from hpcllm.kernels.wordpiece import compact, encode_batch
        nbytes = np.diff(offsets)
        caps = np.minimum(np.ceil(nbytes * self._expand).astype(np.int64), max_content)
        out_base = np.zeros(len(nbytes) + 1, np.int64)
        np.cumsum(caps + len(pre) + len(suf), out=out_base[1:])
        blocks = doc_blocks(offsets, n_threads())
        out, counts, flags = encode_batch(buf, offsets, blocks, out_base, caps, self._ut, self._ft,
                                          self._vt, self._at, self._cfg, pre, suf, max_content, self._max_nfd)
        if np.any(flags & 128):
            d = int(np.nonzero(flags & 128)[0][0])
            raise HpcllmError(f"wordpiece kernel: document {d} produced more tokens than its bound (bug)")
        ids, offs = compact(out, out_base, counts)
        return Encoding(ids, offs, flags & (FLAG_TRUNCATED | FLAG_BAD_UTF8))

    def decode(self, ids, skip_special_tokens=True):
        toks = [self._id_to_tok.get(int(i)) for i in ids
                if not (skip_special_tokens and int(i) in self._special)]
        toks = [t for t in toks if t is not None]
        if self._dec_prefix is None:
            return " ".join(toks)
        out = []
        for k, t in enumerate(toks):
            if k:
                t = t[len(self._dec_prefix):] if t.startswith(self._dec_prefix) else " " + t
            out.append(_cleanup(t) if self._dec_cleanup else t)
        return "".join(out)
