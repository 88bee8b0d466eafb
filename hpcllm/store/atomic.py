"""One way to write a file so that its final name only ever holds a complete file.

Write under a temporary name in the same directory (so the rename never
crosses a file system), fsync the data, then ``os.replace`` it into place.  A
job killed mid-write leaves at most a hidden ``.NAME.tmp-PID`` file behind,
which readers never look at, and a final name always holds a whole file.
"""

import contextlib
import os


def temp_name(final: str) -> str:
    """The temporary name ``final`` is written under: hidden, in the same directory, per process."""
    d, name = os.path.split(os.fspath(final))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str):
    """Yield a temporary path to write ``final`` to; on success fsync it and rename it into place.

    On an exception the temporary file is removed and ``final`` is untouched.
    """
    tmp = temp_name(final)
    try:
        yield tmp
        _fsync(tmp)                 # data on disk before the name says "complete"
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_h5(final: str):
    """An ``h5py.File`` opened for writing that appears under ``final`` only once closed and complete."""
    import h5py

    with atomic_path(final) as tmp:
        with h5py.File(tmp, "w") as f:
            yield f


def write_text(final: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``final`` atomically; returns ``final``."""
    with atomic_path(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return final


def remove_temporaries(directory: str) -> int:
    """Delete the temporary files a killed writer left in ``directory``; returns how many.

    Call it only where nothing writes to ``directory`` at the same time (an
    output directory at the start of a run: one run owns it).
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    stale = [n for n in names if n.startswith(".") and ".tmp-" in n]
    for n in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, n))
    return len(stale)
