"""`hpcllm rerank`: one relevance score per (query, document) pair.

Each input line is a pair: the query in ``--query-field`` (default ``query``),
the document in ``--text-field`` (default ``text``); a line without either
gets status missing_field.  ``--model`` is

* a cross-encoder: an encoder checkpoint with a one-label head (`hpcllm
  convert` of a BERT / RoBERTa / XLM-R ``*ForSequenceClassification`` with
  ``num_labels=1``, as sentence-transformers' ``CrossEncoder`` saves them).
  The pair is encoded with the tokenizer's pair template (``PairTokenizer``:
  token for token HF tokenizers' ``encode(query, document)``, token types
  from the template where the model has several), cut longest-first to
  ``--max-length`` (default: the model's max length) as ``CrossEncoder``
  does (``truncation=True``); ``logit`` is the head's output on the first
  token and ``score`` what ``CrossEncoder.predict`` returns by default: the
  activation the model saved, sigmoid for one label when it saved none.
* a decoder reranker (Qwen3-Reranker style): the pair fills
  ``--rerank-template`` ({query}, {document}; default ``DEFAULT_TEMPLATE``,
  Qwen3-Reranker's prompt), tokenized as one text (BOS where the model has
  one); ``score`` = ``logit`` = logit(yes) - logit(no) at the last position
  (the log-odds of ``--yes-token`` against ``--no-token``; sigmoid(score) is
  Qwen3-Reranker's P(yes)).  A prompt longer than ``--max-length`` keeps its
  first tokens and ends with the template's tail (the tokens after
  {document}), as Qwen3-Reranker cuts the document (status truncated).

Columns: ``score`` and ``logit`` (float32, NaN for rows not processed),
``n_tokens`` and the base columns.  Raw JSONL / text input only: token shards
hold no pairs.
"""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace

import numpy as np
import torch

from hpcllm.corpus.batching import make_batches, pack_batch
from hpcllm.errors import HpcllmError
from hpcllm.executor.job import Job, ShardResult
from hpcllm.model.architectures import architecture
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, Column
from hpcllm.tokenizer import FLAG_BAD_UTF8, FLAG_TRUNCATED, Encoding, Tokenizer, pack_texts

DEFAULT_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {document}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
_PLACEHOLDER = re.compile(r"\{(query|document)\}")
_ACTIVATIONS = {"sigmoid": torch.sigmoid, "identity": lambda x: x}


def pair_text(query_field: str, text_field: str, obj: dict):
    """A JSON line's pair as one text the reader carries: ``<query bytes>:<query><document>``
    (None: a field is missing, the row gets MISSING_FIELD).  The query's unencodable characters
    (lone surrogates of a dirty line) become "?" so that its byte count holds."""
    query, doc = obj.get(query_field), obj.get(text_field)
    if not (isinstance(query, str) and isinstance(doc, str)):
        return None
    query = query.encode("utf-8", "replace").decode("utf-8")
    return f"{len(query.encode('utf-8'))}:{query}{doc}"


def prompt_text(template: str, query_field: str, text_field: str, obj: dict):
    """A JSON line's decoder prompt: the template with {query} and {document} filled in one pass."""
    values = {"query": obj.get(query_field), "document": obj.get(text_field)}
    if not all(isinstance(v, str) for v in values.values()):
        return None
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


class PairTokenizer:
    """Encodes ``pair_text`` documents as the pair template does (what the executor calls for rerank).

    Query and document are encoded alone without special tokens, cut as HF
    tokenizers' ``LongestFirst`` does to ``max_length`` minus the template's
    special tokens, and joined: prefix + query + middle + document + suffix."""

    def __init__(self, tokenizer: Tokenizer, template):
        self.tokenizer, self.template = tokenizer, template

    def encode_bytes(self, buf, offsets, max_length=None, add_special_tokens=True):
        raw = np.asarray(buf, np.uint8).tobytes()
        queries, docs = [], []
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            head, _, rest = raw[a:b].partition(b":")
            n = int(head) if head.isdigit() else 0   # a row the reader did not fill (b"")
            queries.append(rest[:n])
            docs.append(rest[n:])
        q, d = (self.tokenizer.encode_bytes(*pack_texts(x), add_special_tokens=False) for x in (queries, docs))
        t = self.template
        budget = None if max_length is None else max_length - t.n_special
        parts, flags = [], np.zeros(len(queries), np.uint8)
        for i in range(len(queries)):
            qi, di = q[i], d[i]
            if budget is not None and len(qi) + len(di) > budget:
                n_q, n_d = longest_first(len(qi), len(di), budget)
                qi, di = qi[:n_q], di[:n_d]
                flags[i] |= FLAG_TRUNCATED
            flags[i] |= (q.flags[i] | d.flags[i]) & FLAG_BAD_UTF8
            parts.append(np.concatenate([t.prefix, qi, t.middle, di, t.suffix]).astype(np.int32))
        lengths = np.array([len(p) for p in parts], np.int64)
        offsets = np.zeros(len(parts) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Encoding(np.concatenate(parts) if parts else np.zeros(0, np.int32), offsets, flags)

    def type_ids(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Token types of packed pairs: the template's, the query ending where ``middle`` first follows
        the prefix (a query holding the middle's special token as text is typed as if it ended there)."""
        t = self.template
        (tp, ta, tm, tb, ts), out, start = t.types, [], 0
        for n in lengths.tolist():
            x = ids[start:start + n]
            n_q = _first_run(x, t.middle, len(t.prefix)) - len(t.prefix)
            n_d = n - t.n_special - n_q
            out.append(np.concatenate([tp, np.full(n_q, ta), tm, np.full(n_d, tb), ts]))
            start += n
        return np.concatenate(out).astype(np.int64)


def longest_first(n_a: int, n_b: int, budget: int) -> tuple[int, int]:
    """Tokens each sequence keeps under HF tokenizers' LongestFirst truncation to ``budget`` tokens:
    the shorter keeps what it has while the longer gets at least as much; else half each, the odd
    token to the longer (the first when they are equal)."""
    swap = n_a > n_b
    short, long_ = (n_b, n_a) if swap else (n_a, n_b)
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short = budget // 2
        long_ = short + budget % 2
    return (long_, short) if swap else (short, long_)


def _first_run(x: np.ndarray, run: tuple, start: int) -> int:
    """Index of the first occurrence of ``run`` in x at or after ``start`` (len(x) when none)."""
    for k in np.flatnonzero(x[start:] == run[0]) + start:
        if tuple(x[k:k + len(run)].tolist()) == tuple(run):
            return int(k)
    return len(x)


class RerankJob(Job):
    name = "rerank"
    repeats = "same"        # a repeated pair is scored once (hpcllm/executor/repeats.py)
    text_of_needs = "rerank (the query and document fields of each line)"

    def __init__(self, cfg, ckpt):
        super().__init__(cfg, ckpt)
        self.family = architecture(ckpt.architecture).family
        c = ckpt.config
        self.context = min(cfg.max_length or c.get("max_length") or c["max_positions"], c["max_positions"])
        self.tokenizer = Tokenizer.from_str(ckpt.tokenizer_json, source=cfg.model, apply_file_settings=False)
        if self.family == "encoder":
            self._cross_encoder(ckpt)
        else:
            self._prompt_reranker(ckpt)
        self.limit_documents(self.context)

    def _cross_encoder(self, ckpt):
        import json

        from hpcllm.jobs.classify import open_classifier
        from hpcllm.tokenizer.template import pair_template

        head = ckpt.config.get("classifier")
        if head is None or len(head["class_names"]) != 1:
            raise HpcllmError(f"rerank: {self.cfg.model} is an encoder without a one-label head; rerank runs "
                              "cross-encoders (a *ForSequenceClassification with num_labels=1) and decoders")
        self.head = open_classifier(self.cfg.model).head.float()
        self.activation = _ACTIVATIONS[head["activation"]]
        spec = json.loads(ckpt.tokenizer_json)
        vocab = spec["model"]["vocab"]
        vocab = vocab if isinstance(vocab, dict) else {p: i for i, (p, _) in enumerate(vocab)}
        self.pairs = PairTokenizer(self.tokenizer, pair_template(spec, vocab, spec["model"]["type"]))
        t = self.pairs.template
        if self.context <= t.n_special:
            raise HpcllmError(f"rerank: --max-length {self.context} leaves no room beside the pair template's "
                              f"{t.n_special} special tokens")
        self.typed = ckpt.config["type_vocab"] > 1 and len(set(t.types[0] + t.types[2] + t.types[4])
                                                           | {t.types[1], t.types[3]}) > 1
        if self.typed and not t.middle:
            raise HpcllmError("rerank: the tokenizer's pair template types the two sequences apart with no "
                              "special token between them; their boundary is lost in the pair's ids")
        self.tokenizer = self.pairs      # what the executor encodes each line with
        self.text_of = functools.partial(pair_text, self.cfg.query_field, self.cfg.text_field)

    def _prompt_reranker(self, ckpt):
        template = self.cfg.rerank_template or DEFAULT_TEMPLATE
        if "{document}" not in template or "{query}" not in template:
            raise HpcllmError("rerank: --rerank-template must hold {query} and {document}")
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in (self.cfg.yes_token, self.cfg.no_token)]
        if any(len(x) != 1 for x in ids):
            raise HpcllmError(f"rerank: --yes-token {self.cfg.yes_token!r} and --no-token {self.cfg.no_token!r} must "
                              f"be one token each (they are {ids})")
        self.yes_no = torch.tensor([ids[0][0], ids[1][0]], dtype=torch.int64)
        tail = template[template.rindex("{document}") + len("{document}"):]
        if "{query}" in tail:
            raise HpcllmError("rerank: --rerank-template must hold {query} before {document} (a prompt cut at "
                              "--max-length ends with the template's text after {document})")
        self.tail = np.array(self.tokenizer.encode(tail, add_special_tokens=False), np.int64)
        bos = 1 if ckpt.config.get("add_bos") and ckpt.config.get("bos_id") is not None else 0
        self.context -= bos                 # with_bos may add one
        if self.context <= len(self.tail):
            raise HpcllmError(f"rerank: --max-length {self.context} leaves no room beside the template's tail")
        self.text_of = functools.partial(prompt_text, template, self.cfg.query_field, self.cfg.text_field)

    def describe(self) -> str:
        kind = "cross-encoder" if self.family == "encoder" else "decoder reranker"
        return f"{kind} {super().describe()}, pairs of {self.context} tokens at most"

    def config_hash(self) -> str:
        return self.cfg.result_hash(self.name, context=self.context)

    def schema(self):
        return (Column("score", np.float32, (), np.nan), Column("logit", np.float32, (), np.nan),
                N_TOKENS) + BASE_COLUMNS

    def start(self, work):
        lengths = np.diff(work.offsets)[work.process]
        out = {k: np.full(work.n_docs, np.nan, np.float32) for k in ("score", "logit")}
        return SimpleNamespace(work=work, out=out, batches=make_batches(
            lengths, self.cfg.batch_tokens, self.cfg.window, padded=self.family == "decoder"))

    def compute(self, model, state, batch):
        rows = state.work.process[batch]
        if self.family == "encoder":
            logit = self._cross_encoder_logits(model, state.work, rows)
            score = self.activation(logit)
        else:
            logit = score = self._log_odds(model, [self._prompt(state.work.doc(r)) for r in rows])
        state.out["logit"][rows] = logit.numpy()
        state.out["score"][rows] = score.numpy()

    @torch.no_grad()
    def _cross_encoder_logits(self, model, work, rows) -> torch.Tensor:
        flat, lengths = pack_batch(work.ids, work.offsets, rows)
        device = next(model.parameters()).device
        types = torch.from_numpy(self.pairs.type_ids(flat, lengths)).to(device) if self.typed else None
        vec = model(torch.from_numpy(flat).to(device), torch.from_numpy(lengths).to(device), types)
        return self.head(vec.float().cpu())[:, 0]

    def _prompt(self, ids: np.ndarray) -> np.ndarray:
        """A decoder prompt as the model reads it: BOS where it has one, and a prompt cut at the
        context ends with the template's tail again."""
        from hpcllm.scoring import with_bos

        ids = ids.astype(np.int64)
        n = len(self.tail)
        if len(ids) >= self.context and n and not np.array_equal(ids[-n:], self.tail):
            ids = np.concatenate([ids[:self.context - n], self.tail])
        return with_bos(ids, self.ckpt.config)

    def _log_odds(self, model, prompts) -> torch.Tensor:
        """logit(yes) - logit(no) after each prompt: log p(yes) - log p(no) over the whole (split) vocabulary."""
        from hpcllm.scoring import vocab_parallel_logprobs

        longest = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), longest), dtype=torch.int64)   # right padding, never attended to
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.from_numpy(p)
        device = model.head_weight.device
        hidden = model(ids.to(device))
        last = hidden[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]
        targets = self.yes_no.repeat(len(prompts)).to(device)
        lp = vocab_parallel_logprobs(last.repeat_interleave(2, dim=0), targets, model.head, model.vocab_start,
                                     model.comm, soften=model.soften).view(-1, 2)
        return (lp[:, 0] - lp[:, 1]).float().cpu()

    def batch_progress(self, state, batch):
        return int(np.diff(state.work.offsets)[state.work.process[batch]].sum())

    def result(self, state):
        return ShardResult(state.out)
