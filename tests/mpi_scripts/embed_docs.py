"""mpiexec -n 2 python embed_docs.py OUT.npz CKPT:IN.npz [CKPT:IN.npz ...]

Embeds the documents of each IN.npz (flat ``ids`` + ``offsets``) with its decoder checkpoint as
`hpcllm embed` does (EmbedJob's batches and pooling, unnormalised), with ``--pooling`` last and
mean, at tp 1 (dp 2: each rank every other document) and tp 2. Both tp ranks must produce identical
vectors; the script fails otherwise. Rank 0 saves ``emb<k>_<pooling>_tp<tp>`` for checkpoint k,
and ``ids<k>`` / ``offsets<k>``: the documents as the model saw them (BOS per its config).
"""

import sys

import numpy as np
from mpi4py import MPI

from hpcllm.checkpoint.hdf5 import Checkpoint
from hpcllm.config import JobConfig
from hpcllm.executor.job import Work
from hpcllm.jobs.embed import EmbedJob
from hpcllm.model.build import build_model
from hpcllm.world.mesh import Mesh, set_threads

out_path, pairs = sys.argv[1], [a.rsplit(":", 1) for a in sys.argv[2:]]
world = MPI.COMM_WORLD
out = {}
for tp in (1, 2):
    mesh = Mesh.create(world, tp, "mpi")
    set_threads(mesh.local_size)
    for k, (ckpt_path, in_path) in enumerate(pairs):
        data = np.load(in_path)
        n = len(data["offsets"]) - 1
        work = Work(data["ids"], data["offsets"], np.arange(mesh.dp_rank, n, mesh.dp_size))
        with Checkpoint(ckpt_path) as ck:
            model = build_model(ck, mesh.tp_rank, mesh.tp_size, mesh.tp_comm)
            for pooling in ("last", "mean"):
                job = EmbedJob(JobConfig(model=ckpt_path, pooling=pooling, no_normalize=True), ck)
                state = job.start(work)
                for batch in state.batches:
                    job.compute(model, state, batch)
                emb = job.result(state).columns["embedding"]
                groups = world.allgather((mesh.tp_rank, emb))
                assert all(np.array_equal(emb, e) for r, e in groups if tp > 1), "tp ranks disagree"
                out[f"emb{k}_{pooling}_tp{tp}"] = np.nanmax([e for r, e in groups if r == 0], axis=0)
        seen = {int(r): d for rows, docs in world.allgather((state.rows, state.docs)) for r, d in zip(rows, docs)}
        out[f"ids{k}"] = np.concatenate([seen[i] for i in range(n)])
        out[f"offsets{k}"] = np.cumsum([0] + [len(seen[i]) for i in range(n)])
        del model
if world.Get_rank() == 0:
    np.savez(out_path, **out)
MPI.COMM_WORLD.Barrier()
