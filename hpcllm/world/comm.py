"""Collectives on torch tensors for one tensor-parallel group.

One small interface, two implementations:

* ``MPIComm``: mpi4py on the CPU tensor's memory (zero-copy for contiguous
  float32/float64/int32/int64; bfloat16 and float16 are reduced in float32,
  since MPI has no bfloat16). The default on CPU.
* ``TorchComm``: ``torch.distributed`` (gloo on CPU, NCCL on GPU) on a process
  group made of the same ranks; the rendezvous goes through MPI (world rank 0
  picks a free port and broadcasts it), so no launcher variables are needed.

The only collective is an in-place all-reduce (sum or max): the model's two
per layer and the vocab-parallel embedding, and scoring's distributed
logsumexp. Batches reach the tp group through the group's mpi4py
communicator (``Mesh.tp_mpi``), not through here. A gather of a few values
per rank (e.g. merging each rank's top-k candidates when sampling) is an
all-reduce sum of a [size, k] buffer in which each rank fills its own row.
Both count the seconds and calls spent communicating, for the timing report.
"""

import atexit
import os
import socket
import time

import torch

_MPI_NATIVE_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)
OPS = ("sum", "max")


class Comm:
    """Base: a group of ``size`` ranks, this one being ``rank``."""

    rank = 0
    size = 1

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``t`` in place over the group ("sum" or "max") and return it."""
        if op not in OPS:
            raise ValueError(f"all_reduce op {op!r}: use one of {', '.join(OPS)}")
        if self.size == 1:
            return t
        start = time.perf_counter()
        self._all_reduce(t, op)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return t

    def _all_reduce(self, t, op):
        raise NotImplementedError


class LocalComm(Comm):
    """tp = 1: every collective is the identity."""


class MPIComm(Comm):
    def __init__(self, mpi_comm):
        super().__init__()
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()

    def _all_reduce(self, t, op):
        from mpi4py import MPI

        mpi_op = MPI.SUM if op == "sum" else MPI.MAX
        if t.dtype in _MPI_NATIVE_DTYPES and t.is_contiguous() and t.device.type == "cpu":
            self.mpi.Allreduce(MPI.IN_PLACE, t.numpy(), op=mpi_op)
        else:
            work = t.dtype if t.dtype in _MPI_NATIVE_DTYPES else torch.float32
            buf = t.detach().to("cpu", work).contiguous()
            self.mpi.Allreduce(MPI.IN_PLACE, buf.numpy(), op=mpi_op)
            t.copy_(buf)


class TorchComm(Comm):
    """torch.distributed on the subgroup formed by ``group_ranks`` (world ranks)."""

    def __init__(self, group, group_ranks, rank):
        super().__init__()
        self.group = group
        self.ranks = list(group_ranks)
        self.rank = rank
        self.size = len(self.ranks)

    def _all_reduce(self, t, op):
        import torch.distributed as dist

        red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        cpu_bf16 = t.dtype == torch.bfloat16 and t.device.type == "cpu"  # gloo lacks bf16 sums
        if cpu_bf16 or not t.is_contiguous():  # and collectives need dense buffers
            buf = (t.float() if cpu_bf16 else t).contiguous()
            dist.all_reduce(buf, op=red, group=self.group)
            t.copy_(buf)
        else:
            dist.all_reduce(t, op=red, group=self.group)


def init_torch_distributed(world, backend: str, timeout_s: float = 600.0):
    """Start torch.distributed over the MPI world; rendezvous through MPI."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if world.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        addr = os.environ.get("HPCLLM_MASTER_ADDR") or socket.gethostname()
    else:
        port, addr = None, None
    addr, port = world.bcast((addr, port), root=0)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=world.Get_rank(),
        world_size=world.Get_size(),
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    # Torn down before the interpreter exits (atexit runs this before mpi4py's finalize, registered
    # earlier): a gloo group left to static destruction can still have worker threads running, and a
    # rank then aborts with "terminate called without an active exception" (seen once at tp 3 in CI).
    atexit.register(_destroy_torch_distributed)


def _destroy_torch_distributed():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
