"""The ``vault`` source's reader: a KV v2 (or v1) secret holding the client id and secret.

Texts from the secret (its key names, its version's ``created_time``) reach a message or a log
line only through :meth:`~agent.stores.vault.connection.VaultConnection.shown`, which is
:func:`agent.masking.outside` with the connection's credentials and the secret's values masked
(DESIGN §10). Vault's own error texts are made safe by the connection itself.

This module imports hvac: the vault source kind (:mod:`agent.sources.vault`) imports it in
its build().
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any

import hvac.exceptions

from agent.errors import ConfigError, SourceEmpty
from agent.models import Credentials, Secret
from agent.sources.vault import VaultSourceConfig
from agent.stores.vault.connection import VaultConnection


class VaultSource:
    """Reads credentials from a Vault KV secret.

    KV v2: ``version`` asks only the metadata endpoint (``current_version``), never the
    secret, so a poll reads no secret value. The version also carries the creation time of that
    secret version, so a secret deleted with its metadata and written again (a rebuilt Vault:
    the version restarts at 1) is a change even when the number is the same. A deleted or
    destroyed current version reads as empty.

    KV v1 has no versions: ``version`` reads the secret and returns a keyed hash (HMAC under a
    random key of this instance) of the two values. The key changes at every start, which is
    harmless: the baseline is taken from the credentials read by the same instance.
    """

    name = "vault"

    def __init__(
        self,
        connection: VaultConnection,
        settings: VaultSourceConfig,
        *,
        config_key: str = "vault",
        logger: logging.Logger | None = None,
    ) -> None:
        """``settings`` is the ``[vault]`` table; ``config_key`` its key path, for messages."""
        if settings.path is None:
            raise ConfigError(f"{config_key}.path: required: the secret's path inside mount")
        self._conn = connection
        self._settings = settings
        self._path: str = settings.path
        self._key = config_key
        self._log = logger if logger is not None else logging.getLogger("agent.sources.vault")
        self._hash_key = secrets.token_bytes(32)
        s = settings
        self._where = f"{s.mount.strip('/')}/{self._path.strip('/')}"
        if s.kv_version == 2:
            data = f"{s.mount.strip('/')}/data/{self._path.strip('/')}"
            metadata = f"{s.mount.strip('/')}/metadata/{self._path.strip('/')}"
            self._needs = f"read on {data} (and {metadata} for version polling)"
        else:
            self._needs = f"read on {self._where}"

    def read(self) -> Credentials:
        s = self._settings
        what = f"read {self._where} (KV v{s.kv_version})"
        if s.kv_version == 2:
            response = self._conn.call(self._read_v2, what=what, needs=self._needs)
            body = _dict(response.get("data"))
            meta = _dict(body.get("metadata"))
            data = body.get("data")
            version = _v2_version(meta.get("version"), meta.get("created_time"))
        else:
            response = self._conn.call(self._read_v1, what=what, needs=self._needs)
            data = response.get("data")
            version = ""
        client_id, client_secret = self._values(data)
        if s.kv_version == 1:
            version = self._v1_version(client_id, client_secret)
        self._log.debug(
            "read credentials from %s on Vault at %s (version %s)",
            self._where,
            self._conn.address,
            self._conn.shown(version, (client_id, client_secret)),
        )
        return Credentials(
            client_id=client_id,
            client_secret=Secret(client_secret),
            source=self.name,
            version=version,
        )

    def can_change(self) -> bool:
        return True

    def version(self) -> str:
        s = self._settings
        if s.kv_version == 1:
            return self.read().version  # no versions in KV v1: hash the values
        response = self._conn.call(
            self._read_metadata, what=f"read the metadata of {self._where}", needs=self._needs
        )
        meta = _dict(response.get("data"))
        current = meta.get("current_version")
        if not isinstance(current, int) or current < 1:
            raise self._missing()
        entry = _dict(_dict(meta.get("versions")).get(str(current)))
        version = _v2_version(current, entry.get("created_time"))
        if entry.get("deletion_time") or entry.get("destroyed"):
            return f"{version}:deleted"
        return version

    def close(self) -> None:
        self._conn.close()

    # -- hvac calls (run by VaultConnection.call) ---------------------------------------------

    def _read_v2(self, client: Any) -> dict[str, Any]:
        s = self._settings
        try:
            response = client.secrets.kv.v2.read_secret_version(
                path=self._path, mount_point=s.mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            raise self._missing() from None
        return _dict(response)

    def _read_v1(self, client: Any) -> dict[str, Any]:
        s = self._settings
        try:
            response = client.secrets.kv.v1.read_secret(path=self._path, mount_point=s.mount)
        except hvac.exceptions.InvalidPath:
            raise self._missing() from None
        return _dict(response)

    def _read_metadata(self, client: Any) -> dict[str, Any]:
        s = self._settings
        try:
            # the poll's call: the connection's lean GET, not hvac's request building
            response = self._conn.get(f"{s.mount}/metadata/{self._path}")
        except hvac.exceptions.InvalidPath:
            raise self._missing() from None
        return _dict(response)

    # -- values and messages ------------------------------------------------------------------

    def _values(self, data: Any) -> tuple[str, str]:
        s = self._settings
        if not isinstance(data, dict):
            raise self._missing()
        values = []
        for key, setting in (
            (s.client_id_key, "client_id_key"),
            (s.client_secret_key, "client_secret_key"),
        ):
            value = data.get(key)
            if isinstance(value, str) and value:
                values.append(value)
                continue
            # key names come from the store: shown masked (a value pasted as a key), cut
            held = [value for value in data.values() if isinstance(value, str)]
            names = ", ".join(repr(str(name)) for name in sorted(data, key=str))
            present = self._conn.shown(names, held) if names else "none"
            problem = "has no key" if key not in data else "has an empty or non-string value at"
            raise SourceEmpty(
                f"the secret at {self._where} on Vault at {self._conn.address} {problem} "
                f"{key!r} (keys present: {present}): write it, or set "
                f"{self._key}.{setting} to the key that holds it"
            )
        return values[0], values[1]

    def _missing(self) -> SourceEmpty:
        s = self._settings
        return SourceEmpty(
            f"no secret at {self._where} on Vault at {self._conn.address} (KV "
            f"v{s.kv_version}): check {self._key}.path, mount and kv_version"
        )

    def _v1_version(self, client_id: str, client_secret: str) -> str:
        material = client_id.encode() + b"\0" + client_secret.encode()
        return "kv1:" + hmac.new(self._hash_key, material, hashlib.sha256).hexdigest()[:32]


def _v2_version(number: Any, created_time: Any) -> str:
    """``kv2:<version>@<created_time>``: the number alone repeats after a rebuild."""
    if isinstance(created_time, str) and created_time:
        return f"kv2:{number}@{created_time}"
    return f"kv2:{number}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
