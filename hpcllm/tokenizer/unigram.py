"""SentencePiece Unigram tokenizers (XLM-RoBERTa, T5, ALBERT shapes; HF's Unigram model), HF-exact.

Loads an HF tokenizer.json dict whose model is "Unigram" (vocab: [piece, score] pairs,
unk_id, byte_fallback). The normalizer may start with Precompiled (the spm charsmap,
hpcllm.kernels.precompiled); the rest of the spacing is read as for SentencePiece BPE
(hpcllm.tokenizer.spm): a Metaspace pre-tokenizer without further normalizer, or the
Prepend / Replace(" ") normalizers without pre-tokenizer. Encoding (Viterbi over the
piece lattice, unk fusing, byte fallback) runs in the Numba kernels of
hpcllm.kernels.unigram; decoding is SentencePiece BPE's (the mark is a space, <0xNN> runs
are bytes, one leading space dropped where a mark was prepended). Not yet: NFKC and the
other Unicode normalizers, regex Replace, Strip (XLM-R's tokenizer.json as transformers
converts it may follow Precompiled with Replace(Regex " {2,}")): such a file raises
HpcllmError naming the step.
"""

import base64
import json
import math
import re

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.kernels import precompiled
from hpcllm.kernels import unigram as K
from hpcllm.kernels.trie import build_trie
from hpcllm.tokenizer import template
from hpcllm.tokenizer.bpe import _trie, token_names
from hpcllm.tokenizer.encoding import Encoding, check_batch, encode_merges
from hpcllm.tokenizer.spm import SentencePieceBPE, _code_points, _one_char, _parse_spacing


_NUMBER = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?\Z")
_U64 = (1 << 64) - 1
_POW10 = [float("1e%d" % i) for i in range(309)]


def serde_float(text):
    """The float HF `tokenizers` reads for the JSON number `text`: serde_json without its
    float_roundtrip feature keeps the first 19-20 digits as an integer, rounds it to a double and
    multiplies or divides by a power of ten, so a 17-digit score may be one ulp off Python's
    correctly rounded float; Viterbi ties between equal-sum paths depend on that ulp."""
    m = _NUMBER.match(text)
    if m is None:
        return float(text)
    sign, whole, frac, exp10 = m.groups()
    sig, exp, full = 0, 0, False
    for c in whole:
        full = full or sig * 10 + int(c) > _U64
        if full:
            exp += 1   # digits past u64 only scale the integer part
        else:
            sig = sig * 10 + int(c)
    for c in frac or "":
        full = full or sig * 10 + int(c) > _U64
        if not full:   # fraction digits past u64 are dropped
            sig = sig * 10 + int(c)
            exp -= 1
    exp += int(exp10) if exp10 else 0
    f = float(sig)
    while abs(exp) >= len(_POW10) and f != 0.0:
        f /= 1e308
        exp += 308
    if abs(exp) < len(_POW10):
        f = f * _POW10[exp] if exp >= 0 else f / _POW10[-exp]
    return -f if sign else f


SLOT_BYTES = 64 << 20   # id slots per kernel call where a Precompiled normalizer can expand the text


def _runs(offsets, limit):
    """Consecutive document ranges [a, b) of at most `limit` bytes each (at least one document)."""
    a, n = 0, len(offsets) - 1
    while a < n:
        b = min(max(int(np.searchsorted(offsets, offsets[a] + limit, side="right")) - 1, a + 1), n)
        yield a, b
        a = b


def _err(field, msg):
    raise HpcllmError("tokenizer.json %s: %s (Unigram)" % (field, msg))


def _leading_steps(d):
    """(Precompiled charsmap bytes or None, Strip bits, collapse code point or -1, d without those steps):
    the normalizer steps before the spacing, in this order: Precompiled, Strip, Replace(Regex(" {2,}"))
    (what transformers' converters write for XLM-R and other spm models); the rest is read as
    SentencePiece BPE reads it."""
    norm = d.get("normalizer") or {}
    steps = list(norm.get("normalizers") or []) if norm.get("type") == "Sequence" else [norm]
    raw, strip, collapse = None, 0, -1
    if steps and (steps[0] or {}).get("type") == "Precompiled":
        try:
            raw = base64.b64decode(steps.pop(0).get("precompiled_charsmap") or "", validate=True) or None
        except (TypeError, ValueError):
            _err("normalizer.Precompiled.precompiled_charsmap", "not base64")
    if steps and (steps[0] or {}).get("type") == "Strip":
        step = steps.pop(0)
        strip = int(bool(step.get("strip_left", True))) | 2 * int(bool(step.get("strip_right", True)))
    if steps and (steps[0] or {}).get("type") == "Replace" and steps[0].get("pattern") == {"Regex": " {2,}"}:
        collapse = _one_char("normalizer.Replace.content", steps.pop(0).get("content"))
    for step in steps:
        if (step or {}).get("type") in ("Precompiled", "Strip", "NFKC", "NFKD", "NFC", "NFD"):
            _err("normalizer", "%s is not supported here (Precompiled, Strip, Replace(Regex(' {2,}')) lead "
                 "a Sequence in this order)" % step["type"])
    rest = [step for step in steps if step]
    d = dict(d, normalizer=None if not rest else rest[0] if len(rest) == 1 else dict(norm, normalizers=rest))
    return raw, strip, collapse, d


def _spacing(d):
    """(replace, mark, prepend mode, split) as SentencePiece BPE reads them."""
    try:
        return _parse_spacing(d)
    except HpcllmError as e:
        raise HpcllmError(str(e).replace("(SentencePiece BPE)", "(Unigram)")) from None


def _precompiled_tables(raw):
    """(units, strings, byte -> code point offsets, grapheme classes, single_values, expansion) of a
    charsmap, or dummies."""
    if raw is None:
        return (np.zeros(1, np.uint32), np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(1, np.uint8),
                np.zeros(1, np.int64), 1)
    try:
        units, strings, offsets = precompiled.parse_charsmap(raw)
    except ValueError as e:
        _err("normalizer.Precompiled.precompiled_charsmap", str(e))
    return units, strings, offsets, precompiled.grapheme_table(), precompiled.single_values(units), math.ceil(
        precompiled.expansion(units, strings, offsets))


def _parse_model(m):
    """(pieces, scores, unk_id, byte_fallback) of a tokenizer.json Unigram model."""
    if m.get("type") != "Unigram":
        _err("model.type", "must be Unigram, got %r" % m.get("type"))
    try:
        pieces = [str(p) for p, _ in m["vocab"]]
        scores = np.array([float(s) for _, s in m["vocab"]], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        _err("model.vocab", "must be a list of [piece, score] pairs")
    unk = m.get("unk_id")
    if not isinstance(unk, int) or not 0 <= unk < len(pieces):
        _err("model.unk_id", "must be the id of a piece (a model without unk is not supported), got %r" % (unk,))
    return pieces, scores, unk, bool(m.get("byte_fallback"))


class Unigram:
    """An HF-exact SentencePiece Unigram tokenizer over numpy batches."""

    kind = "unigram"
    cls_id = None
    sep_id = None
    # the same decoders (Metaspace / Replace + ByteFallback + Fuse + Strip) as SentencePiece BPE
    _byte_values, _pieces, _strip = SentencePieceBPE._byte_values, SentencePieceBPE._pieces, SentencePieceBPE._strip
    decode_bytes, decode = SentencePieceBPE.decode_bytes, SentencePieceBPE.decode

    def __init__(self, pieces, scores, unk_id, byte_fallback, added, spacing, prefix=(), suffix=(), charsmap=None,
                 strip=0, collapse=-1):
        self.pieces, self.scores, self.unk_id, self.byte_fallback = pieces, scores, unk_id, byte_fallback
        self.vocab = {p: i for i, p in enumerate(pieces)}   # HF's token_to_ids: the last of equal pieces
        self.added, self.charsmap, self.strip, self.collapse = added, charsmap, strip, collapse
        self.replace, self.mark, self.prepend, self.split = spacing
        self.prefix = np.asarray(prefix, dtype=np.int32)
        self.suffix = np.asarray(suffix, dtype=np.int32)
        by_content = {t["content"]: t["id"] for t in added}
        self.bos_id = int(prefix[0]) if len(prefix) else by_content.get("<s>")
        self.eos_id = int(suffix[-1]) if len(suffix) else by_content.get("</s>")
        self.pad_id = by_content.get("<pad>")
        self._names = token_names(self.vocab, added)
        self.vocab_size = len(self._names)
        self.special_ids = np.array(sorted(t["id"] for t in added if t.get("special")), dtype=np.int64)
        self._bytes = None
        self._build()

    def _ids_alone(self, ch):
        """The most ids one character becomes on its own (a piece, its bytes, or unk)."""
        return 1 if ch in self.vocab or not self.byte_fallback else len(ch.encode("utf-8"))

    def _build(self):
        keep = [i for i, p in enumerate(self.pieces) if p]
        cps, off = _code_points([self.pieces[i] for i in keep])
        trie = build_trie(cps.astype(np.int64), off, np.array(keep, dtype=np.int32))
        byte_ids = np.full(256, -1, dtype=np.int32)
        if self.byte_fallback:
            for b in range(256):
                byte_ids[b] = self.vocab.get("<0x%02X>" % b, -1)
        ttab, term, first = _trie(self.added)
        *pc, expand = _precompiled_tables(self.charsmap)
        self._tables = K.UnigramTables(*trie, self.scores, byte_ids, ttab, term, first, *pc)
        lens = [len(t["content"].encode("utf-8")) for t in self.added if t["content"]]
        per_byte = self._ids_alone(chr(self.replace)) if self.replace >= 0 else 1
        per_prepend = self._ids_alone(chr(self.mark)) if self.prepend != K.PREPEND_NONE else 0
        if self.collapse >= 0:   # two spaces or more become this character
            per_byte = max(per_byte, self._ids_alone(chr(self.collapse)))
        if self.charsmap is not None:   # up to `expand` code points per byte, each up to 4 <0xNN> ids
            per_byte = expand * (4 if self.byte_fallback else 1)
        unk_score = float(self.scores.min()) - 10.0 if len(self.scores) else -10.0
        self._params = K.UnigramParams(np.int64(self.unk_id), np.float64(unk_score), *(np.int64(x) for x in (
            self.replace, self.mark, self.prepend, self.split, 1 if lens else 0, max(1, per_byte), per_prepend,
            min(lens) if lens else 1, self.charsmap is not None, self.strip, self.collapse, expand)))

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_json_text(cls, text):
        """tokenizer.json text, its scores read as HF reads them (``serde_float``)."""
        return cls.from_json_dict(json.loads(text, parse_float=serde_float))

    @classmethod
    def from_json_dict(cls, d):
        """A parsed HF tokenizer.json."""
        charsmap, strip, collapse, d = _leading_steps(d)
        spacing = _spacing(d)
        pieces, scores, unk, byte_fallback = _parse_model(d.get("model") or {})
        added = [dict(t) for t in d.get("added_tokens", [])]
        for t in added:
            if t.get("normalized") or t.get("single_word") or t.get("lstrip") or t.get("rstrip"):
                _err("added_tokens[%r]" % t["content"], "normalized/single_word/lstrip/rstrip unsupported")
        vocab = {p: i for i, p in enumerate(pieces)}
        prefix, suffix = template.template_ids(d, vocab, "Unigram")
        return cls(pieces, scores, unk, byte_fallback, added, spacing, prefix, suffix, charsmap, strip, collapse)

    # ---- encoding ------------------------------------------------------------------------
    def encode_bytes(self, buf, offsets, max_length=None, add_special_tokens=True):
        """Encode documents buf[offsets[d]:offsets[d+1]] (UTF-8) into an Encoding (``encode_merges``); with
        a Precompiled normalizer (up to `expand` times the text), in runs of documents whose id slots
        stay under SLOT_BYTES (a longer document runs alone)."""
        buf, offsets = check_batch(buf, offsets)
        limit = SLOT_BYTES // (4 * max(1, int(self._params.per_byte)))
        return Encoding.concat([encode_merges(K.encode_batch, self._tables, self._params, self.prefix, self.suffix,
                                              buf, offsets[a:b + 1], max_length, add_special_tokens)
                                for a, b in _runs(offsets, limit)])
