"""Follow mode (``--follow``): process the input directory's files as they land, exactly once.

Rank 0 polls the directory (inotify does not see other nodes' writes on NFS
or Lustre) in a thread, every ``--poll-s`` seconds.  A file is taken once it
is complete:

* ``--complete rename`` (default): the writer delivers it by renaming it into
  the directory, so a file under a final name is whole (as Spark's file
  source requires).  As a safety net for writers that do not, a file must
  also show the same size and mtime at two polls in a row.
* ``--complete marker``: a file is complete when ``NAME.done`` exists.

Hidden and temporary names (``.name``, ``*.tmp``, ``*.part``, ``*.done``)
are never inputs.  Admitting a file plans its shards and appends it to the
admission log (hpcllm.store.admissions) before they can be claimed; rank 0
then publishes the new shard count in the shared counters.  The dp groups
claim shard indices as in a static run; a group that claims an index not
admitted yet waits for it in its prefetch thread, so its current shard runs
on.  After each file whose shards are all done, ``results.h5`` is rebuilt
over the admitted files done so far (a prefix in admission order, replaced
atomically), whose shards are consolidated into chunk files as a finished
job's are (hpcllm.store.chunks: the last chunks merged as they grow, so
results.h5 has few sources at any time).  The job ends with exit 0 after ``--idle-exit`` seconds with no
new file and nothing left to do (or after ``--max-files``), and with 75 on
SIGUSR1/SIGTERM; a rerun continues following from the log.
"""

from __future__ import annotations

import os
import threading
import time

from hpcllm.corpus.plan import make_plan
from hpcllm.corpus.readers import Docs, format_of
from hpcllm.errors import HpcllmError
from hpcllm.executor.job import ShardData
from hpcllm.progress import log
from hpcllm.status import Status
from hpcllm.store.admissions import Admissions
from hpcllm.store.chunks import done_shards, shard_done
from hpcllm.world.counters import ADMITTED, FINAL

IGNORED_SUFFIXES = (".tmp", ".part", ".done")

END, SKIP = "end", "skip"      # what resolving a claimed index can give besides a ShardData


def candidates(directory: str, fmt: str) -> list[str]:
    """Input files in ``directory`` (recursively, sorted), without hidden or temporary names."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
                continue
            try:
                format_of(name, fmt)
            except HpcllmError:
                continue
            found.append(os.path.abspath(os.path.join(root, name)))
    return sorted(found)


class Watcher:
    """Which files of the directory are complete and not admitted yet (rank 0)."""

    def __init__(self, cfg, admitted: set[str]):
        self.directory, self.fmt, self.mode = cfg.input, cfg.format, cfg.complete
        if not os.path.isdir(self.directory):
            raise HpcllmError(f"--follow needs a directory as --input, got {self.directory}")
        self.admitted = admitted
        self.seen: dict[str, tuple] = {}     # rename mode: (size, mtime) at the previous poll
        self.first_seen: dict[str, float] = {}

    def ready(self) -> list[tuple[str, os.stat_result]]:
        out, seen = [], {}
        for path in candidates(self.directory, self.fmt):
            if path in self.admitted:
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            self.first_seen.setdefault(path, time.time())
            if self.mode == "marker":
                if os.path.exists(path + ".done"):
                    out.append((path, st))
                continue
            seen[path] = (st.st_size, st.st_mtime_ns)
            if self.seen.get(path) == seen[path]:
                out.append((path, st))
        self.seen = seen
        return out

    def waiting(self) -> list[str]:
        return [p for p in self.first_seen if p not in self.admitted]


class FollowShards:
    """The shards of a followed directory, growing while the job runs (every rank has one)."""

    def __init__(self, cfg, job, world, counters=None):
        self.cfg, self.job, self.world = cfg, job, world
        self.admissions = Admissions(cfg.output, job.model_hash(), job.config_hash())
        self.counters = counters
        self._lock = threading.Lock()
        self._thread = None
        self._halt = threading.Event()
        self.error = None

    # ------------------------------------------------------------------ every rank

    def first_pending(self) -> int:
        """Index of the first admitted shard not stored yet (where claiming starts)."""
        done = done_shards(self.cfg.output, self.admissions.shards)
        for s in self.admissions.shards:
            if s.index not in done:
                return s.index
        return len(self.admissions.shards)

    def resolve(self, i: int, stopping) -> object:
        """Shard ``i`` once admitted: SKIP if an earlier run did it, END once the job is to end."""
        while True:
            admitted, final = self.counters.get(ADMITTED), self.counters.get(FINAL)
            if i < admitted:
                break
            if 0 <= final <= i or stopping():
                return END
            time.sleep(min(0.2, self.cfg.poll_s))
        with self._lock:
            if i >= len(self.admissions.shards):
                self.admissions.reload()     # rank 0 appended to the log before publishing
            shard = self.admissions.shards[i]
            entry = self.admissions.files[shard.file_index]
        if shard_done(self.cfg.output, i):
            return SKIP
        return shard, entry

    @staticmethod
    def changed(shard, entry) -> bool:
        try:
            st = os.stat(shard.path)
        except FileNotFoundError:
            return True
        return (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns)

    @staticmethod
    def changed_rows(shard) -> ShardData:
        """A shard of a file that changed after admission: every row CHANGED, nothing read."""
        import numpy as np

        n = shard.n_docs
        base = os.path.basename(shard.path)
        lines = np.arange(shard.line_start + 1, shard.line_start + n + 1, dtype=np.int64)
        docs = Docs(texts=[b""] * n, status=np.full(n, Status.CHANGED, np.uint8),
                    doc_id=[f"{base}:{k}" for k in lines], line=lines, source=shard.path)
        return ShardData(shard, docs, np.zeros(0, np.int32), np.zeros(n + 1, np.int64), docs.status.copy())

    # ------------------------------------------------------------------ rank 0: the admitter

    def start(self, counters, stop_flag):
        self.counters = counters
        if self.world.Get_rank() != 0:
            return
        counters.set(ADMITTED, len(self.admissions.shards))
        self._stop_flag = stop_flag
        self._thread = threading.Thread(target=self._admit_loop, daemon=True)
        self._thread.start()

    def stop(self):
        self._halt.set()
        if self._thread:
            self._thread.join()
        if self.world.Get_rank() == 0:
            self.admissions.compact()

    def _admit_loop(self):
        try:
            _Admitter(self).run()
        except Exception as exc:  # noqa: BLE001 - reported by rank 0 at the end, and the job ends
            self.error = f"follow: {exc}"
            log(self.error)
            self.counters.set(FINAL, self.counters.get(ADMITTED))


class _Admitter:
    """Rank 0's thread: poll, admit, publish, rebuild results.h5, decide when the job ends."""

    def __init__(self, follow: FollowShards):
        self.f, self.cfg = follow, follow.cfg
        self.watcher = Watcher(self.cfg, {a.path for a in follow.admissions.files})
        self.last_new = time.time()
        self.done_files = 0          # admitted files (a prefix) whose shards are all done
        self.last_progress = 0.0

    def run(self):
        f, cfg = self.f, self.cfg
        while not f._halt.is_set():
            if not self.full():
                for path, st in self.watcher.ready():
                    self.admit(path, st)
                    if self.full():
                        break
            self.rebuild()
            self.progress()
            adm = len(f.admissions.shards)
            idle = time.time() - self.last_new
            all_done = self.done_files == len(f.admissions.files)
            if all_done and (self.full() or (cfg.idle_exit is not None and idle >= cfg.idle_exit)):
                f.counters.set(FINAL, adm)
                return
            f._halt.wait(cfg.poll_s)

    def full(self) -> bool:
        return self.cfg.max_files is not None and len(self.f.admissions.files) >= self.cfg.max_files

    def admit(self, path, st):
        plan = make_plan([path], self.cfg.shard_docs, fmt=self.cfg.format)
        with self.f._lock:
            entry = self.f.admissions.admit(path, st.st_size, st.st_mtime_ns, list(plan))
        self.watcher.admitted.add(path)
        self.f.counters.set(ADMITTED, len(self.f.admissions.shards))
        self.last_new = time.time()
        log(f"follow: admitted {path} ({sum(s.n_docs for s in entry.shards)} documents, "
            f"{len(entry.shards)} shards)")

    def rebuild(self):
        """results.h5 over the longest prefix of admitted files that is done, when it grew."""
        files = self.f.admissions.files
        n = self.done_files
        done = done_shards(self.cfg.output, [s for a in files[n:] for s in a.shards])
        while n < len(files) and all(s.index in done for s in files[n].shards):
            n += 1
        if n == self.done_files or not self.f.job.partial_results:
            self.done_files = n
            return
        self.done_files = n
        from hpcllm.corpus.plan import Plan

        plan = Plan([s for a in files[:n] for s in a.shards], [a.path for a in files[:n]])
        self.f.job.finish(self.cfg.output, plan, {"job": self.f.job.name, "model_hash": self.f.job.model_hash(),
                                                  "config": self.cfg.as_dict(), "follow_files_done": n,
                                                  "partial": True, "finished": time.time()})

    def progress(self):
        now = time.time()
        if self.cfg.progress <= 0 or now - self.last_progress < self.cfg.progress:
            return
        self.last_progress = now
        files = self.f.admissions.files
        waiting = self.watcher.waiting()
        pending = [a.path for a in files[self.done_files:]]
        ages = [now - self.watcher.first_seen.get(p, now) for p in waiting + pending]
        log(f"follow: {len(files)} files admitted, {self.done_files} done, {len(waiting)} waiting; "
            f"lag {max(ages, default=0):.0f} s")
