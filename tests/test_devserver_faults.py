"""The dev token server's hostile faults, over real sockets: trickle, endless, bombs, oversized
bodies, echoed secrets, hangs, and fault queues per client."""

from __future__ import annotations

import base64
import json
import re
import resource
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager

import httpx
import pytest

from agent.devserver import TOKEN_PATH, Fault, TokenServer
from tests.conftest import wait_for

CLIENT_ID = "client-1"
SECRET = "s3cret+/=echo"
OTHER_ID = "client-2"
OTHER_SECRET = "other-pw"
GRANT = {"grant_type": "client_credentials"}
MIB = 1024 * 1024


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with TokenServer(clients={CLIENT_ID: SECRET, OTHER_ID: OTHER_SECRET}) as srv:
        yield srv


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def post_token(
    http: httpx.Client, server: TokenServer, client_id: str = CLIENT_ID, secret: str = SECRET
) -> httpx.Response:
    return http.post(server.url, params=GRANT, headers=basic(client_id, secret))


def stream_token(
    http: httpx.Client, server: TokenServer, client_id: str = CLIENT_ID, secret: str = SECRET
) -> AbstractContextManager[httpx.Response]:
    # httpx decodes nothing in iter_raw: the bytes counted are the bytes on the wire
    headers = {**basic(client_id, secret), "Accept-Encoding": "gzip, deflate"}
    return http.stream("POST", server.url, params=GRANT, headers=headers)


def raw_request(
    server: TokenServer, client_id: str = CLIENT_ID, secret: str = SECRET
) -> socket.socket:
    """A token POST on a new raw socket (the answer is left to read)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    auth = basic(client_id, secret)["Authorization"]
    sock.sendall(
        (
            f"POST {TOKEN_PATH}?grant_type=client_credentials HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\nAuthorization: {auth}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    return sock


def read_answer(sock: socket.socket) -> tuple[bytes, bytes, list[tuple[float, int]]]:
    """A Content-Length answer: its head (with the blank line), its body, and for each recv the
    time and the number of bytes received so far."""
    data = b""
    arrivals: list[tuple[float, int]] = []
    while True:
        piece = sock.recv(65536)
        assert piece, f"connection closed after {data!r}"
        data += piece
        arrivals.append((time.monotonic(), len(data)))
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            assert match is not None
            if len(rest) >= int(match.group(1)):
                return head + sep, rest, arrivals


def arrived(arrivals: list[tuple[float, int]], offset: int) -> float:
    """When the byte at ``offset`` (0-based) arrived."""
    return next(at for at, total in arrivals if total > offset)


def handler_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "process_request_thread" in t.name}


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Read (and drop) until the server closes the connection; False if it stays open."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True  # reset
    return False


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# -- trickle -------------------------------------------------------------------------------------


def test_trickle_body_only(server: TokenServer) -> None:
    body = b'{"error": "slow"}'
    interval = 0.05
    server.enqueue(Fault.trickle(interval=interval, status=503, body=body))
    with raw_request(server) as sock:
        head, got, arrivals = read_answer(sock)
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"Content-Type: application/json" in head
    assert got == body
    # the status line and headers came at once, the body byte by byte after them
    assert arrivals[0][1] >= len(head)
    head_done = arrived(arrivals, len(head) - 1)
    last = arrived(arrivals, len(head) + len(body) - 1)
    assert last - head_done >= (len(body) - 1) * interval * 0.9
    assert len(arrivals) >= len(body) // 2
    assert [r.status for r in server.token_requests()] == [503]


def test_trickle_with_headers(server: TokenServer) -> None:
    interval = 0.01
    server.enqueue(Fault.trickle(interval=interval, headers=True, status=502, body=b"{}"))
    with raw_request(server) as sock:
        head, got, arrivals = read_answer(sock)
    assert head.startswith(b"HTTP/1.1 502 ")
    assert got == b"{}"
    first = arrivals[0][0]
    head_done = arrived(arrivals, len(head) - 1)
    assert head_done - first >= (len(head) - 1) * interval * 0.9
    assert sum(1 for _, total in arrivals if total <= len(head)) >= len(head) // 4


def test_trickle_default_mints_a_real_token(server: TokenServer) -> None:
    interval = 0.002
    server.enqueue(Fault.trickle(interval=interval))
    with raw_request(server) as sock:
        head, body, arrivals = read_answer(sock)
    assert head.startswith(b"HTTP/1.1 200 ")
    payload = json.loads(body)
    assert payload["token_type"] == "bearer"
    assert payload["access_token"] in server.issued()
    (recorded,) = server.token_requests()
    assert (recorded.status, recorded.access_token) == (200, payload["access_token"])
    span = arrived(arrivals, len(head) + len(body) - 1) - arrived(arrivals, len(head) - 1)
    assert span >= (len(body) - 1) * interval * 0.9


def test_trickle_ends_when_the_client_closes(server: TokenServer) -> None:
    before = handler_threads()
    server.enqueue(Fault.trickle(interval=0.05, headers=True))
    sock = raw_request(server)
    assert sock.recv(1)  # the first byte of the status line
    handlers = handler_threads() - before
    assert handlers
    sock.close()
    assert wait_for(lambda: not any(t.is_alive() for t in handlers), timeout=10)


# -- endless body --------------------------------------------------------------------------------


def test_endless_body(server: TokenServer, http: httpx.Client) -> None:
    before = handler_threads()
    server.enqueue(Fault.endless())
    received = 0
    start = b""
    with stream_token(http, server) as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["content-type"] == "application/json"
        assert "content-length" not in response.headers
        handlers = handler_threads() - before
        for piece in response.iter_raw():
            if len(start) < 64:
                start += piece[:64]
            received += len(piece)
            if received >= 8 * MIB:
                break
    assert start.startswith(b'{"access_token": "aaaa')
    assert received >= 8 * MIB
    assert [r.status for r in server.token_requests()] == [200]
    assert server.issued() == {}
    # closing the stream closed the connection: the server's loop ended
    assert handlers
    assert wait_for(lambda: not any(t.is_alive() for t in handlers), timeout=10)
    assert post_token(http, server).status_code == 200


# -- compression bomb ----------------------------------------------------------------------------


def inflate_counting(pieces: Iterator[bytes], wbits: int) -> tuple[int, bytes, bool]:
    """Decoded size, last KiB of the decoded data and whether the stream ended: decoded in
    pieces of at most 1 MiB, never held whole."""
    inflater = zlib.decompressobj(wbits)
    total, tail = 0, b""
    for piece in pieces:
        data = piece
        while data:
            out = inflater.decompress(data, MIB)
            total += len(out)
            tail = (tail + out)[-4096:]
            data = inflater.unconsumed_tail
    out = inflater.flush()
    total += len(out)
    tail = (tail + out)[-4096:]
    return total, tail, inflater.eof


@pytest.mark.parametrize(
    ("encoding", "wbits", "decoded"), [("gzip", 31, 1 << 30), ("deflate", 15, 64 * MIB)]
)
def test_compression_bomb(
    server: TokenServer, http: httpx.Client, encoding: str, wbits: int, decoded: int
) -> None:
    server.enqueue(Fault.compression_bomb(decoded_bytes=decoded, encoding=encoding))
    rss_before = max_rss_bytes()
    wire = 0

    def counted(response: httpx.Response) -> Iterator[bytes]:
        nonlocal wire
        for piece in response.iter_raw():
            wire += len(piece)
            yield piece

    with stream_token(http, server) as response:
        assert response.status_code == 200
        assert response.headers["content-encoding"] == encoding
        length = int(response.headers["content-length"])
        total, tail, ended = inflate_counting(counted(response), wbits)
    assert wire == length
    assert wire <= decoded // 1000 + 4096  # about 1 MB per GiB
    assert ended
    assert total == decoded
    token = json.loads(tail)["access_token"]  # the answer behind the spaces is a real token
    assert token in server.issued()
    assert server.token_requests()[0].access_token == token
    assert max_rss_bytes() - rss_before < 200 * MIB


def test_compression_bomb_is_compressed_once(server: TokenServer, http: httpx.Client) -> None:
    fault = Fault.compression_bomb(decoded_bytes=16 * MIB)
    server.enqueue(fault, fault)
    server.enqueue(Fault.compression_bomb(decoded_bytes=16 * MIB, encoding="deflate"))
    assert set(server._bombs) == {(16 * MIB, "gzip"), (16 * MIB, "deflate")}
    tokens = []
    for wbits in (31, 31, 15):
        with stream_token(http, server) as response:
            total, tail, ended = inflate_counting(response.iter_raw(), wbits)
        assert (total, ended) == (16 * MIB, True)
        tokens.append(json.loads(tail)["access_token"])
    assert len(set(tokens)) == 3
    assert set(tokens) <= set(server.issued())


def test_bomb_encoding_is_checked() -> None:
    with pytest.raises(ValueError, match="encoding"):
        Fault.compression_bomb(encoding="br")


# -- oversized body ------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_field", "size"), [(True, 100 * MIB), (False, 8 * MIB)])
def test_oversized_body(server: TokenServer, http: httpx.Client, in_field: bool, size: int) -> None:
    server.enqueue(Fault.oversized(total_bytes=size, in_field=in_field))
    rss_before = max_rss_bytes()
    received, head, last = 0, b"", b""
    filler = b"a" if in_field else b" "
    fillers = 0
    with stream_token(http, server) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert int(response.headers["content-length"]) == size
        for piece in response.iter_raw():
            received += len(piece)
            if len(head) < 4096:
                head += piece
            fillers += piece.count(filler)
            last = (last + piece)[-16:]
    assert received == size
    if in_field:
        start, sep, _ = head.partition(b'"padding": "')
        assert sep
        assert last.endswith(b'"}')
        padding = size - len(start) - len(sep) - 2
        assert fillers == padding + (start + sep).count(b"a")  # nothing but padding in between
        payload = json.loads(start + sep + b'"}')  # the whole body is this JSON, padded
    else:
        payload, end = json.JSONDecoder().raw_decode(head.decode())
        assert fillers >= size - end  # trailing whitespace: valid JSON too
    assert payload["token_type"] == "bearer"
    assert payload["expires_in"] == 86399
    token = payload["access_token"]
    assert token in server.issued()
    assert server.token_requests()[0].access_token == token
    assert max_rss_bytes() - rss_before < 64 * MIB


# -- echo ----------------------------------------------------------------------------------------


def test_echo_json_with_control_characters(server: TokenServer, http: httpx.Client) -> None:
    token = post_token(http, server).json()["access_token"]
    server.enqueue(Fault.echo())
    response = post_token(http, server)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="oauth"'
    body = response.json()
    assert body["error"] == "invalid_client"
    text = body["error_description"]
    assert SECRET in text
    assert basic(CLIENT_ID, SECRET)["Authorization"] in text
    assert token in text
    assert "\x1b[" in text
    assert "\r" in text
    assert "\n" in text
    assert [r.status for r in server.token_requests()] == [200, 401]


def test_echo_html_has_raw_control_characters(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.echo(status=502, token="given-token-123", html=True))
    response = post_token(http, server)
    assert response.status_code == 502
    assert response.headers["content-type"] == "text/html"
    raw = response.content
    assert b"<html>" in raw
    assert SECRET.encode() in raw
    assert basic(CLIENT_ID, SECRET)["Authorization"].encode() in raw
    assert b"given-token-123" in raw
    assert b"\x1b[31m" in raw
    assert b"\r\n" in raw


def test_echo_without_control_characters(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.echo(status=400, control_chars=False, token="t0k"))
    response = post_token(http, server)
    assert response.status_code == 400
    text = response.json()["error_description"]
    assert SECRET in text
    assert "t0k" in text
    assert not any(ord(c) < 32 for c in text)


# -- hang, and stop while a fault is being served ------------------------------------------------


def test_hang_is_recorded_and_stop_ends_it(server: TokenServer) -> None:
    before = handler_threads()
    server.enqueue(Fault.hang())
    with raw_request(server) as sock:
        assert server.wait_for_requests(1, timeout=10)
        assert [r.status for r in server.token_requests()] == [0]
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # no answer
        handlers = handler_threads() - before
        assert handlers
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 3
        assert wait_closed(sock)
    assert wait_for(lambda: not any(t.is_alive() for t in handlers), timeout=10)
    assert [r.status for r in server.token_requests()] == [0]


def test_hang_ends_when_the_client_closes(server: TokenServer, http: httpx.Client) -> None:
    before = handler_threads()
    server.enqueue(Fault.hang())
    sock = raw_request(server)
    assert server.wait_for_requests(1, timeout=10)
    handlers = handler_threads() - before
    assert handlers
    sock.close()
    assert wait_for(lambda: not any(t.is_alive() for t in handlers), timeout=10)
    assert post_token(http, server).status_code == 200


@pytest.mark.parametrize(
    "fault",
    [Fault.trickle(interval=30.0, headers=True), Fault.trickle(interval=30.0), Fault.endless()],
    ids=["trickle-headers", "trickle-body", "endless-unread"],
)
def test_stop_ends_an_answer_being_sent(fault: Fault) -> None:
    server = TokenServer(clients={CLIENT_ID: SECRET}).start()
    try:
        before = handler_threads()
        server.enqueue(fault)
        sock = raw_request(server)
        assert server.wait_for_requests(1, timeout=10)
        handlers = handler_threads() - before
        assert handlers
        time.sleep(0.2)  # the answer is under way (an unread endless body fills the buffers)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 3
        with sock:
            assert wait_closed(sock)
        assert wait_for(lambda: not any(t.is_alive() for t in handlers), timeout=10)
    finally:
        server.stop()


# -- per-client queues ---------------------------------------------------------------------------


def test_faults_per_client(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.hang(), Fault.endless(), Fault.http_status(503), client_id=CLIENT_ID)
    server.enqueue(Fault.http_status(502))  # global: taken by whoever asks when it is next
    hanging = raw_request(server)
    try:
        assert server.wait_for_requests(1, timeout=10, client_id=CLIENT_ID)
        with stream_token(http, server) as endless:
            assert endless.status_code == 200
            assert endless.headers["transfer-encoding"] == "chunked"
            chunks = endless.iter_raw()
            assert next(chunks)
            # meanwhile, client B is served: the global fault first, then normally
            with httpx.Client(timeout=10) as other:
                assert post_token(other, server, OTHER_ID, OTHER_SECRET).status_code == 502
                healthy = post_token(other, server, OTHER_ID, OTHER_SECRET)
                assert healthy.status_code == 200
            read = 0
            for piece in chunks:
                read += len(piece)
                if read >= MIB:
                    break
    finally:
        hanging.close()
    assert post_token(http, server).status_code == 503  # A's own queue
    assert post_token(http, server).status_code == 200  # both queues empty
    assert [r.status for r in server.token_requests(client_id=CLIENT_ID)] == [0, 200, 503, 200]
    assert [r.status for r in server.token_requests(client_id=OTHER_ID)] == [502, 200]
    assert len(server.token_requests()) == 6
    assert set(server.issued()) == {
        healthy.json()["access_token"],
        server.token_requests(client_id=CLIENT_ID)[-1].access_token,
    }


def test_own_queue_before_global_and_clear(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.http_status(500))
    server.enqueue(Fault.http_status(429), client_id=CLIENT_ID)
    server.enqueue(Fault.http_status(418), client_id="nobody-asks")
    assert post_token(http, server).status_code == 429
    assert post_token(http, server).status_code == 500
    assert post_token(http, server).status_code == 200
    server.enqueue(Fault.http_status(503), client_id=CLIENT_ID)
    server.enqueue(Fault.http_status(503), client_id=OTHER_ID)
    server.clear()
    assert post_token(http, server).status_code == 200
    assert post_token(http, server, OTHER_ID, OTHER_SECRET).status_code == 200
    assert server.token_requests(client_id="nobody-asks") == []
