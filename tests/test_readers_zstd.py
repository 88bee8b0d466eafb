"""zstd inputs (.jsonl.zst / .txt.zst) read as streams exactly like .gz: same rows and statuses as the
plain file, whole files to shards, multi-frame files, truncated / corrupt files a one-line error.  A
seekable-format file (pyzstd's SeekableZstdFile writes one) is planned and read in byte ranges of its
decompressed data, like a plain file.  An embed job over a seekable .jsonl.zst equal to the plain .jsonl
run: tests/test_readers_columnar.py (with every format)."""

import struct

import numpy as np
import pytest
import pyzstd

import hpcllm.corpus.plan as plan_mod

from hpcllm.corpus.plan import make_plan
from hpcllm.corpus.readers import DocReader, list_inputs, read_docs
from hpcllm.errors import HpcllmError
from hpcllm.status import Status as S
from test_readers import NASTY, _read_all, _write


def _zst(path, data: bytes, frames: int = 1):
    """``data`` as ``frames`` zstd frames, a skippable frame between them (as seekable-zstd writes)."""
    cut = [len(data) * i // frames for i in range(frames + 1)]
    out = b""
    for a, b in zip(cut, cut[1:]):
        out += pyzstd.compress(data[a:b], 1) + struct.pack("<II", 0x184D2A5E, 4) + b"skip"
    with open(path, "wb") as f:
        f.write(out)
    return str(path)


@pytest.mark.parametrize("frames", [1, 3])
def test_nasty_jsonl_zst_equals_plain(tmp_path, frames):
    plain = _write(tmp_path / "c.jsonl", [x[0] for x in NASTY])
    zst = _zst(tmp_path / "c.jsonl.zst", open(plain, "rb").read(), frames)
    a = _read_all(make_plan(plain, shard_docs=5), id_field="id")
    plan = make_plan(zst, shard_docs=5)
    assert all(s.compressed and s.byte_start == 0 and s.path == zst for s in plan)   # a stream: whole file
    b = _read_all(plan, id_field="id")
    assert a[0] == b[0] and (a[1] == b[1]).all() and (a[3] == b[3]).all()
    assert b[2] == [i.replace("c.jsonl:", "c.jsonl.zst:") for i in a[2]]
    assert [S(x) for x in b[1][:4]] == [S.OK, S.OK, S.BAD_JSON, S.BAD_JSON]


def test_text_zst_too_long_and_reader_reuses_stream(tmp_path):
    lines = [b"hello", b"", b"bad \xff byte", b"y" * 3_000_000, b"last"]
    zst = _zst(tmp_path / "t.txt.zst", b"\n".join(lines), frames=2)
    assert list_inputs(str(tmp_path)) == [zst]
    plan = make_plan(zst, shard_docs=2)
    assert [s.n_docs for s in plan] == [2, 2, 1]
    with DocReader(max_doc_bytes=1 << 20) as reader:
        docs = [reader.read(s) for s in plan]
    assert sum((d.texts for d in docs), []) == [b"hello", b"", b"bad \xff byte", b"", b"last"]
    assert np.concatenate([d.status for d in docs]).tolist() == [S.OK, S.EMPTY, S.BAD_UTF8, S.TOO_LONG, S.OK]


def test_truncated_and_corrupt_zst_are_one_line_errors(tmp_path):
    data = b"".join(b'{"text": "doc %d"}\n' % i for i in range(20000))
    good = _zst(tmp_path / "good.jsonl.zst", data, frames=2)
    raw = open(good, "rb").read()
    (tmp_path / "cut.jsonl.zst").write_bytes(raw[:len(raw) * 3 // 4])
    with pytest.raises(HpcllmError, match=r"^cannot read input .*cut\.jsonl\.zst: Compressed file ended before "
                                          r"the end-of-stream marker was reached$"):
        make_plan(str(tmp_path / "cut.jsonl.zst"))
    (tmp_path / "junk.jsonl.zst").write_bytes(b"not zstd at all\n" * 10)
    with pytest.raises(HpcllmError, match=r"^cannot read input .*junk\.jsonl\.zst: .*"):
        make_plan(str(tmp_path / "junk.jsonl.zst"))
    plan = make_plan(good, shard_docs=20000)                      # planned whole, then cut short
    (tmp_path / "good.jsonl.zst").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(HpcllmError, match=r"^cannot read input .*good\.jsonl\.zst: Compressed file ended"):
        read_docs(plan[0])


def seekable_zst(path, data: bytes, frame_bytes: int):
    """``data`` in zstd's seekable format, frames of ``frame_bytes`` decompressed bytes (pyzstd writes it)."""
    with pyzstd.SeekableZstdFile(path, "w", level_or_option=1, max_frame_content_size=frame_bytes) as f:
        f.write(data)
    return str(path)


def test_seekable_zst_is_planned_and_read_in_byte_ranges(tmp_path, monkeypatch):
    rows = [x[0] for x in NASTY if len(x[0]) < 1000] * 40 + [NASTY[6][0]]   # 801 lines, the last 200 kB
    plain = _write(tmp_path / "c.jsonl", rows)
    data = open(plain, "rb").read()
    zst = seekable_zst(tmp_path / "c.jsonl.zst", data, 997)             # frames end mid-line
    frames, frames_size, _ = pyzstd.SeekableZstdFile(zst, "rb").seek_table_info
    assert frames > 20
    monkeypatch.setattr(plan_mod, "SCAN_BLOCK", 4096)                  # scan blocks start mid-frame too
    want, got = make_plan(plain, shard_docs=16), make_plan(zst, shard_docs=16)
    assert len(got) > 20 and not any(s.compressed for s in got)
    assert [(s.byte_start, s.byte_end, s.line_start, s.n_docs) for s in got] == \
        [(s.byte_start, s.byte_end, s.line_start, s.n_docs) for s in want]
    for w, g in reversed(list(zip(want, got))):          # each shard read alone, in any order
        dw, dg = read_docs(w, id_field="id"), read_docs(g, id_field="id")
        assert dg.texts == dw.texts and (dg.status == dw.status).all() and (dg.line == dw.line).all()
        assert dg.doc_id == [i.replace("c.jsonl:", "c.jsonl.zst:") for i in dw.doc_id]
    texts = _read_all(want, id_field="id")[0]
    # without its seek table (the last, skippable frame), a plain zstd stream: whole file, line ranges
    (tmp_path / "cut.jsonl.zst").write_bytes(open(zst, "rb").read()[:frames_size])
    cut = make_plan(str(tmp_path / "cut.jsonl.zst"), shard_docs=160)
    assert all(s.compressed for s in cut) and [s.n_docs for s in cut] == [160] * 5 + [1]
    assert _read_all(cut, id_field="id")[0] == texts
