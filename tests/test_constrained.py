"""Constrained decoding (hpcllm.generate.constrain): the vocabulary the grammar engine sees is exactly
the bytes of each token (SmolLM2's byte-level BPE and Gemma 3's SentencePiece, against their GGUF
token tables), every completion that finishes is a sentence of its grammar (choices, regex, JSON
schema checked with jsonschema, Lark) and the others say constraint_incomplete, and a constrained,
seeded job gives the same rows at tp = 2 and at dp = 2 stopped and resumed as on one rank."""

import json
import re
import signal

import jsonschema
import numpy as np
import pytest

from conftest import gemma_gguf, mpirun, smol_gguf
from test_executor import _check_resumed, _check_stopped, _n_shards, _run, _run_and_stop
from test_generate_job import _read, _same

from hpcllm.generate.constrain import ConstraintError, Grammars, choices, constraint_of, json_schema, lark, regex
from hpcllm.generate.scheduler import CONSTRAINT_INCOMPLETE, EOS, LENGTH, STOP

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "mood": {"enum": ["happy", "sad"]}},
          "required": ["name", "age", "mood"], "additionalProperties": False}
LARK = 'start: item ("," item)*\nitem: NUMBER | WORD\nNUMBER: /[0-9]{1,4}/\nWORD: /[a-z]{1,6}/\n'
LARK_RE = r"(?:[0-9]{1,4}|[a-z]{1,6})(?:,(?:[0-9]{1,4}|[a-z]{1,6}))*"
CHOICES = ["positive", "negative", "neutral", "neutral-ish"]
PATTERN = r"[0-9]{3}-[a-z]{2,5}"
TEXTS = ["Grüße aus Köln — 東京タワー 🎉!\n\nThe end.", "def f(x):\n    return {'a': [1, 2.5e-3]}\t# ok",
         "  leading spaces and\r\nCRLF", "ÅÄÖ åäö ß ﬁ ½ € 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


def _gguf_table(path):
    """The GGUF's token strings and types (the metadata header alone: gguf.GGUFReader maps every tensor)."""
    from hpcllm.tokenizer import gguf_meta

    meta, _ = gguf_meta.read(path)
    return list(meta["tokens"]), list(meta["token_type"])


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_vocabulary_bytes_are_the_tokens_bytes(which):
    """Byte-level BPE: a token's characters mapped back through GPT-2's byte alphabet; SentencePiece: the
    metaspace is a space and <0xNN> is that byte. Special (control) tokens are marked, and real text
    tokenizes into tokens whose bytes concatenate to the text."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from hpcllm.generate.constrain import vocabulary_bytes
    from hpcllm.tokenizer import Tokenizer

    path = smol_gguf() if which == "smollm2" else gemma_gguf()
    tok = Tokenizer.from_gguf(path)
    got, special = vocabulary_bytes(tok, tok.vocab_size + 3)
    assert got[-3:] == [b""] * 3                                  # ids the model has and the tokenizer not
    names, types = _gguf_table(path)
    if which == "smollm2":
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        want = [bytes(byte_of[c] for c in name) for name in names]
    else:
        want = [bytes([int(name[3:5], 16)]) if kind == 6 else name.replace("\u2581", " ").encode()
                for name, kind in zip(names, types)]
    control = {i for i, kind in enumerate(types) if kind == 3}
    assert control <= set(special) and {1, 2} & set(special)     # EOS / BOS among them
    plain = sorted(set(range(len(names))) - set(special))
    assert len(plain) > 0.9 * len(names)
    assert [got[i] for i in plain] == [want[i] for i in plain]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(got[i] for i in ids) == text.encode()


def test_response_formats_and_their_errors():
    assert constraint_of(None) is None and constraint_of({"type": "text"}) is None
    assert constraint_of({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}) == json_schema(SCHEMA)
    assert constraint_of({"type": "json_object"}) == json_schema({"type": "object"})
    assert constraint_of({"type": "regex", "regex": PATTERN}) == regex(PATTERN)
    assert constraint_of({"type": "choice", "choices": CHOICES}) == choices(CHOICES)
    assert constraint_of({"type": "grammar", "grammar": LARK}) == lark(LARK)
    for bad, says in [("json", "must be an object"), ({"type": "xml"}, "'xml' is not one of"),
                      ({"type": "json_schema", "json_schema": SCHEMA}, '{"schema"'),
                      ({"type": "choice", "choices": []}, "non-empty list"), ({"type": "regex"}, "non-empty string"),
                      ({"type": "json_schema", "json_schema": {"schema": [1]}}, "must be an object")]:
        with pytest.raises(ConstraintError, match=re.escape(says)):
            constraint_of(bad)


def _valid(kind, text):
    if kind == "choice":
        return text in CHOICES
    if kind == "regex":
        return re.fullmatch(PATTERN, text) is not None
    if kind == "grammar":
        return re.fullmatch(LARK_RE, text) is not None
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_every_finished_completion_is_a_sentence_of_its_grammar(tiny_llama_h5):
    """One engine, a constraint per prompt (and none), --n 2 seeded sampling through few slots, budgets too
    small for some: finished completions parse (EOS only where the grammar accepts), cut ones say
    constraint_incomplete and do not; a stop string's cut text is what is checked."""
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.generate.engine import Engine, Limits
    from hpcllm.generate.kv_cache import KVCache
    from hpcllm.generate.sampling import SamplingParams
    from hpcllm.model.build import build_model
    from hpcllm.tokenizer import Tokenizer
    from hpcllm.world.comm import LocalComm

    with Checkpoint(tiny_llama_h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
        tok = Tokenizer.from_str(ck.tokenizer_json, apply_file_settings=False)
    grammars = Grammars(tok, {2}, model.cfg["vocab"])
    kinds = {"choice": choices(CHOICES), "regex": regex(PATTERN), "json": json_schema(SCHEMA), "grammar": lark(LARK)}
    with pytest.raises(ConstraintError, match="regex"):
        grammars.matcher(regex("[0-9"))
    docs = [(k, budget) for budget in (40, 3) for k in kinds] + [(None, 8)]
    prompts = [np.array(tok.encode(f"Answer {i}: "), np.int64) for i in range(len(docs))]
    cons = [kinds[k] if k else None for k, _ in docs]
    eng = Engine(model, KVCache(model, 4, 64, model.dtype), prompts, [b for _, b in docs],
                 [f"d{i}" for i in range(len(docs))], SamplingParams(temperature=1.0, seed=3),
                 Limits(frozenset({2}), frozenset(), (b"ne", b"-a")), 2, 16, 4, tok, constraints=cons,
                 grammars=grammars)
    eng.run_until(len(docs))
    seen = set()
    for (j, c), (ids, _, reason, text) in eng.results.items():
        kind = docs[j][0]
        seen.add(reason)
        if kind is None:
            assert reason in (EOS, STOP, LENGTH)
        elif reason == CONSTRAINT_INCOMPLETE:
            assert not _valid(kind, text), (kind, text)
        else:
            assert reason in (EOS, LENGTH, STOP) and _valid(kind, text), (kind, reason, text)
    assert {EOS, CONSTRAINT_INCOMPLETE} <= seen


def _corpus(path, copies=1):
    texts = ["Describe a person as JSON.", "Who is happy?", "Name: Ada, 36", "Give a JSON object", "mood?",
             "Tell me about Bob", "x", "Ünïcödé ✓ 東京", "A sad person, 80 years old:", "JSON please"]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts * copies))
    return path


def _args(h5, inp, out, schema):
    return ["generate", "--model", h5, "--input", inp, "--output", out, "--json-schema", schema,
            "--max-new-tokens", 20, "--temperature", 0.8, "--seed", 7, "--n", 2,
            "--shard-docs", 2, "--batch-tokens", 32, "--progress", 0]


def test_json_schema_job_at_tp2_and_dp2_resumed_equals_one_rank(tiny_llama_h5, tmp_path):
    """Seeded --json-schema runs: one rank, tp = 2 (each rank masking its own vocabulary slice),
    and dp = 2 stopped by SIGUSR1 and rerun: the same rows; every finished completion validates."""
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    inp = _corpus(tmp_path / "prompts.jsonl", copies=3)     # 15 shards: a signal lands mid-run
    mpirun(1, _args(tiny_llama_h5, inp, tmp_path / "ref", schema))
    ref, names = _read(tmp_path / "ref" / "results.h5")
    assert names["3"] == "constraint_incomplete"
    reasons = ref["finish_reason"].ravel()
    texts = ref["text"].ravel()
    assert set(reasons) <= {EOS, LENGTH, CONSTRAINT_INCOMPLETE} and (reasons == EOS).sum() >= 5
    for reason, text in zip(reasons, texts):
        assert _valid("json", text) == (reason != CONSTRAINT_INCOMPLETE), (reason, text)
    mpirun(2, _args(tiny_llama_h5, inp, tmp_path / "tp2", schema) + ["--tp", 2])
    _same(_read(tmp_path / "tp2" / "results.h5")[0], ref)
    out = tmp_path / "out"
    args = _args(tiny_llama_h5, inp, out, schema)
    rc, err, left = _run_and_stop(args, out, tmp_path, signal.SIGUSR1, rank=1)
    _check_stopped(rc, err, out, left, _n_shards(out), signal.SIGUSR1, "results.h5")
    _check_resumed(_run(2, args, tmp_path), out, left)
    _same(_read(out / "results.h5")[0], ref)


# a line's response_format (OpenAI's json_schema, ours regex / choice / grammar; text: none; absent: the job's)
FORMATS = [{"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}, {"type": "regex", "regex": PATTERN},
           {"type": "choice", "choices": CHOICES}, {"type": "grammar", "grammar": LARK}, {"type": "text"}, None,
           {"type": "regex", "regex": "[0-9"}]
KINDS = ["json", "regex", "choice", "grammar", None, "job", "bad"]


def _check_formats(got):
    """The rows of FORMATS' lines run with --regex [a-z]{1,8} and max 40 tokens."""
    assert got["status"].tolist() == [0] * 6 + [4] and "response_format" in got["error"][6]
    for kind, text, reason in zip(KINDS[:6], got["text"], got["finish_reason"]):
        if kind == "job":
            assert reason == CONSTRAINT_INCOMPLETE or re.fullmatch("[a-z]{1,8}", text), text
        elif kind is not None:
            assert reason == CONSTRAINT_INCOMPLETE or _valid(kind, text), (kind, text)
    assert got["n_generated"][4] == 40 or got["finish_reason"][4] == EOS     # text: free, up to max_tokens


def test_openai_batch_lines_carry_their_response_format(tiny_llama_h5, tmp_path):
    """--openai-batch: each line's response_format over the job's --regex (lines without one); one that
    does not compile is that line's error."""
    lines = [{"custom_id": f"r{i}", "url": "/v1/completions",
              "body": {"prompt": f"Answer {i}:", "max_tokens": 40} | ({"response_format": f} if f else {})}
             for i, f in enumerate(FORMATS)]
    inp = tmp_path / "batch.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    mpirun(1, ["generate", "--model", tiny_llama_h5, "--input", inp, "--output", tmp_path / "out", "--openai-batch",
               "--regex", "[a-z]{1,8}", "--temperature", 0.8, "--seed", 1, "--progress", 0])
    _check_formats(_read(tmp_path / "out" / "results.h5")[0])


def test_plain_lines_carry_their_response_format_field(tiny_llama_h5, tmp_path):
    """--response-format-field: a plain JSONL line's own response_format, as --openai-batch's (a null one:
    the job's constraint)."""
    inp = tmp_path / "plain.jsonl"
    inp.write_text("".join(json.dumps({"text": f"Answer {i}:", "format": f}) + "\n" for i, f in enumerate(FORMATS)))
    mpirun(1, ["generate", "--model", tiny_llama_h5, "--input", inp, "--output", tmp_path / "out",
               "--response-format-field", "format", "--regex", "[a-z]{1,8}", "--max-new-tokens", 40,
               "--temperature", 0.8, "--seed", 1, "--progress", 0])
    _check_formats(_read(tmp_path / "out" / "results.h5")[0])
