"""WordPiece tokenizer (all-MiniLM-L6-v2) against HF tokenizers as the oracle."""

import os
import time

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import minilm_dir
from corpora import CORPORA, fortunes
from hpcllm import tokenizer as tokmod
from hpcllm.errors import HpcllmError
from hpcllm.tokenizer import FLAG_BAD_UTF8, FLAG_TRUNCATED, Tokenizer, pack_texts

PATH = os.path.join(minilm_dir(), "tokenizer.json")

ADVERSARIAL = [
    "", " ", "\t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000",
    "a\tb\nc\rd\x0be\x0cf\x85g\xa0h\u2028i\u3000j", "  lots   of\t\tspace  ",
    "don't can't won't I'm you're it's we've they'd y'all", "rock 'n' roll ''quoted''",
    "٠١٢٣٤ ۰۱۲ ०१२३ ๑๒๓ ①②③ ¹²³ ½ ⅷ Ⅻ 〇 ٣٫١٤",
    "👩‍👩‍👧‍👦 👍🏽 👨🏿‍💻 🏳️‍🌈 ❤️ 🇩🇪 a👍b", "e\u0301 a\u0300\u0316 \u0301start n\u0303 Å Ǻ ḗ",
    "a\u302e\u1715b a\U0001d16d\u0301\U0001d165c \u0f71\u0f72\u0f74 \u05b0\u05b1\u05c2",
    "中文字符 漢字 𠀀𠀁 𪜀 𫝀 𬺰 𰀀 㐀 豈 﨎 丽 ぁァ ｱ", "한국어 텍스트 가나다 ᄀᄁ ㄱ",
    "ΣΑΣ σας ΌΣΟΣ ς", "İstanbul ıi IİI Iı", "ﬁ ﬂ ﬀ ﬃ Ǆ ǅ ǆ ẞ ß", "ＡＢＣ　ｆｕｌｌ１２３！？",
    "soft\xadhyphen zero\u200bwidth joiner\u200dnon\u200c bom\ufeff x\u2060y",
    "a" * 100, "a" * 101, "é" * 100 + " " + "é" * 101, "##a ## #", "[CLS]", "[MASK] [SEP][PAD]",
    "x[MASK]y [UNK]z [cls] [ CLS ] [[CLS]] [CLS", "\x00\x01\x7f\u0080\u009f nul\x00inside",
    "\ufffd replacement \ufffd", "tab\u0009 private\ue000use \U000f0000 noncharacter\ufdd0\uffff",
    "supercalifragilisticexpialidocious" * 5, "pneumonoultramicroscopicsilicovolcanoconiosis",
    "mixed: ÀÉÎÕÜ àéîõü ÇÑ Ø Œ Æ Ð Þ ł", "Привет, мир! Ёлка й", "مرحبا بالعالم", "שָׁלוֹם",
    "ηλεκτρονική ΆΈΉΊ", "...!!!???,,,;;;:::---___***", "$100 + 20% = <html> & `code` | ~ ^",
    "‘’“”«»‹›„‚ — – … · • ¶ § † ‡", "http://example.com/a?b=c&d=e#f user@mail.org",
    "๏ ภาษาไทย", "ᚠᛇᚻ᛫ᛒᛦᚦ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐀𝐁𝐂", "a\u0345\u0301b \u1f82 \u0390",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(PATH, apply_file_settings=False)


@pytest.fixture(scope="module")
def hf():
    from tokenizers import Tokenizer as HFTokenizer
    t = HFTokenizer.from_file(PATH)
    t.no_truncation()
    t.no_padding()
    return t


def hf_ids(hf, texts, **kw):
    return [e.ids for e in hf.encode_batch(list(texts), **kw)]


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_fortunes_identical_to_hf(tok, hf, corpus):
    texts = fortunes(corpus)
    assert len(texts) > 1000
    enc = tok.encode_batch(texts)
    assert len(enc) == len(texts)
    assert enc.to_lists() == hf_ids(hf, texts)
    assert not enc.flags.any()


def test_adversarial_identical_to_hf(tok, hf):
    texts = ADVERSARIAL + [t.upper() for t in ADVERSARIAL] + [" ".join(ADVERSARIAL)]
    got = tok.encode_batch(texts).to_lists()
    for t, g, r in zip(texts, got, hf_ids(hf, texts)):
        assert g == r, repr(t)


def test_api_shapes_and_special_ids(tok):
    enc = tok.encode_batch(["Hello world", "", "a b c"])
    assert enc.ids.dtype == np.int32 and enc.offsets.dtype == np.int64 and enc.flags.dtype == np.uint8
    assert enc.offsets.tolist() == [0, 4, 6, 11]
    assert enc.lengths().tolist() == [4, 2, 5]
    assert enc[1].tolist() == [101, 102] and enc[-1].tolist() == enc.to_lists()[2]
    assert (tok.kind, tok.vocab_size, tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id) == \
        ("wordpiece", 30522, 101, 102, 0, 100)
    assert tok.bos_id is None and tok.eos_id is None
    assert tok.encode("Hello world") == [101, 7592, 2088, 102]


def test_special_tokens_off(tok, hf):
    texts = fortunes("fortunes", 300) + ["", "[CLS] x"]
    assert tok.encode_batch(texts, add_special_tokens=False).to_lists() == \
        hf_ids(hf, texts, add_special_tokens=False)


@pytest.mark.parametrize("max_length", [2, 3, 5, 17, 128])
def test_truncation_matches_hf(tok, max_length):
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(PATH)
    hf.no_padding()
    hf.enable_truncation(max_length)
    texts = fortunes("fortunes-de", 400) + ADVERSARIAL
    full = tok.encode_batch(texts)
    enc = tok.encode_batch(texts, max_length=max_length)
    assert enc.to_lists() == hf_ids(hf, texts)
    cut = full.lengths() > max_length
    assert cut.any()
    assert ((enc.flags & FLAG_TRUNCATED) > 0).tolist() == cut.tolist()


def test_max_length_below_specials(tok):
    with pytest.raises(HpcllmError, match="max_length"):
        tok.encode_batch(["x"], max_length=1)
    assert tok.encode("a b c", max_length=1, add_special_tokens=False) == [1037]


def test_bad_utf8_replaced_and_flagged(tok, hf):
    raw = [b"ok \xff bad", b"\xc3", b"caf\xc3\xa9", b"\xed\xa0\x80x", b"\xf0\x9f\x98", b"a\xe2\x82b",
           b"\xf4\x90\x80\x80", b"\xc0\xaf", b"", "fine".encode()]
    enc = tok.encode_batch(raw)
    assert enc.to_lists() == hf_ids(hf, [r.decode("utf-8", "replace") for r in raw])
    assert ((enc.flags & FLAG_BAD_UTF8) > 0).tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 0, 0]


def test_lone_surrogates_in_str(tok, hf):
    texts = ["a\ud800b", "\udfff", "ok \U0001f600"]
    enc = tok.encode_batch(texts)
    assert enc.flags.tolist() == [FLAG_BAD_UTF8, FLAG_BAD_UTF8, 0]
    assert enc.to_lists() == hf_ids(hf, ["a\ufffd\ufffd\ufffdb", "\ufffd\ufffd\ufffd", texts[2]])


def test_empty_and_blank_docs(tok):
    enc = tok.encode_batch(["", " \t\n", "\x00\ufffd"])
    assert enc.to_lists() == [[101, 102]] * 3


def test_encode_bytes_with_offsets_and_chunks(tok, hf, monkeypatch):
    texts = fortunes("fortunes-ru", 200)
    buf, offsets = pack_texts(["prefix junk"] + texts)
    ref = hf_ids(hf, texts)
    assert tok.encode_bytes(buf, offsets[1:]).to_lists() == ref
    monkeypatch.setattr(tokmod, "CHUNK_BYTES", 1000)   # several kernel calls, one Encoding
    enc = tok.encode_bytes(np.frombuffer(buf.tobytes(), np.uint8), offsets[1:])   # read-only input
    assert enc.to_lists() == ref
    with pytest.raises(HpcllmError, match="offsets"):
        tok.encode_bytes(buf, np.array([0, len(buf) + 1]))


def test_threads_give_identical_results(tok):
    texts = fortunes("fortunes", 3000)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = tok.encode_batch(texts)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = tok.encode_batch(texts)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one.ids, many.ids) and np.array_equal(one.offsets, many.offsets)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_hf(tok, hf, skip):
    texts = fortunes("fortunes", 200) + fortunes("fortunes-es", 100) + ADVERSARIAL
    for ids in tok.encode_batch(texts).to_lists():
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_to_str_roundtrip(tok):
    again = Tokenizer.from_str(tok.to_str(), apply_file_settings=False)
    texts = fortunes("fortunes-zh", 200)
    assert again.encode_batch(texts).to_lists() == tok.encode_batch(texts).to_lists()


def test_unsupported_json_is_one_line_error(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('{"model": {"type": "Unigram"}}')
    with pytest.raises(HpcllmError, match="Unigram"):
        Tokenizer.from_file(p)
    with pytest.raises(HpcllmError, match="cannot read"):
        Tokenizer.from_file(tmp_path / "missing.json")


def _best_time(tok, text, reps=2):
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter()
        tok.encode_batch([text])
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("unit", ["a", " ", "\u3000", ".", "ab", "中", "e\u0301", "\u302e\u1715", "[CLS]"])
def test_linear_time(tok, unit):
    mb = 1 << 20
    small, big = unit * (mb // len(unit.encode())), unit * (4 * mb // len(unit.encode()))
    t1, t4 = _best_time(tok, small), _best_time(tok, big)
    # linear: ~4x; a quadratic path would be ~16x (generous bound: shared CI cores)
    assert t4 / max(t1, 1e-4) < 9, (unit, t1, t4)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=8))
def test_random_unicode_matches_hf(tok, hf, texts):
    assert tok.encode_batch(texts).to_lists() == hf_ids(hf, texts)


_TRICKY = st.sampled_from(list("aZ ,.'#[]\t\u3000\xa0\u0301\u0345\u302e\u1715\u0f71ŞİıΣςé中한ﬁ\x00\ufffd") +
                          ["[CLS]", "[MASK]", "##", "\U0001d165", "\U0001d16d"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_TRICKY, max_size=30).map("".join), min_size=1, max_size=8))
def test_tricky_alphabet_matches_hf(tok, hf, texts):
    assert tok.encode_batch(texts).to_lists() == hf_ids(hf, texts)


def test_kernel_releases_the_gil(tok):
    """Python code in another thread keeps running while a batch is tokenized."""
    import threading
    buf, offsets = pack_texts(fortunes("fortunes") * 4)
    tok.encode_bytes(buf[:1000], offsets[:2])
    done = threading.Event()
    spent = []

    def work():
        t0 = time.perf_counter()
        tok.encode_bytes(buf, offsets)
        spent.append(time.perf_counter() - t0)
        done.set()

    th = threading.Thread(target=work)
    count = 0
    th.start()
    while not done.is_set():
        count += 1
    th.join()
    # holding the GIL would leave this loop a few switch intervals (5 ms) at most
    assert spent[0] > 0.05 and count > 20_000, (spent, count)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8))
def test_random_bytes_match_hf_on_replaced_text(tok, hf, raw):
    enc = tok.encode_batch(raw)
    assert enc.to_lists() == hf_ids(hf, [r.decode("utf-8", "replace") for r in raw])
    for r, f in zip(raw, enc.flags):
        try:
            r.decode("utf-8")
            assert f == 0
        except UnicodeDecodeError:
            assert f == FLAG_BAD_UTF8
