"""The proxy's HTTP edge on aiohttp's low-level server: what aiohttp leaves to us.

aiohttp parses requests and bounds their lines, but it answers a header flood with 400, has no
connection cap, and its server logger writes the first 100 bytes of an oversized header line at
ERROR (a header that holds a token would reach the journal). :class:`EdgeServer` makes
connections of :class:`EdgeHandler`, which

- answers 431 (JSON) for a request line or header over ``max_header_size`` or too many headers,
  and 400 for any other malformed request, never echoing what the client sent;
- answers 503 and closes a connection beyond ``max_connections``;
- logs through :func:`quiet_logger`, which keeps the exception's type and drops its text and
  traceback (they may hold request bytes).

aiohttp's keep-alive timer closes a connection that sends no complete request head within
``keepalive_timeout`` (set to ``client_timeout``), from its start and after each answer: a
slow-header client (slowloris) is cut off with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

#: headers per request beyond which the answer is 431 (aiohttp's own default is 128)
MAX_HEADERS = 100


def error_body(status: int, error: str, **fields: object) -> bytes:
    """The JSON body of every answer the proxy itself gives (not the upstream's)."""
    return json.dumps({"status": status, "error": error, **fields}).encode()


def _is_header_flood(exc: BaseException) -> bool:
    if isinstance(exc, LineTooLong):
        return True
    return isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)


class _TypeOnly(logging.Handler):
    """Forwards a record of aiohttp's server as one line: its message, the exception type."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(logging.DEBUG)
        self._target = target

    def emit(self, record: logging.LogRecord) -> None:
        kind = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        level = min(record.levelno, logging.WARNING)
        if kind in ("ConnectionResetError", "CancelledError", "ClientConnectionResetError"):
            level = logging.DEBUG  # a client that went away
        self._target.log(
            level,
            "proxy HTTP server: %s%s",
            record.msg if isinstance(record.msg, str) else type(record.msg).__name__,
            f" ({kind})" if kind else "",
            extra={"event": "proxy_internal"},
        )


def quiet_logger(target: logging.Logger) -> logging.Logger:
    """A logger for aiohttp's server that is not in the logging registry (no global state),
    passing only message templates and exception types to ``target`` (never the args, which
    hold request bytes, nor a traceback)."""
    quiet = logging.Logger("agent.proxy.http", logging.DEBUG)
    quiet.propagate = False
    quiet.addHandler(_TypeOnly(target))
    return quiet


class EdgeServer(web.Server):
    """aiohttp's low-level server making :class:`EdgeHandler` connections."""

    def __init__(
        self,
        handler: Any,
        *,
        max_connections: int,
        log: logging.Logger,
        on_refused: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.log = log
        #: told the status of each answer the edge gives itself (431, 400, 503): the metrics
        self.on_refused = on_refused
        self.refused = 0

    def __call__(self) -> RequestHandler:
        return EdgeHandler(self, loop=self._loop, **self._kwargs)


_BUSY = error_body(
    503, "too many connections to the proxy (max_connections); try again, or raise it"
)
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
    + str(len(_BUSY)).encode()
    + b"\r\n\r\n"
    + _BUSY
)


class EdgeHandler(RequestHandler):
    """One client connection (see the module's doc)."""

    _refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if isinstance(manager, EdgeServer) and len(manager.connections) >= manager.max_connections:
            self._refused = True
            manager.refused += 1
            if manager.on_refused is not None:
                manager.on_refused(503)
            if manager.refused == 1 or manager.refused % 1000 == 0:
                manager.log.warning(
                    "connection refused: max_connections (%d) reached (%d refused so far)",
                    manager.max_connections,
                    manager.refused,
                    extra={"event": "proxy_busy"},
                )
            assert isinstance(transport, asyncio.Transport)
            transport.write(_BUSY_RESPONSE)
            transport.close()
            return
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        log = self._manager.log if isinstance(self._manager, EdgeServer) else None
        if status == 400 and exc is not None and _is_header_flood(exc):
            status, error = 431, "request header fields too large (max_header_size, or more "
            error += f"than {MAX_HEADERS} headers)"
        elif status == 400:
            error = f"malformed request ({type(exc).__name__ if exc else 'bad request'})"
        elif status == 504:
            error = "the proxy timed out"
        elif isinstance(exc, ConnectionError):  # the client went away: nothing to answer
            error = "the client closed the connection"
            if log is not None:
                log.debug("%s (%s)", error, type(exc).__name__, extra={"event": "proxy_gone"})
        else:
            error = "internal error in the proxy"
            if log is not None:
                where = ""
                tb = exc.__traceback__ if exc is not None else None
                while tb is not None and tb.tb_next is not None:
                    tb = tb.tb_next
                if tb is not None:
                    where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
                log.error(
                    "internal error in the proxy: %s%s",
                    type(exc).__name__ if exc else "?",
                    where,
                    extra={"event": "proxy_internal"},
                )
        if request.writer.output_size > 0:  # the answer had begun: the connection is cut
            raise ConnectionError("the answer had begun; closing the connection")
        if log is not None and status not in (500, 499):
            log.debug("refused a request: %d %s", status, error, extra={"event": "proxy_bad"})
        manager = self._manager
        if status in (400, 431) and isinstance(manager, EdgeServer) and manager.on_refused:
            manager.on_refused(status)  # no handler ran (the handler counts its own answers)
        resp = web.Response(status=status, body=error_body(status, error))
        resp.content_type = "application/json"
        resp.force_close()
        return resp
