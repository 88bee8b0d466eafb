"""Parquet and Hugging Face `datasets.save_to_disk` inputs on real files: plans from metadata (row groups
split / packed), only the needed columns read, a status per row (null / non-string / nested / bad UTF-8
text), ids and rows as JSONL gives them; corrupt files are one-line errors; embed over JSONL, JSONL.zst,
Parquet and a saved dataset gives identical results; a Parquet run resumes; filter writes Parquet."""

import json
import os

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import mpirun
from hpcllm.analysis.filter import run_filter
from hpcllm.corpus.columnar import ColumnarFile
from hpcllm.corpus.plan import make_plan
from hpcllm.corpus.readers import DocReader, list_inputs
from hpcllm.errors import HpcllmError
from hpcllm.status import Status as S
from test_readers_zstd import seekable_zst

N = 50


def _rows(n=N):
    """Rows with a null text, an empty one, nested fields, null ids and a non-string title."""
    rows = []
    for i in range(n):
        text = None if i % 11 == 3 else ("" if i % 13 == 5 else f"row {i} " + "word " * (i % 9) + "\u00e9")
        rows.append({"text": text, "id": None if i % 7 == 2 else f"r{i}",
                     "meta": {"title": f"title {i}", "n": i, "lang": None if i % 5 == 0 else "en"},
                     "label": i % 3})
    return rows


def _table(rows):
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("text", pa.string()), ("id", pa.string()),
        ("meta", pa.struct([("title", pa.string()), ("n", pa.int64()), ("lang", pa.string())])),
        ("label", pa.int64())]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same rows as JSONL, JSONL.zst (seekable), Parquet (row groups of 7) and a save_to_disk directory."""
    d = tmp_path_factory.mktemp("columnar")
    rows = _rows()
    with open(d / "c.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    seekable_zst(d / "c.jsonl.zst", (d / "c.jsonl").read_bytes(), 500)   # byte-range shards across its frames
    pq.write_table(_table(rows), d / "c.parquet", row_group_size=7)
    _save_to_disk(_table(rows), d / "ds")
    _save_to_disk(_table(rows), d / "ds1", shards=1)   # one file: the same shard cuts as the JSONL's
    return d


def _save_to_disk(table, path, shards=3):
    """A datasets.save_to_disk directory of 3 Arrow files: by `datasets` itself when installed, else the
    same layout (Arrow IPC streams + state.json + dataset_info.json) written here."""
    try:
        import datasets
    except ImportError:
        os.makedirs(path)
        names = [f"data-{k:05d}-of-{shards:05d}.arrow" for k in range(shards)]
        cut = [len(table) * k // shards for k in range(shards + 1)]
        for name, a, b in zip(names, cut, cut[1:]):
            with pa.ipc.new_stream(os.path.join(path, name), table.schema) as w:
                for batch in table.slice(a, b - a).to_batches(max_chunksize=5):
                    w.write_batch(batch)
        (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
        (path / "dataset_info.json").write_text("{}")
        return "pyarrow"
    datasets.Dataset(table).save_to_disk(str(path), num_shards=shards)
    return "datasets"


def _read(path, shard_docs, **kw):
    with DocReader(**kw) as r:
        docs = [r.read(s) for s in make_plan(path, shard_docs=shard_docs)]
    return ([t for d in docs for t in d.texts], np.concatenate([d.status for d in docs]).tolist(),
            [i for d in docs for i in d.doc_id], np.concatenate([d.line for d in docs]).tolist())


@pytest.mark.parametrize("shard_docs", [3, 10, 100])
def test_parquet_equals_jsonl_row_for_row(corpus, shard_docs):
    texts, status, ids, line = _read(str(corpus / "c.parquet"), shard_docs)
    j_texts, j_status, j_ids, j_line = _read(str(corpus / "c.jsonl"), shard_docs)
    assert (texts, status, line) == (j_texts, j_status, j_line)
    assert ids == [i.replace("c.jsonl:", "c.parquet:") for i in j_ids]
    assert status[3] == S.MISSING_FIELD and status[5] == S.EMPTY and ids[2] == "c.parquet:3"
    # nested: a dotted path into the struct; a non-string field is MISSING_FIELD; null text too
    t, st, _, _ = _read(str(corpus / "c.parquet"), shard_docs, text_field="meta.title")
    assert t[:2] == [b"title 0", b"title 1"] and set(st) == {S.OK}
    t, st, _, _ = _read(str(corpus / "c.parquet"), shard_docs, text_field="meta.lang", id_field="meta.n")
    assert st[0] == S.MISSING_FIELD and st[1] == S.OK and t[1] == b"en"
    assert _read(str(corpus / "c.parquet"), shard_docs, text_field="meta.n")[1] == [S.MISSING_FIELD] * N


def test_plan_from_metadata_split_and_packed(tmp_path):
    rows = _rows(60)
    pq.write_table(_table(rows[:40]), tmp_path / "a.parquet", row_group_size=20)   # 2 large groups
    pq.write_table(_table(rows[40:]), tmp_path / "b.parquet", row_group_size=3)    # 7 small ones
    plan = make_plan(str(tmp_path), shard_docs=8)
    got = [(os.path.basename(s.path), s.line_start, s.n_docs) for s in plan]
    assert got == [("a.parquet", 0, 8), ("a.parquet", 8, 8), ("a.parquet", 16, 4), ("a.parquet", 20, 8),
                   ("a.parquet", 28, 8), ("a.parquet", 36, 4), ("b.parquet", 0, 6), ("b.parquet", 6, 6),
                   ("b.parquet", 12, 8)]       # 3 + 3 + 2
    assert [s.row_start for s in plan] == list(np.cumsum([0] + [g[2] for g in got])[:-1])
    assert all(s.fmt == "parquet" and s.compressed for s in plan)


def test_only_needed_columns_are_read(corpus, monkeypatch):
    seen = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, columns=None, **kw: seen.append(columns) or real(self, groups, columns, **kw))
    _read(str(corpus / "c.parquet"), 10, text_field="meta.title")
    assert seen and all(c == ["meta.title", "id"] for c in seen)


def test_saved_dataset_is_its_arrow_files(corpus):
    files = list_inputs(str(corpus / "ds"))
    assert [os.path.basename(f) for f in files] == [f"data-{k:05d}-of-00003.arrow" for k in range(3)]
    texts, status, ids, _ = _read(str(corpus / "ds"), 10)
    j_texts, j_status, j_ids, _ = _read(str(corpus / "c.jsonl"), 10)
    assert (texts, status) == (j_texts, j_status)
    assert [i for i in ids if i.startswith("r")] == [i for i in j_ids if i.startswith("r")]


def test_corrupt_and_missing_column_are_one_line_errors(corpus, tmp_path):
    raw = (corpus / "c.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(HpcllmError, match=r"^cannot read input .*cut\.parquet: [^\n]*$"):
        make_plan(str(tmp_path / "cut.parquet"))
    (tmp_path / "junk.arrow").write_bytes(b"not arrow" * 100)
    with pytest.raises(HpcllmError, match=r"^cannot read input .*junk\.arrow: [^\n]*$"):
        make_plan(str(tmp_path / "junk.arrow"))
    with pytest.raises(HpcllmError, match=r"c\.parquet has no column 'body' \(columns: text, id, meta, label\); "
                                          r"pass --text-field"):
        _read(str(corpus / "c.parquet"), 10, text_field="body")


def test_bad_utf8_in_binary_text(tmp_path):
    t = pa.table({"text": pa.array([b"ok", b"bad \xff", None, b"  "], pa.binary())})
    pq.write_table(t, tmp_path / "b.parquet")
    texts, status, _, _ = _read(str(tmp_path / "b.parquet"), 10)
    assert texts == [b"ok", b"bad \xff", b"", b"  "]
    assert status == [S.OK, S.BAD_UTF8, S.MISSING_FIELD, S.EMPTY]


def _embed(model, src, out, *extra):
    mpirun(2, ["embed", "--model", model, "--input", src, "--output", out, "--shard-docs", 8, "--progress", 0,
               *extra])
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        return {k: f[k][:] for k in ("embedding", "status", "doc_id", "line", "n_tokens")}


def test_embed_same_results_every_format_parquet_resumes_and_filters(corpus, tmp_path, tiny_bert_h5):
    ref = _embed(tiny_bert_h5, corpus / "c.jsonl", tmp_path / "jsonl")
    for name in ("c.jsonl.zst", "c.parquet", "ds1"):
        res = _embed(tiny_bert_h5, corpus / name, tmp_path / name)
        for k in ("embedding", "status", "n_tokens"):
            np.testing.assert_array_equal(res[k], ref[k], err_msg=f"{name}: {k}")
        want = [i.decode().replace("c.jsonl:", f"{name}:") for i in ref["doc_id"]]
        got = [i.decode() for i in res["doc_id"]]
        if name == "ds1":         # a row without an id is <arrow file>:<row in it>
            want = [w.replace("ds1:", "data-00000-of-00001.arrow:") for w in want]
        assert got == want, name
    if True:   # a killed Parquet run (some shards' chunks and results.h5 gone) resumes to the same results
        out = tmp_path / "c.parquet-chunks"
        full = _embed(tiny_bert_h5, corpus / "c.parquet", out, "--chunk-mb", 0)    # a chunk per shard
        os.remove(out / "results.h5")
        for i in (0, 4):
            os.remove(out / "chunks" / f"chunk-{i:05d}-{i:05d}.h5")
        again = _embed(tiny_bert_h5, corpus / "c.parquet", out)
        for k in full:
            np.testing.assert_array_equal(again[k], full[k])
    # filter over Parquet input: Parquet, the input's schema, the kept rows unchanged and in order
    kept = run_filter([tmp_path / "c.parquet"], "status == ok and n_tokens > 6", str(tmp_path / "kept.parquet"),
                      rejected=str(tmp_path / "rej.parquet"))
    mask = (ref["status"] == S.OK) & (ref["n_tokens"] > 6)
    assert kept.startswith(f"kept {mask.sum()} of {N}")
    source = pq.read_table(corpus / "c.parquet")
    got = pq.read_table(tmp_path / "kept.parquet")
    assert got.schema.equals(source.schema) and got.to_pylist() == source.filter(pa.array(mask)).to_pylist()
    assert pq.read_table(tmp_path / "rej.parquet").to_pylist() == source.filter(pa.array(~mask)).to_pylist()
    run_filter([tmp_path / "c.parquet"], "status == ok and n_tokens > 6", str(tmp_path / "ps.parquet"), per_shard=True)
    parts = [pq.read_table(tmp_path / f"ps-{i:05d}.parquet") for i in range(8)]   # row groups of 7: 8 shards
    assert pa.concat_tables(parts).to_pylist() == got.to_pylist()
    with pytest.raises(HpcllmError, match="writes Parquet: name the output .parquet"):
        run_filter([tmp_path / "c.parquet"], "status == ok", str(tmp_path / "kept.jsonl"))


def test_columnar_file_rows(corpus):
    f = ColumnarFile(str(corpus / "c.parquet"))
    assert f.n_rows == N and f.table(5, 10).column("id").to_pylist() == [r["id"] for r in _rows()[5:15]]


def test_job_extract_reads_its_extra_fields(tmp_path):
    """A job's text of a row (generate --chat: the messages list) from the columns it names."""
    t = pa.table({"text": ["hi", None, "x"], "messages": [[{"role": "user", "content": "m"}], None, None]})
    pq.write_table(t, tmp_path / "g.parquet")
    first = lambda obj: (obj.get("messages") or [{}])[0].get("content") or obj.get("text")  # noqa: E731
    with DocReader(extract=first, fields=("messages",)) as r:
        docs = r.read(make_plan(str(tmp_path / "g.parquet"))[0])
    assert docs.texts == [b"m", b"", b"x"] and docs.status.tolist() == [S.OK, S.MISSING_FIELD, S.OK]


def test_labels_from_a_column(corpus):
    """train-classifier's labels: the rows' values of --label-field, as from the JSONL lines."""
    from hpcllm.train.data import MISSING, read_labels

    lines = np.array([4, 1, 2, 50, 9])
    got = read_labels(str(corpus / "c.parquet"), "parquet", lines, "label")
    assert got == read_labels(str(corpus / "c.jsonl"), "jsonl", lines, "label") == [(n - 1) % 3 for n in lines]
    assert read_labels(str(corpus / "c.parquet"), "parquet", lines, "nope") == [MISSING] * 5
    assert read_labels(str(corpus / "c.parquet"), "parquet", lines[:0], "label") == []
