"""The SPMD job loop shared by every model job (embed, score).

    plan (manifest, resume) -> dp groups claim shards from a shared counter ->
    the group leader reads + tokenizes (the next shard prefetched in a thread,
    overlapping the forward pass) -> broadcast to the tp group, so every rank
    of a group sees the identical batch -> batches -> model -> the leader
    writes the shard file -> rank 0 joins all shards into results.h5.

A job (``EmbedJob``, ``ScoreJob``) supplies only its result columns and what
it computes for a shard's batches; it does not know how it was launched.
"""

import concurrent.futures
import json
import os
import time

import h5py
import numpy as np
import torch

from hpcllm import __version__
from hpcllm.checkpoint.hdf5 import Checkpoint
from hpcllm.corpus.plan import load_or_create_manifest, make_plan
from hpcllm.corpus.readers import DocReader, list_inputs
from hpcllm.corpus.tokens import open_token_dir, read_token_shard
from hpcllm.world.mesh import Mesh, set_threads
from hpcllm.world.slurm import check_launch, provenance
from hpcllm.errors import HpcllmError
from hpcllm.jobs.common import NOT_PROCESSED, SharedCounters, encode_docs, peak_rss_mb, pending_shards
from hpcllm.model.build import build_model
from hpcllm.progress import Progress, Timers, breakdown_table, log
from hpcllm.signals import EXIT_REQUEUE, StopFlag, signal_name, write_stop_note
from hpcllm.tokenizer import Tokenizer


class ShardData:
    """A shard read and tokenized by the group leader: what every tp rank needs, plus rows to write."""

    def __init__(self, shard, docs, enc, status):
        self.shard, self.docs, self.status = shard, docs, status
        self.ids, self.offsets = enc.ids, enc.offsets
        self.process = np.flatnonzero(~np.isin(status, NOT_PROCESSED))

    def for_workers(self):
        return (self.ids, self.offsets, self.process)


def run_job(cfg, job_cls) -> int:
    """Run a job on MPI.COMM_WORLD; returns the process exit code."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    check_launch(world.Get_size())
    mesh = Mesh.create(world, cfg.tp, cfg.comm, cfg.device)
    threads = set_threads(mesh.local_size, cfg.threads)
    ckpt = Checkpoint(cfg.model)
    job = job_cls(cfg, ckpt)
    tokens = open_token_dir(cfg.input)  # pre-tokenized input: one job shard per token shard
    if tokens:  # checked before the model loads: a mismatch fails in a second, not after the load
        tokens.check(ckpt.tokenizer_json, job.max_length, cfg.model)
    tokenizer = Tokenizer.from_str(ckpt.tokenizer_json)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    model = build_model(ckpt, mesh.tp_rank, mesh.tp_size, mesh.tp, dtype).to(cfg.device)
    inputs = tokens.files if tokens else list_inputs(cfg.input, cfg.format)
    manifest = load_or_create_manifest(
        cfg.output, (lambda: tokens.plan) if tokens else
        (lambda: plan_corpus(inputs, cfg, world, mesh.dp_size)),
        ckpt.content_hash, cfg.result_hash(job.name), comm=world, inputs=inputs)
    plan = manifest.shards
    todo = pending_shards(cfg.output, plan, world)
    if world.Get_rank() == 0:
        log(f"{job.name}: {len(plan)} shards ({len(plan) - len(todo)} already done), world {mesh.describe()}, "
            f"{threads} threads/rank, model {os.path.basename(cfg.model)} ({ckpt.content_hash[:12]})")
    loop = GroupLoop(cfg, mesh, job, model, tokenizer, todo, from_tokens=tokens is not None)
    with StopFlag() as stop:
        stopped = loop.run(stop)
    return finish(cfg, mesh, job, ckpt, plan, loop, stopped, stop)


def plan_corpus(inputs, cfg, world, dp_size: int, shards_per_group: int = 4):
    """The shard plan, cut finer when the corpus is small so that every dp group gets work.

    ``--shard-docs`` is the most documents a shard holds; a corpus with fewer
    than ``shards_per_group`` shards per dp group is re-cut into that many
    (the plan is stored in the manifest, so a resumed run keeps it).
    """
    plan = make_plan(inputs, cfg.shard_docs, comm=world, fmt=cfg.format)
    total, want = sum(s.n_docs for s in plan), shards_per_group * dp_size
    if len(plan) < want and total > len(plan):
        plan = make_plan(inputs, max(1, -(-total // want)), comm=world, fmt=cfg.format)
    return plan


class GroupLoop:
    """One tp group working through shards it claims."""

    def __init__(self, cfg, mesh, job, model, tokenizer, todo, from_tokens=False):
        self.cfg, self.mesh, self.job, self.model, self.tokenizer, self.todo = cfg, mesh, job, model, tokenizer, todo
        self.from_tokens = from_tokens
        # used only by the prefetch thread; keeps a gz file open across its shards
        self.reader = DocReader(cfg.text_field, cfg.id_field, cfg.max_doc_bytes)
        self.timers = Timers()
        self.counters = SharedCounters(mesh.world)
        self.docs_done = 0
        self.tokens_done = 0
        self.shards_done = 0
        self.finished_at = None
        self.slowdown = _debug_slowdown(mesh.dp_rank)
        self._computed = 0.0
        self.weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        self.progress = Progress(sum(s.n_docs for s in todo), cfg.progress) if mesh.rank == 0 else None

    def claim(self):
        i = self.counters.claim() if self.mesh.is_group_leader else None
        i = self.mesh.tp_mpi.bcast(i, root=0)
        return self.todo[i] if i < len(self.todo) else None

    def load(self, shard) -> ShardData:
        if self.from_tokens:
            with self.timers.phase("read"):
                return ShardData(shard, *read_token_shard(shard))
        with self.timers.phase("read"):
            docs = self.reader.read(shard)
        with self.timers.phase("tokenize"):
            enc, status = encode_docs(self.tokenizer, docs, self.job.max_length)
        return ShardData(shard, docs, enc, status)

    def run(self, stop) -> bool:
        """Process shards until none are left; True if stopped early by a signal.

        The next shard is claimed late, before the last eighth of the current
        shard's batches, and read + tokenized in a thread while those run: a
        slow group does not sit on a claimed shard that a faster group could
        have taken, yet the next shard is ready when the current one ends.
        """
        pool = concurrent.futures.ThreadPoolExecutor(1) if self.mesh.is_group_leader else None
        tp = self.mesh.tp_mpi

        def claim_and_load():
            shard = self.claim()
            return shard, (pool.submit(self.load, shard) if pool and shard else None)

        shard, future = claim_and_load()
        try:
            while shard is not None:
                with self.timers.phase("idle"):
                    data = future.result() if future else None
                    work = tp.bcast(data.for_workers() if data else None, root=0)
                if stop.should_stop(tp):
                    return True
                following = []

                def at_batch(k, n):
                    self._slow_down()
                    if not following and k >= n - max(1, n // 8):
                        following.append(claim_and_load())
                    return stop.should_stop(tp)

                outputs = self.job.run(self.model, *work, self.tokenizer, self.timers, at_batch)
                self._slow_down()
                if outputs is None:  # stopped between batches: drop this shard
                    return True
                if not following:  # a shard with nothing to compute
                    following.append(claim_and_load())
                if data is not None:
                    self.write(data, outputs)
                shard, future = following[0]
            return False
        finally:
            self.finished_at = time.time()
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
            self.reader.close()

    def _slow_down(self):
        """Testing aid (HPCLLM_DEBUG_SLOWDOWN): this dp group's compute takes ``slowdown`` times as long."""
        if self.slowdown > 1:
            computed = self.timers.seconds["compute"]
            time.sleep((self.slowdown - 1) * (computed - self._computed))
            self._computed = computed

    def write(self, data: ShardData, outputs: dict):
        from hpcllm.results import base_columns, write_shard

        n_tokens = np.zeros(len(data.status), np.int32)
        n_tokens[data.process] = np.diff(data.offsets)[data.process]
        columns = {**base_columns(data.shard, data.docs), "status": data.status, "n_tokens": n_tokens, **outputs}
        with self.timers.phase("write"):
            write_shard(self.cfg.output, data.shard, columns, schema=self.job.schema())
        tokens = int(n_tokens.sum())
        self.shards_done += 1
        self.docs_done += len(data.status)
        self.tokens_done += tokens
        self.counters.add_done(len(data.status), tokens)
        if self.progress:
            self.progress.maybe_print(*self.counters.done())


def finish(cfg, mesh, job, ckpt, plan, loop, stopped, stop) -> int:
    """Agree on the outcome world-wide; rank 0 writes results.h5 or the stop note."""
    world = mesh.world
    loop.timers.seconds["comm"] = mesh.tp.seconds
    loop.timers.seconds["compute"] -= mesh.tp.seconds  # collectives run inside the forward pass
    rows = world.gather({"rank": world.Get_rank(), "dp_rank": mesh.dp_rank, "tp_rank": mesh.tp_rank,
                         "seconds": loop.timers.seconds, "docs": loop.docs_done, "tokens": loop.tokens_done,
                         "shards": loop.shards_done, "finished_at": loop.finished_at,
                         "peak_rss_mb": peak_rss_mb(), "weights_mb": loop.weights_mb}, root=0)
    any_stopped = world.allreduce(int(stopped), op=_mpi_max())
    error = None
    if world.Get_rank() == 0:
        loop.progress.maybe_print(*loop.counters.done(), force=True)
        try:
            if any_stopped:
                write_stop_note(cfg.output, {"signal": signal_name(stop.agreed_signum or stop.signum),
                                             "shards_total": len(plan)})
            else:
                _write_master(cfg, mesh, job, ckpt, plan, rows)
        except HpcllmError as exc:
            error = str(exc)
        log("time per rank (s):\n" + breakdown_table(rows))
    loop.counters.free()
    error = world.bcast(error, root=0)
    if error:
        raise HpcllmError(error)
    if any_stopped:
        if world.Get_rank() == 0:
            log(f"stopped early by a signal; rerun the same command to finish (exit {EXIT_REQUEUE})")
        return EXIT_REQUEUE
    return 0


def _write_master(cfg, mesh, job, ckpt, plan, rows):
    from hpcllm.results import build_master

    attrs = {"job": job.name, "model": os.path.abspath(cfg.model), "model_hash": ckpt.content_hash,
             "model_source": ckpt.source, "config": cfg.as_dict(), "code_version": __version__,
             "world": mesh.describe(), "timings": rows, "slurm": provenance(), "finished": time.time()}
    path = build_master(cfg.output, plan, job.schema(), attrs)
    with h5py.File(path, "r") as f:
        counts = json.loads(f.attrs["status_counts"])
    log(f"wrote {path}: {sum(counts.values())} documents; status counts: "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if v))


def _debug_slowdown(dp_rank: int) -> float:
    """HPCLLM_DEBUG_SLOWDOWN="<dp_rank>:<factor>" slows one dp group (benchmarks, tests of claiming)."""
    spec = os.environ.get("HPCLLM_DEBUG_SLOWDOWN")
    if not spec:
        return 1.0
    group, _, factor = spec.partition(":")
    return float(factor) if int(group) == dp_rank else 1.0


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX
