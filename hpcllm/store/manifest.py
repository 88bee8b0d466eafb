"""The manifest of an output directory: what it was planned for, so a rerun resumes or is refused.

``OUT/manifest.json`` holds the shard plan (hpcllm.corpus.plan), the input
files with their sizes, the model's content hash and the hash of the options
that change results.  A rerun with the same output directory reuses the plan
and skips shards whose rows are stored (``completed_shards``: shard files
appear only when complete, chunks hold finished ones); a changed model, option or input file is refused with one
line.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass

from hpcllm import __version__
from hpcllm.corpus.plan import Plan, Shard
from hpcllm.errors import HpcllmError
from hpcllm.store.atomic import write_text
from hpcllm.store.chunks import done_shards
from hpcllm.world.collective import on_root
from hpcllm.store.layout import MANIFEST_NAME

MANIFEST_FORMAT = "hpcllm-manifest"
MANIFEST_VERSION = 1


@dataclass
class Manifest:
    """What a run's output directory was planned for; reused on resume."""
    shards: list[Shard]    # a Plan
    inputs: list[str]
    input_sizes: list[int]
    model_hash: str
    config_hash: str
    code_version: str
    created: str
    path: str = ""

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("path")
        return json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **d}, indent=1)


def hash_config(options: dict) -> str:
    """sha256 of the job options that affect results (canonical JSON)."""
    import hashlib
    blob = json.dumps(options, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_manifest(path: str) -> Manifest | None:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HpcllmError(f"{path} is not a readable hpcllm manifest ({e}); use a new --output") from None
    if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
        raise HpcllmError(f"{path} is not an hpcllm manifest; use a new --output")
    if d.get("version") != MANIFEST_VERSION:
        raise HpcllmError(f"{path} has manifest version {d.get('version')}, this hpcllm reads "
                          f"version {MANIFEST_VERSION}; use a new --output")
    try:
        shards = [Shard(**s) for s in d["shards"]]
        return Manifest(shards=Plan(shards, d["inputs"]), inputs=d["inputs"], input_sizes=d["input_sizes"],
                        model_hash=d["model_hash"], config_hash=d["config_hash"],
                        code_version=d["code_version"], created=d["created"], path=path)
    except (KeyError, TypeError) as e:
        raise HpcllmError(f"{path} is a damaged hpcllm manifest ({e!r}); use a new --output") from None


def _mismatch(m: Manifest, model_hash: str, config_hash: str, inputs: list[str] | None) -> str | None:
    """One line saying how this run differs from the manifest ``m``, or None."""
    p = m.path
    if m.model_hash != model_hash:
        return f"{p} was written for model sha {m.model_hash[:16]}, this run uses {model_hash[:16]}; use a new --output"
    if m.config_hash != config_hash:
        return (f"{p} was written with job config hash {m.config_hash[:16]}, this run has {config_hash[:16]} "
                "(options that change results differ); use a new --output")
    if inputs is None:
        return None
    if len(inputs) != len(m.inputs):
        return f"{p} was written for {len(m.inputs)} input files, this run has {len(inputs)}; use a new --output"
    for i, (old, new) in enumerate(zip(m.inputs, inputs)):
        if old != new:
            return f"{p} was written for input {old}, this run has {new} in its place; use a new --output"
        size = os.path.getsize(new)
        if size != m.input_sizes[i]:
            return (f"{p} was written when {new} had {m.input_sizes[i]} bytes, it now has {size}; "
                    "use a new --output")
    return None


def load_or_create_manifest(out_dir: str, plan_fn, model_hash: str, config_hash: str,
                            comm=None, inputs: list[str] | None = None) -> Manifest:
    """Reuse ``<out>/manifest.json`` if it matches this run, else plan and write it.

    Collective when ``comm`` is given (``plan_fn`` is then called on every rank,
    so it may itself be collective, e.g. ``lambda: make_plan(files, comm=comm)``).
    ``inputs`` (the expanded input list) is compared with the manifest's, with
    file sizes, so a changed corpus is refused; when None it is not checked on
    resume, and recorded from the plan (``Plan.inputs``) on creation.
    """
    path = os.path.join(out_dir, MANIFEST_NAME)

    def check():
        found = read_manifest(path)
        if found is not None:
            why = _mismatch(found, model_hash, config_hash, inputs)
            if why:
                raise HpcllmError(why)
        return found
    found = on_root(comm, check)
    if found is not None:
        return found
    shards = plan_fn()
    if inputs is None:
        inputs = getattr(shards, "inputs", None) or list(dict.fromkeys(s.path for s in shards))

    def create():
        os.makedirs(out_dir, exist_ok=True)
        m = Manifest(shards=Plan(shards, inputs), inputs=list(inputs), input_sizes=[os.path.getsize(p) for p in inputs],
                     model_hash=model_hash, config_hash=config_hash, code_version=__version__,
                     created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     path=path)
        write_text(path, m.to_json())
        return m
    return on_root(comm, create)


def completed_shards(out_dir: str, plan: list[Shard]) -> set[int]:
    """Indices of shards whose rows are stored: their file exists (files appear only when complete),
    or a chunk holds them (hpcllm.store.chunks)."""
    return done_shards(out_dir, plan)
