"""The world of ranks: dp groups x tp ranks, consecutive world ranks per tp group.

``Mesh.create(world, tp)`` splits an mpi4py communicator; the model only sees
``mesh.tp_comm`` (a ``Comm``) and ``mesh.tp_rank``/``mesh.tp_size``. Rank numbers
always come from MPI, never from Slurm's environment.
"""

import os
import sys
from dataclasses import dataclass

from hpcllm.errors import HpcllmError


@dataclass
class Mesh:
    world: object          # mpi4py communicator of all ranks
    tp_size: int
    dp_size: int
    tp_rank: int
    dp_rank: int
    tp_mpi: object         # mpi4py communicator of this tp group (tp_rank order)
    tp_comm: object        # hpcllm.world.comm.Comm: collectives of this tp group (what the model uses); None: no model
    local_size: int        # ranks on this node
    backend: str

    @property
    def rank(self):
        return self.world.Get_rank()

    @property
    def is_group_leader(self):
        return self.tp_rank == 0

    @classmethod
    def create(cls, world, tp: int, backend: str = "mpi", device: str = "cpu"):
        size, rank = world.Get_size(), world.Get_rank()
        if tp < 1 or size % tp:
            raise HpcllmError(f"--tp {tp} does not divide the world of {size} ranks; use a world size that is a multiple of tp")
        dp_rank, tp_rank = divmod(rank, tp)
        tp_mpi = world.Split(color=dp_rank, key=tp_rank)
        node = world.Split_type(_shared_type(), key=rank)
        local_size, node_rank = node.Get_size(), node.Get_rank()
        node.Free()
        if device == "cuda":
            _pick_gpu(node_rank)
        if backend == "none":    # a job without a model (tokenize): no collectives, and no torch
            comm = None
        elif backend == "mpi":
            from hpcllm.world.comm import LocalComm, MPIComm

            comm = MPIComm(tp_mpi) if tp > 1 else LocalComm()
        elif backend == "torch":
            comm = _torch_tp_comm(world, tp, dp_rank, tp_rank, device)
        else:
            raise HpcllmError(f"unknown --comm {backend!r}; choose mpi or torch")
        return cls(world, tp, size // tp, tp_rank, dp_rank, tp_mpi, comm, local_size, backend)

    def describe(self) -> dict:
        return {"world": self.world.Get_size(), "dp": self.dp_size, "tp": self.tp_size,
                "comm": self.backend, "ranks_per_node": self.local_size}


def _pick_gpu(node_rank: int) -> None:
    """--device cuda on a node with several GPUs: each rank of the node takes its own (round robin), so
    "cuda" means that GPU for the model, the KV cache and NCCL (which refuses two ranks on one GPU)."""
    import torch

    n = torch.cuda.device_count()
    if n > 1:
        torch.cuda.set_device(node_rank % n)


def _shared_type():
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


def _torch_tp_comm(world, tp, dp_rank, tp_rank, device):
    import torch.distributed as dist

    from hpcllm.world.comm import TorchComm, init_torch_distributed

    init_torch_distributed(world, "nccl" if device.startswith("cuda") else "gloo")
    groups = {}
    for g in range(world.Get_size() // tp):  # every rank creates every group, in order
        ranks = list(range(g * tp, (g + 1) * tp))
        groups[g] = (dist.new_group(ranks), ranks)
    group, ranks = groups[dp_rank]
    return TorchComm(group, ranks, tp_rank)


def cores_per_rank(local_size: int) -> int:
    """Cores this rank may use: its affinity set, shared with the other ranks on the node.

    When the launcher bound each rank to its own cores, the affinity set is
    already this rank's share; otherwise all ranks see the node's cores.
    """
    allowed = len(os.sched_getaffinity(0))
    total = os.cpu_count() or allowed
    if allowed < total:  # bound by the launcher
        return max(1, allowed)
    return max(1, allowed // max(1, local_size))


def set_threads(local_size: int, override: int | None = None) -> int:
    """Set torch (if this process uses it) and numba thread counts for this rank; return the count."""
    import numba

    n = override or cores_per_rank(local_size)
    if "torch" in sys.modules:  # the tokenize job never imports torch
        sys.modules["torch"].set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n
