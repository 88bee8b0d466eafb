"""SentencePiece-style BPE tokenizers (Llama-2, Mistral-7B-v0.1, TinyLlama, Gemma; HF's
SentencePieceBPETokenizer without its NFKC normalizer; GGUF SentencePiece vocabularies
through hpcllm.tokenizer.gguf_spm), HF-exact.

Loads an HF tokenizer.json dict whose model is BPE over characters (not GPT-2's
byte alphabet): byte_fallback to <0xNN> tokens, fuse_unk, spaces spelled "▁".
Three shapes are accepted: the Llama-2 normalizer Sequence[Prepend("▁"),
Replace(" ", "▁")] or Gemma's Replace(" ", "▁") alone, without pre-tokenizer
(merges run over whole segments) or with a Split(" ") that finds no space left
(Gemma's), and no normalizer with a Metaspace pre-tokenizer. Encoding runs in the
Numba kernels of hpcllm.kernels.spm_bpe; anything else raises HpcllmError naming
the field.
"""

import re
from itertools import chain

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.kernels import spm_bpe as K
from hpcllm.tokenizer import template
from hpcllm.kernels.bpe_tables import int_table
from hpcllm.tokenizer.bpe import _trie, parse_bpe_model, token_names
from hpcllm.tokenizer.encoding import decodable_ids, encode_merges

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")   # HF ByteFallback decoder: any hex case
_SCHEMES = {"always": K.PREPEND_ALWAYS, "first": K.PREPEND_FIRST, "never": K.PREPEND_NONE}


def _code_points(strings):
    """(uint32 code points, int64 offsets) of a list of str, back to back (lone surrogates kept)."""
    off = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, strings), np.int64, len(strings)), out=off[1:])
    return np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), dtype=np.uint32), off


def _err(field, msg):
    raise HpcllmError("tokenizer.json %s: %s (SentencePiece BPE)" % (field, msg))


def _one_char(field, s):
    if not isinstance(s, str) or len(s) != 1:
        _err(field, "must be one character, got %r" % (s,))
    return ord(s)


def _parse_normalizer(norm):
    """(replace cp or -1, prepend cp or -1) of a Sequence of Prepend / Replace(" ")."""
    if norm is None:
        return -1, -1
    steps = norm.get("normalizers") or [] if norm.get("type") == "Sequence" else [norm]
    replace = prepend = -1
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "Prepend" and prepend < 0:
            prepend = _one_char("normalizer.Prepend.prepend", step.get("prepend"))
        elif kind == "Replace" and replace < 0 and step.get("pattern") == {"String": " "}:
            replace = _one_char("normalizer.Replace.content", step.get("content"))
        else:
            _err("normalizer", "only Prepend and Replace(' ') are supported, got %r" % kind)
    if prepend >= 0 and replace >= 0 and prepend != replace:
        _err("normalizer", "Prepend and Replace must use the same character")
    return replace, prepend


def _splits_on_space(pre):
    """A Split pre-tokenizer on the string " " (not inverted), as transformers' Gemma tokenizer has."""
    return (pre is not None and pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}
            and not pre.get("invert"))


def _parse_spacing(d):
    """(replace, mark, prepend mode, split) from the normalizer and pre-tokenizer."""
    replace, prepend = _parse_normalizer(d.get("normalizer"))
    pre = d.get("pre_tokenizer")
    if _splits_on_space(pre) and replace >= 0:
        pre = None   # Gemma: Split(" ") after Replace(" ") finds no space left to split on
    if pre is None:
        mark = prepend if prepend >= 0 else max(replace, 0x2581)
        return replace, mark, K.PREPEND_NONEMPTY if prepend >= 0 else K.PREPEND_NONE, 0
    if pre.get("type") != "Metaspace":
        _err("pre_tokenizer", "only null, Metaspace, or Split(' ') after Replace(' ') is supported, got %r"
             % pre.get("type"))
    if d.get("normalizer") is not None:
        _err("normalizer", "must be null with a Metaspace pre-tokenizer, got %r" % d["normalizer"].get("type"))
    mark = _one_char("pre_tokenizer.Metaspace.replacement", pre.get("replacement", "\u2581"))
    scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
    if scheme not in _SCHEMES:
        _err("pre_tokenizer.Metaspace.prepend_scheme", "unsupported value %r" % scheme)
    return mark, mark, _SCHEMES[scheme], int(bool(pre.get("split", True)))


def _bos_eos(by_content, prefix, suffix):
    """(bos id, eos id): the template's, else (tokenizer.json does not name them) the added tokens
    spelled as Llama-2's <s> </s> or Gemma's <bos> <eos>, the pair whose bos the template uses."""
    bos = int(prefix[0]) if len(prefix) else None
    eos = int(suffix[-1]) if len(suffix) else None
    for b, e in (("<s>", "</s>"), ("<bos>", "<eos>")):
        if b in by_content and bos in (None, by_content[b]):
            return by_content[b], eos if eos is not None else by_content.get(e)
    return bos, eos


def _parse_model(m):
    vocab, merges = parse_bpe_model(m, ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                        "ignore_merges"), _err)
    return vocab, merges, m.get("unk_token"), bool(m.get("fuse_unk")), bool(m.get("byte_fallback"))


class SentencePieceBPE:
    """An HF-exact SentencePiece-style BPE tokenizer over numpy batches."""

    kind = "spm_bpe"
    cls_id = None
    sep_id = None

    def __init__(self, vocab, merges, added, spacing, unk_token=None, fuse_unk=False, byte_fallback=True,
                 prefix=(), suffix=()):
        self.vocab, self.merges, self.added = vocab, merges, added
        self.replace, self.mark, self.prepend, self.split = spacing
        self.unk_token, self.fuse_unk, self.byte_fallback = unk_token, fuse_unk, byte_fallback
        self.prefix = np.asarray(prefix, dtype=np.int32)
        self.suffix = np.asarray(suffix, dtype=np.int32)
        self.add_bos, self.add_eos = bool(len(prefix)), bool(len(suffix))
        self.unk_id = vocab.get(unk_token) if unk_token is not None else None
        by_content = {t["content"]: t["id"] for t in added}
        self.bos_id, self.eos_id = _bos_eos(by_content, prefix, suffix)
        self.pad_id = by_content.get("<pad>")
        self._names = token_names(vocab, added)
        self.vocab_size = len(self._names)
        self.special_ids = np.array(sorted(t["id"] for t in added if t.get("special")), dtype=np.int64)
        self._build()

    def _char_ids(self, ch):
        """How many ids one character becomes on its own."""
        if ch in self.vocab:
            return 1
        raw = ch.encode("utf-8")
        return len(raw) if all(self._byte_ids[b] >= 0 for b in raw) else 1

    def _cuts(self, char_ids, mcps, moff):
        """(cut, nocut): where a word may be cut before a mark without changing its merges.

        A merge (l, r) joins the symbol before "x|▁" to the mark only if r starts with the
        mark and l ends with x, or, for a character without a token of its own, with the
        <0xNN> / unk token it becomes. cut is 0 when the mark has no token of its own.
        mcps, moff: the merges' strings as code points (left, right, left, ...)."""
        nocut = np.zeros(0x110000, dtype=np.uint8)
        if chr(self.mark) not in self.vocab:
            return 0, nocut
        if not len(mcps):
            return 1, nocut
        a, m, b = moff[0:-1:2], moff[1::2], moff[2::2]
        joins = (m > a) & (b > m) & (mcps[np.minimum(m, len(mcps) - 1)] == self.mark)
        last = mcps[m - 1]   # the left part's last character (where it is not empty)
        nocut[last[joins]] = 1
        fallback = [t for t in (self.unk_token,) if t] + (["<0x%02X>" % b for b in range(256)]
                                                          if self.byte_fallback else [])
        if any(self.merges[i][0].endswith(t) for i in np.flatnonzero(joins & (last == ord(">"))) for t in fallback):
            nocut[char_ids < 0] = 1
        return 1, nocut

    def _merge_table(self):
        """(the kernels' merge table, the merges as code points and offsets) (kernels.spm_bpe.merge_ids)."""
        vcps, voff = _code_points(list(self.vocab))
        vids = np.fromiter(self.vocab.values(), np.int64, len(self.vocab))
        flat = list(chain.from_iterable(self.merges))
        if len(flat) != 2 * len(self.merges):
            _err("model.merges", "every merge must be a pair of tokens")
        mcps, moff = _code_points(flat)
        ids = K.merge_ids(vcps, voff, vids, mcps, moff)
        bad = np.flatnonzero((ids < 0).any(axis=1))
        if len(bad):
            a, b = self.merges[bad[0]]
            raise HpcllmError("tokenizer merges[%d] %r: a token is not in the vocab" % (bad[0], a + " " + b))
        rank = np.arange(len(ids), dtype=np.int64)
        return int_table((ids[:, 0] << 32) | ids[:, 1], (rank << 32) | ids[:, 2]), mcps, moff

    def _build(self):
        char_ids = np.full(0x110000, -1, dtype=np.int32)
        for tok, i in self.vocab.items():
            if len(tok) == 1 and not 0xD800 <= ord(tok) <= 0xDFFF:
                char_ids[ord(tok)] = i
        self._byte_ids = np.full(256, -1, dtype=np.int32)
        if self.byte_fallback:
            for b in range(256):
                self._byte_ids[b] = self.vocab.get("<0x%02X>" % b, -1)
        ttab, term, first = _trie(self.added)
        mtab, mcps, moff = self._merge_table()
        cut, nocut = self._cuts(char_ids, mcps, moff)
        self._tables = K.SpmTables(char_ids, self._byte_ids, mtab, ttab, term, first, nocut)
        lens = [len(t["content"].encode("utf-8")) for t in self.added if t["content"]]
        per_byte = self._char_ids(chr(self.replace)) if self.replace >= 0 else 1
        per_prepend = self._char_ids(chr(self.mark)) if self.prepend != K.PREPEND_NONE else 0
        unk = -1 if self.unk_id is None else self.unk_id
        self._params = K.SpmParams(*(np.int64(x) for x in (
            unk, self.fuse_unk, self.replace, self.mark, self.prepend, self.split, cut, 1 if lens else 0,
            max(1, per_byte), per_prepend, min(lens) if lens else 1)))

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_json_dict(cls, d):
        """A parsed HF tokenizer.json."""
        spacing = _parse_spacing(d)
        vocab, merges, unk, fuse_unk, byte_fallback = _parse_model(d.get("model") or {})
        if unk is not None and unk not in vocab:
            _err("model.unk_token", "%r is not in the vocab" % unk)
        added = [dict(t) for t in d.get("added_tokens", [])]
        for t in added:
            if t.get("normalized") or t.get("single_word") or t.get("lstrip") or t.get("rstrip"):
                _err("added_tokens[%r]" % t["content"], "normalized/single_word/lstrip/rstrip unsupported")
        prefix, suffix = template.template_ids(d, vocab, "SentencePiece BPE")
        return cls(vocab, merges, added, spacing, unk, fuse_unk, byte_fallback, prefix, suffix)

    # ---- encoding ------------------------------------------------------------------------
    def encode_bytes(self, buf, offsets, max_length=None, add_special_tokens=True):
        """Encode documents buf[offsets[d]:offsets[d+1]] (UTF-8) into an Encoding (``encode_merges``)."""
        return encode_merges(K.encode_batch, self._tables, self._params, self.prefix, self.suffix, buf, offsets,
                             max_length, add_special_tokens)

    # ---- decoding ------------------------------------------------------------------------
    def _byte_values(self):
        """Per id: the byte a <0xNN> token stands for, else -1 (built on the first decode)."""
        if getattr(self, "_bytes", None) is None:
            values = np.full(self.vocab_size, -1, dtype=np.int16)
            if self.byte_fallback:
                for i, name in enumerate(self._names):
                    m = _BYTE_TOKEN.fullmatch(name)
                    if m:
                        values[i] = int(m.group(1), 16)
            self._bytes = values
        return self._bytes

    def _pieces(self, ids, skip_special_tokens):
        """(is a byte run, bytes or text) pieces of ids, in order: runs of <0xNN> tokens and token texts."""
        values, space = self._byte_values(), chr(self.mark)
        run = bytearray()
        for i in decodable_ids(ids, self.vocab_size, self.special_ids, skip_special_tokens):
            if values[i] >= 0:
                run.append(values[i])
                continue
            if run:
                yield True, bytes(run)
                run.clear()
            yield False, self._names[i].replace(space, " ")
        if run:
            yield True, bytes(run)

    def _strip(self, out):
        """The Llama-2 / Metaspace decoders drop one leading space (the prepended mark)."""
        return out[1:] if self.prepend != K.PREPEND_NONE and out[:1] in (b" ", " ") else out

    def decode_bytes(self, ids, skip_special_tokens=True, at_start=True):
        """Bytes of ids: <0xNN> tokens are their byte, the mark is a space, one leading space dropped
        where a mark was prepended and the ids start the text; may end inside a character (for
        incremental detokenizing)."""
        pieces = self._pieces(ids, skip_special_tokens)
        out = b"".join(p if run else p.encode("utf-8") for run, p in pieces)
        return self._strip(out) if at_start else out

    def decode(self, ids, skip_special_tokens=True):
        """Text of ids as HF's decoders give it (Replace mark, ByteFallback, Fuse, Strip): a run of
        <0xNN> tokens that is not valid UTF-8 becomes one U+FFFD per token; unknown ids are skipped."""
        out = []
        for run, p in self._pieces(ids, skip_special_tokens):
            if run:
                try:
                    p = p.decode("utf-8")
                except UnicodeDecodeError:
                    p = "\ufffd" * len(p)
            out.append(p)
        return self._strip("".join(out))
