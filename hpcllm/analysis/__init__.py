"""Analysis of results: hpcllm report, export and filter, and a notebook API.

    import hpcllm.analysis as ha
    r = ha.open("out/")                         # one results dir, or a list of dirs of one corpus
    r.names                                     # columns
    df = ha.to_pandas(r, rows=slice(0, 10_000)) # a DataFrame; vectors (embeddings) only when asked
    cols = r.read(["perplexity", "status"], 0, 1000)   # numpy arrays (ragged: Ragged(values, offsets))
"""


def open(paths):  # noqa: A001 - mirrors h5py.File / builtins.open for a results dir
    """A ``Results`` (hpcllm.analysis.columns) over one or more results dirs, joined by row."""
    from hpcllm.analysis.columns import Results

    return Results(paths)


def to_pandas(res, columns=None, rows: slice | None = None, embeddings: bool = False):
    """Rows ``rows`` (default all) of ``columns`` (default all but vectors unless ``embeddings``) as pandas."""
    from hpcllm.analysis.export import arrow_column, default_columns

    import pyarrow as pa

    names = list(columns or default_columns(res, embeddings))
    rows = rows or slice(0, res.n_rows)
    data = res.read(names, rows.start or 0, rows.stop)
    return pa.table({n: arrow_column(res.info(n), data[n]) for n in names}).to_pandas()
