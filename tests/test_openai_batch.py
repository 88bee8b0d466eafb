"""generate --openai-batch: per-request options in one job, broken lines kept, OpenAI's output layout."""

import json

import h5py
import numpy as np
import pytest

from conftest import minilm_dir, mpirun
from hpcllm.cli import run
from hpcllm.corpus.openai_batch import Requests, parse, sampling

CHAT = "/v1/chat/completions"
LINES = [
    {"custom_id": "greedy", "method": "POST", "url": CHAT,
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5,
              "temperature": 0}},
    {"custom_id": "sampled", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0.8, "seed": 7, "n": 2}},
    "{not json",
    {"custom_id": "images", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "a cat"}},
    {"custom_id": "no-messages", "method": "POST", "url": CHAT, "body": {"model": "m"}},
    {"custom_id": "nucleus", "method": "POST", "url": CHAT,
     "body": {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": "What is MPI?"}]}],
              "max_completion_tokens": 7, "top_p": 0.9, "seed": 3, "stop": "ing"}},
    {"custom_id": "hot", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "temperature": 5}},
]
ERRORS = {2: "invalid_json", 3: "invalid_request", 4: "invalid_request", 6: "invalid_request"}


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_request_lines():
    serves = ("chat", "completion")
    assert parse(LINES[0], serves).kind == "chat" and parse(LINES[1], serves).kind == "completion"
    assert "not served" in parse({"custom_id": "e", "url": "/v1/embeddings", "body": {"input": "x"}}, serves).error
    assert "custom_id" in parse({"url": CHAT, "body": {"messages": []}}, serves).error
    assert sampling(LINES[5]["body"], 2) == ({"max_tokens": 7, "top_p": 0.9, "seed": 3, "stop": ["ing"]}, None)
    assert sampling({"n": 3}, 2)[1] == "body.n must be an integer from 1 to 2 (the job's --n), got 3"
    assert sampling({"max_tokens": True}, 2)[1] is not None
    fmt = {"type": "json_object"}
    assert sampling({"response_format": fmt}, 1)[0] == {"response_format": fmt}
    reqs = Requests(serves, 2, lambda msgs: "|".join(m["content"] for m in msgs))
    assert reqs.params_of(LINES[5])["kind"] == "chat" and reqs.text_of(LINES[5]) == "Be brief.|What is MPI?"
    assert reqs.text_of(LINES[6]) is None and "temperature" in reqs.params_of(LINES[6])["error"]


def _rows(out):
    with h5py.File(out / "results.h5", "r") as f:
        out = {k: f[k][()] for k in ("finish_reason", "n_generated", "output_ids", "output_offsets", "status")}
        return out | {k: f[k].asstr()[()] for k in ("text", "doc_id")}


def test_openai_batch_job_and_export(tiny_gen_h5, tmp_path):  # noqa: F811
    """One tp=2 job over mixed requests; each ran row equals a plain run with its options as flags
    (same document id: the sampling stream is keyed by it); the export parses with openai's models."""
    from openai.types import BatchError, Completion
    from openai.types.chat import ChatCompletion

    from hpcllm.analysis.export import export

    inp = write_lines(tmp_path / "batch.jsonl", LINES)
    mpirun(2, ["generate", "--model", tiny_gen_h5, "--input", inp, "--output", tmp_path / "out", "--tp", 2,
               "--openai-batch", "--n", 2, "--max-new-tokens", 3, "--progress", 0], timeout=300)
    got = _rows(tmp_path / "out")
    assert got["doc_id"][:2].tolist() == ["greedy", "sampled"]
    assert got["status"].tolist() == [0, 0, 3, 4, 4, 0, 4]
    assert got["n_generated"].tolist() == [[5, 0], [6, 6], [0, 0], [0, 0], [0, 0], got["n_generated"][5].tolist(),
                                           [0, 0]]
    assert got["finish_reason"][0, 1] == 255 and got["finish_reason"][5, 1] == 255    # n defaults to 1
    # the same requests as plain jobs, their options as flags
    plain = [("sampled", {"text": "Once upon a time", "id": "sampled"},
              ["--temperature", 0.8, "--seed", 7, "--n", 2, "--max-new-tokens", 6]),
             ("nucleus", {"messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "What is MPI?"}], "id": "nucleus"},
              ["--chat", "--top-p", 0.9, "--seed", 3, "--stop", "ing", "--max-new-tokens", 7])]
    for k, (name, line, flags) in enumerate(plain):
        write_lines(tmp_path / f"{name}.jsonl", [line])
        assert run([str(x) for x in ["generate", "--model", tiny_gen_h5, "--input", tmp_path / f"{name}.jsonl",
                                     "--output", tmp_path / name, "--progress", 0] + flags]) == 0
        ref, row = _rows(tmp_path / name), {"sampled": 1, "nucleus": 5}[name]
        ids = got["output_ids"][got["output_offsets"][row]:got["output_offsets"][row + 1]]
        assert ids.tolist() == ref["output_ids"].tolist()
        assert np.atleast_1d(got["text"][row])[:len(np.atleast_1d(ref["text"][0]))].tolist() == \
            np.atleast_1d(ref["text"][0]).tolist()

    out = tmp_path / "out.jsonl"
    assert export(tmp_path / "out", str(out), fmt="openai-batch") == len(LINES)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(LINES)
    for i, line in enumerate(lines):
        assert line["id"] == f"batch_req_{i}"
        if i in ERRORS:
            assert line["response"] is None and line["error"]["code"] == ERRORS[i]
            BatchError.model_validate(line["error"])
            assert line["custom_id"] == (None if i == 2 else LINES[i]["custom_id"])
            continue
        assert line["error"] is None and line["custom_id"] == LINES[i]["custom_id"]
        body = line["response"]["body"]
        model = ChatCompletion if LINES[i]["url"] == CHAT else Completion
        parsed = model.model_validate(body)
        assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
        texts = [c.message.content if model is ChatCompletion else c.text for c in parsed.choices]
        assert texts == [t for t in np.atleast_1d(got["text"][i]).tolist()][:len(texts)]
    assert len(lines[1]["response"]["body"]["choices"]) == 2 and len(lines[0]["response"]["body"]["choices"]) == 1


def test_openai_batch_refuses_chat_flag(tiny_gen_h5, tmp_path):  # noqa: F811
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.config import JobConfig
    from hpcllm.errors import HpcllmError
    from hpcllm.jobs.generate import GenerateJob

    cfg = JobConfig(model=tiny_gen_h5, input="x", output="y", openai_batch=True, chat=True)
    with Checkpoint(tiny_gen_h5) as ck, pytest.raises(HpcllmError, match="drop --chat"):
        GenerateJob(cfg, ck)


def test_openai_batch_embeddings(minilm_h5, tmp_path):
    """embed --openai-batch: /v1/embeddings lines embedded as sentence-transformers does, others error lines."""
    from openai.types import CreateEmbeddingResponse
    from sentence_transformers import SentenceTransformer

    from hpcllm.analysis.export import export

    texts = {0: "The cat sat on the mat.", 3: "A dog runs."}
    lines = [{"custom_id": "e0", "url": "/v1/embeddings", "body": {"input": texts[0], "model": "m"}}, LINES[0],
             {"custom_id": "e2", "url": "/v1/embeddings", "body": {"input": ["a", "list"]}},
             {"custom_id": "e3", "url": "/v1/embeddings", "body": {"input": texts[3]}}, "not json"]
    inp = write_lines(tmp_path / "emb.jsonl", lines)
    assert run(["embed", "--model", minilm_h5, "--input", str(inp), "--output", str(tmp_path / "o"),
                "--openai-batch", "--progress", "0"]) == 0
    export(tmp_path / "o", str(tmp_path / "o.jsonl"), fmt="openai-batch")
    got = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in got] == ["e0", "greedy", "e2", "e3", None]
    assert [x["error"]["code"] if x["error"] else None for x in got] == \
        [None, "invalid_request", "invalid_request", None, "invalid_json"]
    st = SentenceTransformer(minilm_dir(), device="cpu")
    for i, text in texts.items():
        body = CreateEmbeddingResponse.model_validate(got[i]["response"]["body"])
        np.testing.assert_allclose(body.data[0].embedding, st.encode(text), atol=1e-5)
