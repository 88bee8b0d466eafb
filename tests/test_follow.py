"""Follow mode: files processed as they land, exactly once, across signals, kills and reruns."""

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

from conftest import MPI_TIMEOUT, REPO, mpirun
from hpcllm.corpus.plan import make_plan
from hpcllm.status import Status
from hpcllm.store.admissions import COMPACT_EVERY, Admissions
from hpcllm.store.layout import ADMISSIONS_NAME

COLS = ("status", "doc_id", "line", "source", "n_tokens")


def _lines(name, n):
    out = [json.dumps({"text": f"{name} document {i} " + "word " * (i % 7), "id": f"{name}-{i}"}) for i in range(n)]
    out[3] = "{not json"
    return "\n".join(out) + "\n"


def _deliver(directory, name, text):
    """The documented way: write under a hidden name, then rename into place."""
    tmp = os.path.join(directory, "." + name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(directory, name))


def _start(args, out_dir):
    env = dict(os.environ, MPIEXEC_TIMEOUT=str(MPI_TIMEOUT))
    cmd = ["mpiexec", "-n", "2", sys.executable, "-m", "hpcllm", *map(str, args), "--output", str(out_dir)]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(cond, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early: rc={proc.returncode}\n{proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _log_lines(out_dir):
    try:
        return [line for line in open(os.path.join(out_dir, ADMISSIONS_NAME)).read().split("\n") if line.strip()]
    except FileNotFoundError:
        return []


def _results(out_dir):
    with h5py.File(os.path.join(out_dir, "results.h5"), "r") as f:
        return {k: f[k][:] for k in (*COLS, "embedding")}, json.loads(f.attrs["sources"])


def _n_rows(out_dir):
    try:
        with h5py.File(os.path.join(out_dir, "results.h5"), "r") as f:
            return int(f.attrs["n_docs"])
    except (FileNotFoundError, OSError):
        return 0


def _n_done(out_dir):
    """Shards stored: shard files, and those consolidated into chunks."""
    from hpcllm.store.chunks import cover, list_chunks

    shards = out_dir / "shards"
    files = len([p for p in os.listdir(shards) if p.endswith(".h5")]) if shards.exists() else 0
    return files + sum(c.last - c.first + 1 for c in cover(list_chunks(str(out_dir)))[0])


def _same_as_static(tiny_bert_h5, files, out_dir, tmp_path):
    static_in = tmp_path / "static-in"
    static_in.mkdir(exist_ok=True)
    for p in files:
        os.link(p, static_in / os.path.basename(p))
    mpirun(2, ["embed", "--model", tiny_bert_h5, "--input", static_in, "--output", tmp_path / "static",
               "--progress", 0])
    got, sources = _results(out_dir)
    want, _ = _results(tmp_path / "static")
    assert [os.path.basename(s) for s in sources] == [os.path.basename(p) for p in files]
    for k in COLS:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    ok = got["status"] == Status.OK
    np.testing.assert_allclose(got["embedding"][ok], want["embedding"][ok], atol=1e-5)
    return got


def test_files_dropped_one_by_one(tmp_path, tiny_bert_h5):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    args = ["embed", "--model", tiny_bert_h5, "--input", incoming, "--follow", "--poll-s", 0.3,
            "--idle-exit", 4, "--shard-docs", 5, "--progress", 1]
    proc = _start(args, out)
    try:
        _deliver(incoming, "a.jsonl", _lines("a", 12))
        _wait(lambda: len(_log_lines(out)) == 1, proc)
        _wait(lambda: _n_rows(out) == 12, proc)          # a is done: results.h5 over its chunk, every row
        with h5py.File(out / "results.h5", "r") as f:
            assert (f["status"][:] != Status.MISSING).all() and not any((out / "shards").iterdir())
        _deliver(incoming, "b.jsonl", _lines("b", 9))
        _wait(lambda: len(_log_lines(out)) == 2, proc)
        # c is written in place, a line every 0.1 s for ~2 s (several polls): not read before it is whole
        with open(incoming / "c.jsonl", "w") as f:
            for line in _lines("c", 20).splitlines(keepends=True):
                f.write(line)
                f.flush()
                time.sleep(0.1)
        _, err = proc.communicate(timeout=MPI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "files admitted" in err and "lag" in err        # the progress line
    assert _log_lines(out) == []                              # compacted into the snapshot at the end
    snap = json.load(open(out / "manifest.json"))
    assert [os.path.basename(p) for p in snap["inputs"]] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert snap["follow"]["files"][2]["size"] == os.path.getsize(incoming / "c.jsonl")
    files = [str(incoming / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl")]
    got = _same_as_static(tiny_bert_h5, files, out, tmp_path)
    assert len(got["status"]) == 41 and (got["status"] == Status.BAD_JSON).sum() == 3
    assert len(set(got["doc_id"].tolist())) == 41             # every line once (a bad line's id is file:line)
    with h5py.File(out / "results.h5", "r") as f:            # each file's chunk merged into the last ones
        assert len(f["status"].virtual_sources()) <= 2 and not any((out / "shards").iterdir())


def test_marker_mode_waits_for_the_marker(tmp_path, tiny_bert_h5):
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    args = ["embed", "--model", tiny_bert_h5, "--input", incoming, "--follow", "--complete", "marker",
            "--poll-s", 0.2, "--idle-exit", 3, "--progress", 0]
    proc = _start(args, out)
    try:
        (incoming / "x.jsonl").write_text(_lines("x", 6)[:40])     # half written, paused, no marker
        time.sleep(1.5)
        assert _log_lines(out) == []
        (incoming / "x.jsonl").write_text(_lines("x", 6))
        (incoming / "x.jsonl.done").touch()
        _, err = proc.communicate(timeout=MPI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    got, _ = _results(out)
    assert len(got["status"]) == 6


def _rank_pids(proc):
    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if "hpcllm" in " ".join(p.cmdline())]


def test_signal_kill_and_rerun_exactly_once(tmp_path, tiny_bert_h5):
    """SIGUSR1 -> exit 75; rerun, SIGKILL one rank mid-file; rerun again with a file that landed in
    the gap: every file admitted once, every line once, results equal a static run."""
    incoming, out = tmp_path / "in", tmp_path / "out"
    incoming.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        _deliver(incoming, name, _lines(name[0], 60))
    args = ["embed", "--model", tiny_bert_h5, "--input", incoming, "--follow", "--poll-s", 0.2,
            "--shard-docs", 3, "--batch-tokens", 64, "--progress", 0]
    n_done = lambda: _n_done(out)  # noqa: E731

    proc = _start(args, out)              # 1: stopped by a signal to one rank
    _wait(lambda: n_done() >= 2, proc)
    os.kill(_rank_pids(proc)[1], signal.SIGUSR1)
    _, err = proc.communicate(timeout=MPI_TIMEOUT)
    assert proc.returncode == 75, err[-3000:]
    assert (out / "STOPPED.json").exists() and n_done() < 40

    proc = _start(args, out)              # 2: a rank killed mid-file
    first = n_done()
    _wait(lambda: n_done() >= first + 2, proc)
    os.kill(_rank_pids(proc)[0], signal.SIGKILL)
    proc.communicate(timeout=MPI_TIMEOUT)
    assert proc.returncode != 0 and n_done() < 40

    _deliver(incoming, "c.jsonl", _lines("c", 10))        # lands while nothing runs
    proc = _start(args + ["--idle-exit", 3], out)         # 3: finishes, admits c, exits 0 when idle
    _, err = proc.communicate(timeout=MPI_TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    snap = json.load(open(out / "manifest.json"))
    assert [os.path.basename(p) for p in snap["inputs"]] == ["a.jsonl", "b.jsonl", "c.jsonl"]   # each once
    assert err.count("follow: admitted") == 1             # only c was new to the third run
    _same_as_static(tiny_bert_h5, [str(incoming / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl")], out, tmp_path)


def test_admission_log_compacts_and_survives_a_torn_line(tmp_path):
    corpus = tmp_path / "f.jsonl"
    corpus.write_text(_lines("f", 7))
    st = os.stat(corpus)
    plan = list(make_plan([str(corpus)], 3))
    adm = Admissions(str(tmp_path / "out"), "m" * 64, "c" * 64)
    for _ in range(COMPACT_EVERY + 5):
        adm.admit(str(corpus), st.st_size, st.st_mtime_ns, plan)
    assert len(_log_lines(tmp_path / "out")) == 5          # folded into the snapshot at 64
    with open(tmp_path / "out" / ADMISSIONS_NAME, "a") as f:
        f.write('{"file_index": 69, "path": "x", "si')      # a crash mid-append
    again = Admissions(str(tmp_path / "out"), "m" * 64, "c" * 64)
    assert len(again.files) == COMPACT_EVERY + 5
    shards = again.shards
    assert [s.index for s in shards] == list(range(len(shards)))
    assert [s.row_start for s in shards] == list(np.cumsum([0] + [s.n_docs for s in shards])[:-1])
    assert {s.file_index for s in shards} == set(range(COMPACT_EVERY + 5))
    with pytest.raises(Exception, match="config_hash"):
        Admissions(str(tmp_path / "out"), "m" * 64, "d" * 64)


def test_changed_file_rows(tmp_path):
    from hpcllm.executor.follow import FollowShards

    corpus = tmp_path / "f.jsonl"
    corpus.write_text(_lines("f", 7))
    st = os.stat(corpus)
    adm = Admissions(str(tmp_path / "out"), "m" * 64, "c" * 64)
    entry = adm.admit(str(corpus), st.st_size, st.st_mtime_ns, list(make_plan([str(corpus)], 4)))
    shard = entry.shards[1]
    assert not FollowShards.changed(shard, entry)
    with open(corpus, "a") as f:
        f.write('{"text": "late"}\n')
    assert FollowShards.changed(shard, entry)
    data = FollowShards.changed_rows(shard)
    assert data.status.tolist() == [Status.CHANGED] * 3 and data.docs.line.tolist() == [5, 6, 7]
    assert len(data.process) == 0
