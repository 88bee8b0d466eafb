"""Compressed inputs read as streams: gzip (``.gz``) and Zstandard (``.zst``).

A compressed file cannot be entered in the middle, so the planner gives it to
shards as whole-file line ranges and the readers decompress it from its start
(hpcllm.corpus.plan, hpcllm.corpus.readers).  ``open_stream`` is the one place
that knows how to open each kind; ``STREAM_ERRORS`` are the exceptions a
damaged file raises, which callers turn into a one-line error naming the file.

Zstandard goes through the ``zstandard`` binding, one frame after another
(multi-frame files, such as pzstd's or a seekable-zstd file, are read whole;
skippable frames are passed over).  A file that ends inside a frame is an
EOFError, as Python's gzip reports a truncated gzip file: zstandard's own
stream reader returns the frames it completed and stops silently.
"""

from __future__ import annotations

import gzip
import io
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


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise _missing_zstd() from None
    return zstandard


def _missing_zstd():
    from hpcllm.errors import HpcllmError
    return HpcllmError("reading .zst input needs the zstandard package: pip install zstandard")


class _ZstdRaw(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame; EOFError when it ends mid-frame."""

    def __init__(self, path: str):
        self._zstd = _zstd()
        self._f = open(path, "rb")
        self._dctx = self._zstd.ZstdDecompressor()
        self._obj, self._fed = None, False     # the current frame's decompressor; whether it got input
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Decompress until some output is ready; False at a clean end of file."""
        while self._pos >= len(self._out):
            chunk = self._f.read(READ_SIZE)
            if not chunk:
                if self._obj is not None and self._fed and not self._obj.eof:
                    raise EOFError("zstd stream ended inside a frame (the file is truncated)")
                return False
            self._out, self._pos = self._feed(chunk), 0
        return True

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._obj is None or self._obj.eof:
                self._obj, self._fed = self._dctx.decompressobj(), False
            out.append(self._obj.decompress(data))
            self._fed = True
            data = self._obj.unused_data if self._obj.eof else b""
        return b"".join(out)

    def readinto(self, b) -> int:
        if not self._fill():
            return 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_stream(path: str):
    """A binary file object (read, readline, iteration) over a file's decompressed bytes."""
    kind = compression_of(path)
    if kind == "gz":
        return gzip.open(path, "rb")
    if kind == "zst":
        return io.BufferedReader(_ZstdRaw(path), READ_SIZE)
    return open(path, "rb", buffering=READ_SIZE)


def stream_errors() -> tuple:
    """Exceptions a damaged compressed file raises while being read (BadGzipFile is an OSError)."""
    errors = (OSError, EOFError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)
