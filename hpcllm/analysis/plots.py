"""The report's PNG plots (matplotlib, Agg backend): one function per kind of plot, each
writing ``OUT/NAME.png`` and returning the file name (relative to the page)."""

from __future__ import annotations

import os

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hpcllm.analysis.sketch import Sketch  # noqa: E402
from hpcllm.progress import PHASES  # noqa: E402

COLORS = dict(zip(PHASES, ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#bab0ac")))
UNITS = {"n_tokens": "tokens per document", "n_scored": "scored tokens per document",
         "perplexity": "perplexity (exp of mean negative log-likelihood per token)",
         "logprob_sum": "log-probability of the document (nats)", "n_generated": "generated tokens",
         "n_prompt_tokens": "prompt tokens", "top_p": "probability of the top class",
         "token_logprobs": "log-probability per token (nats)", "output_ids": "token id"}


def _save(fig, out_dir: str, name: str) -> str:
    fname = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) + ".png"
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, fname), dpi=100, bbox_inches="tight")
    plt.close(fig)
    return fname


def unit(name: str) -> str:
    return UNITS.get(name.split(".")[-1], name.split(".")[-1])


def histogram(out_dir: str, name: str, sk: Sketch, label: str | None = None, ylabel: str = "documents") -> str | None:
    """Distribution of a column from its sketch over [p0.1, p99.9]; log x when positive and wide."""
    if not sk.n:
        return None
    lo, hi = sk.quantile(0.001), sk.quantile(0.999)
    if hi - lo <= 1e-3 * max(abs(hi), abs(lo)):       # (nearly) one value: show +-1 % around it
        mid = sk.quantile(0.5)
        lo, hi = (mid - 0.01 * abs(mid), mid + 0.01 * abs(mid)) if mid else (-1.0, 1.0)
    log = sk.min > 0 and hi / lo > 50
    counts, edges = sk.histogram(60, lo, hi if hi > lo else lo + 1, log=log)
    fig, ax = plt.subplots(figsize=(5.7, 3.4))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4e79a7", edgecolor="white", lw=0.3)
    if log:
        ax.set_xscale("log")
    med = sk.quantile(0.5)
    ax.axvline(med, color="#e15759", lw=1.2, label=f"median {med:.4g}")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{name}: {sk.n:,} values (0.1-99.9th percentile shown)", fontsize=10)
    ax.set_xlabel(label or unit(name) + (" (log scale)" if log else ""))
    ax.set_ylabel(ylabel)
    return _save(fig, out_dir, f"hist-{name}")


def counts_bar(out_dir: str, name: str, counts: dict, title: str | None = None) -> str | None:
    """Horizontal bars of counts per category (status, finish_reason, label)."""
    if not counts:
        return None
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:30]
    fig, ax = plt.subplots(figsize=(5.7, 1.2 + 0.3 * len(items)))
    labels, values = [k for k, _ in items][::-1], [v for _, v in items][::-1]
    bars = ax.barh(labels, values, color="#59a14f")
    ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8, padding=2)
    ax.set_xlabel("documents")
    ax.set_xlim(0, max(values) * 1.18)
    ax.set_title(title or f"{name}: documents per value", fontsize=10)
    return _save(fig, out_dir, f"counts-{name}")


def phases(out_dir: str, job: str, timings: list) -> str | None:
    """Per-rank stacked bars of the seconds spent in each phase."""
    if not timings:
        return None
    rows = sorted(timings, key=lambda r: r.get("rank", 0))
    fig, ax = plt.subplots(figsize=(5.7, 1.4 + 0.35 * len(rows)))
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for ph in PHASES:
        v = np.array([float((r.get("seconds") or {}).get(ph, 0.0)) for r in rows])
        ax.barh(y, v, left=left, color=COLORS[ph], label=ph)
        left += v
    ax.set_yticks(y, [f"rank {r.get('rank')} (dp {r.get('dp_rank')}, tp {r.get('tp_rank')})" for r in rows],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"{job}: time per rank by phase", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, out_dir, f"phases-{job}")


def shards(out_dir: str, job: str, rows: list) -> str | None:
    """Seconds per shard, coloured by dp group; the median as a line, so stragglers stand out."""
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.7, 3.2))
    sec = np.array([float(r["seconds"]) for r in rows])
    groups = np.array([int(r.get("dp_rank", r.get("rank", 0)) or 0) for r in rows])
    cmap = plt.get_cmap("tab10")
    for g in np.unique(groups):
        m = groups == g
        ax.bar(np.array([r["shard"] for r in rows])[m], sec[m], color=cmap(g % 10), label=f"dp group {g}")
    ax.axhline(np.median(sec), color="black", lw=1, ls="--", label=f"median {np.median(sec):.3g} s")
    ax.set_ylim(0, sec.max() * 1.3)                       # room for the legend above the bars
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("shard (input order)")
    ax.set_ylabel("seconds")
    ax.set_title(f"{job}: seconds per shard", fontsize=10)
    ax.legend(fontsize=7, ncol=4)
    return _save(fig, out_dir, f"shards-{job}")


def projection(out_dir: str, name: str, xy: np.ndarray, status: np.ndarray, names) -> str | None:
    """Scatter of the sample's first two principal components, coloured by status."""
    if not len(xy):
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for code in np.unique(status):
        m = status == code
        label = names[code] if names and code < len(names) and names[code] else str(code)
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, label=f"{label.lower()} ({m.sum()})")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(f"{name}: 2-D PCA of {len(xy):,} sampled rows", fontsize=10)
    ax.legend(fontsize=7, markerscale=2)
    return _save(fig, out_dir, f"pca-{name}")
