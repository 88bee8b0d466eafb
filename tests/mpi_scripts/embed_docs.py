"""mpiexec -n 2 python embed_docs.py OUT.npz CKPT:IN.npz [CKPT:IN.npz ...]

Embeds the documents of each IN.npz (flat ``ids`` + ``offsets``) with its decoder checkpoint as
`hpcllm embed` does (EmbedJob's batches and pooling, unnormalised), with ``--pooling`` last and
mean, at tp 1 (every rank all documents) and tp 2. Every rank of a group must produce identical
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
        work = Work(data["ids"], data["offsets"], np.arange(len(data["offsets"]) - 1))
        with Checkpoint(ckpt_path) as ck:
            model = build_model(ck, mesh.tp_rank, mesh.tp_size, mesh.tp_comm)
            for pooling in ("last", "mean"):
                job = EmbedJob(JobConfig(model=ckpt_path, pooling=pooling, no_normalize=True), ck)
                state = job.start(work)
                for batch in state.batches:
                    job.compute(model, state, batch)
                emb = job.result(state).columns["embedding"]
                assert all(np.array_equal(emb, other) for other in world.allgather(emb)), "ranks disagree"
                out[f"emb{k}_{pooling}_tp{tp}"] = emb
        docs = [state.docs[i] for i in np.argsort(state.rows)]
        out[f"ids{k}"] = np.concatenate(docs)
        out[f"offsets{k}"] = np.cumsum([0] + [len(d) for d in docs])
        del model
if world.Get_rank() == 0:
    np.savez(out_path, **out)
MPI.COMM_WORLD.Barrier()
