"""Chat templates: the model's jinja template rendered in jinja2's sandbox.

Templates come from model files (GGUF ``tokenizer.chat_template``,
``tokenizer_config.json``), i.e. they are untrusted: they are rendered with
``jinja2.sandbox.ImmutableSandboxedEnvironment`` (as transformers does), which
refuses attribute access to Python internals (``__class__``, ``__globals__``,
...) and mutation of the inputs. ``raise_exception`` and ``strftime_now`` are
provided as transformers provides them.
"""

from __future__ import annotations

import datetime
import json

from hpcllm.errors import HpcllmError


class TemplateRefused(Exception):
    """A template raised (``raise_exception``) or failed on one conversation."""


def _raise(message):
    raise TemplateRefused(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, special: dict, where: str):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.where, self.special = where, special
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson     # jinja's own escapes HTML; templates expect plain JSON
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise HpcllmError(f"{where}: the chat template does not parse: {exc}") from None
        self.render([{"role": "user", "content": "hi"}], probe=True)

    def render(self, messages: list, probe: bool = False) -> str:
        """The prompt text of a conversation, with the assistant's turn opened."""
        from jinja2.exceptions import SecurityError, TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        except SecurityError as exc:
            raise HpcllmError(f"{self.where}: the chat template was refused by the sandbox ({exc}); "
                              f"it reaches for Python internals, do not use this model's template") from None
        except (TemplateError, TemplateRefused, TypeError, ValueError, KeyError, IndexError) as exc:
            if probe:
                raise HpcllmError(f"{self.where}: the chat template fails on a one-message conversation: "
                                  f"{exc}") from None
            raise TemplateRefused(str(exc)) from None


def conversation(obj: dict, text_field: str, messages_field: str, system: str | None):
    """The messages of a JSON line: its ``messages_field`` when it holds a list of {role, content}
    strings, else its text as one user message (after --system). None when it has neither."""
    msgs = obj.get(messages_field)
    if msgs is not None:
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs)
        return [dict(m) for m in msgs] if ok else None
    text = obj.get(text_field)
    if not isinstance(text, str):
        return None
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": text}]
