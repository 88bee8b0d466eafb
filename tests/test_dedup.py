"""`hpcllm dedup`: signatures against datasketch, the spill's merge, clusters against exact Jaccard,
1 / 2 / 4 ranks alike, resume, and `filter --where keep` / `report` on its results."""

import json
import os
import random
import subprocess
import sys

import datasketch
import h5py
import numpy as np
import pytest
from conftest import MPI_TIMEOUT, REPO, mpirun

from hpcllm.analysis.report import report
from hpcllm.cli import run
from hpcllm.dedup.lsh import bucket_edges
from hpcllm.dedup.runs import SortedRuns
from hpcllm.dedup.text import TextNormaliser, normalise
from hpcllm.jobs.dedup import DedupJob
from hpcllm.kernels.minhash import permutations, shingle_hash, signatures

NGRAM, THRESHOLD = 5, 0.7


def flat(texts):
    bufs = [t.encode() for t in texts]
    off = np.zeros(len(bufs) + 1, np.int64)
    np.cumsum([len(b) for b in bufs], out=off[1:])
    return np.frombuffer(b"".join(bufs), np.uint8), off


def shingles(text, n, words=True):
    units = text.split(" ") if words else list(text)
    if not text:
        return set()
    join = " ".join if words else "".join
    return {join(units[i:i + n]) for i in range(max(len(units) - n + 1, 1))}


@pytest.mark.parametrize("words,n", [(True, 3), (False, 5)])
def test_signatures_equal_datasketch(words, n):
    texts = [normalise(t, False) for t in ("the quick  brown fox jumps over the lazy dog", "two words", "",
                                           "héllo wörld, ünïcode — text and more", "日本語のテキスト 混在 text")]
    a, b = permutations(64, 7)
    sig, count = signatures(*flat(texts), n, words, a, b)
    for t, s, c in zip(texts, sig, count):
        m = datasketch.MinHash(64, seed=7, hashfunc=shingle_hash(words))
        m.update_batch([x.encode() for x in shingles(t, n, words)])
        units = len(t.split(" ")) if words else len(t)
        assert c == (max(units - n + 1, 1) if t else 0)
        np.testing.assert_array_equal(m.hashvalues, s)


def test_normaliser_flags_bad_utf8_and_simplifies():
    raw = ["Héllo,\t  World!\n".encode(), b"caf\xff ok", "Ｃａｆé 2024".encode()]
    offsets = np.cumsum([0] + [len(r) for r in raw])
    enc = TextNormaliser(True).encode_bytes(np.frombuffer(b"".join(raw), np.uint8), offsets)
    got = [bytes(enc.ids[enc.offsets[i]:enc.offsets[i + 1]]).decode() for i in range(3)]
    assert got == ["hello world", "caf\ufffd ok", "ｃａｆe 0"]
    assert enc.flags.tolist() == [0, 2, 0]


def test_spilled_runs_merge_in_key_order(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.permutation(np.arange(20000) % 50).astype(np.uint64)
    rec = np.stack([keys, np.arange(20000, dtype=np.uint64)], axis=1)
    runs = SortedRuns(str(tmp_path / "runs"), 1024 * 40)     # 1024 records in memory: ~20 runs
    for part in np.array_split(rec, 37):
        runs.add(part)
    chunks = list(runs.chunks())
    got = np.concatenate(chunks)
    assert runs.spilled >= 15 and len(chunks) > 1 and not list((tmp_path / "runs").iterdir())
    np.testing.assert_array_equal(got[:, 0], np.sort(rec[:, 0]))
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, rec.tolist()))
    # a bucket spread over chunks still links every row to the smallest of its bucket (folded as it goes)
    first = np.full(50, len(rec))
    np.minimum.at(first, rec[:, 0].astype(np.int64), np.arange(len(rec)))
    low = first[rec[:, 0].astype(np.int64)]
    dup = np.flatnonzero(low != np.arange(len(rec)))
    for fold in (100, 1 << 16):
        pairs = bucket_edges(iter(chunks), fold)
        np.testing.assert_array_equal(pairs, np.stack([dup, low[dup]], axis=1))


def planted(path, seed=0, n_base=150):
    """Unrelated documents, exact copies (some re-spaced / re-cased), copies with one line changed and
    half-changed ones (low Jaccard), shuffled; plus a bad JSON line."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    line = lambda: " ".join(rng.choice(vocab) for _ in range(10))   # noqa: E731
    docs = []
    for i in range(n_base):
        base = [line() for _ in range(12)]
        docs.append("\n".join(base))
        if i % 4 == 0:
            docs.append("  ".join(base))                     # exact after whitespace normalisation
        if i % 3 == 0:
            docs.append("\n".join(base[:5] + [line()] + base[6:]))
        if i % 5 == 0:
            docs.append("\n".join(base[:6] + [line() for _ in range(6)]))
    rng.shuffle(docs)
    with open(path, "w") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
            if i == 17:
                f.write("{not json\n")
    return [normalise(t, False) for t in docs[:18]] + [None] + [normalise(t, False) for t in docs[18:]]


def columns(out):
    with h5py.File(out / "results.h5", "r") as f:
        return {k: f[k][:] for k in ("dup_cluster", "dup_of", "keep", "status")}


def mpi_dedup(n, *groups):
    """`hpcllm dedup` once per group of arguments, in one mpiexec launch of n ranks."""
    args = [str(a) for g in groups for a in ("--then", *g, "--progress", "0")][1:]
    script = os.path.join(REPO, "tests", "mpi_scripts", "dedup_runs.py")
    p = subprocess.run(["mpiexec", "-n", str(n), sys.executable, script, *args], capture_output=True, text=True,
                       env=dict(os.environ, MPIEXEC_TIMEOUT=str(MPI_TIMEOUT)), timeout=MPI_TIMEOUT + 30)
    assert p.returncode == 0, p.stderr[-3000:]


def dedup(args):
    assert run(["dedup", *map(str, args), "--progress", "0"]) == 0


def components(n, pairs):
    """Each row's smallest row under ``pairs`` (a plain union-find), -1 for rows in no pair."""
    parent = list(range(n))
    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    linked = {x for p in pairs for x in p}
    return np.array([find(i) if i in linked else -1 for i in range(n)])


def planted_embeddings(out, embed_dir, n, dim=16, seed=0):
    """An embed-like result for the corpus dedup planned in ``out``: groups of 1-4 rows around a random
    direction (noise 0.05: within-group cosine > 0.99, across groups ~0), float32, NaN on the bad JSON row."""
    from hpcllm.store.manifest import read_manifest
    from hpcllm.store.master import build_master
    from hpcllm.store.results import BASE_COLUMNS, Column, write_shard

    rng = np.random.default_rng(seed)
    group = np.sort(rng.integers(0, n // 2, n))
    x = (rng.standard_normal((n // 2, dim))[group] + 0.05 * rng.standard_normal((n, dim))).astype(np.float32)
    x[18] = np.nan
    plan = read_manifest(str(out / "manifest.json")).shards
    schema = (Column("embedding", np.float32, (dim,), np.nan),) + BASE_COLUMNS
    with h5py.File(out / "results.h5", "r") as f:
        base = {c.name: f[c.name][:] for c in BASE_COLUMNS}
    for sh in plan:
        rows = slice(sh.row_start, sh.row_start + sh.n_docs)
        cols = {k: (np.array([v.decode() for v in base[k][rows]], dtype=object) if k == "doc_id" else base[k][rows])
                for k in base}
        write_shard(str(embed_dir), sh, {**cols, "embedding": x[rows]}, schema=schema)
    build_master(str(embed_dir), plan, schema)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(np.isnan(xn).any(axis=1)[:, None] | np.isnan(xn).any(axis=1)[None, :], -2, xn @ xn.T)


def test_dedup_clusters_against_exact_jaccard_ranks_resume_filter(tmp_path):
    corpus = tmp_path / "c.jsonl"
    texts = planted(corpus)
    common = ["--input", corpus, "--ngram", NGRAM, "--threshold", THRESHOLD, "--shard-docs", 60, "--num-perm", 128]
    dedup([*common, "--output", tmp_path / "one"])
    got = columns(tmp_path / "one")
    # oracle: exact Jaccard of every pair of normalised texts
    sets = [shingles(t, NGRAM) if t is not None else None for t in texts]
    n = len(sets)
    rows = [i for i in range(n) if sets[i] is not None]
    truth, exact = set(), set()
    for x in rows:
        for y in rows:
            if x < y and len(sets[x] | sets[y]):
                j = len(sets[x] & sets[y]) / len(sets[x] | sets[y])
                truth |= {(x, y)} if j >= THRESHOLD else set()
                exact |= {(x, y)} if texts[x] == texts[y] else set()
    def scores(cl):
        found = {(x, y) for x in rows for y in rows if x < y and cl[x] >= 0 and cl[x] == cl[y]}
        return exact <= found, len(found & truth) / len(truth), len(found & truth) / len(found)
    cl = got["dup_cluster"]
    assert len(exact) >= 30 and len(truth) > len(exact) + 30
    all_exact, recall, precision = scores(cl)
    assert all_exact and recall >= 0.95 and precision >= 0.95, (recall, precision)
    # 32 bands of 2 rows: half-changed copies (Jaccard ~0.3) become candidates too; --verify drops them
    loose = [*common, "--bands", 32, "--rows", 2]
    dedup([*loose, "--output", tmp_path / "loose"])
    assert scores(columns(tmp_path / "loose")["dup_cluster"])[2] < 0.9
    dedup([*loose, "--verify", "--output", tmp_path / "verified"])
    verified = columns(tmp_path / "verified")
    all_exact, recall, precision = scores(verified["dup_cluster"])
    assert all_exact and recall >= 0.95 and precision >= 0.95, (recall, precision)
    # kept: the smallest row of each cluster; dup_of points at it
    for i in range(n):
        members = np.flatnonzero(cl == cl[i]) if cl[i] >= 0 else [i]
        assert got["dup_of"][i] == min(members) and got["keep"][i] == (i == min(members))
    assert got["keep"][18] and cl[18] == -1 and got["status"][18] == 3       # the bad JSON line stays

    # semantic: an embed result's rows of cosine >= 0.9 joined; one k-means cluster: against every pair directly
    sim = planted_embeddings(tmp_path / "one", tmp_path / "emb", n)
    semantic = ["--input", corpus, "--embeddings", tmp_path / "emb", "--cosine", 0.9, "--shard-docs", 60]
    dedup([*semantic, "--kmeans", 1, "--output", tmp_path / "sem1"])
    want = components(n, [(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(sim >= 0.9, 1)))])
    assert 100 < (want >= 0).sum() < n - 20
    np.testing.assert_array_equal(columns(tmp_path / "sem1")["dup_cluster"], want)
    dedup([*semantic, "--kmeans", 4, "--output", tmp_path / "sem4"])
    sem4 = columns(tmp_path / "sem4")
    for c in np.unique(sem4["dup_cluster"][sem4["dup_cluster"] >= 0]):     # k-means only splits components
        assert len(set(want[sem4["dup_cluster"] == c])) == 1 and want[c] >= 0

    # 2 and 4 ranks (4: verified, and a tiny --memory-mb, so the band records spill to sorted runs) give the same;
    # the 2-rank launch also runs the semantic dedup at 4 k-means clusters
    mpi_dedup(2, [*common, "--output", tmp_path / "two"], [*semantic, "--kmeans", 4, "--output", tmp_path / "sem4x2"])
    for k in got:
        np.testing.assert_array_equal(columns(tmp_path / "sem4x2")[k], sem4[k])
    p = mpirun(4, ["dedup", *loose, "--verify", "--output", tmp_path / "four", "--memory-mb", 0.01])
    assert "sorted runs spilled on rank 0" in p.stderr + p.stdout and " 0 sorted runs" not in p.stderr + p.stdout
    for other, want in (("two", got), ("four", verified)):
        o = columns(tmp_path / other)
        for k in got:
            np.testing.assert_array_equal(o[k], want[k])

    # resume: a run stopped in the global phase (shard files with placeholder columns, signatures saved),
    # one shard then lost, and the rerun: it redoes that shard and the global phase from the signatures
    original = DedupJob.after_shards
    DedupJob.after_shards = lambda self, out, plan, mesh, stop: original(self, out, plan, mesh, StopNow())
    try:
        assert run(["dedup", *map(str, common), "--output", str(tmp_path / "stopped"), "--progress", "0"]) == 75
    finally:
        DedupJob.after_shards = original
    (tmp_path / "stopped" / "shards" / "shard-00002.h5").unlink()
    dedup([*common, "--output", tmp_path / "stopped"])
    dedup([*common, "--output", tmp_path / "stopped"])     # and once more, everything done already
    o = columns(tmp_path / "stopped")
    for k in got:
        np.testing.assert_array_equal(o[k], got[k])

    # filter --where keep: the deduplicated corpus, byte-exact
    assert run(["filter", str(tmp_path / "one"), "--where", "keep", "--output", str(tmp_path / "kept.jsonl")]) == 0
    lines = corpus.read_bytes().splitlines(keepends=True)
    assert (tmp_path / "kept.jsonl").read_bytes() == b"".join(l for l, k in zip(lines, got["keep"]) if k)

    # report: duplicates, cluster sizes and the rate per source, as the columns say
    _, text = report([str(tmp_path / "one")], str(tmp_path / "report"))
    sizes = np.unique(cl[cl >= 0], return_counts=True)[1]
    n_dup = int((~got["keep"]).sum())
    assert f"duplicates: {n_dup} of {n} rows in {len(sizes)} clusters; cluster sizes: 2: {(sizes == 2).sum()}" in text
    assert f"c.jsonl: {100 * n_dup / n:.2f} % duplicates ({n_dup} of {n})" in text


class StopNow:
    def should_stop(self, comm):
        return True
