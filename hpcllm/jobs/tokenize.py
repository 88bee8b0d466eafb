"""`hpcllm tokenize`: a raw corpus -> HDF5 token shards (hpcllm.corpus.tokens), on every rank.

Every rank is its own worker (no model, so no tp group): it claims the next
shard of the plan from the shared counter, reads it while the previous one is
tokenized and written (a prefetch thread: reading and JSON parsing hold the
GIL, the tokenizer kernels release it), and writes one token shard file per
corpus shard.  A rank holds at most two shards at a time, so memory does not
grow with the corpus.  The output directory's manifest makes reruns resume;
``tokens.json`` is written last, by rank 0, once every shard is complete.
"""

import concurrent.futures
import dataclasses
import os
import time

import numpy as np

from hpcllm.config import JobConfig
from hpcllm.errors import HpcllmError

# JobConfig options that tokenize shares with the model jobs (same meaning, defaults and help)
SHARED = ("input", "output", "text_field", "id_field", "format", "max_doc_bytes", "shard_docs",
          "threads", "progress")


def add_parsers(sub):
    p = sub.add_parser("tokenize", help="tokenize a corpus into HDF5 token shards (input of embed/score)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HDF5 checkpoint: tokenize with its tokenizer (and its max length)")
    src.add_argument("--tokenizer", help="a HF tokenizer.json")
    fields = {f.name: f for f in dataclasses.fields(JobConfig)}
    for name in SHARED:
        f = fields[name]
        p.add_argument("--" + name.replace("_", "-"), type=f.type, default=f.default,
                       choices=f.metadata["choices"], help=f.metadata["help"])
    p.add_argument("--max-length", type=int, default=None,
                   help="max tokens per document incl. special tokens (default: an encoder model's; "
                        "no limit for a decoder, which scores long documents with a sliding window, "
                        "or for --tokenizer)")
    p.set_defaults(func=run)
    return p


def _tokenizer_and_length(args):
    """(tokenizer.json text, its source, max_length) from --model or --tokenizer."""
    if args.tokenizer:
        try:
            with open(args.tokenizer, encoding="utf-8") as f:
                return f.read(), os.path.abspath(args.tokenizer), args.max_length
        except OSError as e:
            raise HpcllmError(f"cannot read tokenizer file {args.tokenizer}: {e.strerror}") from None
    from hpcllm.checkpoint.hdf5 import Checkpoint

    with Checkpoint(args.model) as ckpt:
        default = None
        if ckpt.architecture == "bert":   # what `embed` truncates to (EmbedJob)
            default = min(ckpt.config["max_length"], ckpt.config["max_positions"])
        return ckpt.tokenizer_json, os.path.abspath(args.model), args.max_length or default


def run(args) -> int:
    from mpi4py import MPI

    from hpcllm.corpus.plan import hash_config, load_or_create_manifest, make_plan
    from hpcllm.corpus.readers import list_inputs
    from hpcllm.corpus.tokens import tokenizer_hash
    from hpcllm.world.mesh import set_threads
    from hpcllm.world.slurm import check_launch
    from hpcllm.jobs.common import pending_shards
    from hpcllm.progress import log
    from hpcllm.signals import StopFlag
    from hpcllm.tokenizer import Tokenizer

    world = MPI.COMM_WORLD
    check_launch(world.Get_size())
    for name in ("input", "output"):
        if getattr(args, name) is None:
            raise HpcllmError(f"tokenize: --{name} is required")
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    threads = set_threads(node.Get_size(), args.threads)
    node.Free()
    text, source, max_length = _tokenizer_and_length(args)
    tokenizer = Tokenizer.from_str(text, source=source)
    tok_hash = tokenizer_hash(text)
    options = {"job": "tokenize", "max_length": max_length, "text_field": args.text_field,
               "id_field": args.id_field, "format": args.format, "max_doc_bytes": args.max_doc_bytes,
               "shard_docs": args.shard_docs}
    inputs = list_inputs(args.input, args.format)
    manifest = load_or_create_manifest(
        args.output, lambda: make_plan(inputs, args.shard_docs, comm=world, fmt=args.format),
        tok_hash, hash_config(options), comm=world, inputs=inputs)
    plan = manifest.shards
    todo = pending_shards(args.output, plan, world)
    if world.Get_rank() == 0:
        log(f"tokenize: {len(plan)} shards ({len(plan) - len(todo)} already done), {world.Get_size()} ranks, "
            f"{threads} threads/rank, tokenizer {source} ({tok_hash[:12]}), max_length {max_length}")
    worker = Worker(args, world, tokenizer, todo, {"tokenizer_hash": tok_hash, "max_length": max_length})
    with StopFlag() as stop:
        stopped = worker.run(stop)
    info = {"tokenizer_hash": tok_hash, "tokenizer_source": source, "max_length": max_length,
            "options": options, "config_hash": manifest.config_hash, "inputs": manifest.inputs}
    return worker.finish(plan, stopped, stop, info)


class Worker:
    """One rank claiming, reading, tokenizing and writing shards."""

    def __init__(self, args, world, tokenizer, todo, shard_attrs):
        from hpcllm.jobs.common import SharedCounters
        from hpcllm.progress import Progress, Timers

        self.args, self.world, self.tokenizer, self.todo = args, world, tokenizer, todo
        self.max_length = shard_attrs["max_length"]
        self.shard_attrs = {**shard_attrs, "max_length": self.max_length or -1}   # -1: no limit (NO_LIMIT)
        self.timers = Timers()
        self.counters = SharedCounters(world)
        self.docs = self.tokens = self.shards = 0
        self.finished_at = None
        self.progress = Progress(sum(s.n_docs for s in todo), args.progress) if world.Get_rank() == 0 else None

    def claim(self):
        i = self.counters.claim()
        return self.todo[i] if i < len(self.todo) else None

    def read(self, shard):
        from hpcllm.corpus.readers import read_docs

        with self.timers.phase("read"):
            return read_docs(shard, self.args.text_field, self.args.id_field, self.args.max_doc_bytes)

    def run(self, stop) -> bool:
        """Work until no shard is left; True if stopped early by a signal (checked between shards)."""
        pool = concurrent.futures.ThreadPoolExecutor(1)
        shard = self.claim()
        future = pool.submit(self.read, shard) if shard else None
        try:
            while shard is not None:
                with self.timers.phase("idle"):
                    docs = future.result()
                if stop.should_stop():
                    return True
                next_shard = self.claim()
                future = pool.submit(self.read, next_shard) if next_shard else None
                self.write(shard, docs)
                shard = next_shard
            return False
        finally:
            self.finished_at = time.time()
            pool.shutdown(wait=True, cancel_futures=True)

    def write(self, shard, docs):
        from hpcllm.corpus.tokens import write_token_shard
        from hpcllm.jobs.common import NOT_PROCESSED, encode_docs

        with self.timers.phase("tokenize"):
            enc, status = encode_docs(self.tokenizer, docs, self.max_length)
        with self.timers.phase("write"):
            _, n_tokens = write_token_shard(self.args.output, shard, docs, enc.ids, enc.offsets, status,
                                            NOT_PROCESSED, self.shard_attrs)
        self.docs, self.tokens, self.shards = self.docs + len(docs), self.tokens + n_tokens, self.shards + 1
        self.counters.add_done(len(docs), n_tokens)
        if self.progress:
            self.progress.maybe_print(*self.counters.done())

    def finish(self, plan, stopped, stop, info) -> int:
        """Agree on the outcome; rank 0 writes tokens.json (all shards done) or the stop note."""
        from mpi4py import MPI

        from hpcllm.jobs.common import peak_rss_mb
        from hpcllm.progress import breakdown_table, log
        from hpcllm.signals import EXIT_REQUEUE, signal_name, write_stop_note

        rows = self.world.gather({"rank": self.world.Get_rank(), "seconds": self.timers.seconds,
                                  "docs": self.docs, "tokens": self.tokens, "shards": self.shards,
                                  "finished_at": self.finished_at, "peak_rss_mb": peak_rss_mb(),
                                  "weights_mb": 0.0}, root=0)
        any_stopped = self.world.allreduce(int(stopped), op=MPI.MAX)
        error = None
        if self.world.Get_rank() == 0:
            self.progress.maybe_print(*self.counters.done(), force=True)
            try:
                if any_stopped:
                    write_stop_note(self.args.output, {"signal": signal_name(stop.signum) if stop.signum else None,
                                                       "shards_total": len(plan)})
                else:
                    _write_info(self.args.output, plan, {**info, "timings": rows})
            except (HpcllmError, OSError) as exc:
                error = str(exc)
            log("time per rank (s):\n" + breakdown_table(rows))
        self.counters.free()
        error = self.world.bcast(error, root=0)
        if error:
            raise HpcllmError(error)
        if any_stopped:
            if self.world.Get_rank() == 0:
                log(f"stopped early by a signal; rerun the same command to finish (exit {EXIT_REQUEUE})")
            return EXIT_REQUEUE
        return 0


def _write_info(out_dir, plan, info):
    """Check every token shard, total them, and write tokens.json (the completion marker)."""
    import h5py

    from hpcllm.corpus.plan import shard_file
    from hpcllm.corpus.tokens import write_info
    from hpcllm.progress import log
    from hpcllm.status import Status

    counts, n_tokens = np.zeros(256, np.int64), 0
    for s in plan:
        path = shard_file(out_dir, s.index)
        try:
            with h5py.File(path, "r") as f:
                if int(f.attrs["n_docs"]) != s.n_docs or f["status"].shape != (s.n_docs,):
                    raise HpcllmError(f"token shard {path} does not hold the {s.n_docs} documents of its plan")
                counts += np.bincount(f["status"][:], minlength=256)
                n_tokens += int(f["offsets"][-1])
        except (OSError, KeyError) as e:
            raise HpcllmError(f"token shard {path} is missing or unreadable ({e}); rerun to complete it") from None
    statuses = {Status(c).name: int(counts[c]) for c in np.flatnonzero(counts)}
    path = write_info(out_dir, {**info, "n_shards": len(plan), "n_docs": int(counts.sum()),
                                "n_tokens": n_tokens, "status_counts": statuses, "finished": time.time()})
    log(f"wrote {path}: {int(counts.sum())} documents, {n_tokens} tokens in {len(plan)} shards; status counts: "
        + ", ".join(f"{k} {v}" for k, v in statuses.items()))
