"""Compressed inputs: gzip (``.gz``) and Zstandard (``.zst``), through ``gzip`` and ``pyzstd``.

A compressed file cannot be entered in the middle, so the planner gives it to
shards as whole-file line ranges and the readers decompress it from its start
(hpcllm.corpus.plan, hpcllm.corpus.readers), except a *seekable* zstd file
(zstd's seekable format: independent frames and a seek table in a skippable
frame at the end, as ``t2sz`` and pyzstd's SeekableZstdFile write it): that one is
read with random access, so it is planned and read in byte ranges of its
decompressed data like a plain file (``random_access``, ``data_size``).
``open_stream`` is the one place that knows how to open each kind;
``stream_errors()`` are the exceptions a damaged file raises, which callers
turn into a one-line error naming the file.  A stream that ends inside a zstd
frame is an EOFError, as Python's gzip reports a truncated gzip file.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib

COMPRESSED_EXTS = (".gz", ".zst")
READ_SIZE = 1 << 20


def compression_of(path: str) -> str | None:
    """"gz", "zst" or None (plain), from the file name."""
    for ext in COMPRESSED_EXTS:
        if path.endswith(ext):
            return ext[1:]
    return None


def strip_compression(path: str) -> str:
    """The name without its .gz / .zst suffix (what tells the format)."""
    c = compression_of(path)
    return path[:-len(c) - 1] if c else path


def _pyzstd():
    try:
        import pyzstd
    except ImportError:
        from hpcllm.errors import HpcllmError
        raise HpcllmError("reading .zst input needs the pyzstd package: pip install pyzstd") from None
    return pyzstd


@functools.lru_cache(maxsize=1024)
def _seekable_zst(path: str, size: int, mtime_ns: int) -> bool:
    return _pyzstd().SeekableZstdFile.is_seekable_format_file(path)


def seekable_zst(path: str) -> bool:
    """A .zst file in zstd's seekable format (its seek table read from the file's end)."""
    if compression_of(path) != "zst":
        return False
    st = os.stat(path)
    return _seekable_zst(path, st.st_size, st.st_mtime_ns)


def random_access(path: str) -> bool:
    """Whether a byte range of the (decompressed) data can be read without what comes before it."""
    return compression_of(path) is None or seekable_zst(path)


def data_size(path: str) -> int:
    """Bytes of the data a random-access file holds (a seekable .zst: decompressed)."""
    if seekable_zst(path):
        with _pyzstd().SeekableZstdFile(path, "rb") as f:
            return f.seek_table_info[2]
    return os.path.getsize(path)


def open_stream(path: str):
    """A binary file object (read, readline, iteration) over a file's decompressed bytes; seekable
    where ``random_access(path)``."""
    kind = compression_of(path)
    if kind == "gz":
        return gzip.open(path, "rb")
    if kind == "zst":
        zstd = _pyzstd()
        if seekable_zst(path):
            return zstd.SeekableZstdFile(path, "rb")
        return zstd.ZstdFile(path, "rb")
    return open(path, "rb", buffering=READ_SIZE)


def stream_errors() -> tuple:
    """Exceptions a damaged compressed file raises while being read (BadGzipFile is an OSError)."""
    errors = (OSError, EOFError, zlib.error)
    try:
        import pyzstd
    except ImportError:
        return errors
    return errors + (pyzstd.ZstdError, pyzstd.SeekableFormatError)
