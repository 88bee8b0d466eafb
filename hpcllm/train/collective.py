"""The few collectives training needs, on numpy arrays; ``comm=None`` means one process.

Sums are reduced to rank 0 and broadcast back rather than all-reduced: MPI does
not promise that an all-reduce leaves the same bits on every rank, and L-BFGS
takes data-dependent branches (line search, convergence tests), so ranks that
disagree in the last bit could take different branches and deadlock.  Reduce +
broadcast costs about what an all-reduce does and every rank gets rank 0's bits.
"""

import numpy as np


def world_size(comm) -> int:
    return 1 if comm is None else comm.Get_size()


def world_rank(comm) -> int:
    return 0 if comm is None else comm.Get_rank()


def sum_all(comm, arr) -> np.ndarray:
    """Element-wise sum of ``arr`` over the ranks: a new array, identical bits on every rank."""
    arr = np.ascontiguousarray(arr)
    if world_size(comm) == 1:
        return arr.copy()
    from mpi4py import MPI

    out = np.empty_like(arr)
    comm.Reduce(arr, out, op=MPI.SUM, root=0)
    comm.Bcast(out, root=0)
    return out


def max_all(comm, arr) -> np.ndarray:
    """Element-wise maximum over the ranks (exact, so a plain all-reduce is safe)."""
    arr = np.ascontiguousarray(arr)
    if world_size(comm) == 1:
        return arr.copy()
    from mpi4py import MPI

    out = np.empty_like(arr)
    comm.Allreduce(arr, out, op=MPI.MAX)
    return out


def gather_all(comm, obj) -> list:
    """Every rank's (small, picklable) ``obj``, in rank order, on every rank."""
    return [obj] if world_size(comm) == 1 else comm.allgather(obj)
