"""`hpcllm export`: per-document columns to Parquet, CSV or JSONL, in input order, block by block.

Types: numeric and enum columns keep their HDF5 dtype (``status`` stays its
uint8 code; hpcllm.status.Status names them), strings are UTF-8, vectors
(embeddings) a Parquet fixed-size list, ragged columns (per-token
log-probabilities, output ids) a list per row.  Parquet gets one row group per
block of about 64 MiB (``--row-group`` overrides); CSV and JSONL write list
columns as JSON arrays; a NaN per-document value is written as null (pandas reads it as NaN,
DuckDB's aggregates skip it; NaN inside lists and embeddings stays NaN), an empty CSV field.
Outputs ending in ``.gz`` (CSV, JSONL) are gzip-compressed.  The file appears
under its name only when complete.

``--format openai-batch`` writes a `generate` / `embed` run over OpenAI Batch
requests (``--openai-batch``) as OpenAI's batch output file: one JSON line per
input line, in input order, ``{"id", "custom_id", "response": {"status_code":
200, "request_id", "body"}, "error": null}`` with ``body`` a ``chat.completion``,
``text_completion`` or embedding ``list`` object (``usage`` counted in the
model's tokens), or ``"response": null`` and ``"error": {"code", "message"}``
for a line that did not run (``ERROR_CODES``: by the row's status, the job's
message where it gave one).  Ids are made from the row number
(``batch_req_<row>``, ``req_<row>``, ``chatcmpl-<row>``); ``model`` is the
checkpoint's file name; ``custom_id`` is null for a line that is not JSON.
"""

from __future__ import annotations

import gzip
import json
import math
import os

import numpy as np
import pyarrow as pa

from hpcllm.analysis.columns import Results, distinct_columns
from hpcllm.errors import HpcllmError
from hpcllm.status import Status
from hpcllm.store.atomic import atomic_path

FORMATS = (".parquet", ".csv", ".csv.gz", ".jsonl", ".jsonl.gz")
# a row that did not run: its status -> OpenAI error (code, message unless the job wrote one); other statuses ran
ERROR_CODES = {Status.BAD_JSON: ("invalid_json", "the line is not a JSON object"),
               Status.MISSING_FIELD: ("invalid_request", "the request cannot run (no custom_id, an unknown url, "
                                                         "or no usable body)"),
               Status.TOO_LONG: ("context_length_exceeded", "the input is longer than the model's context"),
               Status.CHANGED: ("input_changed", "the input file changed while the job ran"),
               Status.MISSING: ("not_processed", "no result was written for this line")}
FINISH = {"eos": "stop", "stop": "stop"}      # OpenAI's finish reasons; every other ending is "length"


def format_of(path: str) -> str:
    for ext in FORMATS:
        if path.endswith(ext):
            return ext.split(".")[1]
    raise HpcllmError(f"export: cannot tell the format of {path}; name it {', '.join('*' + e for e in FORMATS)}")


def default_columns(res: Results, embeddings: bool = True) -> list[str]:
    names = distinct_columns(res)
    first = [n for n in ("doc_id", "source", "line", "status") if n in names]
    return first + [n for n in names if n not in first and (embeddings or res.info(n).kind != "vector")]


def arrow_column(info, data) -> pa.Array:
    """One block of one column as an Arrow array."""
    if info.kind == "string":
        return pa.array(list(data), pa.string())
    if info.kind == "vector":
        x = np.ascontiguousarray(data)
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), info.width)
    if info.kind == "ragged":
        off = data.offsets
        typ = pa.int32() if off[-1] < 2**31 else pa.int64()
        cls = pa.ListArray if typ == pa.int32() else pa.LargeListArray
        return cls.from_arrays(pa.array(off.astype(typ.to_pandas_dtype())), pa.array(data.values))
    x = np.asarray(data)
    return pa.array(x, from_pandas=x.dtype.kind == "f")     # NaN -> null: SQL aggregates skip it, pandas reads NaN


def tables(res: Results, names: list[str]):
    """Yield one Arrow table per block of rows, columns in ``names`` order."""
    infos = [res.info(n) for n in names]
    for _, block in res.blocks(names):
        yield pa.table({n: arrow_column(i, block[n]) for n, i in zip(names, infos)})


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


def _write_parquet(tmp: str, res: Results, names: list[str], row_group: int | None) -> int:
    import pyarrow.parquet as pq

    n, writer = 0, None
    try:
        for t in tables(res, names):
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema, compression="zstd")
            writer.write_table(t, row_group_size=row_group or max(1, t.num_rows))
            n += t.num_rows
        if writer is None:     # no rows: still a valid file with the schema
            empty = {nm: arrow_column(res.info(nm), v) for nm, v in res.read(names, 0, 0).items()}
            pq.write_table(pa.table(empty), tmp)
    finally:
        if writer is not None:
            writer.close()
    return n


def _write_text(tmp: str, res: Results, names: list[str], fmt: str, compressed: bool) -> int:
    import pyarrow.csv as pcsv

    n = 0
    opener = gzip.open if compressed else open
    with opener(tmp, "wb") as fh:
        for i, t in enumerate(tables(res, names)):
            n += t.num_rows
            if fmt == "jsonl":
                rows = t.to_pylist()
                fh.write("".join(json.dumps({k: _json_value(v) for k, v in r.items()}, ensure_ascii=False) + "\n"
                                 for r in rows).encode("utf-8"))
                continue
            for j, col in enumerate(t.columns):       # CSV has no lists: JSON text in the cell
                if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) \
                        or pa.types.is_large_list(col.type):
                    t = t.set_column(j, t.column_names[j],
                                     pa.array([json.dumps(_json_value(v)) for v in col.to_pylist()]))
            pcsv.write_csv(t, fh, pcsv.WriteOptions(include_header=(i == 0)))
    return n


def _openai_lines(res: Results):
    """OpenAI batch output lines (str), one per row in order (see the module's docstring)."""
    d = res.dirs[0]
    job = d.job
    if job not in ("generate", "embed") or not (d.attrs.get("config") or {}).get("openai_batch"):
        raise HpcllmError(f"export --format openai-batch: {d.path} is not a generate or embed run with --openai-batch")
    model = os.path.basename(str(d.attrs.get("model") or ""))
    created = int(d.attrs.get("finished") or 0)
    names = ["doc_id", "status", "n_tokens"]
    names += ["url", "error", "text", "finish_reason", "n_prompt_tokens", "n_generated"] if job == "generate" \
        else ["embedding"]
    reasons = _finish_names(d.file) if job == "generate" else {}
    for rows, b in res.blocks(names):
        for k, row in enumerate(range(rows.start, rows.stop)):
            status = int(b["status"][k])
            out = {"id": f"batch_req_{row}", "custom_id": None if status == Status.BAD_JSON else b["doc_id"][k],
                   "response": None, "error": None}
            message = b["error"][k] if job == "generate" else ""
            if status in ERROR_CODES or message:
                code, default = ERROR_CODES.get(status, ERROR_CODES[Status.MISSING_FIELD])
                out["error"] = {"code": code, "message": message or default}
            else:
                body = (_completion(b, k, row, model, created, reasons) if job == "generate"
                        else _embedding(b, k, model))
                out["response"] = {"status_code": 200, "request_id": f"req_{row}", "body": body}
            yield json.dumps(out, ensure_ascii=False) + "\n"


def _completion(b, k, row, model, created, reasons) -> dict:
    """A chat.completion or text_completion object of one generate row."""
    chat = b["url"][k] == "/v1/chat/completions"
    texts, ends, counts = (np.atleast_1d(b[n][k]) for n in ("text", "finish_reason", "n_generated"))
    choices = []
    for c, (text, end) in enumerate(zip(texts, ends)):
        if reasons.get(int(end), "none") != "none":          # "none" (255): a completion not generated
            reason = FINISH.get(reasons[int(end)], "length")
            choices.append({"index": c, "finish_reason": reason, "logprobs": None,
                            **({"message": {"role": "assistant", "content": str(text)}} if chat
                               else {"text": str(text)})})
    prompt, done = int(b["n_prompt_tokens"][k]), int(counts[:len(choices)].sum())
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{row}", "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}}


def _finish_names(path: str) -> dict:
    """generate's finish_reason code -> name (the dataset's ``names`` attribute)."""
    import h5py

    with h5py.File(path, "r") as f:
        return {int(k): v for k, v in json.loads(f["finish_reason"].attrs["names"]).items()}


def _embedding(b, k, model) -> dict:
    n = int(b["n_tokens"][k])
    return {"object": "list", "model": model, "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": 0, "embedding": [float(x) for x in b["embedding"][k]]}]}


def export(paths, output: str, columns: list[str] | None = None, embeddings: bool = True,
           row_group: int | None = None, fmt: str | None = None) -> int:
    """Write the chosen columns of the results dir(s) to ``output``; returns the number of rows.
    ``fmt`` "openai-batch": OpenAI's batch output lines instead of columns (JSONL, .gz allowed)."""
    if fmt == "openai-batch":
        res = Results(paths)
        with atomic_path(output) as tmp, (gzip.open if output.endswith(".gz") else open)(tmp, "wb") as fh:
            for line in _openai_lines(res):
                fh.write(line.encode("utf-8"))
        return res.n_rows
    fmt = format_of(output)
    res = Results(paths)
    names = columns or default_columns(res, embeddings)
    for n in names:
        res.column(n)                   # unknown names: one line before anything is written
    with atomic_path(output) as tmp:
        if fmt == "parquet":
            return _write_parquet(tmp, res, names, row_group)
        return _write_text(tmp, res, names, fmt, output.endswith(".gz"))
