"""Running a job on MPI.COMM_WORLD: set up, loop, agree on the outcome, finish.

    world + mesh (dp groups x tp ranks) -> threads -> the job and its model ->
    the plan (manifest: resume, or refuse a changed model/options/input) ->
    every group's GroupLoop -> the world agrees (stopped or done) -> rank 0
    writes the master file (or the stop note) and the timing table.

Exit codes: 0 done, 75 (EXIT_REQUEUE) stopped early by SIGUSR1/SIGTERM (the
sbatch templates requeue; a rerun resumes), an HpcllmError is raised on every
rank alike (the CLI prints one line and exits 2).
"""

from __future__ import annotations

import os
import shutil
import time
from types import SimpleNamespace

from hpcllm import __version__
from hpcllm.errors import HpcllmError
from hpcllm.executor.inputs import Inputs
from hpcllm.executor.loop import GroupLoop
from hpcllm.executor.parts import split_plan, units
from hpcllm.progress import breakdown_table, log
from hpcllm.signals import EXIT_REQUEUE, StopFlag, signal_name, write_stop_note
from hpcllm.store.atomic import remove_temporaries
from hpcllm.store.layout import CHUNKS_DIR, PARTS_DIR, REPEATS_DIR, SHARDS_DIR
from hpcllm.store.manifest import completed_shards, load_or_create_manifest
from hpcllm.store.master import consolidate
from hpcllm.world.collective import agree_any, on_root
from hpcllm.world.launch import check_launch
from hpcllm.world.mesh import Mesh, set_threads
from hpcllm.world.slurm import provenance


def run_job(cfg, job_cls) -> int:
    """Run ``job_cls`` with options ``cfg`` on every rank; returns the process exit code."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    check_launch(world.Get_size())
    job = job_cls(cfg, job_cls.open_model(cfg) if cfg.model else None)
    if job.needs_model:
        import torch  # noqa: F401  (loaded before set_threads, which sets its thread count)
    mesh = Mesh.create(world, cfg.tp if job.needs_model else 1, cfg.comm if job.needs_model else "none", cfg.device)
    threads = set_threads(mesh.local_size, cfg.threads)
    inputs = Inputs(cfg, extract=job.text_of, min_shard_docs=job.min_shard_docs, params_of=job.params_of)
    if inputs.tokens and not job.needs_model:
        raise HpcllmError(f"{job.name}: {cfg.input} is a directory of token shards already; give the raw corpus")
    if inputs.tokens and job.text_of is not None:   # e.g. generate --chat renders each JSON line's template
        raise HpcllmError(f"{job.name}: {cfg.input} is a directory of token shards, tokenized from the text field "
                          f"alone; {job.text_of_needs or 'this job'} needs the raw JSON lines: give the raw corpus")
    # checked before the model loads: a mismatch fails in a second, not after the load
    inputs.check_tokens(job.tokenizer_json(), job.token_shard_limit(), cfg.model or cfg.tokenizer)
    from hpcllm.tokenizer import Tokenizer

    tokenizer = job.tokenizer or Tokenizer.from_str(job.tokenizer_json(), source=cfg.model or cfg.tokenizer,
                                                    apply_file_settings=False)
    model = _build_model(job, mesh) if job.needs_model else None
    manifest, todo, first = (_follow_plan if cfg.follow else _static_plan)(cfg, job, world, mesh, inputs)
    if world.Get_rank() == 0:
        log(f"{job.name}: {len(manifest.shards)} shards ({'following ' + cfg.input + ', ' if cfg.follow else ''}"
            f"{first if cfg.follow else len(manifest.shards) - len(todo)} already done), world {mesh.describe()}, "
            f"{threads} threads/rank, {job.describe()}")
    loop = GroupLoop(mesh, job, model, tokenizer, inputs, todo, cfg.output, cfg.progress, first)
    with StopFlag() as stop:      # held until the end: a job's phase after the shards stops on it too
        if cfg.follow:
            todo.start(loop.counters, stop)
        try:
            stopped = loop.run(stop)
        finally:
            if cfg.follow:
                todo.stop()
        if cfg.follow:
            world.Barrier()      # rank 0 compacted the log: everyone sees every admitted shard
            todo.admissions.reload()
            manifest = SimpleNamespace(shards=todo.admissions.plan(), config_hash=job.config_hash())
            if todo.error:
                raise HpcllmError(todo.error)
        return finish(cfg, mesh, job, manifest, loop, stopped, stop, model)


def _static_plan(cfg, job, world, mesh, inputs):
    """The manifest (created, or reused and checked), the shards still to do, and 0."""
    def plan_fn():
        plan = inputs.plan(world, mesh.dp_size)
        return split_plan(plan, mesh.dp_size) if job.splits_shards and not inputs.tokens else plan
    manifest = load_or_create_manifest(cfg.output, plan_fn, job.model_hash(), job.config_hash(), comm=world,
                                       inputs=inputs.files)
    plan = manifest.shards

    def todo():          # rank 0, before any group writes: what a killed run left half-written goes
        for d in (SHARDS_DIR, PARTS_DIR, CHUNKS_DIR, REPEATS_DIR):
            remove_temporaries(os.path.join(cfg.output, d))
        done = completed_shards(cfg.output, plan)
        return [u for s in plan if s.index not in done for u in units(cfg.output, s)]
    return manifest, on_root(world, todo), 0


def _follow_plan(cfg, job, world, mesh, inputs):
    """Follow mode: the admitted files so far, the growing shard list, and where claiming starts."""
    from hpcllm.executor.follow import FollowShards

    def prepare():       # rank 0, before any rank reads the output directory
        os.makedirs(cfg.output, exist_ok=True)
        for d in (SHARDS_DIR, CHUNKS_DIR, REPEATS_DIR):
            remove_temporaries(os.path.join(cfg.output, d))
        remove_temporaries(cfg.output)
    on_root(world, prepare)
    follow = FollowShards(cfg, job, world)
    first = on_root(world, follow.first_pending)
    return SimpleNamespace(shards=follow.admissions.plan()), follow, first


def _build_model(job, mesh):
    import torch

    from hpcllm.model.build import build_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job.cfg.dtype]
    return build_model(job.ckpt, mesh.tp_rank, mesh.tp_size, mesh.tp_comm, dtype, job.cfg.device)


def _rank_row(mesh, loop, model) -> dict:
    """This rank's line of the timing table (also stored in the master's ``timings``)."""
    seconds = dict(loop.timers.seconds)
    if mesh.tp_comm is not None:   # collectives run inside the forward pass
        seconds["comm"] = mesh.tp_comm.seconds
        seconds["compute"] -= mesh.tp_comm.seconds
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 if model is not None else 0.0
    row = {"rank": mesh.rank, "dp_rank": mesh.dp_rank, "tp_rank": mesh.tp_rank, "seconds": seconds,
           "docs": loop.docs_done, "tokens": loop.tokens_done, "shards": loop.shards_done,
           "finished_at": loop.finished_at, "peak_rss_mb": peak_rss_mb(), "weights_mb": weights}
    if model is not None and getattr(model, "has_experts", False):
        from hpcllm.model.moe import rank_load

        row["expert_tokens"] = rank_load(model)   # token x expert products this rank's experts computed
    return row


def finish(cfg, mesh, job, manifest, loop, stopped, stop, model) -> int:
    """Agree on the outcome world-wide; rank 0 writes the master file or the stop note."""
    world = mesh.world
    stopped = agree_any(world, stopped)
    if not stopped:      # the job's own phase after the shards (train-classifier trains), collective
        with loop.timers.phase("compute"):
            stopped = job.after_shards(cfg.output, manifest.shards, mesh, stop)
    rows = world.gather(_rank_row(mesh, loop, model), root=0)

    def outcome():       # rank 0
        if loop.progress:
            loop.progress.maybe_print(*loop.counters.progress(), force=True)
        try:
            if stopped:
                write_stop_note(cfg.output, {"signal": signal_name(stop.agreed_signum or stop.signum),
                                             "shards_total": len(manifest.shards)})
                log(f"stopped early by a signal; rerun the same command to finish (exit {EXIT_REQUEUE})")
            else:
                attrs = {"job": job.name, "model": os.path.abspath(cfg.model) if cfg.model else None,
                         "model_hash": job.model_hash(),
                         "model_source": job.ckpt.source if job.ckpt is not None else None,
                         "config": cfg.as_dict(), "config_hash": manifest.config_hash,
                         "code_version": __version__, "world": mesh.describe(), "timings": rows,
                         "slurm": provenance(), "finished": time.time()}
                log(job.finish(cfg.output, manifest.shards, attrs))
                shutil.rmtree(os.path.join(cfg.output, REPEATS_DIR), ignore_errors=True)   # executor/repeats.py
        finally:
            log("time per rank (s):\n" + breakdown_table(rows))
    try:
        if not stopped:  # every rank copies some shard files into chunks; rank 0's master finds them done
            consolidate(cfg.output, manifest.shards, job.master_schema(), cfg.chunk_mb, world)
        on_root(world, outcome)     # an error there is raised on every rank
    finally:
        loop.counters.free()
    return EXIT_REQUEUE if stopped else 0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
