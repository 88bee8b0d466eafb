"""Readers on real files: a nasty JSONL / text corpus, gz, byte-range shards."""

import gzip
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpcllm.corpus import plan as planmod
from hpcllm.corpus.plan import make_plan
from hpcllm.corpus.readers import DocReader, format_of, list_inputs, read_docs
from hpcllm.errors import HpcllmError
from hpcllm.status import Status as S

BIG = b"x" * (5 << 20)   # a 5 MB single-line document

# (line bytes, expected status, expected text bytes, expected doc_id or None for "<file>:<line>")
NASTY = [
    (b'\xef\xbb\xbf{"text": "bom first line", "id": "a1"}', S.OK, b"bom first line", "a1"),
    (b'{"text": "plain", "id": 7}', S.OK, b"plain", "7"),
    (b'{"text": "broken', S.BAD_JSON, b"", None),
    (b"", S.BAD_JSON, b"", None),                                       # blank line in JSONL
    (b"[1, 2]", S.BAD_JSON, b"", None),
    (b'"just a string"', S.BAD_JSON, b"", None),
    (b"[" * 100_000 + b"]" * 100_000, S.BAD_JSON, b"", None),          # RecursionError
    (b'{"body": "no text field", "id": null}', S.MISSING_FIELD, b"", None),
    (b'{"text": 42, "id": "n"}', S.MISSING_FIELD, b"", "n"),
    (b'{"text": "bad \xff\xfe bytes"}', S.BAD_UTF8, b"bad \xff\xfe bytes", None),
    (b'{"text": "lone \\ud800 escape"}', S.BAD_UTF8, b"lone \xed\xa0\x80 escape", None),
    (b'{"text": "low \\udcff then \xc3"}', S.BAD_UTF8, b"low \xff then \xc3", None),
    (b'{"text": "pair \\ud83d\\ude00"}', S.OK, "pair \U0001F600".encode(), None),
    (b'{"text": "ok", "id": "\xff"}', S.OK, b"ok", "\\udcff"),          # bad bytes outside the text
    (b'{"text": ""}', S.EMPTY, b"", None),
    (b'{"text": " \\t\\n "}', S.EMPTY, b" \t\n ", None),
    ('{"text": "\u3000"}'.encode(), S.EMPTY, "\u3000".encode(), None),
    (b'{"text": "nul\x00raw and \\u0000 escaped"}', S.OK, b"nul\x00raw and \x00 escaped", None),
    ('{"text": "sep\u2028inside\x0bvt"}'.encode(), S.OK, "sep\u2028inside\x0bvt".encode(), None),
    (b'{"text": "crlf line"}\r', S.OK, b"crlf line", None),
    (b'{"text": "' + BIG + b'"}', S.OK, BIG, None),
    (b'{"text": "no trailing newline"}', S.OK, b"no trailing newline", None),
]


def _write(path, lines, gz=False, trailing=False):
    data = b"\n".join(lines) + (b"\n" if trailing else b"")
    with (gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")) as f:
        f.write(data)
    return str(path)


def _read_all(plan, **kw):
    docs = [read_docs(s, **kw) for s in plan]
    return (sum((d.texts for d in docs), []), np.concatenate([d.status for d in docs]),
            sum((d.doc_id for d in docs), []), np.concatenate([d.line for d in docs]))


@pytest.mark.parametrize("gz", [False, True])
def test_nasty_jsonl(tmp_path, gz):
    path = _write(tmp_path / ("c.jsonl.gz" if gz else "c.jsonl"), [x[0] for x in NASTY], gz=gz)
    texts, status, ids, line = _read_all(make_plan(path, shard_docs=5), id_field="id")
    base = os.path.basename(path)
    assert len(texts) == len(NASTY)
    for i, (_, want_status, want_text, want_id) in enumerate(NASTY):
        assert (S(status[i]), texts[i]) == (want_status, want_text), f"line {i + 1}"
        assert ids[i] == (want_id if want_id is not None else f"{base}:{i + 1}")
    assert line.tolist() == list(range(1, len(NASTY) + 1))


def test_too_long_is_dropped_but_keeps_its_row(tmp_path):
    lines = [b'{"text": "a"}', b'{"text": "' + BIG + b'"}', b'{"text": "b"}', b"y" * 3_000_000]
    path = _write(tmp_path / "c.jsonl", lines, trailing=False)
    for plan in (make_plan(path, shard_docs=1), make_plan(path, shard_docs=10)):
        texts, status, ids, _ = _read_all(plan, max_doc_bytes=1 << 20)
        assert texts == [b"a", b"", b"b", b""]
        assert status.tolist() == [S.OK, S.TOO_LONG, S.OK, S.TOO_LONG]
        assert ids == ["c.jsonl:1", "c.jsonl:2", "c.jsonl:3", "c.jsonl:4"]


@pytest.mark.parametrize("name", ["t.txt", "t.txt.gz"])
def test_text_format(tmp_path, name):
    lines = [b"\xef\xbb\xbfhello", b"", b"   ", b"crlf\r", b"bad \xff byte", b"nul\x00inside", b"vt\x0bff\x0c", BIG, b"last"]
    path = _write(tmp_path / name, lines, gz=name.endswith(".gz"))
    texts, status, ids, line = _read_all(make_plan(path, shard_docs=3))
    assert texts == [b"hello", b"", b"   ", b"crlf", b"bad \xff byte", b"nul\x00inside", b"vt\x0bff\x0c", BIG, b"last"]
    assert status.tolist() == [S.OK, S.EMPTY, S.EMPTY, S.OK, S.BAD_UTF8, S.OK, S.OK, S.OK, S.OK]
    assert ids[4] == f"{name}:5" and line[-1] == 9


def test_trailing_newline_and_empty_files(tmp_path):
    a = _write(tmp_path / "a.txt", [b"one", b"two"], trailing=True)    # 2 docs, not 3
    _write(tmp_path / "b.txt", [])                                      # empty file: 0 docs
    c = _write(tmp_path / "c.txt", [b""], trailing=True)                 # one blank line: 1 doc
    plan = make_plan(str(tmp_path), shard_docs=10)
    assert [(os.path.basename(s.path), s.n_docs, s.file_index) for s in plan] == [("a.txt", 2, 0), ("c.txt", 1, 2)]
    assert plan.inputs == [a, str(tmp_path / "b.txt"), c]
    assert read_docs(plan[1]).status.tolist() == [S.EMPTY]


def test_list_inputs_and_formats(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.jsonl", "d/a.txt.gz", "d/sub/c.json", "d/.hidden.jsonl", "d/notes.md"]:
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path / "d")
    want = [f"{d}/a.txt.gz", f"{d}/b.jsonl", f"{d}/sub/c.json"]
    assert list_inputs(d) == want
    assert list_inputs(f"{d}/**/*.*s*n*") == [f"{d}/b.jsonl", f"{d}/sub/c.json"]
    assert list_inputs([f"{d}/b.jsonl", f"{d}/a.txt.gz"]) == [f"{d}/b.jsonl", f"{d}/a.txt.gz"]  # a list keeps its order
    assert len(list_inputs(d, fmt="text")) == 4                      # an explicit format takes notes.md too
    with pytest.raises(HpcllmError, match=r"^input not found: .*nope\*\.jsonl$"):
        list_inputs(str(tmp_path / "nope*.jsonl"))
    with pytest.raises(HpcllmError, match="input not found"):
        list_inputs([f"{d}/b.jsonl", str(tmp_path / "missing.jsonl")])
    assert [format_of(p) for p in want] == ["text", "jsonl", "jsonl"]
    with pytest.raises(HpcllmError, match="cannot tell the format of .*notes.md"):
        make_plan(f"{d}/notes.md")
    assert make_plan(f"{d}/notes.md", fmt="text") == []


def test_file_changed_after_planning(tmp_path):
    path = _write(tmp_path / "c.txt", [b"a", b"b", b"c"])
    plan = make_plan(path, shard_docs=2)
    _write(tmp_path / "c.txt", [b"", b"", b"b", b"c"])    # same size before the cut, one more line
    with pytest.raises(HpcllmError, match="shard 0 should hold 2 lines .* has more; the file changed"):
        read_docs(plan[0])
    _write(tmp_path / "c.txt", [b"a"])
    with pytest.raises(HpcllmError, match="shard 1 should hold 1 lines from line 3 but has 0"):
        read_docs(plan[1])


# ---------------------------------------------------------------------- byte ranges cover every line once

def _reference_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines


def _check_cover(path, data, shard_docs, block):
    planmod_block = planmod.SCAN_BLOCK
    planmod.SCAN_BLOCK = block
    try:
        plan = make_plan(path, shard_docs=shard_docs)
    finally:
        planmod.SCAN_BLOCK = planmod_block
    ref = _reference_lines(data)
    assert all(0 < s.n_docs <= shard_docs for s in plan)
    assert [s.row_start for s in plan] == list(np.cumsum([0] + [s.n_docs for s in plan])[:-1])
    if plan and not path.endswith(".gz"):
        assert [s.byte_start for s in plan] == [0] + [s.byte_end for s in plan[:-1]]
        assert not plan or plan[-1].byte_end == len(data)
        for s in plan:   # each shard's bytes are exactly its lines
            assert _reference_lines(data[s.byte_start:s.byte_end]) == ref[s.line_start:s.line_start + s.n_docs]
    texts, _, _, line = _read_all(plan, max_doc_bytes=1 << 30) if plan else ([], None, None, [])
    assert [t for t in texts] == [r[:-1] if r.endswith(b"\r") else r for r in ref]
    assert list(line) == list(range(1, len(ref) + 1))


@pytest.mark.parametrize("block", [7, 1000, 1 << 20])
@pytest.mark.parametrize("shard_docs", [1, 2, 3, 5, 17, 1000])
def test_shards_cover_every_line_once(tmp_path, shard_docs, block):
    rng = np.random.default_rng(shard_docs * 31 + block)
    lines = [b"w" * int(n) for n in rng.integers(0, 40, 200)] + [b"", b"", BIG[:5000], b"end"]
    data = b"\n".join(lines)
    path = str(tmp_path / "c.txt")
    open(path, "wb").write(data)
    _check_cover(path, data, shard_docs, block)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300).map(lambda b: bytes(c if c % 5 else 10 for c in b)),
       shard_docs=st.integers(1, 9), block=st.integers(1, 50), gz=st.booleans())
def test_cover_property(tmp_path_factory, data, shard_docs, block, gz):
    path = str(tmp_path_factory.mktemp("p") / ("c.txt.gz" if gz else "c.txt"))
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    _check_cover(path, data, shard_docs, block)


def test_doc_reader_reuses_gz_stream(tmp_path):
    lines = [b'{"text": "t%d"}' % i for i in range(1000)] + [b'{"text": "' + BIG[:600_000] + b'"}', b"[]"]
    path = _write(tmp_path / "c.jsonl.gz", lines, gz=True)
    plan = make_plan(path, shard_docs=97)
    one_by_one = [read_docs(s, max_doc_bytes=500_000) for s in plan]
    with DocReader(max_doc_bytes=500_000) as reader:
        first = reader.read(plan[0])
        stream = reader._gz[2]
        in_order = [first] + [reader.read(s) for s in plan[1:]]
        assert reader._gz[2] is stream and stream.line == len(lines)    # one pass over the file
        backwards = [reader.read(s) for s in reversed(plan)][::-1]      # reopens as needed
    for a, b, c in zip(one_by_one, in_order, backwards):
        assert a.texts == b.texts == c.texts and a.doc_id == b.doc_id == c.doc_id
        assert (a.status == b.status).all() and (a.line == c.line).all()
    assert one_by_one[-1].status.tolist()[-2:] == [S.TOO_LONG, S.BAD_JSON]
    assert reader._gz is None
