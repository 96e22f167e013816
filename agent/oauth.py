"""The token client: OSIGU's client-credentials request, response validation, retry policy.

One layer retries, and it is this one, for seconds-long faults inside one attempt (DESIGN §2):
5xx, timeouts and connection errors get at most 3 retries with jittered exponential backoff;
429 honours ``Retry-After`` up to 30 s; 400/405 and 401 are never retried fast. Anything
longer (minutes) belongs to the scheduler.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import random
import re
import ssl
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote_plus, urljoin, urlsplit

import httpx
import msgspec

from agent.errors import (
    AgentError,
    AuthServerUnavailable,
    CredentialsRejected,
    RequestRejected,
)
from agent.models import Credentials, Secret, Token

#: RFC 6750 b64token: what an access token may consist of
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_TOKEN_BYTES = 64 * 1024

GrantLocation = Literal["query", "body"]
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff inside one token attempt (seconds)."""

    #: retries after the first request for 5xx, timeouts, connection and protocol errors
    max_retries: int = 3
    #: the first retry waits between half of this and this (so: under 1 s)
    initial_seconds: float = 0.5
    multiplier: float = 2.0
    max_seconds: float = 8.0
    #: a 429 asking for a longer wait ends the attempt; the scheduler waits instead
    max_retry_after_seconds: float = 30.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Full-jitter-ish delay before retry number ``retry`` (0-based)."""
        ceiling = min(self.max_seconds, self.initial_seconds * self.multiplier**retry)
        return rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A successful token request."""

    token: Token
    #: the credentials that minted it (a 401 re-read may have replaced the ones passed in)
    credentials: Credentials
    #: the server handed back the token we already hold (Spring-style early request)
    reused: bool
    #: HTTP requests this fetch made
    requests: int


class TlsContexts:
    """One TLS context per CA bundle, shared by every profile's client.

    Each context holds the whole CA store in OpenSSL's memory (~0.8 MiB and ~35 ms to build):
    one per profile would make the agent's size grow with its profile count.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._contexts: dict[str | None, ssl.SSLContext] = {}

    def get(self, ca_bundle: str | None) -> ssl.SSLContext:
        """The context for ``ca_bundle`` (None: the system's or certifi's CAs, as httpx does)."""
        with self._lock:
            context = self._contexts.get(ca_bundle)
            if context is None:
                context = (
                    ssl.create_default_context(cafile=ca_bundle)
                    if ca_bundle
                    else httpx.create_ssl_context(trust_env=True)
                )
                self._contexts[ca_bundle] = context
            return context


class _ProtocolError(Exception):
    """A 200 whose body is not a valid token response."""


class ClientSecretBasic(httpx.Auth):
    """``Authorization: Basic`` with the client credentials; on 401, re-read them once.

    The model is httpx's DigestAuth: yield the request, look at the response, and on 401 yield
    it once more, here with credentials re-read from the sources (bypassing any cache), but
    only when they changed: resending the same secret cannot succeed.
    """

    requires_response_body = False

    def __init__(
        self,
        credentials: Credentials,
        *,
        form_encode: bool,
        reread: Callable[[], Credentials] | None,
        on_reread_error: Callable[[AgentError], None],
    ) -> None:
        self.credentials = credentials
        self._form_encode = form_encode
        self._reread = reread
        self._on_reread_error = on_reread_error
        self._reread_done = False
        #: requests sent through this auth (each retry and the 401 resend count)
        self.sent = 0

    def header(self) -> str:
        client_id = self.credentials.client_id
        secret = self.credentials.client_secret.reveal()
        if self._form_encode:  # RFC 6749 §2.3.1
            client_id, secret = quote_plus(client_id), quote_plus(secret)
        raw = f"{client_id}:{secret}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.header()
        self.sent += 1
        response = yield request
        if response.status_code != 401 or self._reread is None or self._reread_done:
            return
        self._reread_done = True
        try:
            fresh = self._reread()
        except AgentError as exc:
            self._on_reread_error(exc)
            return
        changed = not fresh.same_as(self.credentials)
        self.credentials = fresh
        if changed:
            request.headers["Authorization"] = self.header()
            self.sent += 1
            yield request


class TokenClient:
    """Fetches tokens from one token endpoint. Thread-safe; one instance per profile."""

    def __init__(
        self,
        *,
        token_url: str,
        profile: str,
        grant_type_location: GrantLocation = "query",
        scope: str | None = None,
        timeout: timedelta = timedelta(seconds=10),
        ca_bundle: str | None = None,
        tls: TlsContexts | None = None,
        http: httpx.Client | None = None,
        policy: RetryPolicy | None = None,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
        stopping: threading.Event | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.token_url = token_url
        self._profile = profile
        self._location = grant_type_location
        self._scope = scope
        self._timeout = timeout.total_seconds()
        self._policy = policy or RetryPolicy()
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._stopping = stopping or threading.Event()
        self._log = logger or logging.getLogger("agent.oauth")
        self._where = _display_url(token_url)
        self._own_http = http is None
        # A plain-http token URL (loopback only: the config checks) never uses TLS, so the CA
        # store is not loaded for it (~2 MiB and tens of ms at start).
        uses_tls = urlsplit(token_url).scheme.lower() == "https"
        verify: ssl.SSLContext | bool = (tls or TlsContexts()).get(ca_bundle) if uses_tls else False
        self._http = http or httpx.Client(
            verify=verify,
            trust_env=True,  # HTTPS_PROXY / NO_PROXY work as ops expect
            follow_redirects=False,  # never resend credentials to another URL
            timeout=httpx.Timeout(self._timeout),
        )

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    # ------------------------------------------------------------------ request
    def _request(self) -> httpx.Request:
        params = {"grant_type": "client_credentials"}
        if self._scope:
            params["scope"] = self._scope
        if self._location == "query":
            # OSIGU's shape: POST, grant_type in the query, empty body, no Content-Type.
            return self._http.build_request("POST", self.token_url, params=params)
        return self._http.build_request("POST", self.token_url, data=params)

    def fetch(
        self,
        credentials: Credentials,
        *,
        previous: Token | None = None,
        reread: Callable[[], Credentials] | None = None,
    ) -> Fetched:
        """One attempt (with its fast retries) to obtain a token.

        ``previous`` is the token currently held: when the server answers with the same
        access token, the result has ``reused=True`` and the previous absolute expiry (never
        extended). ``reread`` is called at most once, on a 401, to get fresh credentials.
        Raises :class:`CredentialsRejected`, :class:`RequestRejected` or
        :class:`AuthServerUnavailable`.
        """
        auth = ClientSecretBasic(
            credentials,
            form_encode=self._location == "body",
            reread=reread,
            on_reread_error=self._reread_failed,
        )
        retry = 0
        while True:
            sent_at = self._clock()
            wait: float | None = None
            kind = "unavailable"
            try:
                response = self._http.send(self._request(), auth=auth)
            except httpx.TimeoutException:
                failure = f"no answer from {self._where} within {self._timeout:g}s (timeout)"
            except httpx.DecodingError:
                failure = (
                    f"{self._where} answered with a body that could not be decoded "
                    "(its Content-Encoding does not match)"
                )
            except httpx.RequestError as exc:
                failure = f"cannot reach {self._where}: {_transport_reason(exc)}"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        token, reused = self._parse(response, sent_at, previous)
                    except _ProtocolError as exc:
                        failure = f"{self._where} answered 200 with {exc}"
                        kind = "protocol_error"
                    else:
                        return Fetched(token, auth.credentials, reused, auth.sent)
                elif status == 401:
                    raise CredentialsRejected(self._rejected_message(auth.credentials, response))
                elif status == 429:
                    retry_after = _retry_after(response, self._clock())
                    if (
                        retry_after is not None
                        and retry_after > self._policy.max_retry_after_seconds
                    ):
                        raise AuthServerUnavailable(
                            f"{self._where} answered 429 (rate limited) and asks to wait "
                            f"{retry_after:g}s (Retry-After); the agent will wait before asking "
                            "again. Many agents sharing one client_id? Cache tokens, do not mint "
                            "them per request.",
                            retry_after=retry_after,
                            outcome="rate_limited",
                        )
                    wait = retry_after
                    kind = "rate_limited"
                    failure = f"{self._where} answered 429 (rate limited)"
                elif status >= 500 or status == 408:
                    failure = f"{self._where} answered {status}{_error_field(response)}"
                else:
                    raise RequestRejected(self._misconfigured_message(response))
            if retry >= self._policy.max_retries or self._stopping.is_set():
                raise AuthServerUnavailable(
                    f"token request failed after {auth.sent} request(s): {failure}",
                    outcome=kind,
                )
            if wait is None:
                wait = self._policy.backoff(retry, self._rng)
            retry += 1
            self._log.warning(
                "%s; retry %d of %d in %.1fs",
                failure,
                retry,
                self._policy.max_retries,
                wait,
                extra={"profile": self._profile, "event": "token_retry", "attempt": retry},
            )
            if self._stopping.wait(wait):
                raise AuthServerUnavailable(f"stopping; last failure: {failure}", outcome=kind)

    # ----------------------------------------------------------------- response
    def _parse(
        self, response: httpx.Response, sent_at: datetime, previous: Token | None
    ) -> tuple[Token, bool]:
        try:
            doc: Any = msgspec.json.decode(response.content)
        except (msgspec.DecodeError, UnicodeDecodeError):
            ctype = response.headers.get("content-type", "no content-type")
            raise _ProtocolError(
                f"a body that is not JSON ({ctype}, {len(response.content)} bytes): a proxy or "
                "captive portal may be answering instead of the auth server"
            ) from None
        if not isinstance(doc, dict):
            raise _ProtocolError("JSON that is not an object")
        access_token = doc.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise _ProtocolError("no access_token (missing or empty)")
        raw_expires_in = doc.get("expires_in")
        expires_in: int = (
            raw_expires_in
            if isinstance(raw_expires_in, int) and not isinstance(raw_expires_in, bool)
            else -1
        )
        valid_seconds = expires_in >= 0
        # An unchanged token is recognised before expires_in is validated (DESIGN §2): Spring
        # hands back the existing token to an early request, with expires_in 0 in its last second.
        if previous is not None and access_token == previous.access_token.reveal():
            expires_at = previous.expires_at
            if valid_seconds:
                expires_at = min(expires_at, sent_at + timedelta(seconds=expires_in))
            return replace(previous, expires_at=expires_at), True
        if len(access_token.encode()) > MAX_TOKEN_BYTES or not _B64TOKEN.fullmatch(access_token):
            raise _ProtocolError(
                "an access_token that is not an RFC 6750 token (characters or size)"
            )
        token_type = doc.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise _ProtocolError(f"token_type {_short(token_type)} (expected bearer)")
        if expires_in <= 0:
            raise _ProtocolError(
                f"expires_in {_short(raw_expires_in)} (expected a whole number of seconds > 0)"
            )
        scope = doc.get("scope")
        extensions = doc.get("extensions")
        return (
            Token(
                access_token=Secret(access_token),
                token_type=token_type.lower(),
                expires_in=expires_in,
                obtained_at=sent_at,
                expires_at=sent_at + timedelta(seconds=expires_in),
                scope=scope if isinstance(scope, str) else None,
                extensions=extensions if isinstance(extensions, dict) else {},
            ),
            False,
        )

    # ----------------------------------------------------------------- messages
    def _rejected_message(self, credentials: Credentials, response: httpx.Response) -> str:
        return (
            f"{self._where} answered 401{_error_field(response)} for client_id "
            f"{credentials.client_id!r} (from source {credentials.source}): the client secret is "
            "wrong or was rotated, or these are credentials of the other environment (sandbox "
            "credentials do not work against production): check the secret in the store and the "
            "profile's environment/token_url"
        )

    def _misconfigured_message(self, response: httpx.Response) -> str:
        status = response.status_code
        if status == 400:
            cause = (
                'the request is malformed: with OSIGU keep grant_type_location = "query"; '
                'use "body" only for standard OAuth2 servers'
            )
        elif status == 405:
            cause = "the endpoint refused the method: token_url may point at the wrong path"
        elif status == 404:
            cause = "no token endpoint at this URL: check token_url"
        elif 300 <= status < 400:
            location = _display_url(urljoin(self.token_url, response.headers.get("location", "")))
            cause = (
                f"it redirects to {location}; credentials are not sent on redirects: set "
                "token_url to the final URL"
            )
        else:
            cause = "the auth server refused the request: check token_url, scope and the client"
        return f"{self._where} answered {status}{_error_field(response)}: {cause}"

    def _reread_failed(self, exc: AgentError) -> None:
        self._log.warning(
            "after a 401, re-reading the credentials failed: %s",
            exc,
            extra={"profile": self._profile, "event": "source_error"},
        )


def _display_url(url: str) -> str:
    """The URL without userinfo or query, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the token endpoint"
    host = parts.hostname or "?"
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _error_field(response: httpx.Response) -> str:
    """`` (invalid_client: Bad client credentials)`` from an OAuth2 error body, if any."""
    try:
        doc = msgspec.json.decode(response.content)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return ""
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
        return ""
    text = str(doc["error"])[:80]
    description = doc.get("error_description")
    if isinstance(description, str) and description:
        text += f": {description[:160]}"
    return f" ({text})"


def _transport_reason(exc: httpx.RequestError) -> str:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in reason:
        return f"TLS verification failed ({reason}); set ca_bundle to the CA that signed it"
    return f"{type(exc).__name__}: {reason}"


def _retry_after(response: httpx.Response, now: datetime) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())
