"""`hpcllm filter`: kept + rejected lines are exactly the input lines, byte for byte, partitioned by the
expression evaluated independently here (pandas); q() and --by against numpy; one-line errors; two result
dirs joined by row; mpiexec -n 2 equals one rank."""

import gzip
import os

import h5py
import numpy as np
import pandas as pd
import pytest

from analysis_helpers import make_results, run_cli
from hpcllm.analysis.filter import run_filter
from hpcllm.errors import HpcllmError
from hpcllm.status import Status

N = 1800


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("filter")
    cols = make_results(d / "out", d / "corpus.jsonl", N, shard_docs=400, enum=True)
    with h5py.File(d / "out" / "results.h5") as f:
        df = pd.DataFrame({k: f[k][:] for k in ("status", "perplexity", "n_tokens", "finish_reason")})
    return d, cols["lines"], df


def read_lines(path):
    with (gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")) as f:
        return f.read().splitlines(keepends=True)


def check_partition(lines, mask, kept, rejected):
    assert read_lines(kept) == [x for x, m in zip(lines, mask) if m]
    assert read_lines(rejected) == [x for x, m in zip(lines, mask) if not m]


def test_quantile_cut_keeps_exactly_the_pandas_selection(data):
    d, lines, df = data
    ok = df.status == Status.OK
    q6 = np.quantile(df.perplexity[ok], 0.6)
    mask = (ok & (df.perplexity <= q6)) | ((df.status == Status.TRUNCATED) & ~(df.n_tokens > 1500))
    where = "status == ok and perplexity <= q(0.6) or (status == truncated and not n_tokens > 1500)"
    summary = run_filter([d / "out"], where, str(d / "k.jsonl.gz"), rejected=str(d / "r.jsonl"))
    check_partition(lines, mask.to_numpy(), d / "k.jsonl.gz", d / "r.jsonl")
    assert summary.startswith(f"kept {mask.sum()} of {N}")


def test_by_group_cutoffs_and_in(data):
    d, lines, df = data
    ok = df.status == Status.OK
    cut = df[ok].groupby("finish_reason").perplexity.quantile(0.3)          # pandas' linear = numpy's
    for g in range(3):
        assert cut[g] == np.quantile(df.perplexity[ok & (df.finish_reason == g)], 0.3)
    mask = df.status.isin([Status.OK, Status.BAD_UTF8]) & (df.perplexity > df.finish_reason.map(cut))
    run_filter([d / "out"], "status in (ok, bad_utf8) and perplexity > q(0.3)", str(d / "k.jsonl"),
               rejected=str(d / "r.jsonl.gz"), by="finish_reason")
    check_partition(lines, mask.to_numpy(), d / "k.jsonl", d / "r.jsonl.gz")
    run_filter([d / "out"], "finish_reason not in (stop, eos) and n_tokens >= 1e3", str(d / "e.jsonl"))
    assert read_lines(d / "e.jsonl") == [x for x, m in zip(lines, (df.finish_reason == 1) & (df.n_tokens >= 1000))
                                         if m]


def test_mpi_two_ranks_equal_one(data):
    d, lines, df = data
    where = "perplexity >= q(0.25) and status != bad_json"
    run_filter([d / "out"], where, str(d / "one.jsonl.gz"), rejected=str(d / "one-r.jsonl"))
    proc = run_cli("filter", d / "out", "--where", where, "--output", d / "two.jsonl.gz",
                   "--rejected", d / "two-r.jsonl", mpi=2, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert gzip.open(d / "two.jsonl.gz").read() == gzip.open(d / "one.jsonl.gz").read()
    assert open(d / "two-r.jsonl", "rb").read() == open(d / "one-r.jsonl", "rb").read()
    proc = run_cli("filter", d / "out", "--where", where, "--output", d / "ps.jsonl", "--per-shard", mpi=2)
    assert proc.returncode == 0, proc.stderr
    parts = b"".join(open(d / f"ps-{i:05d}.jsonl", "rb").read() for i in range(N // 400 + 1))
    assert parts == gzip.open(d / "one.jsonl.gz").read()


def test_two_result_dirs_join_by_row(data, tmp_path):
    d, lines, df = data
    other = make_results(tmp_path / "cls", d / "corpus.jsonl", N, shard_docs=400, seed=5)
    other_ppl = other["perplexity"]
    run_filter([d / "out", tmp_path / "cls"], "perplexity < 30 and score1.perplexity < 20", str(tmp_path / "k.jsonl"))
    mask = (df.perplexity < 30).to_numpy() & (other_ppl < 20)
    assert read_lines(tmp_path / "k.jsonl") == [x for x, m in zip(lines, mask) if m]
    make_results(tmp_path / "bad", d / "corpus.jsonl", N, shard_docs=300)
    with pytest.raises(HpcllmError, match="not results of the same corpus plan"):
        run_filter([d / "out", tmp_path / "bad"], "perplexity < 3", str(tmp_path / "x.jsonl"))


@pytest.mark.parametrize("where,msg", [
    ("perplexity <= q(0.6) and", "expected a column, number or name at the end"),
    ("ppl < 3", "unknown column 'ppl'"),
    ("status == okay", "unknown value 'okay'"),
    ("perplexity < 3 )", "unexpected ')' at character 16"),
    ("perplexity <= q(2)", "the quantile must be between 0 and 1"),
    ("__import__('os') == 1", "unexpected '(' at character 11"),   # a bare name is a bool column's condition
    ("n_tokens", "column 'n_tokens' alone is a condition only if it is bool"),
    ("n_tokens > 1; 2", "unexpected character ';' at character 13"),
])
def test_bad_expressions_are_one_line_errors(data, where, msg):
    d, _, _ = data
    proc = run_cli("filter", d / "out", "--where", where, "--output", d / "never.jsonl")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert msg in proc.stderr and not os.path.exists(d / "never.jsonl")


def test_changed_corpus_is_refused(data, tmp_path):
    d, lines, _ = data
    changed = tmp_path / "corpus.jsonl"
    changed.write_bytes(b"".join(lines[:-1]) + b'{"id": "x"}\n' + lines[-1])
    with pytest.raises(HpcllmError, match="bytes, the job read"):
        run_filter([d / "out"], "n_tokens > 0", str(tmp_path / "k.jsonl"), inputs=[str(changed)])
    same_size = tmp_path / "s" / "corpus.jsonl"
    same_size.parent.mkdir()
    same_size.write_bytes(lines[0][:-1] + b" " + b"".join(lines[1:]))     # one newline less, same size
    with pytest.raises(HpcllmError, match="corpus changed since the job"):
        run_filter([d / "out"], "n_tokens > 0", str(tmp_path / "k.jsonl"), inputs=[str(same_size)])
    import json
    import shutil
    shutil.copytree(d / "out", tmp_path / "old")
    m = json.loads((tmp_path / "old" / "manifest.json").read_text())
    m["created"] = "2000-01-01T00:00:00+00:00"                        # the corpus is newer than the job
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(HpcllmError, match="was modified after"):
        run_filter([tmp_path / "old"], "n_tokens > 0", str(tmp_path / "k.jsonl"))
    assert not os.path.exists(tmp_path / "k.jsonl")
