"""The redis sink: the token document in a Redis key whose TTL is the token's life (DESIGN §4).

``SET key <document> PX <ms until expires_at>``, done by a small Lua script so that the newest
token wins atomically (STYLE, Vault Agent): a stored document whose ``expires_at`` is later than
ours is left alone. An expired token is never stored. The ACL user needs ``+eval`` and, on the
key, ``+get +set`` (``~KEY``); ``+select`` too when the URL names a database other than 0.

The client makes no retries of its own (``Retry(NoBackoff(), 0)``, no retry on timeout): the
agent's scheduler is the one retry layer. The password is read from ``password_file`` or
``password_env`` when the client is built, and again after Redis rejected it, so a rotated
password is picked up at the next attempt.

redis-py's exception strings (which may carry the server's own error text) reach a message only
through :func:`agent.masking.outside`, with the password and the token being written masked
(DESIGN §10).

This module imports redis-py: the redis sink kind (:mod:`agent.sinks.redis`) imports it in its
build().
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent.errors import AgentError, SinkError
from agent.fsutil import read_secret_file
from agent.masking import outside
from agent.models import Token
from agent.sinks.redis import Endpoint, RedisSinkConfig, parse_url

#: KEYS[1] the key; ARGV[1] the document, ARGV[2] its expires_at, ARGV[3] the TTL in ms.
#: Returns 1 when written, 0 when a document expiring later is stored, 2 when ours is.
#: ``expires_at`` is compared as text, which orders RFC 3339 UTC times of one shape.
SET_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  if current == ARGV[1] then
    return 2
  end
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' and type(doc['expires_at']) == 'string'
      and string.match(doc['expires_at'], '^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$')
      and doc['expires_at'] > ARGV[2] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""

_WRITTEN, _NEWER_STORED, _SAME_STORED = 1, 0, 2


def tls_options(ca_cert: str | None) -> dict[str, Any]:
    """redis-py's TLS arguments: the server's certificate checked, for its host name, against
    ``ca_cert`` (a PEM bundle) or the system store."""
    options: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if ca_cert:
        options["ssl_ca_certs"] = ca_cert
    return options


def tls_trust(ca_cert: str | None, config_key: str) -> str:
    """Who must have signed the server's certificate, for a TLS error message."""
    if ca_cert:
        return f"a CA in {ca_cert} ({config_key}.ca_cert)"
    return f"a CA in the system store (or set {config_key}.ca_cert to your CA's PEM file)"


def password_from_file(path: str, name: str, error: type[AgentError]) -> str:
    """The Redis password in ``path`` (``name``: its config key), one trailing newline
    dropped; raises ``error`` saying what to fix."""
    try:
        text = read_secret_file(path)
    except FileNotFoundError:
        raise error(
            f"{path} ({name}) does not exist: write the Redis password there, or fix the path"
        ) from None
    except PermissionError:
        raise error(
            f"{path} ({name}) is not readable by the agent (uid {os.geteuid()}): fix its "
            "owner or mode"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise error(f"cannot read {path} ({name}): {reason}") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise error(f"{path} ({name}) is empty")
    return text


class RedisSink:
    """Writes each new token's document to one Redis key; a :class:`TokenSink`."""

    readiness = False

    def __init__(
        self,
        settings: RedisSinkConfig,
        *,
        key: str,
        timeout: float = 5.0,
        config_key: str = "sinks[0]",
        environ: Mapping[str, str] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        """``key`` is the full key name (the kind resolves the default); ``config_key`` the
        sink's key path, named in messages; ``timeout`` bounds connecting and each command."""
        self._settings = settings
        self._key = key
        self._timeout = timeout
        self._config_key = config_key
        self._environ = os.environ if environ is None else environ
        self._log = logger if logger is not None else logging.getLogger("agent.sinks.redis")
        self._lock = threading.Lock()
        self._client: Any = None
        #: the password in use, kept only to blank it out of error texts
        self._password: str | None = None
        endpoint = parse_url(settings.url)
        self._target: Endpoint | None = None if isinstance(endpoint, str) else endpoint
        self._url_error = (
            SinkError(f"{config_key}.url: {endpoint}") if isinstance(endpoint, str) else None
        )
        where = f"{self._target.address}/{self._target.db}" if self._target else "?"
        self.name = f"redis:{where}/{key}"

    def check(self) -> None:
        """The URL parses, the key is set, the password file or variable can be read.

        No connection is made: Redis being down at start must not stop the other sinks.
        """
        self._require_target()
        if not self._key:
            raise SinkError(f"{self._config_key}.key is empty: name the key")
        self._read_password()

    def write(self, token: Token) -> None:
        """Store ``token.document()`` with the token's remaining life as TTL (newest wins).

        An expired token is not stored (logged, not an error). Raises :class:`SinkError`
        naming the server and key and what to check; never the password.
        """
        target = self._require_target()
        ttl_ms = int((token.expires_at - datetime.now(UTC)).total_seconds() * 1000)
        if ttl_ms <= 0:
            self._log.warning(
                "%s: the token expired at %s: not written", self.name, token.expires_at
            )
            return
        document = token.document()
        data = msgspec.json.encode(document)
        client = self._ensure_client(target)
        try:
            result = client.eval(SET_IF_NEWER, 1, self._key, data, document["expires_at"], ttl_ms)
        except redis.exceptions.RedisError as exc:
            if isinstance(exc, redis.exceptions.AuthenticationError):
                self._drop_client()  # the next attempt reads the password again
            raise self._error(exc, target, (token.access_token.reveal(),)) from None
        if result == _NEWER_STORED:
            self._log.debug(
                "%s: newer token already stored: not written (ours expires %s)",
                self.name,
                document["expires_at"],
            )
        elif result == _SAME_STORED:
            self._log.debug("%s already holds this token", self.name)
        else:
            self._log.debug(
                "wrote %s (expires %s, ttl %d ms)", self.name, document["expires_at"], ttl_ms
            )

    def settle(self, timeout: float | None = None) -> bool:
        return True  # nothing runs in the background

    def close(self) -> None:
        self._drop_client()

    # -- helpers --------------------------------------------------------------------------------

    def _require_target(self) -> Endpoint:
        if self._target is None:
            assert self._url_error is not None
            raise self._url_error
        return self._target

    def _ensure_client(self, target: Endpoint) -> Any:
        with self._lock:
            if self._client is None:
                s = self._settings
                password = self._read_password()
                self._password = password
                self._client = redis.Redis(
                    host=target.host,
                    port=target.port,
                    db=target.db,
                    username=s.username,
                    password=password,
                    **(tls_options(s.ca_cert) if target.tls else {}),
                    socket_timeout=self._timeout,
                    socket_connect_timeout=self._timeout,
                    # one retry layer: the agent's (STYLE); redis-py retries 3 times by default
                    retry=Retry(NoBackoff(), 0),
                    retry_on_error=[],
                    health_check_interval=0,
                    max_connections=2,
                )
            return self._client

    def _drop_client(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _read_password(self) -> str | None:
        s = self._settings
        key = self._config_key
        if s.password_file and s.password_env:
            raise SinkError(f"{key}: set one of password_file and password_env, not both")
        if s.password_file:
            return password_from_file(s.password_file, f"{key}.password_file", SinkError)
        if s.password_env:
            value = self._environ.get(s.password_env)
            if not value:
                state = "is empty" if value == "" else "is not set"
                raise SinkError(
                    f"the variable {s.password_env} ({key}.password_env) {state} in the "
                    "agent's environment: set it to the Redis password"
                )
            return value
        return None

    def _error(
        self,
        exc: redis.exceptions.RedisError,
        target: Endpoint,
        secrets: Iterable[str] = (),
    ) -> SinkError:
        """The SinkError for a redis-py failure, without the password, the token being written
        (``secrets``) or any other credential-looking value."""
        s = self._settings
        where = f"Redis at {target.address} (db {target.db}, key {self._key}; {self._config_key})"
        said = self._said(exc, secrets)
        if isinstance(exc, redis.exceptions.AuthenticationError):
            user = s.username or "default"
            source = (
                f"{self._config_key}.password_env = {s.password_env}"
                if s.password_env
                else f"{self._config_key}.password_file"
                + (f" = {s.password_file}" if s.password_file else " (none is set)")
            )
            return SinkError(
                f"{where} rejected the credentials of user {user} ({said}): check username/"
                f"password_file ({self._config_key}.username; {source})"
            )
        if isinstance(exc, redis.exceptions.NoPermissionError):
            return SinkError(
                f"{where} denied the write ({said}): the ACL user {s.username or 'default'} "
                f"needs +eval and +get +set on the key (~{self._key})"
                + (f", and +select for db {target.db}" if target.db else "")
            )
        if isinstance(exc, redis.exceptions.TimeoutError):
            return SinkError(f"{where} did not answer within {self._timeout:g}s")
        if isinstance(exc, redis.exceptions.ConnectionError):
            if "ssl" in said.lower() or "certificate" in said.lower():
                return SinkError(
                    f"TLS with {where} failed ({said}): its certificate must be valid for "
                    f"{target.host} and signed by {tls_trust(s.ca_cert, self._config_key)}"
                )
            return SinkError(
                f"cannot reach {where} ({said}): check {self._config_key}.url and that Redis runs"
            )
        if isinstance(exc, redis.exceptions.ResponseError) and said.startswith("WRONGTYPE"):
            return SinkError(
                f"{where} holds a value that is not a string at the key: choose another "
                f"{self._config_key}.key or delete it"
            )
        return SinkError(f"{where} refused the write ({type(exc).__name__}: {said})")

    def _said(self, exc: BaseException, secrets: Iterable[str] = ()) -> str:
        """redis-py's text for ``exc`` (often the server's own), on one line, through
        :func:`outside`: the password and ``secrets`` masked, cut, controls escaped."""
        held = [*secrets, *([self._password] if self._password else [])]
        return outside(" ".join(str(exc).split()) or type(exc).__name__, held)
