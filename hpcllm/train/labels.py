"""Labels: any JSON value of the label field -> class names every rank agrees on -> int ids.

Class order (hence ids) is deterministic and independent of the data's order
and sharding: numbers first in numeric order (so labels 0..9 get ids 0..9),
then strings by code point, then every other JSON value (booleans, lists,
objects) by its canonical JSON text.  A class name is the string itself for a
string label and the canonical JSON text otherwise (``3``, ``true``,
``[1, 2]``); the canonical JSON texts are kept too (``class_values``), so the
original value and its type can be recovered.  Two labels whose names
coincide (the string ``"3"`` and the number ``3``) are an error: they would be
indistinguishable in the results.

``None`` (JSON null) and ``MISSING`` (the field is absent) are missing labels:
id -1, counted, skipped by the caller.
"""

import dataclasses
import json
import numbers

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.world.collective import gather_all, sum_all

MISSING = object()   # the label field is absent from the row


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _sort_key(text: str):
    value = json.loads(text)
    if _is_number(value):
        return (0, float(value), text)
    if isinstance(value, str):
        return (1, 0.0, value)
    return (2, 0.0, text)


def class_name(value) -> str:
    return value if isinstance(value, str) else canonical(value)


@dataclasses.dataclass
class Labels:
    ids: np.ndarray          # [n_local] int64, -1 where the label is missing
    class_names: list        # display names, in id order (the same on every rank)
    class_values: list       # canonical JSON text of each class's value
    n_missing: int           # global count of rows without a label

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def encode_labels(values, comm=None) -> Labels:
    """Map this rank's label values to ids over the union of every rank's labels (collective)."""
    texts = [None if v is MISSING or v is None else canonical(v) for v in values]
    local = sorted({t for t in texts if t is not None})
    union = sorted(set().union(*gather_all(comm, local)), key=_sort_key)
    names = [class_name(json.loads(t)) for t in union]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})
        raise HpcllmError(f"labels {clash} occur both as strings and as other JSON values; "
                          "make the label field one type")
    index = {t: i for i, t in enumerate(union)}
    ids = np.array([-1 if t is None else index[t] for t in texts], dtype=np.int64)
    n_missing = int(sum_all(comm, np.array([(ids < 0).sum()], np.int64))[0])
    return Labels(ids, names, union, n_missing)


def ids_for(class_names: list, values) -> np.ndarray:
    """Ids of ``values`` against known classes (e.g. an explicit class-weight dict's keys); an unknown one is an error."""
    index = {n: i for i, n in enumerate(class_names)}
    out = []
    for v in values:
        name = class_name(v)
        if name not in index:
            raise HpcllmError(f"label {name!r} is not one of the classes {class_names}")
        out.append(index[name])
    return np.array(out, dtype=np.int64)
