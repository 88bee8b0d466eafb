"""Choosing the next token when each tp rank holds only its vocabulary slice of the logits.

Nothing of size V is ever communicated; per step and row the collectives
carry O(k) numbers:

* greedy (temperature 0): a distributed argmax, each rank's (max, index)
  gathered; ties go to the lowest id, as ``torch.argmax`` does.
* sampling: thresholds on the temperature-scaled logits from each rank's local
  top candidates merged across ranks (top-k: the k-th largest; top-p: the
  smallest head of the sorted distribution holding ``top_p`` of the mass,
  widening the candidates until the head is inside them; min-p: the max plus
  log(min_p)), applied in HF's order (top-k, top-p, min-p); then the
  Gumbel-max trick: argmax(logit / T + g) over the kept tokens, a distributed
  argmax again. The noise g of token t is a hash of (the row's key, t)
  computed by the rank owning t, and the key hashes (seed, document id,
  completion index, step), so a completion's random stream depends on nothing
  else: not the batch, the dp rank, the tp layout, the shard order or a resume.
* ``logprobs``: log-softmax of the model's logits (before a grammar's mask,
  penalties, temperature and filtering, as vLLM reports them) at the chosen token, from a
  distributed logsumexp (two all-reduces of [B]).

A gather of a few values per rank is an all-reduce sum of a [size, ...]
buffer in which each rank fills its own row (``hpcllm.world.comm``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
FIRST_CANDIDATES = 64    # local candidates per row for top-p; doubled until the nucleus fits


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_key(seed: int, doc_id: str, completion: int, step: int) -> int:
    """The 64-bit key of one sampling draw (a hash of its identity only)."""
    h = hashlib.blake2b(f"{seed}\x00{doc_id}\x00{completion}\x00{step}".encode("utf-8", "surrogatepass"),
                        digest_size=8)
    return int.from_bytes(h.digest(), "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (a 32-bit integer hash) on int64 tensors holding values < 2**32."""
    x = (x ^ (x >> 16)) & _M32
    x = (x * 0x7FEB352D) & _M32
    x = (x ^ (x >> 15)) & _M32
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """float64 Gumbel(0, 1) noise for (row key, token id) pairs; keys [N] int64 (64 bits), token_ids [N]."""
    lo, hi = keys & _M32, (keys >> 32) & _M32
    h1 = _mix32(_mix32((token_ids * 0x9E3779B1 + lo) & _M32) ^ hi)
    h2 = _mix32(h1 ^ 0x5BD1E995)
    u = ((h1 >> 5).double() * 67108864.0 + (h2 >> 6).double() + 0.5) / 9007199254740992.0   # 53 bits
    return -torch.log(-torch.log(u))


def _gather(comm, local: torch.Tensor) -> torch.Tensor:
    """[size, *local.shape]: every rank's ``local`` (an all-reduce of a buffer with one row per rank)."""
    if comm.size == 1:
        return local[None]
    buf = local.new_zeros((comm.size,) + tuple(local.shape))
    buf[comm.rank] = local
    return comm.all_reduce(buf)


def logsumexp(logits: torch.Tensor, comm) -> torch.Tensor:
    """[B] float32 logsumexp over the whole (split) vocabulary of logits [B, V_local]."""
    local = torch.logsumexp(logits, dim=-1)
    if comm.size == 1:
        return local
    top = comm.all_reduce(local.clone(), op="max")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top + torch.log(comm.all_reduce(torch.exp(local - top)))


def argmax(scores: torch.Tensor, vocab_start: int, comm) -> torch.Tensor:
    """[B] int64 global id of the largest score of each row (lowest id among equals)."""
    value, index = scores.max(dim=-1)
    return merge_argmax(value, index, vocab_start, comm)


def merge_argmax(value: torch.Tensor, index: torch.Tensor, vocab_start: int, comm) -> torch.Tensor:
    """[B] global ids from each rank's best (value, local index) per row: the largest value, the
    lowest id among equals."""
    if comm.size == 1:
        return index + vocab_start
    both = _gather(comm, torch.stack([value.double(), (index + vocab_start).double()]))  # [size, 2, B]
    values, ids = both[:, 0], both[:, 1]
    best = values.max(dim=0).values
    ids = torch.where(values == best[None], ids, torch.full_like(ids, math.inf))
    return ids.min(dim=0).values.long()


def _top_candidates(scaled, k: int, vocab: int, comm) -> torch.Tensor:
    """[B, min(k, V)] the k largest scaled logits of the whole vocabulary, descending. Every rank
    sends the same width (its slice may hold fewer than k tokens: padded with -inf)."""
    width = min(k, vocab)
    local = scaled.topk(min(width, scaled.shape[1]), dim=-1).values
    if local.shape[1] < width:
        local = torch.cat([local, local.new_full((local.shape[0], width - local.shape[1]), -math.inf)], dim=1)
    merged = _gather(comm, local).permute(1, 0, 2).reshape(scaled.shape[0], comm.size * width)
    return merged.topk(width, dim=-1).values


def _top_p_threshold(scaled, top_p: float, vocab: int, comm) -> torch.Tensor:
    """[B] the smallest scaled logit kept by top-p: tokens in descending order are kept while the
    mass before them is below ``top_p`` (HF's TopPLogitsWarper; the most likely is always kept)."""
    lse = logsumexp(scaled, comm)
    k = FIRST_CANDIDATES
    while True:
        cand = _top_candidates(scaled, k, vocab, comm)              # [B, k]
        p = torch.exp(cand - lse[:, None])
        before = torch.cumsum(p, dim=-1) - p
        kept = (before < top_p).sum(dim=-1).clamp(min=1)            # [B]
        if bool((kept < cand.shape[1]).all()) or cand.shape[1] >= vocab:
            return cand.gather(1, (kept - 1)[:, None])[:, 0]
        k *= 4


def thresholds(scaled, params: SamplingParams, vocab: int, comm) -> torch.Tensor:
    """[B] per row, the smallest scaled logit that top-k, top-p and min-p keep (HF's order)."""
    keep = torch.full((scaled.shape[0],), -math.inf)
    if params.top_k > 0:
        kth = _top_candidates(scaled, params.top_k, vocab, comm)[:, -1]
        keep = torch.maximum(keep, kth)
        scaled = scaled.masked_fill(scaled < kth[:, None], -math.inf)
    if params.top_p < 1.0:
        tp_ = _top_p_threshold(scaled, params.top_p, vocab, comm)
        keep = torch.maximum(keep, tp_)
        scaled = scaled.masked_fill(scaled < tp_[:, None], -math.inf)
    if params.min_p > 0.0:
        top = _top_candidates(scaled, 1, vocab, comm)[:, 0]
        keep = torch.maximum(keep, top + math.log(params.min_p))
    return keep


def gumbel_race(scaled, cut, keys, vocab_start: int, comm) -> torch.Tensor:
    """[B] global ids: argmax of scaled + gumbel noise over the tokens kept by ``cut`` [B], all ranks'
    slices together. On the CPU one pass of a Numba kernel (``hpcllm.kernels.gumbel``, the same noise),
    elsewhere torch ops on the kept entries."""
    if scaled.device.type == "cpu":
        from hpcllm.kernels.gumbel import gumbel_argmax

        best, index = gumbel_argmax(scaled.float().contiguous().numpy(), cut.float().numpy(), keys.numpy(),
                                    vocab_start)
        return merge_argmax(torch.from_numpy(best), torch.from_numpy(index), vocab_start, comm)
    rows, cols = (scaled >= cut[:, None]).nonzero(as_tuple=True)
    noisy = torch.full(scaled.shape, -math.inf, dtype=torch.float64, device=scaled.device)
    noisy[rows, cols] = scaled[rows, cols].double() + gumbel_noise(keys[rows], cols + vocab_start)
    return argmax(noisy, vocab_start, comm)


def apply_penalty(logits, seen, penalty: float):
    """HF/vLLM repetition penalty on tokens in ``seen`` (bool [B, V_local]): positive logits
    divided by it, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    hit = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, hit, logits)


def sample(logits, keys, params: SamplingParams, vocab_start: int, vocab: int, comm, seen=None,
           want_logprobs=False, allowed=None):
    """logits [B, V_local] float32 (this rank's vocabulary slice), keys [B] int64 row keys ->
    (token ids [B] int64, log-probabilities [B] float32 or None). Identical on every rank.
    ``allowed``: bool [B, V_local], the tokens a grammar allows (``hpcllm.generate.constrain``), or None."""
    lp = None
    if want_logprobs:
        lse = logsumexp(logits, comm)
    raw = logits
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    if seen is not None:
        logits = apply_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        ids = argmax(logits, vocab_start, comm)
    else:
        scaled = logits / params.temperature
        ids = gumbel_race(scaled, thresholds(scaled, params, vocab, comm), keys, vocab_start, comm)
    if want_logprobs:
        local = ids - vocab_start
        mine = (local >= 0) & (local < raw.shape[1])
        picked = raw.gather(1, local.clamp(0, raw.shape[1] - 1)[:, None])[:, 0].masked_fill(~mine, 0.0)
        lp = (comm.all_reduce(picked) if comm.size > 1 else picked) - lse
    return ids, lp
