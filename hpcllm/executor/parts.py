"""Shards split into parts: several dp groups compute the batches of one shard.

A shard holding a long document (a multi-megabyte line) is one unit of work
for one group, which leaves the other groups idle while it runs.  So the
plan gives such a shard ``parts`` > 1 (``split_plan``): each part is a unit
claimed like a shard (``units``).  The group of part p reads and tokenizes
the whole shard, as every part's group does, makes the same batches (they
depend only on the tokens) and computes the p-th contiguous run of them
(``part_batches``); it writes what it computed (``Job.part_outputs``) to
``OUT/parts/``.  The group that finds every part written merges them into
its state (``Job.merge_part``) and writes the shard file as usual, so the
results are those of one group computing every batch (score joins a
document's windows in window order whoever scored them).  Part files are
units of resume like shard files; they are deleted once the shard file exists.

Which shards: plain-file shards (byte ranges known at plan time) of at least
``2 * median`` bytes, in ``bytes // median`` parts, at most
``MAX_PARTS_PER_GROUP`` per dp group; only for jobs that can merge parts
(``Job.splits_shards``) and with more than one dp group.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from hpcllm.corpus.plan import Plan
from hpcllm.store.atomic import atomic_h5
from hpcllm.store.layout import PARTS_DIR, part_file

MAX_PARTS_PER_GROUP = 4


def split_plan(plan: Plan, dp_size: int) -> Plan:
    """The plan with ``parts`` set on shards much larger (bytes) than the median one."""
    sizes = [s.byte_end - s.byte_start for s in plan if not s.compressed]
    if dp_size < 2 or len(sizes) < 2:
        return plan
    median = max(1, int(np.median(sizes)))
    most = MAX_PARTS_PER_GROUP * dp_size

    def parts(s):
        n = 1 if s.compressed else (s.byte_end - s.byte_start) // median
        return min(most, n) if n >= 2 else 1
    return Plan([dataclasses.replace(s, parts=parts(s)) for s in plan], plan.inputs)


def part_path(out_dir: str, shard) -> str:
    return part_file(out_dir, shard.index, shard.part, shard.parts)


def units(out_dir: str, shard) -> list:
    """The work units of a shard not done yet: its parts without a file (a shard of one part: itself).
    Every part written but no shard file (killed while merging): its last part again, to merge."""
    if shard.parts == 1:
        return [shard]
    every = [dataclasses.replace(shard, part=p) for p in range(shard.parts)]
    todo = [u for u in every if not os.path.exists(part_path(out_dir, u))]
    return todo or every[-1:]


def part_batches(n_batches: int, part: int, parts: int) -> range:
    """Part ``part``'s contiguous run of a shard's ``n_batches`` batches (the runs cover them all)."""
    return range(n_batches * part // parts, n_batches * (part + 1) // parts)


def write_part(out_dir: str, shard, arrays: dict, attrs: dict) -> None:
    os.makedirs(os.path.join(out_dir, PARTS_DIR), exist_ok=True)
    with atomic_h5(part_path(out_dir, shard)) as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        for k, v in attrs.items():
            f.attrs[k] = v


def read_parts(out_dir: str, shard) -> list[tuple[dict, dict]] | None:
    """Every part's (arrays, attrs), in part order; None while some part is not written yet."""
    import h5py

    paths = [part_path(out_dir, dataclasses.replace(shard, part=p)) for p in range(shard.parts)]
    if not all(os.path.exists(p) for p in paths):
        return None
    out = []
    for p in paths:
        with h5py.File(p, "r") as f:
            out.append(({k: f[k][:] for k in f}, dict(f.attrs)))
    return out


def remove_parts(out_dir: str, shard) -> None:
    for p in range(shard.parts):
        try:
            os.unlink(part_path(out_dir, dataclasses.replace(shard, part=p)))
        except FileNotFoundError:
            pass
