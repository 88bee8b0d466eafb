"""BERT-style tokenizer (BertNormalizer + BertPreTokenizer + WordPiece) over the kernels/wordpiece.py kernels."""

import numba
import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.tokenizer.encoding import FLAG_BAD_UTF8, FLAG_TRUNCATED, Encoding, check_batch, content_limit
from hpcllm.tokenizer.template import special_ids

NO_LIMIT = np.int64(1) << 62


def _trie(strings, ids):
    """A kernels.wordpiece.Trie of strings (by code point) -> ids."""
    from hpcllm.kernels.trie import build_trie
    data = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), np.int32).copy()
    off = np.zeros(len(strings) + 1, np.int64)
    np.cumsum([len(s) for s in strings], out=off[1:])
    return build_trie(data, off, np.asarray(ids, np.int32))


def doc_blocks(offsets, n_threads):
    """Cut documents into ~8 blocks per thread of about equal bytes (load balance)."""
    n_docs = len(offsets) - 1
    n_blocks = max(1, min(n_docs, 8 * n_threads))
    targets = np.linspace(offsets[0], offsets[-1], n_blocks + 1)[1:-1]
    inner = np.searchsorted(offsets[1:], targets)
    return np.unique(np.concatenate(([0], inner, [n_docs]))).astype(np.int64)


def _cleanup(tok):
    """The WordPiece decoder's cleanup (applied per token, as HF does)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        tok = tok.replace(a, b)
    return tok


def normalizer_flags(norm, source):
    """(clean_text, handle_chinese_chars, strip_accents, lowercase) of a BertNormalizer (or none)."""
    if norm is None:
        return (0, 0, 0, 0)
    if norm.get("type") != "BertNormalizer":
        raise HpcllmError(f"{source}: normalizer {norm.get('type')!r} is not supported with WordPiece")
    lower = bool(norm.get("lowercase", True))
    strip = norm.get("strip_accents")
    strip = lower if strip is None else bool(strip)   # HF: strip_accents defaults to lowercase
    return (int(norm.get("clean_text", True)), int(norm.get("handle_chinese_chars", True)), int(strip), int(lower))


def _added_tokens(spec, source):
    added = spec.get("added_tokens") or []
    for t in added:
        if t.get("normalized") or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise HpcllmError(f"{source}: added token {t['content']!r} uses normalized/lstrip/rstrip/"
                              "single_word, which hpcllm's WordPiece does not support")
    return added


class WordPiece:
    """BERT-style tokenizer: BertNormalizer + BertPreTokenizer + WordPiece model."""

    kind = "wordpiece"
    bos_id = None
    eos_id = None

    def __init__(self, spec, source):
        model = spec["model"]
        vocab = model["vocab"]
        added = _added_tokens(spec, source)
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
        self.prefix, self.suffix = (np.asarray(x, np.int32) for x in
                                    special_ids(spec.get("post_processor"), token_id, source))
        self.cls_id = int(self.prefix[0]) if len(self.prefix) else vocab.get("[CLS]")
        self.sep_id = int(self.suffix[-1]) if len(self.suffix) else vocab.get("[SEP]")
        self.pad_id = (spec.get("padding") or {}).get("pad_id", vocab.get("[PAD]"))
        if (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
            raise HpcllmError(f"{source}: WordPiece needs pre_tokenizer BertPreTokenizer")
        self._flags = normalizer_flags(spec.get("normalizer"), source)
        self._tables = self._kernel_tables(model, vocab, added)
        dec = spec.get("decoder") or {}
        cprefix = model.get("continuing_subword_prefix", "##")
        self._dec_prefix = dec.get("prefix", cprefix) if dec.get("type") == "WordPiece" else None
        self._dec_cleanup = bool(dec.get("cleanup", True))

    def _kernel_tables(self, model, vocab, added):
        from hpcllm.kernels.unicode_tables import bert_tables, fast_map, max_expansion, max_nfd_len
        from hpcllm.kernels.trie import walk
        from hpcllm.kernels.wordpiece import FastMap, WordPieceConfig, WordPieceTables
        toks = list(vocab)
        vt = _trie(toks, [vocab[t] for t in toks])
        plain = [t for t in added if t["content"]]
        cprefix = model.get("continuing_subword_prefix", "##")
        cont = walk(vt, np.array([ord(c) for c in cprefix], np.int32))
        cfg = WordPieceConfig(*(np.int64(x) for x in (*self._flags, model.get("max_input_chars_per_word", 100),
                                                         self.unk_id, cont, max_nfd_len())))
        afirst = np.zeros(4096, np.bool_)   # cheap filter before the added-token trie
        afirst[np.array([ord(t["content"][0]) & 4095 for t in plain], np.int64)] = True
        self._expand = max_expansion(*self._flags)
        return WordPieceTables(bert_tables().as_kernel_args(), FastMap(*fast_map(*self._flags), afirst), vt,
                               _trie([t["content"] for t in plain], [t["id"] for t in plain]), cfg)

    def encode_bytes(self, buf, offsets, max_length=None, add_special_tokens=True):
        """Documents buf[offsets[d]:offsets[d+1]] -> Encoding; max_length counts the special tokens."""
        from hpcllm.kernels.wordpiece import compact, encode_batch
        buf, offsets = check_batch(buf, offsets)
        pre, suf = (self.prefix, self.suffix) if add_special_tokens else (self.prefix[:0], self.suffix[:0])
        limit = content_limit(max_length, len(pre) + len(suf))
        max_content = NO_LIMIT if limit is None else np.int64(limit)
        nbytes = np.diff(offsets)
        caps = np.minimum(np.ceil(nbytes * self._expand).astype(np.int64), max_content)
        out_base = np.zeros(len(nbytes) + 1, np.int64)
        np.cumsum(caps + len(pre) + len(suf), out=out_base[1:])
        blocks = doc_blocks(offsets, numba.get_num_threads())
        out, counts, flags = encode_batch(buf, offsets, blocks, out_base, caps, self._tables, pre, suf, max_content)
        if np.any(flags & 128):
            d = int(np.nonzero(flags & 128)[0][0])
            raise HpcllmError(f"wordpiece kernel: document {d} produced more tokens than its bound (bug)")
        ids, offs = compact(out, out_base, counts)
        return Encoding(ids, offs, flags & (FLAG_TRUNCATED | FLAG_BAD_UTF8))

    def decode(self, ids, skip_special_tokens=True, at_start=True):
        """Text of ids (HF's WordPiece decoder); ``at_start=False``: they continue a text, so a first
        token that starts a word gets its space too."""
        toks = [self._id_to_tok.get(int(i)) for i in ids
                if not (skip_special_tokens and int(i) in self._special)]
        toks = [t for t in toks if t is not None]
        if self._dec_prefix is None:
            return ("" if at_start or not toks else " ") + " ".join(toks)
        out = []
        for k, t in enumerate(toks):
            if k or not at_start:
                t = t[len(self._dec_prefix):] if t.startswith(self._dec_prefix) else " " + t
            out.append(_cleanup(t) if self._dec_cleanup else t)
        return "".join(out)

    def decode_bytes(self, ids, skip_special_tokens=True, at_start=True):
        return self.decode(ids, skip_special_tokens, at_start).encode("utf-8")
