"""A GGUF SentencePiece vocabulary (tokenizer.ggml.model "llama") as the HF tokenizer.json
that transformers builds from it (integrations/gguf/gguf_tokenizer_mapping.py, transformers 5.x),
so that hpcllm.tokenizer.spm runs it and HF `tokenizers` loads the same text.

What transformers does, by general.architecture:

- gemma, gemma2, gemma3 (GemmaTokenizer): tokens made only of whitespace that hold a space are
  respelled as that many "▁"; merges are rebuilt from the vocabulary ranked by token position
  (the file's scores do not follow Gemma's merge order); normalizer Replace(" ", "▁") and a
  Split(" ") pre-tokenizer that finds nothing left to split; "<unk>" is the model's unk token;
  no leading space is stripped on decode.
- phi3: merges ranked by score; normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer.
- anything else (LlamaTokenizer): merges ranked by score; Metaspace(prepend_scheme "first",
  split false), whatever tokenizer.ggml.add_space_prefix says; no unk token in the model.

Every family: byte fallback, fuse_unk; control tokens (token_type 3), the class's default special
tokens and the file's bos/eos/unk/pad are special added tokens, user-defined ones (4) plain added
tokens; BOS is added unless add_bos_token is false, EOS only if add_eos_token is true.
"""

from hpcllm.errors import HpcllmError

MARK = "\u2581"
CONTROL, USER_DEFINED = 3, 4   # tokenizer.ggml.token_type values
GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}
# the special tokens each transformers tokenizer class adds by default (bos, eos, unk, pad, mask order)
GEMMA_DEFAULTS = ("<bos>", "<eos>", "<unk>", "<pad>", "<mask>")
LLAMA_DEFAULTS = ("<s>", "</s>", "<unk>")
NAMED = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")


def generate_merges(vocab: dict, ranking: dict) -> list:
    """Every split of every token into two vocabulary tokens, best first: by the merged token's
    ranking value (higher first), then the longer left part; ties keep vocabulary order
    (transformers' generate_merges with vocab_scores, whose per-token pre-sort never decides
    an order since two splits of one token differ in length)."""
    found = []
    for token, value in ranking.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                found.append((value, i, len(token) - i, left, right))
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)   # stable, like transformers'
    return [[m[3], m[4]] for m in found]


def _added_tokens(tokens, types, vocab, meta, defaults):
    """{id: (content, special)} as HF `tokenizers` serializes the tokens transformers adds (the class's
    defaults, control tokens, user-defined ones, the file's named ones). A content not in the vocab
    gets the next id: len(vocab) (entries: a vocabulary with duplicate tokens has holes), or one past
    the largest added id (HF's AddedVocabulary, whose id -> token map a later token can overwrite)."""
    ids, by_id = {}, {}

    def add(content, special):
        if content in ids:
            return
        i = vocab.get(content)
        if i is None:
            top = max(ids.values(), default=-1)
            i = top + 1 if top >= len(vocab) else len(vocab)
        ids[content] = i
        by_id[i] = (content, special)

    for content in defaults:
        add(content, True)
    for t, ty in zip(tokens, types):
        if ty == CONTROL:
            add(t, True)
    for t, ty in zip(tokens, types):
        if ty == USER_DEFINED and (t in vocab or t in ids):
            add(t, False)
    for key in NAMED:
        if meta.get(key) is not None:
            add(tokens[meta[key]], True)
    return by_id


def _template(meta, tokens, vocab, added):
    """transformers' update_post_processor: [bos] $A [eos] (bos unless add_bos_token is false)."""
    ids = dict(vocab)
    ids.update({c: i for i, (c, _) in added.items()})
    ends = []
    for key, flag, default in (("bos_token_id", "add_bos_token", True), ("eos_token_id", "add_eos_token", False)):
        i = meta.get(key)
        ends.append(tokens[i] if i is not None and meta.get(flag, default) else None)
    bos, eos = ends

    def special(name, type_id):
        return [{"SpecialToken": {"id": name, "type_id": type_id}}] if name is not None else []

    single = special(bos, 0) + [{"Sequence": {"id": "A", "type_id": 0}}] + special(eos, 0)
    pair = single + special(bos, 1) + [{"Sequence": {"id": "B", "type_id": 1}}] + special(eos, 1)
    used = [n for n in (bos, eos) if n is not None]
    return {"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": {n: {"id": n, "ids": [ids[n]], "tokens": [n]} for n in used}}


def _spacing(arch):
    """(normalizer, pre_tokenizer, decoder) of the transformers class for this architecture."""
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": MARK}
    decoders = [{"type": "Replace", "pattern": {"String": MARK}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
    if arch in GEMMA_ARCHS:
        split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
        return replace, split, decoders
    if arch == "phi3":
        prepend = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": MARK}, replace]}
        return prepend, None, decoders + strip
    meta = {"type": "Metaspace", "replacement": MARK, "prepend_scheme": "first", "split": False}
    return None, meta, decoders + strip


def sentencepiece_json(meta: dict, arch: str, where: str) -> dict:
    """The tokenizer.json dict transformers builds from a llama-type GGUF vocabulary (meta: the
    tokenizer.ggml.* values without the prefix, arch: general.architecture)."""
    tokens = list(meta["tokens"])
    types = list(meta.get("token_type") or [])
    gemma = arch in GEMMA_ARCHS
    if gemma:
        spelled = [MARK * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranking = {t: -i for i, t in enumerate(spelled)}
    else:
        if "scores" not in meta and "merges" not in meta:
            raise HpcllmError("%s: a SentencePiece GGUF vocabulary needs tokenizer.ggml.scores or .merges" % where)
        spelled = tokens
        ranking = dict(zip(tokens, meta.get("scores") or ()))
    vocab = {t: i for i, t in enumerate(spelled)}
    if "merges" in meta:
        merges = [m.split(" ") for m in meta["merges"]]
    else:
        merges = generate_merges(vocab, ranking)
    added = _added_tokens(tokens, types, vocab, meta, GEMMA_DEFAULTS if gemma else LLAMA_DEFAULTS)
    normalizer, pre, decoder = _spacing(arch)
    model = {"type": "BPE", "dropout": None, "unk_token": "<unk>" if gemma else None,
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
             "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges}
    added_json = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                   "normalized": False, "special": s} for i, (c, s) in sorted(added.items())]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_json,
            "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": _template(meta, tokens, vocab, added),
            "decoder": {"type": "Sequence", "decoders": decoder}, "model": model}
