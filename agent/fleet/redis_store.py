"""The Redis fleet store (DESIGN §13): a :class:`agent.plugin.FleetStore` on redis-py.

Four keys per fleet key ``K``, all with the hash tag ``{K}`` so that they sit in one Cluster
slot and one Lua script reads or writes them together:

- ``<prefix>{K}:token``: the signed token document, ``PX`` = the token's remaining life;
- ``<prefix>{K}:lease``: the mint lease, ``SET NX PX lease``;
- ``<prefix>{K}:marker``: the 429/401 marker;
- ``<prefix>{K}:generation``: the last generation published (kept 7 days, or twice the token's
  life if longer), so that a newer document always carries a higher number.

Every read is one script that also returns Redis' ``TIME``: remaining lives are Redis' ``PTTL``
and the snapshot's time is Redis' clock, never the host's. The ACL user needs ``+eval +evalsha
+set +del +pexpire +time +get +pttl`` (``+select`` for a database other than 0) on
``~<prefix>*``.

Standalone (``url``), Sentinel (``sentinels`` + ``service_name``: the master is asked of the
sentinels at each new connection, so a failover is followed) or Cluster (``cluster = true``).
The client makes no retries of its own, except one at once after a connection error in Sentinel
or Cluster mode (the failover case); the agent's own schedule is the retry layer. The password
files are read when the client is built and again after Redis rejected them.

This module imports redis-py: :meth:`agent.fleet.redis.RedisFleetKind.build` imports it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent.errors import FleetStoreError
from agent.fleet.redis import RedisFleetConfig, sentinel_address
from agent.masking import outside
from agent.plugin import Snapshot, Stored
from agent.sinks.redis import Endpoint, parse_url
from agent.stores.redis import password_from_file, tls_options, tls_trust

T = TypeVar("T")

#: KEYS token, lease, marker, generation. Returns Redis' TIME (s, µs), then value and PTTL of
#: token, lease and marker (false and -2 when absent), then the generation (false: none).
READ = """
local t = redis.call('TIME')
local out = {t[1], t[2]}
for i = 1, 3 do
  out[#out + 1] = redis.call('GET', KEYS[i])
  out[#out + 1] = redis.call('PTTL', KEYS[i])
end
out[#out + 1] = redis.call('GET', KEYS[4])
return out
"""

#: KEYS lease; ARGV value, ttl ms: extend the lease only if it still holds ``value``.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: KEYS lease; ARGV value: drop the lease only if it still holds ``value``.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: KEYS token, generation; ARGV document, generation, token ttl ms, generation ttl ms: write
#: only a generation above the stored one (newest wins); 1 when written, 0 when not.
PUBLISH = """
local current = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local wanted = tonumber(ARGV[2])
if wanted <= current then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""

#: how long the generation counter outlives a publish, at least (s)
GENERATION_KEEP = 7 * 24 * 3600.0


class RedisFleetStore:
    """Standalone, Sentinel or Cluster Redis as a fleet store."""

    def __init__(
        self,
        config: RedisFleetConfig,
        *,
        timeout: float = 5.0,
        config_key: str = "fleet",
        logger: logging.Logger | None = None,
    ) -> None:
        self._config = config
        self._timeout = timeout
        self._key = config_key
        self._log = logger if logger is not None else logging.getLogger("agent.fleet.redis")
        self._lock = threading.Lock()
        self._client: Any = None
        self._sentinel: Any = None
        #: the passwords in use, kept only to blank them out of error texts
        self._passwords: list[str] = []
        self._endpoint: Endpoint | None = None
        if config.url is not None:
            endpoint = parse_url(config.url)
            self._endpoint = None if isinstance(endpoint, str) else endpoint
        if config.sentinels:
            self.name = f"redis-sentinel:{config.service_name}"
            self._where = (
                f"Redis master {config.service_name} via sentinels {', '.join(config.sentinels)}"
            )
        else:
            shown = self._endpoint.address if self._endpoint else str(config.url)
            db = f"/{self._endpoint.db}" if self._endpoint and not config.cluster else ""
            self.name = f"redis{'-cluster' if config.cluster else ''}:{shown}{db}"
            self._where = f"Redis {'Cluster node' if config.cluster else 'at'} {shown}{db}"

    # ------------------------------------------------------------------ FleetStore
    def check(self) -> None:
        """The URL parses and the password files can be read (no connection is made)."""
        c = self._config
        if c.url is not None and self._endpoint is None:
            endpoint = parse_url(c.url)
            raise FleetStoreError(f"{self._key}.url: {endpoint}")
        self._read_passwords()

    def keys(self, key: str) -> tuple[str, str, str, str]:
        base = f"{self._config.key_prefix}{{{key}}}"
        return f"{base}:token", f"{base}:lease", f"{base}:marker", f"{base}:generation"

    def read(self, key: str) -> Snapshot:
        names = self.keys(key)
        out = self._run("read", lambda client: client.eval(READ, 4, *names))
        try:
            seconds, micros = int(out[0]), int(out[1])
            entries = [_stored(out[2 + 2 * i], out[3 + 2 * i]) for i in range(3)]
            generation = int(out[8]) if out[8] is not None else 0
        except (IndexError, TypeError, ValueError):
            raise FleetStoreError(
                f"{self._where} answered the read with something unexpected: is this Redis?"
            ) from None
        return Snapshot(
            now=seconds + micros / 1e6,
            token=entries[0],
            lease=entries[1],
            marker=entries[2],
            generation=max(generation, 0),
        )

    def acquire(self, key: str, value: bytes, ttl: float) -> bool:
        lease = self.keys(key)[1]
        done = self._run("lease", lambda c: c.set(lease, value, nx=True, px=_ms(ttl)))
        return bool(done)

    def renew(self, key: str, value: bytes, ttl: float) -> bool:
        lease = self.keys(key)[1]
        return bool(self._run("lease renewal", lambda c: c.eval(RENEW, 1, lease, value, _ms(ttl))))

    def release(self, key: str, value: bytes) -> bool:
        lease = self.keys(key)[1]
        return bool(self._run("lease release", lambda c: c.eval(RELEASE, 1, lease, value)))

    def clear_lease(self, key: str) -> bool:
        lease = self.keys(key)[1]
        return bool(self._run("lease release", lambda c: c.delete(lease)))

    def publish(self, key: str, value: bytes, generation: int, ttl: float) -> bool:
        token, _, _, counter = self.keys(key)
        keep = _ms(max(GENERATION_KEEP, 2 * ttl))
        done = self._run(
            "publish",
            lambda c: c.eval(PUBLISH, 2, token, counter, value, generation, _ms(ttl), keep),
        )
        return bool(done)

    def mark(self, key: str, value: bytes | None, ttl: float) -> None:
        marker = self.keys(key)[2]
        if value is None:
            self._run("marker", lambda c: c.delete(marker))
        else:
            self._run("marker", lambda c: c.set(marker, value, px=_ms(ttl)))

    def close(self) -> None:
        self._drop_client()

    # ------------------------------------------------------------------ connection
    def _run(self, what: str, command: Callable[[Any], T]) -> T:
        """``command(client)``; once more at once after a connection error when Sentinel or
        Cluster may have moved the master; FleetStoreError for any failure."""
        tries = 2 if (self._config.sentinels or self._config.cluster) else 1
        for attempt in range(tries):
            client = self._ensure_client()
            try:
                return command(client)
            except (redis.exceptions.ConnectionError, redis.exceptions.ReadOnlyError) as exc:
                failed: redis.exceptions.RedisError = exc
                if attempt + 1 < tries and not isinstance(exc, redis.exceptions.TimeoutError):
                    continue
            except redis.exceptions.RedisError as exc:
                failed = exc
            if isinstance(failed, redis.exceptions.AuthenticationError):
                self._drop_client()  # the next attempt reads the password files again
            raise self._error(what, failed) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _ensure_client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        c = self._config
        password, sentinel_password = self._read_passwords()
        common: dict[str, Any] = {
            "username": c.username,
            "password": password,
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
        }
        if c.sentinels:
            from redis.sentinel import Sentinel

            tls: dict[str, Any] = tls_options(c.ca_cert) if c.tls else {}
            addresses = [sentinel_address(entry) for entry in c.sentinels]
            sentinel_kwargs: dict[str, Any] = {
                "socket_timeout": self._timeout,
                "socket_connect_timeout": self._timeout,
                **tls,
            }
            if sentinel_password is not None:
                sentinel_kwargs["password"] = sentinel_password
                sentinel_kwargs["username"] = c.sentinel_username
            # through Any: redis-py types Sentinel() from 8.2 only (an ignore would be
            # unused there, needed before)
            make: Any = Sentinel
            self._sentinel = make(
                [a for a in addresses if isinstance(a, tuple)],
                sentinel_kwargs=sentinel_kwargs,
                **tls,
                **common,
            )
            return self._sentinel.master_for(
                c.service_name,
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
                health_check_interval=0,
            )
        endpoint = self._endpoint
        if endpoint is None:
            raise FleetStoreError(f"{self._key}.url: {parse_url(str(c.url))}")
        tls = tls_options(c.ca_cert) if endpoint.tls else {}
        if c.cluster:
            from redis.cluster import RedisCluster

            return RedisCluster(
                host=endpoint.host,
                port=endpoint.port,
                retry=Retry(NoBackoff(), 1),
                **tls,
                **common,
            )
        return redis.Redis(
            host=endpoint.host,
            port=endpoint.port,
            db=endpoint.db,
            # one retry layer: the agent's (STYLE); redis-py retries 3 times by default
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            health_check_interval=0,
            max_connections=4,
            **tls,
            **common,
        )

    def _drop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            self._sentinel = None
        if client is not None:
            with contextlib.suppress(redis.exceptions.RedisError):
                client.close()

    def _read_passwords(self) -> tuple[str | None, str | None]:
        c = self._config
        found: list[str | None] = []
        for name in ("password_file", "sentinel_password_file"):
            path = getattr(c, name)
            found.append(
                None
                if path is None
                else password_from_file(path, f"{self._key}.{name}", FleetStoreError)
            )
        self._passwords = [p for p in found if p]
        return found[0], found[1]

    # ------------------------------------------------------------------ messages
    def _error(self, what: str, exc: redis.exceptions.RedisError) -> FleetStoreError:
        c = self._config
        said = outside(" ".join(str(exc).split()) or type(exc).__name__, self._passwords)
        where = self._where
        if isinstance(exc, redis.exceptions.AuthenticationError):
            return FleetStoreError(
                f"{where} rejected the credentials of user {c.username or 'default'} ({said}): "
                f"check {self._key}.username and {self._key}.password_file"
            )
        if isinstance(exc, redis.exceptions.NoPermissionError):
            return FleetStoreError(
                f"{where} denied the fleet's {what} ({said}): the ACL user "
                f"{c.username or 'default'} needs +eval +evalsha +get +set +del +pexpire +pttl "
                f"+time on ~{c.key_prefix}*"
            )
        if isinstance(exc, redis.exceptions.TimeoutError):
            return FleetStoreError(
                f"{where} did not answer the {what} within {self._timeout:g}s: is it "
                f"overloaded, or is {self._key} pointing at the wrong host?"
            )
        if isinstance(exc, redis.exceptions.ConnectionError):
            if "ssl" in said.lower() or "certificate" in said.lower():
                return FleetStoreError(
                    f"TLS with {where} failed ({said}): its certificate must be valid for the "
                    f"host name and signed by {tls_trust(c.ca_cert, self._key)}"
                )
            if c.sentinels:
                return FleetStoreError(
                    f"cannot reach {where} ({said}): check {self._key}.sentinels and "
                    f"service_name, and that the sentinels know a master"
                )
            return FleetStoreError(
                f"cannot reach {where} ({said}): check {self._key}.url and that Redis runs"
            )
        if isinstance(exc, redis.exceptions.ResponseError) and said.startswith("WRONGTYPE"):
            return FleetStoreError(
                f"{where} holds a value that is not a string under {c.key_prefix}: choose "
                f"another {self._key}.key_prefix"
            )
        return FleetStoreError(
            f"{where} refused the fleet's {what} ({type(exc).__name__}: {said}): see "
            f"{self._key} and Redis' log"
        )


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _stored(value: object, pttl: object) -> Stored | None:
    if value is None or not isinstance(value, bytes):
        return None
    remaining = int(pttl) / 1000 if isinstance(pttl, int) and pttl >= 0 else None
    return Stored(value=value, remaining=remaining)
