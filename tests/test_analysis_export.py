"""`hpcllm export` round trips: pandas and DuckDB read the Parquet as is; rows, order and values equal the
HDF5 columns (flat token_logprobs as lists, embeddings as a fixed-size list); CSV and JSONL(.gz) too."""

import gzip
import json

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis_helpers import make_results, run_cli
from hpcllm.analysis.columns import Results, _concat
from hpcllm.analysis.export import export

N = 2500


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    make_results(d / "out", d / "corpus.jsonl", N, shard_docs=600, token_lp=True, dim=8, enum=True)
    with h5py.File(d / "out" / "results.h5") as f:
        h5 = {k: f[k][:] for k in f}
    return d, h5


def test_parquet_round_trip_pandas_and_duckdb(results):
    d, h5 = results
    out = d / "all.parquet"
    proc = run_cli("export", d / "out", "--output", out, "--row-group", 1000)
    assert proc.returncode == 0, proc.stderr
    assert pq.ParquetFile(out).metadata.num_row_groups >= 3
    df = pd.read_parquet(out)
    assert list(df.columns[:4]) == ["doc_id", "source", "line", "status"]
    assert list(df.doc_id) == [s.decode() for s in h5["doc_id"]]
    for k in ("status", "line", "source", "n_tokens", "finish_reason"):
        assert df[k].dtype == h5[k].dtype and np.array_equal(df[k].to_numpy(), h5[k])
    np.testing.assert_array_equal(df.perplexity.to_numpy(), h5["perplexity"])
    np.testing.assert_array_equal(np.stack(df.embedding.to_numpy()), h5["embedding"])
    off = h5["token_offsets"]
    for i in range(0, N, 97):
        np.testing.assert_array_equal(df.token_logprobs[i], h5["token_logprobs"][off[i]:off[i + 1]])
    import duckdb
    got = duckdb.sql(f"select count(*), sum(len(token_logprobs)), avg(perplexity) from '{out}'").fetchall()[0]
    assert got[0] == N and got[1] == off[-1]
    assert got[2] == pytest.approx(np.nanmean(h5["perplexity"]))
    assert duckdb.sql(f"select len(embedding) from '{out}' limit 1").fetchall()[0][0] == 8


def test_csv_and_jsonl_gz(results):
    d, h5 = results
    export([d / "out"], str(d / "s.csv"), ["doc_id", "perplexity", "token_logprobs"])
    df = pd.read_csv(d / "s.csv")
    assert list(df.doc_id) == [s.decode() for s in h5["doc_id"]]
    np.testing.assert_allclose(df.perplexity.to_numpy(), h5["perplexity"], rtol=1e-15)
    off = h5["token_offsets"]
    assert json.loads(df.token_logprobs[5]) == pytest.approx(h5["token_logprobs"][off[5]:off[6]].tolist())
    export([d / "out"], str(d / "s.jsonl.gz"), ["doc_id", "status", "perplexity"])
    rows = [json.loads(x) for x in gzip.open(d / "s.jsonl.gz", "rt")]
    assert [r["doc_id"] for r in rows] == [s.decode() for s in h5["doc_id"]]
    for r, p in zip(rows, h5["perplexity"]):
        assert (r["perplexity"] is None) if np.isnan(p) else r["perplexity"] == p


def test_old_vlen_token_logprobs_read_like_the_flat_pair(results, tmp_path):
    d, h5 = results
    res = Results(d / "out")
    flat = res.read(["token_logprobs"])["token_logprobs"]
    vlen = h5py.vlen_dtype(np.float32)
    with h5py.File(tmp_path / "results.h5", "w") as f:
        f["status"] = h5["status"]
        ds = f.create_dataset("token_logprobs", (N,), dtype=vlen)
        ds[...] = np.array(flat.rows() + [np.zeros(0, np.float32)], dtype=object)[:N]
        f.attrs["n_docs"] = N
    old = Results(tmp_path)
    parts = [b["token_logprobs"] for _, b in old.blocks(["token_logprobs"], rows=700)]
    got = _concat(parts, old.info("token_logprobs"))
    np.testing.assert_array_equal(got.offsets, flat.offsets)
    np.testing.assert_array_equal(got.values, flat.values)


def test_errors_are_one_line(results):
    d, _ = results
    for args, msg in ((["--columns", "doc_id,nope"], "unknown column 'nope'"), ([], None)):
        out = d / ("x.parquet" if msg else "x.xlsx")
        proc = run_cli("export", d / "out", "--output", out, *args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert (msg or "cannot tell the format") in proc.stderr
    proc = run_cli("export", d / "missing", "--output", d / "y.parquet")
    assert proc.returncode == 2 and "no results.h5" in proc.stderr


def test_notebook_api_reads_a_row_range_without_vectors(results):
    import hpcllm.results

    d, h5 = results
    r = hpcllm.results.open(d / "out")
    assert r.n_rows == N and "embedding" in r.names
    df = hpcllm.results.to_pandas(r, rows=slice(700, 1900))
    assert "embedding" not in df.columns and len(df) == 1200
    assert list(df.doc_id) == [s.decode() for s in h5["doc_id"][700:1900]]
    np.testing.assert_array_equal(df.perplexity.to_numpy(), h5["perplexity"][700:1900])
    off = h5["token_offsets"]
    assert [len(x) for x in df.token_logprobs] == list(np.diff(off)[700:1900])
    np.testing.assert_array_equal(df.token_logprobs.iloc[5], h5["token_logprobs"][off[705]:off[706]])
    emb = hpcllm.results.to_pandas(r, columns=["embedding"], rows=slice(0, 10), embeddings=True)
    np.testing.assert_array_equal(np.stack(emb.embedding.to_numpy()), h5["embedding"][:10])
    cols = r.read(["status", "n_tokens"], 2400)
    np.testing.assert_array_equal(cols["n_tokens"], h5["n_tokens"][2400:])
