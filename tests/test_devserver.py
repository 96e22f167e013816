"""The dev token server, over real HTTP: the seed's endpoint, reuse mode, faults, records."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote_plus

import httpx
import pytest

from agent.devserver import Fault, TokenServer

CLIENT_ID = "client-1"
SECRET = "s3cret"
GRANT = {"grant_type": "client_credentials"}


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with TokenServer(clients={CLIENT_ID: SECRET}) as srv:
        yield srv


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


def post_token(
    http: httpx.Client,
    server: TokenServer,
    client_id: str = CLIENT_ID,
    secret: str = SECRET,
    timeout: float = 5.0,
) -> httpx.Response:
    return http.post(server.url, params=GRANT, headers=basic(client_id, secret), timeout=timeout)


def assert_invalid_client(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.json() == {
        "error": "invalid_client",
        "error_description": "Bad client credentials",
    }
    assert response.headers["www-authenticate"] == 'Basic realm="oauth"'


# -- the seed's endpoint -------------------------------------------------------------------------


def test_url_and_port(server: TokenServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/v1/oauth/token"


def test_200_has_the_seed_shape(server: TokenServer, http: httpx.Client) -> None:
    response = post_token(http, server)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope", "extensions"}
    assert uuid.UUID(body["access_token"]).version == 4
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 86399
    assert body["scope"] == "read write"
    assert body["extensions"] == {"provider_slug": "br-gamma"}


def test_fresh_token_each_time_by_default(server: TokenServer, http: httpx.Client) -> None:
    first = post_token(http, server).json()
    second = post_token(http, server).json()
    assert first["access_token"] != second["access_token"]
    assert second["expires_in"] == 86399


def test_per_client_slug_and_runtime_expires_in(server: TokenServer, http: httpx.Client) -> None:
    server.add_client("tenant-2", "pw", provider_slug="mx-delta")
    server.expires_in = 120
    body = post_token(http, server, "tenant-2", "pw").json()
    assert body["extensions"] == {"provider_slug": "mx-delta"}
    assert body["expires_in"] == 120


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_non_post_is_405(server: TokenServer, http: httpx.Client, method: str) -> None:
    response = http.request(method, server.url, params=GRANT, headers=basic(CLIENT_ID, SECRET))
    assert response.status_code == 405
    assert response.text == "Method Not Allowed"
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["allow"] == "POST"


def test_other_paths_are_404_json(server: TokenServer, http: httpx.Client) -> None:
    response = http.post(server.url.replace("/v1/oauth/token", "/oauth/token"), params=GRANT)
    assert response.status_code == 404
    assert response.json()["error"] == "Not Found"
    assert server.token_requests() == []


def test_missing_grant_type_is_400(server: TokenServer, http: httpx.Client) -> None:
    response = http.post(server.url, headers=basic(CLIENT_ID, SECRET))
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "Missing grant_type",
    }


def test_other_grant_type_is_400(server: TokenServer, http: httpx.Client) -> None:
    response = http.post(
        server.url, params={"grant_type": "password"}, headers=basic(CLIENT_ID, SECRET)
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


def test_query_mode_ignores_a_form_body(server: TokenServer, http: httpx.Client) -> None:
    response = http.post(server.url, data=GRANT, headers=basic(CLIENT_ID, SECRET))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        basic(CLIENT_ID, "wrong"),
        basic("nobody", SECRET),
    ],
    ids=["none", "bearer", "garbled", "no-colon", "wrong-secret", "unknown-id"],
)
def test_bad_credentials_are_401(
    server: TokenServer, http: httpx.Client, headers: dict[str, str]
) -> None:
    assert_invalid_client(http.post(server.url, params=GRANT, headers=headers))
    assert server.issued() == {}


def test_revoked_client_is_401(server: TokenServer, http: httpx.Client) -> None:
    assert post_token(http, server).status_code == 200
    server.revoke(CLIENT_ID)
    assert_invalid_client(post_token(http, server))
    assert len(server.issued()) == 1  # tokens issued remain recorded


def test_set_secret_rejects_the_old_one(server: TokenServer, http: httpx.Client) -> None:
    old_token = post_token(http, server).json()["access_token"]
    server.set_secret(CLIENT_ID, "rotated")
    assert_invalid_client(post_token(http, server))
    new_token = post_token(http, server, secret="rotated").json()["access_token"]
    issued = server.issued()
    assert issued[old_token].client_secret == SECRET
    assert issued[new_token].client_secret == "rotated"
    assert issued[new_token].client_id == CLIENT_ID


def test_issued_records_times(server: TokenServer, http: httpx.Client) -> None:
    before = time.time()
    token = post_token(http, server).json()["access_token"]
    record = server.issued()[token]
    assert before <= record.issued_at <= time.time()
    assert record.expires_at == pytest.approx(record.issued_at + 86399)


# -- body mode (RFC 6749 §4.4) -------------------------------------------------------------------


def test_body_mode_accepts_form_and_decodes_credentials(http: httpx.Client) -> None:
    client_id, secret = "id:with space", "p+ss/w%rd=&"
    with TokenServer(clients={client_id: secret}, accept_body_grant=True) as server:
        headers = basic(quote_plus(client_id), quote_plus(secret))
        response = http.post(
            server.url, data={"grant_type": "client_credentials", "scope": "read"}, headers=headers
        )
        assert response.status_code == 200
        assert response.json()["scope"] == "read"
        (recorded,) = server.token_requests()
        assert recorded.client_id == client_id
        assert recorded.client_secret == secret
        assert recorded.headers["content-type"] == "application/x-www-form-urlencoded"
        assert recorded.body == b"grant_type=client_credentials&scope=read"
        # the query shape still works against a standard server
        assert http.post(server.url, params=GRANT, headers=headers).status_code == 200
        # credentials sent without the form-encoding do not match
        assert_invalid_client(http.post(server.url, data=GRANT, headers=basic(client_id, secret)))


def test_body_mode_rejects_unknown_scope(http: httpx.Client) -> None:
    with TokenServer(clients={CLIENT_ID: SECRET}, accept_body_grant=True) as server:
        data = {"grant_type": "client_credentials", "scope": "admin"}
        response = http.post(server.url, data=data, headers=basic(CLIENT_ID, SECRET))
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_scope"


def test_query_mode_takes_credentials_as_they_are(server: TokenServer, http: httpx.Client) -> None:
    server.add_client("a%2Bb", "x+y")
    assert post_token(http, server, "a%2Bb", "x+y").status_code == 200
    assert_invalid_client(post_token(http, server, "a+b", "x y"))


# -- Spring-style reuse --------------------------------------------------------------------------


def test_reuse_returns_the_same_token_until_it_expires(http: httpx.Client) -> None:
    with TokenServer(clients={CLIENT_ID: SECRET}, reuse_tokens=True, expires_in=2) as server:
        first = post_token(http, server).json()
        assert first["expires_in"] == 2
        issued_at = server.issued()[first["access_token"]].issued_at

        def sleep_until(offset: float) -> None:
            time.sleep(max(0.0, issued_at + offset - time.time()))

        sleep_until(0.3)
        second = post_token(http, server).json()
        assert second["access_token"] == first["access_token"]
        assert second["expires_in"] == 1  # whole seconds left, floored
        sleep_until(1.3)
        third = post_token(http, server).json()
        assert third["access_token"] == first["access_token"]
        assert third["expires_in"] == 0  # its last second
        sleep_until(2.05)
        fourth = post_token(http, server).json()
        assert fourth["access_token"] != first["access_token"]
        assert fourth["expires_in"] == 2
        assert set(server.issued()) == {first["access_token"], fourth["access_token"]}


def test_reuse_is_per_client_and_switchable(server: TokenServer, http: httpx.Client) -> None:
    server.add_client("other", "pw")
    server.reuse_tokens = True
    mine = post_token(http, server).json()["access_token"]
    theirs = post_token(http, server, "other", "pw").json()["access_token"]
    assert mine != theirs
    assert post_token(http, server).json()["access_token"] == mine
    server.reuse_tokens = False
    assert post_token(http, server).json()["access_token"] != mine


# -- faults --------------------------------------------------------------------------------------


def test_status_faults_are_consumed_in_order(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.http_status(503), Fault.http_status(502), Fault.http_status(500))
    statuses = [post_token(http, server).status_code for _ in range(4)]
    assert statuses == [503, 502, 500, 200]
    assert [r.status for r in server.token_requests()] == statuses
    assert len(server.issued()) == 1


def test_429_with_retry_after(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.http_status(429, retry_after="3"))
    response = post_token(http, server)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert post_token(http, server).status_code == 200


def test_fault_defaults_mimic_the_server(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.http_status(401), Fault.http_status(405))
    assert_invalid_client(post_token(http, server))
    response = post_token(http, server)
    assert (response.status_code, response.text) == (405, "Method Not Allowed")
    assert response.headers["allow"] == "POST"


def test_json_body_fault(server: TokenServer, http: httpx.Client) -> None:
    payload = {"access_token": "abc", "token_type": "bearer", "scope": "read write"}
    server.enqueue(Fault.json_body(payload))
    response = post_token(http, server)
    assert response.status_code == 200
    assert response.json() == payload
    assert server.token_requests()[0].access_token == "abc"
    assert server.issued() == {}


def test_malformed_json_fault(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.malformed_json())
    response = post_token(http, server)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(ValueError):
        response.json()


def test_html_fault(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.html(502))
    response = post_token(http, server)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "<html>" in response.text


def test_delay_fault_times_the_client_out(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault(status=200, delay=2.0))
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        post_token(http, server, timeout=0.3)
    assert time.monotonic() - started < 1.5
    # recorded on arrival, without an answer yet
    assert [r.status for r in server.token_requests()] == [0]
    assert server.wait_for_requests(1, timeout=0)
    assert post_token(http, server).status_code == 200  # the next request is served at once
    assert [r.status for r in server.token_requests()] == [0, 200]


def test_slow_fault_then_normal_answer(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault.slow(0.4))
    started = time.monotonic()
    response = post_token(http, server)
    assert time.monotonic() - started >= 0.4
    assert response.status_code == 200
    assert response.json()["access_token"] in server.issued()
    (recorded,) = server.token_requests()  # the arrival record was replaced by the answer
    assert (recorded.status, recorded.access_token) == (200, response.json()["access_token"])


def test_drop_connection_fault(server: TokenServer, http: httpx.Client) -> None:
    server.enqueue(Fault(drop_connection=True))
    with pytest.raises(httpx.TransportError):
        post_token(http, server)
    assert server.token_requests()[0].status == 0
    assert post_token(http, server).status_code == 200


def test_clear_forgets_requests_and_faults(server: TokenServer, http: httpx.Client) -> None:
    post_token(http, server)
    server.enqueue(Fault.http_status(503))
    server.clear()
    assert server.requests() == []
    assert post_token(http, server).status_code == 200
    assert len(server.issued()) == 2


# -- records, events, lifecycle ------------------------------------------------------------------


def test_recorded_request(server: TokenServer, http: httpx.Client) -> None:
    before = time.time()
    token = post_token(http, server).json()["access_token"]
    http.get(server.url)
    requests = server.requests()
    assert [r.method for r in requests] == ["POST", "GET"]
    (recorded,) = server.token_requests()
    assert recorded.path == "/v1/oauth/token"
    assert recorded.query == {"grant_type": ["client_credentials"]}
    assert recorded.body == b""
    assert "content-type" not in recorded.headers
    assert recorded.headers["authorization"].startswith("Basic ")
    assert (recorded.client_id, recorded.client_secret) == (CLIENT_ID, SECRET)
    assert recorded.status == 200
    assert recorded.access_token == token
    assert before <= recorded.received_at <= time.time()
    assert requests[1].status == 405
    assert requests[1].access_token is None


def test_wait_for_requests(server: TokenServer, http: httpx.Client) -> None:
    assert not server.wait_for_requests(1, timeout=0.05)
    post_token(http, server)
    assert server.wait_for_requests(1, timeout=1)


def test_on_event_never_shows_the_secret(http: httpx.Client) -> None:
    lines: list[str] = []
    with TokenServer(clients={CLIENT_ID: SECRET}, on_event=lines.append) as server:
        token = post_token(http, server).json()["access_token"]
        post_token(http, server, secret="wrong-secret")
    assert len(lines) == 2
    assert token[:8] in lines[0]
    assert token not in lines[0]
    assert "rejected" in lines[1]
    assert all(SECRET not in line and "wrong-secret" not in line for line in lines)


def test_stop_then_start_again_on_the_same_port(http: httpx.Client) -> None:
    server = TokenServer(clients={CLIENT_ID: SECRET}).start()
    try:
        port = server.port
        assert post_token(http, server).status_code == 200  # leaves a keep-alive connection
        server.stop()
        with pytest.raises(httpx.TransportError):
            post_token(http, server)
        server.start()
        assert server.port == port
        assert post_token(http, server).status_code == 200
    finally:
        server.stop()
