"""The HDF5 checkpoint: one home for its layout.

    /                       attrs: format, format_version, architecture, config (JSON),
                                   source, content_hash, dtype, weights ("float" | "int8":
                                   quantised linear weights, ``hpcllm.model.quant``)
    /tensors/<name>         one dataset per tensor in its full logical shape;
                            attrs: split ("replicate" | "col" | "row" | "vocab"), unit, axis,
                            from the architecture's plan; checked against the plan on load
    /tokenizer              the tokenizer.json text (uint8 bytes)

A rank reads only its hyperslab (``Checkpoint.read``), so any tp size loads
from the same file and a rank holds ~1/tp of the split weights.

``content_hash`` covers everything that changes results: the tensors' names
and stored bytes, the tokenizer, the architecture and the model config (rope
scaling, windows, chat template...), so two models built from the same weights
but configured differently never share it (resume and a classifier's encoder
check compare it).
"""

import hashlib
import json
import os

import h5py
import numpy as np

from hpcllm.checkpoint.sharded import verify_shards, write_tensor_file
from hpcllm.errors import HpcllmError
from hpcllm.model.partition import split_attrs, tensor_split

FORMAT = "hpcllm-checkpoint"
FORMAT_VERSION = 1


def write_checkpoint(path, architecture: str, config: dict, tensors: dict, tokenizer_json: str,
                     source: str, plan: dict | None = None, dtype: str = "float32", comm=None,
                     weights: str = "float") -> str:
    """Write ``tensors`` (name -> numpy array, full shape) atomically; return the content hash.

    ``plan``: the split plan recorded with each tensor (default: the architecture's).
    ``comm`` of several ranks (collective; the same ``tensors`` on each): one file per rank
    cut along the split axes plus a VDS master at ``path`` (``hpcllm.checkpoint.sharded``).
    int8 arrays (quantised codes, ``weights`` says their kind) are stored as they are."""
    if plan is None:
        from hpcllm.model.architectures import plan_for

        plan = plan_for(architecture)
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": None}[dtype]
    stored, attrs = {}, {}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        if np.asarray(tensors[name]).dtype == np.int8:
            arr = stored[name] = np.ascontiguousarray(tensors[name])
        else:
            arr = np.ascontiguousarray(tensors[name], dtype=np.float32)
            # bfloat16: stored as its 16 raw bits, marked by the root attribute
            # float32 stored as it came (no copy: a converted model's weights are held once, not twice)
            stored[name] = _round_bf16(arr) if np_dtype is None else arr.astype(np_dtype, copy=False)
        attrs[name] = split_attrs(tensor_split(plan, name), arr.ndim)
        digest.update(name.encode())
        digest.update(memoryview(np.ascontiguousarray(stored[name])).cast("B"))
    tok = tokenizer_json.encode("utf-8")
    digest.update(tok)
    config_json = json.dumps(config, sort_keys=True)
    digest.update(architecture.encode())
    digest.update(config_json.encode())
    content_hash = digest.hexdigest()

    def write_rest(f):
        f.create_dataset("tokenizer", data=np.frombuffer(tok, dtype=np.uint8))
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": architecture,
                        "config": config_json, "source": source,
                        "content_hash": content_hash, "dtype": dtype, "weights": weights})

    write_tensor_file(path, "tensors", stored, write_rest, comm, {n: a["axis"] for n, a in attrs.items()}, attrs)
    return content_hash


def _round_bf16(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even (as torch does)."""
    bits = arr.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


class Checkpoint:
    """An open checkpoint file; ``read(name, slicer)`` loads one hyperslab."""

    def __init__(self, path):
        if not os.path.exists(path):
            raise HpcllmError(f"model checkpoint not found: {path}")
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise HpcllmError(f"{path}: not an HDF5 file ({exc})") from None
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT:
            raise HpcllmError(f"{path}: not an hpcllm checkpoint (convert it first: hpcllm convert SRC {path})")
        verify_shards(self.file, path)
        if int(attrs["format_version"]) > FORMAT_VERSION:
            raise HpcllmError(f"{path}: checkpoint format version {attrs['format_version']} is newer than this hpcllm reads")
        self.path = path
        self.architecture = str(attrs["architecture"])
        self.config = json.loads(attrs["config"])
        self.content_hash = str(attrs["content_hash"])
        self.dtype = str(attrs["dtype"])
        self.source = str(attrs["source"])
        self.weights = str(attrs.get("weights", "float"))

    @property
    def names(self):
        return list(self.file["tensors"].keys())

    @property
    def tokenizer_json(self) -> str:
        return self.file["tokenizer"][()].tobytes().decode("utf-8")

    def _dataset(self, name):
        if name not in self.file["tensors"]:
            raise HpcllmError(f"{self.path}: tensor {name!r} missing from the checkpoint")
        return self.file["tensors"][name]

    def split_attrs(self, name) -> dict:
        """The split attributes stored with tensor ``name`` (what ``split_attrs`` wrote)."""
        attrs = self._dataset(name).attrs
        return {"split": str(attrs.get("split", "")), "unit": str(attrs.get("unit", "")),
                "axis": int(attrs.get("axis", -1))}

    def read(self, name, slicer) -> np.ndarray:
        """float32 array of the hyperslab ``slicer(full_shape)`` of tensor ``name`` (int8 codes as stored)."""
        ds = self._dataset(name)
        slab = ds[slicer(ds.shape)]
        if slab.dtype == np.int8:
            return slab
        if self.dtype == "bfloat16":
            return (slab.astype(np.uint32) << 16).view(np.float32)
        return slab.astype(np.float32, copy=False)

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
