"""Quantised weights (``hpcllm convert --weights int8``): one home for their checkpoint format and kinds.

    /tensors/<module>.weight         int8 [out, in]: codes round(w / s) in [-127, 127]
    /tensors/<module>.weight_scale   float [out]: s = max |w| of the output channel / 127

for every 2-D weight the architecture's plan splits (the decoder's q, k, v, o, gate, up, down, the
embedding and the LM head: per vocabulary row); norms, biases and stacked expert tensors stay float.
The root attribute ``weights`` says which kind the file holds ("float" when absent).  A scale is split
as a bias of its module is (its output channels: cut with a column split, whole with a row split), so
any tp loads on channel boundaries and a rank holds its rows' codes and scales, ~1/4 of fp32's bytes.
Per-channel (not per-group) scales because the kernels that run int8 weights on the CPU take them
(``hpcllm.model.layers.int8_linear``; ``bench/quant_kernels.py`` measured the candidates).
"""

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.model.partition import tensor_split

KINDS = ("float", "int8")      # what ``convert --weights`` writes and this hpcllm runs
SCALE = "_scale"                # <name>.weight + SCALE: the scales of a quantised weight


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 of w [out, in]: (codes int8, scales float32 [out]); an all-zero row scales by 0."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=1) / 127
    safe = np.where(scale > 0, scale, 1)
    return np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8), scale.astype(np.float32)


def quantize_tensors(tensors: dict, plan: dict, kind: str, family: str) -> dict:
    """``tensors`` with each split 2-D weight replaced by its codes and scales (``kind`` "int8")."""
    if kind not in KINDS:
        raise HpcllmError(f"convert --weights {kind}: unknown kind (this hpcllm writes {', '.join(KINDS)})")
    if kind == "float":
        return tensors
    if family != "decoder":
        raise HpcllmError(f"convert --weights {kind}: quantised weights are for decoder models, not {family} ones")
    out = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and np.ndim(w) == 2 and tensor_split(plan, name) != "replicate":
            out[name], out[name + SCALE] = quantize_int8(w)
        else:
            out[name] = w
    return out


def check_runnable(kind: str, device: str, path: str) -> None:
    """A one-line error where this hpcllm cannot run a checkpoint's weight kind on ``device``."""
    if kind not in KINDS:
        raise HpcllmError(f"{path}: weights quantised as {kind!r}, which this hpcllm cannot run "
                          f"(it runs {', '.join(KINDS)}); convert the model again")
    if kind != "float" and device != "cpu":
        raise HpcllmError(f"{path}: {kind} weights run on the CPU only (--device cpu), not {device}")
