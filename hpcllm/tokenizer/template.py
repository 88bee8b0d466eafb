"""The post-processor of a tokenizer.json: which special ids go around one sequence.

One parser for every model: TemplateProcessing, BertProcessing,
RobertaProcessing, ByteLevel (offsets only: adds nothing) and a Sequence of
them. The single-sequence template is what every job uses; `pair_template`
gives the pair template (prefix A middle B suffix, with type ids) that `hpcllm
rerank` encodes (query, document) pairs with. `template_json` writes the
TemplateProcessing that reads back the same.
"""

from dataclasses import dataclass

from hpcllm.errors import HpcllmError

SUPPORTED = ("TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteLevel", "Sequence")


def template_ids(d: dict, vocab: dict, kind: str):
    """(prefix ids, suffix ids) of a parsed tokenizer.json's post-processor; a template token is
    resolved among the added tokens, then the vocab (a model that is ``kind``, for the error)."""
    return special_ids(d.get("post_processor"), _resolver(d, vocab, kind), "tokenizer.json")


def _resolver(d: dict, vocab: dict, kind: str):
    """name -> id of a template token: among the added tokens, then the vocab."""
    by_content = {t["content"]: t["id"] for t in d.get("added_tokens", [])}

    def token_id(name):
        if name in by_content or name in vocab:
            return by_content.get(name, vocab.get(name))
        raise HpcllmError(f"tokenizer.json post_processor: unknown special token {name!r} ({kind})")
    return token_id


@dataclass(frozen=True)
class PairTemplate:
    """prefix + A + middle + B + suffix (special ids), and the type id of every token of each part."""
    prefix: tuple = ()
    middle: tuple = ()
    suffix: tuple = ()
    types: tuple = ((), 0, (), 1, ())   # prefix's types, A's type, middle's types, B's type, suffix's types

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def pair_template(d: dict, vocab: dict, kind: str) -> PairTemplate:
    """The pair template of a parsed tokenizer.json's post-processor (tokens resolved as template_ids)."""
    return _pair(d.get("post_processor"), _resolver(d, vocab, kind), "tokenizer.json")


def _pair(post, token_id, source) -> PairTemplate:
    kind = (post or {}).get("type")
    if post is None or kind == "ByteLevel":
        return PairTemplate(types=((), 0, (), 0, ()))   # HF: no template, both sequences type 0
    if kind == "Sequence":
        steps = [s for s in post.get("processors") or [] if s.get("type") != "ByteLevel"]
        if len(steps) > 1:
            raise HpcllmError(f"{source}: a post_processor Sequence of several templates is not supported for pairs")
        return _pair(steps[0] if steps else None, token_id, source)
    if kind == "BertProcessing":     # [CLS] A [SEP] B:1 [SEP]:1
        cls, sep = post["cls"][1], post["sep"][1]
        return PairTemplate((cls,), (sep,), (sep,), ((0,), 0, (0,), 1, (1,)))
    if kind == "RobertaProcessing":  # <s> A </s> </s> B </s>, all type 0
        cls, sep = post["cls"][1], post["sep"][1]
        return PairTemplate((cls,), (sep, sep), (sep,), ((0,), 0, (0, 0), 0, (0,)))
    if kind != "TemplateProcessing":
        raise HpcllmError(f"{source}: post_processor type {kind!r} is not supported ({', '.join(SUPPORTED)})")
    parts, seqs = [[], [], []], []     # special (id, type) runs around the sequences, the sequences' types
    for piece in post.get("pair") or []:
        if "Sequence" in piece:
            seqs.append((piece["Sequence"]["id"], piece["Sequence"].get("type_id", 0)))
            continue
        name, type_id = piece["SpecialToken"]["id"], piece["SpecialToken"].get("type_id", 0)
        ids = (post.get("special_tokens") or {}).get(name, {}).get("ids") or [token_id(name)]
        parts[len(seqs)].extend((i, type_id) for i in ids)
    if [s for s, _ in seqs] != ["A", "B"]:
        raise HpcllmError(f"{source}: the post_processor's pair template must hold $A then $B "
                          f"(it has {[s for s, _ in seqs]})")
    (p, m, s), types = ([tuple(i for i, _ in part) for part in parts],
                        tuple(tuple(t for _, t in part) for part in parts))
    return PairTemplate(p, m, s, (types[0], seqs[0][1], types[1], seqs[1][1], types[2]))


def special_ids(post, token_id, source):
    """(prefix ids, suffix ids) the post-processor puts around a single sequence.

    token_id(name) -> id resolves a template token that special_tokens does not list.
    """
    if post is None:
        return [], []
    kind = post.get("type")
    if kind == "Sequence":
        prefix, suffix = [], []
        for step in post.get("processors") or []:
            p, s = special_ids(step, token_id, source)
            prefix, suffix = p + prefix, suffix + s   # each later step wraps what came before
        return prefix, suffix
    if kind == "ByteLevel":
        return [], []
    if kind in ("BertProcessing", "RobertaProcessing"):   # [cls] A [sep]; <s> A </s>
        return [post["cls"][1]], [post["sep"][1]]
    if kind != "TemplateProcessing":
        raise HpcllmError(f"{source}: post_processor type {kind!r} is not supported ({', '.join(SUPPORTED)})")
    prefix, suffix, seen = [], [], False
    for piece in post["single"]:
        if "Sequence" in piece:
            seen = True
            continue
        name = piece["SpecialToken"]["id"]
        ids = (post.get("special_tokens") or {}).get(name, {}).get("ids") or [token_id(name)]
        (suffix if seen else prefix).extend(ids)
    return prefix, suffix


def template_json(prefix, suffix, names):
    """A TemplateProcessing dict for prefix + $A + suffix; names: id -> token text."""
    def special(i):
        return {"SpecialToken": {"id": names[i], "type_id": 0}}

    single = [special(i) for i in prefix] + [{"Sequence": {"id": "A", "type_id": 0}}] + [special(i) for i in suffix]
    used = sorted(set(prefix) | set(suffix))
    return {"type": "TemplateProcessing", "single": single, "pair": single,
            "special_tokens": {names[i]: {"id": names[i], "ids": [i], "tokens": [names[i]]} for i in used}}
