"""Classification heads on embeddings: plain torch modules that know nothing about ranks.

Both heads start with a fixed standardisation ``(x - shift) / scale`` (buffers,
set by ``fit`` from the training data's all-reduced mean and standard
deviation, identity by default), so L-BFGS works on a well-conditioned problem
and the stored head applies to raw embeddings.

* ``LinearHead``: multinomial logistic regression, ``logits = z @ W.T + b``.
* ``MLPHead``: one hidden layer, ``logits = W2 act(W1 z + b1) + b2``; dropout
  is off by default, so training is deterministic.
* ``PoolerHead``: HF BERT sequence classification's pooler + classifier, for
  imported fine-tuned models.

``penalised()`` names the weight matrices the L2 penalty applies to (never the
biases, as in scikit-learn). ``config()`` is what ``build_head`` needs to
rebuild the module from a checkpoint.
"""

import numpy as np
import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class _Standardised(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def set_standardisation(self, shift: np.ndarray, scale: np.ndarray) -> None:
        self.shift.copy_(torch.as_tensor(shift, dtype=self.shift.dtype))
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))


class LinearHead(_Standardised):
    """Multinomial logistic regression on ``d`` features into ``n_classes`` logits; starts at zero."""

    kind = "linear"

    def __init__(self, d: int, n_classes: int):
        super().__init__(d)
        self.d, self.n_classes = d, n_classes
        self.linear = nn.Linear(d, n_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardise(x))

    def penalised(self):
        return [self.linear.weight]

    def config(self) -> dict:
        return {"kind": self.kind, "d": self.d, "n_classes": self.n_classes}


class MLPHead(_Standardised):
    """One hidden layer of ``hidden`` units; torch's default initialisation from the caller's RNG state."""

    kind = "mlp"

    def __init__(self, d: int, n_classes: int, hidden: int = 256, activation: str = "gelu",
                 dropout: float = 0.0):
        super().__init__(d)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}")
        self.d, self.n_classes, self.hidden = d, n_classes, hidden
        self.activation, self.dropout = activation, dropout
        self.hidden_layer = nn.Linear(d, hidden)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.act(self.hidden_layer(self.standardise(x)))))

    def penalised(self):
        return [self.hidden_layer.weight, self.out.weight]

    def config(self) -> dict:
        return {"kind": self.kind, "d": self.d, "n_classes": self.n_classes, "hidden": self.hidden,
                "activation": self.activation, "dropout": self.dropout}


class PoolerHead(_Standardised):
    """HF ``BertForSequenceClassification``'s head on the [CLS] vector: ``out(tanh(dense(x)))``.

    Imported (``hpcllm convert``), never trained here; standardisation stays the identity."""

    kind = "pooler"

    def __init__(self, d: int, n_classes: int):
        super().__init__(d)
        self.d, self.n_classes = d, n_classes
        self.dense = nn.Linear(d, d)
        self.out = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(self.standardise(x))))

    def penalised(self):
        return [self.dense.weight, self.out.weight]

    def config(self) -> dict:
        return {"kind": self.kind, "d": self.d, "n_classes": self.n_classes}


HEADS = {h.kind: h for h in (LinearHead, MLPHead, PoolerHead)}


def build_head(config: dict, seed: int = 0) -> nn.Module:
    """The head ``config`` describes, initialised from ``seed`` without touching torch's global RNG."""
    options = dict(config)
    kind = options.pop("kind")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind in HEADS:
            return HEADS[kind](**options)
    raise ValueError(f"unknown head kind {kind!r} ({', '.join(HEADS)})")


@torch.no_grad()
def predict_proba(head: nn.Module, X, batch_rows: int = 65536) -> np.ndarray:
    """Class probabilities ``[n, n_classes]`` float32 of the rows of ``X`` (numpy or tensor)."""
    head.eval()
    X = torch.as_tensor(X)
    dtype = next(head.parameters()).dtype
    parts = [torch.softmax(head(X[i:i + batch_rows].to(dtype)), dim=1).float()
             for i in range(0, X.shape[0], batch_rows)]
    if not parts:
        return np.zeros((0, head.n_classes), np.float32)
    return torch.cat(parts).numpy()


def predict(head: nn.Module, X, batch_rows: int = 65536) -> np.ndarray:
    """Most probable class id (int64) of each row."""
    return predict_proba(head, X, batch_rows).argmax(axis=1).astype(np.int64)
