"""`hpcllm generate`: a completion (or ``--n`` of them) for every prompt of a corpus.

Columns (one row per input line, input order): ``text`` (UTF-8; [N, n] with
``--n`` > 1), ``finish_reason`` (uint8: 0 eos, 1 stop, 2 length, 3
constraint_incomplete, 255 not generated; the names are the dataset's
``names`` attribute),
``n_prompt_tokens``, ``n_generated`` ([N, n] with --n), the generated ids as
flat ``output_ids`` cut by ``output_offsets`` (a row's n completions one
after the other; ``n_generated`` splits them) and with ``--logprobs``
``output_logprobs`` aligned with them.

Prompts: the text (BOS added when the model's config says so), or with
``--chat`` the model's chat template rendered from the text as one user
message (``--system`` before it) or from the line's ``messages`` field; the
template's text is tokenized without the tokenizer's own special tokens, as
``apply_chat_template`` does, so a template that writes BOS gets exactly one.
A prompt that leaves no room for one new token in the context is TOO_LONG
(``--truncate-prompt``: cut from the left to leave max_new_tokens, status
TRUNCATED); generation stops at the context in any case (length).

Constrained decoding (``--choices``, ``--regex``, ``--json-schema``,
``--grammar``; ``hpcllm.generate.constrain``): every completion is a sentence
of the grammar, or ends with finish reason constraint_incomplete where its
budget (max_new_tokens, the context, a stop string) ended it before the
grammar accepted; EOS is allowed only where the grammar accepts, and a
grammar that admits nothing more ends the completion (eos).

The executor's pseudo-batches are slices of the shard's documents: each
``compute`` runs the continuous-batching engine until that many more
documents are done (the running set carries over), so a stop signal is
honoured every ``DOCS_PER_BATCH`` documents.
"""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.executor.job import Job, ShardResult, Totals
from hpcllm.generate.chat import ChatTemplate, TemplateRefused, conversation
from hpcllm.generate.constrain import ConstraintError, constraint_of, from_options
from hpcllm.generate.scheduler import CONSTRAINT_INCOMPLETE, FINISH_NAMES
from hpcllm.model.architectures import require_family
from hpcllm.scoring import with_bos
from hpcllm.status import Status
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, STRING, Column, ragged, ragged_rows

DOCS_PER_BATCH = 32
NOT_GENERATED = 255
FINISH_REASON_NAMES = json.dumps({i: name for i, name in enumerate(FINISH_NAMES)} | {NOT_GENERATED: "none"})
SLOT_ROUND = 16


class GenerateJob(Job):
    name = "generate"

    def __init__(self, cfg, ckpt):
        super().__init__(cfg, ckpt)
        require_family(ckpt, "decoder", self.name)
        _check_options(cfg)
        c = self.model_cfg = ckpt.config
        self.context = min(cfg.max_length or c["max_positions"], c["max_positions"])
        # too-long prompts get a status here; --max-doc-tokens only bounds the tokenizer's work
        # (not with --truncate-prompt, which keeps a prompt's end)
        self.limit_documents(None)
        if cfg.truncate_prompt:
            self.max_length = None
        from hpcllm.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_str(ckpt.tokenizer_json, source=cfg.model, apply_file_settings=False)
        self.eos_ids = frozenset(c.get("eos_ids") or ([c["eos_id"]] if c.get("eos_id") is not None else []))
        self.template = self._template() if cfg.chat else None
        self.text_of = functools.partial(_chat_prompt, self.template, cfg) if cfg.chat else None
        self.text_of_needs = "--chat (the chat template of each line's text or messages)"
        if cfg.openai_batch:
            self._requests()
        if cfg.response_format_field:
            self._line_formats()
        self.min_shard_docs = cfg.max_num_seqs   # a small corpus: shards that fill the running set
        self.repeats = "seeded" if cfg.temperature > 0 or cfg.openai_batch else "same"   # executor/repeats.py
        self.cache = None
        self.constraint = from_options(cfg)
        self.grammars = None                     # constrain.Grammars, built for the first constrained prompt
        if self.constraint is not None:          # a grammar that does not compile: refused before any shard
            try:
                self._grammars().matcher(self.constraint)
            except ConstraintError as e:
                raise HpcllmError(f"generate: {e}") from None

    def config_hash(self) -> str:
        # seed is shared with train (not result=); the grammar, not the name of its file
        grammar = {"constraint": self.constraint.grammar} if self.constraint is not None else {}
        return self.cfg.result_hash(self.name, seed=self.cfg.seed, **grammar)

    def _grammars(self):
        if self.grammars is None:
            import torch

            from hpcllm.generate.constrain import Grammars

            self.grammars = Grammars(self.tokenizer, self.eos_ids, self.model_cfg["vocab"], torch.get_num_threads())
        return self.grammars

    def _requests(self):
        """--openai-batch: each line is a request (hpcllm.corpus.openai_batch); its prompt, and its options
        as the row's ``work.params``; its custom_id is the document id (--id-field)."""
        from hpcllm.corpus.openai_batch import ID_FIELD, Requests

        if self.cfg.chat:
            raise HpcllmError("generate: --openai-batch takes each line's url (chat or not); drop --chat")
        self.cfg.id_field = self.cfg.id_field or ID_FIELD     # before Inputs and the manifest read it
        self.template = self._template() if self.model_cfg.get("chat_template") else None
        render = functools.partial(_render, self.template) if self.template is not None else None
        requests = Requests(("chat", "completion"), self.cfg.n, render)
        self.text_of, self.params_of = requests.text_of, requests.params_of
        self.text_of_needs = "--openai-batch (each line's request)"

    def _line_formats(self):
        """--response-format-field: a JSONL line's own response_format constrains it (its row's
        ``work.params``); the text stays the --text-field's, or --chat's."""
        from hpcllm.generate.constrain import line_format

        if self.cfg.openai_batch:
            raise HpcllmError("generate: --response-format-field is for plain JSONL lines (--openai-batch reads "
                              "each body's response_format)")
        self.text_of = self.text_of or functools.partial(_field, self.cfg.text_field)
        self.params_of = functools.partial(line_format, self.cfg.response_format_field)
        self.text_of_needs = "--response-format-field (each JSONL line's response_format)"

    def _template(self):
        source = self.model_cfg.get("chat_template")
        if not source:
            raise HpcllmError(f"generate --chat: {self.cfg.model} has no chat template (convert it again from a "
                              f"GGUF with tokenizer.chat_template or an HF directory with one)")
        tok = self.tokenizer
        special = {name: tok.decode([i], skip_special_tokens=False) if i is not None else ""
                   for name, i in (("bos_token", self.model_cfg.get("bos_id")), ("eos_token", tok.eos_id))}
        return ChatTemplate(source, special, self.cfg.model)

    def schema(self):
        n = self.cfg.n
        tail = (n,) if n > 1 else ()
        cols = (Column("text", STRING, tail, ""), Column("finish_reason", np.uint8, tail, NOT_GENERATED,
                                                         attrs={"names": FINISH_REASON_NAMES}),
                Column("n_prompt_tokens", np.int32, (), -1), Column("n_generated", np.int32, tail, -1),
                ragged("output_ids", np.int32, "output_offsets", fill=-1))
        if self.cfg.logprobs:
            cols += (ragged("output_logprobs", np.float32, "output_offsets"),)
        if self.cfg.openai_batch:     # the request's url, and why a line could not run ("" where it ran)
            cols += (Column("url", STRING, (), ""), Column("error", STRING, (), ""))
        elif self.cfg.response_format_field:
            cols += (Column("error", STRING, (), ""),)
        return cols + (N_TOKENS,) + BASE_COLUMNS

    # ------------------------------------------------------------------ a shard

    def start(self, work):
        rows = work.process
        prompts, max_new, status, constraints = [], [], {}, []
        requests = [(work.params[r] or {}) if work.params is not None else {} for r in rows]   # --openai-batch
        for row, req in zip(rows, requests):
            ids, st = self._prompt(work.doc(row), req.get("kind") == "chat")
            constraint, error = self._constraint(req)
            if error is not None:                        # a response_format that does not compile: not run
                req["error"], ids, st = error, ids[:0], Status.MISSING_FIELD
            constraints.append(constraint)
            if st is not None:
                status[int(row)] = st
            prompts.append(ids)
            max_new.append(min(req.get("max_tokens", self.cfg.max_new_tokens), self.context - len(ids)))
        doc_ids = ([work.doc_ids[r] for r in rows] if work.doc_ids is not None else [str(r) for r in rows])
        n_run = sum(1 for p in prompts if len(p))
        return SimpleNamespace(work=work, prompts=prompts, max_new=max_new, status=status, doc_ids=doc_ids,
                               requests=requests,
                               constraints=constraints,
                               engine=None, batches=[min(n_run, (k + 1) * DOCS_PER_BATCH)
                                                     for k in range(-(-n_run // DOCS_PER_BATCH))])

    def _constraint(self, req):
        """-> (a request's response_format as a Constraint, without one the job's; None or why it does not
        compile)."""
        if "response_format" not in req:
            return self.constraint, None
        try:
            c = constraint_of(req["response_format"])
            if c is not None:
                self._grammars().matcher(c)
            return c, None
        except ConstraintError as e:
            return None, f"response_format: {e}"

    def _prompt(self, doc, chat: bool = False):
        """-> (prompt ids, new status or None); empty ids: not generated. ``chat``: a chat request's."""
        ids = doc.astype(np.int64)
        if self.cfg.chat or chat:
            impl = self.tokenizer._impl             # the executor added the tokenizer's special tokens
            ids = ids[len(impl.prefix):len(ids) - len(impl.suffix)]
        else:
            ids = with_bos(ids, self.model_cfg)
        room = self.context - self.cfg.max_new_tokens
        if self.cfg.truncate_prompt and len(ids) > max(room, 1):
            return ids[len(ids) - max(room, 1):], Status.TRUNCATED
        if len(ids) >= self.context:
            return ids[:0], Status.TOO_LONG
        return ids, None

    def compute(self, model, state, target):
        if state.engine is None:
            state.engine = self._engine(model, state)
        state.engine.run_until(target)

    def _engine(self, model, state):
        from hpcllm.generate.engine import Engine, Limits
        from hpcllm.generate.kv_cache import KVCache, cache_dtype, slot_bytes
        from hpcllm.generate.sampling import SamplingParams

        cfg = self.cfg
        need = max((len(p) + m for p, m in zip(state.prompts, state.max_new) if len(p)), default=1)
        slot_len = min(self.context, -(-need // SLOT_ROUND) * SLOT_ROUND)
        kvdt = cache_dtype(model)
        per_slot = slot_bytes(model, slot_len, kvdt)
        n_slots = min(int(cfg.kv_cache_mb * 2**20) // per_slot, max(cfg.max_num_seqs, cfg.n),
                      cfg.n * max(1, len(state.prompts)))
        if n_slots < cfg.n:
            raise HpcllmError(f"generate: --kv-cache-mb {cfg.kv_cache_mb:g} holds {n_slots} sequences of "
                              f"{slot_len} tokens ({per_slot / 2**20:.1f} MiB each); --n {cfg.n} needs {cfg.n}: "
                              f"raise --kv-cache-mb")
        if self.cache is None or not self.cache.fits(n_slots, slot_len):
            self.cache = None
            self.cache = KVCache(model, n_slots, slot_len, kvdt, model.head_weight.device)
            if model.comm.rank == 0:
                from hpcllm.progress import log

                log(f"generate: KV cache {self.cache.nbytes / 2**20:.1f} MiB per rank (its KV heads only): "
                    f"{n_slots} sequences x {slot_len} tokens = {n_slots * slot_len} tokens")
        params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.repetition_penalty,
                                cfg.seed)
        limits = Limits(frozenset() if cfg.ignore_eos else self.eos_ids, frozenset(cfg.stop_token_ids or ()),
                        tuple(s.encode() for s in cfg.stop or () if s))
        n = cfg.n
        if cfg.openai_batch:
            params, n, limits.stops = _per_request(params, limits, state.requests)
        grammars = self._grammars() if any(c is not None for c in state.constraints) else None
        return Engine(model, self.cache, state.prompts, state.max_new, state.doc_ids, params, limits, n,
                      cfg.batch_tokens, cfg.max_num_seqs, self.tokenizer, cfg.logprobs, not cfg.no_prefix_cache,
                      state.constraints, grammars)

    def result(self, state):
        n, n_docs = self.cfg.n, state.work.n_docs
        text = np.full((n_docs, n), "", dtype=object)
        reason = np.full((n_docs, n), NOT_GENERATED, np.uint8)
        n_gen = np.zeros((n_docs, n), np.int32)
        n_prompt = np.full(n_docs, -1, np.int32)
        ids = [[] for _ in range(n_docs)]
        lps = [[] for _ in range(n_docs)]
        results = state.engine.results if state.engine is not None else {}
        for j, row in enumerate(state.work.process):
            n_prompt[row] = len(state.prompts[j]) if len(state.prompts[j]) else len(state.work.doc(row))
            for c in range(n):
                got = results.get((j, c))
                if got is not None:
                    gen, lp, reason[row, c], text[row, c] = got
                    n_gen[row, c] = len(gen)
                    ids[row] += gen
                    lps[row] += lp
        out = {"text": text, "finish_reason": reason, "n_generated": n_gen}
        if n == 1:
            out = {k: v[:, 0] for k, v in out.items()}
        out["n_prompt_tokens"] = n_prompt
        out["output_ids"], out["output_offsets"] = ragged_rows([np.array(x, np.int32) for x in ids], np.int32)
        if self.cfg.logprobs:
            out["output_logprobs"] = ragged_rows([np.array(x, np.float32) for x in lps], np.float32)[0]
        if self.cfg.openai_batch or self.cfg.response_format_field:
            requests = [r or {} for r in state.work.params or [None] * n_docs]
            if self.cfg.openai_batch:
                out["url"] = np.array([r.get("url", "") for r in requests], dtype=object)
            out["error"] = np.array([r.get("error", "") for r in requests], dtype=object)
        return ShardResult(out, state.status, self._cache_stats(state.engine) if state.engine is not None else {})

    def _cache_stats(self, engine) -> dict:
        c = engine.cache
        return {"kv_cache_mb": c.nbytes / 2**20, "kv_cache_slots": c.n_slots, "kv_cache_tokens": c.n_slots * c.slot_len,
                "kv_peak_tokens": engine.sched.peak_tokens, "prefix_reused_tokens": engine.sched.reused_tokens}

    def totals(self, out_dir, plan):
        from hpcllm.store.chunks import open_shard

        peak = held = reused = prompt = incomplete = 0
        for s in plan:
            with open_shard(out_dir, s) as f:
                peak = max(peak, int(f.attrs.get("kv_peak_tokens", 0)))
                held = max(held, int(f.attrs.get("kv_cache_tokens", 0)))
                reused += int(f.attrs.get("prefix_reused_tokens", 0))
                prompt += int(f["n_prompt_tokens"][()].clip(0).sum())
                incomplete += int((f["finish_reason"][()] == CONSTRAINT_INCOMPLETE).sum())
        cut = (f"; {incomplete} completions ended before their grammar accepted (finish_reason "
               f"constraint_incomplete)" if incomplete else "")
        return Totals({"kv_peak_tokens": peak, "prefix_reused_tokens": reused},
                      f"KV cache peak use {peak} of {held} tokens; shared prefixes: {reused} of {prompt} "
                      f"prompt tokens reused, not recomputed{cut}")


def _chat_prompt(template, cfg, obj):
    """A JSON line's prompt text under --chat (None: the row gets MISSING_FIELD)."""
    msgs = conversation(obj, cfg.text_field, cfg.messages_field, cfg.system)
    if msgs is None:
        return None
    try:
        return template.render(msgs)
    except TemplateRefused:
        return None


def _field(name, obj):
    """A JSON line's --text-field (not a string: the row gets MISSING_FIELD)."""
    return obj.get(name)


def _render(template, messages):
    """A chat request's prompt text (None: the template refused it)."""
    try:
        return template.render(messages)
    except TemplateRefused:
        return None


def _per_request(params, limits, requests):
    """--openai-batch: per document SamplingParams (temperature, top_p, seed over the job's), completions
    (n, default 1) and stop strings (the request's, else the job's)."""
    import dataclasses

    keys = ("temperature", "top_p", "seed")
    return ([dataclasses.replace(params, **{k: r[k] for k in keys if k in r}) for r in requests],
            [r.get("n", 1) for r in requests],
            [tuple(s.encode() for s in r["stop"] if s) if "stop" in r else limits.stops for r in requests])


def _check_options(cfg):
    checks = [(cfg.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
              (cfg.temperature >= 0, "--temperature must be >= 0 (0: greedy)"),
              (0 < cfg.top_p <= 1, "--top-p must be in (0, 1]"), (cfg.top_k >= 0, "--top-k must be >= 0 (0: all)"),
              (0 <= cfg.min_p <= 1, "--min-p must be in [0, 1]"),
              (cfg.repetition_penalty > 0, "--repetition-penalty must be > 0"), (cfg.n >= 1, "--n must be >= 1"),
              (cfg.kv_cache_mb > 0, "--kv-cache-mb must be > 0"), (cfg.max_num_seqs >= 1, "--max-num-seqs must be >= 1"),
              (cfg.system is None or cfg.chat, "--system needs --chat")]
    for ok, message in checks:
        if not ok:
            raise HpcllmError(f"generate: {message}")
