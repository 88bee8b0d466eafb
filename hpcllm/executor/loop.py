"""One tp group working through the shards it claims.

    claim (leader, shared counter) -> read + tokenize in a thread (leader) ->
    broadcast to the tp group, so every rank sees the identical batch ->
    job.start / job.compute per batch / job.result -> the leader writes the shard

The next shard is claimed late, before the last eighth of the current shard's
batches (at once for a shard without batches), and read + tokenized in a
thread while those run: a slow group does not sit on a claimed shard that a
faster group could have taken, yet the next shard is ready when the current
one ends.  At every batch boundary the group agrees whether to stop: a stop
signal received by any rank of the world reaches every group through the
shared counters.  The leader adds each batch's tokens to them
(``Job.batch_progress``; the rest of a shard's when it is written) and each
loaded shard's documents and tokens, from which rank 0's progress thread
prints tokens done and an ETA by tokens.
The leader narrows a shard to the rows whose documents the group has not
computed yet before the broadcast, and fills the others after the job's result
(hpcllm.executor.repeats).
A unit of work may be one part of a shard (hpcllm.executor.parts): the group
computes its run of the shard's batches, writes them, and merges the shard
file if every other part is written already.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from typing import NamedTuple

from hpcllm.executor.follow import END, SKIP
from hpcllm.executor.job import ShardData
from hpcllm.executor.parts import part_batches, read_parts, remove_parts, write_part
from hpcllm.executor.repeats import Repeats
from hpcllm.progress import Progress, Timers
from hpcllm.world.collective import from_root
from hpcllm.world.counters import SharedCounters


class ShardRun(NamedTuple):
    """A shard's (or part's) batches run: the job's state, the batches this group ran, and the next
    shard claimed on the way (a (shard, future) pair)."""
    state: object
    batches: list
    next: tuple


class GroupLoop:
    """``todo``: the shards to do (a list), or, in follow mode, a FollowShards that grows."""

    def __init__(self, mesh, job, model, tokenizer, inputs, todo, out_dir, progress_s, first=0):
        self.mesh, self.job, self.model, self.tokenizer = mesh, job, model, tokenizer
        self.inputs, self.todo, self.out_dir = inputs, todo, out_dir
        self.follow = None if isinstance(todo, list) else todo
        self.timers = Timers()
        self.repeats = Repeats(job, job.cfg)
        self.counters = SharedCounters(mesh.world, first)
        self.docs_done = self.tokens_done = self.shards_done = 0
        self._reported = 0     # tokens of the current shard already added by batch_progress
        self.finished_at = None
        self.progress = (Progress(sum({s.index: s.n_docs for s in todo}.values()), progress_s)
                         if mesh.rank == 0 and self.follow is None else None)
        self._stop = None
        self._raised = False

    # ------------------------------------------------------------------ claiming and loading

    def claim(self):
        """The next shard for this group (None: no more); in follow mode its index, resolved by load."""
        i = self.counters.claim() if self.mesh.is_group_leader else None
        i = from_root(self.mesh.tp_mpi, i)
        if self.follow is not None:
            return i
        return self.todo[i] if i < len(self.todo) else None

    def load(self, shard):
        if self.follow is not None:    # wait until admitted; may be END / SKIP
            got = self.follow.resolve(shard, self._stopping)
            if not isinstance(got, tuple):
                return got
            shard, entry = got
            if self.follow.changed(shard, entry):
                return self.follow.changed_rows(shard)
        data = self.inputs.load(shard, self.tokenizer, self.job.max_length, self.timers, self.job.skip_long)
        with self.timers.phase("tokenize"):
            self.repeats.key(data)
        return data

    def _stopping(self) -> bool:
        """A stop signal here or anywhere in the world (no collective: for the prefetch thread)."""
        return bool(self._stop.signum) or self.counters.stop_signal() != 0

    def _claim_and_load(self, pool):
        shard = self.claim()
        return shard, (pool.submit(self.load, shard) if pool and shard is not None else None)

    # ------------------------------------------------------------------ stopping

    def should_stop(self) -> bool:
        """Collective over the tp group, at a batch boundary: has any rank of the world been signalled?"""
        stop = self._stop.should_stop(self.mesh.tp_mpi, self.counters.stop_signal())
        # Raised after agreeing: a signal landing while this group agrees makes it stop, so it must
        # reach the other groups too (raised before, it could miss them: they then ran to the end).
        if self._stop.signum and not self._raised:
            self.counters.raise_stop(self._stop.signum)
            self._raised = True
        return stop

    # ------------------------------------------------------------------ the loop

    def run(self, stop) -> bool:
        """Process shards until none are left; True if stopped early by a signal."""
        self._stop = stop
        pool = concurrent.futures.ThreadPoolExecutor(1) if self.mesh.is_group_leader else None
        end_ticker = self.progress.start(self.counters.progress) if self.progress else None
        shard, future = self._claim_and_load(pool)
        try:
            while shard is not None:
                part = (0, 1) if self.follow is not None else (shard.part, shard.parts)
                with self.timers.phase("idle"):
                    data = future.result() if future else None
                    # a part's rows: the same at every part's group (each makes the same batches)
                    work = self.repeats.narrow(data, across=part[1] == 1) if isinstance(data, ShardData) else data
                    work = from_root(self.mesh.tp_mpi, work)
                if work == SKIP:               # follow mode: an earlier run did this shard
                    shard, future = self._claim_and_load(pool)
                    continue
                if work == END:                # follow mode: the job is to end, or stop
                    return self.should_stop()
                if isinstance(data, ShardData) and self.follow is None and part[0] == 0:   # for the ETA
                    self.counters.add_loaded(len(data.status), int(data.n_tokens().sum()))
                started = time.time()
                if self.should_stop():
                    return True
                ran = self._run_shard(work, lambda: self._claim_and_load(pool), part)
                if ran is None:   # stopped between batches: drop this shard
                    return True
                if data is not None and part[1] > 1:
                    self.write_part(data, shard, ran, started)
                elif data is not None:
                    self.write(data, self.job.result(ran.state), started)
                shard, future = ran.next
            return False
        finally:
            self.finished_at = time.time()
            if end_ticker:
                end_ticker()
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
            self.inputs.close()

    def _run_shard(self, work, claim_next, part=(0, 1)) -> "ShardRun | None":
        """The job's batches of one shard (of a part: its run of them); claims the next shard on
        the way. None if stopped."""
        state = self.job.start(work)
        batches = [state.batches[k] for k in part_batches(len(state.batches), *part)]
        following = None
        self._reported = 0
        if not batches:
            following = claim_next()
        for k, batch in enumerate(batches):
            if following is None and k >= len(batches) - max(1, len(batches) // 8):
                following = claim_next()
            if k and self.should_stop():
                return None
            with self.timers.phase("compute"):
                self.job.compute(self.model, state, batch)
            if self.mesh.is_group_leader and (tokens := self.job.batch_progress(state, batch)):
                self.counters.add_done(0, tokens)
                self._reported += tokens
        return ShardRun(state, batches, following)

    def write_part(self, data, shard, ran: "ShardRun", started: float):
        """Write this part's results; the group that finds every part written merges them and
        writes the shard file (hpcllm.executor.parts)."""
        who = {"part": shard.part, "rank": self.mesh.rank, "dp_rank": self.mesh.dp_rank,
               "seconds": time.time() - started, "reported": self._reported}
        state = ran.state
        with self.timers.phase("write"):
            write_part(self.out_dir, shard, self.job.part_outputs(state, ran.batches), who)
            got = read_parts(self.out_dir, shard)
        if got is None:
            return
        for arrays, attrs in got:
            if int(attrs["part"]) != shard.part:
                self.job.merge_part(state, arrays)
        self._reported = sum(int(attrs["reported"]) for _, attrs in got)
        parts = [{k: (v.item() if hasattr(v, "item") else v) for k, v in a.items()} for _, a in got]
        self.write(data, self.job.result(state), started, {"parts": parts})
        remove_parts(self.out_dir, shard)

    def write(self, data, result, started: float, extra: dict | None = None):
        """Write the shard file; its attributes say who computed it and how long it took (seconds)
        (a shard of several parts: also who computed each, ``parts``)."""
        attrs = {"rank": self.mesh.rank, "dp_rank": self.mesh.dp_rank, "host": socket.gethostname(),
                 "seconds": time.time() - started, "finished_at": time.time(), **(extra or {})}
        with self.timers.phase("write"):
            tokens = self.job.write_shard(self.out_dir, data, self.repeats.fill(data, result), attrs)
            self.repeats.publish(data)
        self.shards_done += 1
        self.docs_done += len(data.status)
        self.tokens_done += tokens
        self.counters.add_done(len(data.status), tokens - self._reported)
