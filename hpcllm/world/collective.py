"""Agreeing over an mpi4py communicator: flags, numbers, numpy arrays and errors.

Every function is a collective over ``comm`` (all its ranks call it at the
same point) and gives every rank the same answer; ``comm=None`` (or a
communicator of one rank) means this process alone, without touching MPI.
This is the one home of such helpers; the tensor-parallel group's
all-reduces on torch tensors are ``hpcllm.world.comm``.

Sums are reduced to rank 0 and broadcast back rather than all-reduced: MPI
does not promise that an all-reduce leaves the same bits on every rank, and
callers branch on the result (L-BFGS's line search and convergence tests, for
one), so ranks that disagreed in the last bit could take different branches
and deadlock.  Reduce + broadcast costs about what an all-reduce does, and
every rank gets rank 0's bits.  Maxima and minima are exact, so a plain
all-reduce is safe for them.

Errors: a rank that fails must not leave the others waiting in the next
collective, so the failure is shared and every rank raises the same one-line
``HpcllmError`` (``agree_error``, ``on_every_rank``, ``on_root``).

Waiting: MPICH waits in a collective by polling, without giving up the core.
Where ranks share cores (16 on 2 here) ranks waiting for rank 0 took most of
the CPU it needed (rank 0 writing results.h5 while 15 ranks polled), so
``on_root`` and ``on_every_rank`` first meet in ``wait_quietly``, which sleeps.
"""

import time

import numpy as np

from hpcllm.errors import HpcllmError


def world_size(comm) -> int:
    return 1 if comm is None else comm.Get_size()


def world_rank(comm) -> int:
    return 0 if comm is None else comm.Get_rank()


def _alone(comm) -> bool:
    return comm is None or comm.Get_size() == 1


def _mpi():
    from mpi4py import MPI  # deferred: importing this module must not initialise MPI

    return MPI


# ----------------------------------------------------------------- flags and numbers

def agree_max(comm, value):
    """The largest of every rank's ``value`` (a Python number), on every rank."""
    return value if _alone(comm) else comm.allreduce(value, op=_mpi().MAX)


def agree_any(comm, flag) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    return bool(agree_max(comm, int(bool(flag))))


def from_root(comm, value, root: int = 0):
    """Rank ``root``'s ``value`` (any picklable object; ignored on the other ranks), on every rank."""
    return value if _alone(comm) else comm.bcast(value, root=root)


def gather_all(comm, obj) -> list:
    """Every rank's (small, picklable) ``obj``, in rank order, on every rank."""
    return [obj] if _alone(comm) else comm.allgather(obj)


# ----------------------------------------------------------------- numpy arrays

def sum_all(comm, arr) -> np.ndarray:
    """Element-wise sum of ``arr`` over the ranks: a new array, identical bits on every rank."""
    arr = np.ascontiguousarray(arr)
    if _alone(comm):
        return arr.copy()
    out = np.empty_like(arr)
    comm.Reduce(arr, out, op=_mpi().SUM, root=0)
    comm.Bcast(out, root=0)
    return out


def max_all(comm, arr) -> np.ndarray:
    """Element-wise maximum of ``arr`` over the ranks (a new array)."""
    return _allreduce(comm, arr, "MAX")


def min_all(comm, arr) -> np.ndarray:
    """Element-wise minimum of ``arr`` over the ranks (a new array)."""
    return _allreduce(comm, arr, "MIN")


def _allreduce(comm, arr, op: str) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    if _alone(comm):
        return arr.copy()
    out = np.empty_like(arr)
    comm.Allreduce(arr, out, op=getattr(_mpi(), op))
    return out


def wait_quietly(comm, poll_s: float = 0.005) -> None:
    """A barrier that sleeps ``poll_s`` between looks (see the module notes)."""
    if _alone(comm):
        return
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll_s)


# ----------------------------------------------------------------- errors

def agree_error(comm, error: str | None) -> None:
    """Raise ``HpcllmError`` on every rank when any rank's ``error`` (a message, or None) is set:
    the lowest such rank's message."""
    first = next((e for e in gather_all(comm, error) if e), None)
    if first:
        raise HpcllmError(first)


def on_every_rank(comm, fn):
    """``fn()`` on every rank; this rank's result.  When it raises ``HpcllmError`` or ``OSError`` on
    any rank, every rank raises ``HpcllmError`` with the lowest such rank's message."""
    try:
        out, error = fn(), None
    except (HpcllmError, OSError) as exc:
        out, error = None, str(exc)
    wait_quietly(comm)
    agree_error(comm, error)
    return out


def on_root(comm, fn, root: int = 0):
    """``fn()`` on rank ``root`` only; its result on every rank.  When it raises ``HpcllmError`` or
    ``OSError``, every rank raises ``HpcllmError`` with its message."""
    result = None
    if world_rank(comm) == root:
        try:
            result = ("ok", fn())
        except (HpcllmError, OSError) as exc:
            result = ("error", str(exc))
    wait_quietly(comm)
    kind, value = from_root(comm, result, root)
    if kind == "error":
        raise HpcllmError(value)
    return value
