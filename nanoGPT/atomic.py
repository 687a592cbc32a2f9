"""Atomic file writes: a reader (or a crash) never sees a half-written file.

The data is written to a temporary file in the target's folder, flushed to disk, then renamed over the target;
``os.replace`` is atomic on POSIX within one file system, so the target is either the old file or the new one.
The temporary file is created with mode 0666 minus the process's umask, as ``open(path, "w")`` would (0644
under the usual umask 022); ``tempfile.mkstemp`` would make every file 0600.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

_ATTEMPTS = 100  # random temporary names tried before giving up (each collision is a 2^-64 event)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file next to ``path``, opened for writing with O_EXCL, and its name."""
    for _ in range(_ATTEMPTS):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"write_atomically: no free temporary name next to {path} after {_ATTEMPTS} tries")


def write_atomically(path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
