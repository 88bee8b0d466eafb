"""mpiexec -n N python -m mpi4py world_agree.py OUT.json

Runs each helper of hpcllm.world.collective once over the world with
rank-dependent inputs and saves, on rank 0, every rank's answers (the test
checks them): agree_max / agree_any / from_root / gather_all, sum_all /
max_all / min_all (and whether every rank got the same bits), and the
messages that agree_error / on_every_rank / on_root raised on each rank.
"""

import json
import sys

import numpy as np
from mpi4py import MPI

from hpcllm.errors import HpcllmError
from hpcllm.world import collective as c


def raised(fn) -> str | None:
    try:
        fn()
    except HpcllmError as exc:
        return str(exc)
    return None


def failing_on(rank: int, bad: int):
    def fn():
        if rank == bad:
            raise OSError(f"disk full on rank {rank}")
        return rank * 10
    return fn


world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
rng = np.random.default_rng(rank)
x = rng.standard_normal(1000) * 1e3          # float sums: the order matters, every rank must get rank 0's bits
s = c.sum_all(world, x)
mine = {
    "max": c.agree_max(world, 10 - rank), "max_float": c.agree_max(world, rank + 0.5),
    "any_last": c.agree_any(world, rank == size - 1), "any_none": c.agree_any(world, False),
    "root": c.from_root(world, f"from {rank}"), "gathered": c.gather_all(world, rank * rank),
    "sum_bits": s.tobytes().hex(), "sum": s.tolist(), "input": x.tolist(),
    "max_all": c.max_all(world, np.array([rank, -rank], np.int64)).tolist(),
    "min_all": c.min_all(world, np.array([rank, -rank], np.int64)).tolist(),
    "agree_error_none": raised(lambda: c.agree_error(world, None)),
    "agree_error": raised(lambda: c.agree_error(world, f"bad input on rank {rank}" if rank > 0 else None)),
    "every_rank_ok": c.on_every_rank(world, lambda: rank + 1),
    "every_rank_error": raised(lambda: c.on_every_rank(world, failing_on(rank, size - 1))),
    "root_ok": c.on_root(world, lambda: f"computed on {rank}"),
    "root_error": raised(lambda: c.on_root(world, failing_on(rank, 0))),
}
answers = world.gather(mine, root=0)
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(answers, f)
world.Barrier()
