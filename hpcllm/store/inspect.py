"""`hpcllm inspect FILE`: what a checkpoint or a results file holds."""

import json
import os

import h5py
import numpy as np

from hpcllm.checkpoint.hdf5 import FORMAT
from hpcllm.errors import HpcllmError


def inspect_file(path: str) -> str:
    if not os.path.exists(path):
        raise HpcllmError(f"inspect: file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            is_checkpoint = f.attrs.get("format") == FORMAT
    except OSError:
        raise HpcllmError(f"inspect: {path} is not an HDF5 file") from None
    if is_checkpoint:
        return checkpoint_summary(path)
    from hpcllm.results import summarize

    return summarize(path)


def checkpoint_summary(path: str) -> str:
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import plan_for

    with Checkpoint(path) as ck:
        tensors = ck.file["tensors"]
        n_params = sum(int(np.prod(tensors[n].shape)) for n in ck.names)
        split = {}
        for n in ck.names:
            kind = tensors[n].attrs["split"]
            split[kind] = split.get(kind, 0) + int(np.prod(tensors[n].shape))
        lines = [
            f"{path}: hpcllm checkpoint ({ck.architecture}), {n_params / 1e6:.1f}M parameters stored as {ck.dtype}",
            f"  content hash {ck.content_hash}",
            f"  source {ck.source}",
            f"  config {json.dumps(ck.config, sort_keys=True)}",
            "  parameters by split: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sorted(split.items())),
            f"  tokenizer.json {len(ck.tokenizer_json):,} chars; {len(ck.names)} tensors, plan entries {len(plan_for(ck.architecture))}",
        ]
        for n in sorted(ck.names, key=_natural)[:12]:
            ds = tensors[n]
            lines.append(f"    {n:45} {str(ds.shape):18} split={ds.attrs['split']} {ds.attrs['unit']}")
        if len(ck.names) > 12:
            lines.append(f"    ... {len(ck.names) - 12} more")
    return "\n".join(lines)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]
