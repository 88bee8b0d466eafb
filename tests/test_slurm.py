"""Slurm: the launch check and provenance, and the sbatch templates on a real one-node cluster.

slurm/hpcllm.sbatch is the one template (`sbatch slurm/hpcllm.sbatch JOB
ARGS...`); embed.sbatch, score.sbatch, tokenize.sbatch and embed-array.sbatch
are thin wrappers that source it. The cluster tests start Slurm with
slurm/start-test-cluster.sh (root only; skipped otherwise). They submit the
real templates in slurm/ with HPCLLM_CMD pointing at this file, which, run as
a script, is a small stand-in for `hpcllm JOB`: an MPI program that reports
its world and Slurm provenance, works through resumable steps, and stops on a
signal with EXIT_REQUEUE. The real embed and tokenize jobs run through
sbatch too, and must give files equal to `mpiexec`.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
SLURM_DIR = os.path.join(REPO, "slurm")
JOB_TIMEOUT = 300   # no sbatch --wait or poll may hang a test run for longer


# --- hpcllm.world.slurm without a cluster --------------------------------------

def test_check_launch_refuses_slurm_tasks_with_a_world_of_one():
    from hpcllm.world.launch import check_launch
    from hpcllm.errors import HpcllmError

    env = {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "SLURMD_NODENAME": "n7"}
    with pytest.raises(HpcllmError, match=r"srun --mpi=pmi2.*mpi4py.*PMI") as e:
        check_launch(1, env)
    assert "4 tasks" in str(e.value) and "task 2 on n7" in str(e.value) and "\n" not in str(e.value)
    check_launch(4, env)                              # srun with PMI: fine
    check_launch(1, {})                               # not in Slurm
    check_launch(1, {"SLURM_NTASKS": "1"})
    # mpiexec inside a -n 4 allocation runs its own 1-task step (hydra's proxy):
    check_launch(1, {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"})


def test_provenance_only_what_slurm_set():
    from hpcllm.world.slurm import provenance

    assert provenance({}) == {}
    assert provenance({"SLURM_JOB_ID": "17", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "vm"}) == {
        "job_id": 17, "ntasks": 2, "nodelist": "vm", "restart_count": 0}
    env = {"SLURM_JOB_ID": "21", "SLURM_ARRAY_JOB_ID": "20", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_RESTART_COUNT": "3", "SLURM_JOB_NAME": "hpcllm-embed"}
    assert provenance(env) == {"job_id": 21, "array_job_id": 20, "array_task_id": 1, "restart_count": 3,
                               "job_name": "hpcllm-embed"}


# --- the templates as files ----------------------------------------------------

TEMPLATES = ["hpcllm.sbatch", "embed.sbatch", "score.sbatch", "tokenize.sbatch", "embed-array.sbatch", "follow.sbatch"]
DIRECTIVES = ["--requeue", "--signal=B:USR1@300", "--open-mode=append", "--export=ALL"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_asks_for_requeue_signal_and_append(name):
    path = os.path.join(SLURM_DIR, name)
    text = open(path).read()
    directives = [line.split(None, 1)[1].strip() for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert all(d in directives for d in DIRECTIVES), directives
    job = "hpcllm" if name == "hpcllm.sbatch" else "hpcllm-" + name.removesuffix(".sbatch")
    assert f"--job-name={job}" in directives
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if name != "hpcllm.sbatch":   # a wrapper: the run logic lives once, in hpcllm.sbatch
        assert ". \"$d/hpcllm.sbatch\"" in text and "srun" not in text and "trap" not in text


def test_the_one_template_holds_the_signal_and_requeue_logic():
    text = open(os.path.join(SLURM_DIR, "hpcllm.sbatch")).read()
    for needle in ("srun --mpi=pmi2 ${HPCLLM_SRUN_ARGS:-} ${HPCLLM_CMD:-hpcllm}", "trap '_hpcllm_forward USR1' USR1",
                   "trap '_hpcllm_forward TERM' TERM", "HPCLLM_EXIT_REQUEUE=75", 'scontrol requeue "${SLURM_JOB_ID}"',
                   "HPCLLM_MAX_RESTARTS", "HPCLLM_SLURM_DIR"):
        assert needle in text, needle


def test_follow_template_runs_follow_mode_with_a_time_limit():
    text = open(os.path.join(SLURM_DIR, "follow.sbatch")).read()
    assert '. "$d/hpcllm.sbatch" "$job" --follow "$@"' in text
    assert "#SBATCH --time=" in text and ': "${HPCLLM_MAX_RESTARTS:=1000}"' in text


def test_tokenize_template_does_not_advertise_tp():
    text = open(os.path.join(SLURM_DIR, "tokenize.sbatch")).read()
    assert "--tp" not in text and "tokenize.sbatch" in text and "--tokenizer" in text


@pytest.mark.parametrize("template", ["hpcllm.sbatch", "follow.sbatch"])
@pytest.mark.parametrize("args", [[], ["--model", "M.h5"]])
def test_template_without_a_job_prints_usage(args, template):
    # Refused before anything Slurm is needed: it runs outside a job too.
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, template), *args], capture_output=True, text=True,
                       timeout=30, env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert r.returncode == 2 and "usage: sbatch" in r.stderr and f"{template} JOB" in r.stderr, r.stderr


# --- the one-node cluster ------------------------------------------------------

@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the one-node cluster (stopped again at the end if this session started it)."""
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm test cluster needs root (starts munged, slurmctld, slurmd)")
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "start-test-cluster.sh")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"slurm/start-test-cluster.sh failed:\n{r.stdout}\n{r.stderr}"
    yield r.stdout
    if "already up" not in r.stdout:   # leave a cluster someone else started running
        subprocess.run(["bash", os.path.join(SLURM_DIR, "stop-test-cluster.sh")], capture_output=True, timeout=120)


@pytest.mark.slurm
def test_start_script_is_idempotent(slurm_cluster):
    t0 = time.monotonic()
    r = subprocess.run(["bash", os.path.join(SLURM_DIR, "start-test-cluster.sh")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "already up" in r.stdout, r.stdout + r.stderr
    assert time.monotonic() - t0 < 10
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c %T"], capture_output=True, text=True, timeout=30)
    name, cpus, state = nodes.stdout.split()
    # The node advertises 4 CPUs whatever the machine has, so tests can run -n 4.
    assert cpus == os.environ.get("SLURM_TEST_CPUS", "4") and state in ("idle", "mixed", "allocated"), nodes.stdout


def _fake_env(**extra):
    return dict(os.environ, HPCLLM_CMD=f"{sys.executable} {HERE}", **extra)


def _sbatch(args, tmp_path, env, cwd=None):
    """Submit ``sbatch ARGS`` to run in tmp_path (submitted from ``cwd``, default ours); returns the job id."""
    r = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", *map(str, args)], capture_output=True,
                       text=True, timeout=60, env=env, cwd=cwd)
    assert r.returncode == 0, f"sbatch {args} failed: {r.stderr}"
    return int(r.stdout.strip().split(";")[0])


def _wait_gone(job_id, timeout=JOB_TIMEOUT):
    """Wait until squeue no longer lists the job (or any task of the array); scancel it on timeout.

    Polling squeue is faster than `sbatch --wait`, which checks every 10 s.
    """
    def gone():
        r = subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True, text=True, timeout=30)
        return (r.returncode == 0 and not r.stdout.strip()) or "Invalid job id" in r.stderr
    try:
        _wait_until(gone, f"job {job_id} to end", timeout)
    except AssertionError:
        subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
        raise


def _sbatch_wait(args, tmp_path, env, cwd=None):
    """Submit ``sbatch ARGS`` with its log in tmp_path/log, wait for its end; returns (job id, state, log)."""
    log = tmp_path / "log"
    job_id = _sbatch([f"--output={log}", *args], tmp_path, env, cwd)
    _wait_gone(job_id)
    return job_id, _job_state(job_id)[0], (log.read_text() if log.exists() else "")


def _reports(log):
    """The JSON lines the fake hpcllm printed, one per rank and run."""
    return [json.loads(line.split(" ", 1)[1]) for line in log.splitlines() if line.startswith("FAKE ")]


@pytest.mark.slurm
@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("ntasks, template, job", [(2, "embed.sbatch", "embed"), (4, "embed.sbatch", "embed"),
                                                   (2, "tokenize.sbatch", "tokenize"), (2, "hpcllm.sbatch", "score")])
def test_sbatch_template_runs_an_mpi_world(slurm_cluster, tmp_path, ntasks, template, job):
    generic = template == "hpcllm.sbatch"   # the job is its first argument
    job_id, state, log = _sbatch_wait(["-n", ntasks, os.path.join(SLURM_DIR, template), *([job] if generic else []),
                                       "--out", tmp_path, "--steps", 1, "--extra", "a b"], tmp_path, _fake_env())
    assert state == "COMPLETED", log
    reports = _reports(log)
    assert sorted(x["rank"] for x in reports) == list(range(ntasks))
    assert {x["size"] for x in reports} == {ntasks}
    # The template forwarded its arguments unchanged (one argument with a space stays one).
    assert all(x["argv"] == [job, "--out", str(tmp_path), "--steps", "1", "--extra", "a b"] for x in reports)
    for x in reports:
        assert (x["slurm"]["job_id"], x["slurm"]["ntasks"], x["slurm"]["restart_count"]) == (job_id, ntasks, 0)
        assert x["slurm"]["job_name"] == ("hpcllm" if generic else f"hpcllm-{job}")
        assert "array_job_id" not in x["slurm"]
    assert f"start job {job_id} restart_count=0 ntasks={ntasks}" in log and f"end job {job_id} exit=0" in log


@pytest.mark.slurm
@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_wrapper_finds_the_template_through_hpcllm_slurm_dir(slurm_cluster, tmp_path):
    # A wrapper copied away from slurm/ and submitted from a directory without slurm/ (SLURM_SUBMIT_DIR)
    # finds hpcllm.sbatch only through HPCLLM_SLURM_DIR, and says so when it is not set.
    alone = tmp_path / "mine"
    alone.mkdir()
    (alone / "embed.sbatch").write_text(open(os.path.join(SLURM_DIR, "embed.sbatch")).read())
    args = ["-n", 2, alone / "embed.sbatch", "--out", tmp_path, "--steps", 1]
    _, state, log = _sbatch_wait(args, tmp_path, _fake_env(HPCLLM_SLURM_DIR=SLURM_DIR), cwd=alone)
    assert state == "COMPLETED" and len(_reports(log)) == 2, log
    (tmp_path / "log").unlink()
    env = {k: v for k, v in _fake_env().items() if k != "HPCLLM_SLURM_DIR"}
    _, state, log = _sbatch_wait(args, tmp_path, env, cwd=alone)
    assert state == "FAILED" and "cannot find slurm/hpcllm.sbatch; set HPCLLM_SLURM_DIR" in log, log
    assert not _reports(log)


@pytest.mark.slurm
@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_srun_without_pmi_is_refused(slurm_cluster, tmp_path):
    code = ("from mpi4py import MPI; from hpcllm.world.launch import check_launch; "
            "check_launch(MPI.COMM_WORLD.Get_size())")
    srun = ["timeout", str(JOB_TIMEOUT), "srun", "-n", "2", "--chdir", str(tmp_path)]
    bad = subprocess.run([*srun, "--mpi=none", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=JOB_TIMEOUT + 30)
    assert bad.returncode != 0 and bad.stderr.count("srun --mpi=pmi2") == 2, bad.stderr
    good = subprocess.run([*srun, "--mpi=pmi2", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=JOB_TIMEOUT + 30)
    assert good.returncode == 0, good.stderr


def _job_state(job_id):
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                         timeout=30).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return fields.get("JobState"), int(fields.get("Restarts", -1))


FINISHED_AFTER_ONE_RESTART = {(s, 1) for s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")}


def _wait_until(predicate, what, timeout=JOB_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slurm
@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_signalled_job_is_requeued_and_resumes(slurm_cluster, tmp_path, sig):
    from hpcllm.signals import read_stop_note

    steps = 12
    log = tmp_path / "log"
    job_id = _sbatch(["-n", 2, f"--output={log}", os.path.join(SLURM_DIR, "score.sbatch"), "--out", tmp_path,
                      "--steps", steps], tmp_path, _fake_env())
    try:
        _wait_until(lambda: (tmp_path / "done").exists() and int((tmp_path / "done").read_text()) >= 2,
                    "the first run to make progress")
        # What --signal=B:USR1@300 (or scancel's SIGTERM to the batch shell) does before the time limit.
        subprocess.run(["scancel", "--batch", f"--signal={sig}", str(job_id)], check=True, timeout=30)
        # Slurm holds a requeued job for the credential lifetime (5 s on the test cluster).
        _wait_until(lambda: _job_state(job_id) in FINISHED_AFTER_ONE_RESTART, f"job {job_id} to be requeued and end")
    finally:
        subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
    state, restarts = _job_state(job_id)
    text = log.read_text()
    assert (state, restarts) == ("COMPLETED", 1), text
    assert f"start job {job_id} restart_count=0" in text and f"start job {job_id} restart_count=1" in text
    assert f"got SIG{sig}, forwarding it to srun" in text and "as SIGUSR1" in text and f"requeueing job {job_id}" in text
    runs = _reports(text)
    first = [x for x in runs if x["slurm"]["restart_count"] == 0]
    second = [x for x in runs if x["slurm"]["restart_count"] == 1]
    assert len(first) == len(second) == 2
    # The rerun resumed where the stopped run left off, and finished the work.
    stop = read_stop_note(tmp_path)
    assert stop["signal"] == "SIGUSR1" and {x["start"] for x in second} == {stop["completed"]} != {0}
    assert int((tmp_path / "done").read_text()) == steps
    assert text.count("FAKE-STOPPED") == 2 and text.count("FAKE-FINISHED") == 2


@pytest.mark.slurm
@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_array_template_gives_each_task_its_corpus(slurm_cluster, tmp_path):
    corpora = tmp_path / "corpora.txt"
    corpora.write_text(f"# two corpora\n{tmp_path}/news.jsonl\n\n{tmp_path}/web/\n")
    array_id = _sbatch(["--array=0-1", "-n", 2, f"--output={tmp_path}/log-%a",
                        os.path.join(SLURM_DIR, "embed-array.sbatch"), corpora, "outroot", "--steps", 1],
                       tmp_path, _fake_env())
    _wait_gone(array_id)
    for task, (corpus, out) in enumerate([("news.jsonl", "0-news"), ("web/", "1-web")]):
        text = (tmp_path / f"log-{task}").read_text()
        reports = _reports(text)
        assert len(reports) == 2, text
        for x in reports:
            assert x["argv"][:5] == ["embed", "--input", f"{tmp_path}/{corpus}", "--output", f"outroot/{out}"]
            assert x["slurm"]["array_job_id"] == array_id and x["slurm"]["array_task_id"] == task
        assert (tmp_path / "outroot" / out / "done").read_text() == "1"


# --- the real embed job: sbatch vs mpiexec -------------------------------------

@pytest.fixture(scope="module")
def embed_reference(tmp_path_factory, minilm_h5):
    """A corpus of many small shards and its results from an uninterrupted `mpiexec -n 2 hpcllm embed`."""
    from conftest import mpirun, write_jsonl
    from corpora import mixed

    d = tmp_path_factory.mktemp("embed")
    corpus = write_jsonl(d / "corpus.jsonl", mixed(96))
    args = ["--model", minilm_h5, "--input", corpus, "--shard-docs", "8", "--batch-tokens", "2048",
            "--progress", "0"]
    mpirun(2, ["embed", *args, "--output", d / "mpiexec"])
    return args, d / "mpiexec" / "results.h5"


def _assert_same_results(path_a, path_b):
    import h5py
    import numpy as np

    with h5py.File(path_a) as a, h5py.File(path_b) as b:
        names = _datasets(a)
        assert names and names == _datasets(b)
        for n in names:
            # Same world layout, same inputs, shards written whole: bit-identical.
            np.testing.assert_array_equal(a[n][()], b[n][()], err_msg=n)


def _datasets(f):
    import h5py

    names = []
    f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
    return sorted(names)


def _embed_env():
    return dict(os.environ, HPCLLM_CMD=f"{sys.executable} -m hpcllm")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT + 120)
def test_sbatch_embed_matches_mpiexec(slurm_cluster, tmp_path, embed_reference):
    args, reference = embed_reference
    _, state, log = _sbatch_wait(["-n", 2, os.path.join(SLURM_DIR, "embed.sbatch"), *args,
                                  "--output", tmp_path / "sbatch"], tmp_path, _embed_env())
    assert state == "COMPLETED", log
    _assert_same_results(reference, tmp_path / "sbatch" / "results.h5")


def _usr1_after_first_shard(job_id, out, during_gap=None):
    """USR1 to the batch shell once OUT has a shard file (what --signal=B:USR1@300 does), then wait for the
    requeued job to end; ``during_gap`` runs once Slurm has requeued it, before it runs again."""
    try:
        _wait_until(lambda: list(out.glob("shards/shard-*.h5")), "the first shard file")
        subprocess.run(["scancel", "--batch", "--signal=USR1", str(job_id)], check=True, timeout=30)
        if during_gap is not None:
            _wait_until(lambda: _job_state(job_id)[1] == 1, f"job {job_id} to be requeued")
            during_gap()
        _wait_until(lambda: _job_state(job_id) in FINISHED_AFTER_ONE_RESTART, f"job {job_id} to be requeued and end")
    finally:
        subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT + 120)
def test_sbatch_embed_signalled_requeues_and_matches(slurm_cluster, tmp_path, embed_reference):
    args, reference = embed_reference
    out, log = tmp_path / "sbatch", tmp_path / "log"
    job_id = _sbatch(["-n", 2, f"--output={log}", os.path.join(SLURM_DIR, "embed.sbatch"), *args, "--output", out],
                     tmp_path, _embed_env())
    _usr1_after_first_shard(job_id, out)
    text = log.read_text()
    assert _job_state(job_id) == ("COMPLETED", 1), text
    assert f"start job {job_id} restart_count=0" in text and f"start job {job_id} restart_count=1" in text
    assert f"requeueing job {job_id}" in text
    # The rerun skipped the shards the first run had completed.
    done_before = [int(m) for m in re.findall(r"\((\d+) already done\)", text)]
    assert len(done_before) == 2 and done_before[0] == 0 and done_before[1] >= 1, text
    _assert_same_results(reference, out / "results.h5")


# --- a real follow job: requeued by its signal, it admits what landed in the gap -----------

@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT + 120)
def test_follow_job_requeued_admits_files_dropped_during_the_gap(slurm_cluster, tmp_path, tiny_bert_h5):
    import h5py
    import numpy as np

    from conftest import mpirun, write_jsonl
    from corpora import mixed

    docs = mixed(40)
    incoming, static, out, log = tmp_path / "in", tmp_path / "static", tmp_path / "out", tmp_path / "log"
    incoming.mkdir()
    static.mkdir()
    for name, part in (("a.jsonl", docs[:20]), ("b.jsonl", docs[20:])):
        write_jsonl(static / name, part, id_prefix=name[0])
    os.link(static / "a.jsonl", incoming / "a.jsonl")
    args = ["embed", "--model", tiny_bert_h5, "--input", incoming, "--output", out, "--poll-s", 0.2,
            "--idle-exit", 10, "--shard-docs", 4, "--progress", 0]
    job_id = _sbatch(["-n", 2, f"--output={log}", os.path.join(SLURM_DIR, "follow.sbatch"), *args], tmp_path,
                     _embed_env())
    # b.jsonl lands while the requeued job waits to run again
    _usr1_after_first_shard(job_id, out, during_gap=lambda: os.link(static / "b.jsonl", incoming / "b.jsonl"))
    text = log.read_text()
    assert _job_state(job_id) == ("COMPLETED", 1), text
    assert f"requeueing job {job_id}" in text and f"start job {job_id} restart_count=1" in text
    admitted = json.loads((out / "manifest.json").read_text())["inputs"]   # the log is compacted at the end
    assert [os.path.basename(p) for p in admitted] == ["a.jsonl", "b.jsonl"], admitted   # each once, in order
    mpirun(2, ["embed", "--model", tiny_bert_h5, "--input", static, "--output", tmp_path / "ref", "--progress", 0])
    with h5py.File(out / "results.h5") as got, h5py.File(tmp_path / "ref" / "results.h5") as want:
        for name in ("doc_id", "status", "n_tokens", "line"):
            np.testing.assert_array_equal(got[name][()], want[name][()], err_msg=name)
        np.testing.assert_allclose(got["embedding"][()], want["embedding"][()], atol=1e-5)


# --- the real tokenize job: sbatch vs mpiexec ----------------------------------

@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT + 120)
def test_sbatch_tokenize_matches_mpiexec(slurm_cluster, tmp_path):
    from conftest import minilm_dir, mpirun, write_jsonl
    from corpora import mixed

    corpus = write_jsonl(tmp_path / "corpus.jsonl", mixed(96), id_prefix="d")
    args = ["--tokenizer", os.path.join(minilm_dir(), "tokenizer.json"), "--input", corpus, "--shard-docs", 8,
            "--progress", "0"]
    mpirun(2, ["tokenize", *args, "--output", tmp_path / "mpiexec"])
    _, state, log = _sbatch_wait(["-n", 2, os.path.join(SLURM_DIR, "tokenize.sbatch"), *args,
                                  "--output", tmp_path / "sbatch"], tmp_path, _embed_env())
    assert state == "COMPLETED", log
    names = sorted(os.listdir(tmp_path / "mpiexec" / "shards"))
    assert len(names) == 12 and sorted(os.listdir(tmp_path / "sbatch" / "shards")) == names
    for name in names:
        _assert_same_results(tmp_path / "mpiexec" / "shards" / name, tmp_path / "sbatch" / "shards" / name)
    info = [json.loads((tmp_path / d / "tokens.json").read_text()) for d in ("mpiexec", "sbatch")]
    assert info[1]["slurm"]["job_name"] == "hpcllm-tokenize" and info[0]["slurm"] == {}
    for x in info:   # what differs between the two runs: when, how long, where to, and Slurm's record
        del x["finished"], x["timings"], x["config"]["output"], x["slurm"]
    assert info[0] == info[1] and info[0]["n_docs"] == 96


# --- run as a script: a stand-in for `hpcllm JOB --out DIR --steps N` -----------

def _fake_hpcllm(argv):
    """Resumable steps of 0.2 s; progress in OUT/done; stops on USR1/TERM with EXIT_REQUEUE."""
    from mpi4py import MPI

    from hpcllm.world.launch import check_launch
    from hpcllm.world.slurm import provenance
    from hpcllm.signals import EXIT_REQUEUE, StopFlag, write_stop_note

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    check_launch(comm.Get_size())
    opts = dict(zip(argv[1::2], argv[2::2]))
    out, steps = opts.get("--out", opts.get("--output")), int(opts["--steps"])
    done = os.path.join(out, "done")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    start = int(open(done).read()) if os.path.exists(done) else 0
    report = {"rank": rank, "size": comm.Get_size(), "argv": argv, "slurm": provenance(), "start": start}
    print("FAKE", json.dumps(report), flush=True)
    with StopFlag() as stop:
        for step in range(start, steps):
            if stop.should_stop(comm):
                if rank == 0:
                    write_stop_note(out, {"completed": step, "signal": stop.agreed_signum, "rank": rank})
                print("FAKE-STOPPED", rank, step, flush=True)
                return EXIT_REQUEUE
            time.sleep(0.2)
            comm.Barrier()
            if rank == 0:
                with open(done + ".tmp", "w") as f:
                    f.write(str(step + 1))
                os.replace(done + ".tmp", done)
    print("FAKE-FINISHED", rank, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_fake_hpcllm(sys.argv[1:]))
