"""File-system primitives shared by the file sink and the state store: no partial files."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

#: the temp files atomic_write leaves behind when the process is killed mid-write
_TEMP = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never part."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove atomic_write's temp files left in ``directory`` by a kill -9; returns them."""
    removed = []
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) and _TEMP.fullmatch(entry.name):
            unlink_quietly(Path(entry.path))
            removed.append(Path(entry.path))
    return removed
