"""`hpcllm report`: statistics of results dirs in one streaming pass, a text summary and an HTML page.

What is computed (``collect``), in one pass over blocks of rows:

* status counts over all rows, and the first ``EXAMPLES`` rows of each non-ok
  status (their doc ids are read at the end, a few rows each);
* every numeric column: a ``Sketch`` (quantiles within 2**-8 relative, exact
  moments) over the rows the job processed (status not bad_json /
  missing_field / too_long / missing), NaN skipped;
* every enum column (uint8/int with names, e.g. generate's finish_reason,
  classify's label): counts per code over processed rows;
* vectors (embedding): a Sketch of the L2 norms and an evenly strided sample
  of ``SAMPLE`` rows for a 2-D PCA projection, of quantised vectors dequantised
  (``columns.dequantize``; the int8 scale column is numeric, so it is read anyway);
* ragged columns (token_logprobs, output_ids): Sketches of row lengths and of
  the values;
* dedup's columns (``dup_cluster``, ``keep``): duplicates, the cluster size
  histogram and the duplicate rate per source file (``DupStats``);
* per dir: throughput and the per-rank phase breakdown from the ``timings``
  attribute, per-shard durations from the shard files' (kept in their chunks) ``seconds`` / ``rank``
  / ``dp_rank`` / ``started_at`` attributes when the executor wrote them, and
  provenance.
"""

from __future__ import annotations

import os

import numpy as np

from hpcllm.analysis.columns import Ragged, Results, dequantize, distinct_columns
from hpcllm.analysis.page import write_page
from hpcllm.analysis.sketch import RELATIVE_ERROR, Sketch
from hpcllm.analysis.stats import fmt, sketch_stats
from hpcllm.status import Status
from hpcllm.store.chunks import shard_attrs

EXAMPLES = 5
SAMPLE = 2000
UNPROCESSED = np.array([Status.BAD_JSON, Status.MISSING_FIELD, Status.TOO_LONG, Status.MISSING], np.uint8)
SKIP = {"status", "line", "source", "doc_id", "dup_cluster", "dup_of"}   # ids, not quantities
SHARD_ATTRS = ("seconds", "rank", "dp_rank", "tp_rank", "host", "started_at", "finished_at", "docs", "tokens")


class Collector:
    """Streaming state of every statistic the report shows."""

    def __init__(self, res: Results):
        self.res = res
        self.status = np.zeros(256, np.int64)
        self.examples: dict[int, list[int]] = {}
        self.numeric, self.enums, self.vectors, self.ragged = {}, {}, {}, {}
        for name in distinct_columns(res):
            info = res.info(name)
            if name.split(".")[-1] in SKIP or info.kind == "string":
                continue
            if info.kind == "numeric":
                self.numeric[name] = Sketch()
            elif info.kind == "enum":
                self.enums[name] = np.zeros(max(256, len(info.names or ())), np.int64)
            elif info.kind == "vector":
                step = max(1, -(-res.n_rows // SAMPLE))
                self.vectors[name] = {"norm": Sketch(), "step": step, "sample": [], "status": []}
            elif info.kind == "ragged":
                self.ragged[name] = {"length": Sketch(), "values": Sketch()}
        self.names = ["status", *self.numeric, *self.enums, *self.vectors, *self.ragged]
        self.dups = DupStats() if {"dup_cluster", "keep", "source"} <= set(res.columns) else None
        if self.dups:
            self.names += [n for n in ("dup_cluster", "keep", "source") if n not in self.names]

    def add(self, rows: slice, block: dict) -> None:
        st = block["status"]
        self.status += np.bincount(st, minlength=256)
        for code in np.unique(st[st != Status.OK]):
            have = self.examples.setdefault(int(code), [])
            if len(have) < EXAMPLES:
                have += (rows.start + np.flatnonzero(st == code)[:EXAMPLES - len(have)]).tolist()
        done = ~np.isin(st, UNPROCESSED)
        for n, sk in self.numeric.items():
            sk.add(block[n][done])
        for n, counts in self.enums.items():
            v = block[n][done].astype(np.int64)
            v = v[(v >= 0) & (v < len(counts))]
            counts += np.bincount(v, minlength=len(counts))
        for n, state in self.vectors.items():
            info = self.res.info(n)
            x = dequantize(info, block[n], block[info.scale] if info.scale else None)
            self._add_vector(rows, x, st, done, state)
        if self.dups:
            self.dups.add(block)
        for n, state in self.ragged.items():
            r: Ragged = block[n]
            state["length"].add(r.lengths()[done])
            state["values"].add(r.values)

    @staticmethod
    def _add_vector(rows, x, st, done, state):
        x = np.where(done[:, None], np.asarray(x, np.float32), np.nan)   # a quantised fill is no vector
        state["norm"].add(np.linalg.norm(x[done], axis=1))
        step = state["step"]
        first = (-rows.start) % step
        pick = np.arange(first, len(x), step)
        state["sample"].append(x[pick])
        state["status"].append(st[pick])


class DupStats:
    """dedup's results: the rows of each cluster, and rows and duplicates (keep false) per source file."""

    def __init__(self):
        self.clusters, self.rows, self.dups = [], np.zeros(0, np.int64), np.zeros(0, np.int64)

    def add(self, block: dict) -> None:
        cl, src = block["dup_cluster"], block["source"].astype(np.int64)
        self.clusters.append(cl[cl >= 0])
        n = max(len(self.rows), int(src.max(initial=-1)) + 1)
        self.rows = np.pad(self.rows, (0, n - len(self.rows))) + np.bincount(src[src >= 0], minlength=n)
        dup = src[(~block["keep"].astype(bool)) & (src >= 0)]
        self.dups = np.pad(self.dups, (0, n - len(self.dups))) + np.bincount(dup, minlength=n)

    def summary(self, sources: list) -> dict:
        """Duplicates, clusters, cluster sizes binned by powers of two (2, 3-4, 5-8, ...), rate per source."""
        ids = np.concatenate(self.clusters) if self.clusters else np.zeros(0, np.int64)
        sizes = np.unique(ids, return_counts=True)[1]
        bins, lo = {}, 2
        while lo <= sizes.max(initial=0):
            hi = 2 if lo == 2 else 2 * (lo - 1)
            n = int(((sizes >= lo) & (sizes <= hi)).sum())
            if n:
                bins[str(lo) if lo == hi else f"{lo}-{hi}"] = n
            lo = hi + 1
        names = [sources[i] if i < len(sources) and sources[i] else str(i) for i in range(len(self.rows))]
        short = [os.path.basename(n) for n in names]
        names = short if len(set(short)) == len(short) else names     # full paths where base names repeat
        return {"duplicates": int(self.dups.sum()), "clusters": len(sizes), "cluster_sizes": bins,
                "per_source": {n: {"rows": int(r), "duplicates": int(d), "rate": d / max(r, 1)}
                               for n, r, d in zip(names, self.rows, self.dups)}}


def collect(res: Results) -> Collector:
    c = Collector(res)
    for rows, block in res.blocks(c.names):
        c.add(rows, block)
    return c


def _examples(res: Results, examples: dict[int, list[int]]) -> dict[str, list[str]]:
    out = {}
    if "doc_id" not in res.columns:
        return out
    for code, rows in sorted(examples.items()):
        name = Status(code).name if code in Status._value2member_map_ else f"code_{code}"
        out[name] = [str(res.read(["doc_id"], r, r + 1)["doc_id"][0]) for r in rows]
    return out


def _enum_counts(info, counts) -> dict[str, int]:
    names = info.names or []
    return {(names[c] if c < len(names) and names[c] else str(c)): int(counts[c]) for c in np.flatnonzero(counts)}


def _projection(state) -> tuple[np.ndarray, np.ndarray]:
    """The sampled rows' first two principal components (rows with NaN left out) and their status."""
    x = np.concatenate(state["sample"]) if state["sample"] else np.zeros((0, 2), np.float32)
    st = np.concatenate(state["status"]) if state["status"] else np.zeros(0, np.uint8)
    keep = np.isfinite(x).all(axis=1)
    x, st = x[keep].astype(np.float64), st[keep]
    if len(x) < 3:
        return np.zeros((0, 2)), st[:0]
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T, st


def shard_timings(d) -> list[dict]:
    """Per-shard attributes the executor records (``SHARD_ATTRS``), for the shards that have ``seconds``
    (read from the shard files, or the chunks they were consolidated into)."""
    out = []
    for a in shard_attrs(d.path):
        if "seconds" in a:
            out.append({"shard": int(a["shard_index"]), "n_docs": int(a["n_docs"]),
                        **{k: a[k].item() if hasattr(a[k], "item") else a[k] for k in SHARD_ATTRS if k in a}})
    return sorted(out, key=lambda r: r["shard"])


def throughput(attrs: dict) -> dict:
    """Docs/s and tokens/s of a job from its per-rank timings (wall = the slowest rank's phase sum)."""
    rows = attrs.get("timings") or []
    if not isinstance(rows, list) or not rows:
        return {}
    wall = max(sum((r.get("seconds") or {}).values()) for r in rows) or float("nan")
    leaders = [r for r in rows if not r.get("tp_rank")]          # tp ranks of a group share its documents
    docs, tokens = sum(int(r.get("docs", 0)) for r in leaders), sum(int(r.get("tokens", 0)) for r in leaders)
    return {"wall_s": wall, "docs": docs, "tokens": tokens, "docs_per_s": docs / wall, "tokens_per_s": tokens / wall}


def summarize(res: Results, c: Collector) -> dict:
    """Everything the page and the text summary show, as plain JSON-able values."""
    out = {"n_rows": res.n_rows, "relative_error": RELATIVE_ERROR,
           "status_counts": _enum_counts(res.info("status"), c.status),
           "examples": _examples(res, c.examples),
           "numeric": {n: sketch_stats(sk) for n, sk in c.numeric.items()},
           "enums": {n: _enum_counts(res.info(n), counts) for n, counts in c.enums.items()},
           "vectors": {n: {"norm": sketch_stats(s["norm"]), "dim": res.info(n).width} for n, s in c.vectors.items()},
           "ragged": {n: {k: sketch_stats(s[k]) for k in ("length", "values")} for n, s in c.ragged.items()},
           "dirs": []}
    if c.dups:
        out["dedup"] = c.dups.summary(res.dirs[0].sources)
    for d in res.dirs:
        a = d.attrs
        out["dirs"].append({"path": d.path, "job": d.job, "throughput": throughput(a),
                            "timings": a.get("timings") or [], "shards": shard_timings(d),
                            "provenance": {k: a.get(k) for k in ("job", "model", "model_hash", "model_source",
                                                                 "code_version", "world", "slurm", "finished",
                                                                 "config", "sources") if k in a}})
    return out


def text_summary(s: dict) -> str:
    lines = [f"{s['n_rows']} rows; status: " + ", ".join(f"{k} {v}" for k, v in s["status_counts"].items())]
    for k, ids in s["examples"].items():
        lines.append(f"  {k}: e.g. {', '.join(ids)}")
    for n, st in {**s["numeric"], **{f"{n} norm": v["norm"] for n, v in s["vectors"].items()},
                  **{f"{n} length": v["length"] for n, v in s["ragged"].items()}}.items():
        q = st["quantiles"]
        lines.append(f"  {n}: n={st['count']} mean={fmt(st['mean'])} p5={fmt(q.get('0.05'))} "
                     f"p50={fmt(q.get('0.5'))} p95={fmt(q.get('0.95'))} max={fmt(q.get('1'))}")
    for n, counts in s["enums"].items():
        lines.append(f"  {n}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if "dedup" in s:
        dd = s["dedup"]
        lines.append(f"  duplicates: {dd['duplicates']} of {s['n_rows']} rows in {dd['clusters']} clusters; cluster "
                     "sizes: " + ", ".join(f"{k}: {v}" for k, v in dd["cluster_sizes"].items()))
        lines += [f"  {name}: {100 * v['rate']:.2f} % duplicates ({v['duplicates']} of {v['rows']})"
                  for name, v in dd["per_source"].items()]
    for d in s["dirs"]:
        t = d["throughput"]
        if t:
            lines.append(f"{d['job']} {d['path']}: {t['docs']} docs in {t['wall_s']:.1f} s "
                         f"({t['docs_per_s']:.1f} docs/s, {t['tokens_per_s']:.0f} tokens/s)")
        if not d["shards"]:
            lines.append(f"  per-shard durations: not recorded in {d['path']}/shards (no 'seconds' attribute)")
    return "\n".join(lines)


def report(paths, output: str | None = None) -> tuple[str, str]:
    """Write ``index.html`` and its PNGs to ``output`` (default FIRST_DIR/report); returns (page, text)."""
    res = Results(paths)
    c = collect(res)
    s = summarize(res, c)
    output = output or os.path.join(res.dirs[0].path, "report")
    os.makedirs(output, exist_ok=True)
    projections = {n: _projection(state) for n, state in c.vectors.items()}
    page = write_page(output, s, c, projections)
    return page, text_summary(s) + f"\nwrote {page}"
