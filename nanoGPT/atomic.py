"""Atomic file writes: a reader (or a crash) never sees a half-written file.

The data is written to a temporary file in the target's folder, flushed to disk, then renamed over the target;
``os.replace`` is atomic on POSIX within one file system, so the target is either the old file or the new one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
