"""SentencePiece Unigram (hpcllm.tokenizer.unigram + kernels/unigram.py) against HF `tokenizers`.

An XLM-R-shaped tokenizer.json is trained here with tokenizers' UnigramTrainer on the
fortunes (Metaspace words, specials <s> <pad> </s> <unk>, the template <s> $A </s>),
then checked in that shape and in variants: byte fallback (the 256 <0xNN> pieces added
as sentencepiece's byte models have them), the other Metaspace schemes, the Llama-2
normalizer shape, and a vocabulary where a run of unknown characters spells a piece.
Every full fortunes corpus holds characters the 1500 training texts lack (unk / bytes).
XLM-R's own normalizer (Precompiled) is not supported yet: its error is checked.
"""

import functools
import json

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corpora
from hpcllm.errors import HpcllmError
from hpcllm.tokenizer import Tokenizer

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


@functools.lru_cache(maxsize=1)
def xlmr_style_json():
    """An XLM-R-style Unigram tokenizer.json dict (without XLM-R's Precompiled normalizer), trained once per
    process on 1500 fortunes: callers must not change it."""
    from tokenizers import models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=MARK, prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=2000, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", max_piece_length=8, show_progress=False)
    tk.train_from_iterator(corpora.mixed(1500), trainer=trainer)
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
    elif name == "fused-piece":   # a run of unknown characters that spells a piece: worse than 2 unks
        m["vocab"] += [["\U000e0001", -1000.0], ["\u2603\u2604", -2500.0], ["\U0001f600\U0001f600", -2500.0],
                       ["\u2581th", -4.0], ["e\u2581", -2.0]]
    return d


NAMES = ["xlmr", "bytes", "bytes-nofallback", "partial-bytes", "metaspace-first-split",
         "metaspace-always-nosplit", "metaspace-never-split", "llama", "fused-piece"]


@pytest.fixture(scope="module")
def configs():
    """name -> (ours through the facade, HF tokenizers on the same JSON)."""
    base = xlmr_style_json()
    out = {}
    for name in NAMES:
        text = json.dumps(_variant(base, name))
        out[name] = (Tokenizer.from_str(text), tokenizers.Tokenizer.from_str(text))
    return out


def pack(texts):
    raw = [t if isinstance(t, bytes) else t.encode("utf-8", errors="surrogatepass") for t in texts]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in raw], out=offsets[1:])
    return np.frombuffer(b"".join(raw), dtype=np.uint8), offsets


def assert_same(ours, hf, texts, adds=(True, False)):
    for add in adds:
        mine = ours.encode_bytes(*pack(texts), add_special_tokens=add).to_lists()
        ref = [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=add)]
        bad = [i for i in range(len(texts)) if mine[i] != ref[i]]
        assert not bad, "%d/%d differ (add_special_tokens=%s), first %r:\n ours %s\n   HF %s" % (
            len(bad), len(texts), add, texts[bad[0]][:120], mine[bad[0]][:30], ref[bad[0]][:30])


# ---- real text -----------------------------------------------------------------------------

@pytest.mark.parametrize("corpus", sorted(corpora.CORPORA))
@pytest.mark.parametrize("name", ["xlmr", "bytes"])
def test_fortunes(configs, name, corpus):
    assert_same(*configs[name], corpora.fortunes(corpus), adds=(True,))


@pytest.mark.parametrize("name", NAMES[2:])
def test_other_shapes_fortunes_sample(configs, name):
    assert_same(*configs[name], corpora.mixed(2000))


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
]


@pytest.mark.parametrize("name", NAMES)
def test_adversarial(configs, name):
    assert_same(*configs[name], ADVERSARIAL)


@pytest.mark.parametrize("name", ["xlmr", "metaspace-always-nosplit"])
def test_long_document(configs, name):
    # nosplit: one Viterbi over a ~0.5 MB word
    text = "\n\n".join(corpora.fortunes("fortunes", 2000))
    assert_same(*configs[name], [text])


BAD_UTF8 = [b"\xff", b"abc\x80def", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80 lone high surrogate", b"\xc0\xaf",
            b"\xf0\x9f\x98 cut emoji", b"ok \xe2\x82\xac \xf0\x9f\x98\x80",
            "a\ud800b\udfffc".encode("utf-8", "surrogatepass")]


def test_invalid_utf8_replaced_and_flagged(configs):
    ours, hf = configs["bytes"]
    decoded = [b.decode("utf-8", errors="replace") for b in BAD_UTF8]
    enc = ours.encode_bytes(*pack(BAD_UTF8))
    assert enc.to_lists() == [e.ids for e in hf.encode_batch_fast(decoded)]
    assert enc.flags.tolist() == [0 if d.encode("utf-8") == b else 2 for d, b in zip(decoded, BAD_UTF8)]


def test_truncation_counts_special_tokens(configs):
    ours, hf = configs["xlmr"]
    hf = tokenizers.Tokenizer.from_str(hf.to_str())
    texts = corpora.mixed(200) + ["", "a", "<s>x"]
    for max_length in (2, 3, 7, 64):
        hf.enable_truncation(max_length)
        ref = [e.ids for e in hf.encode_batch_fast(texts)]
        assert ours.encode_bytes(*pack(texts), max_length=max_length).to_lists() == ref


# ---- hypothesis ------------------------------------------------------------------------------

_ALPHABET = st.sampled_from(list("abcdeéth ▁  \n.,<>/su") + ["<s>", "</s>", "<unk>", "\u2603", "\u2604",
                                                                  "\U0001f600", "\u4e2d", "\u6587", "ß", "я"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=30), st.lists(_ALPHABET, max_size=30).map("".join)), max_size=6))
def test_hypothesis_text(configs, texts):
    for name in ("xlmr", "bytes", "partial-bytes", "metaspace-always-nosplit", "fused-piece"):
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

def test_precompiled_normalizer_is_one_line_error():
    d = _variant(xlmr_style_json(), "xlmr")
    d["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Precompiled", "precompiled_charsmap": ""}]}
    with pytest.raises(HpcllmError, match="Precompiled is not supported"):
        Tokenizer.from_str(json.dumps(d))


def test_kind_and_ids(configs):
    ours, _ = configs["xlmr"]
    assert ours.kind == "unigram" and ours.unk_id == 3 and ours.bos_id == 0 and ours.eos_id == 2
    assert ours.pad_id == 1 and ours.vocab_size == 2000
