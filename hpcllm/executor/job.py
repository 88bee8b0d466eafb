"""What a job is to the executor: what it supplies, and the typed values that cross between them.

A job is a class with a ``name`` and these methods (``Job`` gives the
defaults; ``hpcllm/jobs/embed.py`` is the shortest real example)::

    open_model(cfg)              (class) what ``__init__`` gets: cfg.model's Checkpoint by default
    __init__(cfg, model)         options (a JobConfig) and that model (None without --model); sets
                                 ``self.ckpt``, the checkpoint the executor builds the model from
    schema()                     result columns (hpcllm.store.results.Column, with the dataset
                                 attributes a reader needs), base columns included
    start(work) -> state         a shard's batches (``state.batches``: index arrays into
                                 ``work.process``, or into the job's own units, e.g. score's
                                 windows) and whatever the batches fill
    compute(model, state, batch) one batch, on every rank of the tp group
    result(state) -> ShardResult the shard's columns in input order, the statuses the job gave
                                 some rows, and the shard file's own attributes

and optionally::

    repeats                      "same": a row's results depend only on its token ids and params, so a
                                 repeated document is computed once (hpcllm/executor/repeats.py);
                                 "seeded": also on its document id (sampling), shared only with
                                 --repeats share; None (default): never
    max_length, skip_long        tokens a document is cut to (``limit_documents`` sets both from
                                 the job's own limit and --max-doc-tokens / --long-docs)
    text_of(obj), text_of_needs  a JSON line's text instead of its --text-field (generate --chat)
    params_of(obj)               with text_of: a JSON line's own parameters (``work.params``, one per
                                 row; generate --openai-batch's per-request sampling options)
    batch_progress(state, batch) document tokens the batch completes, for the progress line
    part_outputs, merge_part     (``splits_shards``) a shard's batches computed by several dp
                                 groups, merged (hpcllm/executor/parts.py)
    after_shards(out_dir, plan, mesh, stop) -> bool
                                 a phase of its own once every shard is done, on every rank
                                 (train-classifier's training); stops as the shards do
    totals(out_dir, plan) -> Totals
                                 root attributes of results.h5 and a clause for the summary line
    master_schema()              the columns results.h5 joins and its chunks hold: ``schema()``,
                                 less where the shard files hold more (tokenize's tokens)

The executor does the rest: world and mesh, the plan and resume, claiming
shards, reading and tokenizing (prefetched), stopping on signals, writing
shard files (base columns, statuses, ``n_tokens``), progress, timings and the
master file.  A job that writes something else than a results shard
(``tokenize``) overrides ``write_shard`` and ``finish``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from hpcllm.status import NOT_PROCESSED, Status


class ShardData:
    """A shard read and tokenized by the group leader: what every tp rank needs, plus rows to write."""

    def __init__(self, shard, docs, ids, offsets, status):
        self.shard, self.docs, self.status = shard, docs, status
        self.ids, self.offsets = ids, offsets
        self.process = np.flatnonzero(~np.isin(status, NOT_PROCESSED))
        self.keys = self.narrowed = self.computed = None   # repeated documents (hpcllm.executor.repeats)

    def for_workers(self, process=None) -> "Work":
        """What the tp group computes: ``process`` (default: every row processed)."""
        docs = self.docs
        return Work(self.ids, self.offsets, self.process if process is None else process,
                    docs.doc_id if docs is not None else None, getattr(docs, "params", None))

    def n_tokens(self) -> np.ndarray:
        """Tokens fed to the model per row (0 for rows not processed), int32."""
        n = np.zeros(len(self.status), np.int32)
        n[self.process] = np.diff(self.offsets)[self.process]
        return n


class Work:
    """What every rank of a tp group gets for a shard: the token ids and which rows to process."""

    def __init__(self, ids, offsets, process, doc_ids=None, params=None):
        self.ids, self.offsets, self.process = ids, offsets, process
        self.doc_ids = doc_ids   # the rows' document ids (list of str), where the input has them
        self.params = params     # the rows' Job.params_of (dicts or None), where the job has one

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, row: int) -> np.ndarray:
        return self.ids[self.offsets[row]:self.offsets[row + 1]]


@dataclass
class ShardResult:
    """What a job computed for one shard, every row in input order."""
    columns: dict                                # the schema's job columns (and their offsets columns)
    status: dict = field(default_factory=dict)   # row -> Status the job gave it (a more severe reader's stands)
    attrs: dict = field(default_factory=dict)    # attributes of the shard file (e.g. generate's KV cache use)


@dataclass
class Totals:
    """What a job adds when the master file is built: root attributes and a clause for the summary line."""
    attrs: dict = field(default_factory=dict)
    summary: str = ""


class Job:
    name = "job"
    needs_model = True     # False: no weights and no torch (tokenize)
    partial_results = True  # follow mode: finish() may also run on the files done so far
    text_of = None          # obj -> str | None: a JSON line's text instead of its --text-field (generate --chat)
    text_of_needs = None    # what needs text_of, for the error on token-shard input ("--chat")
    params_of = None        # obj -> dict | None: a JSON line's per-row parameters, with text_of (Work.params)
    max_length = None       # tokens a document is cut to (None: never); status TRUNCATED
    skip_long = False       # --long-docs skip: a document cut to max_length gets TOO_LONG, not TRUNCATED
    min_shard_docs = 1      # a small corpus is not re-cut into shards smaller than this (generate: its running set)
    splits_shards = False   # part_outputs/merge_part: a long shard's batches may be split across dp groups
    repeats = None          # "same" / "seeded": a repeated document may be computed once (executor/repeats.py)
    tokenizer = None        # the job's own Tokenizer when __init__ needed one (the executor builds it otherwise)
    _own_limit = False      # limit_documents: the job's own limit (False: never called)

    def __init__(self, cfg, model):
        self.cfg, self.ckpt = cfg, model

    def limit_documents(self, own=None) -> None:
        """Honour --max-doc-tokens / --long-docs (call in ``__init__``; the option is in config.DOC_JOBS).

        ``own``: the job's own limit on a document's tokens (None: none).  Sets
        ``max_length`` to the lower of ``own`` and --max-doc-tokens (0: no
        limit); where --max-doc-tokens is that limit and --long-docs is skip,
        a longer document is not processed (status TOO_LONG, fill outputs).
        The executor does the cutting, for raw corpora (the tokenizer stops
        there) and token shards (cut at load) alike.
        """
        cap = self.cfg.max_doc_tokens or None
        self._own_limit = own
        self.max_length = min(x for x in (own, cap) if x is not None) if (own or cap) else None
        self.skip_long = cap is not None and self.max_length == cap and self.cfg.long_docs == "skip"

    def token_shard_limit(self):
        """The most tokens per document a token-shard input may hold (None: any; longer ones are refused).
        Documents beyond --max-doc-tokens but within the job's own limit are cut at load instead."""
        return self.max_length if self._own_limit is False else self._own_limit

    def batch_progress(self, state, batch) -> int:
        return 0

    def part_outputs(self, state, batches) -> dict:
        """A part of a shard (``splits_shards``): what ``batches`` computed, as named numpy arrays."""
        raise NotImplementedError

    def merge_part(self, state, arrays: dict) -> None:
        """Another part's ``part_outputs`` into ``state``, which then gives the shard's ``result``."""
        raise NotImplementedError

    @classmethod
    def open_model(cls, cfg):
        from hpcllm.checkpoint.hdf5 import Checkpoint

        return Checkpoint(cfg.model)

    def tokenizer_json(self) -> str:
        return self.ckpt.tokenizer_json

    def model_hash(self) -> str:
        """What the output directory was made with (the manifest refuses another)."""
        return self.ckpt.content_hash

    def config_hash(self) -> str:
        """Hash of the options that change results (the manifest refuses others)."""
        return self.cfg.result_hash(self.name)

    def describe(self) -> str:
        return f"model {os.path.basename(self.cfg.model)} ({self.model_hash()[:12]})"

    def schema(self):
        raise NotImplementedError

    def master_schema(self):
        """The columns results.h5 joins and the chunks hold (tokenize: fewer than its shard files)."""
        return self.schema()

    def start(self, work: Work):
        raise NotImplementedError

    def compute(self, model, state, batch):
        raise NotImplementedError

    def result(self, state) -> ShardResult:
        raise NotImplementedError

    def after_shards(self, out_dir: str, plan, mesh, stop) -> bool:
        """A phase after every shard is done, on every rank of ``mesh.world`` (collective); default: none.

        ``stop`` is the run's StopFlag: agree on it at step boundaries (``stop.should_stop(mesh.world)``)
        and return True when it stopped the phase early; the run then ends as a stopped run of shards
        does (stop note, exit 75), and the rerun, which finds every shard done, runs the phase again
        (resuming from whatever state the job saved)."""
        return False

    def totals(self, out_dir: str, plan) -> Totals:
        """Root attributes of results.h5 beyond the executor's, and a clause for the summary (rank 0)."""
        return Totals()

    def write_shard(self, out_dir: str, data: ShardData, result: ShardResult, attrs: dict) -> int:
        """Write one shard's results file; returns the tokens it holds."""
        from hpcllm.store.results import base_columns, write_shard

        n_tokens = data.n_tokens()
        status = data.status.copy()
        for row, st in result.status.items():   # the more severe of the reader's and the job's stands
            if _severity(st) >= _severity(status[row]):
                status[row] = st
        columns = {**base_columns(data.shard, data.docs), "status": status, "n_tokens": n_tokens, **result.columns}
        write_shard(out_dir, data.shard, columns, attrs={**attrs, **result.attrs}, schema=self.schema())
        return int(n_tokens.sum())

    def finish(self, out_dir: str, plan, attrs: dict) -> str:
        """After every shard is done (rank 0): join them; returns a one-line summary."""
        import json

        import h5py

        from hpcllm.executor.repeats import FILLED, filled_total
        from hpcllm.store.master import build_master

        totals = self.totals(out_dir, plan)
        filled = filled_total(out_dir)
        repeats = {} if filled is None else {FILLED: filled}
        path = build_master(out_dir, plan, self.schema(), {**attrs, **totals.attrs, **repeats})
        with h5py.File(path, "r") as f:
            counts = json.loads(f.attrs["status_counts"])
        return (f"wrote {path}: {sum(counts.values())} documents; status counts: "
                + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
                + (f"; {totals.summary}" if totals.summary else "")
                + (f"; {filled} rows filled from a repeated document (computed once)" if repeats else ""))


def _severity(status) -> int:
    """Order of statuses a row may get twice (the reader's, then the job's): not processed > bad UTF-8 >
    truncated > ok / empty."""
    if status in NOT_PROCESSED:
        return 3
    return {Status.BAD_UTF8: 2, Status.TRUNCATED: 1}.get(status, 0)
