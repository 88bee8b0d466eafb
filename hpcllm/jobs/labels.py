"""The columns of a job that gives every document one class: ``label``, ``label_id``, ``probs``
(with the class names as its ``names`` attribute and the root's ``class_names``) and ``top_p``.

Shared by `classify` with a trained head (hpcllm.jobs.classify) and with zero-shot
labels scored by a decoder (hpcllm.jobs.zero_shot).
"""

import json

import numpy as np

from hpcllm.executor.job import ShardResult, Totals
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, STRING, Column


class LabelColumns:
    """The columns of a job that gives every document one of ``class_names`` (set by the job, with
    ``n_classes``) from ``probs``: a trained head's here, or names scored by a decoder (zero_shot)."""

    def schema(self):
        return (Column("label", STRING, (), ""), Column("label_id", np.int32, (), -1),
                Column("probs", np.float32, (self.n_classes,), np.nan, attrs={"names": self._names_json()}),
                Column("top_p", np.float32, (), np.nan),
                N_TOKENS) + BASE_COLUMNS

    def empty_outputs(self, n_docs):
        return {"label_id": np.full(n_docs, -1, np.int32),
                "probs": np.full((n_docs, self.n_classes), np.nan, np.float32)}

    def result(self, state):
        ids, probs = state.out["label_id"], state.out["probs"]
        names = np.array([""] + self.class_names, dtype=object)
        return ShardResult({"label": names[ids + 1], "label_id": ids, "probs": probs,
                            "top_p": np.where(ids >= 0, np.nan_to_num(probs).max(axis=1, initial=0.0),
                                              np.nan).astype(np.float32)})

    def totals(self, out_dir, plan):
        return Totals({"class_names": self._names_json()})

    def _names_json(self) -> str:
        return json.dumps(self.class_names, ensure_ascii=False)
