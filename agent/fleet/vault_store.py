"""The Vault fleet store (DESIGN §13): a :class:`agent.plugin.FleetStore` on Vault KV v2.

Three secrets per fleet key ``K`` under ``<mount>/data/<path>/K/``:

- ``token``: the signed token document as ``{"value": <entry>, "ttl": <seconds>}``; its KV
  version is the document's generation, so a publish of generation ``g`` is a write with
  ``cas = g - 1`` and two agents can never both publish the same generation (newest wins);
- ``lease``: the mint lease, ``{"value": <entry>, "ttl": <seconds>}``, taken with
  ``cas = <current version>`` (0 when absent) when no live lease is there, renewed and released
  (``{"released": true}``) with ``cas = <the version read>`` only while it holds our entry;
- ``marker``: the 429/401 marker (``{"cleared": true}`` when cleared), written without cas.

An entry's remaining life is its ``created_time`` plus its ``ttl`` against Vault's ``Date``
(whole seconds, taken as the middle of the second it names), never the host's clock. Vault
keeps what was written (KV v2 keeps ``max_versions`` of each); an expired entry counts as
absent. The policy the login needs: ``create``, ``update`` and ``read`` on
``<mount>/data/<path>/*``.

This module imports hvac (through the Vault connection): :meth:`agent.fleet.vault.
VaultFleetKind.build` imports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import hvac.exceptions

from agent.errors import AgentError, FleetStoreError
from agent.plugin import Snapshot, Stored
from agent.stores.vault.connection import Exchange, VaultConnection

T = TypeVar("T")

_CAS_MISMATCH = "check-and-set parameter did not match"
#: Vault's ``Date`` names a whole second: the moment of the answer is taken as its middle
_DATE_RESOLUTION = 1.0


@dataclass(frozen=True, slots=True)
class _Entry:
    """One secret as read: its current version (0: never written) and what it holds."""

    version: int
    #: the stored entry (None: absent, deleted, released or cleared)
    value: bytes | None
    #: the ``created_time`` of the current version plus its ``ttl`` (Unix seconds)
    expires_at: float | None


class VaultFleetStore:
    """KV v2 secrets with check-and-set as a fleet store, on a :class:`VaultConnection`."""

    def __init__(
        self,
        connection: VaultConnection,
        *,
        mount: str,
        path: str,
        config_key: str = "fleet",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conn = connection
        self._mount = mount.strip("/")
        self._path = path.strip("/")
        self._key = config_key
        #: only when Vault's answer has no Date (a proxy in between stripped it)
        self._clock = clock
        self.name = f"vault:{self._mount}/{self._path}"
        self._needs = f"create, update and read on {self._mount}/data/{self._path}/*"

    # ------------------------------------------------------------------ FleetStore
    def check(self) -> None:
        if not self._mount:
            raise FleetStoreError(f"{self._key}.mount is empty: name the KV v2 mount")
        if not self._path:
            raise FleetStoreError(f"{self._key}.path is empty: name the fleet's folder")

    def read(self, key: str) -> Snapshot:
        def run(client: Any) -> Snapshot:
            entries: list[_Entry] = []
            dates: list[float] = []
            for name in ("token", "lease", "marker"):
                entry, date = self._get(key, name)
                entries.append(entry)
                if date is not None:
                    dates.append(date)
            moment = _moment(max(dates) if dates else None, self._clock)
            token, lease, marker = (_stored(entry, moment) for entry in entries)
            return Snapshot(
                now=moment,
                token=token,
                lease=lease,
                marker=marker,
                generation=entries[0].version,
            )

        return self._call(run, "read the fleet's secrets", key)

    def acquire(self, key: str, value: bytes, ttl: float) -> bool:
        def run(client: Any) -> bool:
            entry, date = self._get(key, "lease")
            if _live(entry, date, self._clock):
                return False
            return self._put(key, "lease", _body(value, ttl), cas=entry.version)

        return self._call(run, "take the mint lease", key)

    def renew(self, key: str, value: bytes, ttl: float) -> bool:
        def run(client: Any) -> bool:
            entry, date = self._get(key, "lease")
            if entry.value != value or not _live(entry, date, self._clock):
                return False
            return self._put(key, "lease", _body(value, ttl), cas=entry.version)

        return self._call(run, "renew the mint lease", key)

    def release(self, key: str, value: bytes) -> bool:
        def run(client: Any) -> bool:
            entry, _ = self._get(key, "lease")
            if entry.value != value:
                return False
            return self._put(key, "lease", {"released": True}, cas=entry.version)

        return self._call(run, "release the mint lease", key)

    def clear_lease(self, key: str) -> bool:
        def run(client: Any) -> bool:
            entry, date = self._get(key, "lease")
            if not _live(entry, date, self._clock):
                return False
            return self._put(key, "lease", {"released": True}, cas=entry.version)

        return self._call(run, "release the mint lease", key)

    def publish(self, key: str, value: bytes, generation: int, ttl: float) -> bool:
        def run(client: Any) -> bool:
            return self._put(key, "token", _body(value, ttl), cas=generation - 1)

        return self._call(run, "publish the fleet's token", key)

    def mark(self, key: str, value: bytes | None, ttl: float) -> None:
        body = {"cleared": True} if value is None else _body(value, ttl)

        def run(client: Any) -> None:
            self._put(key, "marker", body, cas=None)

        self._call(run, "write the fleet's marker", key)

    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------------ requests
    def secret(self, key: str, name: str) -> str:
        """The path of one of the fleet's secrets inside the mount."""
        return f"{self._path}/{key}/{name}"

    def _call(self, fn: Callable[[Any], T], what: str, key: str) -> T:
        try:
            return self._conn.call(
                fn,
                what=f"{what} ({self._mount}/{self._path}/{key[:8]}…, KV v2)",
                needs=self._needs,
            )
        except FleetStoreError:
            raise
        except AgentError as exc:
            raise FleetStoreError(f"fleet store {self.name} ({self._key}): {exc}") from None

    def _get(self, key: str, name: str) -> tuple[_Entry, float | None]:
        path = f"{self._mount}/data/{self.secret(key, name)}"
        answer = self._conn.exchange("GET", path, accept=(404,))
        return _entry(answer, self._unexpected(name)), answer.date

    def _put(self, key: str, name: str, data: Mapping[str, Any], *, cas: int | None) -> bool:
        """Write ``data``; False when the check-and-set lost (another agent wrote first)."""
        path = f"{self._mount}/data/{self.secret(key, name)}"
        body: dict[str, Any] = {"data": dict(data)}
        if cas is not None:
            body["options"] = {"cas": cas}
        answer = self._conn.exchange("POST", path, body, accept=(400, 404))
        if answer.status == 400:
            errors = (answer.body or {}).get("errors")
            if isinstance(errors, list) and any(_CAS_MISMATCH in str(e) for e in errors):
                return False
            raise hvac.exceptions.InvalidRequest(
                "; ".join(str(e) for e in errors) if isinstance(errors, list) else "bad request",
                errors=errors if isinstance(errors, list) else None,
            )
        if answer.status == 404:
            raise FleetStoreError(
                f"fleet store {self.name}: Vault at {self._conn.address} answered 404 to a "
                f"write of {self._mount}/data/{self._path}/…: is a KV v2 secrets engine "
                f"mounted at {self._mount}/ ({self._key}.mount)?"
            )
        version = _dict(_dict(answer.body).get("data")).get("version")
        if not isinstance(version, int):
            raise FleetStoreError(
                f"fleet store {self.name}: Vault at {self._conn.address} returned no version "
                f"for a write of {self._mount}/{self._path}/…: the fleet store needs a KV "
                f"version 2 mount at {self._mount}/ ({self._key}.mount)"
            )
        return True

    def _unexpected(self, name: str) -> FleetStoreError:
        return FleetStoreError(
            f"fleet store {self.name}: the fleet's {name} secret under {self._mount}/"
            f"{self._path} on Vault at {self._conn.address} is not what the agent writes: "
            f"is {self._key}.path shared with something else?"
        )


def _body(value: bytes, ttl: float) -> dict[str, Any]:
    return {"value": value.decode("utf-8"), "ttl": round(ttl, 3)}


def _entry(answer: Exchange, unexpected: FleetStoreError) -> _Entry:
    """The secret in a KV v2 read answer (a 404: never written, or its version deleted)."""
    data = _dict(_dict(answer.body).get("data"))
    metadata = _dict(data.get("metadata"))
    version = metadata.get("version")
    version = version if isinstance(version, int) and version > 0 else 0
    held = data.get("data")
    if answer.status == 404 or not isinstance(held, dict) or metadata.get("destroyed"):
        return _Entry(version, None, None)
    if held.get("released") is True or held.get("cleared") is True:
        return _Entry(version, None, None)
    value, ttl, created = held.get("value"), held.get("ttl"), metadata.get("created_time")
    if (
        not isinstance(value, str)
        or not isinstance(ttl, int | float)
        or isinstance(ttl, bool)
        or not isinstance(created, str)
    ):
        raise unexpected
    try:
        written = datetime.fromisoformat(created).timestamp()
    except ValueError:
        raise unexpected from None
    return _Entry(version, value.encode("utf-8"), written + float(ttl))


def _moment(date: float | None, clock: Callable[[], float]) -> float:
    return date + _DATE_RESOLUTION / 2 if date is not None else clock()


def _live(entry: _Entry, date: float | None, clock: Callable[[], float]) -> bool:
    return (
        entry.value is not None
        and entry.expires_at is not None
        and entry.expires_at > _moment(date, clock)
    )


def _stored(entry: _Entry, now: float) -> Stored | None:
    if entry.value is None or entry.expires_at is None:
        return None
    remaining = entry.expires_at - now
    return Stored(value=entry.value, remaining=remaining) if remaining > 0 else None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
