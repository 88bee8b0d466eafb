"""`hpcllm classify --labels a,b,c` with a decoder: zero-shot labels from the model's likelihood of each name.

Each document becomes a prompt (``--prompt-template`` with ``{text}`` and
optionally ``{labels}``; default ``DEFAULT_TEMPLATE``), tokenized as every
job's documents are (BOS where the model's config says so).  Each class
name is scored by its exact log-likelihood after the prompt: the sum of the
log-probabilities of its tokens, each given the prompt and the name's earlier
tokens.  A name's tokens are those of ``" " + name`` tokenized alone, without
special tokens (``label_ids``); the scored sequence is the prompt's ids then
the name's, which is the tokenization of ``prompt + " " + name`` whenever the
tokenizer does not merge across that space (byte-level BPE pre-tokenizes
before " word", so it never does).  End the template without a trailing
space.  The probabilities are the softmax of the names' log-likelihoods:
the columns of a trained classifier (``label``, ``label_id``, ``probs``,
``top_p``; ``hpcllm.jobs.labels.LabelColumns``).

The prompt's KV is computed once per document: a batch's prompts are
prefilled into KV-cache slots (``hpcllm.generate.kv_cache``) in one packed
forward pass, whose last position gives every name's first token; names of
more tokens then run as prefill chunks over a copy of their prompt's slot,
as many (document, name) pairs per forward pass as the cache holds.  Log-
probabilities come from ``hpcllm.scoring.vocab_parallel_logprobs``, so any
tp runs without gathering the vocabulary, and every rank of a group gets the
same numbers.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import numpy as np
import torch

from hpcllm.corpus.batching import make_batches
from hpcllm.errors import HpcllmError
from hpcllm.executor.job import Job
from hpcllm.jobs.labels import LabelColumns
from hpcllm.model.architectures import require_family
from hpcllm.scoring import vocab_parallel_logprobs, with_bos

DEFAULT_TEMPLATE = "{text}\nWhich of these is it about: {labels}?\nAnswer:"
LABEL_SEP = " "
KV_BUDGET = 256 << 20     # bytes of KV cache per rank: prompts' slots plus the names' copies


def read_labels(cfg) -> list[str]:
    """The class names of --labels or --labels-file (one per line, blank lines skipped)."""
    if (cfg.labels is None) == (cfg.labels_file is None):
        raise HpcllmError("classify: give the class names with --labels or --labels-file (not both)")
    if cfg.labels is not None:
        names = [x.strip() for x in cfg.labels.split(",")]
    else:
        try:
            with open(cfg.labels_file, encoding="utf-8") as f:
                names = [x.strip() for x in f]
        except OSError as exc:
            raise HpcllmError(f"classify: cannot read --labels-file {cfg.labels_file}: {exc.strerror}") from None
    names = [x for x in names if x]
    if len(names) < 2 or len(set(names)) != len(names):
        raise HpcllmError(f"classify: zero-shot needs at least two distinct class names, got {names}")
    return names


def label_ids(tokenizer, labels) -> list[np.ndarray]:
    """Each name's token ids: ``LABEL_SEP + name`` tokenized alone, no special tokens."""
    return [np.array(tokenizer.encode(LABEL_SEP + x, add_special_tokens=False), np.int64) for x in labels]


def prompt_of(template: str, labels: list[str], text_field: str, obj: dict):
    """A JSON line's prompt (None: no text, the row gets MISSING_FIELD)."""
    text = obj.get(text_field)
    return template.replace("{labels}", ", ".join(labels)).replace("{text}", text) if isinstance(text, str) else None


@torch.inference_mode()
def label_logprobs(model, cache, prompts, names) -> np.ndarray:
    """float64 [B, C]: log p(names[c] | prompts[b]) summed over the name's tokens.

    ``prompts``: int64 id arrays (BOS included); ``names``: int64 id arrays of >= 1 token; ``cache``:
    a KVCache whose slots hold the longest prompt plus the longest name, at least B + 1 of them.
    Collective over the model's tp group (identical inputs on every rank)."""
    B, C = len(prompts), len(names)
    n_prompt = [len(p) for p in prompts]
    hidden = _run(model, cache, [(b, 0, n) for b, n in enumerate(n_prompt)], np.concatenate(prompts))
    last = hidden[np.cumsum(n_prompt) - 1]                                   # [B, H]: predicts each first token
    first = torch.tensor([n[0] for n in names], dtype=torch.int64)
    out = _logprobs(model, last.repeat_interleave(C, dim=0), first.repeat(B)).reshape(B, C).astype(np.float64)
    pairs = [(b, c) for b in range(B) for c in range(C) if len(names[c]) > 1]
    room = cache.n_slots - B
    for k in range(0, len(pairs), room):                                   # the names' later tokens
        chunks, ids, targets = [], [], []
        for slot, (b, c) in enumerate(pairs[k:k + room], start=B):
            cache.copy(b, slot, n_prompt[b])
            chunks.append((slot, n_prompt[b], len(names[c]) - 1))
            ids.append(names[c][:-1])
            targets.append(names[c][1:])
        hidden = _run(model, cache, chunks, np.concatenate(ids))
        lp = _logprobs(model, hidden, torch.from_numpy(np.concatenate(targets))).astype(np.float64)
        starts = np.r_[0, np.cumsum([len(t) for t in targets])[:-1]]
        for (b, c), total in zip(pairs[k:k + room], np.add.reduceat(lp, starts)):
            out[b, c] += total
    return out


def _run(model, cache, chunks, ids) -> torch.Tensor:
    """Hidden states [T, H] of prefill ``chunks`` [(slot, first position, n)] over their packed ``ids``."""
    step = cache.step([], [], chunks)
    device = model.head_weight.device
    return model(torch.from_numpy(ids)[None].to(device), step.positions.to(device), cache=step)[0]


def _logprobs(model, hidden, targets) -> np.ndarray:
    return vocab_parallel_logprobs(hidden, targets.to(hidden.device), model.head, model.vocab_start, model.comm,
                                   soften=model.soften).numpy()


class ZeroShotJob(LabelColumns, Job):
    name = "classify"
    repeats = "same"        # a repeated document is labelled once (hpcllm/executor/repeats.py)

    def __init__(self, cfg, ckpt):
        super().__init__(cfg, ckpt)
        require_family(ckpt, "decoder", "classify --labels")
        from hpcllm.tokenizer import Tokenizer

        self.model_cfg = ckpt.config
        self.class_names = read_labels(cfg)
        self.n_classes = len(self.class_names)
        self.tokenizer = Tokenizer.from_str(ckpt.tokenizer_json, source=cfg.model, apply_file_settings=False)
        self.names = label_ids(self.tokenizer, self.class_names)
        if not all(len(n) for n in self.names):
            raise HpcllmError("classify: a class name tokenized to nothing")
        self.template = cfg.prompt_template or DEFAULT_TEMPLATE
        if "{text}" not in self.template:
            raise HpcllmError("classify: --prompt-template must hold {text} (where the document goes)")
        self.text_of = functools.partial(prompt_of, self.template, self.class_names, cfg.text_field)
        self.text_of_needs = "--labels (the prompt template over each line's text)"
        self.longest = max(len(n) for n in self.names)
        self.context = min(cfg.max_length or ckpt.config["max_positions"], ckpt.config["max_positions"])
        if self.context <= self.longest + 1:
            raise HpcllmError(f"classify: a context of {self.context} tokens leaves no room for a prompt")
        self.limit_documents(self.context - self.longest)    # prompt + name fit the context (the prompt cut at its end)
        self.cache = None

    def config_hash(self) -> str:
        return self.cfg.result_hash(self.name, labels=self.class_names)   # a --labels-file's names, not its path

    def describe(self) -> str:
        return (f"zero-shot {self.n_classes} labels with {os.path.basename(self.cfg.model)} "
                f"({self.model_hash()[:12]})")

    def start(self, work):
        prompts = [with_bos(work.doc(r).astype(np.int64), self.model_cfg) for r in work.process]
        lengths = np.array([len(p) for p in prompts], np.int64)
        return SimpleNamespace(work=work, prompts=prompts, out=self.empty_outputs(work.n_docs),
                               batches=make_batches(lengths, self.cfg.batch_tokens, self.cfg.window, padded=False))

    def compute(self, model, state, batch):
        prompts = [state.prompts[k] for k in batch]
        scores = label_logprobs(model, self._cache(model, prompts), prompts, self.names)
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        rows = state.work.process[batch]
        state.out["probs"][rows] = probs
        state.out["label_id"][rows] = probs.argmax(axis=1)

    def batch_progress(self, state, batch):
        return int(sum(len(state.prompts[k]) for k in batch))

    def _cache(self, model, prompts):
        """A KV cache for this batch: a slot per prompt plus as many for the names as KV_BUDGET allows."""
        from hpcllm.generate.kv_cache import KVCache, cache_dtype, slot_bytes

        slot_len = -(-(max(len(p) for p in prompts) + self.longest) // 64) * 64
        dtype = cache_dtype(model)
        pairs = len(prompts) * sum(len(n) > 1 for n in self.names)
        n_slots = len(prompts) + max(1, min(pairs, KV_BUDGET // slot_bytes(model, slot_len, dtype) - len(prompts)))
        if self.cache is None or not self.cache.fits(n_slots, slot_len):
            self.cache = None
            self.cache = KVCache(model, n_slots, slot_len, dtype, model.head_weight.device)
        return self.cache
