"""Import a Hugging Face BERT-family directory (config.json, model.safetensors,
tokenizer.json, and sentence-transformers' modules.json / pooling config when
present) into hpcllm's names and config.

RoBERTa and XLM-RoBERTa (``model_type`` roberta / xlm-roberta) are the same
encoder with two differences the config records: positions count from
``pad_token_id + 1`` (``position_offset``; a pad token inside a document keeps
the pad position, as HF's ``create_position_ids_from_input_ids`` gives it), and
one token type.  Their ``*ForSequenceClassification`` head
(``classifier.dense`` / ``classifier.out_proj`` on the <s> vector) is BERT's
pooler + classifier under other names.

A ``BertForSequenceClassification`` (config ``architectures``) keeps its
pooler and classifier as ``head.dense.*`` / ``head.out.*`` (replicated: the
plan does not name them) and gets ``config["classifier"]``: the head
(``hpcllm.train.heads.PoolerHead``) and the class names from ``id2label`` in
id order; it pools the [CLS] vector, unnormalised, as HF does.  So `hpcllm
classify` runs it, and `hpcllm embed` gives its [CLS] hidden states.  With one
label it is a cross-encoder (sentence-transformers' ``CrossEncoder``): `hpcllm
rerank` runs it, and ``config["classifier"]["activation"]`` is what
``CrossEncoder.predict`` applies to its logit ("sigmoid", its default for one
label, or "identity", as config_sentence_transformers.json / config.json say).
"""

import os

from safetensors.numpy import load_file

from hpcllm.checkpoint.sources import read_json, read_tokenizer_json, safetensors_files
from hpcllm.errors import HpcllmError

# HF name (after the optional "bert." prefix) -> hpcllm name; "{i}" is the layer index
_LAYER_NAMES = {
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.output.dense": "o", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "mlp_norm",
}
_ROBERTA_TYPES = ("roberta", "xlm-roberta")
_EMBED_NAMES = {
    "embeddings.word_embeddings": "embed.tokens", "embeddings.position_embeddings": "embed.positions",
    "embeddings.token_type_embeddings": "embed.types", "embeddings.LayerNorm": "embed.norm",
}


def bert_config(src: str, hf: dict) -> dict:
    """hpcllm's encoder config from HF config.json plus sentence-transformers' files."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise HpcllmError(f"{src}/config.json: hidden_act {hf['hidden_act']!r} is not supported (gelu only)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise HpcllmError(f"{src}/config.json: position_embedding_type {hf['position_embedding_type']!r} is not supported")
    modules = read_json(os.path.join(src, "modules.json"), default=[])
    pooling_dir = next((m["path"] for m in modules if m["type"].endswith("Pooling")), None)
    pooling = read_json(os.path.join(src, pooling_dir, "config.json")) if pooling_dir else {}
    st_cfg = read_json(os.path.join(src, "sentence_bert_config.json"), default={})
    mode = _pooling_mode(pooling, f"{src}/{pooling_dir}/config.json")
    heads = hf["num_attention_heads"]
    pad = hf.get("pad_token_id", 0) or 0
    offset = pad + 1 if hf.get("model_type") in _ROBERTA_TYPES else 0
    positions = hf["max_position_embeddings"] - offset   # the positions a document may use
    max_length = st_cfg.get("max_seq_length") or read_json(os.path.join(src, "tokenizer_config.json"),
                                                           default={}).get("model_max_length") or positions
    return {
        "vocab": hf["vocab_size"], "hidden": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": heads, "n_kv_heads": heads, "head_dim": hf["hidden_size"] // heads,
        "ffn": hf["intermediate_size"], "max_positions": positions, "position_offset": offset,
        "type_vocab": hf.get("type_vocab_size", 2), "norm_eps": hf.get("layer_norm_eps", 1e-12),
        "pad_id": pad, "pooling": mode,
        "normalize": any(m["type"].endswith("Normalize") for m in modules),
        "max_length": min(int(max_length), positions),
    }


def _pooling_mode(pooling: dict, where: str) -> str:
    """"cls" or "mean" from a Pooling config: sentence-transformers 6 writes ``pooling_mode``, older
    versions one ``pooling_mode_*`` flag per mode."""
    mode = pooling.get("pooling_mode")
    if mode is None:
        mode = "cls" if pooling.get("pooling_mode_cls_token") else (
            "mean" if pooling.get("pooling_mode_mean_tokens", True) else "other")
    if mode not in ("cls", "mean"):
        raise HpcllmError(f"{where}: only mean or CLS pooling is supported (not {mode!r})")
    return mode


# the sequence classifier's head: BERT's pooler + classifier, (XLM-)RoBERTa's classifier.dense + out_proj
_HEAD_NAMES = {"pooler.dense.": "head.dense.", "classifier.dense.": "head.dense.", "classifier.out_proj.": "head.out.",
               "classifier.": "head.out."}
_CLASSIFIERS = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                "XLMRobertaForSequenceClassification")
# CrossEncoder's activation_fn (a dotted torch class) -> the one rerank applies
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity"}


def is_sequence_classifier(hf: dict) -> bool:
    return any(a in _CLASSIFIERS for a in hf.get("architectures") or [])


def classifier_config(src: str, hf: dict) -> dict:
    """``config["classifier"]`` of a *ForSequenceClassification: its head and class names (and, with one
    label, the activation CrossEncoder.predict applies)."""
    n = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if n > 1 and hf.get("problem_type") not in (None, "single_label_classification"):
        raise HpcllmError(f"{src}/config.json: problem_type {hf.get('problem_type')!r} with "
                          f"{n} labels; classify runs single-label classifiers (softmax) only")
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
    if len(set(names)) != n:
        raise HpcllmError(f"{src}/config.json: id2label has repeated names {names}")
    out = {"head": {"kind": "pooler", "d": hf["hidden_size"], "n_classes": n}, "class_names": names}
    if n == 1:
        out["activation"] = _cross_encoder_activation(src, hf)
    return out


def _cross_encoder_activation(src: str, hf: dict) -> str:
    st = read_json(os.path.join(src, "config_sentence_transformers.json"), default={})
    path = (st.get("activation_fn") or (hf.get("sentence_transformers") or {}).get("activation_fn")
            or hf.get("sbert_ce_default_activation_function") or "torch.nn.Sigmoid")
    name = path.rsplit(".", 1)[-1]
    if name not in _ACTIVATIONS:
        raise HpcllmError(f"{src}: cross-encoder activation {path!r} is not supported "
                          f"({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def bert_tensors(src: str, n_layers: int, keep_head: bool = False) -> dict:
    raw = {}
    for path in safetensors_files(src):
        raw.update(load_file(path))
    out = {}
    for key, arr in raw.items():
        key = key.removeprefix("bert.").removeprefix("roberta.")
        head = next((ours for hf, ours in _HEAD_NAMES.items() if key.startswith(hf)), None)
        if keep_head and head is not None:
            out[head + key.split(".")[-1]] = arr
            continue
        if key == "embeddings.position_ids" or key.startswith(("pooler.", "cls.", "lm_head.")):
            continue
        new = _rename(key)
        if new is None:
            raise HpcllmError(f"{src}: unexpected tensor {key!r} for a BERT-family model")
        out[new] = arr
    missing = sorted(set(_expected_names(n_layers)) - set(out))
    if missing:
        raise HpcllmError(f"{src}: BERT weights missing from the safetensors files: {', '.join(missing[:5])}")
    return out


def _expected_names(n_layers: int):
    for ours in _EMBED_NAMES.values():
        yield from ([f"{ours}.weight", f"{ours}.bias"] if ours.endswith("norm") else [f"{ours}.weight"])
    for i in range(n_layers):
        for ours in _LAYER_NAMES.values():
            yield from (f"layers.{i}.{ours}.weight", f"layers.{i}.{ours}.bias")


def _rename(key: str):
    for hf, ours in _EMBED_NAMES.items():
        if key.startswith(hf + "."):
            return ours + key[len(hf):].replace(".gamma", ".weight").replace(".beta", ".bias")
    if key.startswith("encoder.layer."):
        rest = key[len("encoder.layer."):]
        i, rest = rest.split(".", 1)
        for hf, ours in _LAYER_NAMES.items():
            if rest.startswith(hf + "."):
                return f"layers.{i}.{ours}{rest[len(hf):]}"
    return None


def import_bert(src: str):
    """-> (architecture, config, tensors, tokenizer_json)"""
    hf = read_json(os.path.join(src, "config.json"))
    cfg = bert_config(src, hf)
    seq_cls = is_sequence_classifier(hf)
    if seq_cls:
        cfg.update(pooling="cls", normalize=False, classifier=classifier_config(src, hf))
    tensors = bert_tensors(src, cfg["n_layers"], keep_head=seq_cls)
    if seq_cls and not {"head.dense.weight", "head.out.weight"} <= set(tensors):
        raise HpcllmError(f"{src}: a sequence classifier without pooler or classifier weights")
    return "bert", cfg, tensors, read_tokenizer_json(src)
