"""mpiexec -n T python parity_ranks.py DEVICE COMM DTYPE IN.npz OUT.npz CKPT...

Each checkpoint built at tp = T on DEVICE over COMM ("torch": NCCL on cuda, gloo on the CPU) in DTYPE:
a decoder scores IN's documents (flat ``ids`` + ``offsets``, window = its context, stride half of it),
an encoder embeds IN's ``bert_ids`` (packed, lengths ``bert_lengths``, mean-pooled). World rank 0
saves ``out<k>`` per checkpoint (float32: flat per-token log-probs, or [docs, hidden]), and
``device<k>``, the device the model's weights were on. Every tp rank must produce the same numbers.
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from hpcllm.checkpoint.hdf5 import Checkpoint
from hpcllm.model.architectures import architecture
from hpcllm.model.build import build_model
from hpcllm.scoring import score_documents
from hpcllm.world.mesh import Mesh

device, comm, dtype, in_path, out_path, *ckpts = sys.argv[1:]
world = MPI.COMM_WORLD
mesh = Mesh.create(world, world.Get_size(), comm, device)
data = np.load(in_path)
off = data["offsets"]
docs = [data["ids"][off[i]:off[i + 1]] for i in range(len(off) - 1)]
out = {}
for k, path in enumerate(ckpts):
    with Checkpoint(path) as ck:
        model = build_model(ck, mesh.tp_rank, mesh.tp_size, mesh.tp_comm, getattr(torch, dtype), device)
        encoder = architecture(ck.architecture).family == "encoder"
    if encoder:
        ids = torch.from_numpy(data["bert_ids"]).to(device)
        got = model(ids, torch.from_numpy(data["bert_lengths"]).to(device)).float().cpu().numpy()
    else:
        window = model.cfg["max_positions"]
        got = np.concatenate(score_documents(model, docs, window, window // 2, batch_tokens=1024))
    for other in mesh.tp_mpi.allgather(got):
        assert np.array_equal(got, other), f"{path}: tp ranks disagree"
    out[f"out{k}"], out[f"device{k}"] = got, str(next(model.parameters()).device)
    del model
if world.Get_rank() == 0:
    np.savez(out_path, **out)
# Leave through the interpreter's exit (mpi4py finalizes there), as tests/mpi_scripts do.
world.Barrier()
