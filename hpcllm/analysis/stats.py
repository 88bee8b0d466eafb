"""What the report shows of a column's Sketch, and how it writes a number.

A leaf shared by the statistics (hpcllm.analysis.report) and the page
(hpcllm.analysis.page), so neither imports the other's module for them.
"""

from __future__ import annotations

from hpcllm.analysis.sketch import Sketch

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def sketch_stats(sk: Sketch) -> dict:
    return {"count": sk.n, "nan": sk.nan, "mean": sk.mean if sk.n else None, "std": sk.std if sk.n else None,
            "quantiles": {f"{p:g}": sk.quantile(p) for p in QUANTILES} if sk.n else {}}


def fmt(v) -> str:
    """A value as the text summary and the page show it: "-" for None, 4 significant digits for a float."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
