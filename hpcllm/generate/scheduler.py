"""Continuous batching: which sequences run in the next forward pass, decided by the tp leader.

Every step the group's leader writes a plan (``StepPlan``: sequences that finished,
prompts admitted into free slots, KV copies, the step's tokens, which rows are
sampled), broadcasts it as one int64 array, and every rank of the group
applies the same plan, so the batches never diverge. Per step:

* every decoding sequence contributes one token;
* the rest of the token budget (``--batch-tokens``) goes to prefill chunks of
  admitted prompts, oldest first (chunked prefill: a long prompt never stalls
  the decoding sequences);
* a finished sequence frees its slot at the next step and a waiting prompt is
  admitted there (iteration-level scheduling).

Shared prefixes: a slot keeps the KV of its last sequence after it finishes.
A new prompt goes to the free slot whose kept tokens share the longest prefix
with it and starts its prefill there; when a busy slot shares a longer one
(by at least ``MIN_COPY`` tokens) that prefix is copied into the free slot
first. A prompt sharing such a prefix with a prompt admitted in the same step
waits one step, until that prompt's prefill has put the prefix in its slot.
``--n`` completions of a prompt take n slots: the prompt is prefilled once,
its last position sampled n times (one key per completion) and its KV copied
to the n - 1 others.

The leader alone decides when a sequence ends (EOS, stop ids, stop strings on
its detokenized text, length) and says so in the next plan.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

MIN_COPY = 16       # tokens of shared prefix worth a copy from a busy slot
EOS, STOP, LENGTH = 0, 1, 2
CONSTRAINT_INCOMPLETE = 3   # ended (length, stop) where the completion's grammar does not accept its text
FINISH_NAMES = ("eos", "stop", "length", "constraint_incomplete")


@dataclass
class Seq:
    id: int
    doc: int              # index into the shard's processed documents
    completion: int
    slot: int
    tokens: list          # prompt + generated ids
    n_prompt: int
    kv: int               # positions whose KV is in the slot
    base: int | None = None   # --n: the sequence whose prefill gives this one its prompt KV
    lps: list = field(default_factory=list)

    @property
    def generated(self) -> list:
        return self.tokens[self.n_prompt:]

    @property
    def decoding(self) -> bool:
        return self.kv == len(self.tokens) - 1 and len(self.tokens) > self.n_prompt


@dataclass
class StepPlan:
    frees: list = field(default_factory=list)     # (seq id, finish reason)
    admits: list = field(default_factory=list)    # (seq id, doc, completion, slot, prefix reused)
    copies: list = field(default_factory=list)    # (src slot, dst slot, positions)
    entries: list = field(default_factory=list)   # (seq id, first position, tokens); decodes first
    samples: list = field(default_factory=list)   # (packed token index, seq id)

    def encode(self) -> np.ndarray:
        parts = [self.frees, self.admits, self.copies, self.entries, self.samples]
        head = [len(p) for p in parts]
        flat = [x for p in parts for row in p for x in row]
        return np.array(head + flat, dtype=np.int64)

    @classmethod
    def decode(cls, a: np.ndarray) -> "StepPlan":
        widths, head = (2, 5, 3, 3, 2), [int(x) for x in a[:5]]
        pos, parts = 5, []
        for w, n in zip(widths, head):
            parts.append([tuple(int(x) for x in a[pos + i * w:pos + (i + 1) * w]) for i in range(n)])
            pos += w * n
        return cls(*parts)

    @property
    def empty(self) -> bool:
        return not self.entries


def broadcast_plan(plan: StepPlan | None, comm) -> StepPlan:
    """The leader's plan on every rank of the tp group (two small all-reduces; tp=1: as is)."""
    if comm.size == 1:
        return plan
    data = plan.encode() if comm.rank == 0 else None
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    comm.all_reduce(n)
    buf = torch.from_numpy(data.copy()) if data is not None else torch.zeros(int(n[0]), dtype=torch.int64)
    comm.all_reduce(buf)
    return StepPlan.decode(buf.numpy())


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class Scheduler:
    """The running set and the slots; ``plan()`` on the leader, ``apply`` (bookkeeping) everywhere."""

    def __init__(self, prompts, n_slots: int, n, batch_tokens: int, max_seqs: int, reuse: bool = True,
                 reusable=None):
        self.prompts = prompts                       # per document: int64 prompt ids (empty: not run)
        self.waiting = deque(j for j, p in enumerate(prompts) if len(p))
        self.n = n if isinstance(n, list) else [n] * len(prompts)   # completions per document
        self.budget, self.max_seqs = max(1, batch_tokens), max(max(self.n, default=1), max_seqs)
        self.reuse = reuse                           # False: shared prefixes are recomputed
        # (n, positions a slot holds) -> how much of an n-token shared prefix is reusable (KVCache.reusable)
        self.reusable = reusable or (lambda n, held: n)
        self.owner = [None] * n_slots                # slot -> seq id
        self.kept = [np.zeros(0, np.int64)] * n_slots   # slot -> tokens whose KV the slot holds
        self.seqs: dict[int, Seq] = {}
        self.order: list[int] = []                   # running seq ids in admission order
        self.next_id = 0
        self.finished: list = []                     # (seq, reason) decided by the leader, not yet freed
        self.pending_copies: list = []               # forks sampled last step: copy the prompt KV
        self.done: list = []                         # (seq, reason) freed, in order
        self.peak_tokens = 0
        self.reused_tokens = 0                       # prompt positions not recomputed (shared prefixes)

    # ------------------------------------------------------------------ the leader

    def plan(self) -> StepPlan:
        p = StepPlan(frees=[(s.id, r) for s, r in self.finished], copies=list(self.pending_copies))
        gone = {s.id for s, _ in self.finished}
        free = [i for i, o in enumerate(self.owner) if o is None or o in gone]
        none = np.zeros(0, np.int64)
        valid = {i: self._valid(i) if self.reuse else none for i in range(len(self.owner))}   # KV each slot holds
        running = len(self.order) - len(gone)
        while self.waiting and len(free) >= (k := self.n[self.waiting[0]]) and running + k <= self.max_seqs:
            if self._wait_for_prefix(p, self.waiting[0], valid):
                break
            self._admit(p, self.waiting.popleft(), free, valid)
            running += k
        self._entries(p, gone)
        return p

    def _valid(self, slot: int) -> np.ndarray:
        o = self.owner[slot]
        if o is None:
            return self.kept[slot]
        s = self.seqs[o]
        return np.asarray(s.tokens[:s.kv], np.int64)

    def _wait_for_prefix(self, p: StepPlan, j: int, valid: dict) -> bool:
        """Whether doc j should wait a step: a prompt admitted in this plan shares a prefix with it at
        least MIN_COPY tokens longer than any slot holds now (its KV exists after this step's prefill,
        then it is copied instead of recomputed: a shared system prompt is computed once, not once per
        slot of the first wave)."""
        if not p.admits or not self.reuse:
            return False
        prompt = self.prompts[j]
        have = max(self._shared(v, prompt) for v in valid.values())
        soon = max(self._shared(self.prompts[a[1]], prompt) for a in p.admits if a[2] == 0)
        return soon >= have + MIN_COPY

    def _shared(self, held: np.ndarray, prompt: np.ndarray) -> int:
        """Prompt positions whose KV a slot holding ``held`` can give (the last prompt token is always
        computed; a sliding layer's ring may have moved past the prefix)."""
        return self.reusable(min(common_prefix(held, prompt), len(prompt) - 1), len(held))

    def _admit(self, p: StepPlan, j: int, free: list, valid: dict) -> None:
        """Doc j into the free slot sharing the longest prefix with it (copied from a busy slot when
        that shares at least MIN_COPY more); its forks (--n) into the next free slots."""
        prompt = self.prompts[j]
        shared = {s: self._shared(v, prompt) for s, v in valid.items()}
        home = max(free, key=lambda s: (shared[s], -s))
        reuse = shared[home]
        src = max(shared, key=lambda s: (shared[s], -s))
        if shared[src] >= reuse + MIN_COPY:
            p.copies.append((src, home, shared[src]))
            reuse = shared[src]
        free.remove(home)
        p.admits.append((self.next_id, j, 0, home, reuse))
        valid[home] = prompt[:reuse]                 # what it holds for later admissions of this step
        for c in range(1, self.n[j]):
            slot = free.pop(0)
            p.admits.append((self.next_id + c, j, c, slot, 0))
            valid[slot] = np.zeros(0, np.int64)
        self.next_id += self.n[j]

    def _entries(self, p: StepPlan, gone: set) -> None:
        """Decodes first (one token each), then prefill chunks within the token budget."""
        admitted = {a[0]: a for a in p.admits}
        order = [i for i in self.order if i not in gone] + [a[0] for a in p.admits]
        state = {}
        for i in order:
            if i in admitted:
                _, j, c, _, reuse = admitted[i]
                state[i] = (reuse, len(self.prompts[j]), c > 0, False)
            else:
                s = self.seqs[i]
                state[i] = (s.kv, len(s.tokens), s.base is not None and s.kv == 0, s.decoding)
        left = self.budget
        for i in order:
            kv, n_tok, waiting, decoding = state[i]
            if decoding:
                p.samples.append((len(p.entries), i))
                p.entries.append((i, kv, 1))
                left -= 1
        t = len(p.entries)
        for i in order:
            kv, n_tok, waiting, decoding = state[i]
            if decoding or waiting or left <= 0 or kv >= n_tok:
                continue
            n = min(n_tok - kv, left)
            p.entries.append((i, kv, n))
            if kv + n == n_tok:                     # the prompt's last token: sample it (and its forks)
                doc = admitted[i][1] if i in admitted else self.seqs[i].doc
                p.samples += [(t + n - 1, i + c) for c in range(self.n[doc])]
            t += n
            left -= n

    def finish(self, seq: Seq, reason: int) -> None:
        self.finished.append((seq, reason))

    # ------------------------------------------------------------------ every rank

    def apply_start(self, p: StepPlan) -> None:
        """Frees, admissions and the bookkeeping of copies, before the forward pass."""
        for i, reason in p.frees:
            s = self.seqs.pop(i)
            self.order.remove(i)
            self.owner[s.slot] = None
            self.kept[s.slot] = np.asarray(s.tokens[:s.kv], np.int64)
            self.done.append((s, reason))
        self.finished = []
        self.pending_copies = []
        for i, j, c, slot, reuse in p.admits:
            if c == 0 and self.waiting and self.waiting[0] == j:
                self.waiting.popleft()               # FIFO: the leader popped it when planning
            prompt = self.prompts[j]
            base = i - c if c else None
            self.seqs[i] = Seq(i, j, c, slot, prompt.tolist(), len(prompt), reuse, base)
            self.reused_tokens += reuse
            self.owner[slot] = i
            self.order.append(i)
        self.peak_tokens = max(self.peak_tokens, sum(len(s.tokens) for s in self.seqs.values()))

    def apply_sampled(self, p: StepPlan, ids, lps) -> list:
        """After the forward pass: KV advanced, sampled tokens appended; returns the sampled seqs."""
        for i, p0, n in p.entries:
            self.seqs[i].kv = p0 + n
        out = []
        for k, (_, i) in enumerate(p.samples):
            s = self.seqs[i]
            if s.base is not None and s.kv == 0:     # a fork: its prompt KV is copied next step
                base = self.seqs[s.base]
                self.pending_copies.append((base.slot, s.slot, base.n_prompt))
                s.kv = base.n_prompt
            s.tokens.append(int(ids[k]))
            if lps is not None:
                s.lps.append(float(lps[k]))
            out.append(s)
        return out

    @property
    def idle(self) -> bool:
        return not self.seqs and not self.waiting
