"""SentencePiece Unigram (hpcllm.tokenizer.unigram + kernels/unigram.py) against HF `tokenizers`.

An XLM-R-shaped tokenizer.json is trained here with tokenizers' UnigramTrainer on the
fortunes (Metaspace words, specials <s> <pad> </s> <unk>, the template <s> $A </s>),
then checked in that shape and in variants: byte fallback (the 256 <0xNN> pieces added
as sentencepiece's byte models have them), the other Metaspace schemes, the Llama-2
normalizer shape, and a vocabulary where a run of unknown characters spells a piece.
Every full fortunes corpus holds characters the 1000 training texts lack (unk / bytes).
The Precompiled normalizer (XLM-R's) runs on a charsmap built here (NFKC of the
characters the fortunes and a few Unicode blocks hold, removals, multi-character keys)
and on the nmt_nfkc charsmap of a model sentencepiece's trainer writes.
"""

import base64
import functools
import json
import struct
import unicodedata

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corpora
from hpcllm.errors import HpcllmError
from hpcllm.tokenizer import Tokenizer
from test_tokenizer_spm import BAD_UTF8, assert_same, pack

MARK = "\u2581"
TEMPLATE = {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]},
                                           "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
METASPACE_DECODER = {"type": "Metaspace", "replacement": MARK, "prepend_scheme": "always", "split": True}
BYTE_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": MARK}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
LLAMA_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": MARK}, {"type": "Replace", "pattern": {"String": " "}, "content": MARK}]}


def build_charsmap(rules):
    """A precompiled_charsmap (SentencePiece's format) of rules {key str: normalized str}: a Darts
    double array where every node with children or a value gets a fresh 256-unit block (child along
    byte c at block | c, the value at block | 0), then the NUL-ended strings."""
    blob, where = bytearray(), {}
    for s in sorted(set(rules.values())):
        where[s] = len(blob)
        blob += s.encode("utf-8") + b"\0"
    trie = {}
    for key, s in rules.items():
        node = trie
        for b in key.encode("utf-8"):
            node = node.setdefault(b, {})
        node[None] = where[s]
    units = [0] * 256

    def place(node):   # a block for node's children and value; returns its base
        base = len(units)
        units.extend([0] * 256)
        if None in node:
            units[base] = node[None] | (1 << 31)
        for c, child in node.items():
            if c is not None:
                p = base | c
                offset = p ^ place(child)   # every node below the root has children or a value
                assert offset < 1 << 21
                units[p] = c | (int(None in child) << 8) | (offset << 10)
        return base
    units[0] = place(trie) << 10
    raw = struct.pack("<%dI" % len(units), *units)
    return struct.pack("<I", len(raw)) + raw + bytes(blob)


@functools.lru_cache(maxsize=1)
def nfkc_charsmap():
    chars = set("".join(corpora.mixed(3000))) | set("\u3000\u00a0\ufdfa\u2460\u337b")
    for lo, hi in ((0x2000, 0x2100), (0xFB00, 0xFB50), (0xFF00, 0xFFF0)):
        chars |= {chr(c) for c in range(lo, hi)}
    rules = {c: unicodedata.normalize("NFKC", c) for c in chars if unicodedata.normalize("NFKC", c) != c}
    rules.update({"\u200b": "", "\ufeff": "", "\r\n": " ", "\t": " ", "e\u0301": "\u00e9", "\u00e9\u0301": "E"})
    return build_charsmap(rules)


def with_charsmap(d, raw):
    """d with the Precompiled normalizer of charsmap `raw` first."""
    pc = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(raw).decode()}
    norm = d["normalizer"]
    d["normalizer"] = pc if norm is None else {"type": "Sequence", "normalizers": [pc] + norm["normalizers"]}
    return d


@functools.lru_cache(maxsize=1)
def xlmr_style_json():
    """An XLM-R-style Unigram tokenizer.json dict (without XLM-R's Precompiled normalizer), trained once per
    process on 1000 fortunes: callers must not change it."""
    from tokenizers import models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=MARK, prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=1500, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", max_piece_length=8, show_progress=False)
    tk.train_from_iterator(corpora.mixed(1000), trainer=trainer)
    d = json.loads(tk.to_str())
    d["post_processor"], d["decoder"] = TEMPLATE, METASPACE_DECODER
    return d


def _variant(base, name):
    d = json.loads(json.dumps(base))
    m = d["model"]
    if name in ("bytes", "bytes-nofallback"):   # <0xNN> pieces after the specials (score 0, as spm writes them)
        m["vocab"] = m["vocab"][:4] + [["<0x%02X>" % b, 0.0] for b in range(256)] + m["vocab"][4:]
        m["byte_fallback"] = name == "bytes"
        d["decoder"] = BYTE_DECODER
    elif name == "partial-bytes":   # bytes >= 0xC0 have no piece: a run with one of them is one unk
        m["vocab"] = m["vocab"][:4] + [["<0x%02X>" % b, 0.0] for b in range(0xC0)] + m["vocab"][4:]
        m["byte_fallback"] = True
        d["decoder"] = BYTE_DECODER
    elif name.startswith("metaspace"):   # metaspace-<scheme>-<split|nosplit>
        _, scheme, split = name.split("-")
        d["pre_tokenizer"] = {"type": "Metaspace", "replacement": MARK, "prepend_scheme": scheme,
                              "split": split == "split"}
        d["decoder"] = dict(METASPACE_DECODER, prepend_scheme=scheme)
    elif name == "llama":
        d["normalizer"], d["pre_tokenizer"] = LLAMA_NORMALIZER, None
        d["decoder"] = BYTE_DECODER
    elif name in ("precompiled", "precompiled-llama"):   # byte fallback after the Precompiled normalizer
        d = with_charsmap(_variant(base, "bytes" if name == "precompiled" else "llama"), nfkc_charsmap())
    elif name in ("xlmr-hub", "spm-converter", "strip-first"):   # normalizer Sequences as transformers writes
        pc = with_charsmap({"normalizer": None}, nfkc_charsmap())["normalizer"]
        collapse = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
        steps = {"xlmr-hub": [pc, collapse],
                 "spm-converter": [pc, {"type": "Strip", "strip_left": False, "strip_right": True},
                                   dict(collapse, content=MARK)],
                 "strip-first": [{"type": "Strip", "strip_left": True, "strip_right": True}, collapse]}[name]
        d["normalizer"] = {"type": "Sequence", "normalizers": steps}
        if name == "strip-first":   # a stripped start is not the document's start for Metaspace "first"
            d["pre_tokenizer"] = dict(d["pre_tokenizer"], prepend_scheme="first")
    elif name == "fused-piece":   # a run of unknown characters that spells a piece: worse than 2 unks
        m["vocab"] += [["\U000e0001", -1000.0], ["\u2603\u2604", -2500.0], ["\U0001f600\U0001f600", -2500.0],
                       ["\u2581th", -4.0], ["e\u2581", -2.0]]
    return d


NAMES = ["xlmr", "bytes", "precompiled", "bytes-nofallback", "partial-bytes", "metaspace-first-split",
         "metaspace-always-nosplit", "metaspace-never-split", "llama", "fused-piece", "precompiled-llama",
         "xlmr-hub", "spm-converter", "strip-first"]


@pytest.fixture(scope="module")
def configs():
    """name -> (ours through the facade, HF tokenizers on the same JSON)."""
    base = xlmr_style_json()
    out = {}
    for name in NAMES:
        text = json.dumps(_variant(base, name))
        out[name] = (Tokenizer.from_str(text), tokenizers.Tokenizer.from_str(text))
    return out


# ---- real text -----------------------------------------------------------------------------

@pytest.mark.parametrize("corpus", sorted(corpora.CORPORA))
@pytest.mark.parametrize("name", ["xlmr", "precompiled"])   # precompiled: byte fallback too
def test_fortunes(configs, name, corpus):
    assert_same(*configs[name], corpora.fortunes(corpus), adds=(True,))


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("xlmr", "precompiled")])
def test_other_shapes_fortunes_sample(configs, name):
    assert_same(*configs[name], corpora.mixed(1000))


def test_fused_unknown_run_spelling_a_piece(configs):
    ours, hf = configs["fused-piece"]
    piece = ours._impl.vocab["\u2603\u2604"]
    mark = ours._impl.vocab[MARK]
    assert ours.encode("\u2603\u2604", add_special_tokens=False) == [mark, piece]
    assert hf.encode("\u2603\u2604", add_special_tokens=False).ids == [mark, piece]


def test_unknown_characters_are_exercised(configs):
    texts = corpora.fortunes("fortunes-zh", 2000)
    plain, _ = configs["xlmr"]
    fallback, _ = configs["bytes"]
    assert any(i == plain.unk_id for doc in plain.encode_batch(texts, add_special_tokens=False).to_lists()
               for i in doc)
    assert any(4 <= i < 260 for doc in fallback.encode_batch(texts, add_special_tokens=False).to_lists()
               for i in doc)


# ---- adversarial text ----------------------------------------------------------------------

ADVERSARIAL = [
    "", " ", "  ", "   ", "\t", "\n", "\r\n", "a", " a", "a ", " a ", "a  b", "  leading", "trailing   ",
    " " * 700 + "x", "x" + " " * 701, "\n" * 300, MARK, MARK + "x", " " + MARK, MARK + MARK + " ",
    "x" + MARK * 50, "<s>", "</s>", "<unk>", "<pad>", "<s><s>", "<s> x", "x<s>", "x </s> y", " <s>",
    "<s>" + MARK, "a<s>b</s>c<unk>d", "<0x41>", "<0xE2>x", "<s", "s>", "<<s>>", "<un", "unk>",
    "\x00\x01\x02 control \x7f \x1b[0m", "\x0b\x0c\x1c\x1d\x1e\x1f", "\u00a0nbsp\u2028\u2029\u3000ideo",
    "\ufeffbom \u200bzw \u200d", "\u2603\u2604 \u2603\u2604\u2603 x\u2603\u2604y \u2604\u2603",
    "\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1e9\U0001f1ea \U0001f600" * 3,
    "\U0001f600\U0001f600\U0001f600 \U0001f600\U0001f600", "the the e the", "e\u2581e e e\u2581",
    "\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5\uff0c\u6807\u70b9\u3002", "\U00020000\U0002a6a5 \U00030000",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea \u0928\u092e\u0938\u094d\u0924\u0947",
    "\ud55c\uad6d\uc5b4 \u65e5\u672c\u8a9e \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", "e\u0301 a\u0308 \u0301start",
    "\ue000\U000f0000 private \ufffe\uffff \U0010ffff", "\ufffd replacement", "a" * 3000, "ab" * 2000,
    "\u00e9" * 1500, "\U0001f600" * 500, "1" * 1000, "the " * 2000, "Hello, World! How's it going?\n\tNew line.",
    "https://example.com/a?b=c&d=e#f", "C:\\path\\to\\file.txt", "\u1c89\u1c8a \ua7cb \U000105c0",
    "\ufb01\u0301 x\r\ny\r\n\r", "a\u200bb \u200b \ufeff<s>\u200b</s>\u200b", "\ufdfa" * 40,
    "\uff21\uff42\u337b \u2460",
    "e\u0301\u0301 \u00e9\u0301 \u1100\u1161\u11a8\u0301 \u0600a \u00a9\u200d\u00a9 \U0001f1e9\U0001f1ea\U0001f1e9",
    "\u3000 \u3000x\u00a0\u00a0y\t\tz", "a  b   c    d", "  x  ", "\t x \n", " <s>  a  </s>  ", "x\u2581\u2581  y",
]


@pytest.mark.parametrize("name", NAMES)
def test_adversarial(configs, name):
    assert_same(*configs[name], ADVERSARIAL)


@pytest.mark.parametrize("name", ["xlmr", "metaspace-always-nosplit"])
def test_long_document(configs, name):
    # nosplit: one Viterbi over a ~0.5 MB word
    text = "\n\n".join(corpora.fortunes("fortunes", 2000))
    assert_same(*configs[name], [text])


def test_invalid_utf8_replaced_and_flagged(configs):
    ours, hf = configs["bytes"]
    decoded = [b.decode("utf-8", errors="replace") for b in BAD_UTF8]
    enc = ours.encode_bytes(*pack(BAD_UTF8))
    assert enc.to_lists() == [e.ids for e in hf.encode_batch_fast(decoded)]
    assert enc.flags.tolist() == [0 if d.encode("utf-8") == b else 2 for d, b in zip(decoded, BAD_UTF8)]


def test_runs_of_documents_give_the_same_ids(configs, monkeypatch):
    from hpcllm.tokenizer import unigram
    ours, hf = configs["precompiled"]
    monkeypatch.setattr(unigram, "SLOT_BYTES", 1 << 14)   # ~170 bytes of text per kernel call
    assert_same(ours, hf, corpora.mixed(300) + ["\ufdfa" * 400])


def test_truncation_counts_special_tokens(configs):
    ours, hf = configs["xlmr"]
    hf = tokenizers.Tokenizer.from_str(hf.to_str())
    texts = corpora.mixed(200) + ["", "a", "<s>x"]
    for max_length in (2, 3, 7, 64):
        hf.enable_truncation(max_length)
        ref = [e.ids for e in hf.encode_batch_fast(texts)]
        assert ours.encode_bytes(*pack(texts), max_length=max_length).to_lists() == ref


# ---- hypothesis ------------------------------------------------------------------------------

_ALPHABET = st.sampled_from(list("abcdeéth ▁  \n\r\t.,<>/su") + [
    "<s>", "</s>", "<unk>", "\u2603", "\u2604", "\U0001f600", "\u4e2d", "\u6587", "ß", "я", "\u0301", "\u200b",
    "\u200d", "\ufb01", "\uff21", "\u3000", "\ufdfa", "\u1100", "\u1161", "\U0001f1e9"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=30), st.lists(_ALPHABET, max_size=30).map("".join)), max_size=6))
def test_hypothesis_text(configs, texts):
    for name in ("xlmr", "bytes", "precompiled", "partial-bytes", "metaspace-always-nosplit", "fused-piece",
                 "spm-converter", "strip-first"):
        assert_same(*configs[name], texts)


# ---- decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["xlmr", "bytes", "partial-bytes", "llama", "metaspace-never-split"])
def test_decode_as_hf(configs, name):
    ours, hf = configs[name]
    texts = corpora.mixed(300) + ADVERSARIAL
    for ids in ours.encode_batch(texts).to_lists():
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_round_trip(configs):
    ours, _ = configs["bytes"]
    for t in corpora.mixed(300):
        assert ours.decode(ours.encode(t)) == t.strip(" ") or " " in t


# ---- loading ------------------------------------------------------------------------------------

def _proto_fields(b):
    """(field number, value) of a protobuf message (varints and length-delimited fields only)."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        if key & 7 == 0:
            v, i = _varint(b, i)
        elif key & 7 == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise ValueError("wire type %d" % (key & 7))
        yield key >> 3, v


def _varint(b, i):
    r = s = 0
    while True:
        r, s, i = r | (b[i] & 0x7F) << s, s + 7, i + 1
        if b[i - 1] < 0x80:
            return r, i


def test_sentencepiece_nmt_nfkc_charsmap(configs, tmp_path):
    """The charsmap sentencepiece's trainer writes (ModelProto.normalizer_spec.precompiled_charsmap)."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpora.fortunes("fortunes", 300)),
                                   model_prefix=str(tmp_path / "m"), vocab_size=300, hard_vocab_limit=False,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc", minloglevel=2)
    proto = (tmp_path / "m.model").read_bytes()
    spec = next(v for f, v in _proto_fields(proto) if f == 3)
    raw = next(v for f, v in _proto_fields(spec) if f == 2)
    text = json.dumps(with_charsmap(_variant(xlmr_style_json(), "bytes"), raw))
    ours, hf = Tokenizer.from_str(text), tokenizers.Tokenizer.from_str(text)
    assert ours._impl._params.expand == 6   # U+FDFA: 3 bytes -> 18 characters
    assert_same(ours, hf, corpora.mixed(1500) + ADVERSARIAL)


def test_precompiled_is_exercised(configs):
    ours, hf = configs["precompiled"]
    assert hf.normalizer.normalize_str("\uff21\ufb01\u0301\r\n\u200b") == "Afi "
    assert ours.encode("\uff21\uff22") == ours.encode("AB") != ours.encode("\uff21", add_special_tokens=False)


def test_other_normalizers_are_one_line_errors():
    d = _variant(xlmr_style_json(), "xlmr")
    d["normalizer"] = {"type": "NFKC"}
    with pytest.raises(HpcllmError, match="NFKC is not supported"):
        Tokenizer.from_str(json.dumps(d))
    d["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"Regex": " {2,}"},
                                                            "content": " "}, {"type": "Strip"}]}
    with pytest.raises(HpcllmError, match="Strip is not supported"):
        Tokenizer.from_str(json.dumps(d))
    d["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}
    with pytest.raises(HpcllmError, match="precompiled_charsmap"):
        Tokenizer.from_str(json.dumps(d))


def test_kind_and_ids(configs):
    ours, _ = configs["xlmr"]
    assert ours.kind == "unigram" and ours.unk_id == 3 and ours.bos_id == 0 and ours.eos_id == 2
    assert ours.pad_id == 1 and ours.vocab_size == 1500
