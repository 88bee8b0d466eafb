"""Corpus readers: JSONL / plain text (optionally .gz or .zst) shards -> documents with a status.

Every line of an input is one document, blank lines included: a shard of n
lines always gives n rows, each with a status (hpcllm.status.Status), so bad
input never loses a row.  Lines are split on b"\\n" only (not on \\r, \\x0b or
U+2028 as str.splitlines would): the planner counts lines the same way.

Texts are returned as UTF-8 bytes.  Invalid UTF-8 is kept as it was (raw bytes,
or a JSON-escaped lone surrogate such as "\\ud800" encoded as its 3 surrogate
bytes), flagged BAD_UTF8, and left for the tokenizer to replace with U+FFFD:
the reader does not decide how replacement works.  (In a line that also holds
raw invalid bytes, an escaped "\udc80".."\udcff" cannot be told from a raw
byte 0x80..0xff and comes back as that byte: invalid UTF-8 either way.)

A line longer than ``max_doc_bytes`` (default 64 MiB) is TOO_LONG: its row
has text b"" and it is never held in memory whole.  A 5 MB document is read
normally; the tokenizer truncates it to the model's length.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import glob
import json
import os
from dataclasses import dataclass

import numpy as np

from hpcllm.corpus.columnar import ColumnarFile, columnar_errors, columnar_kind, dataset_files, text_values
from hpcllm.corpus.shard import Shard
from hpcllm.corpus.streams import open_stream, stream_errors, strip_compression
from hpcllm.errors import HpcllmError
from hpcllm.status import Status

DEFAULT_MAX_DOC_BYTES = 64 << 20
DEFAULT_ID_FIELD = "id"     # used when --id-field is not given and a line has it (else file:line)
READ_SIZE = 4 << 20
_BOM = codecs.BOM_UTF8
_JSON_EXTS = (".jsonl", ".json", ".ndjson")
_TEXT_EXTS = (".txt", ".text")
# strict=False: raw control characters (tab, NUL, ...) inside JSON strings are
# kept as text instead of rejecting the whole document.
_decode_json = json.JSONDecoder(strict=False).decode


def _surrogate_bytes(err: UnicodeEncodeError):
    """Encode lone surrogates back to the bytes they stand for.

    U+DC80..U+DCFF came from undecodable raw bytes (surrogateescape) and turn
    back into those bytes; any other surrogate came from a JSON escape and is
    written as its 3-byte (invalid UTF-8) form, like 'surrogatepass'.
    """
    out = bytearray()
    for ch in err.object[err.start:err.end]:
        cp = ord(ch)
        out += bytes([cp - 0xDC00]) if 0xDC80 <= cp <= 0xDCFF else ch.encode("utf-8", "surrogatepass")
    return bytes(out), err.end


codecs.register_error("hpcllm.surrogates", _surrogate_bytes)


@dataclass
class Docs:
    """A shard's documents in input order, as parallel arrays."""
    texts: list[bytes]     # UTF-8 bytes (invalid sequences preserved); b"" when not processable
    status: np.ndarray     # uint8 Status per document
    doc_id: list[str]      # id field value, else "<file basename>:<line>"
    line: np.ndarray       # int64, 1-based line number in the source file
    source: str            # path of the source file
    params: list | None = None   # per row: the job's params_of(line) (a dict or None); None without params_of

    def __len__(self) -> int:
        return len(self.texts)


# --------------------------------------------------------------------------- inputs

def format_of(path: str, fmt: str = "auto") -> str:
    """"parquet" / "arrow" (by extension, always), else "jsonl" or "text", from ``fmt`` or else from the
    file extension (.gz / .zst ignored)."""
    columnar = columnar_kind(path)
    if columnar:
        return columnar
    if fmt in ("jsonl", "text"):
        return fmt
    if fmt != "auto":
        raise HpcllmError(f"unknown input format {fmt!r}; use auto, jsonl or text")
    base = strip_compression(path)
    if base.endswith(_JSON_EXTS):
        return "jsonl"
    if base.endswith(_TEXT_EXTS):
        return "text"
    raise HpcllmError(f"cannot tell the format of {path} from its extension; "
                      "name it .jsonl/.txt (optionally .gz or .zst) or .parquet / .arrow, or pass the format (jsonl or text)")


def _known(path: str, fmt: str) -> bool:
    try:
        format_of(path, fmt)
        return True
    except HpcllmError:
        return False


def _expand_dir(d: str, fmt: str) -> list[str]:
    """Input files under a directory, recursively, sorted; hidden and unknown-format files skipped.
    A ``datasets.save_to_disk`` directory gives its data files, in its state.json's order."""
    found = []      # (sort key, files)
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        saved = dataset_files(root)
        if saved is not None:
            found.append((os.path.join(root, ""), saved))
            dirs[:] = []
            continue
        found += [(p, [p]) for p in (os.path.join(root, f) for f in files if not f.startswith(".") and _known(f, fmt))]
    return [p for _, group in sorted(found) for p in group]


def list_inputs(spec, fmt: str = "auto") -> list[str]:
    """Expand files, directories and globs into a deterministic list of absolute paths.

    A list keeps its order; each directory or glob inside it expands sorted.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for s in map(os.fspath, specs):
        if os.path.isdir(s):
            files = _expand_dir(s, fmt)
        elif os.path.isfile(s):
            files = [s]
        elif any(c in s for c in "*?["):
            files = []
            for m in sorted(glob.glob(s, recursive=True)):
                files += _expand_dir(m, fmt) if os.path.isdir(m) else [m]
        else:
            files = []
        if not files:
            raise HpcllmError(f"input not found: {s}")
        out += [os.path.abspath(f) for f in files]
    return out


# --------------------------------------------------------------------------- lines

class _LineStream:
    """The lines of a binary stream, split on b"\\n", read in big blocks; resumable.

    ``take(n)`` yields the next n lines without their newline (fewer at EOF); a
    line longer than ``max_bytes`` is yielded as None and dropped as it streams
    past, so memory stays bounded by max_bytes plus one block.  ``skip(n)``
    passes over lines by counting newlines.  ``line`` is the number of lines
    consumed so far, so a gz stream can serve the file's next shard too.
    """

    def __init__(self, read, max_bytes: int):
        self._read, self.max_bytes = read, max_bytes
        self._buf, self._pos = b"", 0
        self.line = 0

    def _more(self) -> bool:
        if self._pos >= len(self._buf):
            self._buf, self._pos = self._read(READ_SIZE), 0
        return bool(self._buf)

    def at_end(self) -> bool:
        return not self._more()

    def skip(self, n: int) -> None:
        while n > 0 and self._more():
            c = self._buf.count(b"\n", self._pos)
            if c < n:
                n, self.line, self._pos = n - c, self.line + c, len(self._buf)
                continue
            view = np.frombuffer(self._buf, np.uint8, offset=self._pos)
            self._pos += int(np.flatnonzero(view == 10)[n - 1]) + 1
            self.line, n = self.line + n, 0

    def take(self, n: int):
        pieces, held = [], 0     # the current line's pieces from earlier blocks, and its size
        while n > 0:
            if not self._more():
                if held:         # a last line without a trailing newline
                    self.line += 1
                    yield None if held > self.max_bytes else b"".join(pieces)
                return
            buf, pos = self._buf, self._pos
            end = buf.find(b"\n", pos)
            if end < 0:
                held += len(buf) - pos
                pieces = pieces + [buf[pos:]] if held <= self.max_bytes else []
                self._pos = len(buf)
                continue
            held += end - pos
            if held > self.max_bytes:
                line = None
            else:
                line = b"".join(pieces + [buf[pos:end]]) if pieces else buf[pos:end]
            self._pos, pieces, held, n, self.line = end + 1, [], 0, n - 1, self.line + 1
            yield line


def _range_reader(f, start: int, end: int):
    """read(n) over the byte range [start, end) of an open file."""
    f.seek(start)
    left = end - start

    def read(n):
        nonlocal left
        block = f.read(min(n, left))
        left -= len(block)
        return block
    return read


# --------------------------------------------------------------------------- parsing

def _is_blank(text: bytes) -> bool:
    """Empty or whitespace only (Python's str.isspace; ASCII checked without decoding)."""
    s = text.lstrip()
    if not s:
        return True
    if s[0] < 0x80:
        return False
    return not text.decode("utf-8", "replace").strip()


def _safe_str(value) -> str:
    """str(value), made encodable (ids may carry lone surrogates from the JSON)."""
    s = str(value)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _text_status(text: bytes, valid_utf8: bool) -> int:
    if _is_blank(text):
        return Status.EMPTY
    return Status.OK if valid_utf8 else Status.BAD_UTF8


def _parse_text(raw: bytes, text_field, id_field, extract=None):
    text = raw[:-1] if raw.endswith(b"\r") else raw
    try:
        text.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    if extract is not None:
        status = _text_status(text, valid)
        value = extract({text_field: text.decode("utf-8", "replace")})
        return (b"", Status.MISSING_FIELD, None) if value is None else (value.encode("utf-8", "replace"), status, None)
    return text, _text_status(text, valid), None


def _parse_json(raw: bytes, text_field: str, id_field: str | None, extract=None):
    """-> (text bytes, status, id or None) for one JSONL line.

    ``extract(obj) -> str | None`` replaces ``obj[text_field]`` as the document's text (a job's
    prompt template, e.g. generate --chat); None means the line has no usable text."""
    try:
        s, raw_valid = raw.decode("utf-8"), True
    except UnicodeDecodeError:
        # invalid bytes become U+DC80..U+DCFF, restored by _surrogate_bytes
        s, raw_valid = raw.decode("utf-8", "surrogateescape"), False
    try:
        obj = _decode_json(s)
    except (ValueError, RecursionError):
        return b"", Status.BAD_JSON, None
    if not isinstance(obj, dict):
        return b"", Status.BAD_JSON, None
    value = obj.get(id_field or DEFAULT_ID_FIELD)   # no --id-field: a line's `id`, where it has one
    doc_id = None if value is None else _safe_str(value)
    value = obj.get(text_field) if extract is None else extract(obj)
    if not isinstance(value, str):
        return b"", Status.MISSING_FIELD, doc_id
    try:
        text = value.encode("utf-8")
    except UnicodeEncodeError:
        # a clean line can only hold escaped surrogates; only a dirty line has raw bytes to restore
        text = value.encode("utf-8", "surrogatepass" if raw_valid else "hpcllm.surrogates")
        return text, _text_status(text, False), doc_id
    return text, _text_status(text, True), doc_id


def _changed(shard: Shard, found) -> str:
    return (f"{shard.path}: shard {shard.index} should hold {shard.n_docs} lines from line "
            f"{shard.line_start + 1} but has {found}; the file changed after planning (use a new --output)")


class DocReader:
    """Reads shards into Docs.  Keeps the last compressed (.gz / .zst) file open, so the next shard
    of the same file continues from where the previous one ended instead of
    decompressing the file again from its start (a rank that reads several
    shards of one compressed file decompresses it at most once).  Use as a context
    manager, or call close()."""

    def __init__(self, text_field: str = "text", id_field: str | None = None,
                 max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES, extract=None, fields=(), params_of=None):
        self.text_field, self.id_field, self.max_doc_bytes = text_field, id_field, max_doc_bytes
        self.extract = extract   # obj -> text or None, instead of obj[text_field] (_parse_json)
        self.params_of = params_of   # obj -> dict or None: a JSON line's per-row parameters (Job.params_of)
        self.fields = tuple(fields)   # columnar input: more fields ``extract`` reads (--messages-field)
        self._gz = None          # (path, open decompressing stream, _LineStream)
        self._columnar = None    # the last ColumnarFile read

    def close(self) -> None:
        self._columnar = None
        if self._gz is not None:
            self._gz[1].close()
            self._gz = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _lines(self, shard: Shard, stack):
        """A _LineStream positioned at the shard's first line."""
        if not shard.compressed:
            f = stack.enter_context(open_stream(shard.path))
            return _LineStream(_range_reader(f, shard.byte_start, shard.byte_end), self.max_doc_bytes)
        g = self._gz
        if g is None or g[0] != shard.path or g[2].line > shard.line_start:
            self.close()
            f = open_stream(shard.path)
            g = self._gz = (shard.path, f, _LineStream(f.read, self.max_doc_bytes))
        g[2].skip(shard.line_start - g[2].line)
        return g[2]

    def read(self, shard: Shard) -> Docs:
        """Exactly ``shard.n_docs`` rows, in input order (HpcllmError if the file changed)."""
        if columnar_kind(shard.path):
            try:
                return self._read_columnar(shard)
            except columnar_errors() as e:
                self._columnar = None
                raise HpcllmError(f"cannot read input {shard.path}: {str(e).splitlines()[0]}") from None
        try:
            with contextlib.ExitStack() as stack:
                docs = self._parse(shard, self._lines(shard, stack))
        except stream_errors() as e:
            self.close()
            raise HpcllmError(f"cannot read input {shard.path}: {e}") from None
        except BaseException:
            self.close()         # the gz stream may have stopped mid-line: never reuse it
            raise
        return docs

    def _parse(self, shard: Shard, stream: _LineStream) -> Docs:
        n = shard.n_docs
        texts: list[bytes] = []
        status = np.empty(n, np.uint8)
        ids: list[str] = []
        base = os.path.basename(shard.path)
        parse = _parse_json if shard.fmt == "jsonl" else _parse_text
        params = [] if self.params_of is not None else None
        extract = self.extract if params is None else functools.partial(_with_params, self.extract, self.params_of,
                                                                          params)
        for i, raw in enumerate(stream.take(n)):
            if params is not None:
                params.append(None)
            if raw is None:
                text, st, doc_id = b"", Status.TOO_LONG, None
            else:
                if shard.line_start + i == 0 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                text, st, doc_id = parse(raw, self.text_field, self.id_field, extract)
            texts.append(text)
            status[i] = st
            ids.append(doc_id if doc_id is not None else f"{base}:{shard.line_start + i + 1}")
        if len(texts) != n:
            raise HpcllmError(_changed(shard, len(texts)))
        if not shard.compressed and not stream.at_end():   # a plain range ends exactly at its last line
            raise HpcllmError(_changed(shard, "more"))
        line = np.arange(shard.line_start + 1, shard.line_start + n + 1, dtype=np.int64)
        return Docs(texts=texts, status=status, doc_id=ids, line=line, source=shard.path, params=params)


    def _read_columnar(self, shard: Shard) -> Docs:
        """A shard of a Parquet / Arrow file: a row range; a status per row as a JSONL line gets."""
        f = self._columnar
        if f is None or f.path != shard.path:
            f = self._columnar = ColumnarFile(shard.path)
        start, n = shard.line_start, shard.n_docs
        if start + n > f.n_rows:
            raise HpcllmError(_changed(shard, max(0, f.n_rows - start)))
        id_field = self.id_field or DEFAULT_ID_FIELD
        extra = self.fields if self.extract is not None else ()
        cols = f.fields(start, n, (self.text_field, id_field) + extra)
        if cols[self.text_field] is None and not any(cols[x] is not None for x in extra):
            raise HpcllmError(f"{shard.path} has no column {self.text_field!r} (columns: "
                              f"{', '.join(f.schema.names)}); pass --text-field")
        base = os.path.basename(shard.path)
        ids = [f"{base}:{start + i + 1}" for i in range(n)]
        if cols[id_field] is not None:
            ids = [i if v is None else _safe_str(v) for i, v in zip(ids, cols[id_field].to_pylist())]
        if self.extract is not None:
            texts, valid = self._extracted(cols, n, extra)
        else:
            texts, valid = text_values(cols[self.text_field]) if cols[self.text_field] is not None else (None, True)
        status = np.full(n, Status.MISSING_FIELD, np.uint8)
        out: list[bytes] = [b""] * n
        for i, t in enumerate(texts or ()):
            if t is None:
                continue
            if len(t) > self.max_doc_bytes:
                status[i] = Status.TOO_LONG
                continue
            ok = valid
            if not ok:
                try:
                    t.decode("utf-8")
                    ok = True
                except UnicodeDecodeError:
                    pass
            out[i], status[i] = t, _text_status(t, ok)
        line = np.arange(start + 1, start + n + 1, dtype=np.int64)
        return Docs(texts=out, status=status, doc_id=ids, line=line, source=shard.path)

    def _extracted(self, cols, n, extra):
        """The job's text of each row (``extract`` over {field: value}); strings only, else None."""
        names = [self.text_field, *extra]
        values = [cols[x].to_pylist() if cols[x] is not None else [None] * n for x in names]
        texts = []
        for row in zip(*values):
            obj = {k: v for k, v in zip(names, row) if v is not None}
            value = self.extract(obj)
            texts.append(value.encode("utf-8", "surrogatepass") if isinstance(value, str) else None)
        return texts, False


def _with_params(extract, params_of, params: list, obj):
    """``extract(obj)``, and ``params_of(obj)`` as the last row's parameters."""
    params[-1] = params_of(obj)
    return extract(obj)


def read_docs(shard: Shard, text_field: str = "text", id_field: str | None = None,
              max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Docs:
    """Read one shard: exactly ``shard.n_docs`` rows, in input order."""
    with DocReader(text_field, id_field, max_doc_bytes) as reader:
        return reader.read(shard)
