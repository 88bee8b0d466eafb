"""Subcommands `hpcllm report`, `hpcllm export` and `hpcllm filter` (registered by hpcllm.cli)."""

from __future__ import annotations


def _report(args) -> int:
    from hpcllm.analysis.report import report

    _, text = report(args.results, args.output)
    print(text)
    return 0


def _export(args) -> int:
    from hpcllm.analysis.export import export

    cols = [c for c in args.columns.split(",") if c] if args.columns else None
    n = export(args.results, args.output, cols, embeddings=not args.no_embeddings, row_group=args.row_group,
               fmt=args.format)
    print(f"wrote {args.output}: {n} rows")
    return 0


def _filter(args) -> int:
    from hpcllm.analysis.filter import run_filter

    summary = run_filter(args.results, args.where, args.output, inputs=args.input, rejected=args.rejected,
                         by=args.by, per_shard=args.per_shard)
    if summary:
        print(summary)
    return 0


def add_parsers(sub) -> None:
    r = sub.add_parser("report", help="HTML page + text summary of results dirs (status, distributions, timings)")
    r.add_argument("results", nargs="+", help="results dir(s) of one corpus (joined by row)")
    r.add_argument("--output", help="folder for index.html and its PNGs (default: FIRST/report)")
    r.set_defaults(func=_report)

    e = sub.add_parser("export", help="per-document columns to Parquet / CSV / JSONL (by the output's extension)")
    e.add_argument("results", nargs="+", help="results dir(s) of one corpus (joined by row)")
    e.add_argument("--output", required=True, help="FILE.parquet, FILE.csv[.gz] or FILE.jsonl[.gz]")
    e.add_argument("--columns", help="comma-separated column names (default: all)")
    e.add_argument("--no-embeddings", action="store_true", help="leave vector columns out of the default set")
    e.add_argument("--row-group", type=int, default=None, help="rows per Parquet row group (default: by size)")
    e.add_argument("--format", choices=("openai-batch",), default=None,
                   help="openai-batch: OpenAI's batch output lines of a --openai-batch generate / embed run")
    e.set_defaults(func=_export)

    f = sub.add_parser("filter", help="write the input lines whose results satisfy --where (byte-identical)")
    f.add_argument("results", nargs="+", help="results dir(s) of one corpus (joined by row)")
    f.add_argument("--where", required=True,
                   help="e.g. 'status == ok and perplexity <= q(0.6)'; names, numbers, status names, "
                        "== != < <= > >= in, and or not, parentheses, q(p) = the column's quantile over ok rows")
    f.add_argument("--input", nargs="+", help="corpus file(s) (default: the job's inputs, the 'sources' attribute)")
    f.add_argument("--output", required=True, help="kept lines (gzip when the name ends with .gz)")
    f.add_argument("--rejected", help="also write the other lines here")
    f.add_argument("--by", help="column to group q() by (per-group cut-offs, e.g. source or a language label)")
    f.add_argument("--per-shard", action="store_true", help="one output file per shard: NAME-NNNNN.EXT")
    f.set_defaults(func=_filter)
