"""The proxy's connections to its upstream: HTTP/1.1 answers parsed with httptools (llhttp).

:class:`UpstreamPool` keeps idle kept-alive connections (most recent first) and opens new ones:
plain TCP (loopback upstreams), TLS with the profile's CA, or through the forward proxy of the
agent's environment (absolute-form for http, a CONNECT tunnel then TLS for https).

:class:`Upstream` is one connection. The proxy's exchange sends a request on it with
:meth:`Upstream.begin`, awaits :attr:`Upstream.head` (the answer's status and headers), then
either holds the body (a 401 that may be replayed) or relays it: each chunk goes straight to
the client's transport, and when the client reads slower than the upstream sends, this
connection stops reading (memory stays flat). Answers whose head is over
:data:`HEAD_LIMIT`, or that are not HTTP, fail with :class:`BadAnswer`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from urllib.parse import unquote, urlsplit

import httptools

#: the largest head (status line and headers) taken from an upstream
HEAD_LIMIT = 64 * 1024
#: an answer's body held (not yet relayed) beyond this: the upstream is not read further
HOLD_LIMIT = 64 * 1024
#: the longest connect to the upstream (within request_timeout)
CONNECT_SECONDS = 10.0


class BadAnswer(Exception):
    """The upstream's answer is not valid HTTP/1.1, or its head is over HEAD_LIMIT."""


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection before its answer ended (or began)."""

    def __init__(self, began: bool) -> None:
        super().__init__("the upstream closed the connection")
        self.began = began


class ForwardProxyError(OSError):
    """The forward proxy could not be reached, or refused the CONNECT."""

    def __init__(self, host: str, port: int, cause: str) -> None:
        super().__init__(cause)
        self.host, self.port, self.cause = host, port, cause


class Head(NamedTuple):
    """An upstream answer's status line and headers (raw bytes, as sent), and its framing as
    noted while they were parsed."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    #: the Content-Length value (the last one), None without one
    length: bytes | None
    #: a Transfer-Encoding header came (the body is framed by it, not by a length)
    encoded: bool
    #: a Connection header came (it may name more headers to drop)
    connection: bool
    #: the answer's body is delimited by the connection's close (no length, not chunked)
    until_close: bool


def succeeded(future: asyncio.Future[Any]) -> bool:
    """``future`` is done with a result (neither cancelled nor failed)."""
    return future.done() and not future.cancelled() and future.exception() is None


class Sink(Protocol):
    """Where a relayed body goes: the client connection (see :mod:`agent.proxy.edge`)."""

    def body(self, chunk: bytes) -> None: ...

    def writable(self) -> bool: ...


class Upstream(asyncio.Protocol):
    """One connection to the upstream (see the module's doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: the current request's answer head, and its end (pending until :meth:`begin`)
        self.head: asyncio.Future[Head] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._length: bytes | None = None
        self._encoded = self._chunked = self._connection = False
        self._head_bytes = self._head_size = 0
        self._in_head = False
        self._head_only = False
        self._sink: Sink | None = None
        self._held: list[bytes] = []
        self._held_size = 0
        self._reusable = False
        self._can_write: asyncio.Future[None] | None = None
        #: monotonic time of the last bytes received (the relay's stall timer)
        self.last_read = 0.0
        #: seconds from the request sent to its answer's head (the upstream's share)
        self.waited = 0.0
        self._sent = 0.0

    # --------------------------------------------------------------- the exchange's side
    def begin(self, data: bytes, *, head_only: bool) -> None:
        """Send a request head (and a held body); a new :attr:`head` and :attr:`done`."""
        assert self.transport is not None
        self.head = self._loop.create_future()
        self.done = self._loop.create_future()
        self._headers, self._reason, self._head_bytes, self._head_size = [], b"", 0, 0
        self._length, self._encoded, self._chunked, self._connection = None, False, False, False
        self._in_head, self._head_only, self._reusable = True, head_only, False
        self._sink, self._held, self._held_size = None, [], 0
        self.last_read = self._sent = time.monotonic()
        self.resume()  # a relay may have paused it as its answer ended
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the upstream reads slower than the request body comes."""
        if self._can_write is not None:
            await self._can_write
        if self.closed:
            raise UpstreamClosed(began=self.head.done())

    def relay(self, sink: Sink) -> bytes:
        """From now on, chunks go to ``sink``; returns the body held so far (received while
        not relaying: up to HOLD_LIMIT, then reading paused)."""
        held = b"".join(self._held)
        self._held, self._held_size = [], 0
        self._sink = sink
        self.resume()
        return held

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed and self.transport.is_reading() is False:
            self.transport.resume_reading()

    def restart(self) -> None:
        """A new parser: the CONNECT tunnel's answer ended, TLS and HTTP begin afresh."""
        self._parser = httptools.HttpResponseParser(self)

    def reusable(self) -> bool:
        return self._reusable and not self.closed

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -------------------------------------------------------------------- the protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            self.abort()  # bytes on an idle connection: no request asked for them
            return
        self.last_read = time.monotonic()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(BadAnswer())
            return
        if self._in_head and self._head_bytes > HEAD_LIMIT:
            self._fail(BadAnswer())

    def eof_received(self) -> bool | None:
        return None  # close the transport (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        began = self.head.done()
        if not self.done.done():
            if self._until_close() and began:
                self._reusable = False
                self.done.set_result(None)  # a close-delimited body ended
            else:
                self._fail(UpstreamClosed(began=began))
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._can_write = None

    # ------------------------------------------------------------------- the parser's
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))
            self._head_size += len(name) + len(value) + 4
            if self._head_size > HEAD_LIMIT:
                self._fail(BadAnswer())
                raise BadAnswer  # stops the parser
            lower = name.lower()
            if lower == b"content-length":
                self._length = value
            elif lower == b"transfer-encoding":
                self._encoded = True
                self._chunked = self._chunked or b"chunked" in value.lower()
            elif lower == b"connection":
                self._connection = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                self._fail(BadAnswer())  # no upgrade was asked for
                return
            # 103 Early Hints and the like: skipped
            self._headers, self._reason = [], b""
            self._length, self._encoded, self._chunked, self._connection = None, False, False, False
            return
        self._in_head = False
        self.waited = time.monotonic() - self._sent
        until_close = (
            status not in (204, 304)
            and self._length is None
            and not self._chunked
            and not self._head_only
        )
        if not self.head.done():
            self.head.set_result(
                Head(
                    status,
                    self._reason,
                    self._headers,
                    self._length,
                    self._encoded,
                    self._connection,
                    until_close,
                )
            )
        if self._head_only:  # HEAD: llhttp would wait for the body that Content-Length names
            self._reusable = False
            if not self.done.done():
                self.done.set_result(None)

    def on_body(self, chunk: bytes) -> None:
        if self._head_only or self.done.done():
            return
        sink = self._sink
        if sink is not None:
            sink.body(chunk)
            if not sink.writable():
                self.pause()
            return
        self._held.append(chunk)
        self._held_size += len(chunk)
        if self._held_size >= HOLD_LIMIT:
            self.pause()

    def on_message_complete(self) -> None:
        if self._in_head:
            return  # a 1xx answer ended
        if self.done.done():
            return
        self._reusable = self._parser.should_keep_alive() and not self._head_only
        self.done.set_result(None)

    # ------------------------------------------------------------------------- helpers
    def _until_close(self) -> bool:
        return succeeded(self.head) and self.head.result().until_close

    def _fail(self, exc: BaseException) -> None:
        self._reusable = False
        for future in (self.head, self.done):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: not every failure is awaited
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()


@dataclass(frozen=True, slots=True)
class Route:
    """How requests reach the upstream: its address, TLS, and the forward proxy."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    #: the value of Host (the upstream's authority)
    authority: bytes
    #: the forward proxy's (host, port), its Proxy-Authorization, or None
    via: tuple[str, int] | None = None
    via_auth: bytes | None = None
    #: prefix to the origin-form target: the upstream's path, or its absolute URL (via an
    #: http forward proxy)
    prefix: bytes = b""


def route_of(upstream: str, tls: ssl.SSLContext | None, forward: str | None) -> Route:
    """The route to ``upstream`` (a base URL), through ``forward`` (a proxy URL) if given."""
    parts = urlsplit(upstream)
    https = parts.scheme.lower() == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    shown = f"[{host}]" if ":" in host else host
    default = (https and port == 443) or (not https and port == 80)
    authority = (shown if default else f"{shown}:{port}").encode("idna")
    path = parts.path.rstrip("/").encode()
    via = via_auth = None
    prefix = path
    if forward is not None:
        proxy = urlsplit(forward)
        via = (proxy.hostname or "", proxy.port or (443 if proxy.scheme == "https" else 80))
        if proxy.username is not None:
            pair = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()
            via_auth = b"Basic " + base64.b64encode(pair)
        if not https:
            prefix = b"http://" + authority + path
    return Route(host, port, tls if https else None, authority, via, via_auth, prefix)


class UpstreamPool:
    """Idle kept-alive connections to one upstream, and new ones (see the module's doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, route: Route, *, idle_max: int) -> None:
        self._loop = loop
        self.route = route
        #: idle connections kept at most (the listener's max_connections: as many as can be
        #: busy at once, so that a steady load opens none)
        self._idle_max = idle_max
        self._idle: list[Upstream] = []

    def take(self) -> Upstream | None:
        """An idle connection still open, or None."""
        while self._idle:
            up = self._idle.pop()
            if not up.closed:
                return up
        return None

    def give_back(self, up: Upstream) -> None:
        if up.reusable() and len(self._idle) < self._idle_max:
            self._idle.append(up)
        else:
            up.abort()

    async def connect(self) -> Upstream:
        """A new connection; raises OSError, ssl.SSLError, ForwardProxyError, TimeoutError."""
        route = self.route
        factory: Callable[[], Upstream] = lambda: Upstream(self._loop)  # noqa: E731
        if route.via is None:
            _, up = await self._loop.create_connection(
                factory,
                route.host,
                route.port,
                ssl=route.tls,
                server_hostname=route.host if route.tls is not None else None,
                ssl_handshake_timeout=CONNECT_SECONDS if route.tls is not None else None,
            )
            return up
        host, port = route.via
        try:
            transport, up = await self._loop.create_connection(factory, host, port)
        except OSError as exc:
            raise ForwardProxyError(host, port, _strerror(exc)) from None
        if route.tls is None:
            return up  # absolute-form requests to the proxy
        await self._tunnel(up, host, port)
        assert up.transport is not None
        try:
            tls_transport = await self._loop.start_tls(
                up.transport,
                up,
                route.tls,
                server_hostname=route.host,
                ssl_handshake_timeout=CONNECT_SECONDS,
            )
        except BaseException:
            transport.abort()
            raise
        assert isinstance(tls_transport, asyncio.Transport)
        up.transport = tls_transport
        return up

    async def _tunnel(self, up: Upstream, host: str, port: int) -> None:
        route = self.route
        target = route.authority if route.port != 443 else route.authority + b":443"
        head = b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n"
        if route.via_auth is not None:
            head += b"Proxy-Authorization: " + route.via_auth + b"\r\n"
        up.begin(head + b"\r\n", head_only=True)
        try:
            answer = await up.head
        except (BadAnswer, UpstreamClosed):
            up.abort()
            raise ForwardProxyError(
                host, port, "it closed the connection or did not speak HTTP"
            ) from None
        if not 200 <= answer.status < 300:
            up.abort()
            raise ForwardProxyError(host, port, f"it answered {answer.status} to CONNECT")
        up.restart()  # the tunnel carries a new stream

    def close(self) -> None:
        for up in self._idle:
            up.abort()
        self._idle.clear()


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__
