"""Results in a notebook: columns of one or more results dirs as numpy arrays or pandas.

    import hpcllm.results
    r = hpcllm.results.open("out/")                  # or ["score-out/", "classify-out/"]: one corpus, joined by row
    r.names, r.n_rows                                # columns (a JOB.name alias for each, too), rows
    cols = r.read(["perplexity", "status"], 0, 1000) # numpy arrays; ragged columns as Ragged(values, offsets)
    df = hpcllm.results.to_pandas(r, rows=slice(0, 10_000))   # vectors (embeddings) only with embeddings=True
    x = hpcllm.results.vectors(r, "embedding", 0, 1000)  # float32 [rows, d], int8 / binary embeddings dequantised

Columns are read from the HDF5 files in blocks for the rows asked for; nothing
else is loaded.  ``hpcllm report`` / ``export`` / ``filter`` use the same reader.
"""

import numpy as np

from hpcllm.analysis.columns import Ragged, Results, dequantize  # noqa: F401  (the API's types)


def open(paths) -> Results:  # noqa: A001 - mirrors h5py.File / builtins.open for a results dir
    """A ``Results`` over one results dir (or its results.h5), or a list of dirs of one corpus."""
    return Results(paths)


def vectors(res: Results, name: str = "embedding", start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a vector column as float32 [rows, d]: int8 codes times their row's
    ``embedding_scale`` (NaN rows: not embedded), binary ones as -1 / +1 per dimension (their packed
    bytes, for Hamming search, are ``res.read([name])``)."""
    info = res.info(name)
    data = res.read([name] + ([info.scale] if info.scale else []), start, stop)
    return dequantize(info, data[name], data.get(info.scale))


def to_pandas(res: Results, columns=None, rows: slice | None = None, embeddings: bool = False):
    """Rows ``rows`` (default all) of ``columns`` (default: all but vectors unless ``embeddings``) as a DataFrame;
    ragged columns become lists, vectors fixed-size lists (as ``hpcllm export`` writes them)."""
    import pyarrow as pa

    from hpcllm.analysis.export import arrow_column, default_columns

    names = list(columns or default_columns(res, embeddings))
    rows = rows or slice(0, res.n_rows)
    data = res.read(names, rows.start or 0, rows.stop)
    return pa.table({n: arrow_column(res.info(n), data[n]) for n in names}).to_pandas()
