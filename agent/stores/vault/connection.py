"""One authenticated connection to Vault (or OpenBao), shared by the Vault source and sinks.

:class:`VaultConnection` owns an ``hvac.Client`` and its token. :meth:`VaultConnection.call`
is the one path every Vault request takes: it logs in when there is no token (the
:class:`~agent.plugin.LoginKind` ``auth_method`` names, :mod:`agent.logins`), renews or logs in
again when the token has less than a third of its TTL left, re-authenticates once when Vault
answers 403 (after a Vault rebuild the agent's token is gone, DESIGN §5), and turns every failure
into an :class:`~agent.errors.AgentError` that names the address and what to do
(:mod:`agent.stores.vault.errors`).

Vault's own texts reach a message only through :func:`agent.masking.outside`, with the token in
use, the login's credentials and the values a caller names (a sink's token) masked (DESIGN
§10). The one answer the agent parses itself, the poll's GET (:meth:`VaultConnection.get`), goes
through hvac's public adapter API and is read streaming, up to
:data:`~agent.models.MAX_ANSWER_BYTES`.

This module imports hvac: import it only when a profile uses Vault.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import hvac
import hvac.adapters
import hvac.exceptions
import requests
import requests.adapters
import requests.utils

from agent.errors import AgentError, SourceUnavailable
from agent.logins import token as given_token
from agent.logins.common import ttl_seconds
from agent.masking import outside, variants
from agent.models import MAX_ANSWER_BYTES
from agent.plugin import Login, LoginContext, LoginKind
from agent.stores.vault import errors
from agent.stores.vault.settings import VaultAuth

T = TypeVar("T")

#: renew (or log in again) when less than this fraction of the token's TTL is left
RENEW_FRACTION = 1 / 3
#: the most the agent reads of an error answer to its own GET (only 200 characters are shown)
ERROR_BODY_BYTES = 64 * 1024
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Exchange:
    """One answer of :meth:`VaultConnection.exchange`."""

    status: int
    #: the answer's JSON object (None: no body, or not an object)
    body: dict[str, Any] | None = field(repr=False)
    #: Vault's ``Date`` header as Unix seconds (None when absent or unreadable)
    date: float | None


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
        report_expiry: Callable[[str, float], None] | None = None,
    ) -> None:
        self._auth = auth
        self._method: LoginKind = auth.method()
        self._report_expiry = report_expiry
        self._environ = os.environ if environ is None else environ
        self._log = logger if logger is not None else logging.getLogger("agent.vault")
        self._clock = clock
        self._lock = threading.RLock()
        self._client: Any = None
        #: the poll's adapter: hvac's RawAdapter on the client's session (see :meth:`get`)
        self._raw: hvac.adapters.RawAdapter | None = None
        self._token: str | None = None
        #: clock time at which to renew or log in again (None: the token does not expire)
        self._renew_at: float | None = None
        self._expires_at: float | None = None
        self._renewable = False
        #: the current values never to show in a message: login credentials, tokens
        self._sensitive: dict[str, str] = {}
        #: values the caller of the current :meth:`call` holds (a sink's token), masked too
        self._extra: Collection[str] = ()

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

        The poll's request, through hvac's public adapter API: a ``RawAdapter`` made from the
        client's adapter (:meth:`hvac.adapters.Adapter.from_adapter`), so it shares the
        client's session (TLS settings, proxies, connection pool), namespace and timeout, asked
        for the ``requests.Response`` itself (``stream=True``, ``raise_exception=False``)
        instead of the body hvac's JSON adapter would read whole. Redirects (a standby node)
        are followed by the session, as for any hvac call; errors raise hvac's exceptions.

        The answer is read streaming, up to :data:`MAX_ANSWER_BYTES` after decoding: a larger
        one is refused (:class:`SourceUnavailable` naming the address and path) and its
        connection closed, unread. An error answer is read up to :data:`ERROR_BODY_BYTES`.
        """
        with self._lock:
            assert self._raw is not None, "get() runs inside call()"
            response = self._raw.get(
                f"/v1/{path}", stream=True, raise_exception=False, timeout=self._auth.timeout
            )
            try:
                if response.status_code == 200:
                    body = self._parse(path, response)
                else:
                    data, _ = _read_bounded(response, ERROR_BODY_BYTES)
                    errors.raise_for_status(response.url, response, data)
            finally:
                response.close()  # after a whole read, back to the pool; else dropped
            return body if isinstance(body, dict) else {}

    def exchange(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        accept: Collection[int] = (),
    ) -> Exchange:
        """``method /v1/{path}`` (a JSON ``body`` for writes) with the logged-in token, for a
        call made inside :meth:`call`, through the same adapter as :meth:`get`, with Vault's
        ``Date`` (the fleet store judges lifetimes by Vault's clock, DESIGN §13).

        A 2xx answer, or one whose status is in ``accept`` (a 404 of a secret not written yet,
        a 400 of a lost check-and-set), is returned with its JSON (None when it has none);
        others raise hvac's exceptions, as :meth:`get` does. Answers are read up to
        :data:`MAX_ANSWER_BYTES` (an error answer up to :data:`ERROR_BODY_BYTES`).
        """
        with self._lock:
            assert self._raw is not None, "exchange() runs inside call()"
            response = self._raw.request(
                method,
                f"/v1/{path}",
                json=dict(body) if body is not None else None,
                stream=True,
                raise_exception=False,
                timeout=self._auth.timeout,
            )
            try:
                ok = 200 <= response.status_code < 300
                if not ok and response.status_code not in accept:
                    data, _ = _read_bounded(response, ERROR_BODY_BYTES)
                    errors.raise_for_status(response.url, response, data)
                data, whole = _read_bounded(response, MAX_ANSWER_BYTES if ok else ERROR_BODY_BYTES)
                if not whole and ok:
                    raise errors.too_large(self._auth, path)
            finally:
                response.close()
            parsed: Any = None
            if data.strip():
                try:
                    parsed = json.loads(data)
                except (ValueError, RecursionError):
                    if ok:
                        raise errors.not_json(
                            self._auth, path, response.headers.get("Content-Type"), self._secrets()
                        ) from None
            return Exchange(
                status=response.status_code,
                body=parsed if isinstance(parsed, dict) else None,
                date=_http_date(response.headers.get("Date")),
            )

    def _parse(self, path: str, response: requests.Response) -> Any:
        """The JSON of a 200 answer to :meth:`get`, read up to :data:`MAX_ANSWER_BYTES`."""
        data, whole = _read_bounded(response, MAX_ANSWER_BYTES)
        if not whole:
            raise errors.too_large(self._auth, path)
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise errors.not_json(
                self._auth, path, response.headers.get("Content-Type"), self._secrets()
            ) from None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.adapter.close()
            self._client = self._raw = None
            self._token = None
            self._renew_at = self._expires_at = None

    # -- the client -----------------------------------------------------------------------------

    def _ensure(self) -> Any:
        if self._client is None:
            self._client = self._new_client()
            self._raw = hvac.adapters.RawAdapter.from_adapter(self._client.adapter)
        if self._token is None:
            self._authenticate()
        elif self._renew_at is not None and self._clock() >= self._renew_at:
            self._refresh()
        return self._client

    def _new_client(self) -> Any:
        auth = self._auth
        verify: bool | str = (
            auth.config.ca_cert if auth.config.ca_cert else not auth.config.tls_skip_verify
        )
        session = requests.Session()
        # requests' default is no retry either; say so explicitly: one layer retries (STYLE)
        adapter = requests.adapters.HTTPAdapter(max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.verify = verify  # hvac prefers a session's verify over its own argument
        client_cert = self._method.client_cert(auth.config)
        if client_cert is not None:
            session.cert = client_cert  # presented in every handshake (the cert login)
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
            namespace=auth.config.namespace,
            session=session,
        )

    # -- the token: log in, renew, log in again ---------------------------------------------------

    def _authenticate(self) -> None:
        self._use(self._login(self._log_in))

    def _log_in(self, ctx: LoginContext) -> Login:
        return self._method.login(self._auth.config, ctx)

    def _reauthenticate(self) -> bool:
        """After a 403: log in again, or re-read a given token. False: nothing new to try."""
        if not self._method.given:
            self._use(self._login(self._log_in))
            return True
        token, where = given_token.read_token(self._auth.config, self._context())
        if token == self._token:
            return False
        self._log.info("the Vault token in %s changed: using the new one", where)
        self._adopt(token)
        return True

    def _refresh(self) -> None:
        """Less than a third of the token's TTL is left: log in again, or renew it."""
        if not self._method.given:
            try:
                self._use(self._login(self._log_in))
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
            token, where = given_token.read_token(self._auth.config, self._context())
        except AgentError as exc:
            self._log.warning("cannot read the Vault token again; using the current one: %s", exc)
            self._renew_at = None
            return
        if token != self._token:
            self._log.info("the Vault token in %s changed: using the new one", where)
            self._adopt(token)
            return
        if not self._renewable:
            self._log.warning(
                "the Vault token from %s expires soon and is not renewable: replace it",
                where,
            )
            self._renew_at = None
            return
        self._renew(where)

    def _renew(self, where: str) -> None:
        """``renew-self`` the given token from ``where``; a failure only stops the renewals."""
        now = self._clock()
        left = (self._expires_at or now) - now
        try:
            response = self._client.auth.token.renew_self()
        except Exception as exc:
            # a revoked token fails the call that follows, which takes the 403 path
            renew_error = self._error(exc, "renew the agent's token")
            if not isinstance(renew_error, SourceUnavailable):
                raise renew_error from None
            self._log.warning("renewing the Vault token from %s failed: %s", where, renew_error)
            self._renew_at = None
            return
        auth = response.get("auth") if isinstance(response, dict) else None
        auth = auth if isinstance(auth, dict) else {}
        ttl = ttl_seconds(auth.get("lease_duration"))
        self._schedule(ttl, bool(auth.get("renewable")))
        if ttl <= left + 1:
            # its max TTL is reached: renewing again would not extend it
            self._log.warning(
                "the Vault token from %s reached its maximum TTL (%ds left): replace it", where, ttl
            )
            self._renewable = False
        else:
            self._log.debug("renewed the Vault token from %s (ttl %ds)", where, ttl)

    def _adopt(self, token: str) -> None:
        """Use the given ``token`` (token auth), looked up for its TTL."""
        self._use(self._login(lambda ctx: given_token.look_up(self._auth.config, ctx, token)))

    def _login(self, login: Callable[[LoginContext], Login]) -> Login:
        """Run one login; the errors it does not explain are mapped naming the method's
        operation. A given token that fails its look-up is dropped (the next call reads it
        again); a login that fails leaves the current token in use."""
        try:
            return login(self._context())
        except AgentError:
            if self._method.given:
                self._token = None
            raise
        except Exception as exc:
            if self._method.given:
                self._token = None
            raise self._error(exc, self._method.what(self._auth.config)) from None

    def _context(self) -> LoginContext:
        return LoginContext(
            client=self._client,
            address=self._auth.address,
            config_key=self._auth.config_key,
            environ=self._environ,
            log=self._log,
            remember=self._sensitive.__setitem__,
            vault_errors=lambda exc: errors.vault_errors(exc, self._secrets()),
        )

    def _use(self, login: Login) -> None:
        self._sensitive["token"] = login.token
        self._token = login.token
        self._client.token = login.token
        assert self._raw is not None
        self._raw.token = login.token
        self._schedule(login.ttl_seconds, login.renewable)
        if login.credential_expires_at is not None and self._report_expiry is not None:
            self._report_expiry(self._method.name, login.credential_expires_at)

    def _schedule(self, ttl: int, renewable: bool) -> None:
        now = self._clock()
        self._renewable = renewable
        if ttl <= 0:  # a token without expiry (e.g. root)
            self._renew_at = self._expires_at = None
        else:
            self._expires_at = now + ttl
            self._renew_at = now + ttl * (1 - RENEW_FRACTION)

    # -- errors ---------------------------------------------------------------------------------

    def _denied(self, what: str, needs: str | None, *, fresh_token: bool) -> AgentError:
        if not fresh_token and self._method.given:
            # the same token again: is it the token itself that Vault rejects?
            try:
                self._client.auth.token.lookup_self()
            except hvac.exceptions.Forbidden:
                return given_token.token_rejected(
                    self._auth.config, self._auth.config_key, self._auth.address, self._environ
                )
            except Exception as exc:
                self._log.debug("looking up the Vault token failed: %s", type(exc).__name__)
        return errors.denied(self._auth, what, needs, holder=self._method.holder)

    def _error(self, exc: BaseException, what: str) -> AgentError:
        """The AgentError for an hvac or requests failure during ``what``."""
        return errors.store_error(
            exc, self._auth, what, holder=self._method.holder, secrets=self._secrets()
        )

    def _secrets(self) -> tuple[str, ...]:
        """The values never to show: token in use, tokens read, login credentials, and the
        caller's (each as it is and URL-encoded)."""
        values = [*self._sensitive.values(), *self._extra]
        if self._token:
            values.append(self._token)
        return tuple({form for value in values if value for form in variants(value)})


def _read_bounded(response: requests.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of a streamed body after decoding (gzip, deflate), and whether
    that is the whole body. Never reads more than one chunk past ``limit``."""
    body = bytearray()
    for chunk in response.iter_content(_CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), False
    return bytes(body), True


def _http_date(value: str | None) -> float | None:
    """An HTTP ``Date`` (whole seconds) as Unix seconds; None when absent or unreadable."""
    if not value:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return moment.timestamp() if moment.tzinfo is not None else None
