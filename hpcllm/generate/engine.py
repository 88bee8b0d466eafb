"""One shard's generation on one tp group: the scheduler's plans run through the model and the cache.

    leader: plan -> broadcast -> every rank: frees/admits, KV copies, one forward pass
    over the packed tokens (decodes + prefill chunks), logits of the sampled rows only
    (this rank's vocabulary slice), sampling -> leader: detokenize, decide who finished

Every rank of the group holds the same scheduler state; only the leader
detokenizes and decides (``hpcllm.generate.scheduler``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcllm.generate.constrain import Guide
from hpcllm.generate.sampling import SamplingParams, row_key, sample
from hpcllm.generate.scheduler import CONSTRAINT_INCOMPLETE, EOS, LENGTH, STOP, Scheduler, broadcast_plan
from hpcllm.generate.text import Completion
from hpcllm.model.layers import linear


@dataclass
class Limits:
    """What ends a completion (besides its per-document max_new)."""
    eos_ids: frozenset    # empty with --ignore-eos
    stop_ids: frozenset
    stops: tuple          # stop strings as UTF-8 bytes; or a list of such tuples, one per document


class Engine:
    def __init__(self, model, cache, prompts, max_new, doc_ids, params: SamplingParams, limits: Limits,
                 n: int, batch_tokens: int, max_seqs: int, tokenizer=None, logprobs: bool = False,
                 prefix_cache: bool = True, constraints=None, grammars=None):
        self.model, self.cache, self.comm = model, cache, model.comm
        self.leader = self.comm.rank == 0
        self.prompts, self.max_new, self.doc_ids = prompts, max_new, doc_ids
        # per document: SamplingParams and completions (one value: every document's)
        self.params = params if isinstance(params, list) else [params] * len(prompts)
        self.limits, self.logprobs = limits, logprobs
        self.n = n if isinstance(n, list) else [n] * len(prompts)
        self.tokenizer = tokenizer
        self.sched = Scheduler(prompts, cache.n_slots, n, batch_tokens, max_seqs, prefix_cache, cache.reusable)
        self.vocab = model.cfg["vocab"]
        self.head = model.head      # the LM head as linear() takes it (packed for oneDNN where that runs)
        self.texts = {}                      # seq id -> Completion (leader)
        self.results = {}                    # (doc, completion) -> (ids, logprobs, reason, text)
        self.left = np.array([k if len(p) else 0 for k, p in zip(self.n, prompts)])   # completions still running
        self.docs_done = 0                   # documents run whose completions are all done
        self.seen = (torch.zeros(cache.n_slots, model.head_weight.shape[0], dtype=torch.bool)
                     if any(p.repetition_penalty != 1.0 for p in self.params) else None)
        # constrained decoding: per document a Constraint or None; grammars: the job's constrain.Grammars
        self.constraints = constraints
        self.guide = (Guide(grammars, model.vocab_start, model.vocab_start + model.head_weight.shape[0])
                      if grammars is not None else None)

    def run_until(self, target: int) -> None:
        """Steps until at least ``target`` documents are done (all of their completions)."""
        while self.docs_done < target:
            if not self.step():
                if not self.sched.idle:
                    raise RuntimeError("generate: the scheduler stalled with sequences left")
                return

    def step(self) -> bool:
        plan = broadcast_plan(self.sched.plan() if self.leader else None, self.comm)
        self.sched.apply_start(plan)
        self._collect()
        if plan.empty:
            return False
        for src, dst, n in plan.copies:
            self.cache.copy(src, dst, n)
        for i, j, c, slot, _ in plan.admits:
            self._reset_seen(slot, self.prompts[j])
            if self.guide is not None and self.constraints[j] is not None:
                self.guide.start(i, self.constraints[j])
            if self.leader:
                stops = self.limits.stops
                self.texts[i] = Completion(self.tokenizer, list(stops[j] if isinstance(stops, list) else stops))
        ids, lps = self._forward_and_sample(plan)
        for s in self.sched.apply_sampled(plan, ids, lps):
            if self.seen is not None:
                self._mark_seen(s.slot, s.tokens[-1])
            if self.guide is not None:
                self.guide.advance(s.id, s.tokens[-1])
            if self.leader:
                reason = self._finished(s)
                if reason is not None:
                    self.sched.finish(s, reason)
        return True

    def _forward_and_sample(self, plan):
        seqs = self.sched.seqs
        decode = [(seqs[i].slot, p0) for i, p0, n in plan.entries if n == 1]
        chunks = [(seqs[i].slot, p0, n) for i, p0, n in plan.entries if n > 1]
        where, tokens = self._packed_layout(plan)
        masks = self.guide.masks([i for _, i in plan.samples]) if self.guide is not None else None   # meanwhile
        step = self.cache.step([s for s, _ in decode], [p for _, p in decode], chunks)
        ids = torch.tensor(tokens, dtype=torch.int64)[None]
        hidden = self.model(ids, step.positions, cache=step)[0]
        if not plan.samples:                 # only prefill chunks that end inside their prompts
            return [], None
        rows = torch.tensor([where[t] for t, _ in plan.samples], dtype=torch.int64)
        logits = self.model.soften(linear(hidden[rows], self.head).float())
        sampled = [seqs[i] for _, i in plan.samples]
        keys = torch.tensor([_signed(row_key(self.params[s.doc].seed, self.doc_ids[s.doc], s.completion,
                                             len(s.generated))) for s in sampled], dtype=torch.int64)
        seen = self.seen[[s.slot for s in sampled]] if self.seen is not None else None
        allowed = torch.from_numpy(masks.result()) if masks is not None else None
        out, lps = self._sample(logits, keys, [self.params[s.doc] for s in sampled], seen, allowed)
        return out.tolist(), (lps.tolist() if lps is not None else None)

    def _sample(self, logits, keys, params, seen, allowed):
        """``sample`` over rows that share their SamplingParams, group by group (in the same order on
        every rank; each row's choice depends on its own logits, key and parameters only)."""
        groups = {}
        for k, p in enumerate(params):
            groups.setdefault(p, []).append(k)
        if len(groups) == 1:
            return sample(logits, keys, params[0], self.model.vocab_start, self.vocab, self.comm, seen,
                          self.logprobs, allowed)
        out = torch.empty(len(params), dtype=torch.int64)
        lps = torch.empty(len(params), dtype=torch.float32) if self.logprobs else None
        for p, rows in groups.items():
            r = torch.tensor(rows, dtype=torch.int64)
            got, lp = sample(logits[r], keys[r], p, self.model.vocab_start, self.vocab, self.comm,
                             seen[r] if seen is not None else None, self.logprobs,
                             allowed[r] if allowed is not None else None)
            out[r] = got
            if lps is not None:
                lps[r] = lp
        return out, lps

    def _packed_layout(self, plan):
        """Token ids in the order the cache step packs them (1-token entries first, then chunks), and
        where each token of the plan's order (which ``samples`` index) lands in it."""
        seqs = self.sched.seqs
        singles = [k for k, e in enumerate(plan.entries) if e[2] == 1]
        multis = [k for k, e in enumerate(plan.entries) if e[2] > 1]
        plan_start = np.concatenate([[0], np.cumsum([e[2] for e in plan.entries])])
        where, tokens, t = {}, [], 0
        for k in singles + multis:
            i, p0, n = plan.entries[k]
            tokens += seqs[i].tokens[p0:p0 + n]
            for d in range(n):
                where[int(plan_start[k]) + d] = t + d
            t += n
        return where, tokens

    def _finished(self, s):
        """The leader's decision for a sequence that just got a token: a finish reason or None. A constrained
        one that ends where its grammar does not accept its text: CONSTRAINT_INCOMPLETE."""
        tok, lim, text = s.tokens[-1], self.limits, self.texts[s.id]
        if tok in lim.stop_ids:
            reason = STOP
        elif tok in lim.eos_ids:
            return EOS                       # a constrained sequence: only allowed where its grammar accepts
        elif text.add(tok):
            reason = STOP
        elif self.guide is not None and self.guide.ended(s.id):
            reason = EOS                     # the grammar is complete: only EOS could follow
        elif len(s.generated) >= self.max_new[s.doc]:
            reason = LENGTH
        else:
            return None
        if self.guide is not None and not self.guide.complete(s.id, text.data(), cut=reason == STOP):
            return CONSTRAINT_INCOMPLETE
        return reason

    def _collect(self):
        """Completions freed by the last plan -> results; documents done."""
        for s, reason in self.sched.done:
            text = self.texts.pop(s.id).text() if self.leader else ""
            self.results[s.doc, s.completion] = (s.generated, s.lps, reason, text)
            if self.guide is not None:
                self.guide.drop(s.id)
            self.left[s.doc] -= 1
            self.docs_done += int(self.left[s.doc] == 0)
        self.sched.done = []

    def _reset_seen(self, slot, prompt):
        if self.seen is not None:
            self.seen[slot] = False
            local = torch.from_numpy(np.unique(prompt)) - self.model.vocab_start
            self.seen[slot, local[(local >= 0) & (local < self.seen.shape[1])]] = True

    def _mark_seen(self, slot, token):
        local = token - self.model.vocab_start
        if 0 <= local < self.seen.shape[1]:
            self.seen[slot, local] = True


def _signed(key: int) -> int:
    """A 64-bit unsigned key as the int64 holding the same bits."""
    return key - (1 << 64) if key >= 1 << 63 else key
