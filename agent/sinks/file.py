"""The file sink: the token on local disk, written atomically (DESIGN §4).

A write is :func:`agent.fsutil.atomic_write`, the one atomic writer: a temp file in the same
directory (``O_CREAT|O_EXCL|O_NOFOLLOW``, 0600) gets the ``mode`` and ``owner``/``group``, is
filled and ``fsync``-ed, and is then renamed onto the path, after which the directory is
``fsync``-ed. A reader therefore sees the old token or the new one, never a partial file, even
when the agent is killed mid-write. Temp files left by a kill -9 (``.<basename>.dvs-agent.<16
hex>.tmp``: the writer's pid, then random) are removed by :meth:`FileSink.check`, except this
process's own (a write in flight).

After a write that changed the file, ``on_change`` is handed to an
:class:`agent.hooks.HookRunner`: it runs beside the refresh, never in it (DESIGN §10), with the
allowlisted environment of :func:`agent.hooks.hook_environment`.

The token is read (``Secret.reveal``) only in :func:`render` and to mask it in a hook's stderr;
no message here ever contains it.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import re
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Literal, get_args

import msgspec

from agent.config.checks import normalised_path
from agent.config.values import Duration, FileMode
from agent.errors import SinkError
from agent.fsutil import (
    NotDurable,
    OwnershipError,
    access_hint,
    atomic_write,
    probe_write,
    stale_temps,
)
from agent.hooks import MAX_TIMEOUT, HookRunner, hook_environment
from agent.keypath import toml_repr
from agent.models import Token, rfc3339
from agent.plugin import BuildContext, SinkKind, Target, Where

#: raw | json | env (:func:`render`)
Format = Literal["raw", "json", "env"]
#: the longest an ``on_change`` command may run before it is killed (DESIGN §10)
MAX_ON_CHANGE_TIMEOUT = timedelta(seconds=MAX_TIMEOUT)

_DIR_MODE = 0o750
#: characters that would break a ``KEY=VALUE`` line of an env file
_ENV_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")

_log = logging.getLogger(__name__)


class FileSinkConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="file",
    tag_field="type",
):
    """``[[profiles.NAME.sinks]]`` with ``type = "file"`` (DESIGN §4)."""

    path: str
    #: raw | json | env
    format: Format = "raw"
    #: applied at every write; never world-writable
    mode: FileMode = FileMode(0o640)
    #: user and group names (or numeric ids) applied at every write; None leaves them as created
    owner: str | None = None
    group: str | None = None
    #: argv run after each new token (no shell); None runs nothing
    on_change: list[str] | None = None
    #: how long ``on_change`` may run before it is killed
    on_change_timeout: Duration = Duration(seconds=30)


class FileKind(SinkKind[FileSinkConfig]):
    name = "file"
    config_type = FileSinkConfig

    def check(self, config: FileSinkConfig, where: Where) -> Iterator[str]:
        sink = config
        if not sink.path:
            yield f"{where.at('path')}: must not be empty"
        elif sink.path.endswith(os.sep):
            yield (
                f"{where.at('path')}: {toml_repr(sink.path)} names a directory; give the "
                "file's path"
            )
        for id_key in ("owner", "group"):
            if getattr(sink, id_key) == "":
                yield (
                    f"{where.at(id_key)}: must not be empty (leave the key out to keep the default)"
                )
        if sink.on_change is not None and (not sink.on_change or not sink.on_change[0]):
            yield (
                f"{where.at('on_change')}: must be a non-empty argv list, e.g. "
                '["systemctl", "reload", "my-app"] (leave the key out to run nothing)'
            )
        if sink.on_change_timeout <= timedelta(0):
            yield f"{where.at('on_change_timeout')}: must be more than 0"
        elif sink.on_change_timeout > MAX_ON_CHANGE_TIMEOUT:
            yield (
                f"{where.at('on_change_timeout')}: must be at most 5 minutes (the command is "
                "killed then; a longer job should be started by it, not run in it)"
            )

    def describe(self, config: FileSinkConfig, where: Where) -> str:
        hook = f", on_change {config.on_change[0]}" if config.on_change else ""
        return f"file {config.path} ({config.format}, {int(config.mode):04o}{hook})"

    def targets(self, config: FileSinkConfig, where: Where) -> Iterator[Target]:
        if config.path:
            yield Target(
                store="file",
                identity=(normalised_path(config.path),),
                what=toml_repr(config.path),
                key=where.at("path"),
                noun="file",
            )

    def commands(self, config: FileSinkConfig, where: Where) -> Iterator[tuple[str, Sequence[str]]]:
        if config.on_change:
            yield where.at("on_change"), config.on_change

    def build(self, config: FileSinkConfig, context: BuildContext) -> FileSink:
        return FileSink(
            config, profile=context.where.profile, logger=logging.getLogger("agent.sink")
        )


KIND = FileKind()


def render(token: Token, fmt: Format) -> bytes:
    """The bytes the sink writes for ``token`` in format ``fmt``.

    ``raw`` is the token alone with no trailing newline; ``json`` is the token document
    (:meth:`Token.document`) and a newline; ``env`` is three ``KEY=VALUE`` lines that systemd's
    ``EnvironmentFile`` and ``docker --env-file`` both read.
    """
    value = token.access_token.reveal()
    if fmt == "raw":
        return value.encode()
    if fmt == "json":
        return msgspec.json.encode(token.document()) + b"\n"
    if fmt == "env":
        if _ENV_UNSAFE.search(value) or _ENV_UNSAFE.search(token.token_type):
            # an opaque RFC 6750 token never has these; refuse rather than write a broken file
            raise SinkError("the token contains control characters: it cannot be written as env")
        return (
            f"DVS_ACCESS_TOKEN={value}\n"
            f"DVS_TOKEN_TYPE={token.token_type.lower()}\n"
            f"DVS_TOKEN_EXPIRES_AT={rfc3339(token.expires_at)}\n"
        ).encode()
    raise SinkError(
        f"unknown file sink format {fmt!r}: choose one of {', '.join(get_args(Format))}"
    )


class FileSink:
    """Writes each new token to one file; satisfies :class:`agent.sinks.base.TokenSink`."""

    readiness = True

    def __init__(
        self,
        config: FileSinkConfig,
        *,
        profile: str = "",
        logger: logging.Logger | None = None,
    ) -> None:
        self.config = config
        #: the file consumers read; never a symlink
        self.path = Path(config.path)
        self.fmt: Format = config.format
        #: permission bits applied at every write (``fchmod``, so the umask does not apply)
        self.mode = int(config.mode)
        #: user and group (names or numeric ids) applied at every write; None leaves them
        self.owner = config.owner
        self.group = config.group
        #: argv run (no shell) after each successful write; None or empty runs nothing
        self.on_change: tuple[str, ...] = tuple(config.on_change or ())
        on_change_timeout = config.on_change_timeout.total_seconds()
        #: the profile this sink belongs to (``DVS_PROFILE`` of on_change)
        self.profile = profile
        self.name = f"file:{self.path}"
        self._log = logger or _log
        self._hook: HookRunner | None = None
        if self.on_change:
            self._hook = HookRunner(
                self.on_change,
                timeout=on_change_timeout,
                env=hook_environment(
                    os.environ, profile=profile, token_file=os.fspath(self.path.absolute())
                ),
                label=str(self.path),
                logger=self._log,
            )
        self._dir = self.path.parent
        self._ids: tuple[int, int] | None = None
        self._lock = threading.Lock()

    # -- the TokenSink protocol ---------------------------------------------------------

    def check(self) -> None:
        """Prove at start that :meth:`write` can succeed, and clean up after a kill -9.

        Raises :class:`SinkError` for a symlink (or a non-file) at the path, an invalid
        ``mode``, an unknown ``owner``/``group``, a directory that cannot be created or written,
        or ownership the agent is not allowed to give.
        """
        if self.fmt not in get_args(Format):
            raise SinkError(
                f"{self.path}: unknown format {self.fmt!r}: choose one of "
                f"{', '.join(get_args(Format))}"
            )
        if not 0 <= self.mode <= 0o7777:
            raise SinkError(f"{self.path}: mode {self.mode:#o} is not a file mode (e.g. 0640)")
        uid, gid = self._resolve_ids()
        self._refuse_unsafe_target()
        self._ensure_dir(gid)
        self._remove_stale_temp_files()
        self._refuse_sticky_replace()
        # the probe goes through the same steps as a write, minus the rename
        try:
            probe_write(self.path, self.mode, uid=uid, gid=gid)
        except OSError as exc:
            raise self._write_error(exc) from None

    def write(self, token: Token) -> None:
        """Replace the file with ``token`` atomically, then start ``on_change``.

        Returns once the file is in place: ``on_change`` runs beside (one run at a time; a
        newer token while it runs → one more run after it). Raises :class:`SinkError` naming
        the path and the system error; the temp file is removed on any failure and the previous
        file is left as it was.
        """
        data = render(token, self.fmt)
        with self._lock:
            uid, gid = self._resolve_ids()
            self._refuse_unsafe_target()
            if self._holds(data, uid, gid):
                # e.g. a restart reusing the recorded token: no rewrite, no on_change
                self._log.debug("%s already holds this token", self.path)
                return
            if not self._dir.is_dir():
                self._ensure_dir(gid)
            try:
                atomic_write(self.path, data, self.mode, uid=uid, gid=gid)
            except OSError as exc:
                raise self._write_error(exc) from None
            self._log.debug("wrote %s (%s, mode %#o)", self.path, self.fmt, self.mode)
        if self._hook is not None:
            self._hook.submit((token.access_token.reveal(),))

    def _holds(self, data: bytes, uid: int, gid: int) -> bool:
        """True when the file already has exactly these bytes, mode and ownership."""
        try:
            st = os.lstat(self.path)
            if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != self.mode:
                return False
            if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
                return False
            if st.st_size != len(data):
                return False
            return self.path.read_bytes() == data
        except OSError:
            return False

    def close(self) -> None:
        """Kill a running ``on_change`` (its whole process group) and run no more; the file
        stays in place so consumers keep working."""
        if self._hook is not None:
            self._hook.stop()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until no ``on_change`` runs or is pending (e.g. before :meth:`close` in a
        one-shot run); True when none does."""
        return self._hook is None or self._hook.wait(timeout)

    # -- helpers ------------------------------------------------------------------------

    def _resolve_ids(self) -> tuple[int, int]:
        """(uid, gid) to apply, -1 for "leave as created"; names are looked up once."""
        if self._ids is None:
            self._ids = (
                _resolve("owner", self.owner, _uid_of),
                _resolve("group", self.group, _gid_of),
            )
        return self._ids

    def _refuse_unsafe_target(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SinkError(f"cannot inspect {self.path}: {self._explain(exc)}") from None
        if stat.S_ISLNK(st.st_mode):
            raise SinkError(
                f"{self.path} is a symlink; the file sink refuses symlinks: "
                "remove it or point sinks.path at a regular file"
            )
        if not stat.S_ISREG(st.st_mode):
            raise SinkError(f"{self.path} exists and is not a regular file: choose another path")

    def _ensure_dir(self, gid: int) -> None:
        """Create the missing directories above the path with mode 0750 (and ``group``)."""
        missing: list[Path] = []
        here = self._dir
        while not here.exists() and here != here.parent:
            missing.append(here)
            here = here.parent
        for directory in reversed(missing):
            try:
                os.mkdir(directory, _DIR_MODE)
            except FileExistsError:
                continue  # created meanwhile by someone else: leave it as it is
            except OSError as exc:
                raise SinkError(
                    f"cannot create directory {directory} for {self.path}: {self._explain(exc)}"
                ) from None
            try:
                os.chmod(directory, _DIR_MODE)  # the umask may have taken bits away
                if gid != -1:  # members of the file's group must be able to reach it
                    os.chown(directory, -1, gid)
            except OSError as exc:
                raise SinkError(
                    f"cannot set mode/group of directory {directory}: {self._explain(exc)}"
                ) from None
        if not self._dir.is_dir():
            raise SinkError(f"{self._dir} (the directory of {self.path}) is not a directory")

    def _remove_stale_temp_files(self) -> None:
        # a temp of this process is a write in flight (a reload checks a rebuilt sink while
        # another profile's refresh may be writing): stale_temps never lists one
        try:
            stale = stale_temps(self._dir, self.path.name)
        except OSError as exc:
            raise SinkError(
                f"cannot list {self._dir} (for {self.path}): {self._explain(exc)}"
            ) from None
        for temp in stale:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise SinkError(
                    f"cannot remove stale temp file {temp}: {self._explain(exc)}"
                ) from None
            self._log.info("removed stale temp file %s", temp)

    def _refuse_sticky_replace(self) -> None:
        """In a sticky directory (like /tmp) only the file's owner may replace it."""
        euid = os.geteuid()
        if euid == 0:
            return
        try:
            dir_st = os.stat(self._dir)
            file_st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SinkError(f"cannot inspect {self.path}: {self._explain(exc)}") from None
        if dir_st.st_mode & stat.S_ISVTX and euid not in (file_st.st_uid, dir_st.st_uid):
            raise SinkError(
                f"cannot replace {self.path}: it belongs to uid {file_st.st_uid} in the sticky "
                f"directory {self._dir}, and the agent runs as uid {euid}: remove the file or "
                "choose another sinks.path"
            )

    def _write_error(self, exc: OSError) -> SinkError:
        """The SinkError of a failed :func:`~agent.fsutil.atomic_write` (or its probe)."""
        if isinstance(exc, OwnershipError):
            return SinkError(
                f"cannot set owner/group of {self.path} (owner={self.owner!r}, "
                f"group={self.group!r}): operation not permitted: the agent runs as uid "
                f"{os.geteuid()}; changing the owner needs root (CAP_CHOWN) and the group needs "
                "membership of it"
            )
        if isinstance(exc, NotDurable):
            # the new file is in place but may not survive a power loss: report it
            return SinkError(
                f"wrote {self.path} but could not fsync {self._dir}: {self._explain(exc)}"
            )
        return SinkError(f"cannot write {self.path}: {self._explain(exc)}")

    def _explain(self, exc: OSError) -> str:
        """The errno text and, where there is one, the likely fix."""
        text = exc.strerror or type(exc).__name__
        if exc.errno in (errno.EACCES, errno.EPERM):
            hint = access_hint(self.path)  # the existing directory, not a missing one below it
            if hint is not None:
                return (
                    f"{text.lower()}: {hint}: grant it (chmod, chown or setfacl) or choose "
                    "another sinks.path"
                )
            return (
                f"{text.lower()}: the agent runs as uid {os.geteuid()}; give it write access "
                f"to {self._dir} or choose another sinks.path"
            )
        if exc.errno == errno.EROFS:
            return f"{text.lower()}: {self._dir} is on a read-only file system"
        return text


def _resolve(key: str, value: str | None, lookup: Callable[[str], int]) -> int:
    if value is None or value == "":
        return -1
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    try:
        return lookup(text)
    except KeyError:
        raise SinkError(
            f"sinks.{key} = {text!r}: no such {'user' if key == 'owner' else 'group'} on this "
            "host (use a name that exists or a numeric id)"
        ) from None


def _uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid_of(name: str) -> int:
    return grp.getgrnam(name).gr_gid
