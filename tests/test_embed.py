"""`hpcllm embed` end to end: parity with sentence-transformers at every layout,
bf16, resume, a killed rank, bad input and bad arguments. Real files throughout."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import psutil
import pytest

import corpora
from conftest import REPO, minilm_dir, mpirun, write_jsonl
from hpcllm.status import Status

N_PARITY = 400


@pytest.fixture(scope="module")
def parity_corpus(tmp_path_factory):
    """400 real multilingual texts and sentence-transformers' embeddings of them."""
    from sentence_transformers import SentenceTransformer

    texts = corpora.mixed(N_PARITY)
    d = tmp_path_factory.mktemp("parity")
    path = write_jsonl(d / "corpus.jsonl", texts)
    model = SentenceTransformer(minilm_dir(), device="cpu")
    ref = model.encode(texts, batch_size=64, convert_to_numpy=True)
    return path, ref, d


def read_results(out):
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        return {k: f[k][:] for k in f.keys()}, dict(f.attrs)


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# one rank, 4 heads a rank, 3 heads a rank, dp x tp (dp alone and tp = 2 alone are its parts; each launch
# costs ~10 s of the CI budget)
LAYOUTS = [(1, 1), (1, 3), (2, 2), (1, 4)]


# torch.distributed carries only the tp all-reduces: with tp = 1 it has nothing to do; its collectives are
# checked case by case in test_comm.py, so here dp x tp
@pytest.mark.parametrize("dp,tp,comm", [(dp, tp, "mpi") for dp, tp in LAYOUTS] + [(2, 2, "torch")])
def test_parity_with_sentence_transformers(parity_corpus, minilm_h5, dp, tp, comm):
    path, ref, d = parity_corpus
    out = d / f"out-{dp}-{tp}-{comm}"
    mpirun(dp * tp, ["embed", "--model", minilm_h5, "--input", path, "--output", out, "--tp", tp,
                     "--comm", comm, "--shard-docs", 300, "--progress", 0])
    res, attrs = read_results(out)
    assert res["embedding"].shape == (N_PARITY, 384)
    cos = cosine(res["embedding"], ref)
    assert cos.min() >= 0.99999, f"worst document {cos.argmin()}: cosine {cos.min()}"
    assert json.loads(attrs["world"]) == {"world": dp * tp, "dp": dp, "tp": tp, "comm": comm,
                                          "ranks_per_node": dp * tp}
    assert set(res["status"]) <= {Status.OK, Status.TRUNCATED}
    assert (res["n_tokens"][res["status"] == Status.TRUNCATED] == 256).all()


def test_bfloat16(parity_corpus, minilm_h5):
    """bf16 on the first 100 parity texts (without AVX-512, bf16 matmuls are emulated and slow)."""
    path, ref, d = parity_corpus
    first = d / "first-100.jsonl"
    with open(path, "rb") as src:
        first.write_bytes(b"".join(src.readlines()[:100]))
    out = d / "out-bf16"
    mpirun(2, ["embed", "--model", minilm_h5, "--input", first, "--output", out, "--dtype", "bfloat16",
               "--out-dtype", "float16", "--progress", 0])
    res, _ = read_results(out)
    assert res["embedding"].dtype == np.float16 and len(res["embedding"]) == 100
    cos = cosine(res["embedding"].astype(np.float32), ref[:100])
    assert cos.min() >= 0.999, cos.min()


def _bad_corpus(path):
    """Every kind of bad line, each with its expected status."""
    rows = [
        (b'{"text": "a perfectly good line", "id": "good"}', Status.OK),
        (b'this is not json', Status.BAD_JSON),
        (b'{"body": "no text field", "id": "nofield"}', Status.MISSING_FIELD),
        (b'{"text": 42}', Status.MISSING_FIELD),
        (b'{"text": "caf\xc3\xa9 \xff\xfe broken utf8"}', Status.BAD_UTF8),
        (b'{"text": "lone surrogate \\ud800 here"}', Status.BAD_UTF8),
        (b'{"text": ""}', Status.EMPTY),
        (b'{"text": "NUL \\u0000 inside"}', Status.OK),
        (b'{"text": "raw NUL \x00 byte"}', Status.OK),  # raw control bytes in strings are accepted
        (b'', Status.BAD_JSON),
        (b'[1, 2, 3]', Status.BAD_JSON),
        (json.dumps({"text": "word " * 1_000_000}).encode(), Status.TRUNCATED),  # ~5 MB, one line
        (b'{"text": "the last line has no newline"}', Status.OK),
    ]
    with open(path, "wb") as f:
        f.write(b"\n".join(r for r, _ in rows))
    return [s for _, s in rows]


def test_bad_input_every_line_gets_a_row(tmp_path, tiny_bert_h5):
    expected = _bad_corpus(tmp_path / "bad.jsonl")
    out = tmp_path / "out"
    proc = mpirun(2, ["embed", "--model", tiny_bert_h5, "--input", tmp_path / "bad.jsonl", "--output", out,
                      "--shard-docs", 4, "--id-field", "id"])
    res, attrs = read_results(out)
    assert list(res["status"]) == [int(s) for s in expected]
    assert res["doc_id"][0] == b"good" and res["doc_id"][1] == b"bad.jsonl:2"
    processed = ~np.isin(res["status"], [Status.BAD_JSON, Status.MISSING_FIELD, Status.TOO_LONG])
    assert np.isfinite(res["embedding"][processed]).all()
    assert np.isnan(res["embedding"][~processed]).all()
    assert (res["n_tokens"][~processed] == 0).all() and res["n_tokens"][6] == 2  # empty: [CLS] [SEP]
    counts = json.loads(attrs["status_counts"])
    assert counts["BAD_JSON"] == 3 and counts["MISSING_FIELD"] == 2 and counts["BAD_UTF8"] == 2
    assert "BAD_JSON 3" in proc.stderr  # the per-status counts printed at the end


def test_too_long_documents_are_recorded(tmp_path, tiny_bert_h5):
    write_jsonl(tmp_path / "c.jsonl", ["short", "x" * 5000, "also short"])
    out = tmp_path / "out"
    mpirun(1, ["embed", "--model", tiny_bert_h5, "--input", tmp_path / "c.jsonl", "--output", out,
               "--max-doc-bytes", 1000])
    res, _ = read_results(out)
    assert list(res["status"]) == [Status.OK, Status.TOO_LONG, Status.OK]


def test_resume_skips_done_shards_and_equals_uninterrupted(tmp_path, tiny_bert_h5):
    texts = corpora.mixed(120)
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    args = ["embed", "--model", tiny_bert_h5, "--input", src, "--shard-docs", 16, "--chunk-mb", 0]
    mpirun(2, args + ["--output", tmp_path / "ref"])
    ref, _ = read_results(tmp_path / "ref")
    # a partial run: results.h5 and some shards (their chunks: one per shard) missing
    out = tmp_path / "out"
    mpirun(2, args + ["--output", out])
    os.remove(out / "results.h5")
    for i in (0, 3, 7):
        os.remove(out / "chunks" / f"chunk-{i:05d}-{i:05d}.h5")
    before = {p: os.stat(out / "chunks" / p).st_mtime_ns for p in os.listdir(out / "chunks")}
    proc = mpirun(2, args + ["--output", out])
    assert "(5 already done)" in proc.stderr
    after = {p: os.stat(out / "chunks" / p).st_mtime_ns for p in before}
    assert before == after, "completed shards must not be rewritten"
    res, _ = read_results(out)
    for k in ref:
        np.testing.assert_array_equal(res[k], ref[k])


def test_changed_config_or_model_is_refused(tmp_path, tiny_bert_h5, minilm_h5):
    src = write_jsonl(tmp_path / "c.jsonl", corpora.mixed(20))
    out = tmp_path / "out"
    mpirun(2, ["embed", "--model", tiny_bert_h5, "--input", src, "--output", out])
    for extra in (["--model", minilm_h5], ["--model", tiny_bert_h5, "--max-length", "32"]):
        proc = mpirun(2, ["embed", "--input", src, "--output", out, *extra], check=False)
        assert proc.returncode != 0
        errors = [l for l in proc.stderr.splitlines() if l.startswith("hpcllm: error:")]
        assert len(errors) == 2, proc.stderr  # one line from every rank
        assert "manifest.json" in errors[0]


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model.h5"], "model checkpoint not found: /nonexistent/model.h5"),
    (["--tp", "2"], "--tp 2 does not divide the world of 3 ranks"),
    (["--input", "/nonexistent/corpus.jsonl"], "/nonexistent/corpus.jsonl"),
])
def test_bad_arguments_fail_on_every_rank(tmp_path, tiny_bert_h5, args, message):
    src = write_jsonl(tmp_path / "c.jsonl", ["a", "b"])
    base = {"--model": tiny_bert_h5, "--input": src, "--output": str(tmp_path / "out")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    start = time.time()
    proc = mpirun(3, ["embed", *flat], check=False, timeout=120)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("hpcllm: error:")]
    assert len(errors) == 3 and all(message in e for e in errors), proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - start < 100


def test_killed_rank_ends_job_and_rerun_completes(tmp_path, tiny_bert_h5):
    texts = corpora.mixed(400)
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    args = ["embed", "--model", tiny_bert_h5, "--input", src, "--shard-docs", 10, "--batch-tokens", 256]
    mpirun(2, args + ["--output", tmp_path / "ref"])
    ref, _ = read_results(tmp_path / "ref")
    out = tmp_path / "out"
    env = dict(os.environ, MPIEXEC_TIMEOUT="120")
    proc = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, "-m", "hpcllm", *map(str, args), "--output", out],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards = out / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and not (shards.exists() and len(os.listdir(shards)) >= 3):
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "hpcllm" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    os.kill(ranks[1].pid, signal.SIGKILL)
    proc.communicate(timeout=60)  # the whole job ends: no hang
    assert proc.returncode != 0
    assert not (out / "results.h5").exists()
    done = len(os.listdir(shards))
    assert 3 <= done < 40, done
    visible = [p for p in os.listdir(shards) if not p.startswith(".")]   # temporaries are hidden
    assert visible and all(p.startswith("shard-") and p.endswith(".h5") for p in visible)
    for p in visible:   # a final name only ever holds a complete shard file
        with h5py.File(shards / p, "r") as f:
            assert f["status"].shape == (int(f.attrs["n_docs"]),)
    rerun = mpirun(2, args + ["--output", out])
    assert not [p for p in os.listdir(shards) if p.startswith(".")]      # the rerun removed stale temporaries
    assert "already done" in rerun.stderr
    res, _ = read_results(out)
    for k in ref:
        np.testing.assert_array_equal(res[k], ref[k])


def test_inspect_results(tmp_path, tiny_bert_h5):
    src = write_jsonl(tmp_path / "c.jsonl", ["one", "two", "three"])
    mpirun(1, ["embed", "--model", tiny_bert_h5, "--input", src, "--output", tmp_path / "out"])
    proc = subprocess.run([sys.executable, "-m", "hpcllm", "inspect", tmp_path / "out" / "results.h5"],
                          capture_output=True, text=True, check=True)
    assert "embedding" in proc.stdout and "(3, 60)" in proc.stdout
