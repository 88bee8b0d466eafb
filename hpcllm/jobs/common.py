"""What every job loop shares, without torch (the tokenize job runs without it):
the shared shard counter, tokenizing a shard into final statuses, the shards
still to do, peak memory."""

import threading

import numpy as np

from hpcllm.corpus.plan import completed_shards
from hpcllm.status import Status
from hpcllm.tokenizer import FLAG_BAD_UTF8, FLAG_TRUNCATED

NOT_PROCESSED = (Status.BAD_JSON, Status.MISSING_FIELD, Status.TOO_LONG)


class SharedCounters:
    """Three int64 counters on world rank 0 (next shard, docs done, tokens done), MPI one-sided.

    MPICH completes a one-sided op at its target only while the target is inside
    an MPI call; rank 0 computes for seconds without one, so other ranks' claims
    waited for its next shard (measured: a 2.8 s claim, and one of two ranks
    idle most of a tokenize run).  A thread on rank 0 polls MPI every 2 ms, so
    a claim takes milliseconds.
    """

    def __init__(self, world):
        from mpi4py import MPI

        self.MPI = MPI
        nbytes = 3 * 8 if world.Get_rank() == 0 else 0
        self.win = MPI.Win.Allocate(nbytes, 8, comm=world)
        if world.Get_rank() == 0:
            np.frombuffer(self.win.tomemory(), dtype=np.int64)[:] = 0
        self._poll_comm = world.Dup()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True) if world.Get_rank() == 0 else None
        if self._poller:
            self._poller.start()
        world.Barrier()

    def _poll(self):
        while not self._stop.wait(0.002):
            self._poll_comm.Iprobe()

    def _op(self, slot, value, op):
        out = np.zeros(1, np.int64)
        self.win.Lock(0, self.MPI.LOCK_SHARED)
        self.win.Fetch_and_op(np.array([value], np.int64), out, 0, slot, op)
        self.win.Unlock(0)
        return int(out[0])

    def claim(self) -> int:
        return self._op(0, 1, self.MPI.SUM)

    def add_done(self, docs: int, tokens: int):
        self._op(1, docs, self.MPI.SUM)
        self._op(2, tokens, self.MPI.SUM)

    def done(self) -> tuple[int, int]:
        return self._op(1, 0, self.MPI.NO_OP), self._op(2, 0, self.MPI.NO_OP)

    def free(self):
        if self._poller:
            self._stop.set()
            self._poller.join()
        self._poll_comm.Free()
        self.win.Free()


def final_status(reader_status: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """One status per document: reader errors, then bad UTF-8, then truncation, else ok/empty."""
    status = reader_status.copy()
    open_ = ~np.isin(status, NOT_PROCESSED)
    status[open_ & ((flags & FLAG_BAD_UTF8) != 0)] = Status.BAD_UTF8
    status[open_ & (status != Status.BAD_UTF8) & ((flags & FLAG_TRUNCATED) != 0)] = Status.TRUNCATED
    return status


def encode_docs(tokenizer, docs, max_length):
    """Tokenize a shard's documents (special tokens added) -> (Encoding, final status)."""
    lens = np.fromiter((len(t) for t in docs.texts), np.int64, len(docs.texts))
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    buf = np.frombuffer(b"".join(docs.texts), np.uint8)
    enc = tokenizer.encode_bytes(buf, offsets, max_length=max_length, add_special_tokens=True)
    return enc, final_status(docs.status, enc.flags)


def pending_shards(out_dir, plan, world):
    """The plan's shards without a result file yet, as rank 0 sees them, on every rank."""
    return world.bcast([s for s in plan if s.index not in completed_shards(out_dir, plan)]
                       if world.Get_rank() == 0 else None, root=0)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
