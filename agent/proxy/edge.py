"""The proxy's HTTP edge: client connections on asyncio, requests parsed with httptools.

One :class:`ClientConnection` per client. It parses requests (llhttp), one at a time: a request
head starts its exchange (:meth:`Listener.exchange`, a task) and its body is fed to a
:class:`Body` the exchange reads; a pipelined request waits for the answer before it. It bounds
what a client may make the agent hold and wait for:

- the request head: ``max_header_size`` bytes and :data:`MAX_HEADERS` headers, else 431;
  any other malformed request is a 400 (the answer never echoes what the client sent);
- connections: beyond ``max_connections`` a 503, then close;
- time: a request head not complete within ``client_timeout`` of the connection's start or
  of the last answer closes it (slowloris, idle kept-alive connections); a body that pauses
  longer is a 408; a client that reads nothing of its answer for as long is cut;
- memory: the body is read only as fast as the upstream takes it; the answer only as fast as
  the client reads it.

Time limits are enforced by the listener's :meth:`Listener.tick` (twice a second), not by a
timer per request: a few attribute writes per request instead of timer handles.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any

import httptools

#: headers per request beyond which the answer is 431
MAX_HEADERS = 100
#: request body bytes queued for the exchange beyond which the client is not read further
BODY_QUEUE = 256 * 1024
#: a listener checks its connections' deadlines this often
TICK_SECONDS = 0.5
#: request headers whose first value is noted as they are parsed (read for every request)
NOTED = frozenset(
    {b"host", b"origin", b"connection", b"expect", b"content-length", b"transfer-encoding"}
)


def error_body(status: int, error: str, **fields: object) -> bytes:
    """The JSON body of every answer the proxy itself gives (not the upstream's)."""
    return json.dumps({"status": status, "error": error, **fields}).encode()


def simple_answer(
    status: int, body: bytes, *, close: bool, extra: tuple[tuple[str, str], ...] = ()
) -> bytes:
    """A whole JSON answer of the proxy's own."""
    phrase = HTTPStatus(status).phrase
    head = [f"HTTP/1.1 {status} {phrase}", "Content-Type: application/json"]
    head += [f"{name}: {value}" for name, value in extra]
    head.append(f"Content-Length: {len(body)}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_BUSY = simple_answer(
    503,
    error_body(503, "too many connections to the proxy (max_connections); try again, or raise it"),
    close=True,
    extra=(("Retry-After", "1"),),
)


class ClientGone(ConnectionResetError):
    """The client closed its connection."""


class BodyError(Exception):
    """The request body cannot be read: a status and an error the proxy answers with."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


class Body:
    """A request's body as the client sends it (:meth:`read` by the exchange)."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_size",
        "_waiter",
        "chunked",
        "deadline",
        "ended",
        "error",
        "length",
    )

    def __init__(self, conn: ClientConnection, length: int | None, chunked: bool) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        #: while a read waits: when it fails with 408 (the listener's tick checks it)
        self.deadline = 0.0
        self.ended = False
        self.error: BaseException | None = None
        #: the declared Content-Length, and whether it comes chunked
        self.length, self.chunked = length, chunked

    @property
    def exists(self) -> bool:
        return self.chunked or bool(self.length)

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > BODY_QUEUE:
            self._conn.pause_reading()
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        if not self.ended:
            self.ended = True
            self.error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def check(self, now: float) -> None:
        """The listener's tick: a read that waited past its deadline fails with 408."""
        waiter = self._waiter
        if waiter is not None and now >= self.deadline and not waiter.done():
            waiter.set_exception(_body_stalled(self._conn))

    async def read(self) -> bytes:
        """The next chunk; b"" at its end. Raises BodyError (400 malformed, 408 stalled) or
        ClientGone."""
        while not self._chunks:
            if self.ended:
                if self.error is not None:
                    raise self.error
                return b""
            self._waiter = waiter = self._conn.loop.create_future()
            self.deadline = time.monotonic() + self._conn.client_timeout
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._size <= BODY_QUEUE // 2:
            self._conn.resume_reading()
        return chunk


def _body_stalled(conn: ClientConnection) -> BaseException:
    return BodyError(
        408, f"the client sent no body data for client_timeout ({conn.client_timeout:g}s)"
    )


class Request:
    """A parsed request head, and its body."""

    __slots__ = (
        "body",
        "headers",
        "keep_alive",
        "method",
        "noted",
        "started",
        "target",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: str,
        headers: list[tuple[bytes, bytes]],
        noted: dict[bytes, bytes],
        keep_alive: bool,
        body: Body,
    ) -> None:
        self.method, self.target, self.version = method, target, version
        self.headers, self.noted = headers, noted
        self.keep_alive, self.body = keep_alive, body
        self.started = time.monotonic()

    def header(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (lower case)."""
        if name in NOTED:
            return self.noted.get(name)
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def path(self) -> str:
        """The target without its query, for logs."""
        return self.target.split(b"?", 1)[0].decode("latin-1")


class Listener:
    """What the connections of one listening socket share: limits, the exchange, the log."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        exchange: Callable[[ClientConnection, Request], Coroutine[Any, Any, None]],
        refused: Callable[[int], None],
        log: logging.Logger,
        max_connections: int,
        max_header_size: int,
        client_timeout: float,
    ) -> None:
        self.loop = loop
        self.exchange = exchange
        self.refused = refused
        self.log = log
        self.max_connections = max_connections
        self.max_header_size = max_header_size
        self.client_timeout = client_timeout
        self.connections: set[ClientConnection] = set()
        self.busy_refusals = 0
        self.closing = False

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def tick(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check(now)

    def refuse_busy(self) -> None:
        self.busy_refusals += 1
        self.refused(503)
        if self.busy_refusals == 1 or self.busy_refusals % 1000 == 0:
            self.log.warning(
                "connection refused: max_connections (%d) reached (%d refused so far)",
                self.max_connections,
                self.busy_refusals,
                extra={"event": "proxy_busy"},
            )

    def close_idle(self) -> None:
        """At stop: idle connections close now, busy ones after their answer."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()


class ClientConnection(asyncio.Protocol):
    """One client connection (see the module's doc)."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.client_timeout = listener.client_timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpRequestParser(self)
        self._refused = False
        # the request head being parsed
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._noted: dict[bytes, bytes] = {}
        self._length: int | None = None
        self._chunked = False
        self._head_bytes = 0
        self._head_size = 0
        self._in_head = True
        self._head_began = False
        self._head_deadline = time.monotonic() + self.client_timeout
        # the requests parsed and not yet answered (the first is being exchanged)
        self._queue: deque[Request] = deque()
        self._current: Request | None = None
        self.task: asyncio.Task[None] | None = None
        self._parse_dead = False
        # reading paused by the body's flow control, or until the answer ends
        self._read_paused = False
        self._hold_reading = False
        #: when the transport paused writing (the client reads slowly); 0.0: not paused
        self.write_paused_at = 0.0
        # the one future the exchange awaits with a deadline, and what it then fails with
        self._wait: asyncio.Future[Any] | None = None
        self._wait_deadline = 0.0
        self._wait_error: Callable[[ClientConnection], BaseException] | None = None
        #: set while an answer is relayed from the upstream: checks its stalls at each tick,
        #: and resumes the upstream's reading when the client drained what it was sent
        self.relay_watch: Callable[[float], None] | None = None
        self.on_writable: Callable[[], None] | None = None
        self.answer_began = False
        self._close_after = False

    # ---------------------------------------------------------------------- protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets it only on sockets it made itself (proto IPPROTO_TCP): without it
            # an answer's second write waits for the client's delayed ACK (40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener = self.listener
        if len(listener.connections) >= listener.max_connections or listener.closing:
            self._refused = True
            listener.refuse_busy()
            transport.write(_BUSY)
            transport.close()
            return
        listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        current = self._current
        if current is not None:
            current.body.end(ClientGone())
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._refused or self._parse_dead:
            return
        if self._in_head:
            self._head_began = True
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._parse_dead = True  # an Upgrade or CONNECT head ended the parsable stream
        except httptools.HttpParserCallbackError:
            self._parse_dead = True  # our callback refused (431 answered)
        except httptools.HttpParserError:
            self._malformed()
            return
        if (
            self._in_head
            and self._head_bytes > self.listener.max_header_size
            and not self._parse_dead
        ):
            self._too_large()

    def eof_received(self) -> bool | None:
        current = self._current
        if current is None:
            return None  # close
        if not current.body.ended:
            current.body.end(ClientGone())
            return None
        # the client sent its request whole and shut down its side (a half-close): the
        # answer still goes back, then the connection closes
        self._close_after = True
        return True

    def pause_writing(self) -> None:
        self.write_paused_at = time.monotonic()

    def resume_writing(self) -> None:
        self.write_paused_at = 0.0
        if self.on_writable is not None:
            self.on_writable()

    # ------------------------------------------------------------------ the parser's
    def on_message_begin(self) -> None:
        self._url = bytearray()
        self._headers = []
        self._noted = {}
        self._length = None
        self._chunked = False
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.listener.max_header_size:
            self._too_large()
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer: dropped
        headers = self._headers
        headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if len(headers) > MAX_HEADERS or self._head_size > self.listener.max_header_size:
            self._too_large()
            raise _Stop
        lower = name.lower()
        if lower in NOTED:
            noted = self._noted
            if lower not in noted:
                noted[lower] = value
            if lower == b"content-length":
                try:
                    self._length = int(value)
                except ValueError:
                    self._length = None
            elif lower == b"transfer-encoding":
                self._chunked = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        body = Body(self, self._length, self._chunked)
        request = Request(
            parser.get_method(),
            bytes(self._url),
            parser.get_http_version(),
            self._headers,
            self._noted,
            parser.should_keep_alive(),
            body,
        )
        if not body.exists:
            body.ended = True
        self._queue.append(request)
        if self._current is None:
            self._next()

    def on_body(self, chunk: bytes) -> None:
        if self._queue:
            self._queue[-1].body.feed(chunk)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._head_began = False
        if self._queue:
            self._queue[-1].body.end()
        if len(self._queue) > 1 and not self._hold_reading:
            # a pipelined request waits: the next ones are read once it is answered (one
            # read of the socket, at most 256 KiB, is parsed whole: that bounds the queue)
            self._hold_reading = True
            self._apply_reading()

    # ----------------------------------------------------------------------- requests
    def _next(self) -> None:
        if self.closed or not self._queue:
            return
        request = self._queue[0]
        self._current = request
        self.answer_began = False
        self.task = self.loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            await self.listener.exchange(self, request)
        finally:
            self._finished(request)

    def _finished(self, request: Request) -> None:
        if self._queue and self._queue[0] is request:
            self._queue.popleft()
        self._current = None
        self.task = None
        self.relay_watch = self.on_writable = None
        if self.closed:
            return
        if (
            not request.keep_alive
            or not request.body.ended
            or self._close_after
            or self.listener.closing
        ):
            self.close()
            return
        self._head_deadline = time.monotonic() + self.client_timeout
        if self._parse_dead:
            self.close()
            return
        if self._hold_reading:
            self._hold_reading = False
            self._apply_reading()
        if self._queue:
            self._next()

    @property
    def closing_after(self) -> bool:
        return self._close_after

    def close_after(self) -> None:
        """Close once the answer in progress is written."""
        self._close_after = True

    def close_when_idle(self) -> None:
        if self._current is None:
            self.close()
        else:
            self._close_after = True

    # -------------------------------------------------------------------- flow control
    def pause_reading(self) -> None:
        self._read_paused = True
        self._apply_reading()

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            self._apply_reading()

    def _apply_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        want = not (self._read_paused or self._hold_reading)
        if want != transport.is_reading():
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def writable(self) -> bool:
        return not self.write_paused_at

    # --------------------------------------------------------------------- deadlines
    def waiting(
        self,
        future: asyncio.Future[Any] | None,
        seconds: float = 0.0,
        error: Callable[[ClientConnection], BaseException] | None = None,
    ) -> None:
        """Fail ``future`` with ``error(self)`` unless it is done within ``seconds``."""
        self._wait = future
        if future is not None:
            self._wait_deadline = time.monotonic() + seconds
            self._wait_error = error

    def check(self, now: float) -> None:
        """The listener's tick: enforce this connection's deadlines."""
        if self.closed:
            return
        current = self._current
        if current is not None:
            current.body.check(now)  # its sender may wait for the body as the exchange waits
        wait = self._wait
        if wait is not None:
            if now >= self._wait_deadline and not wait.done() and self._wait_error is not None:
                wait.set_exception(self._wait_error(self))
            return
        if self.relay_watch is not None:
            self.relay_watch(now)
            return
        if self._current is None and now >= self._head_deadline:
            if self._head_began:  # a request head that did not come whole in time
                self.listener.refused(408)
                self.send(
                    simple_answer(
                        408,
                        error_body(
                            408,
                            "the request head did not come whole within client_timeout "
                            f"({self.client_timeout:g}s)",
                        ),
                        close=True,
                    )
                )
            self.close()

    # ------------------------------------------------------------------------ writing
    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.listener.connections.discard(self)
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.listener.connections.discard(self)
            self.transport.abort()

    # ----------------------------------------------------------------------- refusals
    def _malformed(self) -> None:
        self._parse_dead = True
        current = self._current
        if current is not None and not current.body.ended:
            # the body's framing broke: the exchange answers it (or cuts the connection)
            current.body.end(BodyError(400, "malformed request body (its chunked framing)"))
            self._close_after = True
            return
        self._refuse(400, "malformed request")

    def _too_large(self) -> None:
        self._parse_dead = True
        self._refuse(
            431,
            "request header fields too large (max_header_size, or more than "
            f"{MAX_HEADERS} headers)",
        )

    def _refuse(self, status: int, error: str) -> None:
        self.listener.refused(status)
        self.listener.log.debug(
            "refused a request: %d %s", status, error, extra={"event": "proxy_bad"}
        )
        if self._current is None:
            self.send(simple_answer(status, error_body(status, error), close=True))
            self.close()
        else:
            self._close_after = True


class _Stop(Exception):
    """Raised in a parser callback to stop parsing (httptools wraps it)."""
