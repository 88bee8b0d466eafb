"""Token shards: a corpus tokenized once (``hpcllm tokenize``), read by ``embed``/``score``.

Layout of a token directory (one home for it)::

    tok/manifest.json            the corpus plan (hpcllm.store.manifest), model_hash = tokenizer hash
    tok/shards/shard-00012.h5    one file per corpus shard, rows in input order
    tok/results.h5               the per-document columns of every shard (n_tokens, status, doc_id,
                                 line, source) joined as in a job's results: report/export/filter read it
    tok/tokens.json              written last, when every shard is complete: what made the
                                 shards (tokenizer hash, max_length, options) and totals

A token shard file holds, for its ``n`` documents in input order:

    tokens   int32 [total]   all token ids, flat (gzip+shuffle: portable, and the
                             shuffle filter makes small ids compress ~3x)
    offsets  int64 [n + 1]   document i is tokens[offsets[i]:offsets[i+1]]
    n_tokens int32 [n]       tokens of each document (diff of offsets; what results.h5 shows)
    status   uint8 [n]       hpcllm.status codes: reader errors, BAD_UTF8, TRUNCATED, ...
    doc_id   str   [n]       as in results (id field, else "<file>:<line>")
    line     int64 [n]       1-based line in the source file
    source   int32 [n]       index into the manifest's input list

Documents that were not tokenized (BAD_JSON, MISSING_FIELD, TOO_LONG) keep their
row with zero tokens.  Root attributes record the tokenizer hash (sha256 of the
tokenizer.json text), ``max_length`` (-1: no limit) and the source shard
(path, byte and line range), so a shard file explains itself.  Files are
written through hpcllm.store.atomic, as results are.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

from hpcllm import __version__
from hpcllm.corpus.plan import Plan, Shard
from hpcllm.corpus.readers import Docs
from hpcllm.errors import HpcllmError
from hpcllm.status import NOT_PROCESSED
from hpcllm.store.atomic import atomic_h5, write_text
from hpcllm.store.layout import MANIFEST_NAME, TOKENS_INFO_NAME, shard_file
from hpcllm.store.manifest import read_manifest
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, Column, base_columns, write_column

TOKENS_FORMAT = "hpcllm-tokens"
TOKENS_VERSION = 1
NO_LIMIT = -1       # max_length attribute of shards made without truncation
RESULT_COLUMNS = (N_TOKENS,) + BASE_COLUMNS     # the columns of tok/results.h5
TOKEN_COLUMNS = (Column("tokens", np.int32), Column("offsets", np.int64)) + RESULT_COLUMNS


def tokenizer_hash(tokenizer_json: str) -> str:
    """sha256 of the tokenizer.json text: what a token directory was made with."""
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- writing

def write_token_shard(out_dir: str, shard: Shard, docs: Docs, ids: np.ndarray, offsets: np.ndarray,
                      status: np.ndarray, attrs: dict) -> tuple[str, int]:
    """Write one token shard atomically; rows the reader could not read (NOT_PROCESSED) get no tokens.

    Returns (path, tokens written).
    """
    lengths = np.diff(offsets)
    keep = ~np.isin(status, NOT_PROCESSED)
    ids = ids[np.repeat(keep, lengths)]      # drop the empty-text encoding of unread rows
    new_offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths * keep, out=new_offsets[1:])
    columns = {**base_columns(shard, docs), "status": status, "tokens": ids, "offsets": new_offsets,
               "n_tokens": np.diff(new_offsets).astype(np.int32)}
    path = shard_file(out_dir, shard.index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_h5(path) as f:
        for col in TOKEN_COLUMNS:
            write_column(f, col, col.name, columns[col.name])
        f.attrs.update({"format": TOKENS_FORMAT + "-shard", "version": TOKENS_VERSION,
                        "shard_index": shard.index, "row_start": shard.row_start, "n_docs": shard.n_docs,
                        "source_path": shard.path, "source_format": shard.fmt, "compressed": shard.compressed,
                        "byte_start": shard.byte_start, "byte_end": shard.byte_end,
                        "line_start": shard.line_start, "code_version": __version__, **attrs})
    return path, len(ids)


def write_info(out_dir: str, info: dict) -> str:
    """Write ``tokens.json`` (the completion marker) atomically."""
    text = json.dumps({"format": TOKENS_FORMAT, "version": TOKENS_VERSION, "code_version": __version__, **info},
                      indent=1, sort_keys=True, default=str)
    return write_text(os.path.join(out_dir, TOKENS_INFO_NAME), text)


# --------------------------------------------------------------------------- reading

@dataclass
class TokenDir:
    """A finished token directory, as the input of a model job."""
    path: str
    info: dict          # tokens.json
    plan: Plan          # one job shard per token shard: path = the shard file, rows as in the corpus

    @property
    def files(self) -> list[str]:
        return self.plan.inputs

    def check(self, tokenizer_json: str, max_length: int | None, model: str) -> None:
        """Refuse shards made with another tokenizer, or longer than the job allows (None: no limit)."""
        want, have = tokenizer_hash(tokenizer_json), self.info["tokenizer_hash"]
        if want != have:
            raise HpcllmError(f"{self.path} was tokenized with tokenizer sha {have[:16]}, but {model} uses "
                              f"{want[:16]}; run `hpcllm tokenize --model {model}` to make its token shards")
        made = self.info["max_length"]
        if max_length is not None and (made is None or made > max_length):
            raise HpcllmError(f"{self.path} holds documents of up to {made or 'unlimited'} tokens, but this "
                              f"job allows {max_length}; run `hpcllm tokenize` with --max-length {max_length}")


def open_token_dir(path: str) -> TokenDir | None:
    """The token directory at ``path``, or None if ``path`` is not one (a raw corpus)."""
    if not os.path.isdir(path):
        return None
    info_path = os.path.join(path, TOKENS_INFO_NAME)
    if not os.path.exists(info_path):
        if os.path.exists(os.path.join(path, MANIFEST_NAME)):
            raise HpcllmError(f"{path} has a {MANIFEST_NAME} but no {TOKENS_INFO_NAME}: not a finished token "
                              "directory (rerun the same `hpcllm tokenize` command to finish it)")
        return None
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("format") != TOKENS_FORMAT or info.get("version") != TOKENS_VERSION:
            raise ValueError(f"format {info.get('format')} version {info.get('version')}")
    except (OSError, ValueError) as e:
        raise HpcllmError(f"{info_path} is not a readable {TOKENS_FORMAT} v{TOKENS_VERSION} file ({e})") from None
    manifest = read_manifest(os.path.join(path, MANIFEST_NAME))
    if manifest is None:
        raise HpcllmError(f"{path} has {TOKENS_INFO_NAME} but no {MANIFEST_NAME}; tokenize the corpus again")
    files = [shard_file(path, s.index) for s in manifest.shards]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise HpcllmError(f"{path}: token shard {missing[0]} is missing ({len(missing)} of {len(files)}); "
                          "tokenize the corpus again")
    shards = [Shard(index=s.index, path=f, fmt="tokens", compressed=False, byte_start=0,
                    byte_end=os.path.getsize(f), line_start=s.line_start, n_docs=s.n_docs,
                    row_start=s.row_start, file_index=i)
              for i, (s, f) in enumerate(zip(manifest.shards, files))]
    return TokenDir(path, info, Plan(shards, files))


def read_token_shard(shard: Shard) -> tuple[Docs, np.ndarray, np.ndarray, np.ndarray]:
    """(docs without texts, token ids, offsets, final status) of the token shard file ``shard.path``."""
    try:
        with h5py.File(shard.path, "r") as f:
            n = int(f.attrs["n_docs"])
            if n != shard.n_docs:
                raise HpcllmError(f"{shard.path} holds {n} documents, its plan says {shard.n_docs}; "
                                  "the token directory changed (use a new --output)")
            ids, offsets, status = f["tokens"][:], f["offsets"][:], f["status"][:]
            doc_id, line = list(f["doc_id"].asstr()[:]), f["line"][:]
            source = str(f.attrs["source_path"])
    except (OSError, KeyError) as e:
        raise HpcllmError(f"cannot read token shard {shard.path}: {e}") from None
    docs = Docs(texts=[b""] * n, status=status, doc_id=doc_id, line=line, source=source)
    return docs, ids, offsets, status.copy()
