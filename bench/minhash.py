"""Benchmark: MinHash signatures per second on one core, hpcllm's kernel against datasketch and rensa.

    RAYON_NUM_THREADS=1 python bench/minhash.py [--docs 2000] [--num-perm 128] [--ngram 5]
    python bench/minhash.py --phase2 OUT [--memory-mb 4 64 1024]

Documents are 2..12 fortunes joined (bench/corpus.py's recipe), normalised
once (NFC, whitespace collapsed; not timed).  Every peer gets the same
5-word shingles and computes one signature of ``--num-perm`` permutations per
document, on one thread (Numba's threads set to 1; rensa's Rust threads via
RAYON_NUM_THREADS=1, which this script sets when unset):

* hpcllm: ``hpcllm.kernels.minhash.signatures`` over the flat UTF-8 bytes
  (shingling included);
* datasketch 2.0: ``MinHash(num_perm).update_batch(shingles)`` per document,
  its default sha1 hash (and once more with hpcllm's shingle hash,
  ``shingle_hash``, where the signatures must equal hpcllm's: checked);
* rensa: ``RMinHash.digest_matrix_from_token_sets`` (its bulk path) over
  the shingle lists, with and without building those lists in Python.

Prints documents/s of each and hpcllm's ratio to each, all in one run.

``--phase2 OUT``: the global phase of a finished ``hpcllm dedup`` run in OUT
again, in this process as one rank, once per ``--memory-mb``: the peak of
numpy's allocations in it (tracemalloc), the band records' size, the sorted
runs spilled and the clusters (which must not change).
"""

import argparse
import os
import random
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
from common import corpora  # noqa: E402


def documents(n, seed=0):
    from hpcllm.dedup.text import normalise

    texts = [t for pool in corpora.all_fortunes().values() for t in pool]
    rng = random.Random(seed)
    return [normalise("\n\n".join(rng.choice(texts) for _ in range(rng.randint(2, 12))), False) for _ in range(n)]


def shingle_lists(docs, n):
    out = []
    for d in docs:
        w = d.split(" ") if d else []
        out.append([" ".join(w[i:i + n]) for i in range(max(len(w) - n + 1, 1))] if w else [])
    return out


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--ngram", type=int, default=5)
    p.add_argument("--phase2", metavar="OUT", help="measure the global phase of this finished dedup run")
    p.add_argument("--memory-mb", type=float, nargs="+", default=[4, 64, 1024])
    args = p.parse_args()
    if args.phase2:
        return phase2(args.phase2, args.memory_mb)
    import numba
    import rensa
    from datasketch import MinHash

    from hpcllm.kernels.minhash import permutations, shingle_hash, signatures

    numba.set_num_threads(1)
    docs, P, n = documents(args.docs), args.num_perm, args.ngram
    bufs = [d.encode() for d in docs]
    off = np.zeros(len(bufs) + 1, np.int64)
    np.cumsum([len(b) for b in bufs], out=off[1:])
    buf = np.frombuffer(b"".join(bufs), np.uint8)
    a, b = permutations(P, 1)
    signatures(buf[:off[2]], off[:3], n, True, a, b)    # compiled (or loaded from cache) before timing
    rows = {}
    rows["hpcllm (Numba kernel)"], (sig, _) = best_of(lambda: signatures(buf, off, n, True, a, b))

    def sketch(hashfunc=None, lists=None):
        out = []
        for sh in lists:
            m = MinHash(P, seed=1, hashfunc=hashfunc) if hashfunc else MinHash(P, seed=1)
            m.update_batch([s.encode() for s in sh])
            out.append(m.hashvalues)
        return np.array(out)
    lists = shingle_lists(docs, n)
    rows["datasketch (sha1)"], _ = best_of(lambda: sketch(lists=shingle_lists(docs, n)), 1)
    rows["datasketch (hpcllm's hash)"], ds = best_of(lambda: sketch(shingle_hash(True), shingle_lists(docs, n)), 1)
    if not np.array_equal(ds, sig):
        sys.exit("datasketch with hpcllm's hash gave other signatures")
    rows["rensa (shingles in Python)"], _ = best_of(
        lambda: rensa.RMinHash.digest_matrix_from_token_sets(shingle_lists(docs, n), P, 1))
    rows["rensa (shingles given)"], _ = best_of(lambda: rensa.RMinHash.digest_matrix_from_token_sets(lists, P, 1))
    mb = len(buf) / 1e6
    print(f"{len(docs)} documents, {mb:.1f} MB, {sum(map(len, lists))} shingles ({n}-word), {P} permutations, "
          f"1 thread each")
    ours = rows["hpcllm (Numba kernel)"]
    print(f"{'':34s} {'docs/s':>10s} {'MB/s':>8s} {'hpcllm x':>9s}")
    for name, t in rows.items():
        print(f"{name:34s} {len(docs) / t:10.0f} {mb / t:8.2f} {t / ours:9.2f}")


def phase2(out, budgets):
    import json
    import tempfile
    import tracemalloc

    import h5py

    from hpcllm.dedup.lsh import Clusters
    from hpcllm.dedup.runs import SortedRuns
    from hpcllm.jobs.dedup import saved_records
    from hpcllm.store.manifest import read_manifest

    plan = read_manifest(os.path.join(out, "manifest.json")).shards
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        bands, rows = int(f.attrs["bands"]), int(f.attrs["rows"])
        keep = f["keep"][:]
    size = sum(len(saved_records(out, s, bands, rows)) for s in plan) * 16 / 2**20

    class Never:
        def should_stop(self, comm):
            return False
    print(f"{sum(s.n_docs for s in plan)} documents, {bands} bands x {rows} rows: {size:.1f} MiB of band records")
    print(f"{'--memory-mb':>12s} {'numpy peak MiB':>15s} {'runs':>5s} {'seconds':>8s}")
    for mb in budgets:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            runs = SortedRuns(tmp, int(mb * 2**20))
            tracemalloc.start()
            t = time.perf_counter()
            clusters = Clusters.find(None, lambda s: saved_records(out, s, bands, rows), list(plan), bands, rows,
                                     runs, Never())
            seconds = time.perf_counter() - t
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        got = np.concatenate([clusters.columns(s.row_start, s.n_docs)["keep"] for s in plan])
        if not np.array_equal(got, keep):
            sys.exit(json.dumps({"memory_mb": mb, "error": "other keep flags than the run's"}))
        print(f"{mb:12g} {peak:15.1f} {runs.spilled:5d} {seconds:8.1f}")


if __name__ == "__main__":
    main()
