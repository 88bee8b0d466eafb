"""Result shard files and the VDS master, written and read back with h5py."""

import json
import os
import resource
import shutil

import h5py
import numpy as np
import pytest

from hpcllm.corpus.plan import make_plan
from hpcllm.corpus.readers import read_docs
from hpcllm.errors import HpcllmError
from hpcllm.status import Status as S
from hpcllm.status import status_counts
from hpcllm.inspect import summarize
from hpcllm.store.chunks import open_shard
from hpcllm.store.layout import shard_file
from hpcllm.store.master import build_master
from hpcllm.store.results import (BASE_COLUMNS, N_TOKENS, Column, base_columns, ragged, ragged_rows, read_dataset,
                                   write_shard)

DIM = 8


def embed_schema(dim, dtype="float32"):
    """The embed job's columns (hpcllm.jobs.embed), without importing torch."""
    return (Column("embedding", np.dtype(dtype), (dim,), np.nan), N_TOKENS) + BASE_COLUMNS


def _corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b"".join(
        b'{"text": "doc %d", "id": "a-%d"}\n' % (i, i) for i in range(23)) + b"not json\n{}\n")
    (d / "b.txt").write_bytes("z\u00fcrich \u65e5\u672c\n".encode() + b"\n\xff\n" + "\u65e5\u672c\n".encode())
    return make_plan(str(d), shard_docs=7)


def _fake_outputs(shard, docs, dtype="float32"):
    """Deterministic per-row values standing in for the model's output."""
    rows = np.arange(shard.row_start, shard.row_start + shard.n_docs)
    cols = base_columns(shard, docs)
    cols["embedding"] = (rows[:, None] * 10 + np.arange(DIM)).astype(dtype)
    cols["n_tokens"] = np.array([len(t) for t in docs.texts], np.int32)
    return cols


def _write_all(out, plan, dtype="float32"):
    schema = embed_schema(DIM, dtype)
    expect = {c.name: [] for c in schema}
    for s in plan:
        cols = _fake_outputs(s, read_docs(s, id_field="id"), dtype)
        write_shard(out, s, cols, attrs={"rank": 0, "timings": {"read": 0.1}}, schema=schema)
        for k, v in cols.items():
            expect[k].append(np.asarray(v))
    return schema, {k: np.concatenate(v) for k, v in expect.items()}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_master_equals_concatenation(tmp_path, dtype):
    plan = _corpus(tmp_path)
    out = str(tmp_path / "out")
    schema, expect = _write_all(out, plan, dtype)
    attrs = {"model": "minilm", "model_hash": "abc", "config": {"tp": 2, "max_tokens": 4096},
             "world": {"dp": 2, "tp": 2}}
    path = build_master(out, plan, schema, attrs)
    assert path == os.path.join(out, "results.h5")
    assert sorted(os.listdir(out)) == ["chunks", "results.h5", "shards"]  # no temporaries
    assert os.listdir(os.path.join(out, "shards")) == []                  # consolidated into one chunk, then gone
    # move the whole output dir and read from another cwd: relative VDS paths still resolve
    moved = str(tmp_path / "moved")
    shutil.move(out, moved)
    cwd = os.getcwd()
    os.chdir("/")
    try:
        with h5py.File(os.path.join(moved, "results.h5"), "r") as f:
            n = sum(s.n_docs for s in plan)
            assert f["embedding"].shape == (n, DIM) and f["embedding"].dtype == np.dtype(dtype)
            assert f["embedding"].is_virtual and len(f["embedding"].virtual_sources()) == 1
            assert (f["embedding"][:] == expect["embedding"]).all()
            for name in ("n_tokens", "status", "line", "source"):
                assert (f[name][:] == expect[name]).all(), name
                assert f[name].dtype == expect[name].dtype
            ids = f["doc_id"].asstr()[:].tolist()
            assert ids == expect["doc_id"].tolist()
            assert ids[:2] == ["a-0", "a-1"] and ids[23:25] == ["a.jsonl:24", "a.jsonl:25"]
            assert f.attrs["model"] == "minilm" and json.loads(f.attrs["config"]) == {"max_tokens": 4096, "tp": 2}
            assert f.attrs["n_docs"] == n and f.attrs["format"] == "hpcllm-results"
            counts = json.loads(f.attrs["status_counts"])
            assert counts == {"OK": 25, "EMPTY": 1, "BAD_JSON": 1, "MISSING_FIELD": 1, "BAD_UTF8": 1}
            assert json.loads(f.attrs["sources"]) == plan.inputs
            assert f["source"][-1] == 1 and f["line"][-1] == 4
    finally:
        os.chdir(cwd)
    with h5py.File(os.path.join(moved, "chunks", f"chunk-00000-{len(plan) - 1:05d}.h5"), "r") as f:
        assert f["status"].compression == "gzip" and f["status"].shuffle
        assert f["embedding"].compression is None
    with open_shard(moved, plan[1]) as f:      # a shard's own attributes and rows, kept in the chunk
        assert f.attrs["row_start"] == plan[1].row_start and f.attrs["rank"] == 0
        assert json.loads(f.attrs["timings"]) == {"read": 0.1}
        assert (f["embedding"][()] == expect["embedding"][plan[1].row_start:plan[2].row_start]).all()


def test_missing_or_bad_source_is_detected(tmp_path):
    plan = _corpus(tmp_path)
    out = str(tmp_path / "out")
    schema, _ = _write_all(out, plan)
    os.unlink(shard_file(out, 2))
    with pytest.raises(HpcllmError, match=r"^cannot build .*results\.h5: .*shard-00002\.h5 missing; rerun"):
        build_master(out, plan, schema)
    open(shard_file(out, 2), "wb").write(b"garbage")
    os.unlink(shard_file(out, 3))
    with pytest.raises(HpcllmError, match=r"shard-00002\.h5 is not a readable HDF5 file .*\(and 1 more\)"):
        build_master(out, plan, schema)
    # a shard written with the wrong shape or dtype is refused too
    docs = read_docs(plan[2])
    cols = _fake_outputs(plan[2], docs)
    cols["embedding"] = cols["embedding"][:, :4]
    write_shard(out, plan[2], cols)
    write_shard(out, plan[3], _fake_outputs(plan[3], read_docs(plan[3]), "float16"))
    with pytest.raises(HpcllmError, match=r"shard-00002\.h5 dataset embedding has shape \(7, 4\), expected \(7, 8\)"):
        build_master(out, plan, schema)
    write_shard(out, plan[2], _fake_outputs(plan[2], docs))
    with pytest.raises(HpcllmError, match=r"shard-00003\.h5 dataset embedding has dtype float16, expected float32"):
        build_master(out, plan, schema)
    write_shard(out, plan[3], _fake_outputs(plan[3], read_docs(plan[3])))
    build_master(out, plan, schema)
    chunk = os.path.join(out, "chunks", os.listdir(os.path.join(out, "chunks"))[0])
    os.unlink(chunk)
    # what HDF5 does on its own: a missing source reads as the fill values
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        assert (f["status"][:] == S.MISSING).all() and np.isnan(f["embedding"][:]).all()
        assert (f["n_tokens"][:] == -1).all() and (f["line"][:] == -1).all()
        assert f["doc_id"].asstr()[:3].tolist() == [""] * 3


def test_write_is_atomic(tmp_path):
    plan = _corpus(tmp_path)
    out = str(tmp_path / "out")
    schema = embed_schema(DIM)
    s = plan[0]
    cols = _fake_outputs(s, read_docs(s))
    bad = dict(cols, n_tokens=np.array(["x"] * s.n_docs, dtype=object))   # fails mid-write
    with pytest.raises(Exception):
        write_shard(out, s, bad, schema=schema)
    assert os.listdir(os.path.join(out, "shards")) == []                  # neither final nor temp file
    write_shard(out, s, cols, schema=schema)
    with pytest.raises(Exception):
        write_shard(out, s, bad, schema=schema)
    assert os.listdir(os.path.join(out, "shards")) == ["shard-00000.h5"]  # the good file survives
    with h5py.File(shard_file(out, 0), "r") as f:
        assert (f["n_tokens"][:] == cols["n_tokens"]).all()
    with pytest.raises(ValueError, match="column embedding has shape"):
        write_shard(out, s, dict(cols, embedding=cols["embedding"][:3]), schema=schema)
    with pytest.raises(ValueError, match="!= schema"):
        write_shard(out, s, {"status": cols["status"]}, schema=schema)


def test_empty_plan_and_counts(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    schema = embed_schema(4)
    path = build_master(out, [], schema, {"model": "m"})
    with h5py.File(path, "r") as f:
        assert f["embedding"].shape == (0, 4) and f["doc_id"].shape == (0,)
    assert status_counts(np.array([0, 0, 5, 255, 3], np.uint8)) == {"OK": 2, "BAD_JSON": 1, "BAD_UTF8": 1, "MISSING": 1}
    assert [c.name for c in BASE_COLUMNS] == ["status", "doc_id", "line", "source"]
    from hpcllm.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["embed", "--out-dtype", "float64"])


def test_summarize(tmp_path):
    plan = _corpus(tmp_path)
    out = str(tmp_path / "out")
    schema, _ = _write_all(out, plan)
    path = build_master(out, plan, schema, {"model": "minilm", "config": {"tp": 2}})
    text = summarize(path)
    assert "model = minilm" in text and 'config = {"tp": 2}' in text
    assert f"embedding  shape=(29, {DIM})  dtype=float32  (virtual, 1 sources)" in text
    assert 'status counts: {"OK": 25, "EMPTY": 1, "BAD_JSON": 1, "MISSING_FIELD": 1, "BAD_UTF8": 1}' in text
    chunk = os.path.join(out, "chunks", os.listdir(os.path.join(out, "chunks"))[0])
    assert "status  shape=(29,)  dtype=uint8  (compression=gzip)" in summarize(chunk)
    with pytest.raises(HpcllmError, match="cannot open .*nothing.h5 as HDF5"):
        summarize(str(tmp_path / "nothing.h5"))


def test_many_shards_under_a_low_open_file_limit(tmp_path):
    """HDF5 silently fills VDS rows whose source it cannot open (ulimit -n): 150 shard files are one
    chunk, so a plain read is exact under a low limit, as read_dataset and summarize are."""
    d = tmp_path / "c.txt"
    d.write_bytes(b"".join(b"line %d\n" % i for i in range(150)))
    plan = make_plan(str(d), shard_docs=1)
    out = str(tmp_path / "out")
    schema = embed_schema(2)
    for s in plan:
        cols = base_columns(s, read_docs(s))
        cols["embedding"] = np.full((1, 2), s.index, np.float32)
        cols["n_tokens"] = np.ones(1, np.int32)
        write_shard(out, s, cols, schema=schema)
    path = build_master(out, plan, schema)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 90, hard))
    try:
        with h5py.File(path, "r") as f:
            assert (f["status"][:] == S.OK).all() and (f["embedding"][:, 0] == np.arange(150)).all()
        with h5py.File(path, "r") as f:
            emb = read_dataset(f, "embedding")
            assert (emb[:, 0] == np.arange(150)).all() and (emb[:, 1] == np.arange(150)).all()
            assert (read_dataset(f, "status") == S.OK).all()
            assert read_dataset(f, "doc_id")[-1] == b"c.txt:150"
        assert 'status counts: {"OK": 150}' in summarize(path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_ragged_columns_join_in_input_order(tmp_path):
    """Flat per-token values + offsets per shard read back, through the master, as one flat run in input order."""
    plan = _corpus(tmp_path)
    out = str(tmp_path / "out")
    schema = (ragged("token_logprobs", np.float32, "token_offsets"), N_TOKENS) + BASE_COLUMNS
    rng = np.random.default_rng(0)
    expect = []
    for s in plan:
        cols = base_columns(s, read_docs(s, id_field="id"))
        rows = [rng.standard_normal(int(rng.integers(0, 5))).astype(np.float32) for _ in range(s.n_docs)]
        cols["token_logprobs"], cols["token_offsets"] = ragged_rows(rows, np.float32)
        cols["n_tokens"] = np.array([len(r) for r in rows], np.int32)
        write_shard(out, s, cols, schema=schema)
        expect += rows
    with pytest.raises(ValueError, match="token_offsets ends at"):
        bad = dict(cols, token_logprobs=cols["token_logprobs"][:-1] if len(cols["token_logprobs"]) else np.ones(1))
        write_shard(str(tmp_path / "bad"), s, bad, schema=schema)
    path = build_master(out, plan, schema, {})
    with h5py.File(path, "r") as f:
        flat, offsets = f["token_logprobs"][:], f["token_offsets"][:]
        assert f["token_logprobs"].is_virtual and not f["token_offsets"].is_virtual
    assert len(offsets) == len(expect) + 1 and offsets[0] == 0
    for i, row in enumerate(expect):
        np.testing.assert_array_equal(flat[offsets[i]:offsets[i + 1]], row)


def test_column_attributes_reach_the_master(tmp_path):
    """A Column's attrs are the master dataset's attributes (what a reader needs: names of codes or classes),
    set when the master is built, so no job reopens results.h5 to add them."""
    plan = _corpus(tmp_path)
    names = json.dumps(["négatif", "positif"], ensure_ascii=False)
    schema = (Column("embedding", np.float32, (DIM,), np.nan, attrs={"names": names, "scale": 2}),
              N_TOKENS) + BASE_COLUMNS
    out = str(tmp_path / "out")
    for s in plan:
        cols = _fake_outputs(s, read_docs(s, id_field="id"))
        write_shard(out, s, cols, schema=schema)
    path = build_master(out, plan, schema)
    with h5py.File(path, "r") as f:
        assert json.loads(f["embedding"].attrs["names"]) == ["négatif", "positif"]
        assert int(f["embedding"].attrs["scale"]) == 2
        assert dict(f["status"].attrs) == {}
