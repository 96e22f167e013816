"""The dev token server's rate limit and per-client counts (issue 13), over real HTTP."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from agent.devserver import COUNTS_PATH, ClientCounts, Fault, TokenServer

CLIENT_ID = "client-1"
SECRET = "s3cret"
OTHER_ID = "client-2"
OTHER_SECRET = "other-s3cret"
GRANT = {"grant_type": "client_credentials"}


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with TokenServer(clients={CLIENT_ID: SECRET, OTHER_ID: OTHER_SECRET}, rate_limit=3) as srv:
        yield srv


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


def post(
    http: httpx.Client, server: TokenServer, client_id: str = CLIENT_ID, secret: str = SECRET
) -> httpx.Response:
    return http.post(server.url, params=GRANT, headers=basic(client_id, secret))


def test_over_the_limit_is_429_with_retry_after_and_no_token(
    server: TokenServer, http: httpx.Client
) -> None:
    answers = [post(http, server) for _ in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    refused = answers[3]
    assert refused.json() == {"error": "rate_limited", "error_description": "rate limited"}
    assert refused.headers["retry-after"] == "1"  # the window is one second
    assert len(server.issued()) == 3
    assert server.client_counts(CLIENT_ID) == ClientCounts(
        requests=5, tokens_issued=3, rate_limited=2
    )


def test_the_window_slides_and_refusals_do_not_fill_it(
    server: TokenServer, http: httpx.Client
) -> None:
    assert [post(http, server).status_code for _ in range(3)] == [200, 200, 200]
    # refused requests while the window is full do not push its end further out
    for _ in range(5):
        assert post(http, server).status_code == 429
    deadline = time.monotonic() + 5
    while post(http, server).status_code == 429:
        assert time.monotonic() < deadline, "the window never slid"
        time.sleep(0.05)
    counts = server.client_counts(CLIENT_ID)
    assert counts.tokens_issued == 4
    assert counts.requests == counts.tokens_issued + counts.rate_limited


def test_the_limit_is_per_client(server: TokenServer, http: httpx.Client) -> None:
    for _ in range(3):
        assert post(http, server).status_code == 200
    assert post(http, server).status_code == 429
    assert post(http, server, OTHER_ID, OTHER_SECRET).status_code == 200
    assert server.client_counts(OTHER_ID) == ClientCounts(requests=1, tokens_issued=1)


def test_a_refused_request_consumes_no_fault(server: TokenServer, http: httpx.Client) -> None:
    for _ in range(3):
        assert post(http, server).status_code == 200
    server.enqueue(Fault(status=503))
    assert post(http, server).status_code == 429
    deadline = time.monotonic() + 5
    while (answer := post(http, server)).status_code == 429:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert answer.status_code == 503  # the queued fault waited for an admitted request


def test_the_limit_changes_while_running(server: TokenServer, http: httpx.Client) -> None:
    for _ in range(3):
        assert post(http, server).status_code == 200
    assert post(http, server).status_code == 429
    server.rate_limit = None
    assert [post(http, server).status_code for _ in range(6)] == [200] * 6
    server.rate_limit = 1
    assert [post(http, server).status_code for _ in range(2)] == [200, 429]


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_a_bad_limit_is_refused(value: object) -> None:
    server = TokenServer(clients={CLIENT_ID: SECRET})
    with pytest.raises((TypeError, ValueError)):
        server.rate_limit = value  # type: ignore[assignment]


def test_no_limit_by_default(http: httpx.Client) -> None:
    with TokenServer(clients={CLIENT_ID: SECRET}) as server:
        assert server.rate_limit is None
        assert {post(http, server).status_code for _ in range(20)} == {200}
        assert server.client_counts(CLIENT_ID).tokens_issued == 20


def test_counts_401s_reuse_and_unreadable_credentials(http: httpx.Client) -> None:
    with TokenServer(clients={CLIENT_ID: SECRET}, reuse_tokens=True) as server:
        assert post(http, server).status_code == 200
        assert post(http, server).status_code == 200  # the same token again
        assert post(http, server, CLIENT_ID, "wrong").status_code == 401
        server.enqueue(Fault(status=401))
        assert post(http, server).status_code == 401
        assert http.post(server.url, params=GRANT).status_code == 401  # no credentials
        assert server.client_counts(CLIENT_ID) == ClientCounts(
            requests=4, tokens_issued=1, tokens_reused=1, unauthorized=2
        )
        assert server.counts()[""] == ClientCounts(requests=1, unauthorized=1)


def test_concurrent_requests_never_exceed_the_limit(server: TokenServer) -> None:
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def one() -> None:
        with httpx.Client(timeout=5) as client:
            start.wait()
            status = post(client, server).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(statuses) == [200] * 3 + [429] * 9
    assert server.client_counts(CLIENT_ID).tokens_issued == 3


def test_counts_over_http_and_reset(server: TokenServer, http: httpx.Client) -> None:
    for _ in range(4):
        post(http, server)
    post(http, server, OTHER_ID, OTHER_SECRET)
    assert server.counts_url.endswith(COUNTS_PATH)
    document = http.get(server.counts_url).json()
    assert document["rate_limit"] == 3
    assert document["clients"][CLIENT_ID] == {
        "requests": 4,
        "tokens_issued": 3,
        "tokens_reused": 0,
        "rate_limited": 1,
        "unauthorized": 0,
    }
    assert document["total"]["requests"] == 5
    assert document["total"]["tokens_issued"] == 4
    # the introspection requests are neither recorded nor counted
    assert len(server.token_requests()) == 5
    assert http.get(server.counts_url).json() == document
    # DELETE answers the counts and resets them at once
    assert http.delete(server.counts_url).json() == document
    assert server.counts() == {}
    assert http.post(server.counts_url).status_code == 405
    # clear() keeps the counts
    post(http, server, OTHER_ID, OTHER_SECRET)
    server.clear()
    assert server.client_counts(OTHER_ID).requests == 1
