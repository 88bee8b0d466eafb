"""Progress lines and the end-of-job timing breakdown (rank 0 prints)."""

import os
import sys
import threading
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
    """Rank 0's periodic line: documents, tokens, tokens/s, ETA (from the world's shared counters).

    The ETA is by tokens: the tokens of the shards loaded so far, and for the
    documents not loaded yet as many per document as those had (exact once
    every shard is loaded; shown with ``~`` until then).  Jobs report tokens
    per batch (``Job.batch_progress``), so the line moves during a long
    document; it is printed by a thread (``start``), also while rank 0
    computes or waits.
    """

    def __init__(self, total_docs: int, every_s: float):
        self.total = max(1, total_docs)
        self.every = every_s
        self.start_time = time.perf_counter()
        self.last = self.start_time

    def maybe_print(self, docs: int, tokens: int, loaded_docs: int = 0, loaded_tokens: int = 0,
                    force: bool = False):
        now = time.perf_counter()
        if not force and (self.every <= 0 or now - self.last < self.every):
            return
        self.last = now
        log(self.line(docs, tokens, loaded_docs, loaded_tokens, now - self.start_time))

    def line(self, docs, tokens, loaded_docs, loaded_tokens, elapsed) -> str:
        elapsed = max(elapsed, 1e-9)
        rate = tokens / elapsed
        if loaded_docs:
            total_tokens = loaded_tokens + (self.total - loaded_docs) * loaded_tokens / loaded_docs
            eta = max(0.0, total_tokens - tokens) / rate if rate > 0 else float("inf")
            approx = "~" if loaded_docs < self.total else ""
            tok = f"{_fmt_n(tokens)}/{approx}{_fmt_n(total_tokens)} tokens"
        else:   # nothing loaded yet (or no loading counts): by documents
            eta = (self.total - docs) / (docs / elapsed) if docs else float("inf")
            tok = f"{_fmt_n(tokens)} tokens"
        return (f"{docs}/{self.total} docs ({100 * docs / self.total:.1f}%), {tok}, {rate:,.0f} tokens/s, "
                f"{docs / elapsed:,.1f} docs/s, ETA {_fmt_s(eta)}")

    def start(self, read):
        """Print every ``every_s`` seconds from a thread, ``read()`` giving maybe_print's counts;
        returns a function that stops the thread (None when there is no periodic line)."""
        if self.every <= 0:
            return None
        stop = threading.Event()

        def tick():
            while not stop.wait(self.every):
                self.maybe_print(*read(), force=True)

        thread = threading.Thread(target=tick, daemon=True, name="hpcllm-progress")
        thread.start()

        def end():
            stop.set()
            thread.join()
        return end


def _fmt_n(n: float) -> str:
    n = float(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_s(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def breakdown_table(rows: list[dict]) -> str:
    """Per-rank seconds per phase, one line per rank; a mixture-of-experts model adds each rank's
    expert load (token x expert products its own experts computed, padding included)."""
    experts = any("expert_tokens" in r for r in rows)
    head = ("rank  " + "".join(f"{p:>10}" for p in PHASES) + f"{'docs':>10}{'shards':>8}{'weights MiB':>12}{'peak MiB':>10}"
            + (f"{'expert load':>13}" if experts else ""))
    lines = [head]
    for r in rows:
        lines.append(f"{r['rank']:>4}  " + "".join(f"{r['seconds'][p]:>10.2f}" for p in PHASES)
                     + f"{r['docs']:>10}{r['shards']:>8}{r['weights_mb']:>12.1f}{r['peak_rss_mb']:>10.0f}"
                     + (f"{r.get('expert_tokens', 0):>13}" if experts else ""))
    return "\n".join(lines)
