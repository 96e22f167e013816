"""The ``vault`` sink's writer: the token document written back to a Vault KV v2 secret (DESIGN §4).

Other hosts read the same JSON document as the file sink's ``json`` format. Writes use
check-and-set and the newest token wins (STYLE, Vault Agent): a stored document whose
``expires_at`` is later than ours is left alone, and a write that lost a check-and-set race
reads again and decides again, so a concurrent writer never loses the newest token.

Vault's texts reach a message only through :func:`agent.masking.outside` (see
:class:`~agent.stores.vault.connection.VaultConnection`), with the token being written and the
one stored masked as well as the connection's own credentials (DESIGN §10).

This module imports hvac: the vault sink kind (:mod:`agent.sinks.vault`) imports it in its
build().
"""

from __future__ import annotations

import logging
from typing import Any

import hvac.exceptions

from agent.errors import AgentError, SinkError
from agent.models import Token
from agent.sinks.base import keep_stored
from agent.sources.vault import VaultSourceConfig
from agent.stores.vault.connection import VaultConnection

#: how many times a write reads and decides again after losing a check-and-set race
CAS_ATTEMPTS = 3

_CAS_MISMATCH = "check-and-set parameter did not match"


class _Conflict:
    """Returned by one attempt that lost a check-and-set race."""


_CONFLICT = _Conflict()


class VaultSink:
    """Writes each new token's document to a KV v2 secret; a :class:`TokenSink`.

    Every request goes through the shared :class:`VaultConnection` (logged in, re-authenticated
    after a 403, no hidden retries); its errors become :class:`SinkError`.
    """

    readiness = False

    def __init__(
        self,
        connection: VaultConnection,
        settings: VaultSourceConfig,
        *,
        config_key: str = "sinks[0]",
        logger: logging.Logger | None = None,
    ) -> None:
        """``settings``: the sink's keys over the profile's ``[vault]`` table
        (:func:`agent.sinks.vault.merged`), ``path`` set; ``config_key`` the sink's key path."""
        if settings.path is None:
            raise SinkError(f"{config_key}.path: required: the secret's path inside mount")
        self._conn = connection
        self._settings = settings
        self._key = config_key
        self._log = logger if logger is not None else logging.getLogger("agent.sinks.vault")
        self._mount = settings.mount.strip("/")
        self._path = settings.path.strip("/")
        self.name = f"vault:{self._mount}/{self._path}"
        self._needs = (
            f"create and update on {self._mount}/data/{self._path}, and read on it "
            "(for check-and-set)"
        )

    def check(self) -> None:
        """The settings only: Vault being down at start must not stop the other sinks."""
        key = self._key
        if not self._mount:
            raise SinkError(f"{key}.mount is empty: name the KV v2 mount (e.g. secret)")
        if not self._path:
            raise SinkError(f"{key}.path is empty: name the secret (e.g. dvs/osigu-token)")

    def write(self, token: Token) -> None:
        """Store ``token.document()`` unless a document that expires later is stored already.

        Raises :class:`SinkError` naming Vault's address, the mount and path, and the cause.
        """
        document = token.document()
        what = f"write {self._mount}/{self._path} (KV v2)"
        # values Vault could echo in an error: the token we write and the one stored
        secrets = [token.access_token.reveal()]
        for _ in range(CAS_ATTEMPTS):
            try:
                outcome = self._conn.call(
                    lambda client: self._attempt(client, document, secrets),
                    what=what,
                    needs=self._needs,
                    secrets=secrets,
                )
            except SinkError:
                raise
            except AgentError as exc:
                raise SinkError(f"vault sink {self._key}: {exc}") from None
            if outcome is not _CONFLICT:
                return
            self._log.debug(
                "%s on Vault at %s changed while writing: reading it again",
                self.name,
                self._conn.address,
            )
        raise SinkError(
            f"vault sink {self._key}: {self._mount}/{self._path} on Vault at "
            f"{self._conn.address} changed during each of {CAS_ATTEMPTS} check-and-set writes: "
            "another writer is busy on it; the next attempt will try again"
        )

    def settle(self, timeout: float | None = None) -> bool:
        return True  # nothing runs in the background

    def close(self) -> None:
        """Drop the connection's client (the token is not revoked; a later call logs in)."""
        self._conn.close()

    # -- one read-decide-write round (run by VaultConnection.call) ----------------------------

    def _attempt(
        self, client: Any, document: dict[str, Any], secrets: list[str]
    ) -> _Conflict | None:
        version, stored = self._read_current(client)
        if stored is not None and isinstance(stored.get("access_token"), str):
            secrets.append(stored["access_token"])
        if keep_stored(stored, document, sink=self.name, log=self._log):
            return None
        try:
            response = client.secrets.kv.v2.create_or_update_secret(
                path=self._path, secret=document, cas=version, mount_point=self._mount
            )
        except hvac.exceptions.InvalidRequest as exc:
            if any(_CAS_MISMATCH in str(error) for error in (exc.errors or ())):
                return _CONFLICT
            raise
        except hvac.exceptions.InvalidPath:
            raise self._no_mount() from None
        written = _dict(_dict(response).get("data")).get("version")
        if not isinstance(written, int):
            # a KV v1 mount takes the same request and stores it at "data/PATH"
            raise SinkError(
                f"vault sink {self._key}: Vault at {self._conn.address} "
                f"returned no version for {self._mount}/{self._path}: the vault sink needs a "
                f"KV version 2 mount at {self._mount}/ ({self._key}.mount)"
            )
        self._log.debug(
            "wrote %s on Vault at %s (version %s, expires %s)",
            self.name,
            self._conn.address,
            written,
            document["expires_at"],
        )
        return None

    def _read_current(self, client: Any) -> tuple[int, dict[str, Any] | None]:
        """The current version (0: no secret yet) and its document (None: none or deleted)."""
        try:
            response = client.secrets.kv.v2.read_secret_version(
                path=self._path, mount_point=self._mount, raise_on_deleted_version=False
            )
        except hvac.exceptions.InvalidPath as exc:
            # 404: no secret, or its current version is destroyed (metadata still counts it)
            body = exc.json if isinstance(getattr(exc, "json", None), dict) else {}
            version = _dict(_dict(body.get("data")).get("metadata")).get("version")
            return (version if isinstance(version, int) else 0), None
        body = _dict(_dict(response).get("data"))
        version = _dict(body.get("metadata")).get("version")
        data = body.get("data")  # None when the current version is deleted
        return (version if isinstance(version, int) else 0), (
            data if isinstance(data, dict) else None
        )

    def _no_mount(self) -> SinkError:
        return SinkError(
            f"vault sink {self._key}: Vault at {self._conn.address} answered 404 "
            f"to a write of {self._mount}/data/{self._path}: is a KV v2 secrets engine mounted "
            f"at {self._mount}/ ({self._key}.mount)?"
        )


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
