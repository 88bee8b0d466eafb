"""Follow mode's record of admitted files: exactly once, across kills and requeues, compacted.

A followed output directory holds::

    OUT/manifest.json      a snapshot in the ordinary manifest format (hpcllm.store.manifest),
                           so every reader of a static run reads it too, plus ``follow``:
                           each admitted file's size and mtime
    OUT/admissions.jsonl   the admissions since that snapshot, one JSON line each, appended
                           and fsynced before the file's shards are handed out

A file is in the log before any of its shards can be claimed, so a rerun
never admits it again.  Every ``COMPACT_EVERY`` admissions (and at the end of
a run) the log is folded into a new snapshot and emptied: the log stays
short however long the job follows (the growth of Spark's file-source
metadata log is a known complaint).  A crash between the two steps leaves
lines the snapshot already holds; they are recognised by their file index
and ignored, as is a last line cut short.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

from hpcllm import __version__
from hpcllm.corpus.plan import Plan, Shard
from hpcllm.errors import HpcllmError
from hpcllm.store.atomic import write_text
from hpcllm.store.layout import ADMISSIONS_NAME, MANIFEST_NAME
from hpcllm.store.manifest import MANIFEST_FORMAT, MANIFEST_VERSION

COMPACT_EVERY = 64


@dataclasses.dataclass
class Admitted:
    path: str
    size: int
    mtime_ns: int
    shards: list   # of Shard


class Admissions:
    """The admitted files of one followed output directory (read on any rank, written by rank 0)."""

    def __init__(self, out_dir: str, model_hash: str, config_hash: str):
        self.out_dir, self.model_hash, self.config_hash = out_dir, model_hash, config_hash
        self.files: list[Admitted] = []
        self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._since_compact = 0
        self.reload()

    # ------------------------------------------------------------------ reading

    @property
    def shards(self) -> list[Shard]:
        return [s for f in self.files for s in f.shards]

    def plan(self) -> Plan:
        return Plan(self.shards, [f.path for f in self.files])

    def n_rows(self) -> int:
        return sum(s.n_docs for f in self.files for s in f.shards)

    def reload(self) -> None:
        """Read the snapshot and the log (again): what every rank knows of the admitted files."""
        path = os.path.join(self.out_dir, MANIFEST_NAME)
        self.files = []
        if os.path.exists(path):
            self._read_snapshot(path)
        self._since_compact = 0
        for rec in self._log_records():
            if rec["file_index"] == len(self.files):       # lines the snapshot holds are skipped
                self.files.append(_admitted(rec))
                self._since_compact += 1

    def _read_snapshot(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            follow = d["follow"]
        except (OSError, ValueError, KeyError) as e:
            raise HpcllmError(f"{path} is not the manifest of a followed directory ({e!r}); "
                              "use a new --output for --follow") from None
        for key, mine in (("model_hash", self.model_hash), ("config_hash", self.config_hash)):
            if d.get(key) != mine:
                raise HpcllmError(f"{path} was written with {key} {str(d.get(key))[:16]}, this run has "
                                  f"{mine[:16]}; use a new --output")
        self.created = d.get("created", self.created)
        by_file = {}
        for s in d["shards"]:
            by_file.setdefault(s["file_index"], []).append(Shard(**s))
        for i, (p, rec) in enumerate(zip(d["inputs"], follow["files"])):
            self.files.append(Admitted(p, rec["size"], rec["mtime_ns"], by_file.get(i, [])))

    def _log_records(self):
        try:
            with open(os.path.join(self.out_dir, ADMISSIONS_NAME), encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return
        for line in lines:
            try:
                yield json.loads(line)
            except ValueError:      # the empty tail, or a line a crash cut short
                continue

    # ------------------------------------------------------------------ writing (rank 0)

    def admit(self, path: str, size: int, mtime_ns: int, shards: list[Shard]) -> Admitted:
        """Append one admitted file (its shards numbered after all before it), durably."""
        index, row = len(self.shards), self.n_rows()
        fi = len(self.files)
        shards = [dataclasses.replace(s, index=index + k, row_start=row + s.row_start, file_index=fi)
                  for k, s in enumerate(shards)]
        entry = Admitted(path, size, mtime_ns, shards)
        rec = {"file_index": fi, "path": path, "size": size, "mtime_ns": mtime_ns,
               "shards": [dataclasses.asdict(s) for s in shards]}
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, ADMISSIONS_NAME), "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.files.append(entry)
        self._since_compact += 1
        if self._since_compact >= COMPACT_EVERY:
            self.compact()
        return entry

    def compact(self) -> None:
        """Fold the log into a new snapshot, then empty the log (both atomic)."""
        plan = self.plan()
        d = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
             "shards": [dataclasses.asdict(s) for s in plan], "inputs": plan.inputs,
             "input_sizes": [f.size for f in self.files], "model_hash": self.model_hash,
             "config_hash": self.config_hash, "code_version": __version__, "created": self.created,
             "follow": {"files": [{"size": f.size, "mtime_ns": f.mtime_ns} for f in self.files]}}
        os.makedirs(self.out_dir, exist_ok=True)
        write_text(os.path.join(self.out_dir, MANIFEST_NAME), json.dumps(d, indent=1))
        write_text(os.path.join(self.out_dir, ADMISSIONS_NAME), "")
        self._since_compact = 0


def _admitted(rec: dict) -> Admitted:
    return Admitted(rec["path"], rec["size"], rec["mtime_ns"], [Shard(**s) for s in rec["shards"]])
