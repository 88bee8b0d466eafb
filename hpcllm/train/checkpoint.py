"""The classifier checkpoint ``classifier.h5``: a trained head plus a reference to its encoder.

    /            attrs: format "hpcllm-classifier", format_version,
                        head (JSON: kind, d, n_classes, hidden, ...),
                        class_names (JSON list, id order), class_values (JSON list of canonical JSON texts),
                        encoder_hash, encoder_path (absolute), encoder_relpath (from this file's folder),
                        pooling, normalize, provenance (JSON), content_hash
    /head/<name> float32, one dataset per tensor of the head's state_dict
                 (standardisation shift / scale included)

The encoder is referenced, not copied: a 90 MB encoder (gigabytes for a decoder
used as features) is not duplicated into every classifier trained on it, the
classifier stays a few hundred kB, and the content hash turns a swapped or
re-converted encoder into a one-line error instead of silently wrong
embeddings.  Both an absolute and a relative path are kept, so moving the
classifier together with its encoder (the usual ``clf/`` + ``minilm.h5``
layout) keeps working; ``resolve_encoder`` also takes an explicit path.

Written by a tp group (train-classifier --tp K), the head's tensors are cut
by rows into one file per rank, ``classifier.h5.shards/rank-*.h5``, joined by
virtual datasets in ``classifier.h5`` (``hpcllm.checkpoint.sharded``); it
reads the same, and a missing or changed shard is an error on load.

``content_hash`` is a sha256 over the head config, the class names and values,
the encoder hash and the head's tensors: what the predictions depend on.
"""

import dataclasses
import hashlib
import json
import os

import h5py
import numpy as np
import torch

from hpcllm.checkpoint.sharded import verify_shards, write_tensor_file
from hpcllm.errors import HpcllmError
from hpcllm.train.heads import build_head

FORMAT = "hpcllm-classifier"
FORMAT_VERSION = 1


@dataclasses.dataclass
class EncoderRef:
    path: str                 # the encoder checkpoint (hpcllm .h5) the embeddings came from
    content_hash: str
    pooling: str = "mean"     # "mean" | "cls"
    normalize: bool = True    # embeddings L2-normalised before the head
    relpath: str = ""         # as read back: the path relative to the classifier's folder

    @classmethod
    def of(cls, path: str, pooling: str = "mean", normalize: bool = True) -> "EncoderRef":
        """A reference to the encoder checkpoint at ``path``, with its content hash read from it."""
        from hpcllm.checkpoint.hdf5 import Checkpoint

        with Checkpoint(path) as ck:
            return cls(os.path.abspath(path), ck.content_hash, pooling, bool(normalize))


@dataclasses.dataclass
class Classifier:
    head: torch.nn.Module
    class_names: list
    class_values: list
    encoder: EncoderRef
    provenance: dict
    content_hash: str
    path: str = ""


def _content_hash(config: dict, class_names: list, class_values: list, encoder_hash: str, tensors: dict) -> str:
    digest = hashlib.sha256(json.dumps([config, class_names, class_values, encoder_hash], sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    return digest.hexdigest()


def write_classifier(path: str, head: torch.nn.Module, class_names: list, class_values: list,
                     encoder: EncoderRef, provenance: dict, comm=None) -> str:
    """Write the classifier atomically; return its content hash.  Call on one rank (the head is
    replicated), or on every rank of a tp group ``comm`` (collective): then each rank writes its rows
    of the head's tensors to its rank file and rank 0 the master (``hpcllm.checkpoint.sharded``)."""
    tensors = {k: v.detach().float().numpy() for k, v in head.state_dict().items()}
    config = head.config()
    content_hash = _content_hash(config, class_names, class_values, encoder.content_hash, tensors)
    relpath = os.path.relpath(encoder.path, os.path.dirname(os.path.abspath(path)))

    def write_rest(f):
        f.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "head": json.dumps(config, sort_keys=True),
            "class_names": json.dumps(class_names, ensure_ascii=False),
            "class_values": json.dumps(class_values, ensure_ascii=False),
            "encoder_hash": encoder.content_hash, "encoder_path": encoder.path, "encoder_relpath": relpath,
            "pooling": encoder.pooling, "normalize": encoder.normalize,
            "provenance": json.dumps(provenance, sort_keys=True, default=_json_default),
            "content_hash": content_hash})

    write_tensor_file(path, "head", tensors, write_rest, comm, axes={name: 0 for name in tensors})
    return content_hash


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"provenance value {value!r} is not JSON")


def read_classifier(path: str) -> Classifier:
    """The classifier at ``path`` with its head rebuilt (float32, eval mode); errors name the file."""
    if not os.path.exists(path):
        raise HpcllmError(f"classifier checkpoint not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise HpcllmError(f"{path}: not an HDF5 file ({exc})") from None
    with f:
        attrs = f.attrs
        if attrs.get("format") != FORMAT:
            raise HpcllmError(f"{path}: not an hpcllm classifier (train one with hpcllm train-classifier)")
        if int(attrs["format_version"]) > FORMAT_VERSION:
            raise HpcllmError(f"{path}: classifier format version {attrs['format_version']} is newer than this hpcllm reads")
        verify_shards(f, path)
        tensors = {name: f["head"][name][()] for name in f["head"]}
        config = json.loads(attrs["head"])
        names, values = json.loads(attrs["class_names"]), json.loads(attrs["class_values"])
        encoder = EncoderRef(str(attrs["encoder_path"]), str(attrs["encoder_hash"]), str(attrs["pooling"]),
                             bool(attrs["normalize"]), str(attrs["encoder_relpath"]))
        stored_hash = str(attrs["content_hash"])
        provenance = json.loads(attrs["provenance"])
    if _content_hash(config, names, values, encoder.content_hash, tensors) != stored_hash:
        raise HpcllmError(f"{path}: content hash mismatch (the file was modified or is damaged); retrain or restore it")
    head = build_head(config)
    head.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    head.eval()
    return Classifier(head, names, values, encoder, provenance, stored_hash, path)


def resolve_encoder(clf: Classifier, override: str = None) -> str:
    """The path of ``clf``'s encoder: ``override``, else the stored absolute path, else the stored
    path relative to the classifier's folder; it must exist and carry the recorded content hash."""
    from hpcllm.checkpoint.hdf5 import Checkpoint

    relative = os.path.join(os.path.dirname(os.path.abspath(clf.path)), clf.encoder.relpath)
    candidates = [override] if override else [clf.encoder.path, relative]
    found = next((c for c in candidates if c and os.path.isfile(c)), None)
    if found is None:
        raise HpcllmError(f"{clf.path}: its encoder is not at {' nor '.join(candidates)}; "
                          "pass the encoder checkpoint's path explicitly")
    with Checkpoint(found) as ck:
        if ck.content_hash != clf.encoder.content_hash:
            raise HpcllmError(f"{found}: content hash {ck.content_hash[:12]} is not the {clf.encoder.content_hash[:12]} "
                              f"{clf.path} was trained on; use that encoder or retrain the classifier")
    return found


def describe(path: str) -> str:
    """What `hpcllm inspect` prints for a classifier: head, classes, encoder, provenance, scores."""
    import h5py

    clf = read_classifier(path)
    with h5py.File(path, "r") as f:
        shards = json.loads(f.attrs.get("shards", "[]"))
    p, n_params = clf.provenance, sum(v.numel() for v in clf.head.state_dict().values())
    lines = [f"{path}: hpcllm classifier, head {json.dumps(clf.head.config(), sort_keys=True)} "
             f"({n_params:,} values{f', in {len(shards)} shard files' if shards else ''})",
             f"  content hash {clf.content_hash}",
             f"  classes ({len(clf.class_names)}): " + ", ".join(clf.class_names),
             f"  encoder {clf.encoder.path} ({clf.encoder.content_hash[:16]}), pooling {clf.encoder.pooling}, "
             f"normalize {clf.encoder.normalize}"]
    data = p.get("data", {})
    if data:
        lines.append(f"  data {data.get('input')} field {data.get('label_field')!r}: {data.get('n_train')} train, "
                     f"{data.get('n_validation')} validation rows, fingerprint {data.get('fingerprint')}, "
                     f"skipped {json.dumps(data.get('skipped', {}))}")
    if "options" in p:
        lines.append(f"  options {json.dumps(p['options'], sort_keys=True)}")
    if "fit" in p:
        lines.append(f"  fit: {p['fit']['n_iter']} iterations, best {p['fit']['best_iteration']}, converged "
                     f"{p['fit']['converged']}, stopped early {p['fit']['stopped_early']}; world {json.dumps(p.get('world'))}")
    if "finetune" in p:
        t = p["finetune"]
        before = ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in t.get("head_scores", {}).items())
        lines.append(f"  fine-tuned from {t.get('base_encoder')}: {t['epochs']} epochs in {t['seconds']:.1f} s, kept "
                     f"epoch {t['best_epoch']} (head on the frozen encoder: {before}); per epoch "
                     + json.dumps([{k: round(v, 4) for k, v in e.items()} for e in t["history"]]))
    for part, s in p.get("scores", {}).items():
        lines.append(f"  {part}: accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f} ({s['n']} rows)")
    return "\n".join(lines)
