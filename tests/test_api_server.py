"""The test "DVS API" (tests/api_server.py) over real HTTP, against a real TokenServer."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.devserver import TokenServer
from tests.api_server import ApiServer, pattern, pattern_sha256
from tests.conftest import CLIENT_ID, CLIENT_SECRET

MiB = 1024 * 1024


def mint(server: TokenServer) -> str:
    """A token from the token server, asked for as the agent asks (query grant, Basic)."""
    answer = httpx.post(
        server.url,
        params={"grant_type": "client_credentials"},
        auth=(CLIENT_ID, CLIENT_SECRET),
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(server: TokenServer) -> Iterator[ApiServer]:
    with ApiServer(server) as srv:
        yield srv


@pytest.fixture
def token(server: TokenServer) -> str:
    return mint(server)


@pytest.fixture
def client(api: ApiServer, token: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, headers=bearer(token), timeout=10) as c:
        yield c


def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_pattern_helpers() -> None:
    assert pattern(4) == b"\x00\x01\x02\x03"
    assert pattern(3, offset=254) == b"\xfe\xff\x00"
    body = pattern(300_001)
    assert pattern_sha256(len(body)) == hashlib.sha256(body).hexdigest()
    assert pattern_sha256(0) == hashlib.sha256(b"").hexdigest()


def test_url_and_port(api: ApiServer) -> None:
    assert api.url == f"http://127.0.0.1:{api.port}"


def test_echo_get_with_query_and_headers(client: httpx.Client, api: ApiServer, token: str) -> None:
    answer = client.get("/echo?a=1&b=%2Fx%20y", headers={"X-Keep": "yes", "x-Lower": "Mixed"})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    echo = answer.json()
    assert echo["method"] == "GET"
    assert echo["path"] == "/echo"
    assert echo["query"] == "a=1&b=%2Fx%20y"  # as sent, not decoded
    assert ["X-Keep", "yes"] in echo["headers"]
    assert ["x-Lower", "Mixed"] in echo["headers"]
    assert ["Authorization", f"Bearer {token}"] in echo["headers"]
    assert echo["body_len"] == 0
    assert echo["body_sha256"] == hashlib.sha256(b"").hexdigest()
    [rec] = api.requests()
    assert (rec.method, rec.path, rec.query, rec.bearer, rec.status) == (
        "GET",
        "/echo",
        "a=1&b=%2Fx%20y",
        token,
        200,
    )
    assert rec.header("x-keep") == ["yes"]
    assert rec.rejected is None
    api.clear()
    assert api.requests() == []


def test_echo_bodies_content_length_and_chunked(client: httpx.Client, api: ApiServer) -> None:
    body = b"x" * 100_000
    echo = client.post("/echo", content=body).json()
    assert (echo["method"], echo["body_len"]) == ("POST", len(body))
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()

    pieces = [b"abc", b"", b"d" * 70_000, b"efg"]  # httpx sends an iterator chunked
    echo = client.put("/echo", content=iter(pieces)).json()
    names = {n.lower(): v for n, v in echo["headers"]}
    assert names["transfer-encoding"] == "chunked"
    joined = b"".join(pieces)
    assert (echo["method"], echo["body_len"]) == ("PUT", len(joined))
    assert echo["body_sha256"] == hashlib.sha256(joined).hexdigest()
    assert [r.body_len for r in api.requests()] == [len(body), len(joined)]


def test_chunked_with_extensions_and_trailers(api: ApiServer, token: str) -> None:
    request = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    head, _, body = raw_exchange(api.port, request).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    echo = json.loads(body)
    assert echo["body_len"] == 5
    assert echo["body_sha256"] == hashlib.sha256(b"abcde").hexdigest()


def test_bad_chunked_body_is_400_and_closes(api: ApiServer, token: str) -> None:
    request = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    )
    answer = raw_exchange(api.port, request)  # returns: the server closed the connection
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in answer
    assert api.requests()[0].status == 400


def test_upload_chunked_is_hashed_incrementally(client: httpx.Client) -> None:
    block = bytes(range(256)) * 4096  # 1 MiB

    def body() -> Iterator[bytes]:
        for _ in range(32):
            yield block

    answer = client.post("/upload", content=body())
    assert answer.status_code == 200
    digest = hashlib.sha256(block * 32).hexdigest()
    assert answer.json() == {"body_len": 32 * MiB, "body_sha256": digest}


def test_stream_200_mib_chunked(client: httpx.Client) -> None:
    size = 200 * MiB
    digest = hashlib.sha256()
    received = 0
    with client.stream("GET", f"/stream?bytes={size}") as answer:
        assert answer.status_code == 200
        assert answer.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in answer.headers
        for piece in answer.iter_raw(1 << 20):
            digest.update(piece)
            received += len(piece)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)


def test_stream_with_length_and_odd_chunk(client: httpx.Client) -> None:
    answer = client.get("/stream?bytes=1000003&chunk=1000&length=1")
    assert answer.status_code == 200
    assert answer.headers["content-length"] == "1000003"
    assert answer.content == pattern(1000003)
    assert client.get("/stream?bytes=0").content == b""
    assert client.get("/stream").status_code == 400  # bytes= is required


def test_redirect_is_not_followed_here(client: httpx.Client) -> None:
    answer = client.get("/redirect?to=https%3A%2F%2Fexample.invalid%2Fx")
    assert answer.status_code == 302
    assert answer.headers["location"] == "https://example.invalid/x"
    assert client.get("/redirect?to=/echo&status=307").status_code == 307
    assert client.get("/redirect").status_code == 400


@pytest.mark.parametrize("status", [200, 201, 404, 418, 429, 500, 503])
def test_status(client: httpx.Client, status: int) -> None:
    answer = client.get(f"/status/{status}")
    assert answer.status_code == status
    assert answer.json()["status"] == status


def test_status_without_body_and_bad_ones(client: httpx.Client) -> None:
    answer = client.get("/status/204")
    assert (answer.status_code, answer.content) == (204, b"")
    assert "content-length" not in answer.headers
    assert "content-type" not in answer.headers
    assert client.get("/status/304").status_code == 304
    assert client.get("/status/99").status_code == 400
    assert client.get("/status/abc").status_code == 400
    assert client.get("/nowhere").status_code == 404


def test_status_401_counts(client: httpx.Client, api: ApiServer) -> None:
    assert client.get("/status/401").status_code == 401
    assert api.count_401 == 1


def test_head_has_no_body(client: httpx.Client) -> None:
    answer = client.head("/stream?bytes=1000&length=1")
    assert answer.status_code == 200
    assert answer.headers["content-length"] == "1000"
    assert answer.content == b""
    assert client.get("/hello").text == "hello\n"  # the connection is still in step


def test_slow(client: httpx.Client) -> None:
    began = time.monotonic()
    answer = client.get("/slow?seconds=0.3")
    assert answer.status_code == 200
    assert time.monotonic() - began >= 0.3


def test_stop_ends_slow_answers_and_idle_connections(server: TokenServer, token: str) -> None:
    api = ApiServer(server).start()
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            httpx.get(f"{api.url}/slow?seconds=30", headers=bearer(token), timeout=20)
        except httpx.HTTPError as exc:
            errors.append(exc)

    idle = socket.create_connection(("127.0.0.1", api.port), timeout=5)
    idle.sendall(
        f"GET /hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")  # and now idle, kept alive
    thread = threading.Thread(target=slow)
    thread.start()
    assert api.wait_for_requests(1)
    time.sleep(0.2)  # the slow request is in its wait
    began = time.monotonic()
    api.stop()
    thread.join(timeout=5)
    assert idle.recv(65536) == b""  # shut down by stop()
    idle.close()
    assert not thread.is_alive()
    assert time.monotonic() - began < 3
    assert len(errors) == 1
    assert [r.status for r in api.requests() if r.path == "/slow"] == [0]


def test_headers_big(client: httpx.Client, api: ApiServer, token: str) -> None:
    answer = client.get("/headers-big?bytes=8000")  # h11 refuses heads over 16 KiB
    assert answer.status_code == 200
    assert answer.headers["x-big"] == "a" * 8000
    request = (
        f"GET /headers-big?bytes=200000 HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    head = raw_exchange(api.port, request.encode()).partition(b"\r\n\r\n")[0]
    assert b"\r\nX-Big: " + b"a" * 200000 + b"\r\n" in head


def test_response_headers(client: httpx.Client) -> None:
    answer = client.get("/response-headers?Set-Cookie=a%3D1&Set-Cookie=b%3D2&X-Up=1")
    assert answer.status_code == 200
    assert answer.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert answer.headers["x-up"] == "1"


def test_hello_and_keep_alive(api: ApiServer, token: str) -> None:
    one = f"GET /hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    last = one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer = raw_exchange(api.port, one + one + last)  # pipelined, one connection
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert answer.count(b"\r\n\r\nhello\n") == 3
    assert b"Content-Type: text/plain\r\n" in answer
    assert [r.path for r in api.requests()] == ["/hello"] * 3


def test_http_1_0_gets_a_length(api: ApiServer, token: str) -> None:
    request = f"GET /stream?bytes=1000 HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n"
    head, _, body = raw_exchange(api.port, request.encode()).partition(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head
    assert b"chunked" not in head
    assert body == pattern(1000)


# -- the bearer check -------------------------------------------------------------------------


def test_missing_token(api: ApiServer) -> None:
    answer = httpx.get(f"{api.url}/echo")
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == 'Bearer realm="dvs-api"'
    assert answer.json()["error"] == "invalid_token"
    [rec] = api.requests()
    assert (rec.bearer, rec.rejected, rec.status) == (None, "missing", 401)
    assert api.count_401 == 1


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        ("Bearer 00000000-0000-0000-0000-000000000000", "unknown"),
        ("Basic dXNlcjpwYXNz", "malformed"),
        ("Bearer", "malformed"),
    ],
)
def test_rejected_tokens(api: ApiServer, authorization: str, reason: str) -> None:
    answer = httpx.get(f"{api.url}/hello", headers={"Authorization": authorization})
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert answer.json()["error"] == "invalid_token"
    assert api.requests()[0].rejected == reason


def test_revoked_token(client: httpx.Client, api: ApiServer, token: str) -> None:
    assert client.get("/hello").status_code == 200
    api.revoke(token)
    answer = client.get("/hello")
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert api.requests()[-1].rejected == "revoked"


def test_expired_token(server: TokenServer, api: ApiServer) -> None:
    server.expires_in = 0  # expires_at = issued_at: expired at once
    token = mint(server)
    answer = httpx.get(f"{api.url}/hello", headers=bearer(token))
    assert answer.status_code == 401
    assert api.requests()[0].rejected == "expired"


def test_two_authorization_headers_are_400(api: ApiServer, token: str) -> None:
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    answer = httpx.get(f"{api.url}/hello", headers=headers)
    assert answer.status_code == 400
    assert answer.headers["www-authenticate"] == 'Bearer error="invalid_request"'
    assert api.requests()[0].rejected == "several"


def test_fail_next_with_401(client: httpx.Client, api: ApiServer) -> None:
    api.fail_next_with_401(2)
    assert api.pending_401s == 2
    assert [client.get("/hello").status_code for _ in range(3)] == [401, 401, 200]
    assert api.count_401 == 2
    assert [r.rejected for r in api.requests()] == ["forced", "forced", None]
    assert httpx.get(f"{api.url}/hello").status_code == 401  # not consumed by a bad one
    api.fail_next_with_401(1)
    assert httpx.get(f"{api.url}/hello").status_code == 401
    assert api.pending_401s == 1


def test_accept_without_token_server() -> None:
    with ApiServer() as api:
        assert httpx.get(f"{api.url}/hello", headers=bearer("t1")).status_code == 401
        api.accept("t1")
        api.accept("t2", expires_at=time.time() - 1)
        assert httpx.get(f"{api.url}/hello", headers=bearer("t1")).status_code == 200
        assert httpx.get(f"{api.url}/hello", headers=bearer("t2")).status_code == 401
        assert api.requests()[-1].rejected == "expired"


def test_check_tokens_off() -> None:
    with ApiServer(check_tokens=False, record=False) as api:
        assert httpx.get(f"{api.url}/hello", headers=bearer("anything")).status_code == 200
        assert httpx.get(f"{api.url}/hello").status_code == 401
        assert api.requests() == []
        assert api.count_401 == 1


def test_tls(server: TokenServer, token: str, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", str(key)),
            *("-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with ApiServer(server, tls=context) as api:
        assert api.url.startswith("https://127.0.0.1:")
        verify = ssl.create_default_context(cafile=str(cert))
        answer = httpx.get(f"{api.url}/hello", headers=bearer(token), verify=verify)
        assert answer.text == "hello\n"
