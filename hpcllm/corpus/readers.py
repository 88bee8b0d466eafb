"""Corpus readers: JSONL / plain text (optionally .gz) shards -> documents with a status.

Every line of an input is one document, blank lines included: a shard of n
lines always gives n rows, each with a status (hpcllm.status.Status), so bad
input never loses a row.  Lines are split on b"\\n" only (not on \\r, \\x0b or
U+2028 as str.splitlines would): the planner counts lines the same way.

Texts are returned as UTF-8 bytes.  Invalid UTF-8 is kept as it was (raw bytes,
or a JSON-escaped lone surrogate such as "\\ud800" encoded as its 3 surrogate
bytes), flagged BAD_UTF8, and left for the tokenizer to replace with U+FFFD:
the reader does not decide how replacement works.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.status import Status

if TYPE_CHECKING:
    from hpcllm.corpus.plan import Shard

DEFAULT_MAX_DOC_BYTES = 64 << 20
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

    def __len__(self) -> int:
        return len(self.texts)


# --------------------------------------------------------------------------- inputs

def format_of(path: str, fmt: str = "auto") -> str:
    """"jsonl" or "text", from ``fmt`` or else from the file extension (.gz ignored)."""
    if fmt in ("jsonl", "text"):
        return fmt
    if fmt != "auto":
        raise HpcllmError(f"unknown input format {fmt!r}; use auto, jsonl or text")
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(_JSON_EXTS):
        return "jsonl"
    if base.endswith(_TEXT_EXTS):
        return "text"
    raise HpcllmError(f"cannot tell the format of {path} from its extension; "
                      "name it .jsonl/.txt (optionally .gz) or pass the format (jsonl or text)")


def _known(path: str, fmt: str) -> bool:
    try:
        format_of(path, fmt)
        return True
    except HpcllmError:
        return False


def _expand_dir(d: str, fmt: str) -> list[str]:
    """Input files under a directory, recursively, sorted; hidden and unknown-format files skipped."""
    found = []
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and _known(f, fmt)]
    return sorted(found)


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

def _iter_lines(read, max_bytes: int, skip: int = 0):
    """Yield the lines (without b"\\n") of a stream given by ``read(n)``.

    A line longer than ``max_bytes`` is yielded as None and dropped as it
    streams past, so memory stays bounded by max_bytes plus one read.  The
    first ``skip`` lines are skipped by counting newlines (gz line ranges).
    """
    pieces, held = [], 0         # the current partial line and its byte count
    while block := read(READ_SIZE):
        if skip:
            c = block.count(b"\n")
            if c < skip:
                skip -= c
                continue
            cut = int(np.flatnonzero(np.frombuffer(block, np.uint8) == 10)[skip - 1])
            block, skip = block[cut + 1:], 0
        *done, tail = block.split(b"\n")
        for part in done:
            held += len(part)
            if held > max_bytes:
                yield None
            elif pieces:
                pieces.append(part)
                yield b"".join(pieces)
            else:
                yield part
            pieces, held = [], 0
        held += len(tail)
        if held > max_bytes:
            pieces = []
        elif tail:
            pieces.append(tail)
    if held:                     # a last line without a trailing newline
        yield None if held > max_bytes else b"".join(pieces)


def _shard_lines(f, shard: Shard, max_bytes: int):
    """Lines of one shard from an open binary file (gz: already a decompressing stream)."""
    if shard.compressed:
        return _iter_lines(f.read, max_bytes, skip=shard.line_start)
    f.seek(shard.byte_start)
    left = shard.byte_end - shard.byte_start

    def read(n):
        nonlocal left
        block = f.read(min(n, left))
        left -= len(block)
        return block
    return _iter_lines(read, max_bytes)


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


def _parse_text(raw: bytes, text_field, id_field):
    text = raw[:-1] if raw.endswith(b"\r") else raw
    try:
        text.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    return text, _text_status(text, valid), None


def _parse_json(raw: bytes, text_field: str, id_field: str | None):
    """-> (text bytes, status, id or None) for one JSONL line."""
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
    value = obj.get(id_field) if id_field else None
    doc_id = None if value is None else _safe_str(value)
    value = obj.get(text_field)
    if not isinstance(value, str):
        return b"", Status.MISSING_FIELD, doc_id
    try:
        text = value.encode("utf-8")
    except UnicodeEncodeError:
        # a clean line can only hold escaped surrogates; only a dirty line has raw bytes to restore
        text = value.encode("utf-8", "surrogatepass" if raw_valid else "hpcllm.surrogates")
        return text, _text_status(text, False), doc_id
    return text, _text_status(text, True), doc_id


def _open(shard: Shard):
    return gzip.open(shard.path, "rb") if shard.compressed else open(shard.path, "rb")


def _changed(shard: Shard, found) -> str:
    return (f"{shard.path}: shard {shard.index} should hold {shard.n_docs} lines from line "
            f"{shard.line_start + 1} but has {found}; the file changed after planning (use a new --output)")


def read_docs(shard: Shard, text_field: str = "text", id_field: str | None = None,
              max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Docs:
    """Read one shard: exactly ``shard.n_docs`` rows, in input order."""
    n = shard.n_docs
    texts: list[bytes] = []
    status = np.empty(n, np.uint8)
    ids: list[str] = []
    base = os.path.basename(shard.path)
    parse = _parse_json if shard.fmt == "jsonl" else _parse_text
    try:
        with _open(shard) as f:
            for i, raw in enumerate(_shard_lines(f, shard, max_doc_bytes)):
                if i == n:
                    if shard.compressed:     # a gz line range ends before the file does
                        break
                    raise HpcllmError(_changed(shard, "more"))
                if raw is None:
                    text, st, doc_id = b"", Status.TOO_LONG, None
                else:
                    if shard.line_start + i == 0 and raw.startswith(_BOM):
                        raw = raw[len(_BOM):]
                    text, st, doc_id = parse(raw, text_field, id_field)
                texts.append(text)
                status[i] = st
                ids.append(doc_id if doc_id is not None else f"{base}:{shard.line_start + i + 1}")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise HpcllmError(f"cannot read input {shard.path}: {e}") from None
    if len(texts) != n:
        raise HpcllmError(_changed(shard, len(texts)))
    line = np.arange(shard.line_start + 1, shard.line_start + n + 1, dtype=np.int64)
    return Docs(texts=texts, status=status, doc_id=ids, line=line, source=shard.path)
