"""Token reuse across restarts: ``state_dir`` keeps each profile's token (0700 dir, 0600 files).

A record is used only for the same credentials, recognised by an HMAC of id and secret under a
random key kept beside it: the secret itself is never stored.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from agent.errors import SinkError
from agent.fsutil import atomic_write, remove_stale_temps
from agent.models import Secret, Token

_KEY_FILE = "key"


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


class StateStore:
    """One JSON file per profile under ``directory``."""

    def __init__(self, directory: Path, *, logger: logging.Logger | None = None) -> None:
        self.directory = directory
        self._log = logger or logging.getLogger("agent.state")
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self.prepare()
        assert self._key is not None
        return self._key

    def prepare(self) -> None:
        """Create the directory (0700) and the HMAC key; fail now if that is impossible."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.directory.stat().st_uid == os.geteuid():
                os.chmod(self.directory, 0o700)
            for stale in remove_stale_temps(self.directory):
                self._log.info("removed stale temp file %s", stale)
            key_path = self.directory / _KEY_FILE
            try:
                self._key = bytes.fromhex(key_path.read_text().strip())
            except (FileNotFoundError, ValueError):
                key = secrets.token_bytes(32)
                atomic_write(key_path, key.hex().encode(), 0o600)
                self._key = key
        except OSError as exc:
            raise SinkError(
                f"agent.state_dir {self.directory}: {exc.strerror or exc}; the agent (uid "
                f"{os.geteuid()}) must be able to create and write it (systemd: StateDirectory=)"
            ) from None

    def _path(self, profile: str) -> Path:
        return self.directory / f"{profile}.json"

    def load(self, profile: str, fingerprint: str | None) -> Token | None:
        """The recorded token of ``profile`` if it was minted with these credentials.

        ``fingerprint=None`` skips that check: for when the credential sources cannot be read
        (a store down at start) and the recorded token is the only working one.
        """
        path = self._path(profile)
        try:
            record = msgspec.json.decode(path.read_bytes(), type=_Record)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._log.warning(
                "ignoring unreadable state file %s (%s); a new token will be requested",
                path,
                type(exc).__name__,
                extra={"profile": profile},
            )
            return None
        if fingerprint is not None and not secrets.compare_digest(record.fingerprint, fingerprint):
            return None
        return Token(
            access_token=Secret(record.access_token),
            token_type=record.token_type,
            expires_in=record.expires_in,
            obtained_at=datetime.fromtimestamp(record.obtained_at, UTC),
            expires_at=datetime.fromtimestamp(record.expires_at, UTC),
            scope=record.scope,
            extensions=record.extensions,
        )

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
