"""Shard files consolidated into chunks (hpcllm.store.chunks): results.h5 reads right under a low
`ulimit -n` with plain h5py, a kill at any point of consolidation leaves a readable result and a rerun
that computes nothing again, and follow mode's growing prefixes keep few chunks."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np

from conftest import REPO, minilm_dir
from hpcllm.corpus.plan import make_plan
from hpcllm.corpus.readers import read_docs
from hpcllm.status import Status as S
from hpcllm.store import chunks
from hpcllm.store.layout import shard_file
from hpcllm.store.master import build_master
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, Column, base_columns, ragged, ragged_rows, write_shard

READ_UNDER_LIMIT = """
import resource, sys, h5py, numpy as np
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
import hpcllm.results
out = {}
for path in sys.argv[2:]:
    with h5py.File(path, "r") as f:
        out[path] = [int((f["status"][:] == 255).sum()), int((f["doc_id"].asstr()[:] == "").sum())]
out["api"] = int((hpcllm.results.open(sys.argv[-1]).read(["status"])["status"] == 255).sum())
print(out)
"""


def _read_under_limit(limit, path):
    proc = subprocess.run([sys.executable, "-c", READ_UNDER_LIMIT, str(limit), path], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONSAFEPATH="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return eval(proc.stdout.strip().splitlines()[-1])


def test_2000_shards_read_with_plain_h5py_under_ulimit_256(tmp_path):
    """2,000 one-document shards (one written, copied: the reads are the point; bench/scale.py shows the
    old master over shard files reading fill values here): results.h5 over chunks reads every row with
    plain h5py under `ulimit -n 256`, and with hpcllm.results."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"".join(b"line %d\n" % i for i in range(2000)))
    plan = make_plan(str(corpus), shard_docs=1)
    assert len(plan) == 2000
    out = str(tmp_path / "out")
    write_shard(out, plan[0], base_columns(plan[0], read_docs(plan[0])), schema=BASE_COLUMNS)
    for s in plan[1:]:
        shutil.copyfile(shard_file(out, 0), shard_file(out, s.index))
    path = build_master(out, plan, BASE_COLUMNS)
    assert os.listdir(os.path.join(out, "chunks")) == ["chunk-00000-01999.h5"]
    assert not os.listdir(os.path.join(out, "shards"))
    got = _read_under_limit(256, path)
    assert got[path] == [0, 0] and got["api"] == 0, got


TOKENIZE = ["tokenize", "--tokenizer", os.path.join(minilm_dir(), "tokenizer.json"), "--shard-docs", 2,
            "--progress", 0, "--chunk-mb", 0.002]
DIE_IN_CONSOLIDATION = """
import os, sys
from hpcllm.store import chunks
real, made = chunks.write_chunk, []
def write_chunk(*a, **k):
    if len(made) == 2:
        os._exit(137)              # as SIGKILL: no cleanup, a half-written chunk stays behind
    made.append(real(*a, **k))
    return made[-1]
chunks.write_chunk = write_chunk
from hpcllm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _hpcllm(args, script=None):
    """``mpiexec -n 2``: the ranks share the consolidation (each writes some of the chunks)."""
    cmd = ["mpiexec", "-n", "2", sys.executable, *(["-c", script] if script else ["-m", "hpcllm"]), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONSAFEPATH="1", MPIEXEC_TIMEOUT="240"))


def test_killed_during_consolidation_rerun_computes_nothing_and_reads_right(tmp_path):
    """2 ranks share the consolidation; a rank killed after two of its chunks ends the run (mpiexec kills
    the other, maybe mid-chunk): the rerun computes no shard, makes the other chunks and results.h5
    (every row, as the token shards say), and leaves the chunks it found as they were."""
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}" + " x" * (i % 5), "id": f"d{i}"}) + "\n"
                           for i in range(40)))
    out = tmp_path / "out"
    proc = _hpcllm([*TOKENIZE, "--input", src, "--output", out], DIE_IN_CONSOLIDATION)
    assert proc.returncode != 0, proc.stderr[-3000:]
    first = {p: os.stat(out / "chunks" / p).st_mtime_ns for p in os.listdir(out / "chunks") if p.endswith(".h5")}
    assert 2 <= len(first) < 20 and not (out / "results.h5").exists()
    before = {p: os.stat(out / "shards" / p).st_mtime_ns for p in os.listdir(out / "shards")}
    assert len(before) == 20
    proc = _hpcllm([*TOKENIZE, "--input", src, "--output", out])
    assert proc.returncode == 0 and "20 shards (20 already done)" in proc.stderr, proc.stderr[-3000:]
    assert {p: os.stat(out / "shards" / p).st_mtime_ns for p in before} == before    # token shards stay
    assert {p: os.stat(out / "chunks" / p).st_mtime_ns for p in first} == first
    n_tokens = []
    for p in sorted(before):
        with h5py.File(out / "shards" / p, "r") as f:
            n_tokens.append(f["n_tokens"][:])
    with h5py.File(out / "results.h5", "r") as f:
        assert len(f["status"].virtual_sources()) == len(os.listdir(out / "chunks")) > 2
        assert (f["status"][:] == S.OK).all() and (f["n_tokens"][:] == np.concatenate(n_tokens)).all()
        assert f["doc_id"].asstr()[:].tolist() == [f"d{i}" for i in range(40)]
        assert (f["line"][:] == np.arange(1, 41)).all()


SCHEMA = (Column("embedding", np.float32, (3,), np.nan), ragged("logprobs", np.float32, "offsets"),
          N_TOKENS) + BASE_COLUMNS


def _write(out, s, rng):
    cols = base_columns(s, read_docs(s))
    cols["embedding"] = rng.standard_normal((s.n_docs, 3)).astype(np.float32)
    cols["logprobs"], cols["offsets"] = ragged_rows([rng.standard_normal(int(rng.integers(0, 4))) for _ in
                                                     range(s.n_docs)], np.float32)
    cols["n_tokens"] = np.diff(cols["offsets"]).astype(np.int32)
    write_shard(out, s, cols, attrs={"finished_at": float(s.index)}, schema=SCHEMA)
    return cols


def test_growing_prefixes_keep_few_chunks_and_a_killed_merge_reads_right(tmp_path, monkeypatch):
    """Follow mode's rebuilds: results.h5 over a growing prefix of shards, consolidated each time with a
    small chunk size: the chunks stay few (sizes fall geometrically), every prefix reads exactly, a shard's
    rows and attributes read back from its chunk, and a merge killed before it deleted the chunks it
    replaced (overlapping chunks) leaves a result that reads right; the next build removes them."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"".join(b"line %d\n" % i for i in range(96)))
    plan = make_plan(str(corpus), shard_docs=2)
    out, rng = str(tmp_path / "out"), np.random.default_rng(0)
    cols = [_write(out, s, rng) for s in plan]
    size = os.path.getsize(shard_file(out, 0))
    attrs = {"config": {"chunk_mb": 16 * size / 2**20}}        # about 16 shards a chunk
    for n in range(3, len(plan) + 1, 3):                        # a file of 3 shards done at a time
        if n == 45:                                             # kill this merge before its deletions
            monkeypatch.setattr(chunks, "remove", lambda paths: None)
        path = build_master(out, plan[:n], SCHEMA, attrs)
        monkeypatch.undo()
        held, stale = chunks.cover(chunks.list_chunks(out))
        assert len(held) <= 6 and (n == 45 or not stale), (n, held)
        with h5py.File(path, "r") as f:
            assert (f["embedding"][:] == np.concatenate([c["embedding"] for c in cols[:n]])).all()
            assert (f["status"][:] == S.OK).all() and f["line"][-1] == 2 * n
            flat, off = f["logprobs"][:], f["offsets"][:]
        want = [r for c in cols[:n] for r in np.split(c["logprobs"], c["offsets"][1:-1])]
        assert all(np.array_equal(flat[off[i]:off[i + 1]], w) for i, w in enumerate(want))
    assert not os.listdir(os.path.join(out, "shards"))
    for s in (plan[0], plan[29], plan[-1]):
        with chunks.open_shard(out, s) as f:
            assert f.attrs["finished_at"] == s.index and f.attrs["row_start"] == s.row_start
            assert (f["embedding"][()] == cols[s.index]["embedding"]).all()
            assert (f["offsets"][()] == cols[s.index]["offsets"]).all()
            assert (f["logprobs"][()] == cols[s.index]["logprobs"]).all()
    assert chunks.done_shards(out, plan) == set(range(len(plan)))
