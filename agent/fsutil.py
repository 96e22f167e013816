"""File-system primitives shared by the file sink and the state store: no partial files."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
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


#: a secret file (a client secret, a Vault token, a password) is never larger than this
MAX_SECRET_FILE_BYTES = 64 * 1024


def read_secret_file(path: str | os.PathLike[str], *, limit: int = MAX_SECRET_FILE_BYTES) -> str:
    """The text of a secret file, read so that a file planted or grown by someone else can
    neither block nor flood the agent: opened non-blocking (a FIFO is refused, never waited
    on), a regular file only, at most ``limit`` bytes. Symlinks are followed (Kubernetes and
    systemd credentials are symlinks). Raises what ``open`` raises (FileNotFoundError,
    PermissionError, another OSError) and UnicodeDecodeError, so callers explain each."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a directory?)")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit // 1024} KiB: not a secret file")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit // 1024} KiB: not a secret file")
    finally:
        os.close(fd)
    return data.decode("utf-8")
