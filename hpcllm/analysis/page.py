"""The report's ``index.html``: one self-contained page (inline CSS, PNGs next to it by
relative name, no script or font from anywhere), with every number it shows also
embedded as JSON in ``<script type="application/json" id="report-data">``."""

from __future__ import annotations

import datetime
import html
import json
import os

from hpcllm.analysis import plots
from hpcllm.analysis.stats import QUANTILES, fmt
from hpcllm.progress import PHASES
from hpcllm.store.atomic import write_text

CSS = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;margin-top:1.6em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.4em 0;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}.fig{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.fig>img{flex:0 0 auto;max-width:100%;height:auto}code{font-size:.9em}.note{color:#666}"""


def _e(v) -> str:
    return html.escape(str(v))


def _table(header: list, rows: list, left: int = 1) -> str:
    th = "".join(f"<th class='{'l' if i < left else ''}'>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{_e(fmt(v))}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(name: str | None, alt: str) -> str:
    return f"<img src='{_e(name)}' alt='{_e(alt)}'>" if name else ""


def _stats_rows(stats: dict) -> list:
    out = []
    for name, st in stats.items():
        q = st["quantiles"]
        out.append([name, st["count"], st["nan"], st["mean"], st["std"], *(q.get(f"{p:g}") for p in QUANTILES)])
    return out


def _columns_section(out: str, s: dict, c) -> str:
    header = ["column", "count", "NaN", "mean", "std", *(f"p{p * 100:g}" for p in QUANTILES)]
    stats = dict(s["numeric"])
    stats.update({f"{n} (L2 norm)": v["norm"] for n, v in s["vectors"].items()})
    for n, v in s["ragged"].items():
        stats[f"{n} (values per row)"] = v["length"]
        stats[f"{n} (values)"] = v["values"]
    parts = ["<h2>Per-document columns</h2>",
             f"<p class='note'>Quantiles from a streaming bit-pattern histogram: within "
             f"{s['relative_error'] * 100:.2g} % (relative) of the exact value; counts, mean and std are exact. "
             "Rows the job did not process (bad_json, missing_field, too_long) are left out.</p>",
             _table(header, _stats_rows(stats)), "<div class='fig'>"]
    for n, sk in c.numeric.items():
        parts.append(_img(plots.histogram(out, n, sk), n))
    for n, st in c.vectors.items():
        parts.append(_img(plots.histogram(out, f"{n}-norm", st["norm"], "L2 norm of the embedding"), n))
    for n, st in c.ragged.items():
        parts.append(_img(plots.histogram(out, f"{n}-length", st["length"], f"{n}: values per document"), n))
        parts.append(_img(plots.histogram(out, n, st["values"], ylabel="values (all documents)"), n))
    for n, counts in s["enums"].items():
        parts.append(_img(plots.counts_bar(out, n, counts), n))
    return "".join(parts) + "</div>"


def _job_section(out: str, d: dict) -> str:
    prov = d["provenance"]
    parts = [f"<h2>Job: {_e(d['job'])} <code>{_e(d['path'])}</code></h2>"]
    rows = []
    for k, v in prov.items():
        if k == "finished" and isinstance(v, (int, float)):
            v = datetime.datetime.fromtimestamp(v, datetime.timezone.utc).isoformat(timespec="seconds")
        rows.append([k, json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v])
    parts.append("<h3>Provenance</h3>" + _table(["attribute", "value"], rows, left=2))
    t = d["throughput"]
    if t:
        parts.append(f"<h3>Throughput</h3><p>{t['docs']:,} documents, {t['tokens']:,} tokens in "
                     f"{t['wall_s']:.2f} s (slowest rank): <b>{t['docs_per_s']:.1f} docs/s</b>, "
                     f"<b>{t['tokens_per_s']:.0f} tokens/s</b></p>")
    if d["timings"]:
        header = ["rank", "dp", "tp", *PHASES, "docs", "tokens", "shards", "peak RSS MiB", "weights MiB"]
        trs = [[r.get("rank"), r.get("dp_rank"), r.get("tp_rank"),
                *((r.get("seconds") or {}).get(p) for p in PHASES), r.get("docs"), r.get("tokens"),
                r.get("shards"), r.get("peak_rss_mb"), r.get("weights_mb")] for r in d["timings"]]
        parts.append("<h3>Time per rank (seconds)</h3>" + _table(header, trs))
    parts.append("<div class='fig'>" + _img(plots.phases(out, d["job"], d["timings"]), "phases"))
    if d["shards"]:
        parts.append(_img(plots.shards(out, d["job"], d["shards"]), "shards") + "</div>")
        keys = sorted({k for r in d["shards"] for k in r})
        slow = sorted(d["shards"], key=lambda r: -float(r["seconds"]))[:10]
        parts.append("<h3>Slowest shards</h3>" + _table(keys, [[r.get(k) for k in keys] for r in slow]))
    else:
        parts.append("</div><p class='note'>Per-shard durations were not recorded by this job "
                     "(no <code>seconds</code> attribute on the shard files).</p>")
    return "".join(parts)


def _dedup_section(s: dict) -> str:
    """dedup's results (``report.DupStats``): cluster sizes and the duplicate rate per source; else nothing."""
    d = s.get("dedup")
    if not d:
        return ""
    return (f"<h2>Duplicates: {d['duplicates']:,} rows in {d['clusters']:,} clusters</h2>"
            + _table(["cluster size", "clusters"], [[k, v] for k, v in d["cluster_sizes"].items()])
            + _table(["source", "rows", "duplicates", "rate"],
                     [[k, v["rows"], v["duplicates"], f"{100 * v['rate']:.2f} %"] for k, v in d["per_source"].items()]))


def write_page(out: str, s: dict, c, projections: dict) -> str:
    counts = s["status_counts"]
    total = max(1, s["n_rows"])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>hpcllm report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>hpcllm report: {', '.join(_e(d['job']) for d in s['dirs'])}, {s['n_rows']:,} documents</h1>",
             "<h2>Status</h2>",
             _table(["status", "documents", "share", "examples (doc id)"],
                    [[k, v, f"{100 * v / total:.2f} %", ", ".join(s["examples"].get(k, []))]
                     for k, v in counts.items()]),
             "<div class='fig'>" + _img(plots.counts_bar(out, "status", {k.lower(): v for k, v in counts.items()},
                                                        "documents per status"), "status") + "</div>",
             _columns_section(out, s, c), _dedup_section(s)]
    for n, (xy, st) in projections.items():
        parts.append(f"<h2>{_e(n)}: projection</h2><div class='fig'>"
                     + _img(plots.projection(out, n, xy, st, c.res.info("status").names), n) + "</div>")
    parts += [_job_section(out, d) for d in s["dirs"]]
    data = json.dumps(s, default=str).replace("</", "<\\/")
    parts.append(f"<script type='application/json' id='report-data'>{data}</script></body></html>")
    return write_text(os.path.join(out, "index.html"), "".join(parts))
