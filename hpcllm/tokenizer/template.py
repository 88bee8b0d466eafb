"""The post-processor of a tokenizer.json: which special ids go around one sequence.

One parser for every model: TemplateProcessing, BertProcessing,
RobertaProcessing, ByteLevel (offsets only: adds nothing) and a Sequence of
them. Only the single-sequence template matters here (hpcllm never encodes
pairs); `template_json` writes the TemplateProcessing that reads back the same.
"""

from hpcllm.errors import HpcllmError

SUPPORTED = ("TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteLevel", "Sequence")


def template_ids(d: dict, vocab: dict, kind: str):
    """(prefix ids, suffix ids) of a parsed tokenizer.json's post-processor; a template token is
    resolved among the added tokens, then the vocab (a model that is ``kind``, for the error)."""
    by_content = {t["content"]: t["id"] for t in d.get("added_tokens", [])}

    def token_id(name):
        if name in by_content or name in vocab:
            return by_content.get(name, vocab.get(name))
        raise HpcllmError(f"tokenizer.json post_processor: unknown special token {name!r} ({kind})")
    return special_ids(d.get("post_processor"), token_id, "tokenizer.json")


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
