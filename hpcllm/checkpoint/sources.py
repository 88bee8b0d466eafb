"""What the importers (hf_bert, hf_llama, gguf) share: reading a model directory's
files and mapping source tensor names onto hpcllm's."""

import json
import os

from hpcllm.errors import HpcllmError


def read_json(path, default=None):
    """The JSON file at ``path``; ``default`` when it is absent (an error when no default is given)."""
    if not os.path.exists(path):
        if default is not None:
            return default
        raise HpcllmError(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_tokenizer_json(src: str) -> str:
    path = os.path.join(src, "tokenizer.json")
    if not os.path.exists(path):
        raise HpcllmError(f"{src}: tokenizer.json missing (hpcllm needs the fast-tokenizer file)")
    with open(path, encoding="utf-8") as f:
        return f.read()


def safetensors_files(src: str) -> list[str]:
    files = sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(".safetensors"))
    if not files:
        raise HpcllmError(f"{src}: no *.safetensors weights found")
    return files


def rename(key: str, top: dict, layers: dict, layer_prefix: str):
    """hpcllm's name for source tensor ``key`` ("<module>.<weight|bias>"), or None when unknown.

    ``top``: source module -> ours outside the layers; ``layers``: source module inside layer i
    (after ``layer_prefix`` + "i.") -> ours inside "layers.i.".
    """
    base, _, kind = key.rpartition(".")
    if base in top:
        return f"{top[base]}.{kind}"
    if base.startswith(layer_prefix):
        i, _, rest = base[len(layer_prefix):].partition(".")
        if rest in layers:
            return f"layers.{i}.{layers[rest]}.{kind}"
    return None
