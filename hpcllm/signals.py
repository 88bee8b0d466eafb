"""Stopping early on SIGUSR1/SIGTERM, so a Slurm job can be requeued and resume.

Slurm's ``--signal=B:USR1@300`` warns the batch script 300 s before the time
limit; the sbatch templates forward it to srun, which forwards it to every
rank (and ``scancel``/the time limit send SIGTERM). A rank cannot act on the
signal where it arrives: stopping in the middle of a collective would leave
the other ranks waiting forever. So the handler only sets a flag, and at each
batch boundary all ranks agree (an all-reduce of the flag) and stop together:

    with StopFlag() as stop:
        for batch in batches:
            if stop.should_stop(world):
                write_stop_note(out_dir, {...})     # one rank
                sys.exit(EXIT_REQUEUE)
            run(batch)

``EXIT_REQUEUE`` (75, EX_TEMPFAIL) is the exit code that tells the sbatch
templates "stopped early on a signal, please requeue"; the rerun resumes from
the shard files that are complete.
"""

import json
import os
import signal
import socket
import time

from hpcllm.store.atomic import write_text
from hpcllm.store.layout import STOP_NOTE
from hpcllm.world.collective import agree_max  # MPI is imported only when a comm is given

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later".
EXIT_REQUEUE = 75


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Handlers for SIGUSR1/SIGTERM that only record the signal.

    ``signum`` is the last stop signal this process received (None before).
    ``close()`` (or leaving the ``with`` block) restores the previous
    handlers. Must be created in the main thread (a Python rule for signals).
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signum = None
        self.agreed_signum = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # Only set the flag: anything more (I/O, MPI) is unsafe here, because
        # the handler runs between two bytecodes of whatever the rank was doing.
        self.signum = signum

    def __bool__(self):
        return self.signum is not None

    def should_stop(self, comm=None, elsewhere: int = 0) -> bool:
        """Whether every rank of ``comm`` should stop now (call at a batch boundary).

        All ranks of ``comm`` must call it at the same point: it is a
        collective (allreduce MAX of the signal number, 0 for none), so if any
        rank got a signal they all return True together. ``agreed_signum`` is
        then the (largest) signal number received. ``comm=None``: this
        process alone. ``elsewhere``: a signal another rank received, as the
        world's shared counters carry it (hpcllm.world.counters).
        """
        agreed = agree_max(comm, max(int(self.signum or 0), int(elsewhere)))
        self.agreed_signum = agreed or None
        return agreed != 0

    def close(self):
        for sig, handler in self._previous.items():
            # None means the handler was not installed from Python; SIG_DFL
            # is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def signal_name(signum) -> str | None:
    if not signum:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def write_stop_note(out_dir, info: dict) -> str:
    """Write ``out_dir/STOPPED.json`` atomically and return its path.

    ``info`` says where the job stopped (completed shards, signal, rank...);
    the time, host and pid are added unless given. Call it on one rank only.
    Written atomically (hpcllm.store.atomic), so a reader never sees half a
    note, even if the job is killed while writing it.
    """
    note = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "pid": os.getpid()}
    note.update(info)
    if isinstance(note.get("signal"), int):
        note["signal"] = signal_name(note["signal"])
    return write_text(os.path.join(os.fspath(out_dir), STOP_NOTE), json.dumps(note, indent=1, sort_keys=True) + "\n")


def read_stop_note(out_dir) -> dict | None:
    """The note left by an earlier stopped run in ``out_dir``, or None."""
    path = os.path.join(os.fspath(out_dir), STOP_NOTE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
