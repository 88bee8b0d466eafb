"""`hpcllm tokenize`: a raw corpus -> HDF5 token shards (hpcllm.store.tokens), the input of embed/score.

A job of the executor without a model: every rank is a group of its own
(tp = 1), claims shards, reads and tokenizes the next one in the prefetch
thread while the current one is written, and never imports torch.  A rank
holds at most two shards at a time, so memory does not grow with the corpus.
The manifest makes reruns resume; once every shard is complete rank 0 joins
their per-document columns into ``results.h5`` (as any job's results, for
``report`` / ``export`` / ``filter``) and writes ``tokens.json`` last.
"""

import os
import time
from types import SimpleNamespace

import h5py
import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.executor.job import Job, ShardResult
from hpcllm.model.architectures import architecture
from hpcllm.store.master import build_master
from hpcllm.store.results import row_blocks
from hpcllm.store.tokens import (NO_LIMIT, RESULT_COLUMNS, TOKEN_COLUMNS, tokenizer_hash, write_info,
                                 write_token_shard)


class TokenizeJob(Job):
    name = "tokenize"
    needs_model = False
    partial_results = False   # tokens.json marks a finished token directory: written once, at the end

    def __init__(self, cfg, ckpt):
        super().__init__(cfg, ckpt)
        if (cfg.model is None) == (cfg.tokenizer is None):
            raise HpcllmError("tokenize: give exactly one of --model (a checkpoint) or --tokenizer (a tokenizer.json)")
        if ckpt is not None:
            self._json, self.source = ckpt.tokenizer_json, os.path.abspath(cfg.model)
            default = None
            if architecture(ckpt.architecture).family == "encoder":   # what `embed` truncates to (EmbedJob)
                default = min(ckpt.config["max_length"], ckpt.config["max_positions"])
            self.max_length = cfg.max_length or default
        else:
            try:
                with open(cfg.tokenizer, encoding="utf-8") as f:
                    self._json = f.read()
            except OSError as e:
                raise HpcllmError(f"cannot read tokenizer file {cfg.tokenizer}: {e.strerror}") from None
            self.source, self.max_length = os.path.abspath(cfg.tokenizer), cfg.max_length
        self._hash = tokenizer_hash(self._json)

    def tokenizer_json(self):
        return self._json

    def model_hash(self):
        return self._hash

    def config_hash(self):
        return self.cfg.result_hash(self.name, effective_max_length=self.max_length)

    def describe(self):
        return f"tokenizer {self.source} ({self._hash[:12]}), max_length {self.max_length}"

    def schema(self):
        return TOKEN_COLUMNS

    def master_schema(self):
        return RESULT_COLUMNS

    def start(self, work):
        return SimpleNamespace(batches=[])

    def result(self, state):
        return ShardResult({})

    def write_shard(self, out_dir, data, result, attrs):
        attrs = {**attrs, "tokenizer_hash": self._hash, "max_length": self.max_length or NO_LIMIT}
        return write_token_shard(out_dir, data.shard, data.docs, data.ids, data.offsets, data.status, attrs)[1]

    def finish(self, out_dir, plan, attrs):
        """Join the token shards' per-document columns into results.h5 (which checks every shard against
        the plan and counts statuses), total the tokens, and write tokens.json (the completion marker)."""
        import json

        path = build_master(out_dir, plan, self.master_schema(), {**attrs, "tokenizer_hash": self._hash,
                                                                  "tokenizer_source": self.source})
        with h5py.File(path, "r") as f:
            statuses = json.loads(f.attrs["status_counts"])
            n_docs = int(f.attrs["n_docs"])
            n_tokens = sum(int(f["n_tokens"][b].sum(dtype=np.int64)) for b in row_blocks(f, "n_tokens"))
        info = {"tokenizer_hash": self._hash, "tokenizer_source": self.source, "max_length": self.max_length,
                "config": attrs["config"], "config_hash": attrs["config_hash"], "inputs": plan.inputs,
                "timings": attrs["timings"], "world": attrs["world"], "slurm": attrs["slurm"],
                "n_shards": len(plan), "n_docs": n_docs, "n_tokens": n_tokens,
                "status_counts": statuses, "finished": time.time()}
        path = write_info(out_dir, info)
        return (f"wrote {path}: {n_docs} documents, {n_tokens} tokens in {len(plan)} shards; "
                "status counts: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))

