"""The tokenizer of a GGUF file as the HF tokenizer.json text transformers' GGUF loader builds.

`tokenizer_json` dispatches on tokenizer.ggml.model: "gpt2" is byte-level BPE
(hpcllm.tokenizer.bpe, from the arguments hpcllm.tokenizer.gguf_meta reads), "llama"
SentencePiece BPE (hpcllm.tokenizer.gguf_spm, run by hpcllm.tokenizer.spm); anything
else is a one-line error naming what is supported.
"""

import json

from hpcllm.errors import HpcllmError
from hpcllm.tokenizer.gguf_meta import ARCH, bpe_arguments_of, meta_from_reader, read, read_meta

__all__ = ["tokenizer_json", "json_of", "read", "read_meta", "meta_from_reader"]

SUPPORTED = "gpt2: byte-level BPE, llama: SentencePiece BPE"


def tokenizer_json(source) -> str:
    """The HF tokenizer.json text of a GGUF file's tokenizer (a path or gguf.GGUFReader), as
    transformers builds it; Tokenizer.from_str runs it, HF `tokenizers` loads it."""
    return json_of(*read(source))


def json_of(meta, where) -> str:
    """tokenizer_json of the metadata `read` returned."""
    kind = meta.get("model")
    if kind == "gpt2":
        from hpcllm.tokenizer.bpe import ByteLevelBPE
        d = ByteLevelBPE(**bpe_arguments_of(meta, where)).to_json_dict()
    elif kind == "llama":
        from hpcllm.tokenizer.gguf_spm import sentencepiece_json
        d = sentencepiece_json(meta, meta.get(ARCH, ""), where)
    else:
        raise HpcllmError("%s: tokenizer.ggml.model %r is not supported (%s)" % (where, kind, SUPPORTED))
    return json.dumps(d, ensure_ascii=False)
