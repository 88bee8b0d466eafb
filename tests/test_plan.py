"""Shard plan and manifest: real files, real MPI (mpiexec -n 3 runs this file as a script)."""

import dataclasses
import gzip
import json
import os
import subprocess
import sys

import pytest

from hpcllm.corpus import plan as planmod
from hpcllm.corpus.plan import Shard, make_plan
from hpcllm.store.layout import shard_file
from hpcllm.store.manifest import completed_shards, hash_config, load_or_create_manifest
from hpcllm.errors import HpcllmError

HERE = os.path.abspath(__file__)


def _corpus(d):
    """Several files: multi-block plain, gz, empty, text; deterministic content."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "a.jsonl"), "wb") as f:
        for i in range(500):
            f.write(json.dumps({"text": "doc %d " % i + "w" * (i % 37)}).encode() + b"\n")
    with gzip.open(os.path.join(d, "b.jsonl.gz"), "wb") as f:
        f.write(b"".join(b'{"text": "g%d"}\n' % i for i in range(45)))
    open(os.path.join(d, "c.txt"), "wb").close()
    with open(os.path.join(d, "d.txt"), "wb") as f:
        f.write(b"x\n" * 30 + b"y" * 5000 + b"\nlast")
    return d


def _plan_json(plan):
    return [dataclasses.asdict(s) for s in plan]


def test_plan_over_files(tmp_path, monkeypatch):
    d = _corpus(str(tmp_path / "c"))
    monkeypatch.setattr(planmod, "SCAN_BLOCK", 1000)
    plan = make_plan(d, shard_docs=40)
    assert plan.inputs == [os.path.join(d, n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt", "d.txt")]
    per_file = {}
    for s in plan:
        per_file.setdefault(s.file_index, []).append(s)
        assert 0 < s.n_docs <= 40 and s.fmt == ("jsonl" if s.file_index < 2 else "text")
    assert sorted(per_file) == [0, 1, 3]
    for fi, n_lines in [(0, 500), (1, 45), (3, 32)]:
        shards = per_file[fi]
        assert sum(s.n_docs for s in shards) == n_lines
        assert [s.line_start for s in shards] == [sum(x.n_docs for x in shards[:k]) for k in range(len(shards))]
    assert [s.index for s in plan] == list(range(len(plan)))
    assert [s.row_start for s in plan] == [sum(x.n_docs for x in plan[:k]) for k in range(len(plan))]
    assert [s.n_docs for s in per_file[1]] == [40, 5] and per_file[1][1].compressed
    # runs of 40 // 16 = 2 lines packed across scan blocks: only a file's last shard is short
    sizes = [s.n_docs for s in per_file[0]]
    assert all(39 <= n <= 40 for n in sizes[:-1]) and len(sizes) == 13
    assert [s.n_docs for s in per_file[3]] == [32]


def test_plan_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"this is not gzip\n")
    with pytest.raises(HpcllmError, match=r"^cannot read input .*bad\.jsonl\.gz: Not a gzipped file"):
        make_plan(str(bad))
    with pytest.raises(HpcllmError, match="shard_docs must be >= 1"):
        make_plan(str(bad), shard_docs=0)


def _run_mpi(*args, n=3):
    env = dict(os.environ, MPIEXEC_TIMEOUT="60")
    r = subprocess.run(["mpiexec", "-n", str(n), sys.executable, HERE, *args], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.timeout(240)
def test_plan_identical_on_1_and_3_ranks(tmp_path, monkeypatch):
    d = _corpus(str(tmp_path / "c"))
    out = str(tmp_path / "o")
    os.makedirs(out)
    monkeypatch.setattr(planmod, "SCAN_BLOCK", 777)
    single = _plan_json(make_plan(d, shard_docs=40))
    # manifest refusal across ranks: every rank raises the same error, nobody hangs
    (tmp_path / "c" / "z.jsonl.gz").write_bytes(b"corrupt")
    _run_mpi("plan", d, out, "777", "40")
    for rank in range(3):
        with open(os.path.join(out, f"plan-{rank}.json")) as f:
            assert json.load(f) == single
        with open(os.path.join(out, f"manifest-{rank}.txt")) as f:
            assert f.read().splitlines() == [
                f"ok {len(single)}", f"ok {len(single)} reused",
                f"error {out}/m/manifest.json was written for model sha aaaa, this run uses bbbb; "
                "use a new --output",
                f"error cannot read input {d}/z.jsonl.gz: Not a gzipped file (b'co')"]


def _mpi_main(d, out, block, shard_docs):
    """Runs on each of the mpiexec ranks: plan, then manifest create / reuse / refuse."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    planmod.SCAN_BLOCK = int(block)
    files = [os.path.join(d, n) for n in sorted(os.listdir(d)) if not n.startswith("z")]
    plan = make_plan(files, shard_docs=int(shard_docs), comm=comm)
    with open(os.path.join(out, f"plan-{comm.Get_rank()}.json"), "w") as f:
        json.dump(_plan_json(plan), f)
    log = []
    calls = []
    for model, inputs in [("aaaa", files), ("aaaa", files), ("bbbb", files), ("aaaa", [d])]:
        def plan_fn():
            calls.append(1)
            return make_plan(inputs, shard_docs=int(shard_docs), comm=comm)
        try:
            m = load_or_create_manifest(os.path.join(out, "m" if inputs is files else "m2"), plan_fn,
                                        model, "cfg", comm=comm, inputs=inputs if inputs is files else None)
            log.append(f"ok {len(m.shards)}" + (" reused" if len(calls) == 1 and log else ""))
        except HpcllmError as e:
            log.append(f"error {e}")
    with open(os.path.join(out, f"manifest-{comm.Get_rank()}.txt"), "w") as f:
        f.write("\n".join(log) + "\n")


# ---------------------------------------------------------------------- manifest, single process

def _make(tmp_path, model="m1", config="c1", inputs=None, calls=None):
    d = str(tmp_path / "corpus")
    if not os.path.exists(d):
        _corpus(d)
    files = inputs if inputs is not None else [os.path.join(d, "a.jsonl"), os.path.join(d, "d.txt")]

    def plan_fn():
        if calls is not None:
            calls.append(1)
        return make_plan(files, shard_docs=100)
    return load_or_create_manifest(str(tmp_path / "out"), plan_fn, model, config, inputs=files)


def test_manifest_create_and_reuse(tmp_path):
    calls = []
    m = _make(tmp_path, calls=calls)
    path = str(tmp_path / "out" / "manifest.json")
    assert m.path == path and calls == [1]
    on_disk = json.load(open(path))
    assert on_disk["format"] == "hpcllm-manifest" and on_disk["version"] == 1
    assert on_disk["model_hash"] == "m1" and on_disk["config_hash"] == "c1"
    assert on_disk["input_sizes"] == [os.path.getsize(p) for p in m.inputs]
    assert len(on_disk["shards"]) == len(m.shards) == 6
    again = _make(tmp_path, calls=calls)
    assert calls == [1]                          # the plan was reused, not rebuilt
    assert again.shards == m.shards and again.shards.inputs == m.inputs and again.created == m.created
    assert all(isinstance(s, Shard) for s in again.shards)
    assert os.listdir(tmp_path / "out") == ["manifest.json"]    # no temporary left behind


def test_manifest_refusals(tmp_path):
    m = _make(tmp_path)
    p = m.path
    with pytest.raises(HpcllmError, match=f"^{p} was written for model sha m1, this run uses m2; use a new --output$"):
        _make(tmp_path, model="m2")
    with pytest.raises(HpcllmError, match=f"^{p} was written with job config hash c1, this run has c2 "):
        _make(tmp_path, config="c2")
    a, dtxt = m.inputs
    with pytest.raises(HpcllmError, match="written for 2 input files, this run has 1"):
        _make(tmp_path, inputs=[a])
    with pytest.raises(HpcllmError, match=f"written for input {dtxt}, this run has {a} in its place"):
        _make(tmp_path, inputs=[a, a])
    with open(dtxt, "ab") as f:
        f.write(b"\nmore")
    with pytest.raises(HpcllmError, match=f"written when {dtxt} had 5065 bytes, it now has 5070"):
        _make(tmp_path)
    for text, why in [("{", "is not a readable hpcllm manifest"), ("[]", "is not an hpcllm manifest"),
                      ('{"format": "hpcllm-manifest", "version": 99}', "has manifest version 99"),
                      ('{"format": "hpcllm-manifest", "version": 1}', "is a damaged hpcllm manifest")]:
        open(p, "w").write(text)
        with pytest.raises(HpcllmError, match=f"^{p} {why}"):
            _make(tmp_path)


def test_completed_shards_and_hash(tmp_path):
    m = _make(tmp_path)
    out = str(tmp_path / "out")
    assert completed_shards(out, m.shards) == set()
    os.makedirs(os.path.join(out, "shards"))
    for i in (0, 4):
        open(shard_file(out, i), "wb").close()
    open(os.path.join(out, "shards", ".shard-00001.h5.tmp-123"), "wb").close()   # a crashed write
    assert completed_shards(out, m.shards) == {0, 4}
    assert shard_file(out, 12).endswith("out/shards/shard-00012.h5")
    assert hash_config({"a": 1, "b": [1, 2]}) == hash_config({"b": [1, 2], "a": 1}) != hash_config({"a": 2, "b": [1, 2]})


if __name__ == "__main__":
    assert sys.argv[1] == "plan"
    _mpi_main(*sys.argv[2:])
