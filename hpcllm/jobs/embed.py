"""`hpcllm embed`: one pooled (and, per the model, normalised) vector per document."""

import numpy as np
import torch

from hpcllm.corpus.batching import make_batches, pack_batch
from hpcllm.errors import HpcllmError


class EmbedJob:
    name = "embed"

    def __init__(self, cfg, ckpt):
        if ckpt.architecture != "bert":
            raise HpcllmError(f"embed: {cfg.model} is a {ckpt.architecture} model; embed needs an encoder (bert)")
        self.cfg = cfg
        self.dim = ckpt.config["hidden"]
        model_max = ckpt.config["max_length"]
        self.max_length = min(cfg.max_length or model_max, ckpt.config["max_positions"])
        self.out_dtype = np.dtype(cfg.out_dtype)

    def schema(self):
        from hpcllm.results import embed_schema

        return embed_schema(self.dim, self.out_dtype)

    def run(self, model, ids, offsets, process, tokenizer, timers, at_batch):
        """Embeddings in input order (NaN rows for documents not processed); None if stopped.

        ``at_batch(k, n)`` is called before batch k of n and returns True to stop."""
        out = np.full((len(offsets) - 1, self.dim), np.nan, dtype=self.out_dtype)
        lengths = np.diff(offsets)[process]
        device = next(model.parameters()).device
        batches = make_batches(lengths, self.cfg.batch_tokens, self.cfg.window, padded=False)
        for k, batch in enumerate(batches):
            if at_batch(k, len(batches)):
                return None
            rows = process[batch]
            flat, doc_lengths = pack_batch(ids, offsets, rows)
            with timers.phase("compute"):
                vec = model(torch.from_numpy(flat).to(device), torch.from_numpy(doc_lengths).to(device))
            out[rows] = vec.cpu().numpy().astype(self.out_dtype, copy=False)
        return {"embedding": out}
