"""Token reuse across restarts: ``state_dir`` keeps each profile's token (0700 dir, 0600 files).

A record is used only for the same credentials, recognised by an HMAC of id and secret under a
random key kept beside it: the secret itself is never stored.

Trust on disk (DESIGN §10). ``state_dir`` must be owned by the agent's effective uid, whatever
that uid is: a directory owned by any other uid is refused at :meth:`StateStore.prepare`, for
root too (its owner could plant a record or a key there, and chmod it back after any fix), and
the agent sets the mode of its own directory to 0700. Every file in it is read bounded
(``O_NOFOLLOW | O_NONBLOCK``, a regular file, at most :data:`~agent.models.MAX_ANSWER_BYTES`):
a symlink, FIFO, socket or device planted there is neither followed, waited on nor read. A
recorded token is validated like a server answer before it is handed out (RFC 6750 characters
and size, ``token_type`` bearer, finite times). When no credentials can be read
(``load(profile, None)``), only a state file owned by the agent's uid with no group or other
permission bits is used. A file that is refused is ignored (a new token is requested, or a new
key made) and logged as one warning that names the path and why (once per path and reason).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from agent.errors import SinkError
from agent.fsutil import access_hint, atomic_write, remove_stale_temps
from agent.models import MAX_ANSWER_BYTES, Secret, Token, is_access_token

_KEY_FILE = "key"
#: the key is 32 random bytes, kept as 64 hex digits
_KEY_BYTES = 32
#: a key file is 64 hex digits and maybe a newline; a file larger than this is not one
_KEY_FILE_MAX = 4096
_DIR_MODE = 0o700
#: never wait on a FIFO, never follow a symlink, never take a tty as the controlling terminal
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: the latest time a record may carry: 9999-12-31T23:59:59Z (what datetime can represent)
_MAX_TIMESTAMP = 253402300799.0
_CHUNK = 64 * 1024


class _Record(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    fingerprint: str
    access_token: str
    token_type: str
    expires_in: int
    obtained_at: float
    expires_at: float
    scope: str | None = None
    extensions: dict[str, Any] = msgspec.field(default_factory=dict)
    format: int = 1


class _Refused(Exception):
    """A file in state_dir that is not used; the message says why (no content of the file)."""


class StateStore:
    """One JSON file per profile under ``directory``."""

    def __init__(self, directory: Path, *, logger: logging.Logger | None = None) -> None:
        self.directory = directory
        self._log = logger or logging.getLogger("agent.state")
        self._key: bytes | None = None
        self._warned: set[tuple[str, str]] = set()
        self._warned_lock = threading.Lock()

    @property
    def key(self) -> bytes:
        if self._key is None:
            self.prepare()
        assert self._key is not None
        return self._key

    def prepare(self) -> None:
        """Create the directory (0700) and the HMAC key; fail now if that is impossible.

        Raises :class:`SinkError` when the directory cannot be created or written, or is owned
        by another uid than the agent's.
        """
        try:
            self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            self._secure_directory()
            for stale in remove_stale_temps(self.directory):
                self._log.info("removed stale temp file %s", stale)
            key = self._read_key()
            if key is None:
                key = secrets.token_bytes(_KEY_BYTES)
                atomic_write(self.directory / _KEY_FILE, key.hex().encode(), 0o600)
            self._key = key
        except OSError as exc:
            raise SinkError(
                f"agent.state_dir {self.directory}: {exc.strerror or exc}; {self._hint(exc)}"
            ) from None

    def _hint(self, exc: OSError) -> str:
        """What to do about a state_dir that cannot be created or written: for a permission
        error, the existing directory that needs access (not a missing one below it)."""
        need = (
            f"the agent (uid {os.geteuid()}) must be able to create and write it (systemd: "
            "StateDirectory=)"
        )
        if exc.errno not in (errno.EACCES, errno.EPERM):
            return need
        inside = self.directory / _KEY_FILE  # what it writes once the directory exists
        hint = access_hint(inside if os.path.isdir(self.directory) else self.directory)
        return need if hint is None else f"{hint} (or let systemd create it: StateDirectory=)"

    def _secure_directory(self) -> None:
        """Refuse a directory of another uid; set the mode of the agent's own to 0700."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            euid = os.geteuid()
            if info.st_uid != euid:
                raise SinkError(
                    f"agent.state_dir {self.directory}: owned by uid {info.st_uid}, not by the "
                    f"agent's uid {euid}: its owner could plant a recorded token or key there. "
                    f"Give it to the agent (chown {euid} {self.directory}), let systemd create "
                    "it (StateDirectory=), or point agent.state_dir at a directory of the agent's"
                )
            mode = stat.S_IMODE(info.st_mode)
            if mode != _DIR_MODE:
                os.fchmod(fd, _DIR_MODE)
                if mode & 0o022:
                    self._log.warning(
                        "agent.state_dir %s had mode %04o (writable by other users); set to "
                        "%04o: files in it that the agent did not write are not trusted",
                        self.directory,
                        mode,
                        _DIR_MODE,
                    )
                else:
                    self._log.info(
                        "agent.state_dir %s had mode %04o; set to %04o",
                        self.directory,
                        mode,
                        _DIR_MODE,
                    )
        finally:
            os.close(fd)

    def _read_key(self) -> bytes | None:
        """The recorded HMAC key, or None when there is none to trust (a new one is made)."""
        path = self.directory / _KEY_FILE
        try:
            data = _read_bounded(path, _KEY_FILE_MAX, private=True)
            try:
                key = bytes.fromhex(data.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                raise _Refused("it does not hold a key (hex digits)") from None
            if len(key) != _KEY_BYTES:
                raise _Refused(f"it holds a key of {len(key)} bytes, not {_KEY_BYTES}")
        except FileNotFoundError:
            return None
        except _Refused as exc:
            self._warn_once(
                path,
                str(exc),
                "a new key is made: recorded tokens will not be reused",
            )
            return None
        return key

    def _path(self, profile: str) -> Path:
        return self.directory / f"{profile}.json"

    def load(self, profile: str, fingerprint: str | None) -> Token | None:
        """The recorded token of ``profile`` if it was minted with these credentials.

        ``fingerprint=None`` skips that check: for when the credential sources cannot be read
        (a store down at start) and the recorded token is the only working one; then only a
        file owned by the agent's uid with no group or other permission bits is used. Never
        raises: a file that cannot be trusted is logged and ignored (None).
        """
        path = self._path(profile)
        try:
            data = _read_bounded(path, MAX_ANSWER_BYTES, private=fingerprint is None)
            record = _decode(data)
            token = _token_of(record)
        except FileNotFoundError:
            return None
        except _Refused as exc:
            then = (
                "a new token will be requested"
                if fingerprint is not None
                else "it is not used: a new token will be requested once credentials can be read"
            )
            self._warn_once(path, str(exc), then, profile=profile)
            return None
        if fingerprint is not None and not secrets.compare_digest(
            record.fingerprint.encode(errors="surrogatepass"),
            fingerprint.encode(errors="surrogatepass"),
        ):
            return None
        return token

    def save(self, profile: str, fingerprint: str, token: Token) -> None:
        record = _Record(
            fingerprint=fingerprint,
            access_token=token.access_token.reveal(),
            token_type=token.token_type,
            expires_in=token.expires_in,
            obtained_at=token.obtained_at.timestamp(),
            expires_at=token.expires_at.timestamp(),
            scope=token.scope,
            extensions=dict(token.extensions),
        )
        try:
            atomic_write(self._path(profile), msgspec.json.encode(record), 0o600)
        except OSError as exc:
            self._log.warning(
                "cannot record the token in %s (%s): a restart will request a new one",
                self.directory,
                exc.strerror or exc,
                extra={"profile": profile},
            )

    def _warn_once(self, path: Path, why: str, then: str, *, profile: str | None = None) -> None:
        """One warning per path and reason (a reload or a retry does not repeat it)."""
        with self._warned_lock:
            if (str(path), why) in self._warned:
                return
            self._warned.add((str(path), why))
        self._log.warning(
            "ignoring %s: %s; %s",
            path,
            why,
            then,
            extra={"event": "state_refused"} | ({} if profile is None else {"profile": profile}),
        )


def _read_bounded(path: Path, limit: int, *, private: bool) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Raises FileNotFoundError when there is no file, and :class:`_Refused` for anything else
    that is not a regular file of at most ``limit`` bytes that can be read, or, with
    ``private``, one that is not owned by the agent's uid or has group or other permission bits.
    The file is checked with lstat before it is opened (a FIFO or a device is never opened) and
    again with fstat after (it was not swapped in between).
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Refused(f"it cannot be examined: {exc.strerror or exc}") from None
    _check_kind(before)
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Refused("it is a symbolic link, not a regular file") from None
        raise _Refused(f"it cannot be opened: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        _check_kind(info)
        if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
            raise _Refused("it was replaced while being opened")
        if private:
            _check_private(info)
        if info.st_size > limit:
            raise _Refused(f"it has {info.st_size} bytes, more than the {limit} allowed")
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            except OSError as exc:
                raise _Refused(f"it cannot be read: {exc.strerror or exc}") from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > limit:
                raise _Refused(f"it grew past the {limit} bytes allowed while being read")
            chunks.append(chunk)
    finally:
        os.close(fd)


def _check_kind(info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise _Refused(f"it is {_kind(info.st_mode)}, not a regular file")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"of file type {stat.S_IFMT(mode):o}"


def _check_private(info: os.stat_result) -> None:
    """Only the agent's own file, which no other user can read or write, is trusted."""
    euid = os.geteuid()
    if info.st_uid != euid:
        raise _Refused(
            f"it is owned by uid {info.st_uid}, not by the agent's uid {euid}, and there are no "
            "credentials to check it against (only a file of the agent's uid with mode 0600 is "
            "trusted then)"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise _Refused(
            f"its mode is {mode:04o}: other users may read or write it (the agent writes 0600; "
            "only such a file is trusted without credentials to check it against)"
        )


def _decode(data: bytes) -> _Record:
    try:
        return msgspec.json.decode(data, type=_Record)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # msgspec's message names the field, never its value
        raise _Refused(f"it is not a state record ({exc})") from None
    except RecursionError:
        raise _Refused("it is not a state record (nested too deeply)") from None


def _token_of(record: _Record) -> Token:
    """The record as a Token, validated like a token answer from the auth server."""
    if not is_access_token(record.access_token):
        raise _Refused("its access_token is not an RFC 6750 token (characters or size)")
    if record.token_type.lower() != "bearer":
        raise _Refused("its token_type is not bearer")
    if not 0 < record.expires_in <= _MAX_TIMESTAMP:
        raise _Refused("its expires_in is not a whole number of seconds > 0 (and sane)")
    times = (record.obtained_at, record.expires_at)
    if not all(math.isfinite(t) and 0 <= t <= _MAX_TIMESTAMP for t in times):
        raise _Refused("its obtained_at or expires_at is not a time between 1970 and 9999")
    if record.expires_at < record.obtained_at:
        raise _Refused("its expires_at is before its obtained_at")
    try:
        obtained_at = datetime.fromtimestamp(record.obtained_at, UTC)
        expires_at = datetime.fromtimestamp(record.expires_at, UTC)
    except (OverflowError, OSError, ValueError):
        raise _Refused("its obtained_at or expires_at is not a representable time") from None
    return Token(
        access_token=Secret(record.access_token),
        token_type=record.token_type.lower(),
        expires_in=record.expires_in,
        obtained_at=obtained_at,
        expires_at=expires_at,
        scope=record.scope,
        extensions=record.extensions,
    )
