"""Constrained decoding: per-step token masks from a grammar engine, one matcher per completion.

A constraint (``--choices``, ``--regex``, ``--json-schema``, ``--grammar``, or a
line's OpenAI-style ``response_format``: ``--openai-batch``'s body, or a plain line's
``--response-format-field``) is compiled into an llguidance grammar
once per job; every completion runs its own copy of the matcher, advanced by
the tokens it samples. Before each sampling step the sampled rows' masks are
computed into a bitmask over the whole vocabulary, in a thread while the
forward pass runs (llguidance drops the GIL), and each tp rank keeps only the
bits of its own vocabulary slice: every rank of the group holds the same
matchers (they see the same tokens), so no mask and no logits cross ranks.

Why llguidance and not outlines-core (measured on SmolLM2's 49,152 tokens,
bench/constrained.py, its engines part): comparable masks (tens of microseconds per
token for a JSON schema; both far below a decode step), but a grammar compiles
in about a millisecond against outlines-core's 33-206 ms DFA index per regex or
schema (per-line schemas!), and it reads Lark grammars.

The vocabulary the engine sees is hpcllm's tokenizer, spelled token by token
in bytes (``vocabulary_bytes``); special tokens are marked as such (never text
a grammar can match), and EOS is allowed exactly where the grammar accepts.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from hpcllm.errors import HpcllmError

# JSON as models write it when asked: `{"a": 1, "b": [2, 3]}`; no free whitespace (a small model lets runs of
# newlines eat its budget)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A constraint that cannot be compiled (a one-line message)."""


@dataclass(frozen=True)
class Constraint:
    kind: str       # choice, regex, json, grammar
    grammar: str    # llguidance's grammar: Lark text or its JSON form


def choices(values) -> Constraint:
    values = list(dict.fromkeys(values))
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ConstraintError("choices must be a non-empty list of non-empty strings")
    return Constraint("choice", "start: " + " | ".join(json.dumps(v, ensure_ascii=False) for v in values))


def regex(pattern) -> Constraint:
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError("a regex must be a non-empty string")
    from llguidance import LLMatcher

    return Constraint("regex", LLMatcher.grammar_from_regex(pattern))


def json_schema(schema) -> Constraint:
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
    from llguidance import LLMatcher

    return Constraint("json", LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))


def lark(text) -> Constraint:
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError("a grammar must be non-empty Lark text")
    return Constraint("grammar", text)


def constraint_of(response_format) -> Constraint | None:
    """An OpenAI ``response_format`` value -> Constraint (None: no constraint).

    OpenAI's ``{"type": "json_schema", "json_schema": {"schema": {...}}}``, ``{"type": "json_object"}`` and
    ``{"type": "text"}``; and hpcllm's ``{"type": "regex", "regex": "..."}``, ``{"type": "choice",
    "choices": [...]}`` and ``{"type": "grammar", "grammar": "<Lark>"}``."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ConstraintError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ConstraintError('response_format json_schema needs {"json_schema": {"schema": {...}}}')
        return json_schema(spec["schema"])
    makers = {"regex": regex, "choice": choices, "grammar": lark}
    if kind not in makers:
        raise ConstraintError(f"response_format type {kind!r} is not one of text, json_object, json_schema, "
                              f"regex, choice, grammar")
    field = "choices" if kind == "choice" else kind
    return makers[kind](response_format.get(field))


def line_format(field: str, obj: dict) -> dict | None:
    """--response-format-field: a JSON line's own ``response_format`` value as its row's parameters (None
    where the field is absent or null: the job's constraint)."""
    value = obj.get(field)
    return None if value is None else {"response_format": value}


def from_options(cfg) -> Constraint | None:
    """The job-wide constraint of --choices / --choices-file / --regex / --json-schema / --grammar (at most one)."""
    names = ("choices", "choices_file", "regex", "json_schema", "grammar")
    given = [(name, getattr(cfg, name)) for name in names if getattr(cfg, name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise HpcllmError("generate: give at most one of " + ", ".join("--" + n.replace("_", "-") for n in names))
    name, value = given[0]
    flag = "--" + name.replace("_", "-")
    try:
        if name == "choices":
            return choices(value.split(","))
        if name == "choices_file":
            return choices([line for line in _read(value, flag).splitlines() if line])
        if name == "regex":
            return regex(value)
        if name == "grammar":
            return lark(_read(value, flag))
        try:
            return json_schema(json.loads(_read(value, flag)))
        except json.JSONDecodeError as e:
            raise ConstraintError(f"not JSON: {e}") from None
    except ConstraintError as e:
        raise HpcllmError(f"generate {flag} {value}: {e}") from None


def _read(path, flag) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise HpcllmError(f"generate {flag}: cannot read {path}: {e.strerror}") from None


def vocabulary_bytes(tokenizer, n_vocab: int) -> tuple[list[bytes], list[int]]:
    """(the bytes each token id stands for, the special ids) over the model's ``n_vocab`` ids (ids the
    tokenizer lacks: empty, never allowed). Each token is spelled as a continuation of a text (a decoder
    that drops a prepended space at a text's start would drop it from every token alone)."""
    special = sorted(int(i) for i in tokenizer._impl.special_ids)
    one = [tokenizer.decode_bytes([i], skip_special_tokens=False, at_start=False)
           for i in range(tokenizer.vocab_size)]
    return one + [b""] * (n_vocab - len(one)), special


class Grammars:
    """One job's grammar engine: llguidance's tokenizer over the model's vocabulary (built once: ~0.5 s for
    49k tokens, a few s for 262k) and each distinct grammar compiled once; completions run copies."""

    def __init__(self, tokenizer, eos_ids, n_vocab: int, threads: int = 1):
        import llguidance

        tokens, special = vocabulary_bytes(tokenizer, n_vocab)
        eos = sorted(eos_ids) or [tokenizer.eos_id]
        marked = set(special)
        wrapper = _Vocabulary([b"\xff" + t if i in marked else t for i, t in enumerate(tokens)], special,
                              eos[0], lambda text: tokenizer.encode(text, add_special_tokens=False))
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), eos_token=eos)
        self.executor = llguidance.LLExecutor(num_threads=max(1, threads))
        self.pool = ThreadPoolExecutor(1)        # masks are computed here while the forward pass runs
        self.n_vocab = n_vocab
        self.compiled = {}

    def matcher(self, constraint: Constraint):
        """A fresh matcher of ``constraint`` (ConstraintError if it does not compile)."""
        if constraint.grammar not in self.compiled:
            from llguidance import LLMatcher

            m = LLMatcher(self.tokenizer, constraint.grammar, log_level=0)
            if m.is_error():
                raise ConstraintError(f"{constraint.kind}: {m.get_error().splitlines()[0]}")
            self.compiled[constraint.grammar] = m
        return self.compiled[constraint.grammar].deep_copy()

    def accepts(self, constraint: Constraint, data: bytes) -> bool:
        """Whether ``data`` is a complete sentence of the grammar (a text cut by a stop string)."""
        m = self.matcher(constraint)
        return m.consume_tokens(self.tokenizer.greedy_tokenize(data.decode("utf-8", "replace"))) and m.is_accepting()


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: token bytes (special ones behind 0xFF), EOS, an encoder."""

    def __init__(self, tokens, special, eos, encode):
        self.tokens, self.special_token_ids, self.eos_token_id, self.bos_token_id = tokens, special, eos, None
        self.encode = encode

    def __call__(self, text):
        return self.encode(text)


class Guide:
    """The matchers of one engine's running completions (by sequence id), identical on every rank of the
    group, and the masks of a step's sampled rows on this rank's vocabulary slice [lo, hi)."""

    def __init__(self, grammars: Grammars, lo: int, hi: int):
        self.grammars, self.lo, self.hi = grammars, lo, hi
        self.matchers, self.constraints = {}, {}

    def start(self, seq_id: int, constraint: Constraint) -> None:
        self.matchers[seq_id] = self.grammars.matcher(constraint)
        self.constraints[seq_id] = constraint

    def drop(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)
        self.constraints.pop(seq_id, None)

    def advance(self, seq_id: int, token: int) -> None:
        m = self.matchers.get(seq_id)
        if m is not None:
            m.consume_token(token)

    def masks(self, seq_ids):
        """A future of the allowed tokens (bool [len(seq_ids), hi - lo]; None when no row is constrained),
        computed in a thread: call before the forward pass, take ``.result()`` before sampling."""
        rows = [(self.matchers[i], k) for k, i in enumerate(seq_ids) if i in self.matchers]
        if not rows:
            return None
        return self.grammars.pool.submit(self._masks, rows, len(seq_ids))

    def _masks(self, rows, n):
        from llguidance.numpy import fill_next_token_bitmask_par

        bits = np.full((n, (self.grammars.n_vocab + 31) // 32), -1, dtype=np.int32)
        fill_next_token_bitmask_par(self.grammars.executor, rows, bits)
        return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, self.lo:self.hi].astype(bool)

    def ended(self, seq_id: int) -> bool:
        """The grammar admits no more text (complete, only EOS left) or the matcher failed."""
        m = self.matchers.get(seq_id)
        return m is not None and m.is_stopped()

    def complete(self, seq_id: int, text: bytes, cut: bool) -> bool:
        """Whether a completion ending now is a sentence of its grammar (True without one). ``cut``: a stop
        string cut the text, so the text, not the tokens, is what must parse."""
        m = self.matchers.get(seq_id)
        if m is None:
            return True
        if cut:
            return self.grammars.accepts(self.constraints[seq_id], text)
        return not m.is_error() and m.is_accepting()
