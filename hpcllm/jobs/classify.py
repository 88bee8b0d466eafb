"""`hpcllm classify`: encoder + classifier head over a corpus; one label per document.

``--model`` is either

* a ``classifier.h5`` from `hpcllm train-classifier` (head + the encoder it
  references by content hash, found where the classifier records it or at
  ``--encoder``), or
* an encoder checkpoint that carries its own head: `hpcllm convert` of a HF
  ``BertForSequenceClassification`` (``config["classifier"]``, tensors ``head.*``).

Columns: ``label`` (class name, UTF-8; "" for rows not processed),
``label_id`` (int32, -1), ``probs`` ``[N, C]`` float32 (softmax; NaN) whose
dataset attribute ``names`` (JSON, id order) is also the root attribute ``class_names``,
``top_p`` (float32, the largest probability; NaN), plus ``n_tokens`` and the
base columns.  The encoder runs as in `hpcllm embed` (packed batches, dp x tp);
the head is replicated and runs on every rank of the group on the same pooled
vectors, so every tp rank computes the same probabilities.

With ``--labels`` (or ``--labels-file``) ``--model`` is a decoder and the labels are zero-shot:
``hpcllm.jobs.zero_shot``, same columns.
"""

import os
from dataclasses import dataclass

import h5py
import torch

from hpcllm.checkpoint.hdf5 import Checkpoint
from hpcllm.errors import HpcllmError
from hpcllm.jobs.embed import EmbedJob
from hpcllm.jobs.labels import LabelColumns


@dataclass(frozen=True)
class Classifier:
    """What ``classify --model`` names: the encoder checkpoint to run and the head over its vectors."""
    encoder: Checkpoint
    head: torch.nn.Module
    class_names: list
    content_hash: str     # the classifier's (covers the encoder's) or the encoder checkpoint's own


def open_classifier(path: str, encoder: str = None) -> Classifier:
    """The classifier at ``path``: a train-classifier product, or a checkpoint that carries a head."""
    from hpcllm.train.checkpoint import FORMAT, read_classifier, resolve_encoder

    try:
        with h5py.File(path, "r") as f:
            is_classifier = f.attrs.get("format") == FORMAT
    except OSError:
        is_classifier = False          # Checkpoint(path) says what is wrong with it
    if is_classifier:
        clf = read_classifier(path)
        ck = Checkpoint(resolve_encoder(clf, encoder))
        if (ck.config["pooling"], bool(ck.config["normalize"])) != (clf.encoder.pooling, clf.encoder.normalize):
            raise HpcllmError(f"{path}: trained on {clf.encoder.pooling} pooling (normalize {clf.encoder.normalize}) "
                              f"but {ck.path} pools {ck.config['pooling']} (normalize {ck.config['normalize']})")
        return Classifier(ck, clf.head, list(clf.class_names), clf.content_hash)
    ck = Checkpoint(path)
    if "classifier" not in ck.config:
        raise HpcllmError(f"classify: {path} has no classifier head; train one with `hpcllm train-classifier` "
                          "or convert a BertForSequenceClassification model")
    return Classifier(ck, _embedded_head(ck), list(ck.config["classifier"]["class_names"]), ck.content_hash)


def _embedded_head(ck):
    from hpcllm.train.heads import build_head

    head = build_head(ck.config["classifier"]["head"])
    state = head.state_dict()
    for name in state:
        if name not in ("shift", "scale"):      # an imported head is not standardised
            state[name] = torch.from_numpy(ck.read("head." + name, lambda shape: ()))
    head.load_state_dict(state)
    return head.eval()


class ClassifyJob(LabelColumns, EmbedJob):
    """``--labels`` / ``--labels-file`` with a decoder ``--model``: the zero-shot job instead
    (``hpcllm.jobs.zero_shot``; the CLI's job table names this class for both)."""
    name = "classify"

    def __new__(cls, cfg, model):
        if _zero_shot(cfg):
            from hpcllm.jobs.zero_shot import ZeroShotJob

            return ZeroShotJob(cfg, model)     # not a ClassifyJob: Python does not __init__ it again
        return super().__new__(cls)

    @classmethod
    def open_model(cls, cfg):
        if _zero_shot(cfg):
            return Checkpoint(cfg.model)
        return open_classifier(cfg.model, cfg.encoder)

    def __init__(self, cfg, classifier: Classifier):
        super().__init__(cfg, classifier.encoder)
        self.limit_documents(self.max_length)    # the encoder's context; --max-doc-tokens / --long-docs skip
        if len(classifier.class_names) < 2:
            raise HpcllmError(f"classify: {cfg.model} has a one-label head (a cross-encoder's relevance score); "
                              "run it with `hpcllm rerank`")
        self.classifier = classifier
        self.head = classifier.head.float()
        self.class_names = classifier.class_names
        self.n_classes = len(self.class_names)

    def model_hash(self) -> str:
        return self.classifier.content_hash

    def describe(self) -> str:
        return (f"classifier {os.path.basename(self.cfg.model)} ({self.model_hash()[:12]}, {self.n_classes} classes) "
                f"on {os.path.basename(self.ckpt.path)}")

    @torch.no_grad()
    def store(self, out, rows, vectors):
        probs = torch.softmax(self.head(vectors.float().cpu()), dim=-1).numpy()
        out["probs"][rows] = probs
        out["label_id"][rows] = probs.argmax(axis=1)


def _zero_shot(cfg) -> bool:
    return cfg.labels is not None or cfg.labels_file is not None
