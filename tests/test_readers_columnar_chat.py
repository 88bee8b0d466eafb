"""generate --chat over Parquet: the rows' text and messages (a list<struct<role, content>> column) give
the same results as the same rows as JSONL lines."""

import json

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import mpirun

ROWS = [{"text": "Hello", "messages": None}, {"text": None, "messages": None},
        {"text": None, "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]},
        {"text": "Why is the sky blue?", "messages": None}, {"text": "x " * 200, "messages": None},
        {"text": "Name three colours.", "messages": None}]


def test_generate_chat_parquet_equals_jsonl(tiny_gen_h5, tmp_path):  # noqa: F811
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    rows = [dict(r, id=f"q{i}") for i, r in enumerate(ROWS)]     # the sampling noise depends on the id
    schema = pa.schema([("text", pa.string()), ("messages", msg), ("id", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema),
                   tmp_path / "p.parquet", row_group_size=4)
    with open(tmp_path / "p.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    res = {}
    for name in ("p.jsonl", "p.parquet"):
        out = tmp_path / f"out-{name}"
        mpirun(2, ["generate", "--model", tiny_gen_h5, "--input", tmp_path / name, "--output", out, "--chat",
                   "--max-new-tokens", 6, "--temperature", 0.8, "--seed", 3, "--shard-docs", 3, "--progress", 0],
               timeout=300)
        with h5py.File(out / "results.h5") as f:
            res[name] = {k: f[k][()] for k in ("status", "output_ids", "output_offsets", "n_prompt_tokens", "doc_id")}
    for k, v in res["p.jsonl"].items():
        np.testing.assert_array_equal(res["p.parquet"][k], v, err_msg=k)
    assert res["p.parquet"]["status"][1] == 4 and res["p.parquet"]["n_prompt_tokens"][2] > 0   # no text: missing_field
