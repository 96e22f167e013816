"""One authenticated connection to Vault (or OpenBao), shared by the Vault source and sinks.

:class:`VaultConnection` owns an ``hvac.Client`` and its token. :meth:`VaultConnection.call`
is the one path every Vault request takes: it logs in when there is no token, renews or logs in
again when the token has less than a third of its TTL left, re-authenticates once when Vault
answers 403 (after a Vault rebuild the agent's token is gone, DESIGN §5), and turns every
failure into an :class:`~agent.errors.AgentError` that names the address and what to do.

Vault's own texts (its ``errors``, an HTML page, a requests error) reach a message only through
:func:`agent.masking.outside`, with the token in use, the AppRole role_id and secret_id, and the
values a caller names (a sink's token) masked (DESIGN §10). The one answer the agent parses
itself, the poll's GET, is read streaming up to :data:`~agent.models.MAX_ANSWER_BYTES`.

This module imports hvac: import it only when a profile uses Vault.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar

import hvac
import hvac.exceptions
import hvac.utils
import requests
import requests.adapters
import requests.exceptions

from agent.errors import AgentError, ConfigError, SourceEmpty, SourceUnavailable
from agent.fsutil import read_secret_file
from agent.masking import outside, variants
from agent.models import MAX_ANSWER_BYTES

T = TypeVar("T")

#: the token file of token auth when neither ``token_file`` nor ``$VAULT_TOKEN`` is set
DEFAULT_TOKEN_FILE = "/run/vault/token"  # noqa: S105 - a path

#: renew (or log in again) when less than this fraction of the token's TTL is left
RENEW_FRACTION = 1 / 3
#: the most the agent reads of an error answer to its own GET (only 200 characters are shown)
ERROR_BODY_BYTES = 64 * 1024
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class VaultAuth:
    """Where Vault is and how the agent authenticates to it."""

    #: ``https://vault.internal:8200``
    address: str
    #: ``token``: a token from a file or ``$VAULT_TOKEN``; ``approle``: role_id + secret_id login
    auth_method: Literal["token", "approle"] = "approle"
    #: token auth: this file, else ``$VAULT_TOKEN``, else :data:`DEFAULT_TOKEN_FILE`
    token_file: str | None = None
    #: AppRole: files holding the role_id and the secret_id (read again at every login)
    role_id_file: str = "/etc/dvs-agent/role_id"
    secret_id_file: str = "/etc/dvs-agent/secret_id"  # noqa: S105 - a path
    #: the path the AppRole auth method is mounted at (``auth/<approle_mount>/login``)
    approle_mount: str = "approle"
    #: Vault Enterprise / OpenBao namespace
    namespace: str | None = None
    #: CA file that signed Vault's certificate (else the system store)
    ca_cert: str | None = None
    tls_skip_verify: bool = False
    #: seconds, for each HTTP request to Vault
    timeout: float = 10.0
    #: the config table these settings come from, named in error messages
    config_key: str = "vault"


class VaultConnection:
    """An ``hvac.Client`` that stays logged in. Thread-safe: calls are serialised.

    There are no hidden retries: the HTTP adapter has ``max_retries=0`` and a call is repeated
    only once, after a re-authentication that followed a 403. Backoff belongs to the scheduler.
    Closing does not revoke the token (it expires with its TTL); the next call logs in again.
    """

    def __init__(
        self,
        auth: VaultAuth,
        *,
        environ: Mapping[str, str] | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth = auth
        self._environ = os.environ if environ is None else environ
        self._log = logger if logger is not None else logging.getLogger("agent.vault")
        self._clock = clock
        self._lock = threading.RLock()
        self._client: Any = None
        self._token: str | None = None
        #: clock time at which to renew or log in again (None: the token does not expire)
        self._renew_at: float | None = None
        self._expires_at: float | None = None
        self._renewable = False
        #: the current values never to show in a message: role_id, secret_id, tokens
        self._sensitive: dict[str, str] = {}
        #: values the caller of the current :meth:`call` holds (a sink's token), masked too
        self._extra: Collection[str] = ()
        #: per path polled, the token and the GET prepared with it (see :meth:`get`)
        self._prepared: dict[str, tuple[str | None, requests.PreparedRequest]] = {}

    @property
    def address(self) -> str:
        return self._auth.address

    def shown(self, text: object, secrets: Iterable[str] = ()) -> str:
        """A text from Vault (a key name, a version's time) made safe to show: the connection's
        credentials and ``secrets`` masked, cut, control characters escaped."""
        with self._lock:
            held = self._secrets()
        return outside(text, (*held, *secrets))

    def call(
        self,
        fn: Callable[[Any], T],
        *,
        what: str,
        needs: str | None = None,
        secrets: Collection[str] = (),
    ) -> T:
        """Run ``fn(client)`` with a logged-in client and return its result.

        ``what`` names the operation in messages ("read secret/dvs/osigu (KV v2)"); ``needs``
        is what the agent's policy must allow, for the permission-denied hint (default: what).
        ``secrets`` are values the caller holds that Vault could echo (a sink's token): they
        are masked in Vault's texts, like the connection's own credentials. They are read when
        an error is mapped, so values that ``fn`` adds to a list given here count too.
        ``fn`` may raise an :class:`AgentError` of its own (e.g. SourceEmpty on a 404); hvac
        and requests errors are mapped here.
        """
        with self._lock:
            outer, self._extra = self._extra, secrets
            try:
                return self._call(fn, what, needs)
            finally:
                self._extra = outer

    def _call(self, fn: Callable[[Any], T], what: str, needs: str | None) -> T:
        """:meth:`call` under the lock, with the caller's secrets set."""
        client = self._ensure()
        try:
            return fn(client)
        except hvac.exceptions.Forbidden:
            pass
        except AgentError:
            raise
        except Exception as exc:
            raise self._error(exc, what) from None
        # Denied: the token may be gone (Vault rebuilt, token revoked or expired early).
        self._log.info(
            "Vault at %s denied %s: authenticating again before one retry",
            self._auth.address,
            what,
        )
        if not self._reauthenticate():
            raise self._denied(what, needs, fresh_token=False)
        try:
            return fn(self._client)
        except hvac.exceptions.Forbidden:
            raise self._denied(what, needs, fresh_token=True) from None
        except AgentError:
            raise
        except Exception as exc:
            raise self._error(exc, what) from None

    def get(self, path: str) -> dict[str, Any]:
        """``GET /v1/{path}`` with the logged-in token, for a call made inside :meth:`call`.

        The poll's request: it goes through the hvac client's own requests session (its TLS
        settings, proxies and connection pool), but is prepared once per path and token instead
        of on every call, which halves its CPU cost (about 0.6 ms instead of 1 ms a call on our
        machines; a Vault poll every second is most of the agent's idle CPU). Errors raise
        hvac's exceptions, as an hvac call would; a redirect (a standby node) goes through
        hvac, which follows it.

        The answer is read streaming, up to :data:`MAX_ANSWER_BYTES` after decoding: a larger
        one is refused (:class:`SourceUnavailable` naming the address and path) and its
        connection closed, unread. An error answer is read up to :data:`ERROR_BODY_BYTES`.
        """
        with self._lock:
            client = self._client
            cached = self._prepared.get(path)
            if cached is not None and cached[0] == self._token:
                prepared = cached[1]
            else:  # first poll of this path, or a new token since
                url = f"{client.adapter.base_uri}/v1/{path}"
                request = requests.Request("GET", url, headers=self._headers())
                prepared = client.session.prepare_request(request)
                self._prepared[path] = (self._token, prepared)
            session = client.session
            response = session.get_adapter(prepared.url).send(
                prepared,
                stream=True,
                timeout=self._auth.timeout,
                verify=session.verify,
                cert=session.cert,
                proxies=session.proxies,
            )
            try:
                if response.is_redirect:
                    response.close()
                    body = client.adapter.get(f"/v1/{path}")
                elif response.status_code == 200:
                    body = self._parse(path, response)
                else:
                    data, _ = _read_bounded(response, ERROR_BODY_BYTES)
                    _raise_for_status(prepared.url, response, data)
            finally:
                response.close()  # after a whole read, back to the pool; else dropped
            return body if isinstance(body, dict) else {}

    def _parse(self, path: str, response: requests.Response) -> Any:
        """The JSON of a 200 answer to :meth:`get`, read up to :data:`MAX_ANSWER_BYTES`."""
        address = self._auth.address
        data, whole = _read_bounded(response, MAX_ANSWER_BYTES)
        if not whole:
            raise SourceUnavailable(
                f"Vault at {address} answered GET /v1/{path} with more than "
                f"{MAX_ANSWER_BYTES // 1024} KiB (after decoding): refused, connection dropped; "
                f"is {self._auth.config_key}.address a Vault server (not a proxy or another "
                "service)?"
            )
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            ctype = outside(
                response.headers.get("Content-Type", "no Content-Type"), self._secrets(), limit=60
            )
            raise SourceUnavailable(
                f"Vault at {address} answered GET /v1/{path} with a body that is not JSON "
                f"({ctype}): is {self._auth.config_key}.address a Vault server (not a proxy or "
                "another service)?"
            ) from None

    def _headers(self) -> dict[str, str]:
        """The headers hvac sends with every request."""
        headers = {"X-Vault-Request": "true", "X-Vault-Token": self._token or ""}
        if self._auth.namespace:
            headers["X-Vault-Namespace"] = self._auth.namespace
        return headers

    def close(self) -> None:
        with self._lock:
            self._prepared = {}
            if self._client is not None:
                self._client.adapter.close()
            self._client = None
            self._token = None
            self._renew_at = self._expires_at = None

    # -- authentication -----------------------------------------------------------------------

    def _ensure(self) -> Any:
        if self._client is None:
            self._client = self._new_client()
        if self._token is None:
            self._authenticate()
        elif self._renew_at is not None and self._clock() >= self._renew_at:
            self._refresh()
        return self._client

    def _new_client(self) -> Any:
        auth = self._auth
        verify: bool | str = auth.ca_cert if auth.ca_cert else not auth.tls_skip_verify
        session = requests.Session()
        # requests' default is no retry either; say so explicitly: one layer retries (STYLE)
        adapter = requests.adapters.HTTPAdapter(max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.verify = verify  # hvac prefers a session's verify over its own argument
        # Proxies from the environment (HTTPS_PROXY, NO_PROXY) are resolved once for this one
        # address; trust_env off spares every poll requests' per-call netrc and proxy look-ups.
        session.proxies = requests.utils.get_environ_proxies(auth.address)
        session.trust_env = False
        if verify is False:
            self._log.warning(
                "TLS verification of Vault at %s is off (%s.tls_skip_verify): set %s.ca_cert",
                auth.address,
                auth.config_key,
                auth.config_key,
            )
        return hvac.Client(
            url=auth.address,
            token="",  # never hvac's fallback to $VAULT_TOKEN or ~/.vault-token
            verify=verify,
            timeout=auth.timeout,
            namespace=auth.namespace,
            session=session,
        )

    def _authenticate(self) -> None:
        if self._auth.auth_method == "approle":
            self._approle_login()
        else:
            token, _ = self._read_token()
            self._adopt_token(token)

    def _reauthenticate(self) -> bool:
        """After a 403: log in again (AppRole) or re-read the token. False: nothing new to try."""
        if self._auth.auth_method == "approle":
            self._approle_login()
            return True
        token, where = self._read_token()
        if token == self._token:
            return False
        self._log.info("the Vault token in %s changed: using the new one", where)
        self._adopt_token(token)
        return True

    def _refresh(self) -> None:
        """Less than a third of the token's TTL is left: renew it or log in again."""
        if self._auth.auth_method == "approle":
            try:
                self._approle_login()
            except AgentError as exc:
                if self._expires_at is None or self._clock() >= self._expires_at:
                    raise
                # the current token still works: use it, and try again at the next call
                self._log.warning(
                    "logging in to Vault at %s again failed; the current token is valid for "
                    "%.0fs more: %s",
                    self._auth.address,
                    self._expires_at - self._clock(),
                    exc,
                )
            return
        try:
            token, where = self._read_token()
        except AgentError as exc:
            self._log.warning("cannot read the Vault token again; using the current one: %s", exc)
            self._renew_at = None
            return
        if token != self._token:
            self._log.info("the Vault token in %s changed: using the new one", where)
            self._adopt_token(token)
            return
        if not self._renewable:
            self._log.warning(
                "the Vault token from %s expires soon and is not renewable: replace it",
                where,
            )
            self._renew_at = None
            return
        now = self._clock()
        left = (self._expires_at or now) - now
        try:
            response = self._vault(
                lambda: self._client.auth.token.renew_self(), what="renew the agent's token"
            )
        except SourceUnavailable as exc:
            # a revoked token fails the call that follows, which takes the 403 path
            self._log.warning("renewing the Vault token from %s failed: %s", where, exc)
            self._renew_at = None
            return
        auth = response.get("auth") if isinstance(response, dict) else None
        auth = auth if isinstance(auth, dict) else {}
        ttl = _seconds(auth.get("lease_duration"))
        self._schedule(ttl, bool(auth.get("renewable")))
        if ttl <= left + 1:
            # its max TTL is reached: renewing again would not extend it
            self._log.warning(
                "the Vault token from %s reached its maximum TTL (%ds left): replace it", where, ttl
            )
            self._renewable = False
        else:
            self._log.debug("renewed the Vault token from %s (ttl %ds)", where, ttl)

    def _approle_login(self) -> None:
        auth = self._auth
        role_id = self._read_file(auth.role_id_file, "role_id_file")
        secret_id = self._read_file(auth.secret_id_file, "secret_id_file")
        self._sensitive.update(role_id=role_id, secret_id=secret_id)
        where = f"auth/{auth.approle_mount}"
        try:
            response = self._client.auth.approle.login(
                role_id=role_id, secret_id=secret_id, mount_point=auth.approle_mount
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
            raise SourceUnavailable(
                f"AppRole login at {where} on Vault at {auth.address} rejected "
                f"({self._errors(exc)}): check role_id/secret_id ({auth.config_key}.role_id_file "
                f"= {auth.role_id_file}, {auth.config_key}.secret_id_file = "
                f"{auth.secret_id_file}; the secret_id may have expired or reached its use "
                f"limit) and that AppRole is mounted at {where} ({auth.config_key}.approle_mount)"
            ) from None
        except hvac.exceptions.InvalidPath:
            raise SourceUnavailable(
                f"no AppRole auth method at {where} on Vault at {auth.address}: enable it "
                f"(`vault auth enable approle`) or set {auth.config_key}.approle_mount"
            ) from None
        except Exception as exc:
            raise self._error(exc, f"AppRole login at {where}") from None
        login = response.get("auth") if isinstance(response, dict) else None
        token = login.get("client_token") if isinstance(login, dict) else None
        if not isinstance(login, dict) or not isinstance(token, str) or not token:
            raise SourceUnavailable(
                f"AppRole login at {where} on Vault at {auth.address} returned no token"
            )
        self._set_token(token)
        ttl = _seconds(login.get("lease_duration"))
        self._schedule(ttl, bool(login.get("renewable")))
        self._log.info(
            "logged in to Vault at %s with AppRole (%s, token ttl %ds)", auth.address, where, ttl
        )

    def _adopt_token(self, token: str) -> None:
        """Use ``token`` (token auth): look it up for its TTL, so that it is renewed in time."""
        self._sensitive["candidate"] = token
        self._client.token = token
        try:
            response = self._client.auth.token.lookup_self()
        except hvac.exceptions.Forbidden:
            self._token = None
            self._client.token = ""
            raise self._token_rejected() from None
        except Exception as exc:
            self._token = None
            self._client.token = ""
            raise self._error(exc, "look up the agent's token") from None
        data = response.get("data") if isinstance(response, dict) else None
        data = data if isinstance(data, dict) else {}
        self._set_token(token)
        ttl = _seconds(data.get("ttl"))
        self._schedule(ttl, bool(data.get("renewable")))
        self._log.info(
            "using a Vault token for %s (ttl %s)",
            self._auth.address,
            f"{ttl}s" if ttl else "none",
        )

    def _set_token(self, token: str) -> None:
        self._sensitive["token"] = token
        self._token = token
        self._client.token = token

    def _schedule(self, ttl: int, renewable: bool) -> None:
        now = self._clock()
        self._renewable = renewable
        if ttl <= 0:  # a token without expiry (e.g. root)
            self._renew_at = self._expires_at = None
        else:
            self._expires_at = now + ttl
            self._renew_at = now + ttl * (1 - RENEW_FRACTION)

    def _read_token(self) -> tuple[str, str]:
        """The token for token auth and where it came from (for messages, never the value)."""
        auth = self._auth
        if auth.token_file is None:
            env_token = self._environ.get("VAULT_TOKEN")
            if env_token:
                self._sensitive["read"] = env_token.strip()
                return env_token.strip(), "$VAULT_TOKEN"
        path = auth.token_file or DEFAULT_TOKEN_FILE
        token = self._read_file(path, "token_file")
        self._sensitive["read"] = token
        return token, path

    def _read_file(self, path: str, key: str) -> str:
        name = f"{self._auth.config_key}.{key}"
        try:
            text = read_secret_file(path).strip()
        except FileNotFoundError:
            raise SourceEmpty(
                f"{path} ({name}) does not exist: write it, or set {name} to the file that "
                f"holds the {key.removesuffix('_file')}"
            ) from None
        except PermissionError:
            raise SourceUnavailable(
                f"{path} ({name}) is not readable by the agent (uid {os.geteuid()}): "
                "fix its owner or mode"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceUnavailable(f"cannot read {path} ({name}): {exc}") from None
        if not text:
            raise SourceEmpty(f"{path} ({name}) is empty")
        return text

    # -- errors -------------------------------------------------------------------------------

    def _vault(self, fn: Callable[[], Any], *, what: str) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise self._error(exc, what) from None

    def _token_rejected(self) -> SourceUnavailable:
        auth = self._auth
        if auth.token_file is None and self._environ.get("VAULT_TOKEN"):
            where, fix = "$VAULT_TOKEN", "export a valid token"
        else:
            path = auth.token_file or DEFAULT_TOKEN_FILE
            where = f"{path} ({auth.config_key}.token_file)"
            fix = "write a valid token there"
        return SourceUnavailable(
            f"Vault at {auth.address} does not accept the token from {where} (expired or "
            f"revoked, or Vault was rebuilt; its policy must also allow the default "
            f"lookup-self): {fix}"
        )

    def _denied(self, what: str, needs: str | None, *, fresh_token: bool) -> AgentError:
        auth = self._auth
        if not fresh_token and auth.auth_method == "token":
            # the same token again: is it the token itself that Vault rejects?
            try:
                self._client.auth.token.lookup_self()
            except hvac.exceptions.Forbidden:
                return self._token_rejected()
            except Exception as exc:
                self._log.debug("looking up the Vault token failed: %s", type(exc).__name__)
        who = "token" if auth.auth_method == "token" else "AppRole role"
        return SourceUnavailable(
            f"permission denied by Vault at {auth.address} to {what}: the policy of the "
            f"agent's {who} must allow {needs or what}"
        )

    def _error(self, exc: BaseException, what: str) -> AgentError:
        """The AgentError for an hvac or requests failure during ``what``."""
        address = self._auth.address
        key = self._auth.config_key
        secrets = self._secrets()
        if isinstance(exc, requests.exceptions.SSLError):
            return SourceUnavailable(
                f"TLS verification of Vault at {address} failed ({_reason(exc, secrets)}): set "
                f"{key}.ca_cert to the CA file that signed its certificate"
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return SourceUnavailable(
                f"cannot reach Vault at {address} (no answer within {self._auth.timeout:g}s) "
                f"to {what}"
            )
        if isinstance(exc, requests.exceptions.ConnectionError):
            return SourceUnavailable(
                f"cannot reach Vault at {address} ({_reason(exc, secrets)}) to {what}: check "
                f"{key}.address and that Vault is running"
            )
        if isinstance(
            exc,
            requests.exceptions.MissingSchema
            | requests.exceptions.InvalidSchema
            | requests.exceptions.InvalidURL,
        ):
            return ConfigError(
                f"{key}.address = {address!r} is not a Vault URL: use https://HOST:8200"
            )
        if isinstance(exc, requests.exceptions.RequestException):
            return SourceUnavailable(
                f"cannot reach Vault at {address} ({type(exc).__name__}) to {what}"
            )
        if isinstance(exc, hvac.exceptions.VaultDown):
            errors = self._errors(exc)
            if "sealed" in errors.lower():
                return SourceUnavailable(
                    f"Vault at {address} is sealed: unseal it (`vault operator unseal`); the "
                    "agent reads again at its next attempt"
                )
            return SourceUnavailable(
                f"Vault at {address} is unavailable (503: {errors}) to {what}: is this node a "
                "standby, or is Vault starting?"
            )
        if isinstance(exc, hvac.exceptions.VaultNotInitialized):
            return SourceUnavailable(f"Vault at {address} is not initialized (501)")
        if isinstance(exc, hvac.exceptions.RateLimitExceeded):
            return SourceUnavailable(f"Vault at {address} rate-limited {what} (429)")
        if isinstance(exc, hvac.exceptions.InvalidPath):
            namespace = f" and {key}.namespace" if self._auth.namespace else ""
            return SourceEmpty(
                f"Vault at {address} answered 404 to {what}: check that {key}.address{namespace} "
                "name a Vault server (not a proxy or another service)"
            )
        if isinstance(exc, hvac.exceptions.Forbidden):
            return self._denied(what, None, fresh_token=True)
        if isinstance(exc, hvac.exceptions.VaultError):
            return SourceUnavailable(
                f"Vault at {address} failed to {what} ({type(exc).__name__}: {self._errors(exc)})"
            )
        return SourceUnavailable(
            f"unexpected answer from Vault at {address} to {what} ({type(exc).__name__})"
        )

    def _errors(self, exc: Any) -> str:
        """Vault's own error strings (or, without any, the body it answered: an HTML page), one
        line, through :func:`outside`: every value the connection knows is secret masked, cut
        to 200 characters, control characters escaped."""
        errors = getattr(exc, "errors", None)
        if isinstance(errors, list | tuple) and errors:
            text = "; ".join(str(error) for error in errors)
        elif errors:
            text = str(errors)
        else:
            message = exc.args[0] if isinstance(exc, BaseException) and exc.args else None
            text = str(message) if message else "no detail"
        text = " ".join(text.replace("1 error occurred:", "").replace("*", " ").split())
        return outside(text or "no detail", self._secrets())

    def _secrets(self) -> tuple[str, ...]:
        """The values never to show: token in use, tokens read, role_id, secret_id, and the
        caller's (each as it is and URL-encoded)."""
        values = [*self._sensitive.values(), *self._extra]
        if self._token:
            values.append(self._token)
        return tuple({form for value in values if value for form in variants(value)})


_OBJECT_PREFIX = re.compile(r"<[^>]*>:\s*")


def _reason(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """The root cause of a requests error, without its URL or object reprs, through
    :func:`outside` (``secrets`` masked, cut, control characters escaped)."""
    cause: Any = exc.args[0] if exc.args else exc
    reason = getattr(cause, "reason", None)
    text = str(reason if reason is not None else cause)
    text = _OBJECT_PREFIX.sub("", text)
    match = re.search(r"\[Errno -?\d+\][^'\")]*|\[SSL[^\]]*\][^'\")(]*", text)
    if match:
        text = match.group(0)
    return outside(" ".join(text.split()) or type(exc).__name__, secrets)


def _seconds(value: object) -> int:
    """A TTL from Vault's answer; 0 (no expiry known) for anything but a whole number."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value)
    return 0


def _read_bounded(response: requests.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of a streamed body after decoding (gzip, deflate), and whether
    that is the whole body. Never reads more than one chunk past ``limit``."""
    body = bytearray()
    for chunk in response.iter_content(_CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), False
    return bytes(body), True


def _raise_for_status(url: str | None, response: requests.Response, data: bytes) -> NoReturn:
    """Raise the hvac exception for a failed response (``data``: the start of its body), with
    Vault's ``errors`` as hvac does."""
    payload: Any = None
    text = data.decode("utf-8", errors="replace")  # Vault answers JSON, UTF-8
    if response.headers.get("Content-Type") == "application/json":
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError):
            payload = None
    errors = payload.get("errors") if isinstance(payload, dict) else None
    hvac.utils.raise_for_error(
        "get", url, response.status_code, None if errors else text, errors=errors, text=text
    )
    raise hvac.exceptions.VaultError(f"HTTP {response.status_code}", url=url)  # not reached
