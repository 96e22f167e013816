"""A "DVS API" on a local port: the upstream behind the local bearer proxy (DESIGN §14), in tests.

It checks the bearer of every request against the tokens a :class:`agent.devserver.TokenServer`
minted (known, unexpired, not revoked here), records what it received, and serves a few
endpoints that exercise a forwarding proxy (any method unless said):

- ``/echo``: 200 JSON ``{method, path, query, headers: [[name, value], ...], body_len,
  body_sha256}``: what arrived, headers in order and as spelled;
- ``/stream?bytes=N&chunk=65536[&length=1]``: 200 with N bytes of :func:`pattern` (chunked, or
  with a Content-Length with ``length=1`` or for an HTTP/1.0 client), never held in memory;
- ``/upload``: 200 JSON ``{body_len, body_sha256}`` (every body is read incrementally, hashed,
  never buffered whole, Content-Length or chunked);
- ``/redirect?to=URL[&status=302]``: a redirect to URL;
- ``/status/NNN``: that status (200..599) with a small JSON body (none for 204 and 304);
- ``/slow?seconds=S``: 200 after S seconds (:meth:`ApiServer.stop` cuts the wait short);
- ``/headers-big?bytes=N``: 200 with one ``X-Big`` header whose value is N bytes;
- ``/response-headers?Name=Value&...``: 200 with each query pair as a response header, in order
  and repeatable (``Set-Cookie`` twice, hop-by-hop names to see a proxy strip them);
- ``/hello``: 200 ``hello\\n`` as text/plain, the benchmark's path, kept cheap.

A request without a usable bearer is answered 401 (``WWW-Authenticate: Bearer
error="invalid_token"``, or ``Bearer realm="dvs-api"`` when there is no Authorization at all, as
RFC 6750 §3.1 says) with a small JSON body; more than one Authorization header is a 400
``invalid_request``. :meth:`ApiServer.fail_next_with_401` rejects the next otherwise-valid
requests, to make a proxy refresh and replay with a token that is still good.

Standard library only; every public method is thread-safe. HTTP/1.1 with keep-alive, one daemon
thread per connection; :meth:`ApiServer.stop` shuts every open connection down.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from agent.devserver import TokenServer

__all__ = ["ApiRequest", "ApiServer", "pattern", "pattern_sha256"]

_JSON = "application/json"
_IDLE_KEEPALIVE_SECONDS = 30.0
#: bytes read from a request body at a time
_READ_PIECE = 64 * 1024
#: the largest ``chunk`` of ``/stream``
_MAX_CHUNK = 1 << 20
#: the longest chunk-size line of a chunked request body
_MAX_CHUNK_LINE = 1024
#: the repeating pattern of ``/stream``: byte i of the body is ``i % 256``
_CYCLE = bytes(range(256))
_HELLO = b"hello\n"
_REALM = 'Bearer realm="dvs-api"'
_INVALID = 'Bearer error="invalid_token"'


def tls_context(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A test CA's certificate file (in ``directory``) and a server context whose certificate
    it signs, for ``ApiServer(tls=...)``."""
    from tests.vault_logins import make_ca, make_server_cert

    ca = make_ca("upstream test CA")
    ca_cert = directory / "ca.pem"
    ca_cert.write_text(ca.cert_pem)
    files = make_server_cert(ca, directory / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    return ca_cert, context


def pattern(size: int, offset: int = 0) -> bytes:
    """Bytes ``offset`` to ``offset + size`` of the ``/stream`` body."""
    start = offset % 256
    return (_CYCLE * ((start + size) // 256 + 1))[start : start + size]


def pattern_sha256(size: int) -> str:
    """The SHA-256 (hex) of a ``/stream?bytes=size`` body, computed in pieces."""
    digest = hashlib.sha256()
    block = pattern(_READ_PIECE)  # a multiple of 256: every block starts the cycle again
    left = size
    while left > 0:
        take = min(left, len(block))
        digest.update(block if take == len(block) else block[:take])
        left -= take
    return digest.hexdigest()


@dataclass(frozen=True)
class ApiRequest:
    """One request the server received, with what it answered."""

    method: str
    #: the path as sent (not percent-decoded)
    path: str
    #: the raw query string, without ``?`` (``""`` when none)
    query: str
    #: every header in order, as the client spelled its name
    headers: list[tuple[str, str]]
    #: the token of the one ``Authorization: Bearer`` header; None when absent or unreadable
    bearer: str | None
    body_len: int
    body_sha256: str
    #: the status answered; 0 when the connection ended without an answer
    status: int
    #: why a 401/400 was answered for the bearer (``missing``, ``malformed``, ``unknown``,
    #: ``expired``, ``revoked``, ``forced``, ``several``); None when it was accepted
    rejected: str | None = None
    received_at: float = 0.0

    def header(self, name: str) -> list[str]:
        """The values of every header called ``name`` (case-insensitive), in order."""
        key = name.lower()
        return [value for n, value in self.headers if n.lower() == key]


class _BadRequest(Exception):
    """A request body that cannot be read (bad framing): answered 400, connection closed."""


class ApiServer:
    """The upstream API on a local port, served from a daemon thread (see the module docs).

    Bearers are checked against ``token_server.issued()`` (and those given to :meth:`accept`);
    with no token server, only :meth:`accept`'s; with ``check_tokens=False`` any non-empty
    bearer passes (the benchmark). ``record=False`` keeps no records (long load runs)."""

    def __init__(
        self,
        token_server: TokenServer | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        check_tokens: bool = True,
        record: bool = True,
    ) -> None:
        self.token_server = token_server
        self.host = host
        self.tls = tls
        self.check_tokens = check_tokens
        self.record = record
        self._lock = threading.Condition(threading.Lock())
        self._accepted: dict[str, float | None] = {}
        self._revoked: set[str] = set()
        self._requests: list[ApiRequest] = []
        self._fail_next = 0
        self._count_401 = 0
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = self._bind(port)
        self._port: int = self._httpd.server_address[1]

    # -- lifecycle ---------------------------------------------------------------------------

    def _bind(self, port: int) -> _HTTPServer:
        httpd = _HTTPServer((self.host, port), self)
        if self.tls is not None:
            httpd.socket = self.tls.wrap_socket(httpd.socket, server_side=True)
        return httpd

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:PORT`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self._port}"

    def start(self) -> ApiServer:
        """Serve from a daemon thread. After :meth:`stop` it may start again on the same port."""
        with self._lock:
            if self._thread is not None:
                return self
            if self._httpd is None:
                self._httpd = self._bind(self._port)
            self._stopping = threading.Event()
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"dvs-api:{self._port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and shut down every open connection (slow answers end at once)."""
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

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- tokens and knobs --------------------------------------------------------------------

    def accept(self, token: str, expires_at: float | None = None) -> None:
        """Accept ``token`` (until ``expires_at``, epoch seconds, if given), un-revoking it."""
        with self._lock:
            self._accepted[token] = expires_at
            self._revoked.discard(token)

    def revoke(self, token: str) -> None:
        """Reject ``token`` from now on, wherever it came from."""
        with self._lock:
            self._revoked.add(token)

    def fail_next_with_401(self, n: int = 1) -> None:
        """Answer the next ``n`` requests that would be accepted with a 401 instead (added to
        any still pending)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._fail_next += n

    @property
    def pending_401s(self) -> int:
        """How many forced 401s are still to come."""
        with self._lock:
            return self._fail_next

    @property
    def count_401(self) -> int:
        """Every 401 answered so far (bearer rejections, forced ones, ``/status/401``)."""
        with self._lock:
            return self._count_401

    # -- records -----------------------------------------------------------------------------

    def requests(self) -> list[ApiRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the records, the 401 count and pending forced 401s (tokens stay)."""
        with self._lock:
            self._requests.clear()
            self._count_401 = 0
            self._fail_next = 0

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``n`` requests are recorded (answered); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._requests) >= n, timeout=timeout)

    # -- called from handler threads ---------------------------------------------------------

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _judge(self, authorizations: list[str]) -> tuple[str | None, str | None]:
        """``(bearer, reason)``: the token sent and why it is rejected (None: accepted)."""
        if not authorizations:
            return None, "missing"
        if len(authorizations) > 1:
            return None, "several"
        scheme, _, token = authorizations[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            return None, "malformed"
        if not self.check_tokens:
            return token, self._forced()
        now = time.time()
        with self._lock:
            if token in self._revoked:
                return token, "revoked"
            expires_at: float | None
            if token in self._accepted:
                expires_at = self._accepted[token]
            elif self.token_server is not None and token in (issued := self.token_server.issued()):
                expires_at = issued[token].expires_at
            else:
                return token, "unknown"
        if expires_at is not None and now >= expires_at:
            return token, "expired"
        return token, self._forced()

    def _forced(self) -> str | None:
        with self._lock:
            if self._fail_next > 0:
                self._fail_next -= 1
                return "forced"
        return None

    def _record(self, request: ApiRequest) -> None:
        with self._lock:
            if request.status == 401:
                self._count_401 += 1
            if self.record:
                self._requests.append(request)
            self._lock.notify_all()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], owner: ApiServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away, or stop() shut the connection down
        super().handle_error(request, client_address)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _int_arg(params: dict[str, str], name: str, default: int | None = None) -> int:
    text = params.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"missing {name}")
        return default
    value = int(text)
    if value < 0:
        raise ValueError(f"{name} must be >= 0")
    return value


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "dvs-api"
    sys_version = ""
    timeout = _IDLE_KEEPALIVE_SECONDS
    disable_nagle_algorithm = True
    #: records the request being handled (see _dispatch)
    _record_once: Callable[[int], None] | None = None

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.owner._track(self.connection, add=False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    # -- the request body --------------------------------------------------------------------

    def _body(self) -> Iterator[bytes]:
        """The request body in pieces (Content-Length or chunked; raises _BadRequest)."""
        encodings = self.headers.get_all("Transfer-Encoding") or []
        if encodings:
            codings = [c.strip().lower() for v in encodings for c in v.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise _BadRequest(f"unsupported Transfer-Encoding {codings}")
            yield from self._chunked()
            return
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return
        if len({v.strip() for v in lengths}) != 1 or not lengths[0].strip().isdigit():
            raise _BadRequest("bad Content-Length")
        left = int(lengths[0])
        while left > 0:
            data = self.rfile.read(min(left, _READ_PIECE))
            if not data:
                raise _BadRequest("body shorter than its Content-Length")
            left -= len(data)
            yield data

    def _chunked(self) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(_MAX_CHUNK_LINE + 1)
            if len(line) > _MAX_CHUNK_LINE or not line.endswith(b"\n"):
                raise _BadRequest("bad chunk size line")
            text = line.split(b";", 1)[0].strip()
            try:
                size = int(text, 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size < 0:
                raise _BadRequest("bad chunk size")
            if size == 0:
                while True:  # trailers, up to the empty line
                    trailer = self.rfile.readline(65537)
                    if not trailer.endswith(b"\n") and trailer:
                        raise _BadRequest("bad trailer")
                    if not trailer:
                        raise _BadRequest("body ended in its trailers")
                    if not trailer.strip():
                        return
            while size > 0:
                data = self.rfile.read(min(size, _READ_PIECE))
                if not data:
                    raise _BadRequest("body ended inside a chunk")
                size -= len(data)
                yield data
            if self.rfile.readline(3).strip():
                raise _BadRequest("no CRLF after a chunk")

    # -- answers -----------------------------------------------------------------------------

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {_phrase(status)}",
            f"Server: {self.server_version}",
            f"Date: {formatdate(usegmt=True)}",
            *(f"{name}: {value}" for name, value in headers),
        ]
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = _JSON,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """One answer with a Content-Length, written at once (one segment when small)."""
        extra = list(headers or [])
        if status in (204, 304):
            body = b""  # no body, no Content-Length, no Content-Type (RFC 9110 §8.6, §15.4.5)
        else:
            if content_type is not None and body:
                extra.append(("Content-Type", content_type))
            extra.append(("Content-Length", str(len(body))))
        data = self._head(status, extra)
        if self.command != "HEAD":
            data += body
        self._recorded(status)
        self.wfile.write(data)

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        owner = self.server.owner
        received_at = time.time()
        path, _, query = self.path.partition("?")
        pairs = [(str(n), str(v)) for n, v in self.headers.items()]
        digest = hashlib.sha256()
        body_len = 0
        bearer: str | None = None
        reason: str | None = None

        def record(status: int) -> None:
            owner._record(
                ApiRequest(
                    self.command,
                    path,
                    query,
                    pairs,
                    bearer,
                    body_len,
                    digest.hexdigest(),
                    status,
                    rejected=reason,
                    received_at=received_at,
                )
            )

        # recorded just before the answer is written (a client that has its answer finds the
        # record), or with status 0 when none was
        self._record_once = record
        try:
            try:
                for piece in self._body():
                    digest.update(piece)
                    body_len += len(piece)
            except _BadRequest as exc:
                self.close_connection = True
                self._send(400, _json({"error": "bad_request", "error_description": str(exc)}))
                return
            bearer, reason = owner._judge(self.headers.get_all("Authorization") or [])
            if reason is not None:
                status = 400 if reason == "several" else 401
                error = "invalid_request" if reason == "several" else "invalid_token"
                challenge = _REALM if reason == "missing" else f'Bearer error="{error}"'
                body = _json({"error": error, "error_description": f"bearer token {reason}"})
                self._send(status, body, headers=[("WWW-Authenticate", challenge)])
            elif path == "/hello":  # the benchmark's path: nothing more to decide
                self._send(200, _HELLO, "text/plain")
            else:
                self._route(path, query, pairs, body_len, digest.hexdigest())
        finally:
            self._recorded(0)

    def _recorded(self, status: int) -> None:
        """Record the request with ``status``, the first time only."""
        record, self._record_once = self._record_once, None
        if record is not None:
            record(status)

    def _route(
        self, path: str, query: str, pairs: list[tuple[str, str]], body_len: int, sha: str
    ) -> int:
        """Answer an accepted request; returns the status sent (0: none)."""
        query_pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(query_pairs)
        try:
            if path == "/echo":
                echo = {
                    "method": self.command,
                    "path": path,
                    "query": query,
                    "headers": [[n, v] for n, v in pairs],
                    "body_len": body_len,
                    "body_sha256": sha,
                }
                self._send(200, _json(echo))
                return 200
            if path == "/upload":
                self._send(200, _json({"body_len": body_len, "body_sha256": sha}))
                return 200
            if path == "/stream":
                size = _int_arg(params, "bytes")
                chunk = min(max(_int_arg(params, "chunk", 65536), 1), _MAX_CHUNK)
                return self._stream(size, chunk, params.get("length") == "1")
            if path == "/redirect":
                to = params.get("to")
                status = _int_arg(params, "status", 302)
                if not to or status not in (301, 302, 303, 307, 308):
                    raise ValueError("to= is required, status= a redirect")
                self._send(status, _json({"location": to}), headers=[("Location", to)])
                return status
            if path.startswith("/status/"):
                status = int(path.removeprefix("/status/"))
                if not 200 <= status <= 599:
                    raise ValueError("status must be 200..599")
                body = _json({"status": status, "phrase": _phrase(status)})
                self._send(status, body)
                return status
            if path == "/slow":
                seconds = float(params.get("seconds", "1"))
                if not 0 <= seconds <= 3600:
                    raise ValueError("seconds must be 0..3600")
                if self.server.owner._stopping.wait(seconds):
                    self.close_connection = True
                    return 0
                self._send(200, _json({"slept": seconds}))
                return 200
            if path == "/headers-big":
                size = _int_arg(params, "bytes")
                self._send(200, _json({"bytes": size}), headers=[("X-Big", "a" * size)])
                return 200
            if path == "/response-headers":
                self._send(200, _json(query_pairs), headers=query_pairs)
                return 200
        except ValueError as exc:
            self._send(400, _json({"error": "bad_request", "error_description": str(exc)}))
            return 400
        self._send(404, _json({"error": "not_found", "path": path}))
        return 404

    def _stream(self, size: int, chunk: int, with_length: bool) -> int:
        """Send ``size`` bytes of :func:`pattern` in pieces of ``chunk`` bytes."""
        stopping = self.server.owner._stopping
        chunked = not with_length and self.request_version != "HTTP/1.0"
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size))
        headers = [("Content-Type", "application/octet-stream"), framing]
        self._recorded(200)
        self.wfile.write(self._head(200, headers))
        if self.command == "HEAD":
            return 200
        block = pattern(chunk + 256)
        sent = 0
        while sent < size:
            if stopping.is_set():
                self.close_connection = True
                return 200
            take = min(chunk, size - sent)
            start = sent % 256
            piece = block[start : start + take]
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (take, piece))
            else:
                self.wfile.write(piece)
            sent += take
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        return 200
