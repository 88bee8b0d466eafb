"""OpenAI Batch API request lines (``--openai-batch``): what `generate` and `embed` take from each.

A line is ``{"custom_id": ..., "method": "POST", "url": URL, "body": {...}}`` with URL one of
``URLS``.  ``parse`` checks one line against what a job serves and returns a ``Request``:
the endpoint's kind and the body, or an error message.  A line that cannot run (no custom_id,
an unknown url or one the job does not serve, no ``messages`` / ``prompt`` / ``input``, an
option out of range) keeps its row: the job gives it status missing_field and the message
(``error``); `hpcllm export --format openai-batch` writes it as the line's ``error``.

Per-request options honoured by `generate` (``sampling``): ``max_tokens`` (or
``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop`` (a string or a list
of up to 4) and ``n`` (at most the job's ``--n``: the width of its result columns);
``response_format`` is passed on as it is, for constrained decoding.  Other body keys
(``logprobs``, penalties, ``user``, ...) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embedding"}
ID_FIELD = "custom_id"


@dataclass(frozen=True)
class Request:
    kind: str | None      # "chat", "completion" or "embedding"; None when the line cannot run
    body: dict
    error: str | None = None


def parse(obj: dict, serves: tuple) -> Request:
    """One request line, for a job that serves the endpoint kinds ``serves``."""
    body, url = obj.get("body"), obj.get("url")
    kind = URLS.get(url) if isinstance(url, str) else None
    if not isinstance(obj.get(ID_FIELD), str):
        return Request(None, {}, "the line has no custom_id string")
    if kind is None:
        return Request(None, {}, f"unknown url {url!r}; one of {', '.join(URLS)}")
    if kind not in serves:
        return Request(None, {}, f"{url} is not served by this job (it serves "
                                 f"{', '.join(u for u, k in URLS.items() if k in serves)})")
    if not isinstance(body, dict):
        return Request(None, {}, "the line has no body object")
    need = {"chat": "messages", "completion": "prompt", "embedding": "input"}[kind]
    value = body.get(need)
    text = messages(value) if kind == "chat" else value
    if not (isinstance(text, str) or (kind == "chat" and text is not None)):
        return Request(None, body, f"body.{need} is missing or not "
                                   + ("a list of {role, content} messages" if kind == "chat" else "a string"))
    return Request(kind, body)


def messages(value):
    """OpenAI's messages as the chat template takes them: content strings (a list of text parts
    joined); None when not a non-empty list of such messages."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            return None
        out.append({"role": m["role"], "content": content})
    return out


def sampling(body: dict, max_n: int) -> tuple[dict, str | None]:
    """The generate options of a request body: ({max_tokens, temperature, top_p, seed, stop, n,
    response_format} as given, error message or None)."""
    got = {}
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    checks = (("max_tokens", tokens, lambda v: _int(v) and v >= 1, "an integer >= 1"),
              ("temperature", body.get("temperature"), lambda v: _number(v) and 0 <= v <= 2, "a number in [0, 2]"),
              ("top_p", body.get("top_p"), lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
              ("seed", body.get("seed"), _int, "an integer"),
              ("n", body.get("n"), lambda v: _int(v) and 1 <= v <= max_n,
               f"an integer from 1 to {max_n} (the job's --n)"),
              ("stop", body.get("stop"), _stops, "a string or a list of up to 4 strings"))
    for name, value, ok, what in checks:
        if value is None:
            continue
        if not ok(value):
            return {}, f"body.{name} must be {what}, got {value!r}"
        got[name] = [value] if name == "stop" and isinstance(value, str) else value
    if body.get("response_format") is not None:
        got["response_format"] = body["response_format"]
    return got, None


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _stops(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v))


class Requests:
    """A job's ``text_of`` and ``params_of`` over request lines.  The reader calls ``params_of`` and
    then ``text_of`` on the same line (hpcllm.corpus.readers), which is parsed once.  ``params_of``
    gives {"url", "kind", the sampling options} or {"url", "error"}; ``text_of`` the prompt (a chat
    request's rendered by ``render(messages) -> str | None``) or None for a line that cannot run."""

    def __init__(self, serves: tuple, max_n: int = 1, render=None):
        self.serves, self.max_n, self.render = serves, max_n, render
        self._last = None      # (the line's object, (text, params))

    def params_of(self, obj: dict) -> dict:
        self._last = obj, self._read(obj)
        return self._last[1][1]

    def text_of(self, obj: dict):
        last = self._last
        return (last[1] if last is not None and last[0] is obj else self._read(obj))[0]

    def _read(self, obj: dict):
        req = parse(obj, self.serves)
        url = obj.get("url") if isinstance(obj.get("url"), str) else ""
        if req.error is not None:
            return None, {"url": url, "error": req.error}
        if req.kind == "embedding":
            return req.body["input"], {"url": url, "kind": req.kind}
        options, error = sampling(req.body, self.max_n)
        text = req.body.get("prompt")
        if error is None and req.kind == "chat":
            if self.render is None:
                error = "the model has no chat template (convert it again from a file that has one)"
            else:
                text = self.render(messages(req.body["messages"]))
                error = None if text is not None else "the model's chat template refused these messages"
        if error is not None:
            return None, {"url": url, "error": error}
        return text, {"url": url, "kind": req.kind, **options}


def embedding_requests(cfg, then=None):
    """embed --openai-batch: (text_of, params_of) over /v1/embeddings lines (one string ``input`` each); the
    custom_id is the document id; ``then`` (the job's own text_of, e.g. --prefix) sees {text_field: input}."""
    cfg.id_field = cfg.id_field or ID_FIELD     # before Inputs and the manifest read it
    requests = Requests(("embedding",))
    if then is None:
        return requests.text_of, requests.params_of

    def text_of(obj):
        text = requests.text_of(obj)
        return None if text is None else then({cfg.text_field: text})
    return text_of, requests.params_of
