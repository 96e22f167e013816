"""The token client: OSIGU's client-credentials request, response validation, retry policy.

One layer retries, and it is this one, for seconds-long faults inside one attempt (DESIGN §2):
5xx, timeouts and connection errors get at most 3 retries with jittered exponential backoff;
429 honours ``Retry-After`` up to 30 s; 400/405 and 401 are never retried fast. Anything
longer (minutes) belongs to the scheduler.

Nothing a server sends can hold or flood the agent (DESIGN §10): each HTTP exchange has one
deadline, connect to last byte (:class:`_Exchange` cuts the connection when it passes, whatever
the server trickles); a body is read up to :data:`MAX_ANSWER_BYTES` after decoding, by a bounded
decoder of our own (httpx would inflate a whole compressed chunk at once); ``Retry-After`` and
``expires_in`` are clamped or refused before they become times; and every text of the server's
that reaches a message goes through :func:`agent.masking.outside`.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import logging
import random
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote_plus, urljoin, urlsplit

import httpx
import msgspec

from agent.clock import Clock, utc_now
from agent.errors import (
    AuthServerUnavailable,
    CredentialsRejected,
    RequestRejected,
)
from agent.masking import basic_value, outside
from agent.models import MAX_ANSWER_BYTES, Credentials, Secret, Token, is_access_token
from agent.retry import Backoff

#: the longest lifetime taken from ``expires_in``; more is not a plausible answer (and would
#: overflow date arithmetic)
MAX_EXPIRES_IN = 10 * 366 * 24 * 3600
#: a ``Retry-After`` is never taken beyond this (the scheduler caps its own wait lower still)
MAX_RETRY_AFTER_SECONDS = 300.0
#: what the agent can decode (sent as Accept-Encoding, so a server has no reason to use another)
ACCEPT_ENCODING = "gzip, deflate"
#: of an error answer, only this much is read (its first characters are all that is shown)
_ERROR_BODY_BYTES = 64 * 1024

GrantLocation = Literal["query", "body"]


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
    #: no retry starts once the attempt has taken this long (its requests and waits)
    max_total_seconds: float = 90.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The delay before retry number ``retry`` (0-based): between half the ceiling and it."""
        return Backoff(self.initial_seconds, self.max_seconds, self.multiplier).delay(retry, rng)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A successful token request."""

    token: Token
    #: the credentials that minted it
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


def basic_header(credentials: Credentials, *, form_encode: bool) -> str:
    """``Basic base64(client_id:client_secret)``; form-urlencoded first in body mode (RFC 6749
    §2.3.1), as they are in query mode (the seed's samples)."""
    client_id = credentials.client_id
    secret = credentials.client_secret.reveal()
    if form_encode:
        client_id, secret = quote_plus(client_id), quote_plus(secret)
    raw = f"{client_id}:{secret}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failed exchange that the retry loop may retry."""

    text: str
    kind: str = "unavailable"
    #: seconds to wait before the retry (a short Retry-After); None: the backoff
    wait: float | None = None
    #: a Retry-After too long to wait inside the attempt (ends it)
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class _Rejected:
    """A 401; ``detail`` is the server's error field, safe to show."""

    detail: str


class _TooLarge(Exception):
    """A body beyond the bound (the connection is dropped)."""


class _Exchange:
    """One deadline for one HTTP exchange, connect to last byte (DESIGN §10).

    httpx's timeouts bound each read, so a server sending one byte a second never times out.
    The exchange keeps a duplicate of every socket it opens (httpcore's ``trace`` extension
    reports them) and shuts the connection down when the deadline passes, which ends any read
    or write in progress. The duplicate is ours until :meth:`close`, so a shutdown can never hit
    a descriptor that was closed and reused meanwhile. A timer thread lives while the exchange
    does, never longer.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(0.001, self._deadline - time.monotonic())

    def timeouts(self) -> dict[str, float]:
        """httpx's per-phase timeouts, none beyond what is left of the deadline."""
        left = self.remaining()
        return {"connect": left, "read": left, "write": left, "pool": left}

    def trace(self, name: str, info: dict[str, Any]) -> None:
        if name != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            if self.expired:
                _shutdown(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer or by httpcore
        sock.shutdown(socket.SHUT_RDWR)


class _BoundedDecoder:
    """Content-Encoding ``identity``, ``gzip`` or ``deflate``, inflating at most ``limit`` bytes.

    zlib's ``max_length`` stops inflating at the bound, so a compression bomb costs at most
    ``limit`` bytes of memory, never what it would inflate to.
    """

    def __init__(self, encoding: str, limit: int) -> None:
        self._limit = limit
        self._out = bytearray()
        self._encoding = encoding
        self._zlib: Any = None
        if encoding == "gzip":
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS)
            self._first = True
        elif encoding != "identity":
            raise _ProtocolError(
                f"a body in Content-Encoding {outside(encoding, limit=40)!r}, which the agent "
                f"did not ask for (it sends Accept-Encoding: {ACCEPT_ENCODING})"
            )

    def feed(self, data: bytes) -> None:
        if self._zlib is None:
            self._append(data)
            return
        try:
            if self._encoding == "deflate" and self._first:
                self._first = False
                try:
                    self._inflate(data)
                except zlib.error:  # "deflate" sent raw, without the zlib header
                    self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                    self._inflate(data)
                return
            self._inflate(data)
        except zlib.error:
            raise _ProtocolError(
                f"a body that does not decode as its Content-Encoding ({self._encoding})"
            ) from None

    def _inflate(self, data: bytes) -> None:
        room = self._limit - len(self._out) + 1
        self._append(self._zlib.decompress(data, room))
        if self._zlib.unconsumed_tail:
            raise _TooLarge

    def _append(self, data: bytes) -> None:
        self._out += data
        if len(self._out) > self._limit:
            raise _TooLarge

    def finish(self) -> bytes:
        if self._zlib is not None:
            self._append(self._zlib.flush(self._limit - len(self._out) + 1))
        return bytes(self._out)


def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The decoded body, at most ``limit`` bytes (raises _TooLarge beyond, _ProtocolError for
    an encoding that cannot be decoded)."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower() or "identity"
    decoder = _BoundedDecoder(encoding, limit)
    received = 0
    chunks: Iterator[bytes] = response.iter_raw(64 * 1024)
    for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise _TooLarge
        decoder.feed(chunk)
    return decoder.finish()


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
            # a new connection per exchange (one every few hours): the deadline owns its socket
            # (see _Exchange), and no half-read connection of a hostile server is ever reused
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    # ------------------------------------------------------------------ request
    def _request(self) -> httpx.Request:
        params = {"grant_type": "client_credentials"}
        if self._scope:
            params["scope"] = self._scope
        headers = {"Accept-Encoding": ACCEPT_ENCODING}
        if self._location == "query":
            # OSIGU's shape: POST, grant_type in the query, empty body, no Content-Type.
            return self._http.build_request("POST", self.token_url, params=params, headers=headers)
        return self._http.build_request("POST", self.token_url, data=params, headers=headers)

    def fetch(
        self,
        credentials: Credentials,
        *,
        previous: Token | None = None,
    ) -> Fetched:
        """One attempt (with its fast retries) to obtain a token.

        ``previous`` is the token currently held: when the server answers with the same
        access token, the result has ``reused=True`` and the previous absolute expiry (never
        extended). A 401 is not retried here: the profile re-reads its sources and asks again
        with credentials that changed (:meth:`agent.manager.Profile._fetch`). Raises
        :class:`CredentialsRejected`, :class:`RequestRejected` or
        :class:`AuthServerUnavailable`; nothing a server sends makes it raise anything else.
        """
        retry = 0
        sent = 0
        began = time.monotonic()
        while True:
            sent_at = self._clock()
            wait: float | None = None
            kind = "unavailable"
            sent += 1
            outcome = self._exchange(credentials, previous, sent_at)
            if isinstance(outcome, tuple):
                token, reused = outcome
                return Fetched(token, credentials, reused, sent)
            if isinstance(outcome, _Failure):
                failure, kind, wait = outcome.text, outcome.kind, outcome.wait
                if outcome.retry_after is not None:
                    raise AuthServerUnavailable(
                        f"{failure} and asks to wait {outcome.retry_after:g}s (Retry-After). "
                        "Many agents sharing one client_id? Cache tokens, do not mint them "
                        "per request.",
                        retry_after=outcome.retry_after,
                        outcome="rate_limited",
                    )
            else:  # a 401
                raise CredentialsRejected(self._rejected_message(credentials, outcome.detail))
            if wait is None:
                wait = self._policy.backoff(retry, self._rng)
            spent = time.monotonic() - began
            if (
                retry >= self._policy.max_retries
                or spent + wait > self._policy.max_total_seconds
                or self._stopping.is_set()
            ):
                raise AuthServerUnavailable(
                    f"token request failed after {sent} request(s): {failure}",
                    outcome=kind,
                )
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

    def _exchange(
        self, credentials: Credentials, previous: Token | None, sent_at: datetime
    ) -> tuple[Token, bool] | _Failure | _Rejected:
        """One request under one deadline: the token, a failure to retry, or a 401.

        Raises :class:`RequestRejected` for 400/405 and other final answers."""
        secrets = self._secrets(credentials, previous)
        exchange = _Exchange(self._timeout)
        request = self._request()
        request.headers["Authorization"] = basic_header(
            credentials, form_encode=self._location == "body"
        )
        request.extensions["timeout"] = exchange.timeouts()
        request.extensions["trace"] = exchange.trace
        response: httpx.Response | None = None
        try:
            try:
                response = self._http.send(request, stream=True)
                status = response.status_code
                body = _read_bounded(
                    response, MAX_ANSWER_BYTES if status == 200 else _ERROR_BODY_BYTES
                )
            except _TooLarge:
                if response is not None and response.status_code != 200:
                    body = b""  # an error page too long to show: its status says enough
                else:
                    return _Failure(
                        f"{self._where} answered 200 with a body larger than "
                        f"{MAX_ANSWER_BYTES // 1024} KiB (after decoding); connection dropped",
                        "protocol_error",
                    )
            except _ProtocolError as exc:
                return _Failure(f"{self._where} answered with {exc}", "protocol_error")
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if exchange.expired or isinstance(exc, httpx.TimeoutException):
                    return _Failure(
                        f"no complete answer from {self._where} within {self._timeout:g}s "
                        "(request_timeout: the whole exchange, connect to last byte)"
                    )
                if isinstance(exc, httpx.DecodingError):
                    return _Failure(
                        f"{self._where} answered with a body that could not be decoded "
                        "(its Content-Encoding does not match)",
                        "protocol_error",
                    )
                return _Failure(f"cannot reach {self._where}: {_transport_reason(exc, secrets)}")
        finally:
            if response is not None:
                response.close()
            exchange.close()
        if status == 200:
            try:
                return self._parse(response, body, sent_at, previous)
            except _ProtocolError as exc:
                return _Failure(f"{self._where} answered 200 with {exc}", "protocol_error")
        detail = _error_field(body, secrets)
        if status == 401:
            return _Rejected(detail)
        if status == 429:
            retry_after = _retry_after(response, self._clock())
            failure = f"{self._where} answered 429 (rate limited){detail}"
            if retry_after is not None and retry_after > self._policy.max_retry_after_seconds:
                return _Failure(failure, "rate_limited", retry_after=retry_after)
            return _Failure(failure, "rate_limited", wait=retry_after)
        if status >= 500 or status == 408:
            return _Failure(f"{self._where} answered {status}{detail}")
        raise RequestRejected(self._misconfigured_message(response, detail))

    def _secrets(self, credentials: Credentials, previous: Token | None) -> tuple[str, ...]:
        """What a server's text must never show: the secret, the Basic value, the token."""
        secret = credentials.client_secret.reveal()
        values = [
            secret,
            quote_plus(secret),
            basic_value(credentials.client_id, secret),
            basic_value(quote_plus(credentials.client_id), quote_plus(secret)),
        ]
        if previous is not None:
            values.append(previous.access_token.reveal())
        return tuple(values)

    # ----------------------------------------------------------------- response
    def _parse(
        self, response: httpx.Response, body: bytes, sent_at: datetime, previous: Token | None
    ) -> tuple[Token, bool]:
        try:
            doc: Any = msgspec.json.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            ctype = outside(response.headers.get("content-type", "no content-type"), limit=60)
            raise _ProtocolError(
                f"a body that is not JSON ({ctype}, {len(body)} bytes): a proxy or "
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
        valid_seconds = 0 <= expires_in <= MAX_EXPIRES_IN
        # An unchanged token is recognised before expires_in is validated (DESIGN §2): Spring
        # hands back the existing token to an early request, with expires_in 0 in its last second.
        if previous is not None and access_token == previous.access_token.reveal():
            expires_at = previous.expires_at
            if valid_seconds:
                expires_at = min(expires_at, sent_at + timedelta(seconds=expires_in))
            return replace(previous, expires_at=expires_at), True
        if not is_access_token(access_token):
            raise _ProtocolError(
                "an access_token that is not an RFC 6750 token (characters or size)"
            )
        token_type = doc.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise _ProtocolError(f"token_type {_short(token_type)} (expected bearer)")
        if not 0 < expires_in <= MAX_EXPIRES_IN:
            raise _ProtocolError(
                f"expires_in {_short(raw_expires_in)} (expected a whole number of seconds > 0, "
                "at most ten years)"
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
    def _rejected_message(self, credentials: Credentials, detail: str) -> str:
        return (
            f"{self._where} answered 401{detail} for client_id "
            f"{credentials.client_id!r} (from source {credentials.source}): the client secret is "
            "wrong or was rotated, or these are credentials of the other environment (sandbox "
            "credentials do not work against production): check the secret in the store and the "
            "profile's environment/token_url"
        )

    def _misconfigured_message(self, response: httpx.Response, detail: str) -> str:
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
            target = urljoin(self.token_url, outside(response.headers.get("location", "")))
            cause = (
                f"it redirects to {_display_url(target)}; credentials are not sent on "
                "redirects: set token_url to the final URL"
            )
        else:
            cause = "the auth server refused the request: check token_url, scope and the client"
        return f"{self._where} answered {status}{detail}: {cause}"


def _display_url(url: str) -> str:
    """The URL without userinfo or query, for messages."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "the token endpoint"
    host = parts.hostname or "?"
    if port:
        host = f"{host}:{port}"
    return outside(f"{parts.scheme}://{host}{parts.path}")


def _short(value: object) -> str:
    return outside(repr(value), limit=40)


def _error_field(body: bytes, secrets: tuple[str, ...]) -> str:
    """`` (invalid_client: Bad client credentials)`` from an OAuth2 error body, if any: masked,
    cut and escaped (a hostile server may echo the secret or send terminal controls)."""
    try:
        doc = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return ""
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
        return ""
    text = str(doc["error"])
    description = doc.get("error_description")
    if isinstance(description, str) and description:
        text += f": {description}"
    return f" ({outside(text, secrets)})"


def _transport_reason(exc: httpx.TransportError, secrets: tuple[str, ...]) -> str:
    reason = outside(str(exc) or type(exc).__name__, secrets)
    if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in reason:
        return f"TLS verification failed ({reason}); set ca_bundle to the CA that signed it"
    return f"{type(exc).__name__}: {reason}"


def _retry_after(response: httpx.Response, now: datetime) -> float | None:
    """``Retry-After`` in seconds (delta or HTTP date), clamped to
    [0, MAX_RETRY_AFTER_SECONDS]; None when absent or unreadable. Never trusted further."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        # a huge number of digits is just "long": never parsed into a float or a timedelta
        seconds = float(value) if len(value) <= 6 else MAX_RETRY_AFTER_SECONDS
        return min(seconds, MAX_RETRY_AFTER_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)
