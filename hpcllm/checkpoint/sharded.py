"""Writing a checkpoint-like HDF5 file of tensors: whole, or sharded as one file per rank plus a
master that joins them with virtual datasets.  ``write_tensor_file`` is the one write sequence
(model checkpoints, ``hpcllm.checkpoint.hdf5``; classifier heads, ``hpcllm.train.checkpoint``).

    DEST.h5                   the master: every tensor a VDS in its full logical shape, plus the
                              file's own attributes and small datasets (tokenizer, ...);
                              root attribute ``shards`` (JSON list: file, size, sha256 of each)
    DEST.h5.shards/rank-00003.h5
                              rank 3's rank file: its slabs of the split tensors (and the
                              replicated tensors it was dealt); attribute ``shard_sha256`` over
                              its contents

Each rank writes its rank file at once, so writing a checkpoint costs the time
of its largest rank file.  A split tensor is cut along its split axis (its
``axis`` attribute) in ``size`` near-equal slabs; that cut is for storage
only, the master reads as whole tensors and a reader takes any hyperslab, so
any tp size loads it.  A replicated tensor goes whole to one rank, dealt in
name order.

A VDS whose source is missing reads as fill values without an error, the trap
results.h5 guards against too, so ``verify_shards`` (called by every reader
when it opens a master) checks that each rank file exists, has its recorded
size and sha256 attribute, before anything is read: a missing, truncated or
rewritten rank file is a one-line error.  The byte size catches truncation
without reading the data; the attribute catches a rank file rewritten by
another run.
"""

import hashlib
import json
import os

import h5py
import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.store.atomic import atomic_h5
from hpcllm.world.collective import agree_error, gather_all, on_root, world_rank, world_size

SHARDS_ATTR = "shards"


def shard_dir(path: str) -> str:
    return path + ".shards"


def shard_path(path: str, rank: int) -> str:
    return os.path.join(shard_dir(path), f"rank-{rank:05d}.h5")


def remove_stale(path: str, size: int = 0) -> None:
    """Remove rank files of an earlier write of ``path`` that a write by ``size`` ranks does not replace
    (all of them for a plain file, ``size`` 0); call on one rank, once the new master is in place."""
    d = shard_dir(path)
    if not os.path.isdir(d):
        return
    for name in os.listdir(d):
        if name.startswith("rank-") and name.endswith(".h5") and int(name[5:-3]) >= size:
            os.remove(os.path.join(d, name))
    if not os.listdir(d):
        os.rmdir(d)


def slab_bounds(shape: tuple, axis: int, size: int) -> list:
    """The ``size`` slabs [start, stop) of ``shape`` along ``axis`` (np.array_split's cut)."""
    n = shape[axis]
    bounds = [n * r // size for r in range(size + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _slab(shape: tuple, axis: int, start: int, stop: int) -> tuple:
    return tuple(slice(start, stop) if a == axis else slice(None) for a in range(len(shape)))


def layout(tensors: dict, axes: dict, size: int) -> dict:
    """name -> [(rank, slab index tuple)]: which rank stores which slab of each tensor.

    ``axes[name]``: the axis to cut (None or -1: replicated, whole on one rank)."""
    out, dealt = {}, 0
    for name in sorted(tensors):
        shape, axis = tuple(tensors[name].shape), axes.get(name)
        if axis is not None and axis >= len(shape):     # a split layer's bias: cut its one axis
            axis = len(shape) - 1
        if axis is None or axis < 0 or shape[axis] < size:
            out[name] = [(dealt % size, tuple(slice(None) for _ in shape))]
            dealt += 1
        else:
            out[name] = [(r, _slab(shape, axis, a, b)) for r, (a, b) in enumerate(slab_bounds(shape, axis, size))]
    return out


def _file_digest(f: h5py.File) -> str:
    digest = hashlib.sha256()
    for name in sorted(f):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(f[name][()]).tobytes())
    return digest.hexdigest()


def write_tensor_file(path: str, group: str, tensors: dict, write_rest, comm=None, axes: dict | None = None,
                      dataset_attrs: dict | None = None) -> None:
    """Write the HDF5 file ``path`` atomically: ``tensors`` (name -> numpy array, full shape) as the
    datasets of ``group``, each with ``dataset_attrs[name]``, then ``write_rest(f)`` adds the file's
    attributes and other datasets to the open file.

    ``comm`` of several ranks (collective; the same ``tensors`` on every rank): each rank writes its
    slabs to its rank file (a tensor cut along ``axes[name]``; absent, None or -1: whole, on one
    rank) and rank 0 the master, whose datasets are virtual datasets over the rank files.  Returns on
    every rank once the file is in place; a rank's error is raised on every rank."""
    sharded = world_size(comm) > 1
    records = plan = None
    if sharded:
        plan = layout(tensors, axes or {}, comm.Get_size())
        records = _write_rank_file(path, comm, tensors, plan)

    def write_master():
        with atomic_h5(path) as f:
            g = f.create_group(group)
            if sharded:
                _add_virtual_datasets(f, group + "/", tensors, plan, records, dataset_attrs or {})
            else:
                for name in sorted(tensors):
                    g.create_dataset(name, data=tensors[name]).attrs.update((dataset_attrs or {}).get(name, {}))
            write_rest(f)
        remove_stale(path, comm.Get_size() if sharded else 0)

    on_root(comm, write_master)


def _write_rank_file(path: str, comm, tensors: dict, plan: dict) -> list:
    """This rank's slabs of ``tensors`` (``plan``: ``layout``'s) to its rank file; every rank's record
    (file relative to the master's folder, size, sha256), in rank order."""
    rank, record, error = world_rank(comm), None, None
    mine = shard_path(path, rank)
    try:
        os.makedirs(shard_dir(path), exist_ok=True)
        with atomic_h5(mine) as f:
            for name, pieces in plan.items():
                for r, slab in pieces:
                    if r == rank:
                        f.create_dataset(name, data=np.ascontiguousarray(tensors[name][slab]))
            f.attrs["shard_sha256"] = _file_digest(f)
            f.attrs["shard_of"] = os.path.basename(path)
            digest = str(f.attrs["shard_sha256"])
        record = {"file": os.path.relpath(mine, os.path.dirname(os.path.abspath(path))),
                  "size": os.path.getsize(mine), "sha256": digest}
    except OSError as exc:
        error = f"rank {rank}: cannot write {mine}: {exc}"
    agree_error(comm, error)
    return gather_all(comm, record)


def _add_virtual_datasets(f: h5py.File, group: str, tensors: dict, plan: dict, records: list,
                          dataset_attrs: dict) -> None:
    """The master's datasets (under ``group``): each tensor a VDS over the rank files' slabs; and the
    ``shards`` attribute that ``verify_shards`` checks."""
    for name, pieces in plan.items():
        arr = tensors[name]
        vlayout = h5py.VirtualLayout(shape=arr.shape, dtype=arr.dtype)
        for r, slab in pieces:
            slab_shape = np.empty(arr.shape, dtype=bool)[slab].shape if arr.ndim else ()
            vlayout[slab] = h5py.VirtualSource(records[r]["file"], name, shape=slab_shape)
        fill = np.nan if np.issubdtype(arr.dtype, np.floating) else np.iinfo(arr.dtype).max
        ds = f.create_virtual_dataset(group + name, vlayout, fillvalue=fill)
        ds.attrs.update(dataset_attrs.get(name, {}))
    f.attrs[SHARDS_ATTR] = json.dumps(records)


def verify_shards(f: h5py.File, path: str) -> None:
    """For a master file ``f`` (opened from ``path``): every shard it names is there, whole and the same
    as when written; a plain (unsharded) file passes.  Errors name the shard and what to do."""
    if SHARDS_ATTR not in f.attrs:
        return
    base = os.path.dirname(os.path.abspath(path))
    for rec in json.loads(f.attrs[SHARDS_ATTR]):
        shard = os.path.join(base, rec["file"])
        fix = f"restore it or write {path} again"
        if not os.path.isfile(shard):
            raise HpcllmError(f"{path}: its shard file {shard} is missing; {fix}")
        if os.path.getsize(shard) != rec["size"]:
            raise HpcllmError(f"{path}: its shard file {shard} has {os.path.getsize(shard)} bytes, not the "
                              f"{rec['size']} it was written with (truncated or changed); {fix}")
        try:
            with h5py.File(shard, "r") as s:
                digest = str(s.attrs.get("shard_sha256", ""))
        except OSError as exc:
            raise HpcllmError(f"{path}: its shard file {shard} cannot be read ({exc}); {fix}") from None
        if digest != rec["sha256"]:
            raise HpcllmError(f"{path}: its shard file {shard} was rewritten since (sha256 "
                              f"{digest[:12]}, expected {rec['sha256'][:12]}); {fix}")
