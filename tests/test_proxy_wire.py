"""The proxy's HTTP/1.1 wire in-process (agent.proxy.edge and agent.proxy.upstream): what a
client or an upstream may do on a connection that the higher-level tests do not: pipelining,
half-closes, HEAD, 1xx, chunked and close-delimited answers, HTTP/1.0 clients, idle upstream
connections that the upstream closed, smuggling attempts and floods of pipelined requests."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import httpx
import pytest

from tests.api_server import ApiServer, pattern_sha256, tls_context
from tests.test_proxy_service import Scripted, _serve, _spec

Handler = Callable[[socket.socket, bytes], None]


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer() as upstream:
        yield upstream


class _Acceptor:
    """A loopback TCP server handing each connection to :meth:`_one` on a thread."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.heads: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawUpstream(_Acceptor):
    """An upstream that answers each request head with ``handler(conn, head)`` (raw bytes),
    keeping the connection for the next request until the handler closes it."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        super().__init__()

    def _one(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                self.heads.append(head)
                try:
                    self.handler(conn, head)
                except OSError:
                    return
                if conn.fileno() == -1:
                    return


@contextlib.contextmanager
def _proxy(
    api: ApiServer,
    *,
    upstream: str | None = None,
    ca_bundle: str | None = None,
    tokens: Scripted | None = None,
    **keys: object,
) -> Iterator[int]:
    """A proxy service with one listener (to ``upstream``, default ``api``): its port; it is
    stopped at the end."""
    spec, url = _spec(api, **keys)
    if upstream is not None:
        spec = dataclasses.replace(spec, upstream=upstream, ca_bundle=ca_bundle)
    service = _serve(tokens or Scripted(api), spec)
    try:
        yield int(url.rsplit(":", 1)[1])
    finally:
        service.stop(2.0)


def _raw(upstream: RawUpstream) -> str:
    return f"http://127.0.0.1:{upstream.port}"


def _exchange(port: int, data: bytes, *, shut: bool = False, wait: float = 5.0) -> bytes:
    """Send ``data`` raw and read until the proxy closes the connection (or ``wait``)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(data)
        if shut:
            conn.shutdown(socket.SHUT_WR)
        conn.settimeout(wait)
        out = b""
        try:
            while chunk := conn.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def _host(port: int) -> bytes:
    return b"Host: 127.0.0.1:%d\r\n" % port


def test_pipelined_requests_are_answered_in_order(api: ApiServer) -> None:
    with _proxy(api) as port:
        requests = b"".join(
            b"GET /status/%d HTTP/1.1\r\n" % status + _host(port) + b"\r\n"
            for status in (201, 202, 203)
        )
        out = _exchange(
            port, requests + b"GET /echo HTTP/1.1\r\n" + _host(port) + b"Connection: close\r\n\r\n"
        )
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
        assert statuses == [b"201", b"202", b"203", b"200"], out[:300]


def test_a_flood_of_pipelined_requests_is_served_one_by_one(api: ApiServer) -> None:
    with _proxy(api) as port:
        one = b"GET /status/204 HTTP/1.1\r\n" + _host(port) + b"\r\n"
        out = _exchange(
            port,
            one * 2000 + b"GET /echo HTTP/1.1\r\n" + _host(port) + b"Connection: close\r\n\r\n",
            wait=30,
        )
        assert out.count(b"HTTP/1.1 204 ") == 2000
        assert out.count(b"HTTP/1.1 200 ") == 1


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(
    api: ApiServer,
) -> None:
    with _proxy(api) as port:
        out = _exchange(
            port, b"GET /slow?seconds=0.3 HTTP/1.1\r\n" + _host(port) + b"\r\n", shut=True
        )
        assert out.startswith(b"HTTP/1.1 200 "), out
        assert b"Connection: close" in out


def test_head_answers_carry_the_length_and_no_body_and_the_connection_is_reused(
    api: ApiServer,
) -> None:
    with _proxy(api) as port:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=10) as client:
            head = client.head("/stream?bytes=5000&length=1")
            assert head.status_code == 200 and head.headers["Content-Length"] == "5000"
            assert head.content == b""
            after = client.get("/stream?bytes=5000&length=1")
            assert after.status_code == 200 and len(after.content) == 5000


def test_chunked_answers_are_rechunked_for_http11_and_close_delimited_for_http10(
    api: ApiServer,
) -> None:
    with _proxy(api) as port:
        size = 300_000
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            answer = client.get(f"/stream?bytes={size}")  # chunked by the upstream
            assert answer.headers.get("Transfer-Encoding") == "chunked"
            assert hashlib.sha256(answer.content).hexdigest() == pattern_sha256(size)
        old = _exchange(port, b"GET /stream?bytes=%d HTTP/1.0\r\n" % size + _host(port) + b"\r\n")
        head, body = old.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" not in head.lower()
        assert b"Connection: close" in head
        assert hashlib.sha256(body).hexdigest() == pattern_sha256(size)


def test_a_close_delimited_answer_reaches_the_client_whole(api: ApiServer) -> None:
    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"z" * 100_000)
        conn.close()

    with (
        RawUpstream(handler) as upstream,
        _proxy(api, upstream=_raw(upstream)) as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        for _ in range(2):  # the upstream connection is not reused
            answer = client.get("/x")
            assert answer.status_code == 200 and answer.content == b"z" * 100_000
        assert upstream.connections == 2


def test_early_hints_are_skipped_and_an_unasked_upgrade_is_a_502(api: ApiServer) -> None:
    def handler(conn: socket.socket, head: bytes) -> None:
        if head.startswith(b"GET /hints"):
            conn.sendall(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            )
        else:
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
            )

    with (
        RawUpstream(handler) as upstream,
        _proxy(api, upstream=_raw(upstream)) as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        hints = client.get("/hints")
        assert hints.status_code == 200 and hints.content == b"ok"
        upgrade = client.get("/upgrade")
        assert upgrade.status_code == 502 and "not valid HTTP" in upgrade.json()["error"]


def test_an_idle_connection_the_upstream_closed_is_not_a_502(api: ApiServer) -> None:
    """The upstream closes each connection quietly after its answer (its keep-alive timeout):
    the next request must not fail on the dead pooled connection."""

    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        time.sleep(0.1)
        conn.close()

    with (
        RawUpstream(handler) as upstream,
        _proxy(api, upstream=_raw(upstream)) as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        for _ in range(5):
            answer = client.get("/x")
            assert answer.status_code == 200, answer.text
            time.sleep(0.3)


def test_a_reused_connection_closed_unanswered_is_retried_once_for_idempotent_requests(
    api: ApiServer,
) -> None:
    """The upstream takes a request on a kept-alive connection and closes it without an
    answer (it timed the connection out as the request came): a GET goes again on a new
    connection, a POST gets the 502 (it may have been acted on)."""
    answered: list[bytes] = []

    def handler(conn: socket.socket, head: bytes) -> None:
        if answered:
            conn.close()  # every second request on a connection: dropped unanswered
            return
        answered.append(head)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with (
        RawUpstream(handler) as upstream,
        _proxy(api, upstream=_raw(upstream)) as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        assert client.get("/first").status_code == 200
        answered.clear()
        again = client.get("/second")  # on the kept connection: dropped, then retried
        assert again.status_code == 200, again.text
        post = client.post("/third", content=b"x")
        assert post.status_code == 502
        assert "closed the connection without an answer" in post.json()["error"]


def test_both_content_length_and_transfer_encoding_is_a_400(api: ApiServer) -> None:
    with _proxy(api) as port:
        smuggle = (
            b"POST /upload HTTP/1.1\r\n" + _host(port) + b"Content-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo HTTP/1.1\r\n\r\n"
        )
        out = _exchange(port, smuggle)
        assert out.startswith(b"HTTP/1.1 400 "), out
        assert out.count(b"HTTP/1.1 ") == 1
        assert api.requests() == []


def test_an_upgrade_request_is_forwarded_without_upgrading_then_closed(api: ApiServer) -> None:
    with _proxy(api) as port:
        out = _exchange(
            port,
            b"GET /echo HTTP/1.1\r\n"
            + _host(port)
            + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        assert out.startswith(b"HTTP/1.1 200 "), out
        [seen] = api.requests()
        assert not seen.header("Upgrade")


def test_a_large_401_that_is_not_replayed_comes_back_whole(api: ApiServer) -> None:
    """A 401 is held while the proxy decides on a replay; its body beyond what is held stays
    in the upstream's socket and is relayed once the decision is to pass it back."""
    big = b"e" * 300_000

    def handler(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % len(big) + big)

    tokens = Scripted(api, mint=False)  # a renewal brings the same token: no replay
    with (
        RawUpstream(handler) as upstream,
        _proxy(api, upstream=_raw(upstream), tokens=tokens) as port,
    ):
        answer = httpx.get(f"http://127.0.0.1:{port}/x", timeout=10)
        assert answer.status_code == 401 and answer.content == big
        assert tokens.renewals == 1


def test_a_held_chunked_body_reaches_the_upstream_with_its_length(api: ApiServer) -> None:
    with _proxy(api) as port:
        url = f"http://127.0.0.1:{port}"

        def body() -> Iterator[bytes]:
            yield b"a" * 1000
            yield b"b" * 1000

        answer = httpx.post(url + "/upload", content=body(), timeout=10)
        assert answer.json()["body_len"] == 2000
        [seen] = api.requests()
        assert seen.header("Content-Length") == ["2000"] and not seen.header("Transfer-Encoding")


class ConnectProxy(_Acceptor):
    """A forward proxy that speaks only CONNECT: it records each request head, then pipes."""

    def _one(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                conn.close()
                return
            head += data
        self.heads.append(head)
        target = head.split(b" ")[1].decode()
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
        pipe(upstream, conn)


def test_an_https_upstream_is_reached_through_the_connect_tunnel_of_https_proxy(
    api: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_cert, context = tls_context(tmp_path)
    forward = ConnectProxy()
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:p%40ss@127.0.0.1:{forward.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with ApiServer(tls=context, check_tokens=False) as tls_api, forward:
        upstream = tls_api.url.replace("http://", "https://")
        with (
            _proxy(api, upstream=upstream, ca_bundle=str(ca_cert)) as port,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
        ):
            for _ in range(3):  # the tunnelled connection is kept alive and reused
                answer = client.get("/echo?via=tunnel")
                assert answer.status_code == 200, answer.text
                assert answer.json()["query"] == "via=tunnel"
    [head] = forward.heads
    assert head.startswith(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n" % tls_api.port)
    assert b"Proxy-Authorization: Basic dXNlcjpwQHNz\r\n" in head  # user:p@ss
    [seen] = {r.header("Host")[0] for r in tls_api.requests()}
    assert seen == f"127.0.0.1:{tls_api.port}"


def test_a_forward_proxy_that_refuses_the_tunnel_is_a_502_naming_it(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")

    forward = RawUpstream(refuse)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{forward.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with forward, _proxy(api, upstream="https://api.example.test") as port:
        answer = httpx.get(f"http://127.0.0.1:{port}/x", timeout=10)
        assert answer.status_code == 502
        error = answer.json()["error"]
        assert f"forward proxy 127.0.0.1:{forward.port}" in error and "407" in error, error


def test_a_streamed_body_that_stalls_is_a_408_while_the_upstream_waits(api: ApiServer) -> None:
    """The body's sender waits for the client while the exchange waits for the upstream's
    answer: each has its own deadline (client_timeout for the body)."""
    with _proxy(api, client_timeout="1s", request_timeout="30s") as port:
        head = (
            b"POST /upload HTTP/1.1\r\n" + _host(port) + b"Content-Length: %d\r\n\r\n" % (3 << 20)
        )
        began = time.monotonic()
        out = _exchange(port, head + b"x" * (2 << 20), wait=10)
        assert out.startswith(b"HTTP/1.1 408 "), out[:200]
        assert time.monotonic() - began < 6


def test_an_answer_nobody_asked_for_is_never_given_to_the_next_request(api: ApiServer) -> None:
    """An upstream that sends a second, unasked-for answer on a kept-alive connection (a
    desync): the connection is dropped, the next client gets the answer to its own request."""

    def handler(conn: socket.socket, head: bytes) -> None:
        path = head.split(b" ")[1]
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(path) + path)
        time.sleep(0.2)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")

    with (
        RawUpstream(handler) as upstream,
        _proxy(api, upstream=_raw(upstream)) as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        assert client.get("/one").content == b"/one"
        time.sleep(0.5)  # the unasked-for answer has come
        assert client.get("/two").content == b"/two"
        assert upstream.connections == 2


def test_an_upstream_that_trickles_its_answer_head_is_a_504_at_request_timeout(
    api: ApiServer,
) -> None:
    """request_timeout bounds the whole wait for the answer's head: bytes that come one by
    one do not extend it."""

    def handler(conn: socket.socket, head: bytes) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 100:
            conn.sendall(bytes([byte]))
            time.sleep(0.1)

    with (
        RawUpstream(handler) as upstream,
        _proxy(api, upstream=_raw(upstream), request_timeout="1s") as port,
    ):
        began = time.monotonic()
        answer = httpx.get(f"http://127.0.0.1:{port}/x", timeout=20)
        assert answer.status_code == 504 and "request_timeout (1s)" in answer.json()["error"]
        assert time.monotonic() - began < 5
