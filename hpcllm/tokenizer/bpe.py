"""Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM2 style), HF-exact.

Loads an HF tokenizer.json dict (or, through hpcllm.tokenizer.gguf_meta, a GGUF
file's tokenizer metadata) and encodes batches through the Numba kernels in
hpcllm.kernels.bpe. Only the configurations whose semantics the kernels
reproduce exactly are accepted; anything else raises HpcllmError naming the field.
"""

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.kernels import bpe as K
from hpcllm.kernels.bpe_tables import bytes_table, int_table
from hpcllm.kernels.regex_pretok import GPT2, PATTERN_OF, PATTERNS, exact_fold, load_tables
from hpcllm.tokenizer import template
from hpcllm.tokenizer.byte_level import BYTE_CHARS, CHAR_BYTES, token_bytes
from hpcllm.tokenizer.encoding import decodable_ids, encode_merges


def _err(field, msg):
    raise HpcllmError("tokenizer.json %s: %s (byte-level BPE)" % (field, msg))


def _parse_pretokenizer(pt):
    """(mode, digits) for the supported pre-tokenizer shapes."""
    steps = pt.get("pretokenizers", []) if pt and pt.get("type") == "Sequence" else [pt]
    digits = bool(steps) and steps[0] is not None and steps[0].get("type") == "Digits"
    if digits:
        if not steps[0].get("individual_digits"):
            _err("pre_tokenizer.Digits.individual_digits", "only true is supported")
        steps = steps[1:]
    if not steps or steps[-1] is None or steps[-1].get("type") != "ByteLevel":
        _err("pre_tokenizer", "must end with ByteLevel")
    if steps[-1].get("add_prefix_space"):
        _err("pre_tokenizer.ByteLevel.add_prefix_space", "only false is supported")
    if len(steps) == 1 and steps[0].get("use_regex", True):
        return GPT2, digits
    if len(steps) == 2 and not steps[1].get("use_regex", True) and steps[0].get("type") == "Split":
        sp = steps[0]
        pattern = (sp.get("pattern") or {}).get("Regex")
        if pattern not in PATTERNS:
            _err("pre_tokenizer.Split.pattern", "unsupported regex %r" % (pattern,))
        if sp.get("behavior") != "Isolated" or sp.get("invert"):
            _err("pre_tokenizer.Split", "only behavior Isolated without invert is supported")
        return PATTERNS[pattern], digits
    _err("pre_tokenizer", "unsupported sequence %s" % [s and s.get("type") for s in steps])


def parse_bpe_model(m, refused, err):
    """(vocab, merges) of a tokenizer.json BPE model whose ``refused`` fields are unset
    (null / "" / false / 0 change nothing); ``err(field, message)`` raises."""
    if m.get("type") != "BPE":
        err("model.type", "must be BPE, got %r" % m.get("type"))
    for field in refused:
        if m.get(field):
            err("model." + field, "unsupported value %r" % m.get(field))
    merges = m.get("merges", [])   # pairs (lists in the current format) or "a b" strings (older files)
    if not all(isinstance(x, list) for x in merges):
        merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in merges]
    return dict(m["vocab"]), merges


def _parse_model(m):
    vocab, merges = parse_bpe_model(m, ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                        "byte_fallback"), _err)
    if m.get("fuse_unk") and m.get("unk_token") is not None:
        _err("model.fuse_unk", "unsupported with an unk_token")
    return vocab, merges, m.get("unk_token"), bool(m.get("ignore_merges", False))


def merge_table(vocab, merges):
    """The kernels' merge table: (left id << 32 | right id) -> (rank << 32 | merged id)."""
    try:   # list comprehensions: a 262k-token vocabulary has ~500k merges
        left = np.array([vocab[a] for a, _ in merges], dtype=np.int64)
        right = np.array([vocab[b] for _, b in merges], dtype=np.int64)
        new = np.array([vocab[a + b] for a, b in merges], dtype=np.int64)
    except KeyError:
        rank, (a, b) = next((r, (a, b)) for r, (a, b) in enumerate(merges)
                            if a not in vocab or b not in vocab or a + b not in vocab)
        raise HpcllmError("tokenizer merges[%d] %r: a token is not in the vocab" % (rank, a + " " + b)) from None
    return int_table((left << 32) | right, (np.arange(len(merges), dtype=np.int64) << 32) | new)


def token_names(vocab, added) -> list:
    """Each id's token string: the model vocab's, then the added tokens' (ids missing: "")."""
    ids = [t["id"] for t in added] + list(vocab.values())
    names = [""] * (max(ids) + 1 if ids else 0)
    for tok, i in vocab.items():
        names[i] = tok
    for t in added:
        names[t["id"]] = t["content"]
    return names


def _trie(added):
    """Added-token trie arrays: root 0 for non-normalized tokens, root 1 for normalized ones."""
    children = {}
    term = [-1, -1]
    first = np.zeros(0x110000, dtype=np.uint8)
    for tok in added:
        if tok.get("single_word") or tok.get("lstrip") or tok.get("rstrip"):
            _err("added_tokens[%r]" % tok["content"], "single_word/lstrip/rstrip unsupported")
        if not tok["content"]:
            continue
        root = 1 if tok.get("normalized") else 0
        first[ord(tok["content"][0])] |= 1 << root
        node = root
        for ch in tok["content"]:
            key = node * 0x110000 + ord(ch)
            if key not in children:
                children[key] = len(term)
                term.append(-1)
            node = children[key]
        term[node] = tok["id"]
    ttab = int_table(list(children), list(children.values()))
    return ttab, np.array(term, dtype=np.int32), first


class ByteLevelBPE:
    """An HF-exact byte-level BPE tokenizer over numpy batches."""

    kind = "bpe"
    cls_id = None
    sep_id = None

    def __init__(self, vocab, merges, added, mode, digits=False, ignore_merges=False, unk_token=None,
                 prefix=(), suffix=(), bos_id=None, eos_id=None, pad_id=None, unk_id=None):
        self.vocab, self.merges, self.added = vocab, merges, added
        self.mode, self.digits, self.ignore_merges, self.unk_token = mode, digits, ignore_merges, unk_token
        self.prefix = np.asarray(prefix, dtype=np.int32)
        self.suffix = np.asarray(suffix, dtype=np.int32)
        self.add_bos, self.add_eos = bool(len(prefix)), bool(len(suffix))
        # the model's unk (BPE fallback) vs the id a GGUF names as unknown (metadata only)
        self._model_unk = vocab.get(unk_token) if unk_token is not None else None
        self.unk_id = unk_id if unk_id is not None else self._model_unk
        self.bos_id = bos_id if bos_id is not None else (int(prefix[0]) if len(prefix) else None)
        self.eos_id = eos_id if eos_id is not None else (int(suffix[-1]) if len(suffix) else None)
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self._names = token_names(vocab, added)
        self.vocab_size = len(self._names)
        self.special_ids = np.array(sorted(t["id"] for t in added if t.get("special")), dtype=np.int64)
        self._build()

    def _build(self):
        names = self._names
        spelled = [token_bytes(t) for t in names]
        self._spelled = spelled
        # ignore_merges looks pieces up in the model vocab, whose keys are byte-alphabet
        # strings: every other id gets an empty spelling, which no piece can match.
        model = [b if names[i] in self.vocab and set(names[i]) <= CHAR_BYTES.keys() else b""
                 for i, b in enumerate(spelled)]
        tok_off = np.zeros(len(model) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in model], out=tok_off[1:])
        tok_bytes = np.frombuffer(b"".join(model) + b"\0", dtype=np.uint8).copy()
        byte_ids = np.array([self.vocab.get(BYTE_CHARS[b], -1) for b in range(256)], dtype=np.int32)
        mtab = merge_table(self.vocab, self.merges)
        classes, fold, self.tables_version = load_tables()
        vslots = bytes_table(tok_bytes, tok_off)
        ttab, term, first = _trie(self.added)
        roots = (1 if np.any(first & 1) else 0) | (2 if np.any(first & 2) else 0)
        self._tables = K.BpeTables(classes, exact_fold() if self.mode == GPT2 else fold, byte_ids, mtab,
                                   vslots, tok_bytes, tok_off, ttab, term, first)
        unk = -1 if self._model_unk is None else self._model_unk
        self._params = K.BpeParams(*(np.int64(x) for x in (self.mode, self.digits, self.ignore_merges, unk, roots)))

    # ---- loading -------------------------------------------------------------------------
    def special_token_ids(self):
        """bos/eos/pad/unk ids: tokenizer.json has no place for them (HF keeps them in
        tokenizer_config.json), so store this next to it and pass it back to from_json_dict."""
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}

    @classmethod
    def from_json_dict(cls, d, special_ids=None):
        """A parsed HF tokenizer.json; special_ids: a special_token_ids() dict to restore."""
        if d.get("normalizer") is not None:
            _err("normalizer", "must be null, got %r" % d["normalizer"].get("type"))
        if (d.get("decoder") or {}).get("type", "ByteLevel") != "ByteLevel":
            _err("decoder.type", "must be ByteLevel")
        mode, digits = _parse_pretokenizer(d.get("pre_tokenizer"))
        vocab, merges, unk, ignore_merges = _parse_model(d.get("model") or {})
        added = [dict(t) for t in d.get("added_tokens", [])]
        prefix, suffix = template.template_ids(d, vocab, "byte-level BPE")
        eot = next((t["id"] for t in added if t["content"] == "<|endoftext|>"), None)
        ids = {"eos_id": eot if not suffix else None}
        ids.update(special_ids or {})
        return cls(vocab, merges, added, mode, digits, ignore_merges, unk, prefix, suffix, **ids)

    @classmethod
    def from_gguf(cls, source, split_digits=False):
        """GGUF tokenizer metadata (a path or a gguf.GGUFReader), read as transformers reads it.

        transformers maps tokenizer.ggml.pre "smollm" (and any pre it has no regex for) to
        the plain GPT-2 ByteLevel split. split_digits=True puts HF's Digits(individual)
        step in front, as in SmolLM2's own tokenizer.json and llama.cpp's "smollm".
        """
        from hpcllm.tokenizer.gguf_meta import bpe_arguments
        return cls(**bpe_arguments(source, split_digits))

    def to_json_dict(self):
        """An HF tokenizer.json dict that `from_json_dict` and HF `tokenizers` both load."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": self.mode == GPT2}
        steps = [{"type": "Digits", "individual_digits": True}] if self.digits else []
        if self.mode != GPT2:
            steps.append({"type": "Split", "pattern": {"Regex": PATTERN_OF[self.mode]}, "behavior": "Isolated",
                          "invert": False})
        steps.append(byte_level)
        pre = steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}
        names = {i: t for t, i in self.vocab.items()}
        names.update({t["id"]: t["content"] for t in self.added})
        post = template.template_json(self.prefix.tolist(), self.suffix.tolist(), names)
        added = [{"id": t["id"], "content": t["content"], "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": bool(t.get("normalized")), "special": bool(t.get("special"))}
                 for t in self.added]
        model = {"type": "BPE", "dropout": None, "unk_token": self.unk_token, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": self.ignore_merges, "vocab": dict(self.vocab),
                 "merges": [list(m) for m in self.merges]}
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": None, "pre_tokenizer": pre, "post_processor": post,
                "decoder": dict(byte_level, use_regex=True), "model": model}

    # ---- encoding ------------------------------------------------------------------------
    def encode_bytes(self, buf, offsets, max_length=None, add_special_tokens=True):
        """Encode documents buf[offsets[d]:offsets[d+1]] (UTF-8) into an Encoding (``encode_merges``)."""
        return encode_merges(K.encode_batch, self._tables, self._params, self.prefix, self.suffix, buf, offsets,
                             max_length, add_special_tokens)

    def decode_bytes(self, ids, skip_special_tokens=True, at_start=True):
        """The raw bytes of ids (HF's ByteLevel decoder before its lossy UTF-8 step): a
        generator can join them across steps and decode only complete characters (the same
        at a text's start as within it)."""
        ids = decodable_ids(ids, self.vocab_size, self.special_ids, skip_special_tokens)
        return b"".join(self._spelled[i] for i in ids)

    def decode(self, ids, skip_special_tokens=True):
        """Text of ids (HF ByteLevel decoder; invalid UTF-8 becomes U+FFFD; unknown ids skipped)."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")
