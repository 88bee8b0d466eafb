"""Bounded memory on a results dir of a few million rows (written with write_shard / build_master):
report and export read in blocks, so their peak RSS grows far less than the columns they read, and the
report's quantiles stay within the sketch's stated error of numpy's."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis_helpers import make_results
from hpcllm.analysis.columns import Results
from hpcllm.analysis.sketch import RELATIVE_ERROR
from hpcllm.status import Status

N = 3_000_000
MEASURE = """
import json, resource, sys
import hpcllm.analysis.columns as c
c.MAX_BLOCK = 1 << 16                      # blocks of 65,536 rows
from hpcllm.analysis.report import report
from hpcllm.analysis.export import export
import pyarrow.parquet, matplotlib.pyplot   # imports before the baseline
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak()
report([sys.argv[1]], sys.argv[2])
after_report = peak()
export([sys.argv[1]], sys.argv[3])
print(json.dumps({"base": base, "report": after_report - base, "export": peak() - base}))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    make_results(d / "out", d / "corpus.jsonl", N, shard_docs=N // 6, doc_ids=False, shard_attrs=False,
                 write=False)
    return d


def test_report_and_export_memory_is_bounded(big):
    d = big
    proc = subprocess.run([sys.executable, "-c", MEASURE, d / "out", d / "page", d / "all.parquet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    columns_mb = N * (1 + 8 + 4 + 4 + 8 + 8) / 2**20          # what reading the columns whole would take
    assert mem["report"] < 0.35 * columns_mb and mem["export"] < 0.35 * columns_mb, (mem, columns_mb)
    with h5py.File(d / "out" / "results.h5") as f:
        ppl, status = f["perplexity"][:], f["status"][:]
    assert pq.ParquetFile(d / "all.parquet").metadata.num_rows == N
    html = (d / "page" / "index.html").read_text()
    data = json.loads(html.split("id='report-data'>")[1].split("</script>")[0])
    x = ppl[status != Status.BAD_JSON]
    for p, v in data["numeric"]["perplexity"]["quantiles"].items():
        ref = np.quantile(x, float(p))
        assert abs(v - ref) <= RELATIVE_ERROR * ref * 1.001, (p, v, ref)


def test_blocks_follow_the_shards_and_cover_every_row(big):
    res = Results(big / "out")
    seen = []
    for rows, block in res.blocks(["line"], rows=100_000):
        assert len(block["line"]) == rows.stop - rows.start <= 100_000
        seen.append(rows)
    assert seen[0].start == 0 and seen[-1].stop == N
    assert all(a.stop == b.start for a, b in zip(seen, seen[1:]))
    assert {N // 6 * k for k in range(6)} <= {r.start for r in seen}
