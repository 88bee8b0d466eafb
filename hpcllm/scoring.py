"""Language-model scoring: per-token log-probabilities of documents.

The pieces:

* ``vocab_parallel_logprobs``: log p(target) from hidden states when each tp
  rank holds only a slice of the LM head's vocabulary rows. Full logits are
  never gathered: each rank's logsumexp over its slice is combined by a
  distributed max and sum of exponentials, and the target's logit comes from
  the rank that owns it (two small all-reduces per chunk of rows), so logits
  memory per rank is 1/tp and bounded by ``chunk_bytes``.
* ``score_documents``: token ids of whole documents -> per-token
  log-probabilities. Documents longer than the window are cut into windows
  that start every ``stride`` tokens (the convention of HF's perplexity
  guide); a window scores only the tokens the previous one did not reach, so
  every token is scored exactly once and, after the first window, with at
  least ``window - stride`` tokens of context. Each window is an independent
  forward pass with positions from 0. Token t is predicted from tokens < t,
  so the first token of a document (the BOS when the model adds one) is
  never scored.
* ``window_pieces`` / ``score_windows`` / ``join_windows``: the same in
  pieces, for a caller that batches windows itself (the score job: the
  windows of a long document are units of work like short documents).  A
  document's log-probabilities are always joined in window order and summed
  in that order (``summarize``), so however its windows were batched the
  result is that of the unsplit computation.
* ``PackedWindows``: a batch's windows go through the model as one run of
  tokens without padding, as embed's documents do: projections, MLP and
  norms see only real tokens, positions restart at 0 in each window, and
  attention runs per chunk of similar-length windows (each at least 90% of
  its chunk's longest: ``hpcllm.model.encoder.Packed``), causal within each
  window on a right-padded view. The LM head runs only on the scored
  positions.

All ranks of a tp group must call these with identical inputs.
"""

import math

import numpy as np
import torch

from hpcllm.corpus.batching import make_batches
from hpcllm.model.decoder import attention
from hpcllm.model.encoder import Packed
from hpcllm.model.layers import linear
from hpcllm.world.comm import Comm

CHUNK_BYTES = 64 << 20  # float32 logits per rank per chunk


@torch.inference_mode()
def vocab_parallel_logprobs(hidden, targets, weight, vocab_start: int, comm: Comm,
                            chunk_bytes: int = CHUNK_BYTES, soften=None) -> torch.Tensor:
    """float32 [N] log-softmax(hidden @ weight.T)[target] over the whole (split) vocabulary.

    hidden [N, H]; targets [N] int64 global ids; weight [V_local, H] this
    rank's LM-head rows (dense or packed: ``hpcllm.model.layers.linear``), the ids
    [vocab_start, vocab_start + V_local); ``soften``: the model's logit soft-cap (``Decoder.soften``), or None.
    """
    n, v_local = hidden.shape[0], weight.shape[0]
    rows = max(1, chunk_bytes // (4 * v_local))
    out = torch.empty(n, dtype=torch.float32)
    for s in range(0, n, rows):
        logits = linear(hidden[s:s + rows], weight).float()       # [n_chunk, V_local]
        if soften is not None:
            logits = soften(logits)
        local = targets[s:s + rows] - vocab_start
        mine = (local >= 0) & (local < v_local)
        idx = local.clamp(0, v_local - 1)[:, None]
        # log_softmax is one fused pass (measured ~1.6x faster than logsumexp here); the slice's
        # logsumexp is then any logit minus its log-probability, taken at the target's column
        logp = torch.log_softmax(logits, dim=-1).gather(1, idx)[:, 0]
        if comm.size == 1:
            out[s:s + rows] = logp.cpu()
            continue
        target = logits.gather(1, idx)[:, 0]
        lse = target - logp                                         # this rank's slice of the vocabulary
        top = comm.all_reduce(lse.clone(), op="max")                # ranks' largest: a stable combination
        sums = torch.stack([torch.exp(lse - top), target.masked_fill(~mine, 0.0)])
        comm.all_reduce(sums, op="sum")                             # sum over ranks, and the target logit
        out[s:s + rows] = (sums[1] - top - torch.log(sums[0])).cpu()  # target - logsumexp
    return out


def with_bos(ids: np.ndarray, cfg: dict) -> np.ndarray:
    """The document's ids as the model sees them: BOS first when the model's config says so (and the
    tokenizer's template did not put it there already)."""
    if cfg.get("add_bos") and cfg.get("bos_id") is not None and not (len(ids) and ids[0] == cfg["bos_id"]):
        return np.concatenate([np.array([cfg["bos_id"]], dtype=ids.dtype), ids])
    return ids


def plan_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """[(begin, end, first_target)] covering targets 1..n-1 once each (none when n < 2)."""
    if not 1 <= stride < window:
        raise ValueError(f"stride {stride} must be in [1, window {window})")
    out, begin, reached = [], 0, 1
    while reached < n:
        end = min(begin + window, n)
        out.append((begin, end, reached))
        reached = end
        begin += stride
    return out


def window_pieces(lengths, window: int, stride: int) -> np.ndarray:
    """Every window of every document, int64 [P, 4] rows (doc, begin, end, first_target), in
    document order then window order (``plan_windows`` per document; documents under 2 tokens
    have none).  Windows are independent units of work: score them in any batches, then
    ``join_windows`` puts each document's back in this order."""
    rows = [(d, b, e, t) for d, n in enumerate(lengths) for b, e, t in plan_windows(int(n), window, stride)]
    return np.array(rows, np.int64).reshape(-1, 4)


def join_windows(pieces: np.ndarray, piece_lps, n_docs: int) -> list[np.ndarray]:
    """Per-document float32 log-probabilities from per-window ones (``pieces`` order, as window_pieces)."""
    bounds = np.searchsorted(pieces[:, 0], np.arange(n_docs + 1))
    return [np.concatenate(piece_lps[bounds[d]:bounds[d + 1]]) if bounds[d + 1] > bounds[d]
            else np.zeros(0, np.float32) for d in range(n_docs)]


def score_documents(model, docs, window: int, stride: int, batch_tokens: int = 8192):
    """Per-document float32 arrays of token log-probabilities (``len(doc) - 1`` each, none for <2 tokens).

    ``docs``: int arrays of token ids (BOS already added, see ``with_bos``).
    Windows of all documents are sorted by length and packed into batches of
    at most ``batch_tokens`` tokens (no padding; a longer window alone).
    """
    pieces = window_pieces([len(d) for d in docs], window, stride)
    piece_lps = [None] * len(pieces)
    for batch in make_batches(pieces[:, 2] - pieces[:, 1], batch_tokens, max(1, len(pieces)), padded=False):
        for k, lp in zip(batch, score_windows(model, docs, pieces[batch])):
            piece_lps[k] = lp
    return join_windows(pieces, piece_lps, len(docs))


def score_windows(model, docs, pieces: np.ndarray) -> list[np.ndarray]:
    """Log-probabilities of each window's new targets (rows of ``pieces``, see window_pieces), one forward pass
    over the windows packed (longest first, as ``make_batches`` orders them, keeps the chunks few)."""
    return _score_windows(model, [docs[d][b:e] for d, b, e, _ in pieces.tolist()],
                          (pieces[:, 3] - pieces[:, 1]).tolist())


def _score_windows(model, rows, first):
    """Log-probabilities of targets first[i]..len(rows[i])-1 of each row, one packed forward pass."""
    device = model.head_weight.device
    lengths = [len(r) for r in rows]
    ids = torch.from_numpy(np.concatenate(rows).astype(np.int64, copy=False)).to(device)
    windows = PackedWindows(torch.tensor(lengths), device)
    hidden = model(ids[None], windows.positions, cache=windows)[0]
    starts = np.cumsum([0] + lengths[:-1])
    pos = torch.from_numpy(np.concatenate([s + np.arange(f - 1, n - 1) for s, n, f in zip(starts, lengths, first)]))
    pos = pos.to(device)
    lp = vocab_parallel_logprobs(hidden[pos], ids[pos + 1], model.head, model.vocab_start,
                                 model.comm, soften=model.soften).numpy()
    counts = np.cumsum([0] + [n - f for n, f in zip(lengths, first)])
    return [lp[counts[i]:counts[i + 1]] for i in range(len(rows))]


class PackedWindows:
    """Windows packed into one [1, T] token run, passed to ``Decoder.forward`` as its ``cache``: the
    decoder takes the positions and each layer's attention from it as it does from a KV-cache step
    (``layer(i).attend``), so it needs no path of its own for packed input."""

    def __init__(self, lengths: torch.Tensor, device):
        self.seqs = Packed(lengths).to(device)

    @property
    def positions(self) -> torch.Tensor:
        """[1, T]: each token's position in its window."""
        return self.seqs.position[None]

    def layer(self, i: int) -> "PackedWindows":
        return self

    def attend(self, q, k, v, attn):
        """q [1, Hq, T, D], k and v [1, Hkv, T, D] -> [1, Hq, T, D]: causal attention within each window,
        per chunk on a right-padded [n, H, width, D] view (no real token sees a pad); ``attn``: the
        layer's attention (its window, query scale and soft-cap)."""
        T, Hq, D = q.shape[2], q.shape[1], q.shape[3]
        out = q.new_empty(T, Hq * D)
        for c in self.seqs.chunks:
            q_c, k_c, v_c = (c.pad(t[0, :, c.t0:c.t1].transpose(0, 1).reshape(c.t1 - c.t0, -1))
                             .view(c.n, c.width, t.shape[1], D).transpose(1, 2) for t in (q, k, v))
            pos = torch.arange(c.width, device=q.device)
            o = attention(q_c, k_c, v_c, pos, pos, scale=attn.scale, window=attn.window, softcap=attn.softcap)
            out[c.t0:c.t1] = c.unpad(o.transpose(1, 2).reshape(c.n * c.width, Hq * D))
        return out.view(T, Hq, D).transpose(0, 1)[None]


def summarize(logprobs: np.ndarray) -> tuple[float, int, float]:
    """(logprob_sum, n_scored, perplexity) of one document; perplexity is NaN with nothing scored."""
    n = int(logprobs.shape[0])
    total = float(np.sum(logprobs, dtype=np.float64))
    return total, n, (math.exp(-total / n) if n else float("nan"))
