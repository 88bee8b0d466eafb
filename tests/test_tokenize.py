"""`hpcllm tokenize` end to end, and embed from its token shards: real MPI, real HDF5 files."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import corpora
from conftest import MPI_TIMEOUT, REPO, minilm_dir, mpirun
from hpcllm.store.tokens import open_token_dir, tokenizer_hash
from hpcllm.errors import HpcllmError
from hpcllm.status import Status

MAX_LEN = 64   # tiny_bert_h5's context, so some fortunes are truncated
BAD_LINES = [  # (line, status): every kind of bad input between real texts
    (b"this is not json", Status.BAD_JSON),
    (b'{"body": "no text field"}', Status.MISSING_FIELD),
    (b'{"text": "caf\xc3\xa9 \xff\xfe broken utf8"}', Status.BAD_UTF8),
    (b'{"text": "lone surrogate \\ud800 here"}', Status.BAD_UTF8),
    (b'{"text": ""}', Status.EMPTY),
    (b"", Status.BAD_JSON),
    (json.dumps({"text": "word " * 300}).encode(), Status.TRUNCATED),
]


def _corpus(path, n=150):
    """Real multilingual fortunes with the bad lines spread through; returns (texts or None, statuses)."""
    texts = corpora.mixed(n)
    lines, expected = [], []
    for i, t in enumerate(texts):
        lines.append(json.dumps({"text": t, "id": f"d{i}"}, ensure_ascii=False).encode())
        expected.append(None)
        if i % 20 == 7 and i // 20 < len(BAD_LINES):
            bad, status = BAD_LINES[i // 20]
            lines.append(bad)
            expected.append(status)
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return expected


def _shards(tok_dir):
    """Token shard contents concatenated in input order."""
    out = {k: [] for k in ("tokens", "lengths", "status", "doc_id", "line")}
    for name in sorted(os.listdir(os.path.join(tok_dir, "shards"))):
        with h5py.File(os.path.join(tok_dir, "shards", name), "r") as f:
            out["tokens"].append(f["tokens"][:])
            out["lengths"].append(np.diff(f["offsets"][:]))
            out["status"].append(f["status"][:])
            out["doc_id"] += list(f["doc_id"].asstr()[:])
            out["line"].append(f["line"][:])
            assert f["tokens"].compression == "gzip" and f["tokens"].shuffle and f["tokens"].dtype == np.int32
            assert f.attrs["max_length"] == MAX_LEN and len(f.attrs["tokenizer_hash"]) == 64
    return {k: np.concatenate(v) if k != "doc_id" else v for k, v in out.items()}


def _results(out):
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        return {k: f[k][:] for k in f.keys()}


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tiny_bert_h5):
    """The corpus tokenized at 2 ranks and at 1 rank (module-scoped: the runs are the slow part)."""
    d = tmp_path_factory.mktemp("tok")
    expected = _corpus(d / "c.jsonl")
    args = ["tokenize", "--model", tiny_bert_h5, "--input", d / "c.jsonl", "--shard-docs", 24,
            "--id-field", "id", "--progress", 0]
    mpirun(2, args + ["--output", d / "tok2"])
    mpirun(1, args + ["--output", d / "tok1"])
    return d, expected


def test_token_shards_equal_tokenizer_and_hf(tokenized):
    from tokenizers import Tokenizer as HFTokenizer

    from hpcllm.tokenizer import Tokenizer

    d, expected = tokenized
    two, one = _shards(d / "tok2"), _shards(d / "tok1")
    for k in two:   # 1 rank and 2 ranks write the same shards
        np.testing.assert_array_equal(np.asarray(two[k]), np.asarray(one[k]))
    lines = (d / "c.jsonl").read_bytes().split(b"\n")[:-1]
    good = [i for i, e in enumerate(expected) if e is None]
    texts = [json.loads(lines[i])["text"] for i in good]
    ours = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"), apply_file_settings=False).encode_batch(texts, max_length=MAX_LEN)
    hf = HFTokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
    hf.enable_truncation(MAX_LEN)
    hf.no_padding()
    hf_ids = [e.ids for e in hf.encode_batch(texts)]
    starts = np.concatenate(([0], np.cumsum(two["lengths"])))
    for j, i in enumerate(good):
        row = two["tokens"][starts[i]:starts[i + 1]].tolist()
        assert row == ours[j].tolist() == hf_ids[j], f"line {i + 1}"
        assert two["doc_id"][i] == f"d{j}"
    assert (two["lengths"] <= MAX_LEN).all() and (two["lengths"] == MAX_LEN).any()
    np.testing.assert_array_equal(two["line"], np.arange(1, len(lines) + 1))


def test_bad_lines_keep_their_rows(tokenized):
    d, expected = tokenized
    got = _shards(d / "tok2")
    assert len(got["status"]) == len(expected)
    for i, e in enumerate(expected):
        if e is not None:
            assert got["status"][i] == e, f"line {i + 1}: {Status(got['status'][i]).name} != {e.name}"
    bad = np.isin(got["status"], [Status.BAD_JSON, Status.MISSING_FIELD])
    assert bad.sum() == 3 and (got["lengths"][bad] == 0).all()    # no tokens for what was never read
    assert got["doc_id"][np.flatnonzero(bad)[0]] == f"c.jsonl:{np.flatnonzero(bad)[0] + 1}"
    info = json.loads((d / "tok2" / "tokens.json").read_text())
    assert info["n_docs"] == len(expected) and info["status_counts"]["BAD_JSON"] == 2
    assert info["n_tokens"] == int(got["lengths"].sum())


def test_embed_from_token_shards_equals_raw(tokenized, tiny_bert_h5):
    d, _ = tokenized
    common = ["embed", "--model", tiny_bert_h5, "--id-field", "id", "--shard-docs", 24, "--progress", 0]
    mpirun(2, common + ["--input", d / "c.jsonl", "--output", d / "raw"])
    mpirun(2, common + ["--input", d / "tok1", "--output", d / "fromtok"])
    raw, tok = _results(d / "raw"), _results(d / "fromtok")
    for k in ("status", "n_tokens", "doc_id", "line"):
        np.testing.assert_array_equal(tok[k], raw[k], err_msg=k)
    # same tokens; the shards (and so the batches, and the matmuls' shapes) differ: float rounding only
    np.testing.assert_allclose(tok["embedding"], raw["embedding"], rtol=0, atol=1e-6)
    assert np.isfinite(tok["embedding"][tok["status"] == Status.OK]).all()
    # `source` indexes the token shard files; each names its corpus file
    with h5py.File(d / "fromtok" / "results.h5", "r") as f:
        sources = json.loads(f.attrs["sources"])
    with h5py.File(sources[tok["source"][-1]], "r") as f:
        assert f.attrs["source_path"] == str(d / "c.jsonl")


def test_resume_skips_done_shards(tokenized, tiny_bert_h5):
    d, _ = tokenized
    out = d / "tok-resume"
    shutil.copytree(d / "tok2", out)      # a run that stopped after some shards
    os.remove(out / "tokens.json")
    for i in (1, 4):
        os.remove(out / "shards" / f"shard-{i:05d}.h5")
    with pytest.raises(HpcllmError, match="no tokens.json"):
        open_token_dir(str(out))
    before = {p: os.stat(out / "shards" / p).st_mtime_ns for p in os.listdir(out / "shards")}
    proc = mpirun(2, ["tokenize", "--model", tiny_bert_h5, "--input", d / "c.jsonl", "--shard-docs", 24,
                      "--id-field", "id", "--output", out])
    assert f"({len(before)} already done)" in proc.stderr
    assert before == {p: os.stat(out / "shards" / p).st_mtime_ns for p in before}
    for k, v in _shards(d / "tok2").items():
        np.testing.assert_array_equal(np.asarray(_shards(out)[k]), np.asarray(v))
    assert open_token_dir(str(out)).info["n_docs"] == len(_shards(out)["status"])


def test_mismatched_tokenizer_or_length_refused(tokenized, tiny_bert_h5):
    d, _ = tokenized
    # shards longer than the job allows: every rank refuses with one line
    proc = mpirun(2, ["embed", "--model", tiny_bert_h5, "--input", d / "tok2", "--output", d / "short",
                      "--max-length", 32], check=False)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("hpcllm: error:")]
    assert proc.returncode != 0 and len(errors) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "holds documents of up to 64 tokens, but this job allows 32" in errors[0]
    assert not os.path.exists(d / "short" / "manifest.json")
    # another tokenizer.json (same vocabulary, no lowercasing): refused by its hash
    tok = open_token_dir(str(d / "tok2"))
    text = open(os.path.join(minilm_dir(), "tokenizer.json"), encoding="utf-8").read()
    assert tok.info["tokenizer_hash"] == tokenizer_hash(text)
    spec = json.loads(text)
    spec["normalizer"]["lowercase"] = False
    with pytest.raises(HpcllmError, match="was tokenized with tokenizer sha .* but m.h5 uses"):
        tok.check(json.dumps(spec), MAX_LEN, "m.h5")
    tok.check(text, MAX_LEN, "m.h5")
    tok.check(text, None, "m.h5")        # score never truncates: any length is fine


def test_tokenize_never_imports_torch(tmp_path):
    """The tokenize job needs no model: it stays free of torch (~250 MiB per rank)."""
    _corpus(tmp_path / "c.jsonl", n=40)
    script = os.path.join(REPO, "tests", "mpi_scripts", "tokenize_without_torch.py")
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, script, "--tokenizer",
                           os.path.join(minilm_dir(), "tokenizer.json"), "--input", tmp_path / "c.jsonl",
                           "--output", tmp_path / "tok", "--progress", "0"], capture_output=True, text=True,
                          env=dict(os.environ, MPIEXEC_TIMEOUT=str(MPI_TIMEOUT)), timeout=MPI_TIMEOUT + 30)
    assert proc.returncode == 0, proc.stderr
    assert open_token_dir(str(tmp_path / "tok")).info["n_docs"] == 40 + 2
