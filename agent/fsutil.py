"""File-system primitives shared by the file sink and the state store: no partial files.

:func:`atomic_write` is the one atomic writer (DESIGN §11): the file sink's token files and the
state store's records and key all go through it. A write creates a temp file in the same
directory (``O_CREAT|O_EXCL|O_NOFOLLOW``, 0600, a new name on a collision), gives it its mode
and owner/group (``fchmod``, so the umask does not apply; ``fchown``, then ``fchmod`` again as
chown clears setuid/setgid), fills and ``fsync``-s it, renames it onto the path and ``fsync``-s
the directory. A reader sees the old content or the new, never part, even after a kill -9 or a
full disk (the temp is removed on any failure and the old file left as it was).

Temp files are named ``.<basename>.dvs-agent.<16 hex>.tmp``: the writer's pid in 8 hex digits,
then 8 random ones. :func:`stale_temps` finds those a kill -9 left behind, never one of a live
process (a write in flight: a reload checks a rebuilt sink while another profile's refresh may
be writing, DESIGN §10; ``check --connect`` prepares the state directory of a running daemon).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path

TEMP_MARK = ".dvs-agent."
TEMP_SUFFIX = ".tmp"
#: hex digits after TEMP_MARK: the pid (8), then random (8)
_TEMP_HEX = 16
#: the temp files of earlier releases' state store (``.<basename>.<12 hex>.tmp``), still
#: removed when a kill -9 left one
_LEGACY_TEMP = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
#: new names tried when a temp name exists already (random: a collision is all but impossible)
_TEMP_ATTEMPTS = 100
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class OwnershipError(PermissionError):
    """``fchown`` was refused (EPERM): the owner or group asked for cannot be given."""


class NotDurable(OSError):
    """The new file is in place, but its directory could not be ``fsync``-ed: the rename may
    not survive a power loss."""


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write that makes no progress is a full
    disk: ENOSPC, never a loop)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


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


def own_temp_prefix() -> str:
    """The start of this process's temp names: its pid in 8 hex digits (of the 16)."""
    return f"{os.getpid() & 0xFFFFFFFF:08x}"


def _writer_alive(pid_hex: str) -> bool:
    """Whether the process whose pid a temp name holds (8 hex digits) still runs: its temp may
    be a write in flight. A pid reused since keeps a stale temp a while longer, never worse."""
    pid = int(pid_hex, 16)
    if pid == os.getpid() & 0xFFFFFFFF:
        return True
    if pid <= 0:  # kill(0) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another uid
        return True
    except OverflowError:
        return False
    return True


def temp_pattern(basename: str | None = None) -> re.Pattern[str]:
    """The names of :func:`atomic_write`'s temp files for ``basename`` (None: any file)."""
    name = ".+" if basename is None else re.escape(basename)
    return re.compile(
        rf"\.{name}{re.escape(TEMP_MARK)}[0-9a-f]{{{_TEMP_HEX}}}{re.escape(TEMP_SUFFIX)}"
    )


def atomic_write(path: Path, data: bytes, mode: int, *, uid: int = -1, gid: int = -1) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never
    part: a temp file beside it with ``mode`` (and ``uid``/``gid``; -1 leaves them as
    created), filled, fsync-ed, renamed onto ``path``, then the directory fsync-ed.

    Raises the :class:`OSError` of the step that failed, the temp removed and ``path`` left as
    it was: :class:`OwnershipError` when the owner or group cannot be given, ENOSPC for a full
    disk; :class:`NotDurable` when only the directory's fsync failed (the new file is in place).
    """
    tmp, fd = _create_temp(path)
    try:
        try:
            _set_attributes(fd, mode, uid, gid)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    try:
        fsync_dir(path.parent)
    except OSError as exc:
        raise NotDurable(exc.errno, exc.strerror or str(exc)) from None


def probe_write(path: Path, mode: int, *, uid: int = -1, gid: int = -1) -> None:
    """The steps of :func:`atomic_write` up to the rename (the temp file, its mode and owner),
    then the temp removed: proves at start that a write can succeed. Raises as it does."""
    tmp, fd = _create_temp(path)
    try:
        _set_attributes(fd, mode, uid, gid)
    finally:
        os.close(fd)
        unlink_quietly(tmp)


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new temp file beside ``path``, 0600 until :func:`_set_attributes` (no other user can
    open it meanwhile), never following a symlink; a name that exists already is not used."""
    for _ in range(_TEMP_ATTEMPTS):
        random_part = secrets.token_hex((_TEMP_HEX - len(own_temp_prefix())) // 2)
        tmp = path.with_name(
            f".{path.name}{TEMP_MARK}{own_temp_prefix()}{random_part}{TEMP_SUFFIX}"
        )
        try:
            return tmp, os.open(tmp, _TEMP_FLAGS, 0o600)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(path.parent))


def _set_attributes(fd: int, mode: int, uid: int, gid: int) -> None:
    os.fchmod(fd, mode)
    if uid == -1 and gid == -1:
        return
    try:
        os.fchown(fd, uid, gid)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
        raise OwnershipError(exc.errno, exc.strerror) from None
    os.fchmod(fd, mode)  # chown clears setuid/setgid bits; put them back


def stale_temps(directory: Path, basename: str | None = None) -> list[Path]:
    """The temp files of :func:`atomic_write` (for ``basename``; None: for any file, and those
    of earlier releases) that a kill -9 left in ``directory``: regular files only, never one
    of a live process (a write in flight). Raises the OSError of listing the directory."""
    pattern = temp_pattern(basename)
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            if pattern.fullmatch(entry.name):
                hex_part = entry.name[: -len(TEMP_SUFFIX)][-_TEMP_HEX:]
                if not _writer_alive(hex_part[: len(own_temp_prefix())]):
                    found.append(Path(entry.path))
            elif basename is None and _LEGACY_TEMP.fullmatch(entry.name):
                found.append(Path(entry.path))
    return found


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove :func:`stale_temps` of every file in ``directory``; returns those removed."""
    removed = []
    for path in stale_temps(directory):
        unlink_quietly(path)
        removed.append(path)
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


def access_hint(path: Path) -> str | None:
    """What keeps this process (its effective uid and groups) from creating or replacing
    ``path``, by the permission bits: the existing directory that needs more access, and which
    access. That is the nearest existing directory above ``path`` (it needs write and search
    to create an entry: the file, or the first missing directory, the rest is made below it),
    or a directory above that one without search access. None when the bits allow it (then an
    ACL, a security module or a mount option refuses)."""
    uid = f"the agent's uid {os.geteuid()}"
    chain = list(reversed(Path(os.path.abspath(path)).parents))  # "/" first, the parent last
    reached = chain[0]
    for directory in chain[1:]:
        if not os.access(reached, os.X_OK, effective_ids=True):
            return f"{reached} needs search (x) access for {uid}, to reach {path}"
        if not os.path.isdir(directory):  # missing: created below ``reached``
            break
        reached = directory
    if os.access(reached, os.W_OK | os.X_OK, effective_ids=True):
        return None
    if reached == Path(os.path.abspath(path)).parent:
        return f"{reached} needs write and search (w, x) access for {uid}"
    return (
        f"{reached}, the nearest existing directory above {path}, needs write and search "
        f"(w, x) access for {uid}, to create the missing directories below it"
    )
