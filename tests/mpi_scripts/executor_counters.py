"""mpiexec -n N python executor_counters.py OUT_DIR N_CLAIMS: hammer hpcllm.world.counters.SharedCounters.

Every rank claims in a tight loop until it is handed an index >= N_CLAIMS and
writes the indices it got (the last one, >= N_CLAIMS, included) to
OUT_DIR/claims.<rank>.json. Then each rank raises a stop signal of its own
(rank r raises 10 + r, rank 0 nothing), and after a barrier every rank
records what stop_signal() returns; it also adds (1, rank) to the done
counters, so the test can check that add_done sums world-wide.
"""

import json
import os
import sys

from mpi4py import MPI

from hpcllm.world.counters import SharedCounters

out_dir, n_claims = sys.argv[1], int(sys.argv[2])
world = MPI.COMM_WORLD
rank = world.Get_rank()
counters = SharedCounters(world)

before = counters.stop_signal()
claims = []
while True:
    i = counters.claim()
    claims.append(i)
    if i >= n_claims:
        break
counters.add_done(1, rank)
world.Barrier()
if rank:
    counters.raise_stop(10 + rank)
world.Barrier()
seen = counters.stop_signal()
done = counters.done()
world.Barrier()
counters.free()
with open(os.path.join(out_dir, f"claims.{rank}.json"), "w") as f:
    json.dump({"rank": rank, "claims": claims, "stop_before": before, "stop_after": seen, "done": list(done)}, f)
