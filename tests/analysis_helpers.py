"""Synthetic results dirs for the analysis tests: a JSONL corpus, its manifest, shard files written with
hpcllm's own write_shard / build_master (score-like columns, optional flat token_logprobs, embeddings, an
enum column with names), so report / export / filter run on files laid out exactly as the jobs write them."""

import json
import os

import numpy as np

from hpcllm.corpus.plan import Shard
from hpcllm.status import Status
from hpcllm.store.master import build_master
from hpcllm.store.results import BASE_COLUMNS, Column, ragged, write_shard

STATUS_P = {Status.OK: 0.9, Status.TRUNCATED: 0.04, Status.EMPTY: 0.02, Status.BAD_JSON: 0.02,
            Status.BAD_UTF8: 0.02}


def write_corpus(path, n, seed=0):
    """n JSONL lines of varying text (some with odd bytes kept as they are); returns the list of lines."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "Grüße", "数据"]
    lines = [json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(words, 1 + i % 17))},
                        ensure_ascii=False).encode() + b"\n" for i in range(n)]
    with open(path, "wb") as f:
        f.writelines(lines)
    return lines


def _plan(path, lines, shard_docs):
    shards, pos, row = [], 0, 0
    for i, a in enumerate(range(0, len(lines), shard_docs)):
        chunk = lines[a:a + shard_docs]
        size = sum(len(x) for x in chunk)
        shards.append(Shard(i, path, "jsonl", False, pos, pos + size, a, len(chunk), row, 0))
        pos, row = pos + size, row + len(chunk)
    return shards


def make_results(out, corpus, n, shard_docs=None, seed=0, token_lp=False, dim=0, enum=False,
                 shard_attrs=True, doc_ids=True, write=True):
    """A finished score-like results dir over ``corpus`` (written here unless it exists or not ``write``):
    returns the full columns (and the corpus ``lines``)."""
    os.makedirs(out, exist_ok=True)
    lines = write_corpus(corpus, n, seed) if write and not os.path.exists(corpus) else None
    if not os.path.exists(corpus):
        open(corpus, "wb").close()
    corpus = os.path.abspath(corpus)
    lines = lines or [b""] * n
    rng = np.random.default_rng(seed)
    plan = _plan(corpus, lines, shard_docs or max(1, n // 4))
    codes, probs = list(STATUS_P), list(STATUS_P.values())
    cols = {"status": rng.choice(np.array(codes, np.uint8), n, p=probs),
            "line": np.arange(1, n + 1, dtype=np.int64), "source": np.zeros(n, np.int32),
            "n_tokens": rng.integers(1, 2000, n).astype(np.int32),
            "perplexity": rng.lognormal(3.0, 0.8, n), "logprob_sum": -rng.gamma(2.0, 50.0, n)}
    bad = cols["status"] == Status.BAD_JSON
    cols["perplexity"][bad] = np.nan
    cols["logprob_sum"][bad] = np.nan
    if doc_ids:
        cols["doc_id"] = np.array([f"doc{i}" for i in range(n)], dtype=object)
    schema = [Column("perplexity", np.float64, (), np.nan), Column("logprob_sum", np.float64, (), np.nan),
              Column("n_tokens", np.int32, (), -1)] + [c for c in BASE_COLUMNS if doc_ids or c.name != "doc_id"]
    if enum:
        cols["finish_reason"] = rng.integers(0, 3, n).astype(np.uint8)
        # names as generate writes them: a JSON object {code: name}
        schema.append(Column("finish_reason", np.uint8, (), 255,
                             attrs={"names": json.dumps({0: "stop", 1: "length", 2: "eos", 255: "none"})}))
    if dim:
        cols["embedding"] = rng.normal(size=(n, dim)).astype(np.float32)
        schema.append(Column("embedding", np.float32, (dim,), np.nan))
    lengths = rng.integers(0, 6, n) if token_lp else None
    if token_lp:
        cols["token_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cols["token_logprobs"] = -rng.exponential(2.0, int(lengths.sum())).astype(np.float32)
        schema.append(ragged("token_logprobs", np.float32, "token_offsets"))
    _write_shards(out, plan, cols, schema, rng, token_lp, shard_attrs)
    timings = [{"rank": r, "dp_rank": r, "tp_rank": 0, "docs": n // 2, "tokens": 1000 * r + 5000, "shards": 2,
                "seconds": {"read": 0.5, "tokenize": 1.0 + r, "compute": 5.0, "comm": 0.1, "write": 0.2,
                            "idle": 0.3}, "peak_rss_mb": 500.0, "weights_mb": 100.0} for r in range(2)]
    build_master(str(out), plan, tuple(schema),
                 attrs={"job": "score", "model": "/models/tiny.h5", "model_hash": "ab" * 32, "config": {"tp": 1},
                        "world": {"world": 2, "dp": 2, "tp": 1}, "timings": timings, "slurm": {}},
                 inputs=[corpus])
    manifest = {"format": "hpcllm-manifest", "version": 1, "shards": [s.__dict__ for s in plan],
                "inputs": [corpus], "input_sizes": [os.path.getsize(corpus)], "model_hash": "ab" * 32,
                "config_hash": "cd" * 32, "code_version": "test", "created": "2100-01-01T00:00:00+00:00"}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    cols["lines"] = lines
    return cols


def run_cli(*args, timeout=120, mpi=0):
    """``python -m hpcllm ARGS`` (under ``mpiexec -n MPI`` when mpi > 0) -> CompletedProcess."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "hpcllm", *map(str, args)]
    if mpi:
        cmd = ["mpiexec", "-n", str(mpi), *cmd]
    env = dict(os.environ, MPIEXEC_TIMEOUT=str(timeout))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, env=env)


def _write_shards(out, plan, cols, schema, rng, token_lp, shard_attrs):
    for s in plan:
        a, b = s.row_start, s.row_start + s.n_docs
        part = {k: v[a:b] for k, v in cols.items() if k not in ("token_offsets", "token_logprobs")}
        if token_lp:
            o = cols["token_offsets"][a:b + 1]
            part["token_offsets"], part["token_logprobs"] = o - o[0], cols["token_logprobs"][o[0]:o[-1]]
        attrs = {"seconds": float(1 + rng.random() + (s.index == 1) * 3), "rank": s.index % 2,
                 "dp_rank": s.index % 2, "host": "node0"} if shard_attrs else None
        write_shard(str(out), s, part, attrs=attrs, schema=tuple(schema))
