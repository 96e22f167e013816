"""A local OSIGU token endpoint, faithful to the seed, for the test suite and ``dvs-agent dev``.

It speaks the seed's shape (``POST /v1/oauth/token?grant_type=client_credentials`` with HTTP
Basic client authentication, an empty body, a Spring Security OAuth style JSON answer) and,
when asked, the RFC 6749 §4.4 form body. Tests steer it with :class:`Fault` objects queued
with :meth:`TokenServer.enqueue`, and inspect what it saw with :meth:`TokenServer.requests`
and :meth:`TokenServer.issued`. Standard library only; every public method is thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import math
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

__all__ = ["TOKEN_PATH", "Fault", "IssuedToken", "RecordedRequest", "TokenServer"]

TOKEN_PATH = "/v1/oauth/token"  # noqa: S105 (a URL path, not a password)
GRANT_TYPE = "client_credentials"
_FORM_TYPE = "application/x-www-form-urlencoded"
_JSON_TYPE = "application/json"
_MAX_BODY = 1 << 20
_IDLE_KEEPALIVE_SECONDS = 30.0

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    """What the server does for ONE request to the token path instead of handling it normally.

    Faults are consumed in queue order, one per request (any method) to the token path.
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
    #: only apply ``delay``, then handle the request normally
    passthrough: bool = False

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

    ``expires_in`` and ``reuse_tokens`` may be changed while it runs; each request reads them.
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
        self._requests: list[RecordedRequest] = []
        self._issued: dict[str, IssuedToken] = {}
        self._current: dict[tuple[str, str], IssuedToken] = {}
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
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
        """Stop listening, close open keep-alive connections, abandon delayed answers."""
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

    def enqueue(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def token_requests(self) -> list[RecordedRequest]:
        """Only the POSTs to the token path."""
        with self._lock:
            return [r for r in self._requests if _is_token_request(r)]

    def clear(self) -> None:
        """Forget recorded requests and queued faults (issued tokens and clients stay)."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()

    def issued(self) -> dict[str, IssuedToken]:
        """Every token minted, by access_token."""
        with self._lock:
            return dict(self._issued)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``n`` token requests are recorded; False on timeout."""
        with self._lock:
            return self._lock.wait_for(
                lambda: sum(1 for r in self._requests if _is_token_request(r)) >= n,
                timeout=timeout,
            )

    # -- request handling (called from handler threads) --------------------------------------

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def _record(self, request: RecordedRequest, replaces: RecordedRequest | None = None) -> None:
        """Append a record, or put it in the place of ``replaces`` (unless cleared meanwhile)."""
        with self._lock:
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


def _is_token_request(request: RecordedRequest) -> bool:
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


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

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

        fault = owner._next_fault()
        if fault is not None and fault.delay > 0:
            # recorded (status 0) on arrival, so that a client timing out still sees it counted
            placeholder = record(0, None)
            owner._emit(f"fault: delaying the answer by {fault.delay:g}s")
            if stopping.wait(fault.delay):
                self.close_connection = True
                return
        if fault is not None and not fault.passthrough:
            if fault.drop_connection:
                record(0, None)
                owner._emit("fault: dropped the connection without an answer")
                self.close_connection = True
                return
            reply = _fault_reply(fault)
        else:
            reply = owner._handle_token(self.command, query, headers, body, creds)
        record(reply.status, reply.access_token)
        owner._emit(reply.event)
        self._send(reply)

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
