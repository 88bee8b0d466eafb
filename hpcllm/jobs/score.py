"""`hpcllm score`: per-document log-likelihood under a decoder language model.

Columns: ``logprob_sum`` (float64, natural log), ``n_scored`` (tokens that
were predicted: every token but the first, which is the BOS when the model
adds one), ``perplexity`` = exp(-logprob_sum / n_scored) (NaN when nothing
was scored), and with ``--token-logprobs`` the per-token log-probabilities as
a variable-length float32 row per document (``token_logprobs``).

Documents are never truncated: those longer than the context (or
``--max-length``) are scored with a sliding window (``hpcllm.scoring``).
The runner tokenizes with the tokenizer's own special-token template; if the
model's config says BOS is added and the template did not add it, it is
prepended here, so BOS handling follows the model either way.
"""

import h5py
import numpy as np

from hpcllm.corpus.batching import make_batches
from hpcllm.errors import HpcllmError
from hpcllm.scoring import plan_windows, score_documents, summarize, with_bos

TOKEN_LOGPROBS = h5py.vlen_dtype(np.float32)


def score_schema(token_logprobs: bool):
    from hpcllm.results import BASE_COLUMNS, Column

    cols = (Column("logprob_sum", np.float64, (), np.nan), Column("n_scored", np.int32, (), -1),
            Column("perplexity", np.float64, (), np.nan), Column("n_tokens", np.int32, (), -1))
    if token_logprobs:
        cols += (Column("token_logprobs", TOKEN_LOGPROBS, (), None),)
    return cols + BASE_COLUMNS


class ScoreJob:
    name = "score"

    def __init__(self, cfg, ckpt):
        if ckpt.architecture != "llama":
            raise HpcllmError(f"score: {cfg.model} is a {ckpt.architecture} model; score needs a decoder (llama)")
        self.cfg = cfg
        self.model_cfg = ckpt.config
        context = ckpt.config["max_positions"]
        self.window = min(cfg.max_length or context, context)
        self.stride = cfg.stride or max(1, self.window // 2)
        if not 1 <= self.stride < self.window:
            raise HpcllmError(f"score: --stride {self.stride} must be at least 1 and below the window "
                              f"of {self.window} tokens (--max-length / the model's context)")
        self.max_length = None  # never truncate: long documents get a sliding window

    def schema(self):
        return score_schema(self.cfg.token_logprobs)

    def _cost(self, lengths):
        """Padded tokens each document costs: its windows times their length."""
        n_windows = np.array([len(plan_windows(int(n), self.window, self.stride)) for n in lengths])
        return np.maximum(1, n_windows) * np.minimum(np.maximum(lengths, 1), self.window)

    def run(self, model, ids, offsets, process, tokenizer, timers, at_batch):
        """Result columns in input order (NaN / -1 for documents not processed); None if stopped.

        ``at_batch(k, n)`` is called before batch k of n and returns True to stop."""
        n = len(offsets) - 1
        out = {"logprob_sum": np.full(n, np.nan), "n_scored": np.full(n, -1, np.int32),
               "perplexity": np.full(n, np.nan)}
        token_lp = np.empty(n, dtype=object)
        token_lp[:] = [np.zeros(0, np.float32)] * n
        docs = [self._prepare(ids[offsets[i]:offsets[i + 1]]) for i in process]
        lengths = np.array([len(d) for d in docs], np.int64)
        batches = make_batches(self._cost(lengths), self.cfg.batch_tokens, self.cfg.window)
        for k, batch in enumerate(batches):
            if at_batch(k, len(batches)):
                return None
            with timers.phase("compute"):
                lps = score_documents(model, [docs[j] for j in batch], self.window, self.stride,
                                      self.cfg.batch_tokens)
            for j, lp in zip(batch, lps):
                row = process[j]
                out["logprob_sum"][row], out["n_scored"][row], out["perplexity"][row] = summarize(lp)
                token_lp[row] = lp
        if self.cfg.token_logprobs:
            out["token_logprobs"] = token_lp
        return out

    def _prepare(self, doc):
        c = self.model_cfg
        if c.get("add_bos") and len(doc) and doc[0] == c.get("bos_id"):
            return doc.astype(np.int64)  # the tokenizer's template already added it
        return with_bos(doc.astype(np.int64), c)
