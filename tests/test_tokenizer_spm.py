"""SentencePiece-style BPE (hpcllm.tokenizer.spm + kernels/spm_bpe.py) against HF `tokenizers`.

A Llama-2-shaped tokenizer.json is trained here on the fortunes (Metaspace words,
an alphabet limited to 150 characters so that byte fallback is exercised, the 256
<0xNN> tokens added to the vocab as Llama-2 has them), then checked in the Llama-2
shape (Prepend + Replace normalizer, no pre-tokenizer, <s> template) and in the
Metaspace shapes HF's SentencePieceBPETokenizer writes (without its NFKC), plus
the unk paths (no byte fallback, fuse_unk on and off, a partial byte table).
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
from hpcllm.tokenizer.spm import SentencePieceBPE

MARK = "\u2581"
LLAMA_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": MARK}, {"type": "Replace", "pattern": {"String": " "}, "content": MARK}]}
BOS_TEMPLATE = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}


@functools.lru_cache(maxsize=1)
def llama2_style_json():
    """A Llama-2-style tokenizer.json dict: specials 0-2, bytes 3-258 as in Llama-2, then the merges' tokens.
    Trained once per process (tests/test_tokenizer_gguf_spm.py uses it too): callers must not change it."""
    from tokenizers import models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=MARK, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=150,
                                  show_progress=False)
    tk.train_from_iterator(corpora.mixed(4000), trainer=trainer)
    d = json.loads(tk.to_str())
    old = d["model"]["vocab"]
    vocab = {t: i for t, i in old.items() if i < 3}
    vocab.update({"<0x%02X>" % b: 3 + b for b in range(256)})
    for t, i in sorted(old.items(), key=lambda x: x[1]):
        if i >= 3:
            vocab[t] = len(vocab)
    d["model"]["vocab"] = vocab
    d["normalizer"], d["pre_tokenizer"], d["post_processor"] = LLAMA_NORMALIZER, None, BOS_TEMPLATE
    d["decoder"] = None
    d["model"]["ignore_merges"] = False
    return d


def _variant(base, name):
    d = json.loads(json.dumps(base))
    if name.startswith("metaspace"):  # metaspace-<scheme>-<split|nosplit>
        _, scheme, split = name.split("-")
        d["normalizer"] = None
        d["pre_tokenizer"] = {"type": "Metaspace", "replacement": MARK, "prepend_scheme": scheme,
                              "split": split == "split"}
    elif name == "nofallback-fuse":
        d["model"]["byte_fallback"] = False
    elif name == "nofallback-nofuse":
        d["model"].update(byte_fallback=False, fuse_unk=False)
    elif name == "partial-bytes":  # bytes >= 0xC0 have no token: unk, and HF's pending-unk order
        d["model"]["vocab"] = {t: i for t, i in d["model"]["vocab"].items() if not ("<0xC0>" <= t <= "<0xFF>")}
    elif name == "cross-merges":  # merges that span "x▁": words must not be cut before the mark
        vocab = d["model"]["vocab"]
        extra = [("e", MARK), ("s", MARK), (MARK, MARK), ("e" + MARK, "t"), ("." + MARK, MARK), (".", MARK)]
        for a, b in extra:
            vocab.setdefault(a + b, len(vocab))
        d["model"]["merges"] = [[a, b] for a, b in extra] + d["model"]["merges"]
    elif name == "eos-template":
        d["post_processor"] = {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "</s>", "type_id": 0}}], "pair": [], "special_tokens": {
            "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
            "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    return d


NAMES = ["llama", "metaspace-always-split", "metaspace-first-split", "metaspace-always-nosplit",
         "metaspace-first-nosplit", "metaspace-never-split", "nofallback-fuse", "nofallback-nofuse",
         "partial-bytes", "cross-merges", "eos-template"]


@pytest.fixture(scope="module")
def configs():
    """name -> (ours through the facade, HF tokenizers on the same JSON)."""
    base = llama2_style_json()
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


def ids_of(tok, texts, add=True):
    return tok.encode_bytes(*pack(texts), add_special_tokens=add).to_lists()


def assert_same(ours, hf, texts, adds=(True, False)):
    for add in adds:
        mine = ids_of(ours, texts, add)
        ref = [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=add)]
        bad = [i for i in range(len(texts)) if mine[i] != ref[i]]
        assert not bad, "%d/%d differ (add_special_tokens=%s), first %r:\n ours %s\n   HF %s" % (
            len(bad), len(texts), add, texts[bad[0]][:120], mine[bad[0]][:30], ref[bad[0]][:30])


# ---- real text -----------------------------------------------------------------------------

@pytest.mark.parametrize("corpus", sorted(corpora.CORPORA))
def test_llama_shape_fortunes(configs, corpus):
    texts = corpora.fortunes(corpus)
    assert_same(*configs["llama"], texts)


@pytest.mark.parametrize("name", NAMES[1:])
def test_other_shapes_fortunes_sample(configs, name):
    texts = corpora.mixed(2000)
    assert_same(*configs[name], texts)


def test_cross_merges_are_used_and_not_cut(configs):
    ours, _ = configs["cross-merges"]
    cross, plain = ours._impl._tables.nocut, configs["llama"][0]._impl._tables.nocut
    assert cross[ord("e")] and cross[ord("s")] and cross[ord(".")] and not plain[ord("e")]
    text = "the cat sees the test.  Yes."
    assert ours.encode(text) != configs["llama"][0].encode(text)


def test_byte_fallback_is_exercised(configs):
    ours, _ = configs["llama"]
    ids = ids_of(ours, corpora.fortunes("fortunes-zh", 200), add=False)
    assert any(3 <= i < 259 for doc in ids for i in doc)


# ---- adversarial text ----------------------------------------------------------------------

ADVERSARIAL = [
    "", " ", "  ", "   ", "\t", "\n", "\r\n", "a", " a", "a ", " a ", "a  b", "  leading", "trailing   ",
    " " * 700 + "x", "x" + " " * 701, "\n" * 300, "\t \t \n", MARK, MARK + "x", " " + MARK, MARK + MARK + " ",
    "x" + MARK * 50, "<s>", "</s>", "<unk>", "<s><s>", "<s> x", "x<s>", "x </s> y", " <s>", "<s>" + MARK,
    "a<s>b</s>c<unk>d", "<0x41>", "<0xE2>x", "<s", "s>", "<<s>>", "\x00\x01\x02 control \x7f \x1b[0m",
    "\x0b\x0c\x1c\x1d\x1e\x1f", "\u00a0nbsp\u2028\u2029\u3000ideo", "\ufeffbom \u200bzw \u200d",
    "\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1e9\U0001f1ea \U0001f600" * 3,
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


@pytest.mark.parametrize("name", ["llama", "cross-merges"])
def test_long_document(configs, name):
    # cross-merges: one ~0.5 MB word merged by the heap; llama: cut into words at "x▁"
    text = "\n\n".join(corpora.fortunes("fortunes", 2000))
    assert_same(*configs[name], [text])


BAD_UTF8 = [b"\xff", b"abc\x80def", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80 lone high surrogate", b"\xc0\xaf",
            b"\xf0\x9f\x98 cut emoji", b"ok \xe2\x82\xac \xf0\x9f\x98\x80",
            "a\ud800b\udfffc".encode("utf-8", "surrogatepass")]


def test_invalid_utf8_and_lone_surrogates_replaced_and_flagged(configs):
    ours, hf = configs["llama"]
    decoded = [b.decode("utf-8", errors="replace") for b in BAD_UTF8]
    enc = ours.encode_bytes(*pack(BAD_UTF8))
    assert enc.to_lists() == [e.ids for e in hf.encode_batch_fast(decoded)]
    assert enc.flags.tolist() == [0 if d.encode("utf-8") == b else 2 for d, b in zip(decoded, BAD_UTF8)]
    lone = "a\ud800b"   # a str with a lone surrogate, through the facade: its 3 bytes are 3 U+FFFD
    assert ours.encode(lone) == hf.encode(lone.encode("utf-8", "surrogatepass").decode("utf-8", "replace")).ids


def test_truncation_counts_special_tokens(configs):
    ours, hf = configs["llama"]
    hf = tokenizers.Tokenizer.from_str(hf.to_str())
    texts = corpora.mixed(200) + ["", "a", "<s>x"]
    for max_length in (1, 2, 7, 64):
        hf.enable_truncation(max_length)
        got = ours.encode_batch(texts, max_length=max_length).to_lists()
        assert got == [e.ids for e in hf.encode_batch_fast(texts)]


def test_facade_picks_spm_and_ids(configs):
    ours, hf = configs["llama"]
    assert isinstance(ours._impl, SentencePieceBPE) and ours.kind == "spm_bpe"
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 0)
    assert ours.vocab_size == hf.get_vocab_size()
    assert ours.encode("") == [1] and ours.encode("", add_special_tokens=False) == []


def test_decode_round_trip(configs):
    ours, _ = configs["llama"]
    for t in corpora.mixed(300):
        t = t.strip(" ")
        assert ours.decode(ours.encode(t)) == t


# ---- random text ---------------------------------------------------------------------------

TRICKY = list(" \t\n\r\x0b\x00\u00a0\u3000" + MARK + "'sSaebt019!.,-\u00e9\u0301\u4e2d\u0436\U0001f600\u200d<>/")
TRICKY += ["<s>", "</s>", "<unk>", "<0x41>", "  ", MARK + MARK]
RANDOM_TEXT = st.lists(st.one_of(st.sampled_from(TRICKY), st.characters(blacklist_categories=("Cs",))),
                       max_size=40).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(RANDOM_TEXT, min_size=1, max_size=4))
def test_random_text(configs, texts):
    for ours, hf in configs.values():
        assert_same(ours, hf, texts)


# ---- what is refused -----------------------------------------------------------------------

def test_unsupported_configs_are_refused_in_one_line(configs):
    base = json.loads(configs["llama"][1].to_str())
    meta = {"type": "Metaspace", "replacement": MARK, "prepend_scheme": "always", "split": True}
    cases = {
        "normalizer": dict(base, normalizer={"type": "NFKC"}),
        "pre_tokenizer": dict(base, pre_tokenizer={"type": "Whitespace"}),
        "model.ignore_merges": dict(base, model=dict(base["model"], ignore_merges=True)),
        "model.dropout": dict(base, model=dict(base["model"], dropout=0.1)),
        "Metaspace": dict(base, pre_tokenizer=meta),   # with the Llama normalizer as well
        "added_tokens": dict(base, added_tokens=[dict(base["added_tokens"][0], lstrip=True)]),
        "merges[": dict(base, model=dict(base["model"], merges=base["model"]["merges"] + [["zz", "\u00e9q"]])),
        "model.merges": dict(base, model=dict(base["model"], merges=base["model"]["merges"] + [["a", "b", "c"]])),
    }
    for field, d in cases.items():
        with pytest.raises(HpcllmError) as e:
            Tokenizer.from_str(json.dumps(d))
        msg = str(e.value)
        assert "\n" not in msg and ("normalizer" if field == "Metaspace" else field) in msg, msg


def test_token_by_token_decode_equals_decode(configs):
    """generate's Completion appends each token's bytes: a word's mark is its space after the first token,
    as in the decode of the whole reply (Llama-2 shape: one leading space dropped)."""
    from hpcllm.generate.text import Completion

    for name in ("llama", "metaspace-first-nosplit"):
        ours, _ = configs[name]
        for t in corpora.mixed(60):
            ids = ours.encode(t, add_special_tokens=False)
            c = Completion(ours, [])
            for i in ids:
                c.add(i)
            assert c.text() == ours.decode(ids), (name, t)
            assert " " not in t.strip() or " " in c.text()
