"""Durable file writes: the one definition of "on disk" used across the node.

A file is durable once its bytes are fsynced, it is renamed into place, and
the directory that holds the new name is fsynced (POSIX: a rename is only
durable once its directory is).  The spool uses these for every acknowledged
instance; jobs, configuration edits and retention use them for their own
records.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path`` so that renames and unlinks in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: write ``<name>.tmp``, fsync, rename.

    Readers see the old or the new content, never a partial file.  The parent
    directory is not fsynced here: callers that need the new name itself to
    survive a crash call :func:`fsync_dir` on it.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
