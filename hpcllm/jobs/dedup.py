"""`hpcllm dedup`: exact and near-duplicate documents (MinHash LSH) -> a cluster and a keep flag per row.

Phase 1 is the executor's shards, with no model: the job's "tokenizer" gives
each document's normalised UTF-8 (``hpcllm.dedup.text``), and a shard's
MinHash signatures (``hpcllm.kernels.minhash``, datasketch's scheme) and
exact-text hashes are saved to ``OUT/dedup/shard-NNNNN.npz`` before its
result file, whose cluster columns are placeholders until phase 2.  A rerun
skips the shards done, as every job's does.

Phase 2 (``after_shards``, every rank): the band buckets are met across ranks
and joined into clusters (``hpcllm.dedup.lsh``), then each rank rewrites its
share of the shard files with ``dup_cluster`` / ``dup_of`` / ``keep``, before
rank 0 consolidates them into chunks (``hpcllm.store.chunks``; a shard found
in a chunk on a rerun is final already).  It
reruns whole from the saved signatures when it had not finished (stop
signal, crash), and gives the same clusters at any number of ranks.
"""

import os
import shutil
from dataclasses import dataclass, field
from types import SimpleNamespace

import h5py
import numpy as np

from hpcllm.dedup.lsh import Clusters, local_shards, optimal_bands, shard_records
from hpcllm.dedup.runs import SortedRuns
from hpcllm.dedup.text import TextNormaliser
from hpcllm.dedup.verify import verified
from hpcllm.errors import HpcllmError
from hpcllm.executor.job import Job, ShardResult, Totals
from hpcllm.progress import log
from hpcllm.store.atomic import atomic_path
from hpcllm.store.layout import shard_file
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, Column, write_shard

DEDUP_DIR = "dedup"     # OUT/dedup/: the shards' signatures, and the spilled runs while phase 2 runs


def signature_file(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, DEDUP_DIR, f"shard-{index:05d}.npz")


@dataclass
class DedupResult(ShardResult):
    """A shard's result plus what is saved beside its file for phase 2 (signatures, shingle sets)."""
    saved: dict = field(default_factory=dict)


class DedupJob(Job):
    name = "dedup"
    needs_model = False
    partial_results = False    # clusters exist once every shard is in

    def __init__(self, cfg, ckpt):
        super().__init__(cfg, ckpt)
        if cfg.follow:
            raise HpcllmError("dedup: --follow is not supported: clusters need the whole corpus")
        if cfg.num_perm < 1 or cfg.ngram < 1 or not 0.0 < cfg.threshold <= 1.0 or cfg.memory_mb <= 0:
            raise HpcllmError(f"dedup: --num-perm {cfg.num_perm} and --ngram {cfg.ngram} must be >= 1, "
                              f"--threshold {cfg.threshold} in (0, 1], --memory-mb {cfg.memory_mb} > 0")
        if cfg.embeddings and (cfg.verify or cfg.store_minhash):
            raise HpcllmError("dedup: --verify and --store-minhash are options of MinHash dedup, not of --embeddings")
        if cfg.embeddings and (cfg.kmeans < 1 or cfg.kmeans_iter < 0 or not -1.0 <= cfg.cosine <= 1.0):
            raise HpcllmError(f"dedup: --kmeans {cfg.kmeans} must be >= 1, --kmeans-iter {cfg.kmeans_iter} >= 0, "
                              f"--cosine {cfg.cosine} in [-1, 1]")
        if (cfg.bands is None) != (cfg.rows is None):
            raise HpcllmError("dedup: give both --bands and --rows, or neither (then --threshold chooses them)")
        self.bands, self.rows = ((cfg.bands, cfg.rows) if cfg.bands is not None
                                 else optimal_bands(cfg.threshold, cfg.num_perm))
        if self.bands < 1 or self.rows < 1 or self.bands * self.rows > cfg.num_perm:
            raise HpcllmError(f"dedup: --bands {self.bands} x --rows {self.rows} must be >= 1 and at most "
                              f"--num-perm {cfg.num_perm}")
        from hpcllm.kernels.minhash import permutations

        self.a, self.b = permutations(cfg.num_perm, cfg.seed)
        self.tokenizer = TextNormaliser(cfg.simplify)

    def tokenizer_json(self):
        return ""

    def model_hash(self):
        return "dedup"

    def config_hash(self):
        embeddings = os.path.abspath(self.cfg.embeddings) if self.cfg.embeddings else None
        return self.cfg.result_hash(self.name, seed=self.cfg.seed, bands=self.bands, rows=self.rows,
                                    embeddings=embeddings)

    def describe(self):
        c = self.cfg
        if c.embeddings:
            return f"semantic: {c.embeddings}, {c.kmeans} k-means clusters, cosine >= {c.cosine}"
        return (f"{c.ngram}-{c.shingle} shingles, {c.num_perm} permutations, {self.bands} bands x {self.rows} rows"
                f"{', simplified text' if c.simplify else ''}{', verified' if c.verify else ''}")

    def schema(self):
        cols = (Column("dup_cluster", np.int64, (), -1), Column("dup_of", np.int64, (), -1),
                Column("keep", np.bool_, (), False))
        if self.cfg.store_minhash:
            cols += (Column("minhash", np.uint32, (self.cfg.num_perm,), 0),)
        return BASE_COLUMNS + (N_TOKENS,) + cols

    def start(self, work):
        from hpcllm.kernels.minhash import doc_hashes, shingle_sets, signatures

        buf = np.asarray(work.ids, np.uint8)
        processed = np.zeros(work.n_docs, bool)
        processed[work.process] = True
        saved = {"processed": processed}
        if not self.cfg.embeddings:    # semantic dedup keeps nothing of the text: its vectors are the embed run's
            saved["sig"], saved["count"] = signatures(buf, work.offsets, self.cfg.ngram, self.cfg.shingle == "word",
                                                      self.a, self.b)
            saved["exact"] = doc_hashes(buf, work.offsets)
        if self.cfg.verify:     # each document's shingle set, for the exact Jaccard of --verify
            saved["shingles"], saved["shingle_offsets"] = shingle_sets(buf, work.offsets, self.cfg.ngram,
                                                                       self.cfg.shingle == "word")
        return SimpleNamespace(batches=[], saved=saved)

    def result(self, state):
        n = len(state.saved["processed"])
        cols = {"dup_cluster": np.full(n, -1, np.int64), "dup_of": np.full(n, -1, np.int64),
                "keep": np.zeros(n, bool)}
        if self.cfg.store_minhash:
            cols["minhash"] = state.saved["sig"]
        return DedupResult(cols, saved=state.saved)

    def write_shard(self, out_dir, data, result, attrs):
        """The signatures first (atomically), then the shard's file: a shard done has both."""
        path = signature_file(out_dir, data.shard.index)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **result.saved)
        return super().write_shard(out_dir, data, result, attrs)

    def after_shards(self, out_dir, plan, mesh, stop):
        """Phase 2: clusters from every shard's signatures, written into this rank's share of the shard files."""
        comm = mesh.world
        local = local_shards(plan, comm)
        runs = SortedRuns(os.path.join(out_dir, DEDUP_DIR, f"runs-{mesh.rank}"), int(self.cfg.memory_mb * 2**20))
        if self.cfg.embeddings:
            clusters = self._semantic(plan, local, comm, stop)
        else:
            verify = None
            if self.cfg.verify:
                verify = lambda links: verified(comm, plan, links, lambda s: saved_sets(out_dir, s),  # noqa: E731
                                                self.cfg.threshold)
            clusters = Clusters.find(comm, self._records, local, self.bands, self.rows, runs, stop, verify)
        if clusters is None:
            return True
        for shard in local:
            if os.path.exists(shard_file(out_dir, shard.index)):   # else in a chunk already, final (a rerun)
                _rewrite(out_dir, shard, clusters.columns(shard.row_start, shard.n_docs), self.schema())
        self.n_dup = len(clusters.rows)
        shutil.rmtree(runs.directory, ignore_errors=True)
        comm.Barrier()
        if mesh.rank == 0:
            log(f"dedup: {len(clusters.rows)} duplicate rows in {len(clusters.roots)} clusters; "
                f"{runs.spilled} sorted runs spilled on rank 0")
        return False

    def _semantic(self, plan, local, comm, stop):
        """--embeddings: the clusters of ``hpcllm.dedup.semantic``; None if stopped."""
        from hpcllm.dedup.semantic import kmeans, load_embeddings, semantic_clusters

        c = self.cfg
        parts = load_embeddings(c.embeddings, plan, local)
        if stop.should_stop(comm):
            return None
        labels = kmeans(comm, parts, c.kmeans, c.kmeans_iter, sum(s.n_docs for s in plan))
        return None if stop.should_stop(comm) else semantic_clusters(comm, parts, labels, c.cosine)

    def _records(self, shard):
        return saved_records(self.cfg.output, shard, self.bands, self.rows)

    def totals(self, out_dir, plan):
        if self.cfg.embeddings:
            return Totals(attrs={"n_duplicates": self.n_dup},
                          summary=f"{self.n_dup} duplicates (keep false), cosine >= {self.cfg.cosine}")
        return Totals(attrs={"bands": self.bands, "rows": self.rows, "n_duplicates": self.n_dup},
                      summary=f"{self.n_dup} duplicates (keep false), {self.bands} bands x {self.rows} rows")


def saved_records(out_dir, shard, bands, rows):
    """The band records (``hpcllm.dedup.lsh.shard_records``) of a shard, from its saved signatures."""
    try:
        with np.load(signature_file(out_dir, shard.index)) as z:
            return shard_records(z["sig"], z["count"], z["exact"], z["processed"], shard.row_start, bands, rows)
    except OSError as e:
        raise HpcllmError(f"dedup: cannot read the signatures of shard {shard.index} ({e}); remove "
                          f"{shard_file(out_dir, shard.index)} and rerun to compute them again") from None


def saved_sets(out_dir, shard):
    """A shard's saved shingle sets (--verify): sorted distinct hashes per row, flat + offsets."""
    with np.load(signature_file(out_dir, shard.index)) as z:
        return z["shingles"], z["shingle_offsets"]


def _rewrite(out_dir, shard, columns, schema):
    """A shard file again, with the cluster columns filled (atomically, as the executor wrote it)."""
    with h5py.File(shard_file(out_dir, shard.index), "r") as f:
        old = {c.name: f[c.name][()] for c in schema}
        attrs = dict(f.attrs)
    old["doc_id"] = np.array([v.decode() if isinstance(v, bytes) else v for v in old["doc_id"]], dtype=object)
    write_shard(out_dir, shard, {**old, **columns}, attrs, schema)
