"""`hpcllm report` on synthetic score-like results (flat token_logprobs, embeddings, an enum column,
per-shard seconds) and on a real `hpcllm embed` run: numbers on the page equal h5py's, the PNGs are
valid images, no network reference, and headless Chromium renders a non-blank page."""

import json
import os
import re
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from analysis_helpers import make_results, run_cli
from conftest import mpirun, write_jsonl
from hpcllm.analysis.sketch import RELATIVE_ERROR
from hpcllm.status import NOT_PROCESSED, Status

N = 3000


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    cols = make_results(d / "out", d / "corpus.jsonl", N, shard_docs=500, token_lp=True, dim=16, enum=True)
    proc = run_cli("report", d / "out", "--output", d / "page")
    assert proc.returncode == 0, proc.stderr
    return d, cols, proc.stdout


def page_data(page_dir):
    html = open(os.path.join(page_dir, "index.html"), encoding="utf-8").read()
    m = re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", html, re.S)
    return html, json.loads(m.group(1).replace("<\\/", "</"))


def check_images(page_dir, html):
    srcs = re.findall(r"src='([^']+)'", html)
    assert srcs
    for s in srcs:
        assert not re.match(r"^[a-z]+:|^//", s), s                 # relative: nothing from the network
        with open(os.path.join(page_dir, s), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image
        img = matplotlib.image.imread(os.path.join(page_dir, s))
        assert img.shape[0] > 100 and img.shape[1] > 300 and img.std() > 0.01
    assert not re.search(r"https?://|<link|@import|url\(", html)
    return srcs


def test_page_numbers_equal_h5py(synthetic):
    d, cols, stdout = synthetic
    html, data = page_data(d / "page")
    with h5py.File(d / "out" / "results.h5") as f:
        status, ppl, ntok = f["status"][:], f["perplexity"][:], f["n_tokens"][:]
        off, lp = f["token_offsets"][:], f["token_logprobs"][:]
    want = {Status(c).name: int(n) for c, n in enumerate(np.bincount(status)) if n}
    assert data["status_counts"] == want
    assert data["examples"]["BAD_JSON"] == [f"doc{i}" for i in np.flatnonzero(status == Status.BAD_JSON)[:5]]
    done = status != Status.BAD_JSON
    for name, x in (("perplexity", ppl[done]), ("n_tokens", ntok[done].astype(float))):
        st = data["numeric"][name]
        assert st["count"] == x.size and st["mean"] == pytest.approx(x.mean(), rel=1e-12)
        for p, v in st["quantiles"].items():
            assert abs(v - np.quantile(x, float(p))) <= RELATIVE_ERROR * abs(np.quantile(x, float(p))) * 1.01 + 1e-12
    lengths = np.diff(off)[done]
    assert data["ragged"]["token_logprobs"]["length"]["mean"] == pytest.approx(lengths.mean())
    assert data["ragged"]["token_logprobs"]["values"]["count"] == lp.size
    assert data["enums"]["finish_reason"] == {k: int((cols["finish_reason"][done] == i).sum())
                                              for i, k in enumerate(["stop", "length", "eos"])}
    norms = np.linalg.norm(cols["embedding"][done], axis=1)
    assert data["vectors"]["embedding"]["norm"]["mean"] == pytest.approx(norms.mean(), rel=1e-5)
    shards = data["dirs"][0]["shards"]
    assert len(shards) == N // 500 and max(shards, key=lambda r: r["seconds"])["shard"] == 1
    assert f"OK {want['OK']}" in stdout and "docs/s" in stdout
    check_images(d / "page", html)


def test_headless_chromium_renders_the_page(synthetic):
    assert shutil.which("chromium"), "Debian's chromium is not installed (tests/run.sh installs it)"
    d, _, _ = synthetic
    shot = d / "screenshot.png"                      # kept under the test's tmp dir as an artifact
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2000", f"file://{d / 'page' / 'index.html'}"],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image
    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1280)
    ink = (img.min(axis=2) < 0.9).mean()             # share of pixels that are not white
    assert 0.02 < ink < 0.9, ink


def test_real_embed_run(tmp_path, tiny_bert_h5):
    texts = [f"document number {i} " + "word " * (i % 13) for i in range(24)] + [""]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts, id_prefix="d")
    with open(corpus, "a") as f:
        f.write("{not json\n")
    mpirun(2, ["embed", "--model", tiny_bert_h5, "--input", corpus, "--output", tmp_path / "out",
               "--max-length", 32, "--progress", 0], timeout=240)
    proc = run_cli("report", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    html, data = page_data(tmp_path / "out" / "report")
    with h5py.File(tmp_path / "out" / "results.h5") as f:
        status, emb = f["status"][:], f["embedding"][:]
        timings = json.loads(f.attrs["timings"])
    assert data["status_counts"] == {Status(c).name: int(n) for c, n in enumerate(np.bincount(status)) if n}
    assert data["status_counts"]["BAD_JSON"] == 1
    ok = ~np.isnan(emb).any(axis=1)
    assert data["vectors"]["embedding"]["norm"]["count"] == ok.sum()
    assert data["dirs"][0]["throughput"]["docs"] == sum(r["docs"] for r in timings)
    assert "phases-embed.png" in check_images(tmp_path / "out" / "report", html)


def test_real_score_and_tokenize_runs(tmp_path, tiny_llama_h5):
    """report on real `score` results and on a `tokenize` directory (its results.h5 of per-document columns)."""
    texts = [f"text {i} " + "more words here " * (i % 9) for i in range(30)] + [""]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts, id_prefix="d")
    with open(corpus, "ab") as f:
        f.write(b'{"text": "bad \xff utf-8"}\n')
    mpirun(2, ["score", "--model", tiny_llama_h5, "--input", corpus, "--output", tmp_path / "score",
               "--progress", 0], timeout=240)
    mpirun(2, ["tokenize", "--model", tiny_llama_h5, "--input", corpus, "--output", tmp_path / "tok",
               "--progress", 0], timeout=240)
    for name, numeric in (("score", "perplexity"), ("tok", "n_tokens")):
        proc = run_cli("report", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
        html, data = page_data(tmp_path / name / "report")
        with h5py.File(tmp_path / name / "results.h5") as f:
            status, values = f["status"][:], f[numeric][:]
        assert data["status_counts"] == {Status(c).name: int(n) for c, n in enumerate(np.bincount(status)) if n}
        assert data["status_counts"]["BAD_UTF8"] == 1 and sum(data["status_counts"].values()) == 32
        done = ~np.isin(status, NOT_PROCESSED) & ~np.isnan(values.astype(float))
        assert data["numeric"][numeric]["count"] == done.sum() > 0
        assert data["numeric"][numeric]["mean"] == pytest.approx(values[done].mean(), rel=1e-12)
        check_images(tmp_path / name / "report", html)
    with h5py.File(tmp_path / "tok" / "results.h5") as f, h5py.File(tmp_path / "score" / "results.h5") as g:
        np.testing.assert_array_equal(f["doc_id"][:], g["doc_id"][:])
        assert np.all(f["n_tokens"][:] <= g["n_tokens"][:])      # score adds BOS where the template does not
