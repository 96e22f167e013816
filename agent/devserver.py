"""A local OSIGU token endpoint, faithful to the seed, for the test suite and ``dvs-agent dev``.

It speaks the seed's shape (``POST /v1/oauth/token?grant_type=client_credentials`` with HTTP
Basic client authentication, an empty body, a Spring Security OAuth style JSON answer) and,
when asked, the RFC 6749 §4.4 form body. Tests steer it with :class:`Fault` objects queued
with :meth:`TokenServer.enqueue`, and inspect what it saw with :meth:`TokenServer.requests`
and :meth:`TokenServer.issued`. Standard library only; every public method is thread-safe.

Besides wrong statuses and bodies, a fault can make the server behave like a hostile or broken
one, to attack the client:

- :meth:`Fault.trickle`: the answer is sent one byte per ``interval`` seconds (the body only, or
  the status line and headers too);
- :meth:`Fault.endless`: a chunked JSON-looking body that never ends;
- :meth:`Fault.compression_bomb`: a gzip or deflate body of about 1 MB that inflates to 1 GiB;
- :meth:`Fault.oversized`: a valid token answer padded to 100 MiB;
- :meth:`Fault.echo`: an error text that echoes the secret, the Authorization header and a
  token, with terminal escapes, CR and LF;
- :meth:`Fault.hang`: no answer at all, until the server stops.

Faults are global, or queued for one client id (``enqueue(..., client_id=...)``), so that one
client can be attacked while another is served. Big bodies are streamed in chunks (never built in
memory); :meth:`TokenServer.stop` ends every answer still being sent, and a client that closes
its side ends it too.

Rate limit and counts (for fleet tests and the bench, issue 13):

- ``TokenServer(rate_limit=N)`` (or ``server.rate_limit = N`` while it runs) admits at most N
  requests to the token path per client id in any sliding 1 s window; more are answered 429
  with ``Retry-After`` (whole seconds, at least 1) and the seed's 429 body
  (``{"error": "rate_limited", "error_description": "rate limited"}``), before any fault, hook
  or credential check: a refused request mints nothing and consumes no fault, and refused
  requests do not fill the window. ``None`` or 0 (the default): no limit. Requests without
  readable Basic credentials are never limited.
- :meth:`TokenServer.counts` (per client id, a :class:`ClientCounts`), :meth:`TokenServer.
  client_counts` and :meth:`TokenServer.reset_counts`, and over HTTP ``GET /_devserver/counts``
  (``DELETE`` answers the counts and resets them, atomically): requests to the token path,
  tokens minted, the same token handed back (``reuse_tokens``), 429s and 401s answered
  (whatever their cause: the limit, the credentials or a queued fault). Requests without
  readable Basic credentials are counted under the client id ``""``; :meth:`TokenServer.clear`
  keeps the counts. Requests to ``/_devserver/counts`` are neither recorded, counted nor
  rate-limited; the agent never asks for it, so the token endpoint stays as faithful.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import math
import select
import socket
import ssl
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

__all__ = [
    "COUNTS_PATH",
    "TOKEN_PATH",
    "ClientCounts",
    "Fault",
    "IssuedToken",
    "RecordedRequest",
    "TokenServer",
]

TOKEN_PATH = "/v1/oauth/token"  # noqa: S105 (a URL path, not a password)
#: the introspection path: GET the per-client counts, DELETE to read and reset them
COUNTS_PATH = "/_devserver/counts"
#: the rate limit's sliding window, in seconds
_RATE_WINDOW = 1.0
GRANT_TYPE = "client_credentials"
_FORM_TYPE = "application/x-www-form-urlencoded"
_JSON_TYPE = "application/json"
_MAX_BODY = 1 << 20
_IDLE_KEEPALIVE_SECONDS = 30.0
#: how often a hanging answer checks for the server's stop and the client's close
_POLL_SECONDS = 0.05
#: bytes per piece of a streamed body (the stop event is checked between pieces)
_PIECE = 64 * 1024
#: a compression bomb's answer (a token answer or an error) sits in its last KiB
_BOMB_TAIL = 1024
_ENCODINGS = {"gzip": 31, "deflate": 15}  # wbits: a gzip wrapper, a zlib wrapper (RFC 9110)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    """What the server does for ONE request to the token path instead of handling it normally.

    Faults are consumed in queue order, one per request (any method) to the token path; a
    request whose Basic client id has faults of its own queued takes the next of those first.

    After ``delay``, the answer is the fault's (``status``, ``body``...), or with ``passthrough``
    the normal one; ``echo_request`` replaces it with an echoing error, ``drop_connection`` and
    ``never_answer`` with none at all. Then at most one body shape applies (``endless_body``,
    else ``bomb_bytes``, else ``pad_to``), and ``trickle_interval`` slows down the sending of
    whatever is sent. The classmethods build the usual combinations.
    """

    #: HTTP status to answer with
    status: int = 200
    #: response body; ``None`` gives a sensible default body for ``status``
    body: bytes | None = None
    #: extra response headers (override the defaults, e.g. ``Retry-After``)
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Content-Type; ``None`` gives the default for ``status`` (``application/json`` for a body)
    content_type: str | None = None
    #: seconds to wait before answering (or dropping, or handling normally)
    delay: float = 0.0
    #: close the connection without sending any response
    drop_connection: bool = False
    #: handle the request normally (after ``delay``), then shape and send it as told below
    passthrough: bool = False
    #: send the answer one byte per this many seconds (0: at once)
    trickle_interval: float = 0.0
    #: with ``trickle_interval``: the status line and headers are trickled too (else sent at once)
    trickle_headers: bool = False
    #: a ``Transfer-Encoding: chunked`` body ``{"access_token": "aaaa…`` that never ends (it
    #: stops when the client closes, the server stops, or a write waits 30 s)
    endless_body: bool = False
    #: bytes of ``a`` per chunk of an ``endless_body``
    chunk_size: int = 64 * 1024
    #: a compression bomb: a body that inflates to this many bytes (0: none); spaces (JSON
    #: whitespace), then the answer in the last KiB, so a client without a bound parses it
    bomb_bytes: int = 0
    #: the bomb's ``Content-Encoding``: ``gzip``, or ``deflate`` (zlib-wrapped)
    encoding: str = "gzip"
    #: pad the answer's body to this many bytes (0: no padding); sent with a Content-Length
    pad_to: int = 0
    #: with ``pad_to``: the padding is a ``"padding"`` string field of the JSON object (so the
    #: JSON ends only with the body); False: trailing whitespace (the JSON ends at once)
    pad_in_field: bool = True
    #: answer an error whose text echoes the request's client secret (decoded from Basic), its
    #: raw Authorization value and a token (``text/html`` when ``content_type`` says so)
    echo_request: bool = False
    #: with ``echo_request``: embed raw ESC sequences, CR and LF in the echoed text
    control_chars: bool = False
    #: with ``echo_request``: the token to echo; None: the last token issued to that client
    echo_token: str | None = None
    #: never answer: hold the request (recorded on arrival) until the server stops or the client
    #: closes its side
    never_answer: bool = False

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(_ENCODINGS)}: {self.encoding!r}")
        if self.chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if min(self.trickle_interval, self.delay, self.bomb_bytes, self.pad_to) < 0:
            raise ValueError("trickle_interval, delay, bomb_bytes and pad_to must be >= 0")

    @classmethod
    def http_status(cls, status: int, retry_after: str | None = None) -> Fault:
        """An error status with its default body, and ``Retry-After`` when given."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return cls(status=status, headers=headers)

    @classmethod
    def json_body(cls, obj: Any, status: int = 200) -> Fault:
        """A custom JSON answer, e.g. a 200 without ``expires_in``."""
        return cls(status=status, body=json.dumps(obj).encode(), content_type=_JSON_TYPE)

    @classmethod
    def malformed_json(cls) -> Fault:
        """A 200 labelled ``application/json`` whose body is cut short (not JSON)."""
        body = b'{"access_token": "7dd4f350-676e-4257-9d7b-f3c5ac4d", "token_type": "bea'
        return cls(status=200, body=body, content_type=_JSON_TYPE)

    @classmethod
    def html(cls, status: int = 200) -> Fault:
        """An HTML page, as a proxy or captive portal returns it."""
        return cls(status=status, body=_html_page(status), content_type="text/html")

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Handle the request normally, after ``seconds``."""
        return cls(delay=seconds, passthrough=True)

    @classmethod
    def drop(cls, delay: float = 0.0) -> Fault:
        """Close the connection without an answer (after ``delay``)."""
        return cls(drop_connection=True, delay=delay)

    @classmethod
    def trickle(
        cls,
        interval: float = 1.0,
        headers: bool = False,
        status: int = 200,
        body: bytes | None = None,
    ) -> Fault:
        """Send the answer one byte per ``interval`` seconds; with ``headers`` the status line
        and headers too. By default the request is handled normally (a patient client gets a
        real token); else the answer is ``status`` with ``body`` (or its default body)."""
        passthrough = status == 200 and body is None
        return cls(
            status=status,
            body=body,
            trickle_interval=interval,
            trickle_headers=headers,
            passthrough=passthrough,
        )

    @classmethod
    def endless(cls, chunk_size: int = 64 * 1024) -> Fault:
        """A 200 ``application/json``, chunked, ``{"access_token": "`` then ``a`` forever."""
        return cls(status=200, endless_body=True, chunk_size=chunk_size)

    @classmethod
    def compression_bomb(cls, decoded_bytes: int = 1 << 30, encoding: str = "gzip") -> Fault:
        """The normal answer behind ``decoded_bytes`` of spaces, compressed with ``encoding``
        (``gzip`` or ``deflate``): about 1 MB on the wire per GiB, with a Content-Length.

        The padding is compressed once per size and encoding (about 2 s per GiB, when the fault
        is queued) and kept by the server; the decoded body is never in memory. It inflates to
        ``decoded_bytes`` (at least 1 KiB, more if the answer is longer than 1 KiB)."""
        return cls(passthrough=True, bomb_bytes=decoded_bytes, encoding=encoding)

    @classmethod
    def oversized(cls, total_bytes: int = 100 * 1024 * 1024, in_field: bool = True) -> Fault:
        """The normal answer (a valid token answer, its token recorded as issued) padded to
        ``total_bytes``: by a ``"padding"`` field of ``a`` (``in_field``) or by trailing spaces.
        Streamed, with a Content-Length."""
        return cls(passthrough=True, pad_to=total_bytes, pad_in_field=in_field)

    @classmethod
    def echo(
        cls,
        status: int = 401,
        control_chars: bool = True,
        token: str | None = None,
        html: bool = False,
    ) -> Fault:
        """An error whose ``error_description`` (or HTML page, with ``html``) echoes the
        request's client secret, its raw Authorization value and ``token`` (by default the last
        token issued to the client), with raw ESC, CR and LF when ``control_chars``."""
        return cls(
            status=status,
            echo_request=True,
            control_chars=control_chars,
            echo_token=token,
            content_type="text/html" if html else None,
        )

    @classmethod
    def hang(cls) -> Fault:
        """Never answer: the request is recorded on arrival (status 0) and held until the server
        stops or the client closes its side."""
        return cls(never_answer=True)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, with what it answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    #: header names lowercased; repeated headers joined with ", "
    headers: dict[str, str]
    body: bytes
    #: from the Basic header, decoded as the server's mode does; None when absent or unreadable
    client_id: str | None
    client_secret: str | None
    #: the status answered; 0 for no answer: a dropped connection, or a delay fault still
    #: waiting (such a request is recorded on arrival and its record replaced once answered)
    status: int
    #: ``time.time()`` when the request arrived
    received_at: float
    #: the ``access_token`` of a 200 answer, if it had one
    access_token: str | None


@dataclass(frozen=True)
class IssuedToken:
    """A token the server minted (a reused token is not minted again)."""

    access_token: str
    client_id: str
    #: the secret the client authenticated with when this token was minted
    client_secret: str
    issued_at: float
    expires_at: float


@dataclass(frozen=True)
class ClientCounts:
    """What one client id asked of the token path, and what it got (see the module docstring)."""

    #: requests to the token path (any method and answer, counted on arrival)
    requests: int = 0
    #: tokens minted (each one is in :meth:`TokenServer.issued`)
    tokens_issued: int = 0
    #: answers that handed back the client's current token again (``reuse_tokens``)
    tokens_reused: int = 0
    #: 429 answers: refused by the rate limit, or a queued 429 fault
    rate_limited: int = 0
    #: 401 answers: rejected credentials, or a queued 401 fault
    unauthorized: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "tokens_issued": self.tokens_issued,
            "tokens_reused": self.tokens_reused,
            "rate_limited": self.rate_limited,
            "unauthorized": self.unauthorized,
        }


@dataclass
class _Counts:
    requests: int = 0
    tokens_issued: int = 0
    tokens_reused: int = 0
    rate_limited: int = 0
    unauthorized: int = 0

    def frozen(self) -> ClientCounts:
        return ClientCounts(
            self.requests,
            self.tokens_issued,
            self.tokens_reused,
            self.rate_limited,
            self.unauthorized,
        )


@dataclass
class _Client:
    secret: str
    provider_slug: str
    revoked: bool = False


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    access_token: str | None = None
    event: str | None = None


class TokenServer:
    """OSIGU's token endpoint on a local port, served from a daemon thread.

    ``expires_in``, ``reuse_tokens`` and ``rate_limit`` may be changed while it runs; each
    request reads them.
    With ``reuse_tokens`` a client that asks while its last token (for the same scope) is
    unexpired gets that token again with the whole seconds left, as Spring Security OAuth's
    token services do; rotating the client's secret does not change that (the stored token is
    bound to the client id), revoking or re-adding the client does.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clients: Mapping[str, str] | None = None,
        expires_in: int = 86399,
        scope: str = "read write",
        provider_slug: str = "br-gamma",
        reuse_tokens: bool = False,
        accept_body_grant: bool = False,
        on_event: Callable[[str], None] | None = None,
        tls: ssl.SSLContext | None = None,
        rate_limit: int | None = None,
    ) -> None:
        self.host = host
        #: serve HTTPS with this server-side context (tests of ca_bundle and TLS failures)
        self.tls = tls
        self.expires_in = expires_in
        self.scope = scope
        self.provider_slug = provider_slug
        self.reuse_tokens = reuse_tokens
        self.accept_body_grant = accept_body_grant
        #: called with one human-readable line per issued token, rejection or fault
        self.on_event = on_event
        #: called before each token request is judged (the dev command syncs its secret file)
        self.before_request: Callable[[], None] | None = None
        self._lock = threading.Condition(threading.Lock())
        self._clients: dict[str, _Client] = {}
        self._faults: list[Fault] = []
        self._client_faults: dict[str, list[Fault]] = {}
        self._requests: list[RecordedRequest] = []
        self._issued: dict[str, IssuedToken] = {}
        self._current: dict[tuple[str, str], IssuedToken] = {}
        self._counts: dict[str, _Counts] = {}
        #: monotonic arrival times of the requests admitted in the last window, by client id
        self._windows: dict[str, deque[float]] = {}
        self._rate_limit: int | None = None
        self.rate_limit = rate_limit
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        #: compressed bomb padding by (decoded size, encoding): the bytes so far and the
        #: compressor's state after them (copied for each answer)
        self._bombs: dict[tuple[int, str], tuple[bytes, zlib._Compress]] = {}
        self._bomb_lock = threading.Lock()
        self._httpd: _HTTPServer | None = self._bind(port)
        self._port: int = self._httpd.server_address[1]
        for client_id, secret in (clients or {}).items():
            self.add_client(client_id, secret)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    def _bind(self, port: int) -> _HTTPServer:
        httpd = _HTTPServer((self.host, port), self)
        if self.tls is not None:
            httpd.socket = self.tls.wrap_socket(httpd.socket, server_side=True)
        return httpd

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self._port}{TOKEN_PATH}"

    @property
    def counts_url(self) -> str:
        """The URL of :data:`COUNTS_PATH` on this server."""
        return self.url.removesuffix(TOKEN_PATH) + COUNTS_PATH

    @property
    def rate_limit(self) -> int | None:
        """Requests admitted per client id per second; None: no limit."""
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"rate_limit must be an int or None: {value!r}")
        if value is not None and value < 0:
            raise ValueError(f"rate_limit must be >= 0: {value}")
        with self._lock:
            self._rate_limit = value or None
            if self._rate_limit is None:
                self._windows.clear()

    def start(self) -> TokenServer:
        """Serve from a daemon thread. After :meth:`stop` it may start again on the same port."""
        with self._lock:
            if self._thread is not None:
                return self
            if self._httpd is None:
                self._httpd = self._bind(self._port)
            self._stopping = threading.Event()
            httpd = self._httpd
            self._thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"dvs-devserver:{self._port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, close open keep-alive connections, abandon delayed answers.

        Answers still being sent (trickled, endless, hanging) end within a moment; this does not
        wait for them."""
        with self._lock:
            httpd, thread = self._httpd, self._thread
            self._httpd, self._thread = None, None
            self._stopping.set()
            connections = list(self._connections)
            self._connections.clear()
        if httpd is None:
            return
        if thread is not None:
            httpd.shutdown()
            thread.join(timeout=5)
        httpd.server_close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------

    def add_client(self, client_id: str, secret: str, *, provider_slug: str | None = None) -> None:
        """Register (or re-register, un-revoking) a client."""
        with self._lock:
            self._clients[client_id] = _Client(secret, provider_slug or self.provider_slug)
            self._forget_current(client_id)

    def set_secret(self, client_id: str, secret: str) -> None:
        """Rotate a client's secret: the old one is rejected from now on."""
        with self._lock:
            self._clients[client_id].secret = secret

    def revoke(self, client_id: str) -> None:
        """Reject every request for this client from now on."""
        with self._lock:
            self._clients[client_id].revoked = True
            self._forget_current(client_id)

    def _forget_current(self, client_id: str) -> None:
        for key in [k for k in self._current if k[0] == client_id]:
            del self._current[key]

    # -- faults and records ------------------------------------------------------------------

    def enqueue(self, *faults: Fault, client_id: str | None = None) -> None:
        """Queue faults for every client, or (``client_id``) for requests of that client only,
        whose own queue is consumed before the global one. A bomb is compressed here."""
        for fault in faults:
            if fault.bomb_bytes and not fault.endless_body:
                self._bomb_state(fault.bomb_bytes, fault.encoding)
        with self._lock:
            if client_id is None:
                self._faults.extend(faults)
            else:
                self._client_faults.setdefault(client_id, []).extend(faults)

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def token_requests(self, client_id: str | None = None) -> list[RecordedRequest]:
        """Only the POSTs to the token path (of ``client_id``'s Basic credentials, if given)."""
        with self._lock:
            return [r for r in self._requests if _is_token_request(r, client_id)]

    def clear(self) -> None:
        """Forget recorded requests and every queued fault (issued tokens and clients stay)."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._client_faults.clear()

    def issued(self) -> dict[str, IssuedToken]:
        """Every token minted, by access_token."""
        with self._lock:
            return dict(self._issued)

    def counts(self) -> dict[str, ClientCounts]:
        """The counts of every client id seen since the last reset (``""``: no readable Basic
        credentials)."""
        with self._lock:
            return {client_id: c.frozen() for client_id, c in self._counts.items()}

    def client_counts(self, client_id: str) -> ClientCounts:
        """The counts of one client id (all zero if it has not been seen since the last reset)."""
        with self._lock:
            counts = self._counts.get(client_id)
            return counts.frozen() if counts is not None else ClientCounts()

    def reset_counts(self) -> dict[str, ClientCounts]:
        """Set every count to zero; answers the counts as they were (read and reset at once).
        The rate limit's windows are kept."""
        with self._lock:
            before = {client_id: c.frozen() for client_id, c in self._counts.items()}
            self._counts.clear()
            return before

    def wait_for_requests(
        self, n: int, timeout: float = 10.0, *, client_id: str | None = None
    ) -> bool:
        """Wait until at least ``n`` token requests (of ``client_id``, if given) are recorded;
        False on timeout."""
        with self._lock:
            return self._lock.wait_for(
                lambda: sum(1 for r in self._requests if _is_token_request(r, client_id)) >= n,
                timeout=timeout,
            )

    # -- request handling (called from handler threads) --------------------------------------

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _next_fault(self, client_id: str | None) -> Fault | None:
        with self._lock:
            own = self._client_faults.get(client_id) if client_id is not None else None
            if own:
                return own.pop(0)
            return self._faults.pop(0) if self._faults else None

    def _count(self, client_id: str | None) -> _Counts:
        """The mutable counts of ``client_id``; the caller holds the lock."""
        key = client_id if client_id is not None else ""
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = _Counts()
        return counts

    def _admit(self, client_id: str | None) -> int | None:
        """None if the rate limit admits a request of ``client_id`` now (it then fills the
        window), else the whole seconds until it would."""
        if client_id is None:
            return None
        with self._lock:
            limit = self._rate_limit
            if limit is None:
                return None
            now = time.monotonic()
            window = self._windows.setdefault(client_id, deque())
            while window and window[0] <= now - _RATE_WINDOW:
                window.popleft()
            if len(window) < limit:
                window.append(now)
                return None
            return max(1, math.ceil(window[0] + _RATE_WINDOW - now))

    def _counts_reply(self, method: str) -> _Reply:
        """The answer to a request to :data:`COUNTS_PATH`."""
        if method in ("GET", "HEAD"):
            counts = self.counts()
        elif method == "DELETE":
            counts = self.reset_counts()
        else:
            return _Reply(
                405,
                {"Content-Type": "text/plain", "Allow": "GET, HEAD, DELETE"},
                b"Method Not Allowed",
            )
        total = ClientCounts(
            *(sum(getattr(c, name) for c in counts.values()) for name in _COUNT_FIELDS)
        )
        return _json_reply(
            200,
            {
                "rate_limit": self.rate_limit,
                "clients": {client_id: c.as_dict() for client_id, c in sorted(counts.items())},
                "total": total.as_dict(),
            },
        )

    def _last_token(self, client_id: str | None) -> str | None:
        with self._lock:
            for token in reversed(self._issued.values()):
                if token.client_id == client_id:
                    return token.access_token
            return None

    def _bomb_state(self, decoded_bytes: int, encoding: str) -> tuple[bytes, zlib._Compress]:
        """The compressed padding of a bomb and a copy of the compressor's state after it."""
        key = (decoded_bytes, encoding)
        with self._bomb_lock:
            cached = self._bombs.get(key)
            if cached is None:
                cached = _compress_padding(max(0, decoded_bytes - _BOMB_TAIL), encoding)
                self._bombs[key] = cached
            return cached[0], cached[1].copy()

    def _echo_reply(
        self, fault: Fault, headers: Mapping[str, str], creds: tuple[str, str] | None
    ) -> _Reply:
        """An error answer that shows what it must never be shown (see :meth:`Fault.echo`)."""
        default = _default_reply(fault.status)
        secret = creds[1] if creds else ""
        authorization = headers.get("authorization", "")
        token = fault.echo_token
        if token is None:
            token = self._last_token(creds[0] if creds else None) or ""
        if fault.control_chars:
            text = (
                f"\x1b[2J\x1b[31mBad client credentials\x1b[0m\r\n"
                f"client_secret: {secret}\r\n"
                f"Authorization: {authorization}\r"
                f"token: {token}\n\x1b]0;owned\x07\x1b[1A\x1b[K"
            )
        else:
            text = (
                f"Bad client credentials: client_secret {secret}, "
                f"Authorization {authorization}, token {token}"
            )
        response_headers = dict(default.headers)
        if fault.content_type is not None and fault.content_type.startswith("text/html"):
            title = f"{fault.status} {_phrase(fault.status)}"
            body = (
                f"<html><head><title>{title}</title></head><body>"
                f"<h1>{title}</h1><pre>{text}</pre></body></html>"
            ).encode()
        else:
            error: Any = None
            with contextlib.suppress(ValueError):
                error = json.loads(default.body).get("error")
            if not isinstance(error, str):
                error = "invalid_client" if fault.status == 401 else "server_error"
            body = json.dumps({"error": error, "error_description": text}).encode()
            response_headers["Content-Type"] = _JSON_TYPE
        if fault.content_type is not None:
            response_headers["Content-Type"] = fault.content_type
        response_headers.update(fault.headers)
        return _Reply(
            fault.status,
            response_headers,
            body,
            event=f"fault: answered {fault.status} echoing the request's credentials",
        )

    def _record(self, request: RecordedRequest, replaces: RecordedRequest | None = None) -> None:
        """Append a record, or put it in the place of ``replaces`` (unless cleared meanwhile)."""
        with self._lock:
            if request.path == TOKEN_PATH:
                counts = self._count(request.client_id)
                if replaces is None:
                    counts.requests += 1  # else it was counted on arrival
                if request.status == 429:
                    counts.rate_limited += 1
                elif request.status == 401:
                    counts.unauthorized += 1
            if replaces is None:
                self._requests.append(request)
            else:
                for index, existing in enumerate(self._requests):
                    if existing is replaces:
                        self._requests[index] = request
                        break
            self._lock.notify_all()

    def _emit(self, line: str | None) -> None:
        hook = self.on_event
        if hook is None or line is None:
            return
        try:
            hook(line)
        except Exception:
            _log.exception("devserver on_event hook failed")

    def _credentials(self, headers: Mapping[str, str]) -> tuple[str, str] | None:
        """The Basic id and secret, form-url-decoded when the server takes body grants."""
        value = headers.get("authorization", "")
        scheme, _, encoded = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            return None
        if self.accept_body_grant:
            return unquote_plus(client_id), unquote_plus(secret)
        return client_id, secret

    def _grant_params(
        self, query: dict[str, list[str]], headers: Mapping[str, str], body: bytes
    ) -> dict[str, str]:
        params = {k: v[0] for k, v in query.items() if v}
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if self.accept_body_grant and content_type == _FORM_TYPE and body:
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            for key, values in form.items():
                if values:
                    params.setdefault(key, values[0])
        return params

    def _handle_token(
        self,
        method: str,
        query: dict[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
        creds: tuple[str, str] | None,
    ) -> _Reply:
        hook = self.before_request
        if hook is not None:
            hook()
        if method != "POST":
            return _default_reply(405, event=f"{method} {TOKEN_PATH}: 405 Method Not Allowed")
        who = repr(creds[0]) if creds else "?"
        with self._lock:
            if creds is None:
                reason = "unreadable Basic credentials"
                if "authorization" not in headers:
                    reason = "no Basic credentials"
                return _default_reply(401, event=f"rejected client {who}: {reason}")
            client_id, secret = creds
            client = self._clients.get(client_id)
            if client is None:
                return _default_reply(401, event=f"rejected client {who}: unknown client_id")
            if client.revoked:
                return _default_reply(401, event=f"rejected client {who}: revoked")
            if not hmac.compare_digest(secret.encode(), client.secret.encode()):
                return _default_reply(401, event=f"rejected client {who}: wrong client_secret")

            params = self._grant_params(query, headers, body)
            grant_type = params.get("grant_type")
            if not grant_type:
                return _oauth_error(400, "invalid_request", "Missing grant_type", who)
            if grant_type != GRANT_TYPE:
                return _oauth_error(
                    400, "unsupported_grant_type", f"Unsupported grant type: {grant_type}", who
                )
            allowed = self.scope.split()
            requested = params.get("scope", "").split()
            if any(s not in allowed for s in requested):
                return _oauth_error(
                    400, "invalid_scope", f"Invalid scope: {' '.join(requested)}", who
                )
            scope = " ".join(requested) if requested else self.scope

            now = time.time()
            key = (client_id, scope)
            current = self._current.get(key)
            if self.reuse_tokens and current is not None and now < current.expires_at:
                token, expires_in = current, math.floor(current.expires_at - now)
                self._count(client_id).tokens_reused += 1
                event = f"returned the existing token {token.access_token[:8]}… to {who}"
            else:
                expires_in = self.expires_in
                token = IssuedToken(
                    access_token=str(uuid.uuid4()),
                    client_id=client_id,
                    client_secret=secret,
                    issued_at=now,
                    expires_at=now + expires_in,
                )
                self._issued[token.access_token] = token
                self._current[key] = token
                self._count(client_id).tokens_issued += 1
                event = f"issued token {token.access_token[:8]}… to {who}"
            payload = {
                "access_token": token.access_token,
                "token_type": "bearer",
                "expires_in": expires_in,
                "scope": scope,
                "extensions": {"provider_slug": client.provider_slug},
            }
        return _Reply(
            status=200,
            headers={
                "Content-Type": _JSON_TYPE,
                "Cache-Control": "no-store",
                "Pragma": "no-cache",
            },
            body=json.dumps(payload).encode(),
            access_token=token.access_token,
            event=f"{event} ({client.provider_slug}, expires_in={expires_in})",
        )


_COUNT_FIELDS = tuple(ClientCounts().as_dict())


def _is_token_request(request: RecordedRequest, client_id: str | None = None) -> bool:
    if client_id is not None and request.client_id != client_id:
        return False
    return request.method == "POST" and request.path == TOKEN_PATH


def _html_page(status: int) -> bytes:
    title = f"{status} {_phrase(status)}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _json_reply(status: int, obj: Any, event: str | None = None) -> _Reply:
    return _Reply(status, {"Content-Type": _JSON_TYPE}, json.dumps(obj).encode(), event=event)


def _oauth_error(status: int, error: str, description: str, who: str) -> _Reply:
    return _json_reply(
        status,
        {"error": error, "error_description": description},
        event=f"bad request from client {who}: {description}",
    )


def _default_reply(status: int, event: str | None = None) -> _Reply:
    """The server's usual answer for ``status`` (also the default body of a :class:`Fault`)."""
    if status == 401:
        reply = _json_reply(
            401, {"error": "invalid_client", "error_description": "Bad client credentials"}
        )
        reply.headers["WWW-Authenticate"] = 'Basic realm="oauth"'
    elif status == 405:
        reply = _Reply(405, {"Content-Type": "text/plain", "Allow": "POST"}, b"Method Not Allowed")
    elif status == 400:
        reply = _json_reply(400, {"error": "invalid_request", "error_description": "Bad request"})
    elif status == 429:
        reply = _json_reply(429, {"error": "rate_limited", "error_description": "rate limited"})
    elif status >= 500:
        reply = _json_reply(status, {"error": "server_error", "error_description": _phrase(status)})
    elif status in (204, 304) or status < 200:
        reply = _Reply(status, {}, b"")
    elif status >= 400:
        error = _phrase(status).lower().replace(" ", "_").replace("-", "_")
        reply = _json_reply(status, {"error": error, "error_description": _phrase(status)})
    else:
        reply = _json_reply(status, {})
    return _Reply(reply.status, reply.headers, reply.body, event=event)


def _fault_reply(fault: Fault) -> _Reply:
    default = _default_reply(fault.status)
    headers = dict(default.headers)
    body = default.body
    if fault.body is not None:
        body = fault.body
        headers["Content-Type"] = _JSON_TYPE
    if fault.content_type is not None:
        headers["Content-Type"] = fault.content_type
    headers.update(fault.headers)
    token: str | None = None
    if fault.status == 200:
        with contextlib.suppress(ValueError):
            payload = json.loads(body)
            if isinstance(payload, dict) and isinstance(payload.get("access_token"), str):
                token = payload["access_token"]
    return _Reply(fault.status, headers, body, token, f"fault: answered {fault.status}")


def _shape_event(fault: Fault) -> str | None:
    """What :meth:`_Handler._send_shaped` does with the answer; None: it is sent as usual."""
    if fault.endless_body:
        shape = "an endless chunked body"
    elif fault.bomb_bytes:
        shape = f"a {fault.encoding} bomb of {fault.bomb_bytes} bytes decoded"
    elif fault.pad_to:
        shape = f"the body padded to {fault.pad_to} bytes"
    elif fault.trickle_interval <= 0:
        return None
    else:
        shape = "the answer"
    if fault.trickle_interval > 0:
        what = "with its headers" if fault.trickle_headers else "after its headers"
        shape += f", one byte per {fault.trickle_interval:g}s {what}"
    return f"fault: sending {shape}"


def _compress_padding(spaces: int, encoding: str) -> tuple[bytes, zlib._Compress]:
    """``spaces`` spaces compressed, fed in pieces (the input is never in memory whole)."""
    # Z_RLE finds the same ~1030:1 as level 9's default strategy, twice as fast
    compressor = zlib.compressobj(9, zlib.DEFLATED, _ENCODINGS[encoding], 9, zlib.Z_RLE)
    piece = b" " * (1 << 20)
    out: list[bytes] = []
    left = spaces
    while left > 0:
        take = min(left, len(piece))
        out.append(compressor.compress(piece if take == len(piece) else piece[:take]))
        left -= take
    return b"".join(out), compressor


def _filler(byte: bytes, count: int) -> Iterator[bytes]:
    """``count`` copies of ``byte`` in pieces of at most ``_PIECE``."""
    piece = byte * min(count, _PIECE)
    while count > 0:
        take = min(count, len(piece))
        yield piece if take == len(piece) else piece[:take]
        count -= take


def _pieces(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), _PIECE):
        yield bytes(view[start : start + _PIECE])


def _padded(body: bytes, total: int, in_field: bool) -> tuple[int, Iterator[bytes]]:
    """The body padded to ``total`` bytes (its length, its pieces), as :meth:`Fault.oversized`."""
    stripped = body.rstrip()
    if in_field and stripped.startswith(b"{") and stripped.endswith(b"}"):
        inner = stripped[:-1].rstrip()
        head = inner + (b'"padding": "' if inner == b"{" else b', "padding": "')
        tail = b'"}'
        count = max(0, total - len(head) - len(tail))
        return len(head) + count + len(tail), _chain([head], _filler(b"a", count), [tail])
    count = max(0, total - len(body))
    return len(body) + count, _chain([body], _filler(b" ", count))


def _chain(*parts: Iterable[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield from part


def _endless(chunk_size: int) -> Iterator[bytes]:
    """The chunks of an endless chunked body (chunk framing included)."""
    start = b'{"access_token": "'
    yield b"%x\r\n%s\r\n" % (len(start), start)
    chunk = b"%x\r\n%s\r\n" % (chunk_size, b"a" * chunk_size)
    while True:
        yield chunk


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's backlog of 5 drops the SYNs of a fleet starting at once, and the kernel
    # retries them a second later: a mass start would look spread over seconds
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], owner: TokenServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away (a timeout on its side, a dropped connection)
        _log.exception("devserver: error while handling a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "osigu-devserver"
    sys_version = ""
    timeout = _IDLE_KEEPALIVE_SECONDS

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.owner._track(self.connection, add=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # silent: the dev command reports through on_event

    def do_POST(self) -> None:
        self._dispatch()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_POST

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        return self.rfile.read(min(max(length, 0), _MAX_BODY)) if length > 0 else b""

    def _dispatch(self) -> None:
        owner = self.server.owner
        received_at = time.time()
        stopping = owner._stopping
        body = self._read_body()
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if split.path == COUNTS_PATH:
            self._send(owner._counts_reply(self.command))  # neither recorded nor counted
            return
        creds = owner._credentials(headers)

        placeholder: RecordedRequest | None = None

        def record(status: int, token: str | None) -> RecordedRequest:
            request = RecordedRequest(
                method=self.command,
                path=split.path,
                query=query,
                headers=headers,
                body=body,
                client_id=creds[0] if creds else None,
                client_secret=creds[1] if creds else None,
                status=status,
                received_at=received_at,
                access_token=token,
            )
            owner._record(request, replaces=placeholder)
            return request

        if split.path != TOKEN_PATH:
            reply = _json_reply(
                404,
                {
                    "timestamp": int(received_at * 1000),
                    "status": 404,
                    "error": "Not Found",
                    "path": split.path,
                },
            )
            record(404, None)
            self._send(reply)
            return

        retry_after = owner._admit(creds[0] if creds else None)
        if retry_after is not None:
            reply = _default_reply(
                429,
                event=f"rate limited client {creds[0] if creds else '?'!r}: over "
                f"{owner.rate_limit} requests/s (Retry-After: {retry_after})",
            )
            reply.headers["Retry-After"] = str(retry_after)
            record(429, None)
            owner._emit(reply.event)
            self._send(reply)
            return

        fault = owner._next_fault(creds[0] if creds else None)
        if fault is not None and (fault.delay > 0 or fault.never_answer):
            # recorded (status 0) on arrival, so that a client timing out still sees it counted
            placeholder = record(0, None)
            if fault.delay > 0:
                owner._emit(f"fault: delaying the answer by {fault.delay:g}s")
                if stopping.wait(fault.delay):
                    self.close_connection = True
                    return
            if fault.never_answer:
                owner._emit("fault: holding the request without an answer")
                self._hang(stopping)
                self.close_connection = True
                return
        if fault is not None and not fault.passthrough:
            if fault.drop_connection:
                record(0, None)
                owner._emit("fault: dropped the connection without an answer")
                self.close_connection = True
                return
            echo = fault.echo_request
            reply = owner._echo_reply(fault, headers, creds) if echo else _fault_reply(fault)
        else:
            reply = owner._handle_token(self.command, query, headers, body, creds)
        record(reply.status, reply.access_token)
        owner._emit(reply.event)
        shaped = _shape_event(fault) if fault is not None else None
        if fault is None or shaped is None:
            self._send(reply)
        else:
            owner._emit(shaped)
            self._send_shaped(reply, fault, stopping)

    def _hang(self, stopping: threading.Event) -> None:
        """Wait for the server's stop, or the client's close (not seen through TLS)."""
        conn = self.connection
        watch = not isinstance(conn, ssl.SSLSocket)
        while not stopping.is_set():
            if not watch:
                stopping.wait(_POLL_SECONDS)
                continue
            try:
                readable, _, _ = select.select([conn], [], [], _POLL_SECONDS)
                if readable and not conn.recv(1, socket.MSG_PEEK):
                    return  # the client closed its side (or stop shut the socket down)
            except (OSError, ValueError):
                return
            if readable:
                watch = False  # it sent more (pipelining): from now on only wait for the stop

    def _shape(self, reply: _Reply, fault: Fault) -> tuple[dict[str, str], Iterator[bytes]]:
        """The headers (with the framing) and body pieces of ``reply`` as ``fault`` shapes it."""
        headers = dict(reply.headers)
        if fault.endless_body:
            headers.setdefault("Content-Type", _JSON_TYPE)
            headers.setdefault("Cache-Control", "no-store")
            headers["Transfer-Encoding"] = "chunked"
            return headers, _endless(fault.chunk_size)
        if fault.bomb_bytes:
            prefix, compressor = self.server.owner._bomb_state(fault.bomb_bytes, fault.encoding)
            tail = compressor.compress(reply.body.ljust(_BOMB_TAIL)) + compressor.flush()
            headers["Content-Encoding"] = fault.encoding
            headers["Content-Length"] = str(len(prefix) + len(tail))
            return headers, _chain(_pieces(prefix), [tail])
        if fault.pad_to:
            length, pieces = _padded(reply.body, fault.pad_to, fault.pad_in_field)
            headers["Content-Length"] = str(length)
            return headers, pieces
        headers["Content-Length"] = str(len(reply.body))
        return headers, iter([reply.body])

    def _head(self, status: int, headers: Mapping[str, str]) -> bytes:
        lines = [
            f"{self.protocol_version} {status} {_phrase(status)}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_shaped(self, reply: _Reply, fault: Fault, stopping: threading.Event) -> None:
        """Send a fault's answer in pieces, trickled if asked; stop or a closed client ends it."""
        headers, pieces = self._shape(reply, fault)
        if fault.trickle_interval > 0:
            with contextlib.suppress(OSError):  # one byte per segment, not held back by Nagle
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = self._head(reply.status, headers)
        interval = fault.trickle_interval
        done = False
        with contextlib.suppress(OSError):  # the client went away (or made no progress for 30 s)
            done = self._write(head, interval if fault.trickle_headers else 0.0, stopping) and (
                self.command == "HEAD" or all(self._write(p, interval, stopping) for p in pieces)
            )
        if not done or fault.endless_body:
            self.close_connection = True

    def _write(self, data: bytes, interval: float, stopping: threading.Event) -> bool:
        """Write ``data`` (one byte per ``interval`` s if > 0); False once the server stops."""
        if stopping.is_set():
            return False
        if interval <= 0:
            self.wfile.write(data)
            return True
        for index in range(len(data)):
            if stopping.wait(interval):
                return False
            self.wfile.write(data[index : index + 1])
        return True

    def _send(self, reply: _Reply) -> None:
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
