"""Collectives on torch tensors for one tensor-parallel group.

One small interface, two implementations:

* ``MPIComm``: mpi4py on the CPU tensor's memory (zero-copy for contiguous
  float32/float64; other dtypes are reduced in float32, since MPI has no
  bfloat16). The default on CPU.
* ``TorchComm``: ``torch.distributed`` (gloo on CPU, NCCL on GPU) on a process
  group made of the same ranks; the rendezvous goes through MPI (world rank 0
  picks a free port and broadcasts it), so no launcher variables are needed.

Both count the seconds spent communicating, for the timing report.
"""

import os
import socket
import time

import numpy as np
import torch

_MPI_REDUCE_DTYPES = (torch.float32, torch.float64)


class Comm:
    """Base: a group of ``size`` ranks, this one being ``rank``."""

    rank = 0
    size = 1

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``t`` in place over the group ("sum" or "max") and return it."""
        if self.size == 1:
            return t
        start = time.perf_counter()
        self._all_reduce(t, op)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``t`` along ``dim`` (sizes along ``dim`` may differ)."""
        if self.size == 1:
            return t
        start = time.perf_counter()
        out = self._all_gather(t, dim)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def broadcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        if self.size == 1:
            return t
        start = time.perf_counter()
        self._broadcast(t, root)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return t


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
        if t.dtype in _MPI_REDUCE_DTYPES and t.is_contiguous() and t.device.type == "cpu":
            self.mpi.Allreduce(MPI.IN_PLACE, t.numpy(), op=mpi_op)
        else:
            buf = t.detach().to("cpu", torch.float32).contiguous()
            self.mpi.Allreduce(MPI.IN_PLACE, buf.numpy(), op=mpi_op)
            t.copy_(buf)

    def _all_gather(self, t, dim):
        dim = dim % t.dim()
        moved = t.detach().movedim(dim, 0).to("cpu").contiguous()
        sizes = self.mpi.allgather(moved.shape[0])
        row = int(np.prod(moved.shape[1:], dtype=np.int64))
        work = moved.float() if moved.dtype not in _MPI_REDUCE_DTYPES else moved
        out = torch.empty((sum(sizes),) + tuple(moved.shape[1:]), dtype=work.dtype)
        counts = [s * row for s in sizes]
        self.mpi.Allgatherv(work.numpy(), [out.numpy(), counts])
        return out.to(t.dtype).movedim(0, dim).to(t.device)

    def _broadcast(self, t, root):
        if t.is_contiguous() and t.device.type == "cpu" and t.dtype in _MPI_REDUCE_DTYPES:
            self.mpi.Bcast(t.numpy(), root=root)
        else:
            buf = t.detach().to("cpu").contiguous()
            self.mpi.Bcast(buf.view(torch.uint8).numpy(), root=root)
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
        if t.dtype == torch.bfloat16 and t.device.type == "cpu":  # gloo lacks bf16 sums
            buf = t.float()
            dist.all_reduce(buf, op=red, group=self.group)
            t.copy_(buf)
        else:
            dist.all_reduce(t, op=red, group=self.group)

    def _all_gather(self, t, dim):
        import torch.distributed as dist

        dim = dim % t.dim()
        local = torch.tensor([t.shape[dim]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(local) for _ in range(self.size)]
        dist.all_gather(sizes, local, group=self.group)
        sizes = [int(s) for s in sizes]
        pad = max(sizes) - t.shape[dim]
        moved = t.movedim(dim, 0)
        if pad:
            moved = torch.cat([moved, moved.new_zeros((pad,) + tuple(moved.shape[1:]))])
        parts = [torch.empty_like(moved) for _ in range(self.size)]
        dist.all_gather(parts, moved.contiguous(), group=self.group)
        out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
        return out.movedim(0, dim)

    def _broadcast(self, t, root):
        import torch.distributed as dist

        dist.broadcast(t, src=self.ranks[root], group=self.group)


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
