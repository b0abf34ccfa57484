"""Files written whole or not at all: :func:`write_atomic` (a temporary file, fsynced, renamed over the path) and
:func:`fsync_dir` (what makes a rename or a new file durable).

Uses the standard library only.
"""

from __future__ import annotations

import os
import pathlib


def fsync_dir(path: pathlib.Path) -> None:
    """fsyncs ``path``: a directory (its entries: renames, new and deleted files), or any file it can open
    read-only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: pathlib.Path, data, sync_dir: bool = True) -> None:
    """``data`` (bytes, or any buffer: a numpy array's bytes are written as they lie) in ``path`` or, after a crash,
    the file as it was: a temporary file beside it, fsynced, renamed over it; then the directory fsynced, unless
    ``sync_dir`` is False (a caller writing several files syncs it once)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(data).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)
