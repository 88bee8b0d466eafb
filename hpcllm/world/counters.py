"""World-wide counters on rank 0, MPI one-sided: the next shard to claim, work done, a stop signal.

Dynamic claiming: a dp group's leader fetch-and-adds the ``next`` slot and
gets a shard index nobody else will get, so fast and slow groups end
together.  ``add_done`` / ``add_loaded`` / ``progress`` feed rank 0's progress
line (documents and tokens done; documents and tokens of the shards loaded so
far, from which the ETA extrapolates the total tokens).  ``stop``
carries a stop signal world-wide: a rank that got SIGUSR1/SIGTERM raises it,
and every group sees it at its next batch boundary, although groups are at
different batches (a blocking all-reduce over the world cannot be used there).
In follow mode rank 0 publishes how many shards are admitted so far and, once
the job is to end, the total (``FINAL``; -1 while open).

MPICH completes a one-sided op at its target only while the target is inside
an MPI call; rank 0 computes for seconds without one, so other ranks' claims
waited for its next shard (measured: a 2.8 s claim, and one of two ranks
idle most of a tokenize run).  A thread on rank 0 polls MPI every 2 ms, so
a claim takes milliseconds.

A rank waiting for its op polled too, without giving up the core; where
ranks share cores (16 on 2 here) the waiting ranks took the CPU rank 0's
poller needed, and a tokenize run of 1,000 small shards spent most of its
time in these ops.  So every process holds one passive epoch on the window
for its whole life (``Lock_all``), and an op is a request, waited on by
sleeping between tests.
"""

import threading
import time

import numpy as np

NEXT, DOCS, TOKENS, STOP, ADMITTED, FINAL, LOADED_DOCS, LOADED_TOKENS = range(8)
# ADMITTED, FINAL: follow mode (shards known, last one); LOADED_*: progress (shards read and tokenized)
N_SLOTS = 8
WAIT_S = 0.0002     # between tests of an op's request


class SharedCounters:
    def __init__(self, world, first: int = 0):
        from mpi4py import MPI

        self.MPI = MPI
        nbytes = N_SLOTS * 8 if world.Get_rank() == 0 else 0
        self.win = MPI.Win.Allocate(nbytes, 8, comm=world)
        if world.Get_rank() == 0:
            slots = np.frombuffer(self.win.tomemory(), dtype=np.int64)
            slots[:] = 0
            slots[NEXT], slots[FINAL] = first, -1
        self.win.Lock_all()          # one epoch for the window's life: an op is a request, waited on quietly
        self._poll_comm = world.Dup()
        self._lock = threading.Lock()     # rank 0's admitter thread and the loop share the window
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
        with self._lock:              # one op per process at a time (rank 0's admitter thread and the loop)
            req = self.win.Rget_accumulate(np.array([value], np.int64), out, 0, (slot, 1, self.MPI.INT64_T), op)
            while not req.Test():
                time.sleep(WAIT_S)
        return int(out[0])

    def claim(self) -> int:
        """The next shard index (0, 1, 2, ... across all callers, each handed out once)."""
        return self._op(NEXT, 1, self.MPI.SUM)

    def add_done(self, docs: int, tokens: int):
        self._op(DOCS, docs, self.MPI.SUM)
        self._op(TOKENS, tokens, self.MPI.SUM)

    def done(self) -> tuple[int, int]:
        return self._op(DOCS, 0, self.MPI.NO_OP), self._op(TOKENS, 0, self.MPI.NO_OP)

    def add_loaded(self, docs: int, tokens: int):
        self._op(LOADED_DOCS, docs, self.MPI.SUM)
        self._op(LOADED_TOKENS, tokens, self.MPI.SUM)

    def progress(self) -> tuple[int, int, int, int]:
        """(docs done, tokens done, docs loaded, tokens loaded), world-wide."""
        return (*self.done(), self._op(LOADED_DOCS, 0, self.MPI.NO_OP), self._op(LOADED_TOKENS, 0, self.MPI.NO_OP))

    def raise_stop(self, signum: int):
        """Record a stop signal world-wide (the largest signal number wins)."""
        self._op(STOP, int(signum), self.MPI.MAX)

    def stop_signal(self) -> int:
        """The stop signal some rank raised, or 0."""
        return self._op(STOP, 0, self.MPI.NO_OP)

    def get(self, slot: int) -> int:
        return self._op(slot, 0, self.MPI.NO_OP)

    def set(self, slot: int, value: int):
        self._op(slot, value, self.MPI.REPLACE)

    def free(self):
        if self._poller:
            self._stop.set()
            self._poller.join()
        self._poll_comm.Free()
        self.win.Unlock_all()
        self.win.Free()
