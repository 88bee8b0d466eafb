"""mpiexec -n N python -m mpi4py comm_allreduce.py OUT.npz BACKENDS

For each backend of BACKENDS (comma separated: mpi, torch), runs the tp
group's all-reduce over the whole world on the cases below and saves, on
world rank 0, every rank's input (``in_<backend>_<case>_r<rank>``) and result
(``out_...``) as float64 / int64 arrays, whether the call returned its own
argument (``same_...``), and each rank's call and second counters. The test
computes what the results should be; this script only runs the collectives.
"""

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.world.mesh import Mesh


def inputs(rank: int) -> dict:
    """case -> (tensor to reduce, op, the tensor whose memory to save: the view's base when non-contiguous)."""
    g = torch.Generator().manual_seed(100 + rank)
    f32 = torch.randn(3, 5, generator=g)
    ints = torch.randint(-50, 50, (4, 7), generator=g)
    big = torch.randint(0, 1000, (6,), generator=g) + (1 << 40)  # float32 would round these
    strided = torch.randn(6, 8, generator=g)
    strided_bf16 = torch.randint(-20, 20, (6, 8), generator=g).to(torch.bfloat16)
    strided_i64 = torch.randint(0, 1000, (5, 6), generator=g) + (1 << 40)
    cases = {
        "f32_sum": (f32.clone(), "sum"), "f32_max": (f32.clone(), "max"),
        # small integers: exact in bf16 and in their sums, so the result is checked exactly
        "bf16_sum": (ints.to(torch.bfloat16), "sum"), "bf16_max": (torch.randn(9, generator=g).bfloat16(), "max"),
        "i64_sum": (big.clone(), "sum"), "i64_max": (big.clone(), "max"),
    }
    out = {k: (t, op, t) for k, (t, op) in cases.items()}
    out["f32_strided_sum"] = (strided.t()[1:, ::2], "sum", strided)      # transposed, every other column
    out["bf16_strided_sum"] = (strided_bf16[::2, 1:5], "sum", strided_bf16)
    out["i64_strided_max"] = (strided_i64[:, ::3], "max", strided_i64)
    return out


def run(backend: str, world) -> dict:
    mesh = Mesh.create(world, world.Get_size(), backend)
    comm, rank = mesh.tp_comm, world.Get_rank()
    saved = {}
    for case, (t, op, base) in inputs(rank).items():
        saved[f"in_{backend}_{case}_r{rank}"] = base.to(torch.float64 if base.is_floating_point() else torch.int64).numpy().copy()
        result = comm.all_reduce(t, op=op)
        saved[f"same_{backend}_{case}_r{rank}"] = np.array(result is t)
        saved[f"out_{backend}_{case}_r{rank}"] = base.to(torch.float64 if base.is_floating_point() else torch.int64).numpy().copy()
    calls_before = comm.calls
    world.Barrier()
    if rank == 0:
        time.sleep(0.3)  # the others wait for rank 0 inside the collective: that wait is comm time
    seconds_before = comm.seconds
    comm.all_reduce(torch.ones(4))
    saved[f"calls_{backend}_r{rank}"] = np.array(calls_before)
    saved[f"waited_{backend}_r{rank}"] = np.array(comm.seconds - seconds_before)
    saved[f"seconds_{backend}_r{rank}"] = np.array(comm.seconds)
    return saved


world = MPI.COMM_WORLD
out_path, backends = sys.argv[1:3]
mine = {}
for backend in backends.split(","):
    mine.update(run(backend, world))
parts = world.gather(mine, root=0)
if world.Get_rank() == 0:
    np.savez(out_path, **{k: v for p in parts for k, v in p.items()})
# Leave through the interpreter's exit (mpi4py finalizes there): os._exit right after MPI.Finalize
# raced hydra's proxy, which then killed the other ranks (exit 9, one run in ~20 at 5 ranks).
world.Barrier()
