"""Which HTTP stack for the local bearer proxy (issue 15 item 5, DESIGN §14): a measurement.

Each candidate is a minimal but correct forwarding proxy, run as its own process (``serve``):
origin-form target, method, headers and body to the upstream, ``Authorization: Bearer x``
replacing any the client sent, hop-by-hop headers (and those named in ``Connection``) stripped
both ways, ``Host`` set by the client library from the upstream URL, no header injected by the
client library (both inject ``Accept-Encoding`` and ``User-Agent`` by default; aiohttp also a
``Content-Type`` on streamed bodies), the body streamed both ways, ``--max-body`` enforced (413 on
``Content-Length`` and mid-stream), upstream failure 502 with a JSON body, SIGTERM draining
within 5 s. Candidates:

* ``aiohttp+aiohttp``: ``aiohttp.web.Server`` (low level) + ``aiohttp.ClientSession``
  (also ``+uvloop``)
* ``aiohttp+httpx``: ``aiohttp.web.Server`` + ``httpx.AsyncClient``
* ``uvicorn-h11+httpx``, ``uvicorn-httptools+httpx`` (also ``+uvloop``): a raw ASGI app under
  ``uvicorn.Server`` + ``httpx.AsyncClient``
* ``nginx``: nginx as a plain reverse proxy (1 worker, keepalive to the upstream), the
  practical limit; ``direct``: wrk against the upstream, the baseline.

The upstream is nginx (1 worker, its own master) on loopback over plain HTTP, serving a 200-byte
JSON file, a 200 MiB file (the streaming check), a rate-limited 1 MiB file (the drain check) and
``/echo`` pages (the echo module, ``libnginx-mod-http-echo``, which ``nginx-light`` brings) that
answer what the upstream received. ``run`` does, in one go:

1. functional checks through every proxy over TCP, and again over a unix socket with
   ``curl --unix-socket`` (bearer replaced, hop-by-hop stripped, Host, query, POST body,
   chunked body, 413 both ways, no injected headers);
2. what each server does by default with a 16 KiB / 64 KiB / 1 MiB header, 200 headers, an
   idle connection and a slowloris (1 byte/s) connection, and whether SIGTERM drains a response
   in flight;
3. import time and RSS after import (fresh interpreters, the median of 5, over a baseline that
   has imported ``asyncio``, ``ssl`` and ``httpx``, which the agent already imports), and the new
   distributions each adds to the agent's runtime closure (installed size, wheel size when
   ``setup`` downloaded the wheels);
4. wrk ``-t1 -c1`` and ``-t2 -c64`` (``--duration`` 10 s each) against every target, ``--rounds``
   3 with the order rotated, medians reported; the proxy's RSS idle (after the functional
   checks) and peak (``VmHWM`` after all load, reset at idle) and its CPU per request;
5. 200 MiB through every proxy to a slow reader (``--slow-rate`` 40 MiB/s, a 64 KiB receive
   buffer) with ``VmRSS`` sampled every 20 ms, and the same to a fast reader (MiB/s).

    python bench/proxy_stacks.py setup --venv /tmp/proxy-venv   # the candidates' venv, once
    /tmp/proxy-venv/bin/python bench/proxy_stacks.py run        # about 11 minutes
    /tmp/proxy-venv/bin/python bench/proxy_stacks.py run --quick  # a smoke run, about 2 minutes
    /tmp/proxy-venv/bin/python bench/proxy_stacks.py serve --stack aiohttp+httpx \\
        --listen unix:/tmp/p.sock --upstream http://127.0.0.1:8080

Needs ``wrk``, ``nginx-light`` and ``curl`` (Debian packages). Targets (issue 15) are reported,
never asserted: added p50 ≤ 1 ms at 1 connection (vs direct), throughput ≥ 0.3x nginx's at 64
connections, RSS growth under load ≤ 10 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
BEARER = "Bearer x"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NGINX_ECHO = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
BIG_SIZE = 200 * MiB
SMALL_BODY = json.dumps(
    {
        "access_token": "x" * 64,
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": "claims:read claims:write",
        "note": "a small JSON answer of about 200 bytes for the latency runs",
    }
).encode()


@dataclass(frozen=True)
class Stack:
    server: str  # "aiohttp" or "uvicorn"
    client: str  # "aiohttp" or "httpx"
    http: str = ""  # uvicorn's parser: "h11" or "httptools"
    uvloop: bool = False
    # the distributions the proxy needs beyond the agent's runtime closure (httpx is in it)
    roots: tuple[str, ...] = ()
    # what the proxy imports, for the import-time measurement
    modules: tuple[str, ...] = ()


_AIOHTTP_MODULES = ("aiohttp", "aiohttp.web")
_UVICORN_MODULES = ("uvicorn", "uvicorn.config", "uvicorn.server", "uvicorn.loops.asyncio")
STACKS: dict[str, Stack] = {
    "aiohttp+aiohttp": Stack("aiohttp", "aiohttp", roots=("aiohttp",), modules=_AIOHTTP_MODULES),
    "aiohttp+aiohttp+uvloop": Stack(
        "aiohttp",
        "aiohttp",
        uvloop=True,
        roots=("aiohttp", "uvloop"),
        modules=(*_AIOHTTP_MODULES, "uvloop"),
    ),
    "aiohttp+httpx": Stack("aiohttp", "httpx", roots=("aiohttp",), modules=_AIOHTTP_MODULES),
    "uvicorn-h11+httpx": Stack(
        "uvicorn",
        "httpx",
        http="h11",
        roots=("uvicorn",),
        modules=(*_UVICORN_MODULES, "uvicorn.protocols.http.h11_impl"),
    ),
    "uvicorn-httptools+httpx": Stack(
        "uvicorn",
        "httpx",
        http="httptools",
        roots=("uvicorn", "httptools"),
        modules=(*_UVICORN_MODULES, "uvicorn.protocols.http.httptools_impl"),
    ),
    "uvicorn-httptools+httpx+uvloop": Stack(
        "uvicorn",
        "httpx",
        http="httptools",
        uvloop=True,
        roots=("uvicorn", "httptools", "uvloop"),
        modules=(
            *_UVICORN_MODULES,
            "uvicorn.protocols.http.httptools_impl",
            "uvicorn.loops.uvloop",
            "uvloop",
        ),
    ),
    # no new distribution: h11 is in the agent's closure already (httpx → httpcore → h11)
    "asyncio-h11+httpx": Stack("h11", "httpx", modules=("h11",)),
    # the servers again with the aiohttp client, to tell server cost from client cost
    "uvicorn-h11+aiohttp": Stack(
        "uvicorn",
        "aiohttp",
        http="h11",
        roots=("uvicorn", "aiohttp"),
        modules=(*_UVICORN_MODULES, "uvicorn.protocols.http.h11_impl", *_AIOHTTP_MODULES),
    ),
    "uvicorn-httptools+aiohttp": Stack(
        "uvicorn",
        "aiohttp",
        http="httptools",
        roots=("uvicorn", "httptools", "aiohttp"),
        modules=(*_UVICORN_MODULES, "uvicorn.protocols.http.httptools_impl", *_AIOHTTP_MODULES),
    ),
    "asyncio-h11+aiohttp": Stack(
        "h11", "aiohttp", roots=("aiohttp",), modules=("h11", *_AIOHTTP_MODULES)
    ),
}


# --------------------------------------------------------------------------- the proxies


class BodyTooLarge(Exception):
    pass


def _connection_tokens(pairs: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }


def request_headers(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's headers as the upstream gets them: hop-by-hop, Host, Authorization out."""
    pairs = list(pairs)
    drop = HOP_BY_HOP | _connection_tokens(pairs) | {"host", "authorization"}
    out = [(n, v) for n, v in pairs if n.lower() not in drop]
    out.append(("Authorization", BEARER))
    return out


def response_headers(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = list(pairs)
    drop = HOP_BY_HOP | _connection_tokens(pairs)
    return [(n, v) for n, v in pairs if n.lower() not in drop]


async def limited(chunks: AsyncIterator[bytes], max_body: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_body:
            raise BodyTooLarge
        yield chunk


def _error_body(status: int, cause: str) -> bytes:
    return json.dumps({"error": cause, "status": status}).encode()


def _content_length(pairs: Iterable[tuple[str, str]]) -> int | None:
    for name, value in pairs:
        if name.lower() == "content-length":
            return int(value)
    return None


def _has_body(pairs: list[tuple[str, str]]) -> bool:
    names = {n.lower() for n, _ in pairs}
    return "transfer-encoding" in names or (_content_length(pairs) or 0) > 0


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is ``exc`` or in its cause/context chain (client libraries wrap it)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def failure_reply(
    exc: BaseException, errors: type[BaseException] | tuple[type[BaseException], ...]
) -> tuple[int, str] | None:
    """The answer to a failure before the response started: 413 for a body over max_body, 502
    naming an upstream error; None for anything else (the caller re-raises it)."""
    if _contains(exc, BodyTooLarge):
        return 413, "body too large"
    if isinstance(exc, errors):
        return 502, f"upstream: {type(exc).__name__}"
    return None


class Upstream:
    """One client library behind one interface: ``open`` returns (status, reason, headers,
    an async chunk iterator, a close coroutine)."""

    def __init__(self, kind: str, base: str, timeout: float) -> None:
        self.kind = kind
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.client: Any = None

    async def start(self) -> None:
        if self.kind == "httpx":
            import httpx

            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout, connect=10.0),
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
                trust_env=False,
                follow_redirects=False,
            )
            for name in list(self.client.headers):  # its defaults: Accept-Encoding, User-Agent…
                del self.client.headers[name]
        else:
            import aiohttp

            self.client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10.0, sock_read=self.timeout
                ),
                auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                trust_env=False,
            )

    async def close(self) -> None:
        if self.client is not None:
            await (self.client.aclose() if self.kind == "httpx" else self.client.close())

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        if self.kind == "httpx":
            import httpx

            return (httpx.TransportError, OSError)
        import aiohttp

        return (aiohttp.ClientError, OSError, asyncio.TimeoutError)

    async def open(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
    ) -> tuple[int, str, list[tuple[str, str]], AsyncIterator[bytes], Callable[[], Any]]:
        url = self.base + target
        if self.kind == "httpx":
            req = self.client.build_request(method, url, headers=headers, content=body)
            up = await self.client.send(req, stream=True)
            pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in up.headers.raw]
            return up.status_code, up.reason_phrase, pairs, up.aiter_raw(), up.aclose
        import yarl

        resp = await self.client.request(
            method, yarl.URL(url, encoded=True), headers=headers, data=body, allow_redirects=False
        )
        pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in resp.raw_headers]

        async def close() -> None:
            resp.release()

        return resp.status, resp.reason or "", pairs, resp.content.iter_any(), close


def aiohttp_handler(upstream: Upstream, max_body: int) -> Callable[[Any], Any]:
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers]
        length = _content_length(pairs)
        if length is not None and length > max_body:
            return web.Response(status=413, body=_error_body(413, "body too large"))
        if (
            request.version >= (1, 1)
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            # web.Application's router does this (expect_handler); the low-level server does not
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = limited(request.content.iter_any(), max_body) if request.body_exists else None
        started = False
        try:
            status, reason, up_headers, chunks, close = await upstream.open(
                request.method, request.raw_path, request_headers(pairs), body
            )
            try:
                resp = web.StreamResponse(status=status, reason=reason)
                for name, value in response_headers(up_headers):
                    resp.headers.add(name, value)
                started = True
                await resp.prepare(request)
                async for chunk in chunks:
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            finally:
                await close()
        except Exception as exc:
            # mid-response (started), the connection is cut, as it must be
            answer = None if started else failure_reply(exc, upstream.errors)
            if answer is None:
                raise
            return web.Response(status=answer[0], body=_error_body(*answer))

    return handle


def asgi_app(upstream: Upstream, max_body: int) -> Callable[..., Any]:
    started_client = asyncio.Lock()
    ready: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if not ready:
            async with started_client:
                if not ready:
                    await upstream.start()
                    ready.append(True)
        pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]]
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")

        async def reply(status: int, cause: str) -> None:
            data = _error_body(status, cause)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(data)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": data})

        length = _content_length(pairs)
        if length is not None and length > max_body:
            await reply(413, "body too large")
            return

        async def body_chunks() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionResetError("client went away")
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body"):
                    return

        body = limited(body_chunks(), max_body) if _has_body(pairs) else None
        started = False
        try:
            status, _, up_headers, chunks, close = await upstream.open(
                scope["method"], target, request_headers(pairs), body
            )
            try:
                headers = [
                    (n.lower().encode("latin-1"), v.encode("latin-1"))
                    for n, v in response_headers(up_headers)
                ]
                started = True
                await send({"type": "http.response.start", "status": status, "headers": headers})
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await close()
        except Exception as exc:
            answer = None if started else failure_reply(exc, upstream.errors)
            if answer is None:
                raise
            await reply(*answer)

    return app


def _parse_listen(listen: str) -> tuple[str, int] | str:
    if listen.startswith("unix:"):
        return listen[len("unix:") :]
    host, _, port = listen.rpartition(":")
    return host, int(port)


async def _serve_aiohttp(stack: Stack, args: argparse.Namespace) -> None:
    from aiohttp import web

    upstream = Upstream(stack.client, args.upstream, args.timeout)
    await upstream.start()
    server = web.Server(aiohttp_handler(upstream, args.max_body), access_log=None)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    where = _parse_listen(args.listen)
    site: web.BaseSite
    if isinstance(where, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        site = web.UnixSite(runner, where)
    else:
        site = web.TCPSite(runner, where[0], where[1], backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()  # stops listening, waits up to shutdown_timeout for handlers
    await upstream.close()


def _serve_uvicorn(stack: Stack, args: argparse.Namespace) -> None:
    import uvicorn

    upstream = Upstream(stack.client, args.upstream, args.timeout)
    where = _parse_listen(args.listen)
    kwargs: dict[str, Any] = (
        {"uds": where} if isinstance(where, str) else {"host": where[0], "port": where[1]}
    )
    if isinstance(where, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
    config = uvicorn.Config(
        asgi_app(upstream, args.max_body),
        http=stack.http,
        loop="uvloop" if stack.uvloop else "asyncio",
        ws="none",
        lifespan="off",
        interface="asgi3",
        access_log=False,
        log_config=None,  # else uvicorn's dictConfig replaces the process's logging set-up
        log_level="warning",
        server_header=False,
        date_header=False,
        backlog=1024,
        timeout_graceful_shutdown=5,
        **kwargs,
    )
    uvicorn.Server(config).run()  # SIGTERM: stop listening, drain, then exit


def phrase(status: int) -> str:
    from http import HTTPStatus

    return HTTPStatus(status).phrase


def _raw_error(status: int, cause: str) -> bytes:
    data = _error_body(status, cause)
    head = (
        f"HTTP/1.1 {status} {phrase(status)}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + data


class H11Server:
    """asyncio streams + h11, the hand-rolled server: what uvicorn's h11 mode does, plus what
    no candidate gives out of the box, by hand: 431 for a head over ``max_head`` (h11 limits only
    an incomplete head, so the complete one is measured too), a timeout for the request head
    (idle and slowloris connections), and a drain at stop."""

    def __init__(
        self, upstream: Upstream, max_body: int, max_head: int = 16384, head_timeout: float = 10.0
    ) -> None:
        self.upstream = upstream
        self.max_body = max_body
        self.max_head = max_head
        self.head_timeout = head_timeout
        self.busy: dict[asyncio.Task[Any], bool] = {}
        self.stopping = False

    async def _next(self, conn: Any, reader: asyncio.StreamReader) -> Any:
        import h11

        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(65536))

    def _error(self, conn: Any, status: int, cause: str) -> bytes:
        import h11

        data = _error_body(status, cause)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"connection", b"close"),
        ]
        return (
            conn.send(h11.Response(status_code=status, headers=headers, reason=phrase(status)))
            + conn.send(h11.Data(data=data))
            + conn.send(h11.EndOfMessage())
        )

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h11

        task = asyncio.current_task()
        assert task is not None
        self.busy[task] = False
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
        try:
            while not self.stopping:
                try:
                    async with asyncio.timeout(self.head_timeout):
                        event = await self._next(conn, reader)
                except TimeoutError:
                    if conn.trailing_data[0]:  # part of a head: say so; idle: just close
                        writer.write(_raw_error(408, "request head timeout"))
                    return
                if not isinstance(event, h11.Request):
                    return
                self.busy[task] = True
                head = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                if head > self.max_head:
                    writer.write(self._error(conn, 431, "request header fields too large"))
                    return
                await self._exchange(conn, event, reader, writer)
                self.busy[task] = False
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                writer.write(_raw_error(exc.error_status_hint, "bad request"))
        except (ConnectionError, OSError, h11.LocalProtocolError):
            pass
        finally:
            self.busy.pop(task, None)
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()

    async def _exchange(
        self, conn: Any, req: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        import h11

        pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.headers.raw_items()]
        length = _content_length(pairs)
        if length is not None and length > self.max_body:
            writer.write(self._error(conn, 413, "body too large"))
            return

        async def body_chunks() -> AsyncIterator[bytes]:
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:
                    raise ConnectionResetError("client went away")

        body = None
        if _has_body(pairs):
            body = limited(body_chunks(), self.max_body)
        elif not isinstance(await self._next(conn, reader), h11.EndOfMessage):
            return
        started = False
        try:
            status, reason, up_headers, chunks, close = await self.upstream.open(
                req.method.decode(), req.target.decode("latin-1"), request_headers(pairs), body
            )
            try:
                headers = [
                    (n.encode("latin-1"), v.encode("latin-1"))
                    for n, v in response_headers(up_headers)
                ]
                started = True
                response = h11.Response(status_code=status, headers=headers, reason=reason)
                writer.write(conn.send(response))
                async for chunk in chunks:
                    writer.write(conn.send(h11.Data(data=chunk)))
                    await writer.drain()
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
            finally:
                await close()
        except Exception as exc:
            answer = None if started else failure_reply(exc, self.upstream.errors)
            if answer is None:
                raise
            writer.write(self._error(conn, *answer))

    async def drain(self, server: asyncio.Server, timeout: float) -> None:
        server.close()
        self.stopping = True
        for task, busy in list(self.busy.items()):
            if not busy:
                task.cancel()
        pending = list(self.busy)
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()


async def _serve_h11(stack: Stack, args: argparse.Namespace) -> None:
    upstream = Upstream(stack.client, args.upstream, args.timeout)
    await upstream.start()
    srv = H11Server(upstream, args.max_body)
    where = _parse_listen(args.listen)
    if isinstance(where, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)
        server = await asyncio.start_unix_server(srv.connection, where, backlog=1024)
    else:
        server = await asyncio.start_server(srv.connection, where[0], where[1], backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await srv.drain(server, 5.0)
    await upstream.close()


def serve(args: argparse.Namespace) -> None:
    stack = STACKS[args.stack]
    if stack.server == "h11":
        asyncio.run(_serve_h11(stack, args))
        return
    if stack.server == "uvicorn":
        _serve_uvicorn(stack, args)
        return
    loop_factory = None
    if stack.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_aiohttp(stack, args))


# --------------------------------------------------------------------------- the driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(where: tuple[str, int] | str, proc: subprocess.Popen[bytes], t: float) -> None:
    deadline = time.monotonic() + t
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if isinstance(where, str):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(where)
            else:
                socket.create_connection(where, timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args} not listening after {t} s")


def status_kib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB
    raise KeyError(key)


def reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


NGINX_CONF = """\
{user}
load_module {echo};
worker_processes 1;
daemon off;
master_process on;
pid {dir}/{name}.pid;
error_log {dir}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
{body}
}}
"""

UPSTREAM_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        root {www};
        # accept what the proxies pass on, so the header probes see the proxy's own answer
        large_client_header_buffers 8 4m;
        location = /small.json {{ default_type application/json; }}
        location /slow/ {{ limit_rate 512k; limit_rate_after 0; }}
        location = /echo {{
            default_type text/plain;
            echo "auth=$http_authorization";
            echo "host=$http_host";
            echo "uri=$request_uri";
            echo "method=$request_method";
            echo "x-foo=$http_x_foo";
            echo "x-keep=$http_x_keep";
            echo "te=$http_te";
            echo "proxy-authorization=$http_proxy_authorization";
            echo "accept-encoding=$http_accept_encoding";
            echo "user-agent=$http_user_agent";
            echo "content-type=$http_content_type";
        }}
        location = /echo-body {{
            default_type text/plain;
            client_max_body_size 0;
            client_body_buffer_size 4m;
            echo_read_request_body;
            echo_request_body;
        }}
    }}
"""

PROXY_SERVER = """\
    upstream up {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{upstream};
            proxy_set_header Authorization "{bearer}";
        }}
    }}
"""


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None  # the process whose RSS/CPU is the proxy's (nginx: its worker)
    idle: float = 0.0
    peak: float = 0.0
    after: float = 0.0
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)


def start_nginx(tmp: Path, name: str, port: int, body: str) -> subprocess.Popen[bytes]:
    conf = tmp / f"{name}.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, echo=NGINX_ECHO, dir=tmp, name=name, body=body))
    proc = subprocess.Popen(
        ["nginx", "-e", str(tmp / f"{name}.err"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(("127.0.0.1", port), proc, 10)
    return proc


LOG_DIR: list[Path] = []  # set by run(): each proxy's stderr goes to a file there


def start_proxy(
    python: str, stack: str, listen: str, upstream: str, max_body: int
) -> subprocess.Popen[bytes]:
    # never a pipe nobody reads: aiohttp logs a traceback per bad request or client gone, a
    # full pipe then blocks the proxy's event loop in write(2)
    log = LOG_DIR[0] / f"{stack}-{listen.replace('/', '_')}.log" if LOG_DIR else None
    stderr = log.open("ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [
            python,
            str(Path(__file__).resolve()),
            "serve",
            "--stack",
            stack,
            "--listen",
            listen,
            "--upstream",
            upstream,
            "--max-body",
            str(max_body),
        ],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )
    if log:
        stderr.close()  # type: ignore[union-attr]
    wait_listening(_parse_listen(listen), proc, 20)
    return proc


def log_summary(stack: str, listen: str) -> str:
    """Lines the proxy wrote to stderr, and the most frequent last line of a traceback."""
    log = LOG_DIR[0] / f"{stack}-{listen.replace('/', '_')}.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors: dict[str, int] = {}
    for line in lines:
        m = re.match(r"^([\w.]+(?:Error|Exception|TooLong|Message)\b)", line)
        if m:
            errors[m[1]] = errors.get(m[1], 0) + 1
    top = ", ".join(
        f"{n} x {k.rsplit('.', 1)[-1]}" for k, n in sorted(errors.items(), key=lambda i: -i[1])[:2]
    )
    return f"{len(lines)}" + (f" ({top})" if top else "")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# ---- functional checks


def _request(
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes | Iterable[bytes] | None = None,
    chunked: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif isinstance(body, bytes):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None:
            try:
                if chunked:
                    for part in body:
                        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
                    conn.send(b"0\r\n\r\n")
                else:
                    conn.send(body)  # type: ignore[arg-type]
            except OSError:
                pass  # the server may answer 413 and close before the body is all sent
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _echo(text: bytes) -> dict[str, str]:
    out = {}
    for line in text.decode().splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out


def functional_checks(port: int, upstream_port: int, max_body: int) -> dict[str, str]:
    res: dict[str, str] = {}

    def check(name: str, ok: bool, detail: str = "") -> None:
        res[name] = "ok" if ok else f"FAIL {detail}"[:120]

    status, hdrs, body = _request(
        port,
        "GET",
        "/echo?a=1&b=%2Fx%20y",
        [
            ("Authorization", "Bearer client-token"),
            ("Connection", "keep-alive, X-Foo"),
            ("X-Foo", "hop"),
            ("X-Keep", "end-to-end"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic eA=="),
        ],
    )
    e = _echo(body)
    check("status", status == 200, str(status))
    check("bearer replaced", e.get("auth") == BEARER, e.get("auth", ""))
    check("host rewritten", e.get("host") == f"127.0.0.1:{upstream_port}", e.get("host", ""))
    check("query kept", e.get("uri") == "/echo?a=1&b=%2Fx%20y", e.get("uri", ""))
    check(
        "hop-by-hop stripped",
        e.get("x-foo") == "" and e.get("te") == "" and e.get("proxy-authorization") == "",
        json.dumps(e),
    )
    check("end-to-end kept", e.get("x-keep") == "end-to-end", e.get("x-keep", ""))
    injected = {k: e.get(k) for k in ("accept-encoding", "user-agent", "content-type") if e.get(k)}
    check("nothing injected", not injected, json.dumps(injected))
    check("no hop-by-hop back", "keep-alive" not in hdrs, json.dumps(hdrs))
    status, _, body = _request(port, "GET", "/small.json", [])
    check("small body", status == 200 and body == SMALL_BODY, f"{status} {len(body)}")
    payload = os.urandom(300_000)
    status, _, body = _request(port, "POST", "/echo-body", [], payload)
    check("POST body", status == 200 and body == payload, f"{status} {len(body)}")
    parts = [os.urandom(50_000) for _ in range(6)]
    status, _, body = _request(port, "POST", "/echo-body", [], parts, chunked=True)
    check("chunked body", status == 200 and body == b"".join(parts), f"{status} {len(body)}")
    status, _, _ = _request(port, "POST", "/echo-body", [], b"x" * (max_body + 1))
    check("413 by length", status == 413, str(status))
    big = [b"x" * 65536] * (max_body // 65536 + 2)
    try:
        status, _, _ = _request(port, "POST", "/echo-body", [], big, chunked=True)
        check("413 mid-stream", status == 413, str(status))
    except (OSError, http.client.HTTPException) as exc:
        check("413 mid-stream", False, type(exc).__name__)
    body_file = Path(tempfile.mkstemp(prefix="proxy-stacks-expect-")[1])
    body_file.write_bytes(payload)
    t0 = time.monotonic()
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--expect100-timeout",
            "3",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            f"@{body_file}",
            f"http://127.0.0.1:{port}/echo-body",
        ],
        capture_output=True,
    )
    took = time.monotonic() - t0
    body_file.unlink()
    check(
        "Expect: 100-continue",
        out.stdout == payload and took < 2,
        f"{len(out.stdout)} B in {took:.1f} s",
    )
    return res


def unix_check(sock: str, upstream_port: int) -> str:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--unix-socket", sock, "http://localhost/echo"],
        capture_output=True,
        text=True,
    )
    e = _echo(out.stdout.encode()) if out.returncode == 0 else {}
    if e.get("auth") == BEARER and e.get("host") == f"127.0.0.1:{upstream_port}":
        return "ok"
    return f"FAIL rc={out.returncode} {out.stderr.strip()[:80]}"


# ---- default-limit probes


def probe_header(port: int, size: int, count: int = 1) -> str:
    """What the server answers to ``count`` headers of ``size`` bytes each."""
    line = b"GET /small.json HTTP/1.1\r\nHost: x\r\n"
    value = b"a" * size
    head = line + b"".join(b"X-H%d: %s\r\n" % (i, value) for i in range(count)) + b"\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            with contextlib.suppress(OSError):
                s.sendall(head)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return type(exc).__name__
    if not data:
        return "closed"
    return data.split(b"\r\n", 1)[0].split(b" ", 1)[1].decode(errors="replace")[:24]


def probe_flood(port: int, pid: int, total: int = 64 * MiB) -> str:
    """One header line that never ends: how much is taken in, and what it costs in RSS."""
    before = status_kib(pid, "VmRSS")
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(2)
        with contextlib.suppress(OSError):
            s.sendall(b"GET /small.json HTTP/1.1\r\nHost: x\r\nX-Flood: ")
            while sent < total:
                s.sendall(b"a" * 65536)
                sent += 65536
        time.sleep(0.5)
        grown = status_kib(pid, "VmRSS") - before
    return f"{'all ' if sent >= total else ''}{sent / MiB:.1f} MiB taken, RSS {grown:+.1f} MiB"


def probe_slow(port: int, seconds: float) -> tuple[str, str]:
    """(idle connection, 1 byte/s headers): closed after how long, or still open."""
    results: dict[str, str] = {}

    def idle() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(seconds)
            try:
                data = s.recv(1)
                results["idle"] = f"closed {time.monotonic() - t0:.0f} s" + (
                    " (with an answer)" if data else ""
                )
            except TimeoutError:
                results["idle"] = f"open at {seconds:.0f} s"
            except OSError:
                results["idle"] = f"reset {time.monotonic() - t0:.0f} s"

    def trickle() -> None:
        t0 = time.monotonic()
        msg = b"GET /small.json HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(0.0)
            for i in range(int(seconds)):
                try:
                    s.send(msg[i : i + 1])
                    if s.recv(1) == b"":
                        results["slow"] = f"closed {time.monotonic() - t0:.0f} s"
                        return
                    results["slow"] = f"answered {time.monotonic() - t0:.0f} s"
                    return
                except BlockingIOError:
                    pass
                except OSError:
                    results["slow"] = f"reset {time.monotonic() - t0:.0f} s"
                    return
                time.sleep(1)
            results["slow"] = f"open at {seconds:.0f} s"

    threads = [threading.Thread(target=idle), threading.Thread(target=trickle)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results.get("idle", "?"), results.get("slow", "?")


def probe_drain(python: str, stack: str, upstream: str) -> str:
    """SIGTERM while a 1 MiB answer is in flight (about 2 s at 512 KiB/s)."""
    port = free_port()
    proc = start_proxy(python, stack, f"127.0.0.1:{port}", upstream, 10 * MiB)
    got: dict[str, Any] = {}

    def fetch() -> None:
        try:
            status, _, body = _request(port, "GET", "/slow/mid.bin", [])
            got["r"] = (status, len(body))
        except (OSError, http.client.HTTPException) as exc:
            got["r"] = (type(exc).__name__, 0)

    t = threading.Thread(target=fetch)
    t.start()
    time.sleep(0.4)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        refused = "new connections accepted"
    except OSError:
        refused = "new connections refused"
    t.join(15)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    took = time.monotonic() - t0
    status, n = got.get("r", ("none", 0))
    whole = status == 200 and n == MiB
    return (
        f"{'drained' if whole else 'CUT'} ({status}, {n // 1024} KiB), exit {proc.returncode} "
        f"after {took:.1f} s, {refused}"
    )


# ---- imports and wheels

IMPORT_SNIPPET = """
import time, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
import asyncio, ssl, httpx
r0, t0 = rss(), time.perf_counter()
for m in sys.argv[1:]:
    __import__(m)
t1 = time.perf_counter()
print(t1 - t0, rss() - r0, rss())
"""


def measure_imports(python: str, modules: tuple[str, ...], n: int = 5) -> tuple[float, float]:
    times, rss = [], []
    for _ in range(n):
        out = subprocess.run(
            [python, "-c", IMPORT_SNIPPET, *modules], capture_output=True, text=True, check=True
        ).stdout.split()
        times.append(float(out[0]))
        rss.append(float(out[1]))
    return statistics.median(times) * 1000, statistics.median(rss)


CLOSURE_SNIPPET = """
import json, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
def norm(n):
    return n.lower().replace('_', '-').replace('.', '-')
seen, todo, sizes = {}, list(sys.argv[1:]), {}
while todo:
    name = norm(todo.pop())
    if name in seen:
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        seen[name] = None
        continue
    seen[name] = dist.version
    sizes[name] = sum((f.size or 0) for f in (dist.files or []))
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({'extra': ''}):
            todo.append(req.name)
print(json.dumps({'versions': seen, 'sizes': sizes}))
"""


def closure(python: str, roots: Iterable[str]) -> dict[str, Any]:
    out = subprocess.run(
        [python, "-c", CLOSURE_SNIPPET, *roots], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout))


def runtime_closure() -> set[str]:
    dev = ROOT / ".venv" / "bin" / "python"
    if not dev.exists():
        return {"httpx", "httpcore", "h11", "anyio", "idna", "certifi", "sniffio"}
    return {n for n, v in closure(str(dev), ["dvs-agent"])["versions"].items() if v}


def wheel_sizes(wheels: Path) -> dict[str, float]:
    out = {}
    for whl in wheels.glob("*.whl"):
        name = whl.name.split("-")[0].lower().replace("_", "-")
        out[name] = whl.stat().st_size / MiB
    return out


# ---- load


def _us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m[1]) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7}[m[2]]


def wrk(port: int, threads: int, conns: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{conns}",
            f"-d{seconds:g}s",
            "--latency",
            "--timeout",
            "5s",
            f"http://127.0.0.1:{port}/small.json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if len(lat) != 2:
        raise RuntimeError(f"wrk on port {port}: no latency in\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),  # type: ignore[index]
        "requests": float(re.search(r"(\d+) requests in", out)[1]),  # type: ignore[index]
        "p50": _us(lat["50"]),
        "p99": _us(lat["99"]),
        "errors": float(errors + (int(non2xx[1]) if non2xx else 0)),
    }


# ---- streaming


def stream_big(port: int, rate: float | None, pid: int | None) -> dict[str, float]:
    """GET the 200 MiB file at ``rate`` bytes/s (None: as fast as possible); sample the RSS."""
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set() and pid is not None:
            peak[0] = max(peak[0], status_kib(pid, "VmRSS"))
            time.sleep(0.02)

    before = status_kib(pid, "VmRSS") if pid else 0.0
    if pid:
        reset_hwm(pid)
    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    got = 0
    head = b""
    with contextlib.suppress(OSError), socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        s.settimeout(60)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        got = len(rest)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
            if rate:
                ahead = got / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
    took = time.monotonic() - t0
    done.set()
    sampler.join()
    hwm = status_kib(pid, "VmHWM") if pid else 0.0
    ok = head.startswith(b"HTTP/1.1 200") and got == BIG_SIZE
    return {
        "ok": float(ok),
        "before": before,
        "peak": max(peak[0], hwm),
        "mib_s": got / MiB / took,
        "chunked": float(b"transfer-encoding: chunked" in head.lower()),
    }


# ---- the run


def _med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def load_and_stream(args: argparse.Namespace, targets: list[Target], report: list[str]) -> None:
    """Sections 4 (wrk) and 5 (200 MiB streams) of ``run``."""
    # 4. load
    for t in targets:
        if t.pid:
            t.idle = status_kib(t.pid, "VmRSS")
            reset_hwm(t.pid)
    print("warm-up…", flush=True)
    for t in targets:
        wrk(t.port, 2, 64, 2)
    configs = [("c1", 1, 1), ("c64", 2, 64)]
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for t in order:
            for key, threads_n, conns in configs if rnd % 2 == 0 else configs[::-1]:
                cpu0 = cpu_seconds(t.pid) if t.pid else 0.0
                r = wrk(t.port, threads_n, conns, args.duration)
                cpu = (cpu_seconds(t.pid) - cpu0) if t.pid else 0.0
                r["cpu_us"] = cpu / r["requests"] * 1e6 if r["requests"] else 0.0
                t.runs.setdefault(key, []).append(r)
                print(
                    f"round {rnd + 1} {t.name} {key}: {r['rps']:.0f} req/s "
                    f"p50 {r['p50']:.0f} us p99 {r['p99']:.0f} us",
                    flush=True,
                )
    for t in targets:
        if t.pid:
            t.peak = status_kib(t.pid, "VmHWM")
            t.after = status_kib(t.pid, "VmRSS")
    direct_p50 = _med(targets[0].runs["c1"], "p50")
    nginx_rps = _med(targets[1].runs["c64"], "rps")
    report.append(
        f"### Load: wrk on `/small.json` ({len(SMALL_BODY)} B), {args.duration:g} s per run, "
        f"median of {args.rounds} rounds\n"
    )
    report.append(
        "| target | c1 req/s | c1 p50 µs | c1 p99 µs | added p50 µs (≤ 1000) "
        "| c64 req/s | c64 p50 µs | c64 p99 µs | c64 / nginx (≥ 0.3) | CPU µs/req c64 "
        "| RSS idle MiB | peak MiB | growth MiB (≤ 10) | after MiB | errors |"
    )
    report.append("|---|" + "---:|" * 15)
    for t in targets:
        c1, c64 = t.runs["c1"], t.runs["c64"]
        added = _med(c1, "p50") - direct_p50
        ratio = _med(c64, "rps") / nginx_rps
        growth = t.peak - t.idle
        errors = sum(r["errors"] for r in c1 + c64)
        mem = (
            f"{t.idle:.1f} | {t.peak:.1f} | {growth:+.1f}"
            f" {'PASS' if growth <= 10 else 'MISS'} | {t.after:.1f}"
            if t.pid
            else "| | |"
        )
        report.append(
            f"| {t.name} | {_med(c1, 'rps'):.0f} | {_med(c1, 'p50'):.0f} "
            f"| {_med(c1, 'p99'):.0f} "
            f"| {added:+.0f} {'PASS' if added <= 1000 else 'MISS'} "
            f"| {_med(c64, 'rps'):.0f} | {_med(c64, 'p50'):.0f} | {_med(c64, 'p99'):.0f} "
            f"| {ratio:.2f} {'PASS' if ratio >= 0.3 else 'MISS'} "
            f"| {_med(c64, 'cpu_us') if t.pid else 0:.0f} | {mem} | {errors:.0f} |"
        )
    report.append(
        "\nRSS idle: after the functional checks, before any load; peak: `VmHWM` after "
        "the warm-up and every round (reset at idle); after: `VmRSS` at the end. nginx: its "
        "one worker.\n"
    )

    # 5. streaming
    print("streaming 200 MiB…", flush=True)
    report.append(
        f"### 200 MiB through the proxy: a slow reader ({args.slow_rate:g} MiB/s, 64 KiB "
        "receive buffer) and a fast one\n"
    )
    report.append(
        "| target | slow: ok | RSS before MiB | peak MiB | growth MiB (≤ 10) "
        "| fast: ok | growth MiB | MiB/s | chunked |"
    )
    report.append("|---|---|---:|---:|---:|---|---:|---:|---|")
    for t in targets:
        s = stream_big(t.port, args.slow_rate * MiB, t.pid)
        f = stream_big(t.port, None, t.pid)
        g = s["peak"] - s["before"]
        report.append(
            f"| {t.name} | {'ok' if s['ok'] else 'FAIL'} | {s['before']:.1f} "
            f"| {s['peak']:.1f} | {g:+.1f} {'PASS' if g <= 10 else 'MISS'} "
            f"| {'ok' if f['ok'] else 'FAIL'} | {f['peak'] - f['before']:+.1f} "
            f"| {f['mib_s']:.0f} | {'yes' if f['chunked'] else 'no'} |"
            if t.pid
            else f"| {t.name} | {'ok' if s['ok'] else 'FAIL'} | | | "
            f"| {'ok' if f['ok'] else 'FAIL'} | | {f['mib_s']:.0f} "
            f"| {'yes' if f['chunked'] else 'no'} |"
        )
    report.append("")
    report.append("### What each proxy wrote to stderr over the whole run (default logging)\n")
    report.append("| proxy | lines (most frequent exceptions) |")
    report.append("|---|---|")
    for t in targets[2:]:
        report.append(f"| {t.name} | {log_summary(t.name, f'127.0.0.1:{t.port}')} |")
    report.append("")


def run(args: argparse.Namespace) -> None:
    for tool in ("wrk", "nginx", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install wrk nginx-light curl")
    started = time.monotonic()
    python = args.python
    names = [n for n in STACKS if not args.only or n in args.only.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="proxy-stacks-"))
    LOG_DIR[:] = [tmp]
    www = tmp / "www"
    (www / "slow").mkdir(parents=True)
    (www / "small.json").write_bytes(SMALL_BODY)
    (www / "slow" / "mid.bin").write_bytes(os.urandom(MiB))
    block = os.urandom(MiB)
    with (www / "big.bin").open("wb") as f:
        for _ in range(0 if args.checks_only else BIG_SIZE // MiB):
            f.write(block)
    print(f"work dir {tmp}; python {python}", flush=True)
    up_port, nginx_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    targets: list[Target] = []
    report: list[str] = []
    try:
        upstream_nginx = start_nginx(
            tmp, "upstream", up_port, UPSTREAM_SERVER.format(port=up_port, www=www)
        )
        procs.append(upstream_nginx)
        proxy_nginx = start_nginx(
            tmp,
            "nginx-proxy",
            nginx_port,
            PROXY_SERVER.format(port=nginx_port, upstream=up_port, bearer=BEARER),
        )
        procs.append(proxy_nginx)
        upstream = f"http://127.0.0.1:{up_port}"
        targets.append(Target("direct", up_port))
        targets.append(Target("nginx", nginx_port, proxy_nginx, children(proxy_nginx.pid)[0]))
        for name in names:
            port = free_port()
            proc = start_proxy(python, name, f"127.0.0.1:{port}", upstream, args.max_body)
            procs.append(proc)
            targets.append(Target(name, port, proc, proc.pid))

        # 1. functional checks, TCP and unix socket
        print("functional checks…", flush=True)
        unix: dict[str, str] = {}
        for name in names:
            sock = str(tmp / f"{name}.sock")
            proc = start_proxy(python, name, f"unix:{sock}", upstream, args.max_body)
            unix[name] = unix_check(sock, up_port)
            code = stop(proc)
            if code != 0:
                unix[name] += f" (exit {code})"
        for t in targets[1:]:
            t.checks = functional_checks(t.port, up_port, args.max_body)
            t.checks["unix socket"] = unix.get(t.name, "n/a")
        checks = sorted({k for t in targets[1:] for k in t.checks})
        report.append("### Functional checks (TCP; the unix socket with `curl --unix-socket`)\n")
        report.append("| check | " + " | ".join(t.name for t in targets[1:]) + " |")
        report.append("|---|" + "---|" * (len(targets) - 1))
        for c in checks:
            row = [t.checks.get(c, "") for t in targets[1:]]
            report.append(f"| {c} | " + " | ".join(row) + " |")
        report.append(
            f"\n(nginx: the bench's `max_body` is not configured there; its default "
            f"`client_max_body_size` is 1 MiB, here `--max-body` = {args.max_body} bytes)\n"
        )

        # 2. default limits
        print("probing default limits…", flush=True)
        probes: dict[str, dict[str, str]] = {}
        slow: dict[str, tuple[str, str]] = {}
        threads = []
        for t in targets[1:]:
            probes[t.name] = {
                "10 KiB header": probe_header(t.port, 10 * 1024),
                "20 KiB header": probe_header(t.port, 20 * 1024),
                "64 KiB header": probe_header(t.port, 64 * 1024),
                "1 MiB header": probe_header(t.port, MiB),
                "200 headers x 40 B": probe_header(t.port, 40, 200),
            }
            flood = "64 MiB header, unterminated (a fresh process)"
            if t.name == "nginx" and t.pid:
                probes[t.name][flood] = probe_flood(t.port, t.pid)
            else:
                port = free_port()
                proc = start_proxy(python, t.name, f"127.0.0.1:{port}", upstream, args.max_body)
                probes[t.name][flood] = probe_flood(port, proc.pid)
                stop(proc)

            def slow_probe(t: Target = t) -> None:
                slow[t.name] = probe_slow(t.port, args.slow_seconds)

            threads.append(threading.Thread(target=slow_probe))
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for t in targets[1:]:
            probes[t.name]["idle connection"] = slow[t.name][0]
            probes[t.name]["headers at 1 byte/s"] = slow[t.name][1]
            if t.name != "nginx":
                probes[t.name]["SIGTERM mid-response"] = probe_drain(python, t.name, upstream)
        report.append("### What each server does by default\n")
        report.append("| probe | " + " | ".join(t.name for t in targets[1:]) + " |")
        report.append("|---|" + "---|" * (len(targets) - 1))
        for p in probes[targets[1].name] | probes[targets[-1].name]:
            row = [probes[t.name].get(p, "") for t in targets[1:]]
            report.append(f"| {p} | " + " | ".join(row) + " |")
        report.append("")

        # 3. imports and wheels
        print("imports and wheels…", flush=True)
        base = runtime_closure()
        sizes_whl = wheel_sizes(Path(args.wheels)) if args.wheels else {}
        report.append(
            "### Imports and new distributions (beyond the agent's runtime closure of "
            f"{len(base)})\n"
        )
        report.append(
            "| stack | import ms | RSS after import MiB | new distributions | installed MiB "
            "| wheels MiB |"
        )
        report.append("|---|---:|---:|---|---:|---:|")
        for name in names:
            stack = STACKS[name]
            ms, rss = measure_imports(python, stack.modules)
            c = closure(python, stack.roots)
            new = sorted(n for n, v in c["versions"].items() if v and n not in base)
            inst = sum(c["sizes"][n] for n in new) / MiB
            whl = sum(sizes_whl.get(n, 0.0) for n in new)
            listed = ", ".join(f"{n} {c['versions'][n]}" for n in new)
            report.append(
                f"| {name} | {ms:.0f} | +{rss:.1f} | {len(new)}: {listed} | {inst:.1f} | "
                + (f"{whl:.1f} |" if sizes_whl else "n/a |")
            )
        report.append("")

        if not args.checks_only:
            load_and_stream(args, targets, report)
    finally:
        for proc in reversed(procs):
            stop(proc)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    took = time.monotonic() - started
    report.insert(
        0,
        f"## Proxy stacks ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {took:.0f} s)\n",
    )
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"written to {args.out}")


def setup(args: argparse.Namespace) -> None:
    venv = Path(args.venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pkgs = ["httpx", "aiohttp", "uvicorn", "httptools", "uvloop", "packaging"]
    subprocess.run([py, "-m", "pip", "install", "--quiet", *pkgs], check=True)
    base = runtime_closure()
    roots = sorted({r for s in STACKS.values() for r in s.roots})
    c = closure(py, roots)
    new = [f"{n}=={v}" for n, v in c["versions"].items() if v and n not in base]
    wheels = venv / "wheels"
    subprocess.run(
        [py, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels), *new],
        check=True,
    )
    print(f"{venv}: run with {py} {Path(__file__).name} run --wheels {wheels}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("serve", help="run one candidate proxy")
    p.add_argument("--stack", choices=sorted(STACKS), required=True)
    p.add_argument("--listen", required=True, help="unix:/path or 127.0.0.1:PORT")
    p.add_argument("--upstream", required=True)
    p.add_argument("--max-body", type=int, default=10 * MiB)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("setup", help="create the candidates' venv")
    p.add_argument("--venv", default="/tmp/proxy-venv")
    p = sub.add_parser("run", help="the measurement (default)")
    p.add_argument("--python", default=sys.executable, help="runs the candidate proxies")
    p.add_argument("--only", default="", help="comma-separated stacks")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-body", type=int, default=MiB)
    p.add_argument("--slow-rate", type=float, default=40.0, help="MiB/s")
    p.add_argument("--slow-seconds", type=float, default=15.0)
    p.add_argument("--wheels", default="", help="the directory `setup` downloaded wheels to")
    p.add_argument("--out", default="")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 s runs, 1 round")
    p.add_argument("--checks-only", action="store_true", help="no load, no streaming")
    args = parser.parse_args()
    if args.cmd == "serve":
        serve(args)
    elif args.cmd == "setup":
        setup(args)
    else:
        if args.cmd is None:
            args = parser.parse_args(["run", *sys.argv[1:]])
        if args.quick:
            args.duration, args.rounds, args.slow_seconds = 2.0, 1, 4.0
        if args.wheels == "" and (Path(args.python).parent.parent / "wheels").is_dir():
            args.wheels = str(Path(args.python).parent.parent / "wheels")
        run(args)


if __name__ == "__main__":
    main()
