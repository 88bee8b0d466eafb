"""Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, SmolLM2 style), HF-exact.

Loads an HF tokenizer.json dict or a GGUF file's tokenizer metadata and
encodes batches through the Numba kernels in hpcllm.kernels.bpe. Only the
configurations whose semantics the kernels reproduce exactly are accepted;
anything else raises HpcllmError naming the field.
"""

import mmap
import struct

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.kernels import bpe as K
from hpcllm.kernels.bpe_tables import bytes_table, int_table
from hpcllm.kernels.regex_pretok import GPT2, LLAMA3, PATTERN_OF, PATTERNS, QWEN2, exact_fold, \
    load_tables

# GGUF tokenizer.ggml.pre values that transformers (the reference loader) maps to the
# Llama-3 split; any other pre-tokenizer transformers knows uses a regex we do not have.
GGUF_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                   "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"}
GGUF_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"}
GGUF_OTHER_REGEX_PRE = {"tekken", "qwen35", "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_CHARS = bytes_to_unicode()
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


def token_bytes(token):
    """The bytes a token decodes to (HF ByteLevel decoder: raw UTF-8 if a char is off the map)."""
    try:
        return bytes(CHAR_BYTES[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


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


def _parse_post(pp, token_id):
    """(prefix ids, suffix ids) the post-processor puts around a single sequence."""
    steps = pp.get("processors", []) if pp and pp.get("type") == "Sequence" else [pp]
    prefix, suffix = [], []
    for st in steps:
        if st is None or st.get("type") == "ByteLevel":
            continue
        if st.get("type") != "TemplateProcessing":
            _err("post_processor.type", "unsupported %r" % st.get("type"))
        seen_a = False
        for item in st["single"]:
            if "Sequence" in item:
                seen_a = True
                continue
            name = item["SpecialToken"]["id"]
            ids = st.get("special_tokens", {}).get(name, {}).get("ids") or [token_id(name)]
            (suffix if seen_a else prefix).extend(ids)
    return prefix, suffix


def _parse_model(m):
    if m.get("type") != "BPE":
        _err("model.type", "must be BPE, got %r" % m.get("type"))
    for field in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if m.get(field):  # null / "" / false / 0 change nothing
            _err("model." + field, "unsupported value %r" % m.get(field))
    if m.get("fuse_unk") and m.get("unk_token") is not None:
        _err("model.fuse_unk", "unsupported with an unk_token")
    merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m.get("merges", [])]
    return dict(m["vocab"]), merges, m.get("unk_token"), bool(m.get("ignore_merges", False))


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


# GGUF metadata value types -> struct format of one scalar (8 = string, 9 = array)
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_value(mm, pos, vtype):
    """(value, next position) of one GGUF metadata value at mm[pos:]."""
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", mm, pos)
        return bytes(mm[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", mm, pos)
        pos += 12
        if etype in _GGUF_SCALAR:  # numbers: one frombuffer, not count unpacks
            dt = np.dtype("<" + _GGUF_SCALAR[etype])
            return np.frombuffer(mm, dt, count, pos).tolist(), pos + count * dt.itemsize
        out = []
        for _ in range(count):
            v, pos = _gguf_value(mm, pos, etype)
            out.append(v)
        return out, pos
    fmt = "<" + _GGUF_SCALAR[vtype]
    return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)


def _read_gguf_meta(path):
    """tokenizer.ggml.* metadata of a GGUF file (v2/v3, little-endian), names without the prefix.

    Reads only the key/value header; much faster than gguf.GGUFReader, which maps
    every tensor and every vocabulary string as a numpy view.
    """
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            magic, version, _, n_kv = struct.unpack_from("<4sIQQ", mm, 0)
            if magic != b"GGUF" or version not in (2, 3):
                raise HpcllmError("%s: not a little-endian GGUF v2/v3 file" % path)
            meta, pos = {}, 24
            for _ in range(n_kv):
                key, pos = _gguf_value(mm, pos, 8)
                (vtype,) = struct.unpack_from("<I", mm, pos)
                value, pos = _gguf_value(mm, pos + 4, vtype)
                if key.startswith("tokenizer.ggml."):
                    meta[key[len("tokenizer.ggml."):]] = value
    except (OSError, ValueError, struct.error, KeyError) as e:
        raise HpcllmError("%s: cannot read GGUF metadata: %s" % (path, e))
    if "tokens" not in meta:
        raise HpcllmError("%s: no tokenizer.ggml.tokens in this GGUF file" % path)
    return meta


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
        ids = [t["id"] for t in added] + list(vocab.values())
        self.vocab_size = max(ids) + 1 if ids else 0
        self.special_ids = np.array(sorted(t["id"] for t in added if t.get("special")), dtype=np.int64)
        self._build()

    def _build(self):
        names = [""] * self.vocab_size
        for tok, i in self.vocab.items():
            names[i] = tok
        for t in self.added:
            names[t["id"]] = t["content"]
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
        mk, mv = [], []
        for rank, (a, b) in enumerate(self.merges):
            if a not in self.vocab or b not in self.vocab or a + b not in self.vocab:
                raise HpcllmError("tokenizer merges[%d] %r: a token is not in the vocab" % (rank, a + " " + b))
            mk.append((self.vocab[a] << 32) | self.vocab[b])
            mv.append((rank << 32) | self.vocab[a + b])
        mtab = int_table(mk, mv)
        classes, fold, self.tables_version = load_tables()
        vslots = bytes_table(tok_bytes, tok_off)
        ttab, term, first = _trie(self.added)
        roots = (1 if np.any(first & 1) else 0) | (2 if np.any(first & 2) else 0)
        self._T = (classes, exact_fold() if self.mode == GPT2 else fold, byte_ids, mtab,
                   vslots, tok_bytes, tok_off, ttab, term, first)
        unk = -1 if self._model_unk is None else self._model_unk
        self._P = (np.int64(self.mode), np.int64(self.digits), np.int64(self.ignore_merges),
                   np.int64(unk), np.int64(roots))

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
        by_content = {t["content"]: t["id"] for t in added}

        def token_id(name):
            if name in by_content or name in vocab:
                return by_content.get(name, vocab.get(name))
            _err("post_processor", "unknown special token %r" % name)

        prefix, suffix = _parse_post(d.get("post_processor"), token_id)
        ids = {"eos_id": by_content.get("<|endoftext|>") if not suffix else None}
        ids.update(special_ids or {})
        return cls(vocab, merges, added, mode, digits, ignore_merges, unk, prefix, suffix, **ids)

    @classmethod
    def from_gguf(cls, path, split_digits=False):
        """GGUF tokenizer metadata, read as transformers' GGUF loader reads it (the reference).

        transformers maps tokenizer.ggml.pre "smollm" (and any pre it has no regex for) to
        the plain GPT-2 ByteLevel split. split_digits=True puts HF's Digits(individual)
        step in front, as in SmolLM2's own tokenizer.json and llama.cpp's "smollm".
        """
        return cls._from_meta(_read_gguf_meta(path), str(path), split_digits)

    @classmethod
    def _from_meta(cls, meta, where, split_digits=False):
        if meta.get("model") != "gpt2":
            raise HpcllmError("%s: tokenizer.ggml.model %r is not byte-level BPE" % (where, meta.get("model")))
        pre = meta.get("pre", "default")
        if pre in GGUF_OTHER_REGEX_PRE:
            raise HpcllmError("%s: tokenizer.ggml.pre %r uses a split regex not supported" % (where, pre))
        mode = LLAMA3 if pre in GGUF_LLAMA3_PRE else (QWEN2 if pre in GGUF_QWEN2_PRE else GPT2)
        tokens, types = meta["tokens"], meta.get("token_type") or [0] * len(meta["tokens"])
        alphabet = set(CHAR_BYTES)
        # tokens outside the byte alphabet are stored as raw text: respell their UTF-8 bytes
        vocab = {}
        for i, t in enumerate(tokens):
            vocab[t if set(t) <= alphabet else "".join(BYTE_CHARS[b] for b in t.encode("utf-8"))] = i
        added = [dict(id=i, content=t, special=True, normalized=False)
                 for i, (t, ty) in enumerate(zip(tokens, types)) if ty == GGUF_CONTROL and set(t) <= alphabet]
        added += [dict(id=i, content=t, special=False, normalized=False)
                  for i, (t, ty) in enumerate(zip(tokens, types)) if ty == GGUF_USER_DEFINED and t in vocab]
        merges = [tuple(m.split(" ")) for m in meta.get("merges", [])]
        bos, eos = meta.get("bos_token_id"), meta.get("eos_token_id")
        prefix = [bos] if meta.get("add_bos_token") and bos is not None else []
        suffix = [eos] if meta.get("add_eos_token") and eos is not None else []
        return cls(vocab, merges, added, mode, bool(split_digits), False, None, prefix, suffix,
                   bos_id=bos, eos_id=eos, pad_id=meta.get("padding_token_id"),
                   unk_id=meta.get("unknown_token_id"))

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
        template = [{"SpecialToken": {"id": names[i], "type_id": 0}} for i in self.prefix.tolist()]
        template.append({"Sequence": {"id": "A", "type_id": 0}})
        template += [{"SpecialToken": {"id": names[i], "type_id": 0}} for i in self.suffix.tolist()]
        used = sorted(set(self.prefix.tolist()) | set(self.suffix.tolist()))
        post = {"type": "TemplateProcessing", "single": template, "pair": template,
                "special_tokens": {names[i]: {"id": names[i], "ids": [i], "tokens": [names[i]]} for i in used}}
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
        """Encode documents buf[offsets[d]:offsets[d+1]] (UTF-8).

        Returns (ids int32, offsets int64 n+1, flags uint8 per document: 1 truncated,
        2 bad UTF-8 replaced by U+FFFD). max_length counts the special tokens added.
        """
        buf = np.ascontiguousarray(buf, dtype=np.uint8)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] < 0 or offsets[-1] > len(buf) \
                or np.any(offsets[1:] < offsets[:-1]):
            raise HpcllmError("encode_bytes: offsets must be a rising 1-d array within len(buf)=%d" % len(buf))
        prefix = self.prefix if add_special_tokens else self.prefix[:0]
        suffix = self.suffix if add_special_tokens else self.suffix[:0]
        limit = -1
        if max_length is not None:
            limit = int(max_length) - len(prefix) - len(suffix)
            if limit < 0:
                raise HpcllmError("max_length %d is shorter than the %d special tokens the tokenizer adds"
                                  % (max_length, len(prefix) + len(suffix)))
        return K.encode_batch(buf, offsets, limit, self._T, self._P, prefix, suffix)

    def encode(self, texts, max_length=None, add_special_tokens=True):
        """Convenience: a list of str -> list of id lists (UTF-8 encoded with surrogatepass)."""
        raw = [t.encode("utf-8", errors="surrogatepass") for t in texts]
        offsets = np.zeros(len(raw) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in raw], out=offsets[1:])
        ids, off, _ = self.encode_bytes(np.frombuffer(b"".join(raw), dtype=np.uint8), offsets,
                                        max_length, add_special_tokens)
        return [ids[off[i]:off[i + 1]].tolist() for i in range(len(raw))]

    def decode(self, ids, skip_special_tokens=True):
        """Text of ids (HF ByteLevel decoder; invalid UTF-8 becomes U+FFFD; unknown ids skipped)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        if skip_special_tokens and len(self.special_ids):
            ids = ids[~np.isin(ids, self.special_ids)]
        return b"".join(self._spelled[i] for i in ids.tolist()).decode("utf-8", errors="replace")
