"""`hpcllm embed`: one pooled (and, per the model, normalised) vector per document.

Batches pack documents without padding (``make_batches(..., padded=False)``
counts real tokens); the encoder runs on the packed run (hpcllm.model.encoder).
"""

from types import SimpleNamespace

import numpy as np
import torch

from hpcllm.corpus.batching import make_batches, pack_batch
from hpcllm.executor.job import Job, ShardResult
from hpcllm.model.architectures import require_family
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, Column


class EmbedJob(Job):
    name = "embed"

    def __init__(self, cfg, ckpt):
        super().__init__(cfg, ckpt)
        require_family(ckpt, "encoder", self.name)
        self.dim = ckpt.config["hidden"]
        self.max_length = min(cfg.max_length or ckpt.config["max_length"], ckpt.config["max_positions"])
        self.out_dtype = np.dtype(cfg.out_dtype)

    def schema(self):
        return (Column("embedding", self.out_dtype, (int(self.dim),), np.nan), N_TOKENS) + BASE_COLUMNS

    def start(self, work):
        lengths = np.diff(work.offsets)[work.process]
        return SimpleNamespace(work=work, out=self.empty_outputs(work.n_docs),
                               batches=make_batches(lengths, self.cfg.batch_tokens, self.cfg.window, padded=False))

    def compute(self, model, state, batch):
        rows = state.work.process[batch]
        flat, doc_lengths = pack_batch(state.work.ids, state.work.offsets, rows)
        device = next(model.parameters()).device
        vec = model(torch.from_numpy(flat).to(device), torch.from_numpy(doc_lengths).to(device))
        self.store(state.out, rows, vec)

    def empty_outputs(self, n_docs: int) -> dict:
        """The shard's output arrays, filled with the schema's fill values."""
        return {"embedding": np.full((n_docs, self.dim), np.nan, dtype=self.out_dtype)}

    def store(self, out: dict, rows, vectors: torch.Tensor) -> None:
        """The pooled vectors of ``rows`` into the output arrays."""
        out["embedding"][rows] = vectors.cpu().numpy().astype(self.out_dtype, copy=False)

    def result(self, state):
        return ShardResult(state.out)
