"""`hpcllm inspect FILE`: what a checkpoint or a results file holds."""

import json
import os

import h5py
import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.status import named_counts
from hpcllm.store.results import row_blocks


def inspect_file(path: str) -> str:
    from hpcllm.checkpoint.hdf5 import FORMAT

    if not os.path.exists(path):
        raise HpcllmError(f"inspect: file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("format")
    except OSError:
        raise HpcllmError(f"inspect: {path} is not an HDF5 file") from None
    if kind == "hpcllm-classifier":
        from hpcllm.train.checkpoint import describe

        return describe(path)
    if kind == FORMAT:
        return checkpoint_summary(path)
    return summarize(path)


def checkpoint_summary(path: str) -> str:
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.architectures import plan_for

    with Checkpoint(path) as ck:
        tensors = ck.file["tensors"]
        n_params = sum(int(np.prod(tensors[n].shape)) for n in ck.names)
        split = {}
        for n in ck.names:
            kind = tensors[n].attrs["split"]
            split[kind] = split.get(kind, 0) + int(np.prod(tensors[n].shape))
        family = ck.config.get("family")
        kind = f"{ck.architecture}: {family}" if family and family != ck.architecture else ck.architecture
        lines = [
            f"{path}: hpcllm checkpoint ({kind}), {n_params / 1e6:.1f}M parameters stored as {ck.dtype}",
            f"  content hash {ck.content_hash}",
            f"  source {ck.source}",
            f"  config {json.dumps(ck.config, sort_keys=True)}",
            *([f"  {len(json.loads(ck.file.attrs['shards']))} shard files (joined by virtual datasets)"]
              if "shards" in ck.file.attrs else []),
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


def _short(v, width: int = 160) -> str:
    s = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return s if len(s) <= width else s[:width - 3] + "..."


def summarize(path: str) -> str:
    """A human-readable summary of a results, shard or token file."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise HpcllmError(f"cannot open {path} as HDF5: {e}") from None
    lines = [f"{path}"]
    with f:
        lines.append("attributes:")
        lines += [f"  {k} = {_short(f.attrs[k])}" for k in sorted(f.attrs)]
        lines.append("datasets:")

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                kind = (f"virtual, {len(obj.virtual_sources())} sources" if obj.is_virtual
                        else f"compression={obj.compression}")
                lines.append(f"  {name}  shape={obj.shape}  dtype={obj.dtype}  ({kind})")
        f.visititems(visit)
        if "status" in f and f["status"].ndim == 1:
            counts = np.zeros(256, np.int64)
            for rows in row_blocks(f, "status"):
                counts += np.bincount(f["status"][rows], minlength=256)
            lines.append("status counts: " + json.dumps(named_counts(counts)))
    return "\n".join(lines)
