"""Repeated documents computed once (hpcllm/executor/repeats.py): embed, score, zero-shot classify and
greedy generate over a corpus whose documents repeat inside a shard and across shards give every copy
what computing it alone gives (`--repeats compute`, the same corpus); the rows filled that way are
counted; dp 2 (score, a long shard split into parts) equals 1 rank; sampled generation keeps each
copy's own seed unless `--repeats share` (which shares as greedy generation does)."""

import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from conftest import mpirun
from corpora import fortunes
from hpcllm.cli import run
from hpcllm.config import JobConfig
from hpcllm.corpus.readers import Docs
from hpcllm.corpus.shard import Shard
from hpcllm.executor.job import Job, ShardData, ShardResult
from hpcllm.executor.repeats import FILLED, Repeats, shares
from hpcllm.status import Status
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, STRING, Column, ragged, ragged_rows
from hpcllm.store.chunks import shard_attrs

SHARD_DOCS = 10
LONG_PROMPT = "x " * 200        # beyond generate's context: status too_long, given by the job


def _texts():
    """50 rows, shards of 10: 30 distinct short fortunes, 17 repeats of them (in the same shard and in later
    ones), a text too long for generate's context twice, a line without text."""
    short = [t for t in fortunes(limit=400) if 20 < len(t) < 120][:30]
    rng = np.random.default_rng(7)
    rows = short + [short[i] for i in rng.integers(0, 30, 17)] + [LONG_PROMPT] * 2
    rows = [rows[i] for i in rng.permutation(len(rows))]
    rows.insert(5, None)                                    # missing_field: not processed, nothing filled
    return rows


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t} if t is not None else {"body": 1}) + "\n" for t in texts),
                    encoding="utf-8")
    return str(path), texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("repeats") / "c.jsonl", _texts())


def _job(tmp_path, name, args, *more):
    out = tmp_path / f"{args[0]}-{name}"
    assert run([str(a) for a in [*args, "--output", out, "--shard-docs", SHARD_DOCS, "--progress", 0, *more]]) == 0
    return _read(out / "results.h5")


def _read(path):
    with h5py.File(path, "r") as f:
        cols = {k: f[k][()] for k in f}
        return cols, f.attrs.get(FILLED)


def _expected_filled(texts, processed):
    """Rows whose text an earlier processed row had (one group, a cache holding every result)."""
    seen, n = set(), 0
    for t, p in zip(texts, processed):
        if p:
            n += t in seen
            seen.add(t)
    return n


def _ragged(cols, flat, off):
    o = cols[off]
    return [cols[flat][o[i]:o[i + 1]] for i in range(len(o) - 1)]


def _same(a, b, name, tol):
    if a.dtype.kind in "fc":
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, equal_nan=True, err_msg=name)
    else:
        assert a.tolist() == b.tolist(), name


def _equal(shared, computed, tol=1e-5, ragged=()):
    """Every column of the shared run equals the computed one's (floats: within ``tol``, batching differs)."""
    offsets = {o for _, o in ragged}
    for name, a in shared.items():
        if name not in offsets and name not in dict(ragged):
            _same(a, computed[name], name, tol)
    for flat, off in ragged:
        for i, (x, y) in enumerate(zip(_ragged(shared, flat, off), _ragged(computed, flat, off))):
            _same(x, y, f"{flat}[{i}]", tol)


def test_copies_get_what_computing_them_gives(corpus, tmp_path, tiny_bert_h5, tiny_llama_h5, tiny_gen_h5):
    path, texts = corpus
    cases = [(["embed", "--model", tiny_bert_h5, "--input", path], ()),
             (["score", "--model", tiny_llama_h5, "--input", path, "--token-logprobs"],
              [("token_logprobs", "token_offsets")]),
             (["classify", "--model", tiny_llama_h5, "--input", path, "--labels", "cats,dogs,money"], ()),
             (["generate", "--model", tiny_gen_h5, "--input", path, "--temperature", 0, "--max-new-tokens", 6,
               "--logprobs"], [("output_ids", "output_offsets"), ("output_logprobs", "output_offsets")])]
    for args, ragged in cases:
        shared, filled = _job(tmp_path, "share", args)
        computed, none = _job(tmp_path, "compute", args, "--repeats", "compute")
        _equal(shared, computed, ragged=ragged)
        processed = shared["status"] != Status.MISSING_FIELD
        assert none is None and filled == _expected_filled(texts, processed) >= 18, args[0]
        if args[0] == "generate":                            # the too-long prompt's status reached its copy
            assert (shared["status"][[i for i, t in enumerate(texts) if t == LONG_PROMPT]] == Status.TOO_LONG).all()


def test_dp2_with_parts_equals_one_rank_and_cache_off_fills_within_shards(tmp_path, tiny_llama_h5):
    """Then a shard of 3 long fortunes, 7 repeats: wider than the context, split into parts at dp 2."""
    long = [t for t in fortunes(limit=3000) if 600 < len(t) < 900][:3]
    path, texts = _write(tmp_path / "c.jsonl", _texts() + [long[k % 3] for k in range(10)])
    args = ["score", "--model", tiny_llama_h5, "--input", path, "--token-logprobs"]
    one, filled_one = _job(tmp_path, "cache0", args, "--repeat-cache-mb", 0)
    mpirun(2, args + ["--output", tmp_path / "dp2", "--shard-docs", SHARD_DOCS, "--progress", 0])
    two, filled = _read(tmp_path / "dp2" / "results.h5")
    _equal(two, one, ragged=[("token_logprobs", "token_offsets")])
    assert any("parts" in a for a in shard_attrs(str(tmp_path / "dp2")))     # the long shard was split
    within = sum(_expected_filled(texts[a:a + SHARD_DOCS], [t is not None for t in texts[a:a + SHARD_DOCS]])
                 for a in range(0, len(texts), SHARD_DOCS))
    assert filled_one == within
    # dp 2 cuts 8 shards of 8 rows; each group fills at most what one group meeting every shard fills
    assert 0 < filled <= _expected_filled(texts, [t is not None for t in texts])


def test_sampled_copies_differ(corpus, tmp_path, tiny_gen_h5):
    path, texts = corpus
    args = ["generate", "--model", tiny_gen_h5, "--input", path, "--temperature", 1.0, "--max-new-tokens", 8,
            "--seed", 3]
    own, filled = _job(tmp_path, "auto", args)
    assert filled is None
    groups = {}
    for i, t in enumerate(texts):
        if t is not None and t != LONG_PROMPT:
            groups.setdefault(t, []).append(i)
    assert any(len({own["text"][i] for i in g}) > 1 for g in groups.values() if len(g) > 1)   # own seeds


@pytest.mark.parametrize("job,option,want", [("same", "auto", True), ("same", "share", True),
                                             ("same", "compute", False), ("seeded", "auto", False),
                                             ("seeded", "share", True), ("seeded", "compute", False),
                                             (None, "share", False)])
def test_who_shares(job, option, want):
    """Sampled generation ("seeded") shares only when asked; a job that never opted in never does."""
    assert shares(SimpleNamespace(repeats=job), JobConfig(repeats=option)) is want


class _SumJob(Job):
    """A job without a model: a row's results are functions of its ids (a vector, a string, ragged values,
    and status too_long past 5 ids), so what a group fills can be checked against computing it."""
    repeats = "same"

    def schema(self):
        return (Column("vec", np.float32, (2,), np.nan), Column("label", STRING, (), ""),
                ragged("lp", np.float32, "lp_offsets"), N_TOKENS) + BASE_COLUMNS

    def result(self, work):
        n = work.n_docs
        vec, label, lp, status = np.full((n, 2), np.nan, np.float32), np.full(n, "", object), [[]] * n, {}
        for r in work.process.tolist():
            d = work.doc(r)
            vec[r], label[r], lp[r] = (d.sum(), len(d)), f"first {d[0]}", d / 10
            if len(d) > 5:
                status[r] = Status.TOO_LONG
        flat, off = ragged_rows([np.asarray(x, np.float32) for x in lp], np.float32)
        return ShardResult({"vec": vec, "label": label, "lp": flat, "lp_offsets": off}, status)


def _shard(index, docs):
    ids = np.concatenate([np.array(d, np.int32) for d in docs])
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    n = len(docs)
    shard = Shard(index, "/c.jsonl", "jsonl", False, 0, 0, 0, n, 4 * index)
    status = np.zeros(n, np.uint8)
    return ShardData(shard, Docs([b"x"] * n, status, [f"{index}:{i}" for i in range(n)], np.arange(n), "/c.jsonl"),
                     ids, offsets, status.copy())


def test_groups_find_each_others_rows_in_the_shard_files(tmp_path):
    """Group A computes shard 0 and publishes its keys; group B, its cache empty, reads A's rows of
    shard 1's repeats from A's shard file; A finds them in its cache. Both equal computing every row."""
    job = _SumJob(JobConfig(output=str(tmp_path)), None)
    a, b = Repeats(job, job.cfg), Repeats(job, job.cfg)
    first = _shard(0, [[1, 2], [3, 4, 5], [1, 2], [9] * 7])
    a.key(first)                  # the prefetch thread's step
    work = a.narrow(first)
    assert work.process.tolist() == [0, 1, 3]
    job.write_shard(str(tmp_path), first, a.fill(first, job.result(work)), {})
    a.publish(first)
    docs = [[3, 4, 5], [7], [9] * 7, [7]]
    for group in (b, a):
        data = _shard(1, docs)
        group.key(data)
        work = group.narrow(data)
        assert work.process.tolist() == [1]
        got, want = group.fill(data, job.result(work)), job.result(data.for_workers())
        assert got.status == want.status == {2: Status.TOO_LONG} and got.attrs[FILLED] == 3
        for name, col in want.columns.items():
            assert got.columns[name].tolist() == col.tolist(), name
