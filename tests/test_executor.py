"""The executor (hpcllm/executor) on real MPI: shared counters under contention, and the stop path.

A stop signal sent to ONE rank of a real `mpiexec -n 2 hpcllm JOB` must stop
every rank at a batch boundary: exit 75, OUT/STOPPED.json, only complete
shard files and no completion marker; rerunning the same command must skip
the complete shards and give files equal to an uninterrupted run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import psutil
import pytest

import corpora
from conftest import REPO, write_jsonl

from hpcllm.signals import EXIT_REQUEUE, read_stop_note

TIMEOUT = 120                       # MPIEXEC_TIMEOUT of every run; subprocess waits a little longer
COUNTERS = os.path.join(REPO, "tests", "mpi_scripts", "executor_counters.py")
SHARD_NAME = re.compile(r"shard-\d+\.h5")
# Shard-file attributes that say who computed a shard and when, not what it holds.
WHO_AND_WHEN = {"rank", "dp_rank", "host", "seconds", "finished_at"}


def _env():
    return dict(os.environ, MPIEXEC_TIMEOUT=str(TIMEOUT))


def _hpcllm(n, args):
    return ["mpiexec", "-n", str(n), sys.executable, "-m", "hpcllm", *map(str, args)]


def _run(n, args, cwd):
    return subprocess.run(_hpcllm(n, args), capture_output=True, text=True, timeout=TIMEOUT + 30, env=_env(), cwd=cwd)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc


# --- SharedCounters: every index handed out once, stop seen everywhere ----------

def test_shared_counters_hand_out_every_shard_once_under_contention(tmp_path):
    n_ranks, n_claims = 4, 20000
    proc = subprocess.run(["mpiexec", "-n", str(n_ranks), sys.executable, COUNTERS, str(tmp_path), str(n_claims)],
                          capture_output=True, text=True, timeout=TIMEOUT + 30, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"claims.{r}.json").read_text()) for r in range(n_ranks)]
    claims = [x["claims"] for x in reports]
    # Each rank stopped at its first index >= N; every other index it got was < N.
    assert all(c[-1] >= n_claims and all(i < n_claims for i in c[:-1]) for c in claims)
    everything = sorted(i for c in claims for i in c)
    # The union is exactly 0 .. N + ranks - 1: no index lost, none handed out twice.
    assert everything == list(range(n_claims + n_ranks))
    # Each caller's own claims increase (a fetch-and-add, not a stale read).
    assert all(c == sorted(c) for c in claims)
    # Under contention every rank won some (on 2 cores a rank may win only a few).
    assert all(len(c) > 1 for c in claims), [len(c) for c in claims]
    # Stop: 0 before anyone raised it; ranks 1..3 raised 11..13, so every rank sees the largest.
    assert {x["stop_before"] for x in reports} == {0}
    assert {x["stop_after"] for x in reports} == {10 + n_ranks - 1}
    # add_done(1, rank) on every rank, summed world-wide.
    assert {tuple(x["done"]) for x in reports} == {(n_ranks, sum(range(n_ranks)))}


# --- the stop path through real mpiexec ----------------------------------------

def _rank_pids(proc, out, n):
    """{rank: pid} of the hpcllm ranks that mpiexec ``proc`` started for output dir ``out``."""
    deadline = time.monotonic() + 30
    while True:
        ranks = {}
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "hpcllm" in p.cmdline() and str(out) in p.cmdline():
                    ranks[int(p.environ()["PMI_RANK"])] = p.pid
            except (psutil.NoSuchProcess, KeyError):
                pass
        if len(ranks) == n or time.monotonic() > deadline:
            assert sorted(ranks) == list(range(n)), ranks
            return ranks
        time.sleep(0.05)


def _run_and_stop(args, out, cwd, signum, rank, min_shards=1):
    """Start `mpiexec -n 2 hpcllm ARGS`; once ``min_shards`` shard files exist, send ``signum`` to one rank.

    Returns (exit code, stderr, {shard file name: mtime_ns} at the end).
    """
    proc = subprocess.Popen(_hpcllm(2, args), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        shards = out / "shards"
        deadline = time.monotonic() + TIMEOUT
        while not (shards.exists() and len([p for p in os.listdir(shards) if SHARD_NAME.fullmatch(p)]) >= min_shards):
            if proc.poll() is not None:
                raise AssertionError(f"ended (exit {proc.returncode}) before writing a shard\n{proc.communicate()[1]}")
            assert time.monotonic() < deadline, "no shard file appeared"
            time.sleep(0.02)
        os.kill(_rank_pids(proc, out, 2)[rank], signum)
        _, err = proc.communicate(timeout=TIMEOUT + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err, {p: os.stat(shards / p).st_mtime_ns for p in os.listdir(shards)}


def _check_stopped(rc, err, out, left, n_shards, signum, marker):
    assert rc == EXIT_REQUEUE, err[-6000:]
    assert "stopped early by a signal" in err
    note = read_stop_note(out)
    assert note is not None and note["signal"] == signal.Signals(signum).name
    assert note["shards_total"] == n_shards
    # Only complete shard files are left (no temporaries) and no completion marker.
    assert all(SHARD_NAME.fullmatch(p) for p in left), sorted(left)
    # The signal came right after the first shard file: both ranks stopped within a few shards. (Had the
    # unsignalled rank gone on, it would have done all but the dropped shard.)
    assert 1 <= len(left) <= n_shards // 2, (len(left), n_shards)
    assert not (out / marker).exists()
    for name in left:   # each one readable, holding the documents of its plan
        with h5py.File(out / "shards" / name, "r") as f:
            assert f["status"].shape == (int(f.attrs["n_docs"]),)


def _check_resumed(proc, out, left):
    _ok(proc)
    done = [int(m) for m in re.findall(r"\((\d+) already done\)", proc.stderr)]
    assert done == [len(left)], proc.stderr[-3000:]
    # The rerun did not rewrite the shards the stopped run had completed: token shards stay; a result
    # job's went into chunks at the end, which keep when each shard was written.
    from hpcllm.store.chunks import shard_attrs

    kept = {p: os.stat(out / "shards" / p).st_mtime_ns for p in left if (out / "shards" / p).exists()}
    if kept != left:
        at = {int(a["shard_index"]): float(a["finished_at"]) for a in shard_attrs(str(out))}
        old = {int(re.search(r"\d+", p).group()) for p in left}
        assert not kept and len(at) == _n_shards(out)
        assert max(at[i] for i in old) < min(t for i, t in at.items() if i not in old)


def _datasets(f):
    names = []
    f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
    return sorted(names)


def _same_datasets(path_a, path_b, required=()):
    with h5py.File(path_a, "r") as a, h5py.File(path_b, "r") as b:
        names = _datasets(a)
        assert names == _datasets(b) and set(required) <= set(names), (names, _datasets(b))
        for n in names:
            np.testing.assert_array_equal(a[n][()], b[n][()], err_msg=f"{path_b}: {n}")
        return dict(a.attrs), dict(b.attrs)


def _n_shards(out):
    return len(json.loads((out / "manifest.json").read_text())["shards"])


@pytest.fixture(scope="module")
def tokenize_corpus(tmp_path_factory):
    """1,600 real multilingual lines, cut into 200 shards of 8 documents."""
    d = tmp_path_factory.mktemp("tokcorpus")
    return write_jsonl(d / "corpus.jsonl", corpora.mixed(1600), id_prefix="d")


def test_tokenize_usr1_to_one_rank_stops_all_and_rerun_equals_uninterrupted(tmp_path, minilm_h5, tokenize_corpus):
    args = ["tokenize", "--model", minilm_h5, "--input", tokenize_corpus, "--shard-docs", 8, "--progress", 0]
    ref, out = tmp_path / "ref", tmp_path / "out"
    rc, err, left = _run_and_stop([*args, "--output", out], out, tmp_path, signal.SIGUSR1, rank=1)
    n_shards = _n_shards(out)
    assert n_shards == 200
    _check_stopped(rc, err, out, left, n_shards, signal.SIGUSR1, "tokens.json")

    _check_resumed(_run(2, [*args, "--output", out], tmp_path), out, left)
    _ok(_run(2, [*args, "--output", ref], tmp_path))

    names = sorted(os.listdir(ref / "shards"))
    assert len(names) == n_shards and sorted(os.listdir(out / "shards")) == names
    for name in names:
        a, b = _same_datasets(ref / "shards" / name, out / "shards" / name,
                              required=("tokens", "offsets", "status", "doc_id", "line"))
        assert {k: a[k] for k in a if k not in WHO_AND_WHEN} == {k: b[k] for k in b if k not in WHO_AND_WHEN}, name
    info_ref, info = (json.loads((d / "tokens.json").read_text()) for d in (ref, out))
    for x in (info_ref, info):   # what differs between two runs: when, how long, and where to
        del x["finished"], x["timings"], x["config"]["output"]
    assert info == info_ref and info["n_docs"] == 1600 and info["n_shards"] == n_shards


def test_embed_term_to_one_rank_stops_all_and_rerun_equals_uninterrupted(tmp_path, tiny_bert_h5):
    src = write_jsonl(tmp_path / "c.jsonl", corpora.mixed(240))
    args = ["embed", "--model", tiny_bert_h5, "--input", src, "--shard-docs", 8, "--batch-tokens", 256,
            "--progress", 0]
    ref, out = tmp_path / "ref", tmp_path / "out"
    rc, err, left = _run_and_stop([*args, "--output", out], out, tmp_path, signal.SIGTERM, rank=0)
    n_shards = _n_shards(out)
    assert n_shards == 30
    _check_stopped(rc, err, out, left, n_shards, signal.SIGTERM, "results.h5")

    _check_resumed(_run(2, [*args, "--output", out], tmp_path), out, left)
    _ok(_run(2, [*args, "--output", ref], tmp_path))
    _same_datasets(ref / "results.h5", out / "results.h5", required=("embedding", "status", "doc_id"))


def test_job_statuses_merge_with_the_readers_the_more_severe_standing(tmp_path):
    """ShardResult.status: a job's status for a row replaces the reader's unless the reader's says more
    (not processed > bad UTF-8 > truncated > ok / empty)."""
    import h5py
    import numpy as np

    from hpcllm.corpus.plan import make_plan
    from hpcllm.corpus.readers import read_docs
    from hpcllm.executor.job import Job, ShardData, ShardResult
    from hpcllm.status import Status as S
    from hpcllm.store.layout import shard_file
    from hpcllm.store.results import BASE_COLUMNS, N_TOKENS

    class Statuses(Job):
        def schema(self):
            return (N_TOKENS,) + BASE_COLUMNS

    (tmp_path / "c.jsonl").write_text("".join('{"text": "d%d"}\n' % i for i in range(6)))
    shard = make_plan(str(tmp_path / "c.jsonl"))[0]
    reader = np.array([S.OK, S.EMPTY, S.TRUNCATED, S.BAD_UTF8, S.TOO_LONG, S.OK], np.uint8)
    data = ShardData(shard, read_docs(shard), np.zeros(0, np.int32), np.zeros(7, np.int64), reader)
    job_says = {0: S.TRUNCATED, 1: S.TOO_LONG, 2: S.TOO_LONG, 3: S.TRUNCATED, 4: S.TRUNCATED}
    Statuses(None, None).write_shard(str(tmp_path / "out"), data, ShardResult({}, job_says, {"x": 1}), {"rank": 0})
    with h5py.File(shard_file(str(tmp_path / "out"), shard.index), "r") as f:
        assert f["status"][()].tolist() == [S.TRUNCATED, S.TOO_LONG, S.TOO_LONG, S.BAD_UTF8, S.TOO_LONG, S.OK]
        assert (int(f.attrs["x"]), int(f.attrs["rank"])) == (1, 0)
    assert data.status.tolist() == reader.tolist()      # the reader's statuses are not modified
