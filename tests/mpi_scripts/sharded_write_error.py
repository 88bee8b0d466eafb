"""mpiexec -n 2 python -m mpi4py sharded_write_error.py DEST.h5 OUT.json

Writes a 2-rank sharded checkpoint whose rank file cannot be written on
rank 1 (its path points into a missing folder) and saves, on rank 0, what
each rank raised: every rank must raise the same one-line error, none may
wait for the others, and no master may appear.
"""

import json
import sys

import numpy as np
from mpi4py import MPI

from hpcllm.checkpoint import sharded
from hpcllm.checkpoint.hdf5 import write_checkpoint
from hpcllm.errors import HpcllmError

world = MPI.COMM_WORLD
dest, out = sys.argv[1:3]
if world.Get_rank() == 1:
    sharded.shard_path = lambda path, rank: f"{path}.missing-folder/rank-{rank:05d}.h5"
tensors = {"embed.weight": np.ones((8, 4), np.float32), "norm.weight": np.ones(4, np.float32)}
try:
    write_checkpoint(dest, "llama", {}, tensors, "{}", source="test", comm=world)
    got = None
except HpcllmError as exc:
    got = str(exc)
answers = world.gather(got, root=0)
if world.Get_rank() == 0:
    with open(out, "w") as f:
        json.dump(answers, f)
world.Barrier()
