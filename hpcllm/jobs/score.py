"""`hpcllm score`: per-document log-likelihood under a decoder language model.

Columns: ``logprob_sum`` (float64, natural log), ``n_scored`` (tokens that
were predicted: every token but the first, which is the BOS when the model
adds one), ``perplexity`` = exp(-logprob_sum / n_scored) (NaN when nothing
was scored), and with ``--token-logprobs`` the per-token log-probabilities
as flat ``token_logprobs`` (float32) cut by ``token_offsets`` (n_docs + 1),
as token shards are.

Documents longer than the context (or ``--max-length``) are scored with a
sliding window (``hpcllm.scoring``); only those beyond ``--max-doc-tokens``
are cut there (status truncated, ``n_scored`` <= N) or, with ``--long-docs
skip``, not scored (status too_long, NaN outputs).  The job's batches are
windows, not documents: the windows of all documents of a shard are batched
together by the token budget, so a long document's windows pack with other
documents' and the group stops, claims and reports progress between them;
each document's log-probabilities are joined in window order and summed in
that order, so results do not depend on how the windows were batched.
A batch's windows are packed without padding (``--batch-tokens`` counts real
tokens; ``hpcllm.scoring.PackedWindows``).
The executor tokenizes with the tokenizer's own special-token template; if
the model's config says BOS is added and the template did not add it, it is
prepended here, so BOS handling follows the model either way.
"""

from types import SimpleNamespace

import numpy as np

from hpcllm.corpus.batching import make_batches
from hpcllm.errors import HpcllmError
from hpcllm.executor.job import Job, ShardResult
from hpcllm.model.architectures import require_family
from hpcllm.scoring import join_windows, score_windows, summarize, window_pieces, with_bos
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, Column, ragged, ragged_rows


class ScoreJob(Job):
    name = "score"
    repeats = "same"        # a repeated document is scored once (hpcllm/executor/repeats.py)
    splits_shards = True    # a long shard's windows may be scored by several dp groups (executor/parts.py)

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
        self.limit_documents(None)  # no limit of its own: long documents get a sliding window

    def schema(self):
        cols = (Column("logprob_sum", np.float64, (), np.nan), Column("n_scored", np.int32, (), -1),
                Column("perplexity", np.float64, (), np.nan), N_TOKENS)
        if self.cfg.token_logprobs:
            cols += (ragged("token_logprobs", np.float32, "token_offsets"),)
        return cols + BASE_COLUMNS

    def start(self, work):
        docs = [with_bos(work.doc(i).astype(np.int64), self.model_cfg) for i in work.process]
        pieces = window_pieces([len(d) for d in docs], self.window, self.stride)
        return SimpleNamespace(work=work, docs=docs, pieces=pieces, piece_lp=[None] * len(pieces),
                               batches=make_batches(pieces[:, 2] - pieces[:, 1], self.cfg.batch_tokens,
                                                    self.cfg.window, padded=False))

    def compute(self, model, state, batch):
        for k, lp in zip(batch, score_windows(model, state.docs, state.pieces[batch])):
            state.piece_lp[k] = lp

    def batch_progress(self, state, batch):
        """Tokens scored by these windows."""
        p = state.pieces[batch]
        return int((p[:, 2] - p[:, 3]).sum())

    def part_outputs(self, state, batches):
        k = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        lp, offsets = ragged_rows([state.piece_lp[i] for i in k], np.float32)
        return {"piece": k, "lp": lp, "lp_offsets": offsets, "n_pieces": np.array([len(state.pieces)])}

    def merge_part(self, state, arrays):
        if int(arrays["n_pieces"][0]) != len(state.pieces):
            raise HpcllmError(f"score: a part of this shard was computed over {int(arrays['n_pieces'][0])} "
                              f"windows, this group has {len(state.pieces)}; use a new --output")
        off = arrays["lp_offsets"]
        for j, k in enumerate(arrays["piece"].tolist()):
            state.piece_lp[k] = arrays["lp"][off[j]:off[j + 1]]

    def result(self, state):
        n = state.work.n_docs
        out = {"logprob_sum": np.full(n, np.nan), "n_scored": np.full(n, -1, np.int32),
               "perplexity": np.full(n, np.nan)}
        token_lp = [np.zeros(0, np.float32)] * n
        for row, lp in zip(state.work.process, join_windows(state.pieces, state.piece_lp, len(state.docs))):
            out["logprob_sum"][row], out["n_scored"][row], out["perplexity"][row] = summarize(lp)
            token_lp[row] = lp
        if self.cfg.token_logprobs:
            out["token_logprobs"], out["token_offsets"] = ragged_rows(token_lp, np.float32)
        return ShardResult(out)
