"""`hpcllm generate` end to end through mpiexec: one row per input line with its status, the same
results at (dp, tp) = (1, 1), (2, 1) and (1, 2) (seeded sampling, --n 2, --chat, stop strings,
logprobs), a stopped and resumed run equal to an uninterrupted one. SmolLM2 against HF
transformers: tests/test_generate_parity.py."""

import json
import os
import signal

import h5py
import numpy as np
import pytest
import torch

from conftest import mpirun
from test_executor import _check_resumed, _check_stopped, _n_shards, _run, _run_and_stop

MAX_NEW = 12


@pytest.mark.parametrize("tp,comm", [(3, "mpi"), (4, "torch")])
def test_greedy_at_tp_above_the_kv_heads_equals_transformers(tiny_gen_h5, tmp_path, tp, comm):
    """6 query heads / 3 KV heads at tp = 3 (one KV head each) and tp = 4 (6 heads split 2+2+1+1, KV heads
    replicated): greedy ids equal `transformers.generate` on the same random weights."""
    from transformers import AutoModelForCausalLM

    texts = ["Hello", "Write a haiku about the sea.", "1, 2, 3, 4,", "Ünïcödé ✓ 東京", "a " * 30]
    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    mpirun(tp, ["generate", "--model", tiny_gen_h5, "--input", inp, "--output", tmp_path / "out", "--tp", tp,
                "--comm", comm, "--temperature", 0, "--max-new-tokens", MAX_NEW, "--ignore-eos", "--progress", 0],
           timeout=300)
    got, _ = _read(tmp_path / "out" / "results.h5")
    from tokenizers import Tokenizer

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(tiny_gen_h5)).eval()
    tok = Tokenizer.from_file(os.path.join(os.path.dirname(tiny_gen_h5), "tokenizer.json"))
    off = got["output_offsets"]
    for i, t in enumerate(texts):
        ids = torch.tensor(tok.encode(t).ids)[None]
        assert got["n_prompt_tokens"][i] == ids.shape[1]
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                           min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert got["output_ids"][off[i]:off[i + 1]].tolist() == want, i


def _corpus(path, copies=1):
    rows = [{"text": t} for t in ("Hello", "Write a haiku about the sea.", "1, 2, 3, 4,", "Why is the sky blue?",
                                  "Translate to French: good morning", "a " * 30, "Name three colours.",
                                  "Tell me a joke", "Ünïcödé ✓ 東京", "What is MPI?")]
    rows.insert(2, {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]})
    rows.insert(4, {"text": "x " * 200})                  # too long for the 96-token context
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(3, "{not json")
    lines.insert(6, json.dumps({"prompt": "no text field"}))
    lines.insert(8, json.dumps({"messages": "not a list"}))
    path.write_text("\n".join(lines * copies) + "\n", encoding="utf-8")
    return path


def _args(h5, inp, out):
    return ["generate", "--model", h5, "--input", inp, "--output", out, "--chat", "--max-new-tokens", MAX_NEW,
            "--temperature", 0.8, "--top-p", 0.9, "--top-k", 40, "--seed", 7, "--n", 2, "--logprobs",
            "--stop", "e s", "--stop", "\n\n", "--shard-docs", 4, "--batch-tokens", 48, "--progress", 0]


_RUNS = {}


def _layout(tiny_gen_h5, tmp_path_factory, n, tp):
    if (n, tp) not in _RUNS:
        d = tmp_path_factory.mktemp(f"gen{n}{tp}")
        inp = _corpus(d / "prompts.jsonl")
        mpirun(n, _args(tiny_gen_h5, inp, d / "out") + ["--tp", tp], timeout=300)
        _RUNS[n, tp] = d / "out" / "results.h5"
    return _RUNS[n, tp]


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: (f[k].asstr()[()] if h5py.check_string_dtype(f[k].dtype) else f[k][()]) for k in f}, \
            json.loads(f["finish_reason"].attrs["names"])


def test_chat_on_token_shards_is_a_one_line_error(tiny_gen_h5, tmp_path):
    """Token shards hold the text field tokenized without the chat template: --chat refuses them on every
    rank (exit 2, one line naming the input); without --chat they are prompts as they are."""
    inp = _corpus(tmp_path / "prompts.jsonl")
    mpirun(2, ["tokenize", "--model", tiny_gen_h5, "--input", inp, "--output", tmp_path / "tok", "--progress", 0])
    proc = mpirun(2, ["generate", "--model", tiny_gen_h5, "--input", tmp_path / "tok", "--output", tmp_path / "out",
                      "--chat", "--progress", 0], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors and all(str(tmp_path / "tok") in line and "--chat" in line for line in errors), proc.stderr[-2000:]
    mpirun(2, ["generate", "--model", tiny_gen_h5, "--input", tmp_path / "tok", "--output", tmp_path / "plain",
               "--temperature", 0, "--max-new-tokens", 4, "--progress", 0])
    got, _ = _read(tmp_path / "plain" / "results.h5")
    assert len(got["status"]) == 15 and (got["n_generated"][got["status"] == 0] == 4).all()


def test_rows_statuses_and_columns(tiny_gen_h5, tmp_path_factory):
    got, names = _read(_layout(tiny_gen_h5, tmp_path_factory, 1, 1))
    assert names == {"0": "eos", "1": "stop", "2": "length", "3": "constraint_incomplete", "255": "none"}
    status = got["status"].tolist()
    assert len(status) == 15
    assert [status[i] for i in (3, 5, 6, 8)] == [3, 6, 4, 4]     # bad JSON, too long, no text, bad messages
    ran = [i for i, s in enumerate(status) if s == 0]
    assert len(ran) == 11 and got["text"].shape == (15, 2) and got["n_generated"].shape == (15, 2)
    for i in (3, 5, 6, 8):
        assert (got["finish_reason"][i] == 255).all() and (got["n_generated"][i] == 0).all()
        assert list(got["text"][i]) == ["", ""]
    off = got["output_offsets"]
    assert (np.diff(off) == got["n_generated"].sum(axis=1)).all() and len(got["output_logprobs"]) == off[-1]
    assert (got["output_logprobs"] <= 0).all()
    assert set(got["finish_reason"][ran].ravel()) <= {0, 1, 2}
    assert (got["n_generated"][ran] <= MAX_NEW).all() and (got["n_generated"][ran] >= 1).all()
    length = got["finish_reason"] == 2
    assert (got["n_generated"][length] == MAX_NEW).all()
    stopped = got["finish_reason"] == 1
    for text in got["text"][stopped]:
        assert "e s" not in text and "\n\n" not in text
    assert got["n_prompt_tokens"][5] > 96 and (got["n_prompt_tokens"][ran] > 10).all()   # the template


def _same(got, ref):
    assert sorted(got) == sorted(ref)
    for k in ref:
        if k == "output_logprobs":
            np.testing.assert_allclose(got[k], ref[k], atol=1e-4)
        else:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_tp2_gives_the_same_results(tiny_gen_h5, tmp_path_factory):
    """tp = 2 (KV groups split 2 + 1): the same ids, texts and reasons (tiny model: no near-ties)."""
    _same(_read(_layout(tiny_gen_h5, tmp_path_factory, 2, 2))[0], _read(_layout(tiny_gen_h5, tmp_path_factory, 1, 1))[0])


def test_dp2_stopped_and_resumed_equals_one_rank(tiny_gen_h5, tmp_path_factory, tmp_path):
    """dp = 2, stopped by SIGUSR1 on one rank mid-run and rerun: equal to the uninterrupted 1-rank run
    (the random streams depend on seed, document, completion and step only)."""
    # 8 copies of the corpus, 30 shards: the tiny model finishes 4 shards in ~0.4 s, and the signal must
    # land while most shards are still to do
    inp = _corpus(tmp_path / "prompts.jsonl", copies=8)
    mpirun(1, _args(tiny_gen_h5, inp, tmp_path / "ref"))
    out = tmp_path / "out"
    args = _args(tiny_gen_h5, inp, out)
    rc, err, left = _run_and_stop(args, out, tmp_path, signal.SIGUSR1, rank=1)
    _check_stopped(rc, err, out, left, _n_shards(out), signal.SIGUSR1, "results.h5")
    _check_resumed(_run(2, args, tmp_path), out, left)
    got, ref = _read(out / "results.h5")[0], _read(tmp_path / "ref" / "results.h5")[0]
    assert len(ref["status"]) == 120 and (ref["status"] == 0).sum() == 88
    _same(got, ref)
