"""`hpcllm score`: per-document log-likelihood under a decoder language model.

Columns: ``logprob_sum`` (float64, natural log), ``n_scored`` (tokens that
were predicted: every token but the first, which is the BOS when the model
adds one), ``perplexity`` = exp(-logprob_sum / n_scored) (NaN when nothing
was scored), and with ``--token-logprobs`` the per-token log-probabilities
as flat ``token_logprobs`` (float32) cut by ``token_offsets`` (n_docs + 1),
as token shards are.

Documents are never truncated: those longer than the context (or
``--max-length``) are scored with a sliding window (``hpcllm.scoring``).
The executor tokenizes with the tokenizer's own special-token template; if
the model's config says BOS is added and the template did not add it, it is
prepended here, so BOS handling follows the model either way.
"""

from types import SimpleNamespace

import numpy as np

from hpcllm.corpus.batching import make_batches
from hpcllm.errors import HpcllmError
from hpcllm.executor.job import Job
from hpcllm.model.architectures import require_family
from hpcllm.scoring import plan_windows, score_documents, summarize, with_bos
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, Column, ragged, ragged_rows


class ScoreJob(Job):
    name = "score"

    def __init__(self, cfg, ckpt):
        super().__init__(cfg, ckpt)
        require_family(ckpt, "decoder", self.name)
        self.model_cfg = ckpt.config
        context = ckpt.config["max_positions"]
        self.window = min(cfg.max_length or context, context)
        self.stride = cfg.stride or max(1, self.window // 2)
        if not 1 <= self.stride < self.window:
            raise HpcllmError(f"score: --stride {self.stride} must be at least 1 and below the window "
                              f"of {self.window} tokens (--max-length / the model's context)")
        self.max_length = None  # never truncate: long documents get a sliding window

    def schema(self):
        cols = (Column("logprob_sum", np.float64, (), np.nan), Column("n_scored", np.int32, (), -1),
                Column("perplexity", np.float64, (), np.nan), N_TOKENS)
        if self.cfg.token_logprobs:
            cols += (ragged("token_logprobs", np.float32, "token_offsets"),)
        return cols + BASE_COLUMNS

    def _cost(self, lengths):
        """Padded tokens each document costs: its windows times their length."""
        n_windows = np.array([len(plan_windows(int(n), self.window, self.stride)) for n in lengths])
        return np.maximum(1, n_windows) * np.minimum(np.maximum(lengths, 1), self.window)

    def start(self, work):
        n = work.n_docs
        docs = [self._prepare(work.doc(i)) for i in work.process]
        lengths = np.array([len(d) for d in docs], np.int64)
        token_lp = [np.zeros(0, np.float32)] * n
        return SimpleNamespace(
            work=work, docs=docs, token_lp=token_lp,
            out={"logprob_sum": np.full(n, np.nan), "n_scored": np.full(n, -1, np.int32),
                 "perplexity": np.full(n, np.nan)},
            batches=make_batches(self._cost(lengths), self.cfg.batch_tokens, self.cfg.window))

    def compute(self, model, state, batch):
        lps = score_documents(model, [state.docs[j] for j in batch], self.window, self.stride,
                              self.cfg.batch_tokens)
        out = state.out
        for j, lp in zip(batch, lps):
            row = state.work.process[j]
            out["logprob_sum"][row], out["n_scored"][row], out["perplexity"][row] = summarize(lp)
            state.token_lp[row] = lp

    def outputs(self, state):
        out = dict(state.out)
        if self.cfg.token_logprobs:
            out["token_logprobs"], out["token_offsets"] = ragged_rows(state.token_lp, np.float32)
        return out

    def _prepare(self, doc):
        c = self.model_cfg
        if c.get("add_bos") and len(doc) and doc[0] == c.get("bos_id"):
            return doc.astype(np.int64)  # the tokenizer's template already added it
        return with_bos(doc.astype(np.int64), c)
