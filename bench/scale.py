"""Benchmark: the executor and the results layout at 1,000 .. 100,000 shards (not a test).

    python bench/scale.py [--shards 1000 10000 100000] [--docs-per-shard 100] [--ranks 16]

For each shard count N, a synthetic JSONL of N x 100 short documents,
tokenized (``hpcllm tokenize``, the cheapest job: no model) with
``--shard-docs 100`` by ``mpiexec -n 16`` (oversubscribed on this machine's
cores), measuring:

* plan: ``make_plan`` alone in a fresh process (seconds, peak RSS), and the
  manifest's size;
* the job: wall time, rank 0's peak RSS (results.h5 ``timings``), and the
  claiming overhead per shard (a separate ``mpiexec -n 16`` run of the shared
  counter alone: N claims, no work);
* the master: consolidating the N shard files into chunks (shared by the
  ranks) + writing results.h5, inside the job: from the last rank's last
  shard (``finished_at`` in ``timings``) to results.h5's mtime (tokenize keeps
  its token shards);
* reading: plain ``h5py.File(results.h5)["status"][:]`` in a process under
  ``ulimit -n`` 256 (N <= 2,000) or 1,024, its time and how many rows read as
  the fill value (255), also through ``hpcllm.results`` (``api_fill``); and
  the same read of a master built the old way (one
  VDS source per shard file) where N <= 10,000.

Everything runs on this machine's CPUs; numbers move with other load on it
(``load`` is the 1-minute load average before and after each row).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # bench/common.py, also under PYTHONSAFEPATH=1

from common import REPO, minilm_dir  # noqa: E402

PLAN = """
import resource, sys, time
from hpcllm.corpus.plan import make_plan
t = time.perf_counter()
plan = make_plan(sys.argv[1], shard_docs=int(sys.argv[2]))
print(len(plan), time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
CLAIMS = """
import sys, time
from mpi4py import MPI
from hpcllm.world.counters import SharedCounters
world, n = MPI.COMM_WORLD, int(sys.argv[1])
counters = SharedCounters(world)
world.Barrier()
t = time.perf_counter()
while counters.claim() < n:
    pass
world.Barrier()
if world.Get_rank() == 0:
    print(time.perf_counter() - t)
counters.free()
"""
READ = """
import resource, sys, time, h5py
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
t = time.perf_counter()
with h5py.File(sys.argv[2], "r") as f:
    status = f["status"][:]
print(len(status), int((status == 255).sum()), time.perf_counter() - t)
if sys.argv[3:] == ["api"]:        # the same column through hpcllm.results, under the same limit
    import hpcllm.results
    print(int((hpcllm.results.open(sys.argv[2]).read(["status"])["status"] == 255).sum()))
"""


def run(cmd, **kw):
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONSAFEPATH="1", MPIEXEC_TIMEOUT="7200"), **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t


def make_corpus(path, n_docs):
    with open(path, "w") as f:
        for start in range(0, n_docs, 100_000):
            f.writelines(f'{{"text": "document {i} of the scale bench"}}\n'
                         for i in range(start, min(n_docs, start + 100_000)))


def old_master(out, plan, path):
    """results.h5 as it was before chunks: one VDS source per shard file."""
    import h5py

    with h5py.File(path, "w") as f:
        layout = h5py.VirtualLayout(shape=(sum(s.n_docs for s in plan),), dtype="uint8")
        for s in plan:
            src = h5py.VirtualSource(os.path.join("shards", f"shard-{s.index:05d}.h5"), "status", shape=(s.n_docs,))
            layout[s.row_start:s.row_start + s.n_docs] = src
        f.create_virtual_dataset("status", layout, fillvalue=255)


def bench(n, per_shard, ranks, tmp):
    from hpcllm.store.chunks import list_chunks
    from hpcllm.store.manifest import read_manifest

    corpus, out = os.path.join(tmp, f"c{n}.jsonl"), os.path.join(tmp, f"out{n}")
    make_corpus(corpus, n * per_shard)
    row = {"shards": n, "docs": n * per_shard, "load": f"{os.getloadavg()[0]:.0f}"}
    got, _ = run([sys.executable, "-c", PLAN, corpus, str(per_shard)])
    row["shards"], row["plan_s"], row["plan_rss_mb"] = int(got.split()[0]), *map(float, got.split()[1:])
    assert n <= row["shards"] <= 1.01 * n, row     # a few shards end at a scan block, shorter
    got, _ = run(["mpiexec", "-n", str(ranks), sys.executable, "-c", CLAIMS, str(n)])
    row["claim_us"] = float(got) / n * 1e6
    _, row["job_s"] = run(["mpiexec", "-n", str(ranks), sys.executable, "-m", "hpcllm", "tokenize", "--tokenizer",
                           os.path.join(minilm_dir(), "tokenizer.json"), "--input", corpus, "--output", out,
                           "--shard-docs", str(per_shard), "--progress", "0"])
    import h5py

    path = os.path.join(out, "results.h5")
    with h5py.File(path, "r") as f:
        timings = json.loads(f.attrs["timings"])
    row["rank0_rss_mb"] = timings[0]["peak_rss_mb"]
    row["master_s"] = os.stat(path).st_mtime - max(t["finished_at"] for t in timings)
    row["manifest_mb"] = os.path.getsize(os.path.join(out, "manifest.json")) / 2**20
    manifest = read_manifest(os.path.join(out, "manifest.json"))
    row["chunks"] = len(list_chunks(out))
    row["limit"] = 256 if n <= 2000 else 1024
    got, _ = run([sys.executable, "-c", READ, str(row["limit"]), path, "api"])
    rows, row["fill"], row["read_s"], row["api_fill"] = int(got.split()[0]), int(got.split()[1]), \
        float(got.split()[2]), int(got.split()[3])
    assert rows == row["docs"]
    if n <= 10_000:
        old = os.path.join(out, "old.h5")
        old_master(out, manifest.shards, old)
        row["old_fill"] = int(run([sys.executable, "-c", READ, str(row["limit"]), old])[0].split()[1])
    shutil.rmtree(out)
    os.remove(corpus)
    row["load"] += f"-{os.getloadavg()[0]:.0f}"
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--docs-per-shard", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=16)
    args = ap.parse_args()
    cols = ["shards", "docs", "plan_s", "plan_rss_mb", "manifest_mb", "job_s", "rank0_rss_mb", "claim_us",
            "master_s", "chunks", "limit", "read_s", "fill", "api_fill", "old_fill", "load"]
    print(" | ".join(cols), flush=True)
    tmp = tempfile.mkdtemp(prefix="hpcllm-scale-")
    try:
        for n in args.shards:
            row = bench(n, args.docs_per_shard, args.ranks, tmp)
            print(" | ".join(f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
                             for c in cols), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
