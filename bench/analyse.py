"""Benchmark: `hpcllm report` / `export` / `filter` vs what a user writes by hand, on a synthetic score
results dir (score columns + doc ids, 8 shards, written with hpcllm's own write_shard / build_master).

    python bench/analyse.py --rows 10000000

report: hpcllm report (streaming sketches, PNGs, index.html) against h5py -> pandas.describe() +
quantiles + the same histograms with matplotlib.
export: hpcllm export -> Parquet, against h5py -> pandas.DataFrame -> to_parquet (pyarrow).
filter: `status == ok and perplexity <= q(0.6)` -> kept.jsonl.gz, against h5py columns + numpy.quantile +
the corpus read line by line into a gzip file.  Each side runs as its own process on the same cores
(start-up and imports included); prints seconds, peak RSS and the ratio.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py, also under PYTHONSAFEPATH=1

from common import analysis_helpers, timed_peak  # noqa: E402

PEER_EXPORT = """
import sys, h5py, pandas as pd
with h5py.File(sys.argv[1] + "/results.h5") as f:
    df = pd.DataFrame({k: (f[k].asstr()[:] if k == "doc_id" else f[k][:]) for k in
                       ("doc_id", "source", "line", "status", "logprob_sum", "n_tokens", "perplexity")})
df.to_parquet(sys.argv[2], engine="pyarrow")
"""
PEER_REPORT = """
import sys, h5py, numpy as np, pandas as pd, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
with h5py.File(sys.argv[1] + "/results.h5") as f:
    df = pd.DataFrame({k: f[k][:] for k in ("status", "logprob_sum", "n_tokens", "perplexity")})
print(df.status.value_counts(), df.describe(percentiles=[.01, .1, .5, .9, .99]))
for k in ("logprob_sum", "n_tokens", "perplexity"):
    plt.figure(); plt.hist(df[k][np.isfinite(df[k])], bins=60); plt.title(k); plt.savefig(sys.argv[2] + k + ".png")
"""
PEER_FILTER = """
import gzip, sys, h5py, numpy as np
with h5py.File(sys.argv[1] + "/results.h5") as f:
    status, ppl = f["status"][:], f["perplexity"][:]
keep = (status == 0) & (ppl <= np.quantile(ppl[status == 0], 0.6))
with open(sys.argv[2], "rb") as src, gzip.open(sys.argv[3], "wb", compresslevel=6) as out:
    for k, line in zip(keep, src):
        if k:
            out.write(line)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    make_results = analysis_helpers().make_results

    d = a.dir or tempfile.mkdtemp(prefix="bench-analyse-")
    out, corpus = os.path.join(d, "out"), os.path.join(d, "corpus.jsonl")
    if not os.path.exists(os.path.join(out, "results.h5")):
        make_results(out, corpus, a.rows, shard_docs=-(-a.rows // 8), shard_attrs=False)
    hp = [sys.executable, "-m", "hpcllm"]
    rows = []
    for what, ours, peer in (
            ("report (HTML + PNGs)", hp + ["report", out, "--output", os.path.join(d, "report")],
             [sys.executable, "-c", PEER_REPORT, out, os.path.join(d, "peer-")]),
            ("export -> Parquet", hp + ["export", out, "--output", os.path.join(d, "a.parquet")],
             [sys.executable, "-c", PEER_EXPORT, out, os.path.join(d, "b.parquet")]),
            ("filter q(0.6) -> .jsonl.gz", hp + ["filter", out, "--where", "status == ok and perplexity <= q(0.6)",
                                                 "--output", os.path.join(d, "a.jsonl.gz")],
             [sys.executable, "-c", PEER_FILTER, out, corpus, os.path.join(d, "b.jsonl.gz")])):
        (ts, ms), (tp, mp) = timed_peak(ours), timed_peak(peer)
        rows.append({"what": what, "rows": a.rows, "hpcllm_s": round(ts, 2), "hpcllm_peak_mib": round(ms),
                     "peer_s": round(tp, 2), "peer_peak_mib": round(mp), "speed_ratio": round(tp / ts, 2)})
        print(f"{what}: {a.rows:,} rows  hpcllm {ts:.2f} s, peak {ms:.0f} MiB | peer {tp:.2f} s, peak {mp:.0f} MiB"
              f" | ratio {tp / ts:.2f}x", flush=True)
    import gzip
    same = gzip.open(os.path.join(d, "a.jsonl.gz")).read() == gzip.open(os.path.join(d, "b.jsonl.gz")).read()
    print(json.dumps({"filter_outputs_identical": same, "results": rows}))


if __name__ == "__main__":
    main()
