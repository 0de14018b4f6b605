"""Durable file writes and checksums shared by the data layer and the checkpoints.

Every file that must never be seen half-written (token shards, manifests, checkpoint
metadata, the ``latest`` pointer) goes through :func:`atomic_write_bytes`: written to a
temporary sibling, flushed and fsynced, then renamed over the final name (``os.replace`` is
atomic on POSIX), so a reader or a resumed run sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

__all__ = ["sha256_file", "sha256_bytes", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "fsync_file",
           "replace_directory"]


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write to a temporary sibling, fsync, rename: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_file(path: Path) -> None:
    """Flush a file someone else wrote (DeepSpeed's checkpoint shards) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def replace_directory(new: Path, final: Path, trash: Path) -> None:
    """Rename the complete directory ``new`` to ``final``; an existing ``final`` is moved aside to
    ``trash`` first and removed only after the rename, so at no moment is there neither copy."""
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(new, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(new, final)
