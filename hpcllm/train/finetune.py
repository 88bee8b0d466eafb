"""Fine-tuning the encoder together with its head, data-parallel over every rank
(``train-classifier --finetune EPOCHS``).

A head on frozen embeddings can only separate what the encoder's features
already separate (MiniLM on the fortunes topics: 0.51-0.54 accuracy, linear
or MLP); training the encoder too moves the features themselves.

Recipe: a fresh head (zeros for the linear head, the seeded initialisation
for the MLP) on the same standardised features as the head ``fit`` trained on
the frozen embeddings (its shift and scale are kept), trained with the
encoder for ``epochs`` epochs: class-weighted cross-entropy, AdamW (weight
decay on the weight matrices only), the learning rate warmed up linearly over
the first 6% of the steps and decayed linearly to 0.  Starting from the fitted
head instead (linear probe, then fine-tune) was measured and diverges here:
that head is sharp on standardised features (scale ~0.05 of a unit vector's
coordinates), so AdamW's first step on the encoder moved the logits by
hundreds (a batch's loss 0.20 -> 1272); a zero head lets the head grow first
and the encoder follow.  The token-embedding matrix
stays frozen: it is half of MiniLM's weights, a batch touches a few hundred of
its 30k rows, and all-reducing its gradient dense would double each step's
traffic.  Dropout is not used (the model has none), so a step is deterministic.

Data parallel: every rank holds the whole encoder (unpacked, autograd on) and
the token ids of its own rows, the shards ``index % world == rank`` as for the
head (``hpcllm.train.data``): 1/world of the data.  The embed phase's tp does
not apply here; the encoders this is for are small.  Each epoch, a training
document falls into batch ``hash(seed, epoch, document id) mod n_batches``,
so a batch's members depend neither on the world size nor on which rank holds
them.  At a step each rank runs forward and backward on its members of the
batch; the loss is the batch's class-weighted mean (the batch's weight total
is summed over the ranks at the start of the epoch), and the gradients are
summed over the ranks in one flat float32 buffer (reduce + broadcast, so every
rank has the same bits and takes the same AdamW step).  The world size
changes only the floating-point summation order.

After every epoch the held-out rows are scored; the encoder and head of the
epoch with the best validation accuracy are kept (the last epoch without
validation rows).

Resume: after each epoch, and when a stop signal (SIGUSR1 / SIGTERM) is agreed
between two steps, rank 0 writes ``OUT/finetune-state.pt`` (trained weights,
AdamW state, epoch and step, the best epoch so far) atomically.  A rerun with
the same data, encoder and options continues from it: at the same world size
bit for bit as an uninterrupted run.  The file stays after a finished run, so
a rerun (say, to write the classifier again) does not train again.
"""

import dataclasses
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from hpcllm.progress import log
from hpcllm.train.metrics import evaluate
from hpcllm.train.split import row_hashes
from hpcllm.world.collective import sum_all, world_rank

FROZEN = ("embed.tokens.",)        # parameters that never train (see the module docstring)


@dataclasses.dataclass
class FinetuneOptions:
    epochs: int
    lr: float = 1e-4
    head_lr: float = None           # the head's peak learning rate (None: ``lr``)
    batch: int = 32                 # documents per step, over all ranks
    weight_decay: float = 0.01
    warmup: float = 0.06            # fraction of the steps
    seed: int = 0
    eval_tokens: int = 4096         # token budget of a scoring batch


@dataclasses.dataclass
class TokenizedRows:
    """Token ids of this rank's rows, one array each, in the order of its embeddings."""
    ids: list

    def batches(self, rows: np.ndarray, budget: int):
        """``rows`` longest first, cut into packed (flat ids, lengths) runs of about ``budget`` tokens."""
        order = sorted(rows.tolist(), key=lambda r: -len(self.ids[r]))
        a = 0
        while a < len(order):
            b, tokens = a, 0
            while b < len(order) and (b == a or tokens + len(self.ids[order[b]]) <= budget):
                tokens += len(self.ids[order[b]])
                b += 1
            yield np.array(order[a:b]), *self.pack(order[a:b])
            a = b

    def pack(self, rows):
        flat = np.concatenate([self.ids[r] for r in rows]).astype(np.int64)
        lengths = np.array([len(self.ids[r]) for r in rows], np.int64)
        return torch.from_numpy(flat), torch.from_numpy(lengths)


def local_docs(job, where) -> TokenizedRows:
    """Token ids of the rows ``where`` names ((shard, rows) pairs, ``LocalRows.where``), read and
    tokenized again exactly as the embed phase did (same reader, tokenizer and length limit)."""
    from hpcllm.executor.inputs import Inputs
    from hpcllm.progress import Timers
    from hpcllm.tokenizer import Tokenizer

    inputs = Inputs(job.cfg, extract=job.text_of)
    tokenizer = Tokenizer.from_str(job.ckpt.tokenizer_json, source=job.cfg.model, apply_file_settings=False)
    ids = []
    try:
        for shard, rows in where:
            data = inputs.load(shard, tokenizer, job.max_length, Timers(), job.skip_long)
            ids += [np.asarray(data.ids[data.offsets[r]:data.offsets[r + 1]]) for r in rows]
    finally:
        inputs.close()
    return TokenizedRows(ids)


def fresh_head(fitted, seed: int):
    """A new head like ``fitted`` (float32, initialised from ``seed``) on the same standardisation."""
    from hpcllm.train.heads import build_head

    head = build_head(fitted.config(), seed).float()
    head.set_standardisation(fitted.shift.numpy(), fitted.scale.numpy())
    return head


def trainable(model, head) -> list:
    """(name, parameter) pairs that train: the encoder's but the frozen ones, then the head's."""
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith(FROZEN)]
    params += [("head." + n, p) for n, p in head.named_parameters()]
    return params


@torch.no_grad()
def score(model, head, docs: TokenizedRows, rows: np.ndarray, budget: int) -> np.ndarray:
    """Class probabilities [len(rows), C] float32 of ``rows`` under the current weights."""
    out = np.zeros((len(rows), head.n_classes), np.float32)
    where = {r: i for i, r in enumerate(rows.tolist())}
    for members, ids, lengths in docs.batches(rows, budget):
        probs = torch.softmax(head(model.encode(ids, lengths)), dim=-1)
        out[[where[r] for r in members.tolist()]] = probs.numpy()
    return out


class Finetune:
    """One fine-tuning run on this rank's rows (collective: every rank of ``comm`` builds one and calls
    ``run`` together)."""

    def __init__(self, model, head, docs: TokenizedRows, y, doc_ids, train, val, weights, comm, opts: FinetuneOptions,
                 state_path: str, key: dict):
        self.model, self.docs, self.y = model, docs, np.asarray(y)
        self.head = fresh_head(head, opts.seed)
        self.doc_ids, self.train, self.val = list(doc_ids), np.flatnonzero(train), np.flatnonzero(val)
        self.weights = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
        self.comm, self.opts, self.state_path = comm, opts, state_path
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.n_classes = head.n_classes
        for p in list(model.parameters()) + list(self.head.parameters()):
            p.requires_grad_(False)
        self.params = trainable(model, self.head)
        for _, p in self.params:
            p.requires_grad_(True)
            p.grad = torch.zeros_like(p)       # every step reduces every gradient, computed here or not
        groups = []
        for part, lr in (("encoder", opts.lr), ("head", opts.head_lr or opts.lr)):
            mine = [p for n, p in self.params if n.startswith("head.") == (part == "head")]
            groups += [{"params": [p for p in mine if p.ndim >= 2], "weight_decay": opts.weight_decay, "peak": lr},
                       {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, "peak": lr}]
        self.optimizer = torch.optim.AdamW(groups, lr=opts.lr)
        n_train, self.n_val = (int(n) for n in sum_all(comm, np.array([len(self.train), len(self.val)], np.int64)))
        self.n_batches = max(1, math.ceil(n_train / opts.batch))
        self.total_steps = opts.epochs * self.n_batches
        self.epoch, self.step = 0, 0           # next epoch (0-based) and step within it
        self.best = None                       # (validation accuracy, epoch, {name: tensor})
        self.history = []                      # per epoch: epoch, train_loss, val_accuracy, val_macro_f1, seconds
        self.seconds = 0.0
        self._load()

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {"key": self.key, "epoch": self.epoch, "step": self.step, "history": self.history,
                "seconds": self.seconds, "best": self.best, "loss_sum": self._loss_sum,
                "weights": {n: p.detach().clone() for n, p in self.params},
                "optimizer": self.optimizer.state_dict()}

    def _save(self) -> None:
        if world_rank(self.comm) == 0:
            tmp = self.state_path + ".tmp"
            torch.save(self._state(), tmp)
            os.replace(tmp, self.state_path)
        if self.comm is not None:
            self.comm.Barrier()

    def _load(self) -> None:
        self._loss_sum = 0.0
        if not os.path.exists(self.state_path):
            return
        state = torch.load(self.state_path, weights_only=False)
        if state.get("key") != self.key:
            if world_rank(self.comm) == 0:
                log(f"train-classifier: {self.state_path} is from another fine-tuning run (data, encoder or "
                    "options differ); starting over")
            return
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(state["weights"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.seconds, self.best, self._loss_sum = state["seconds"], state["best"], state["loss_sum"]
        if world_rank(self.comm) == 0 and self.epoch < self.opts.epochs:
            log(f"train-classifier: fine-tuning resumes at epoch {self.epoch + 1}, step {self.step + 1} "
                f"of {self.n_batches}")

    # ------------------------------------------------------------------ training
    def _schedule(self, global_step: int) -> float:
        """The learning rate's factor at ``global_step``: linear warm-up, then linear decay to 0."""
        warm = max(1.0, self.opts.warmup * self.total_steps)
        return min(1.0, (global_step + 1) / warm) * max(0.0, 1.0 - global_step / self.total_steps)

    def _batches_of(self, epoch: int):
        """Batch index of each local training row this epoch, and each batch's global weight total."""
        ids = [f"{epoch}/{self.doc_ids[r]}" for r in self.train]
        batch = (row_hashes(ids, self.opts.seed) % np.uint64(self.n_batches)).astype(np.int64)
        w = self.weights.numpy().astype(np.float64)[self.y[self.train]]
        return batch, sum_all(self.comm, np.bincount(batch, weights=w, minlength=self.n_batches))

    def _step(self, rows: np.ndarray, total_weight: float) -> float:
        """Forward + backward on this rank's ``rows`` of the batch, gradients summed over the ranks,
        one AdamW step; returns the batch's (global) weighted loss."""
        self.optimizer.zero_grad(set_to_none=False)
        loss_value = 0.0
        if len(rows) and total_weight > 0:
            members, ids, lengths = next(self.docs.batches(rows, budget=1 << 62))   # the whole batch
            y = torch.from_numpy(self.y[members])
            logits = self.head(self.model.encode(ids, lengths))
            loss = (F.cross_entropy(logits, y, reduction="none") * self.weights[y]).sum() / total_weight
            loss.backward()
            loss_value = float(loss.detach())
        flat = torch.cat([p.grad.reshape(-1) for _, p in self.params] + [torch.tensor([loss_value])])
        summed = torch.from_numpy(sum_all(self.comm, flat.numpy()))
        at = 0
        for _, p in self.params:
            p.grad.copy_(summed[at:at + p.numel()].view_as(p))
            at += p.numel()
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak"] * self._schedule(self.epoch * self.n_batches + self.step)
        self.optimizer.step()
        return float(summed[-1])

    def validate(self) -> dict:
        probs = score(self.model, self.head, self.docs, self.val, self.opts.eval_tokens)
        return evaluate(self.y[self.val], probs.argmax(axis=1), self.n_classes, self.comm)

    def run(self, stop) -> bool:
        """Train the epochs not done yet; True when a stop signal was agreed between two steps (the
        state is saved then)."""
        self.model.train()
        started = time.time() - self.seconds
        while self.epoch < self.opts.epochs:
            batch, totals = self._batches_of(self.epoch)
            while self.step < self.n_batches:
                if stop.should_stop(self.comm):
                    self.seconds = time.time() - started
                    self._save()
                    return True
                self._loss_sum += self._step(self.train[batch == self.step], float(totals[self.step]))
                self.step += 1
            entry = {"epoch": self.epoch + 1, "train_loss": self._loss_sum / self.n_batches}
            if self.n_val:
                val = self.validate()
                entry.update(val_accuracy=val["accuracy"], val_macro_f1=val["macro_f1"])
                if self.best is None or val["accuracy"] > self.best[0]:
                    self.best = (val["accuracy"], self.epoch + 1,
                                 {n: p.detach().clone() for n, p in self.params})
            self.seconds = time.time() - started
            entry["seconds"] = round(self.seconds, 2)
            self.history.append(entry)
            if world_rank(self.comm) == 0:
                log("train-classifier: fine-tuning " + ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
            self.epoch, self.step, self._loss_sum = self.epoch + 1, 0, 0.0
            self._save()
        if self.best is not None:
            with torch.no_grad():
                for n, p in self.params:
                    p.copy_(self.best[2][n])
        for _, p in self.params:
            p.requires_grad_(False)
        self.model.eval()
        return False

    def summary(self) -> dict:
        """What the classifier's provenance records about the fine-tuning."""
        return {"epochs": self.opts.epochs, "best_epoch": self.best[1] if self.best else self.opts.epochs,
                "history": self.history, "seconds": self.seconds,
                "options": dataclasses.asdict(self.opts), "frozen": list(FROZEN)}


def encoder_tensors(model, ckpt, values: dict = None) -> dict:
    """The checkpoint's tensors with the fine-tuned values (Q|K|V unfused again), full shapes, float32.
    ``values``: {parameter name: tensor} to take instead of the parameters (e.g. their gradients; a tensor
    it lacks is read from ``ckpt``)."""
    values = values or dict(model.named_parameters())
    trained = {n: p.detach().float().numpy() for n, p in values.items()}
    tensors = {}
    for name in ckpt.names:
        owner, _, attr = name.rpartition(".")
        layer, _, which = owner.rpartition(".")
        if name in trained:
            tensors[name] = trained[name]
        elif which in ("q", "k", "v") and f"{layer}.qkv.{attr}" in trained:
            mod = model.get_submodule(layer)
            q, kv = mod.n_heads * mod.head_dim, mod.n_kv_heads * mod.head_dim
            fused = trained[f"{layer}.qkv.{attr}"]
            start = {"q": 0, "k": q, "v": q + kv}[which]
            tensors[name] = fused[start:start + (q if which == "q" else kv)]
        else:
            tensors[name] = ckpt.read(name, lambda shape: tuple(slice(None) for _ in shape))
    return tensors
