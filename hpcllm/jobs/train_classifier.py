"""`hpcllm train-classifier`: embed a labelled corpus, then train a head on the embeddings -> classifier.h5.

Phase 1 is `hpcllm embed` as it is (dp x tp, token shards accepted, the same
result shards and resume): ``OUT/shards/`` + ``OUT/results.h5`` hold every
document's embedding.  Phase 2 runs on every rank once all shards are done
(the job's phase after the shards, ``after_shards``): each rank reads the
shards ``index % world == rank`` and their labels (``hpcllm.train.data``),
and the head is trained with the loss and gradient all-reduced (``hpcllm.train.fit``), so nothing is gathered and a
rank holds ~1/world of the embeddings.  A rerun resumes phase 1 from its
shards and redoes phase 2, which takes seconds; training options are not part
of the manifest's config hash, so a rerun with another head or validation
fraction reuses the embeddings.

With ``--finetune N``, phase 3 trains the encoder together with a fresh head
for N epochs, data-parallel over every rank (``hpcllm.train.finetune``: each
rank re-tokenizes its rows, gradients are summed over the ranks); the trained
encoder is written to ``OUT/encoder.h5`` (an ordinary checkpoint: `embed` and
`classify` run it at any tp) and the classifier references that one.  A stop
signal during it (agreed between two steps, as between batches) saves
``OUT/finetune-state.pt`` and the run exits 75; the rerun continues there.

``OUT/classifier.h5`` references the encoder by content hash
(``hpcllm.train.checkpoint``); with tp > 1 the first tp group writes it
sharded, one file per rank plus the master (``hpcllm.checkpoint.sharded``).

Determinism: the split hashes document ids, the head starts from ``--seed``
and the optimiser is full-batch, so a rerun at the same world size gives the
same bits.  Another world size changes which rows each rank sums (then the
order of the per-rank sums): the head differs in the last bits (linear heads
converge to ~1e-6; see ``hpcllm.train.fit``), the split and the metrics'
inputs do not change.
"""

import json
import os
import time

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.executor.job import Totals
from hpcllm.jobs.embed import EmbedJob
from hpcllm.progress import log
from hpcllm.store.layout import CLASSIFIER_NAME, ENCODER_NAME, FINETUNE_STATE_NAME


class TrainClassifierJob(EmbedJob):
    name = "train-classifier"

    def __init__(self, cfg, ckpt):
        super().__init__(cfg, ckpt)
        self.out_dtype = np.dtype(np.float32)     # the head trains on full-precision embeddings
        if not 0.0 <= cfg.validation < 1.0:
            raise HpcllmError(f"train-classifier: --validation {cfg.validation} must be in [0, 1)")
        if cfg.epochs < 1:
            raise HpcllmError(f"train-classifier: --epochs {cfg.epochs} must be at least 1")
        if cfg.finetune < 0 or cfg.finetune_batch < 1 or cfg.finetune_lr <= 0 or cfg.finetune_head_lr <= 0:
            raise HpcllmError(f"train-classifier: --finetune {cfg.finetune} must be >= 0, --finetune-batch "
                              f"{cfg.finetune_batch} >= 1, --finetune-lr {cfg.finetune_lr} and --finetune-head-lr "
                              f"{cfg.finetune_head_lr} > 0")

    def config_hash(self) -> str:
        return self.cfg.result_hash("embed", out_dtype="float32")   # the embeddings depend on nothing else

    def fit_options(self):
        from hpcllm.train.fit import FitOptions

        c = self.cfg
        return FitOptions(head=c.head, l2=c.l2, class_weight=None if c.class_weight == "none" else c.class_weight,
                          max_iter=c.epochs, hidden=c.hidden, patience=c.patience, seed=c.seed)

    def after_shards(self, out_dir: str, plan, mesh, stop) -> bool:
        """Phase 2 (and 3): the head trained on the embeddings (then the encoder with it); True if a stop
        signal ended fine-tuning early (its state is saved: the rerun continues there)."""
        from hpcllm.train.data import load_local_rows
        from hpcllm.train.labels import encode_labels
        from hpcllm.train.split import data_fingerprint, validation_mask

        started, comm, cfg = time.time(), mesh.world, self.cfg
        text = sorted({s.path for s in plan if s.fmt == "text"})
        if text:     # checked on every rank alike, before any collective
            raise HpcllmError(f"train-classifier: {text[0]} is plain text; labels need JSONL input with a "
                              f"{cfg.label_field!r} field")
        rows = load_local_rows(out_dir, plan, cfg.label_field, self.dim, comm)
        labels = encode_labels(rows.labels, comm)
        if labels.n_classes < 2:
            raise HpcllmError(f"train-classifier: {cfg.input} has {labels.n_classes} distinct value(s) of the "
                              f"label field {cfg.label_field!r} on the rows it could embed; a classifier needs 2 or more")
        val = validation_mask(rows.doc_ids, labels.ids, cfg.validation, cfg.seed, comm)
        fingerprint = data_fingerprint(rows.doc_ids, [labels.class_names[i] for i in labels.ids], cfg.seed, comm)
        result, scores = self._fit(rows.X, labels, val, comm)
        encoder, head, tuned = cfg.model, result.head, None
        if cfg.finetune:
            tuned = self._finetune(out_dir, rows, labels, val, result, scores, fingerprint, mesh, stop)
            if tuned is None:
                return True
            encoder, head, scores = tuned.encoder, tuned.head, tuned.scores
        provenance = {"data": {"input": os.path.abspath(cfg.input), "fingerprint": fingerprint,
                               "label_field": cfg.label_field, "skipped": rows.skipped,
                               "n_train": result.n_train, "n_validation": result.n_val},
                      "options": self.options(),
                      "fit": {"n_iter": result.n_iter, "converged": result.converged,
                              "stopped_early": result.stopped_early, "best_iteration": result.best_iteration,
                              "history": result.history, "class_weights": result.class_weights.tolist()},
                      "scores": scores, "world": mesh.describe(), "seconds": time.time() - started,
                      "embeddings": os.path.abspath(out_dir)}
        if tuned is not None:
            provenance["finetune"] = dict(tuned.summary, head_scores=tuned.head_scores,
                                          base_encoder=os.path.abspath(cfg.model))
        path = self._write(out_dir, head, labels, provenance, mesh, encoder)
        if mesh.rank == 0:
            log(summary(path, provenance, labels.class_names))
        return False

    def _fit(self, X, labels, val, comm):
        from hpcllm.train.fit import fit
        from hpcllm.train.heads import predict
        from hpcllm.train.metrics import evaluate

        X = X.astype(np.float64)     # float64 optimisation: tighter agreement across world sizes
        y, C = labels.ids, labels.n_classes
        result = fit(X[~val], y[~val], C, comm, self.fit_options(), X[val], y[val])
        scores = {"train": evaluate(y[~val], predict(result.head, X[~val]), C, comm)}
        if result.n_val:
            scores["validation"] = evaluate(y[val], predict(result.head, X[val]), C, comm)
        return result, scores

    def options(self) -> dict:
        """The options the classifier depends on (its provenance; fine-tuning's resume key)."""
        names = ("head", "validation", "epochs", "l2", "class_weight", "hidden", "patience", "seed")
        if self.cfg.finetune:
            names += ("finetune", "finetune_lr", "finetune_head_lr", "finetune_batch", "max_length")
        return {k: getattr(self.cfg, k) for k in names}

    def _finetune(self, out_dir, rows, labels, val, result, head_scores, fingerprint, mesh, stop):
        """Encoder + head trained together (``hpcllm.train.finetune``); the encoder written to
        ``OUT/encoder.h5`` (sharded by the first tp group when tp > 1).  Returns what the classifier
        needs, or None when a stop signal ended it early."""
        from types import SimpleNamespace

        import torch

        from hpcllm.checkpoint.hdf5 import write_checkpoint
        from hpcllm.model.build import build_model
        from hpcllm.train.finetune import Finetune, FinetuneOptions, encoder_tensors, local_docs, score
        from hpcllm.train.metrics import evaluate
        from hpcllm.world.comm import LocalComm

        cfg, comm = self.cfg, mesh.world
        model = build_model(self.ckpt, 0, 1, LocalComm(), torch.float32, "cpu", pack=False)
        docs = local_docs(self, rows.where)
        opts = FinetuneOptions(epochs=cfg.finetune, lr=cfg.finetune_lr, head_lr=cfg.finetune_head_lr,
                               batch=cfg.finetune_batch, seed=cfg.seed)
        key = {"data": fingerprint, "encoder": self.ckpt.content_hash, "options": self.options()}
        ft = Finetune(model, result.head, docs, labels.ids, rows.doc_ids, ~val, val, result.class_weights, comm,
                      opts, os.path.join(out_dir, FINETUNE_STATE_NAME), key)
        if ft.run(stop):
            return None
        y, C, scores = labels.ids, labels.n_classes, {}
        for part, mask in (("train", ~val), ("validation", val)):
            if part == "train" or int(ft.n_val):
                pred = score(model, ft.head, docs, np.flatnonzero(mask), opts.eval_tokens).argmax(axis=1)
                scores[part] = evaluate(y[mask], pred, C, comm)
        path = os.path.join(out_dir, ENCODER_NAME)
        if mesh.dp_rank == 0:
            write_checkpoint(path, self.ckpt.architecture, self.ckpt.config, encoder_tensors(model, self.ckpt),
                             self.ckpt.tokenizer_json, f"{os.path.abspath(cfg.model)}, fine-tuned by train-classifier",
                             comm=mesh.tp_mpi if mesh.tp_size > 1 else None)
        comm.Barrier()
        head_scores = {k: {m: v[m] for m in ("accuracy", "macro_f1")} for k, v in head_scores.items()}
        return SimpleNamespace(encoder=path, head=ft.head, scores=scores, summary=ft.summary(),
                               head_scores=head_scores)

    def _write(self, out_dir, head, labels, provenance, mesh, encoder) -> str:
        """The first tp group writes classifier.h5 (sharded when tp > 1); every rank returns after it."""
        from hpcllm.train.checkpoint import EncoderRef, write_classifier

        path = os.path.join(out_dir, CLASSIFIER_NAME)
        if mesh.dp_rank == 0:
            encoder = EncoderRef.of(encoder, self.ckpt.config["pooling"], self.ckpt.config["normalize"])
            write_classifier(path, head, labels.class_names, labels.class_values, encoder, provenance,
                             comm=mesh.tp_mpi if mesh.tp_size > 1 else None)
        mesh.world.Barrier()
        return path

    def totals(self, out_dir, plan):
        return Totals(summary=f"classifier in {os.path.join(out_dir, CLASSIFIER_NAME)}")


def summary(path: str, provenance: dict, class_names: list) -> str:
    """What rank 0 logs after training: counts, scores, the validation confusion matrix."""
    data, fit = provenance["data"], provenance["fit"]
    skipped = ", ".join(f"{k} {v}" for k, v in data["skipped"].items() if v) or "none"
    lines = [f"train-classifier: wrote {path}: {len(class_names)} classes, {data['n_train']} training and "
             f"{data['n_validation']} validation rows (skipped: {skipped}); {fit['n_iter']} iterations"
             f"{', stopped early' if fit['stopped_early'] else ''}, best at {fit['best_iteration']}, "
             f"{provenance['seconds']:.1f} s"]
    tuned = provenance.get("finetune")
    if tuned:
        head = ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in tuned["head_scores"].items())
        lines.append(f"  fine-tuned the encoder {tuned['epochs']} epochs in {tuned['seconds']:.1f} s (kept epoch "
                     f"{tuned['best_epoch']}; the head alone before: {head}); encoder in "
                     f"{os.path.join(os.path.dirname(path), ENCODER_NAME)}")
    for part, s in provenance["scores"].items():
        lines.append(f"  {part}: accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f} ({s['n']} rows)")
    val = provenance["scores"].get("validation")
    if val:
        lines.append("  validation confusion (rows: true, columns: predicted): "
                     + json.dumps(dict(zip(class_names, val["confusion"])), ensure_ascii=False))
    return "\n".join(lines)
