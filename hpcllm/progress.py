"""Progress lines and the end-of-job timing breakdown (rank 0 prints)."""

import os
import sys
import time
from contextlib import contextmanager

PHASES = ("read", "tokenize", "compute", "comm", "write", "idle")


class Timers:
    """Seconds per phase on this rank."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def log(msg: str):
    sys.stderr.flush()
    os.write(2, f"[hpcllm] {msg}\n".encode())


class Progress:
    """Rank 0's periodic line: documents, tokens/s, ETA (from the world's shared counters)."""

    def __init__(self, total_docs: int, every_s: float):
        self.total = max(1, total_docs)
        self.every = every_s
        self.start = time.perf_counter()
        self.last = self.start

    def maybe_print(self, docs: int, tokens: int, force: bool = False):
        now = time.perf_counter()
        if not force and (self.every <= 0 or now - self.last < self.every):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = docs / elapsed
        eta = (self.total - docs) / rate if rate > 0 else float("inf")
        log(f"{docs}/{self.total} docs ({100 * docs / self.total:.1f}%), {tokens / elapsed:,.0f} tokens/s, "
            f"{rate:,.1f} docs/s, ETA {_fmt_s(eta)}")


def _fmt_s(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def breakdown_table(rows: list[dict]) -> str:
    """Per-rank seconds per phase, one line per rank."""
    head = "rank  " + "".join(f"{p:>10}" for p in PHASES) + f"{'docs':>10}{'shards':>8}{'weights MiB':>12}{'peak MiB':>10}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['rank']:>4}  " + "".join(f"{r['seconds'][p]:>10.2f}" for p in PHASES)
                     + f"{r['docs']:>10}{r['shards']:>8}{r['weights_mb']:>12.1f}{r['peak_rss_mb']:>10.0f}")
    return "\n".join(lines)
