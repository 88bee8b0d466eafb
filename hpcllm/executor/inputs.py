"""A job's input: a raw corpus (read + tokenized per shard) or a directory of token shards.

Both give the same thing per shard, a ``ShardData`` (documents, token ids,
offsets, final status), so everything after this point is the same whichever
the input was.
"""

from __future__ import annotations

import numpy as np

from hpcllm.corpus.plan import make_plan
from hpcllm.corpus.readers import DocReader, list_inputs
from hpcllm.executor.job import ShardData
from hpcllm.status import NOT_PROCESSED, Status
from hpcllm.store.tokens import open_token_dir, read_token_shard


def final_status(reader_status: np.ndarray, flags: np.ndarray, skip_long: bool = False) -> np.ndarray:
    """One status per document: reader errors, then bad UTF-8, then truncation, else ok/empty.

    ``skip_long`` (--long-docs skip): a document cut to max_length is TOO_LONG instead
    (before bad UTF-8: it is not processed at all).
    """
    from hpcllm.tokenizer import FLAG_BAD_UTF8, FLAG_TRUNCATED

    status = reader_status.copy()
    open_ = ~np.isin(status, NOT_PROCESSED)
    cut = open_ & ((flags & FLAG_TRUNCATED) != 0)
    if skip_long:
        status[cut] = Status.TOO_LONG
        open_ &= ~cut
    status[open_ & ((flags & FLAG_BAD_UTF8) != 0)] = Status.BAD_UTF8
    status[open_ & (status != Status.BAD_UTF8) & cut] = Status.TRUNCATED
    return status


def encode_docs(tokenizer, docs, max_length, skip_long: bool = False):
    """Tokenize a shard's documents (special tokens added) -> (ids, offsets, final status).

    With ``max_length`` the tokenizer stops encoding a document there, so a
    multi-megabyte line costs about what its first ``max_length`` tokens do.
    """
    lens = np.fromiter((len(t) for t in docs.texts), np.int64, len(docs.texts))
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    buf = np.frombuffer(b"".join(docs.texts), np.uint8)
    enc = tokenizer.encode_bytes(buf, offsets, max_length=max_length, add_special_tokens=True)
    return enc.ids, enc.offsets, final_status(docs.status, enc.flags, skip_long)


def cut_long(ids, offsets, status, max_length, skip_long: bool = False):
    """Token shards read back: documents longer than ``max_length`` keep their first ``max_length``
    ids (TRUNCATED), or with ``skip_long`` none (TOO_LONG).  Returns (ids, offsets, status)."""
    lens = np.diff(offsets)
    long = (lens > max_length) & ~np.isin(status, NOT_PROCESSED)
    if not long.any():
        return ids, offsets, status
    keep = np.where(long, 0 if skip_long else max_length, lens)
    new_offsets = np.zeros_like(offsets)
    np.cumsum(keep, out=new_offsets[1:])
    src = np.arange(int(new_offsets[-1])) + np.repeat(offsets[:-1] - new_offsets[:-1], keep)
    status = status.copy()
    status[long] = Status.TOO_LONG if skip_long else Status.TRUNCATED
    return ids[src], new_offsets, status


def plan_corpus(inputs, cfg, world, dp_size: int, shards_per_group: int = 4, min_docs: int = 1):
    """The shard plan, cut finer when the corpus is small so that every dp group gets work.

    ``--shard-docs`` is the most documents a shard holds; a corpus with fewer
    than ``shards_per_group`` shards per dp group is re-cut into that many, but
    not below ``min_docs`` documents a shard unless every dp group still needs
    one (a job whose batches are a shard's documents: generate fills its
    running set from one shard). The plan is stored in the manifest, so a
    resumed run keeps it.
    """
    plan = make_plan(inputs, cfg.shard_docs, comm=world, fmt=cfg.format)
    total, want = sum(s.n_docs for s in plan), shards_per_group * dp_size
    if len(plan) < want and total > len(plan):
        size = max(-(-total // want), min(min_docs, -(-total // dp_size)))
        plan = make_plan(inputs, max(1, min(cfg.shard_docs, size)), comm=world, fmt=cfg.format)
    return plan


class Inputs:
    """The input of a run: its files, how to plan it, and how a shard becomes a ShardData."""

    def __init__(self, cfg, shards_per_group: int = 4, extract=None, min_shard_docs: int = 1, params_of=None):
        self.cfg, self.extract = cfg, extract   # extract: the job's text of a JSON line (Job.text_of)
        self.params_of = params_of              # Job.params_of
        self.min_shard_docs = min_shard_docs
        if cfg.follow:     # the files come later (hpcllm.executor.follow)
            self.tokens, self.files = None, []
        else:
            self.tokens = open_token_dir(cfg.input)   # pre-tokenized: one job shard per token shard
            self.files = self.tokens.files if self.tokens else list_inputs(cfg.input, cfg.format)
        self.shards_per_group = shards_per_group
        self._reader = None

    def check_tokens(self, tokenizer_json: str, max_length, model: str) -> None:
        """Refuse token shards made with another tokenizer or longer than the job allows."""
        if self.tokens:
            self.tokens.check(tokenizer_json, max_length, model)

    def plan(self, world, dp_size: int):
        if self.tokens:
            return self.tokens.plan
        return plan_corpus(self.files, self.cfg, world, dp_size, self.shards_per_group, self.min_shard_docs)

    def load(self, shard, tokenizer, max_length, timers, skip_long: bool = False) -> ShardData:
        """Read (and tokenize) one shard, documents cut to ``max_length`` (or skipped beyond it,
        ``skip_long``). Called from one thread at a time (the prefetch thread)."""
        if self.tokens:
            with timers.phase("read"):
                docs, ids, offsets, status = read_token_shard(shard)
                if max_length is not None:
                    ids, offsets, status = cut_long(ids, offsets, status, max_length, skip_long)
                return ShardData(shard, docs, ids, offsets, status)
        if self._reader is None:   # one reader per group: a gz file's shards continue its stream
            # columnar input reads only these: --messages-field (generate --chat), --query-field (rerank)
            fields = (self.cfg.messages_field, self.cfg.query_field) if self.extract is not None else ()
            self._reader = DocReader(self.cfg.text_field, self.cfg.id_field, self.cfg.max_doc_bytes, self.extract,
                                     fields, self.params_of)
        with timers.phase("read"):
            docs = self._reader.read(shard)
        with timers.phase("tokenize"):
            ids, offsets, status = encode_docs(tokenizer, docs, max_length, skip_long)
        return ShardData(shard, docs, ids, offsets, status)

    def close(self):
        if self._reader is not None:
            self._reader.close()
