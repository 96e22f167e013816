"""The token client against the project's own token server, over real HTTP (DESIGN §2, §9).

Every test talks to a :class:`TokenServer` on 127.0.0.1: nothing in httpx is patched and no
MockTransport is used (the server produces every answer these tests need). Retries are made fast
with a short :class:`RetryPolicy` and a 0.5 s timeout; waits that are part of the contract
(``Retry-After``) are checked as lower bounds only, never as speed limits.

Every test runs with the ``agent``, ``httpx`` and ``httpcore`` loggers at DEBUG, and no client
secret, Basic header or token (issued by the server or planted in a fault) may appear in a log
record or in the message of a raised error.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote_plus

import pytest

from agent.devserver import TOKEN_PATH, Fault, TokenServer
from agent.errors import (
    AgentError,
    AuthServerUnavailable,
    CredentialsRejected,
    RequestRejected,
)
from agent.models import Credentials, Secret, Token
from agent.oauth import Fetched, RetryPolicy, TokenClient

pytestmark = pytest.mark.timeout(60)

CLIENT_ID = "acme-clinic-01"
#: ':' '+' '&' '%' ' ' '/' '=' '?' '#': everything that form-encoding or a naive split would change
SECRET = "s3:cr+et&va%20lue/=?# ~!*"
NEW_SECRET = "n3w:r0tated+&%2Bsecret"
WRONG_SECRET = "wr0ng:secret+&%x"
OTHER_WRONG_SECRET = "an0ther:wr0ng+&%y"
#: a client id that form-encoding changes too (body mode only: in query mode ':' is ambiguous)
BODY_CLIENT_ID = "acme:clinic+01"
PLAIN_CLIENT_ID = "plain-client"
PLAIN_SECRET = "plainsecretvalue42"

ALL_SECRETS = (SECRET, NEW_SECRET, WRONG_SECRET, OTHER_WRONG_SECRET, PLAIN_SECRET)
ALL_CLIENT_IDS = (CLIENT_ID, BODY_CLIENT_ID, PLAIN_CLIENT_ID)

FAST = RetryPolicy(initial_seconds=0.01, max_seconds=0.05)
TIMEOUT = timedelta(seconds=0.5)
LIFETIME = 86399  # the test server's default expires_in, as the seed's


# -- helpers and fixtures ------------------------------------------------------------------------


def creds(secret: str = SECRET, client_id: str = CLIENT_ID, version: str = "1") -> Credentials:
    return Credentials(client_id, Secret(secret), "env", version)


def basic_b64(client_id: str, secret: str, *, form: bool = False) -> str:
    if form:
        client_id, secret = quote_plus(client_id), quote_plus(secret)
    return base64.b64encode(f"{client_id}:{secret}".encode()).decode("ascii")


def decode_basic(header: str) -> str:
    scheme, _, value = header.partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(value, validate=True).decode("utf-8")


MISSING: Any = object()


def token_body(access_token: Any, **overrides: Any) -> dict[str, Any]:
    """A 200 body of the seed's shape; an override of ``MISSING`` removes the field."""
    body: dict[str, Any] = {
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": 3600,
        "scope": "read write",
        "extensions": {"provider_slug": "br-gamma"},
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not MISSING}


class Servers:
    """Starts token servers for one test and stops them after it."""

    def __init__(self) -> None:
        self.all: list[TokenServer] = []

    def __call__(self, clients: dict[str, str] | None = None, **kwargs: Any) -> TokenServer:
        server = TokenServer(clients=clients or {CLIENT_ID: SECRET}, **kwargs).start()
        self.all.append(server)
        return server


class Guard:
    """Checks that no secret, Basic header or token shows in logs or error messages."""

    def __init__(self, caplog: pytest.LogCaptureFixture, servers: Servers) -> None:
        self.caplog = caplog
        self.servers = servers
        self.planted: set[str] = set()

    def plant(self, suffix: str = "") -> str:
        """A distinctive token value to put in a fault's body (it must never be shown)."""
        token = f"planted-{uuid.uuid4()}{suffix}"
        self.planted.add(token)
        return token

    def forbidden(self) -> set[str]:
        values = set(ALL_SECRETS) | self.planted
        for server in self.servers.all:
            values |= set(server.issued())
        for client_id in ALL_CLIENT_IDS:
            for secret in ALL_SECRETS:
                values.add(basic_b64(client_id, secret))
                values.add(basic_b64(client_id, secret, form=True))
                values.add(quote_plus(secret))
        return values

    def records(self) -> list[logging.LogRecord]:
        """Every record of this test so far: caplog.records alone is only the current phase."""
        seen: dict[int, logging.LogRecord] = {}
        for when in ("setup", "call"):
            seen.update((id(r), r) for r in self.caplog.get_records(when))
        seen.update((id(r), r) for r in self.caplog.records)
        return list(seen.values())

    def assert_clean(self, exc: BaseException | None = None) -> None:
        texts: list[tuple[str, str]] = [
            (f"log record {r.name}:{r.levelname}", f"{r.getMessage()}\n{r.__dict__!r}")
            for r in self.records()
        ]
        if exc is not None:
            texts.append(("str(exc)", str(exc)))
            texts.append(("repr(exc)", repr(exc)))
        leaks = [where for value in self.forbidden() for where, text in texts if value in text]
        # the values themselves are not printed: the assertion message must not leak either
        assert not leaks, f"a secret or token leaked into: {sorted(set(leaks))}"

    def raises(
        self, error: type[AgentError], exit_code: int, call: Callable[[], object]
    ) -> AgentError:
        with pytest.raises(error) as info:
            call()
        exc = info.value
        assert type(exc) is error
        assert exc.exit_code == exit_code
        self.assert_clean(exc)
        return exc


class OnRetry(logging.Handler):
    """Calls ``action`` once, when the client logs its first ``token_retry`` warning."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__(logging.DEBUG)
        self._action: Callable[[], None] | None = action

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "token_retry" and self._action is not None:
            action, self._action = self._action, None
            action()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # trust_env is on in the client: a proxy in the environment must not carry loopback tests
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)


@pytest.fixture
def servers() -> Iterator[Servers]:
    made = Servers()
    yield made
    for server in made.all:
        server.stop()


@pytest.fixture
def server(servers: Servers) -> TokenServer:
    return servers()


@pytest.fixture(autouse=True)
def guard(caplog: pytest.LogCaptureFixture, servers: Servers) -> Iterator[Guard]:
    for name in ("agent", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    checker = Guard(caplog, servers)
    yield checker
    checker.assert_clean()


@pytest.fixture
def make_client() -> Iterator[Callable[..., TokenClient]]:
    made: list[TokenClient] = []

    def make(url: str, **kwargs: Any) -> TokenClient:
        kwargs.setdefault("policy", FAST)
        kwargs.setdefault("timeout", TIMEOUT)
        client = TokenClient(token_url=url, profile="dvs", **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., TokenClient], server: TokenServer) -> TokenClient:
    return make_client(server.url)


def retry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "token_retry"]


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the request on the wire ---------------------------------------------------------------------


def test_query_mode_wire_shape(client: TokenClient, server: TokenServer) -> None:
    fetched = client.fetch(creds())

    [request] = server.token_requests()
    assert request.method == "POST"
    assert request.path == TOKEN_PATH
    assert request.query == {"grant_type": ["client_credentials"]}
    # the id and secret as they are (the seed's samples): no form-encoding in query mode
    assert decode_basic(request.headers["authorization"]) == f"{CLIENT_ID}:{SECRET}"
    assert request.client_id == CLIENT_ID
    assert request.client_secret == SECRET
    assert request.body == b""
    assert "content-type" not in request.headers
    assert request.status == 200
    assert fetched.requests == 1


def test_query_mode_sends_scope_beside_grant_type(
    make_client: Callable[..., TokenClient], server: TokenServer
) -> None:
    fetched = make_client(server.url, scope="read write").fetch(creds())

    [request] = server.token_requests()
    assert request.query == {"grant_type": ["client_credentials"], "scope": ["read write"]}
    assert request.body == b""
    assert "content-type" not in request.headers
    assert fetched.token.scope == "read write"


@pytest.mark.parametrize("scope", [None, "read write"])
def test_body_mode_wire_shape(
    make_client: Callable[..., TokenClient], servers: Servers, scope: str | None
) -> None:
    server = servers(clients={BODY_CLIENT_ID: SECRET}, accept_body_grant=True)
    client = make_client(server.url, grant_type_location="body", scope=scope)

    fetched = client.fetch(creds(client_id=BODY_CLIENT_ID))

    [request] = server.token_requests()
    assert request.method == "POST"
    assert request.path == TOKEN_PATH
    assert request.query == {}
    assert request.headers["content-type"].split(";")[0] == "application/x-www-form-urlencoded"
    expected_form = {"grant_type": ["client_credentials"]}
    if scope:
        expected_form["scope"] = [scope]
    assert parse_qs(request.body.decode("ascii"), keep_blank_values=True) == expected_form
    # RFC 6749 §2.3.1: form-url-encoded before base64; the server decodes them back
    raw = decode_basic(request.headers["authorization"])
    assert raw == f"{quote_plus(BODY_CLIENT_ID)}:{quote_plus(SECRET)}"
    assert raw != f"{BODY_CLIENT_ID}:{SECRET}"
    assert (request.client_id, request.client_secret) == (BODY_CLIENT_ID, SECRET)
    assert request.status == 200
    assert fetched.token.access_token.reveal() in server.issued()


def test_the_leak_check_sees_debug_logs_of_httpx_and_httpcore(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    # the no-secret checks of every test would be vacuous if these records were not captured
    server.enqueue(Fault.http_status(503))
    client.fetch(creds())

    names = {(r.name.split(".")[0], r.levelno) for r in guard.records()}
    assert ("httpcore", logging.DEBUG) in names
    assert ("httpx", logging.INFO) in names
    assert ("agent", logging.WARNING) in names
    guard.assert_clean()


# -- 200 -----------------------------------------------------------------------------------------


def test_valid_200_gives_a_token(client: TokenClient, server: TokenServer) -> None:
    given = creds()
    before = datetime.now(UTC)
    fetched = client.fetch(given)
    after = datetime.now(UTC)

    assert isinstance(fetched, Fetched)
    assert fetched.reused is False
    assert fetched.requests == 1
    assert fetched.credentials is given
    token = fetched.token
    issued = server.issued()
    assert list(issued) == [token.access_token.reveal()]
    assert token.token_type == "bearer"
    assert token.expires_in == LIFETIME
    assert token.scope == "read write"
    assert token.extensions == {"provider_slug": "br-gamma"}
    assert token.provider_slug == "br-gamma"
    # obtained_at is read before the request is sent, expiry counted from it
    assert before <= token.obtained_at <= after
    assert token.obtained_at.tzinfo is not None
    assert token.expires_at == token.obtained_at + timedelta(seconds=LIFETIME)
    [request] = server.token_requests()
    assert token.obtained_at.timestamp() <= request.received_at
    assert token.expires_at.timestamp() <= issued[token.access_token.reveal()].expires_at


def test_provider_slug_and_lifetime_come_from_the_answer(
    client: TokenClient, server: TokenServer
) -> None:
    server.add_client(CLIENT_ID, SECRET, provider_slug="mx-delta")
    server.expires_in = 120

    token = client.fetch(creds()).token

    assert token.provider_slug == "mx-delta"
    assert token.expires_in == 120
    assert token.lifetime == timedelta(seconds=120)


def test_obtained_at_comes_from_the_clock_before_sending(
    make_client: Callable[..., TokenClient], server: TokenServer
) -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    token = make_client(server.url, clock=lambda: moment).fetch(creds()).token

    assert token.obtained_at == moment
    assert token.expires_at == moment + timedelta(seconds=LIFETIME)


@pytest.mark.parametrize("token_type", ["Bearer", "BEARER", "bEaReR"])
def test_token_type_is_compared_case_insensitively_and_normalised(
    client: TokenClient, server: TokenServer, guard: Guard, token_type: str
) -> None:
    planted = guard.plant()
    server.enqueue(Fault.json_body(token_body(planted, token_type=token_type)))

    fetched = client.fetch(creds())

    assert fetched.token.token_type == "bearer"
    assert fetched.token.access_token.reveal() == planted
    assert len(server.token_requests()) == 1


def test_a_token_of_exactly_64_kib_is_accepted(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    planted = guard.plant()
    big = (planted + "A" * (64 * 1024))[: 64 * 1024]
    guard.planted.add(big)
    server.enqueue(Fault.json_body(token_body(big)))

    assert client.fetch(creds()).token.access_token.reveal() == big


# -- 5xx, timeouts, connection errors -------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried_then_unavailable(
    client: TokenClient,
    server: TokenServer,
    guard: Guard,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    server.enqueue(*[Fault.http_status(status)] * 10)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 4
    message = str(exc)
    assert f"answered {status}" in message
    assert "server_error" in message
    assert "after 4 request(s)" in message
    assert isinstance(exc, AuthServerUnavailable)
    assert exc.retry_after is None
    retries = retry_records(caplog)
    assert [getattr(r, "attempt", None) for r in retries] == [1, 2, 3]
    assert all(r.levelno == logging.WARNING for r in retries)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_twice_then_200_succeeds(client: TokenClient, server: TokenServer, status: int) -> None:
    server.enqueue(Fault.http_status(status), Fault.http_status(status))

    fetched = client.fetch(creds())

    assert [r.status for r in server.token_requests()] == [status, status, 200]
    assert fetched.requests == 3
    assert fetched.token.access_token.reveal() in server.issued()


def test_timeout_is_retried_then_unavailable(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(*[Fault.slow(3.0)] * 4)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    # each slow request is recorded on arrival, before the client gives up on it
    assert len(server.token_requests()) == 4
    assert "timeout" in str(exc)
    assert "0.5s" in str(exc)
    assert "after 4 request(s)" in str(exc)


def test_timeout_then_answer_succeeds(client: TokenClient, server: TokenServer) -> None:
    server.enqueue(Fault.slow(3.0))

    fetched = client.fetch(creds())

    assert len(server.token_requests()) == 2
    assert fetched.requests == 2


def test_stopped_server_is_retried_then_unavailable(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.stop()

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert server.token_requests() == []
    assert "cannot reach" in str(exc)
    assert "ConnectError" in str(exc)
    assert "after 4 request(s)" in str(exc)


def test_closed_port_is_retried_then_unavailable(
    make_client: Callable[..., TokenClient], guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{closed_port()}{TOKEN_PATH}"

    exc = guard.raises(AuthServerUnavailable, 69, lambda: make_client(url).fetch(creds()))

    assert "cannot reach" in str(exc)
    assert "ConnectError" in str(exc)
    assert "after 4 request(s)" in str(exc)
    assert len(retry_records(caplog)) == 3


def test_connection_refused_then_server_back_succeeds(
    make_client: Callable[..., TokenClient], server: TokenServer
) -> None:
    server.stop()
    logger = logging.getLogger("agent.oauth.test-restart")
    handler = OnRetry(server.start)  # the server is back during the first backoff
    logger.addHandler(handler)
    try:
        fetched = make_client(server.url, logger=logger).fetch(creds())
    finally:
        logger.removeHandler(handler)

    assert fetched.requests == 2
    assert len(server.token_requests()) == 1


def test_dropped_connection_is_retried_then_unavailable(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(*[Fault.drop()] * 4)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert [r.status for r in server.token_requests()] == [0, 0, 0, 0]
    assert "cannot reach" in str(exc)
    assert "RemoteProtocolError" in str(exc)
    assert "after 4 request(s)" in str(exc)


def test_dropped_connection_then_answer_succeeds(client: TokenClient, server: TokenServer) -> None:
    server.enqueue(Fault.drop())

    fetched = client.fetch(creds())

    assert [r.status for r in server.token_requests()] == [0, 200]
    assert fetched.requests == 2


# -- protocol errors (a 200 that is not a valid token answer) --------------------------------------

PROTOCOL_ERRORS: list[tuple[str, Callable[[str], Fault], str]] = [
    ("malformed-json", lambda t: Fault.malformed_json(), "not JSON"),
    ("html-200", lambda t: Fault.html(200), "text/html"),
    ("json-array", lambda t: Fault.json_body([token_body(t)]), "not an object"),
    ("token-missing", lambda t: Fault.json_body(token_body(MISSING)), "access_token"),
    ("token-empty", lambda t: Fault.json_body(token_body("")), "access_token"),
    ("token-not-string", lambda t: Fault.json_body(token_body(12345)), "access_token"),
    ("token-space", lambda t: Fault.json_body(token_body(t + " x")), "RFC 6750"),
    ("token-quote", lambda t: Fault.json_body(token_body(t + '"x')), "RFC 6750"),
    (
        "token-over-64k",
        lambda t: Fault.json_body(token_body((t + "A" * 65537)[:65537])),
        "RFC 6750",
    ),
    ("token-type-mac", lambda t: Fault.json_body(token_body(t, token_type="mac")), "'mac'"),
    (
        "token-type-missing",
        lambda t: Fault.json_body(token_body(t, token_type=MISSING)),
        "token_type",
    ),
    (
        "expires-in-missing",
        lambda t: Fault.json_body(token_body(t, expires_in=MISSING)),
        "expires_in",
    ),
    (
        "expires-in-string",
        lambda t: Fault.json_body(token_body(t, expires_in="3600")),
        "expires_in '3600'",
    ),
    (
        "expires-in-float",
        lambda t: Fault.json_body(token_body(t, expires_in=3600.5)),
        "expires_in 3600.5",
    ),
    ("expires-in-zero", lambda t: Fault.json_body(token_body(t, expires_in=0)), "expires_in 0"),
    (
        "expires-in-negative",
        lambda t: Fault.json_body(token_body(t, expires_in=-5)),
        "expires_in -5",
    ),
    (
        "expires-in-true",
        lambda t: Fault.json_body(token_body(t, expires_in=True)),
        "expires_in True",
    ),
]


@pytest.mark.parametrize(
    ("make_fault", "hint"),
    [pytest.param(f, h, id=name) for name, f, h in PROTOCOL_ERRORS],
)
def test_protocol_error_is_retried_like_5xx(
    client: TokenClient,
    server: TokenServer,
    guard: Guard,
    make_fault: Callable[[str], Fault],
    hint: str,
) -> None:
    planted = guard.plant()
    # the variants built from it (space, quote, over-long) must not show either
    guard.planted.update({planted + " x", planted + '"x', (planted + "A" * 65537)[:65537]})
    fault = make_fault(planted)
    server.enqueue(*[fault] * 10)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 4
    message = str(exc)
    assert "answered 200 with" in message
    assert hint in message
    assert "after 4 request(s)" in message
    assert server.issued() == {}


def test_protocol_error_then_valid_answer_succeeds(
    client: TokenClient, server: TokenServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.enqueue(Fault.malformed_json())

    fetched = client.fetch(creds())

    assert [r.status for r in server.token_requests()] == [200, 200]
    assert fetched.requests == 2
    assert fetched.token.access_token.reveal() in server.issued()
    [retry] = retry_records(caplog)
    assert "not JSON" in retry.getMessage()


# -- 400, 404, 405, redirects: misconfiguration, never retried -----------------------------------


def test_400_invalid_request_is_rejected_at_once(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(*[Fault.http_status(400)] * 4)

    exc = guard.raises(RequestRejected, 78, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 1
    message = str(exc)
    assert "answered 400" in message
    assert "invalid_request" in message
    assert "grant_type_location" in message


def test_body_mode_against_the_query_only_server_is_rejected(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard
) -> None:
    # the server's own 400: a body grant where OSIGU wants it in the query
    server.add_client(PLAIN_CLIENT_ID, PLAIN_SECRET)
    client = make_client(server.url, grant_type_location="body")

    exc = guard.raises(
        RequestRejected,
        78,
        lambda: client.fetch(creds(PLAIN_SECRET, client_id=PLAIN_CLIENT_ID)),
    )

    assert [r.status for r in server.token_requests()] == [400]
    assert "invalid_request" in str(exc)
    assert "Missing grant_type" in str(exc)
    assert "grant_type_location" in str(exc)


def test_405_is_rejected_at_once(client: TokenClient, server: TokenServer, guard: Guard) -> None:
    server.enqueue(*[Fault.http_status(405)] * 4)

    exc = guard.raises(RequestRejected, 78, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 1
    assert "answered 405" in str(exc)
    assert "token_url" in str(exc)


def test_404_wrong_path_is_rejected_at_once(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard
) -> None:
    url = f"http://127.0.0.1:{server.port}/oauth/token"  # the path without /v1

    exc = guard.raises(RequestRejected, 78, lambda: make_client(url).fetch(creds()))

    assert [(r.path, r.status) for r in server.requests()] == [("/oauth/token", 404)]
    assert "answered 404" in str(exc)
    assert "token_url" in str(exc)


def test_404_on_the_token_path_is_rejected_at_once(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(*[Fault.http_status(404)] * 4)

    exc = guard.raises(RequestRejected, 78, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 1
    assert "answered 404" in str(exc)
    assert "check token_url" in str(exc)


@pytest.mark.parametrize("status", [302, 307])
def test_redirect_elsewhere_is_rejected_and_names_the_host(
    client: TokenClient, server: TokenServer, guard: Guard, status: int
) -> None:
    location = "https://login.other-idp.example/oauth/token?next=abc"
    server.enqueue(Fault(status=status, headers={"Location": location}))

    exc = guard.raises(RequestRejected, 78, lambda: client.fetch(creds()))

    assert len(server.requests()) == 1
    message = str(exc)
    assert f"answered {status}" in message
    assert "https://login.other-idp.example/oauth/token" in message
    assert "next=abc" not in message
    assert "token_url" in message


@pytest.mark.parametrize("status", [302, 307])
def test_redirect_is_not_followed(
    client: TokenClient, server: TokenServer, guard: Guard, status: int
) -> None:
    # the target is this very server: following it would show as a second recorded request
    target = f"http://127.0.0.1:{server.port}/v2/oauth/token"
    server.enqueue(Fault(status=status, headers={"Location": target}))

    exc = guard.raises(RequestRejected, 78, lambda: client.fetch(creds()))

    assert [(r.path, r.status) for r in server.requests()] == [(TOKEN_PATH, status)]
    assert f"127.0.0.1:{server.port}/v2/oauth/token" in str(exc)
    assert server.issued() == {}


def test_relative_redirect_names_the_resolved_url(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(Fault(status=302, headers={"Location": "/v2/oauth/token"}))

    exc = guard.raises(RequestRejected, 78, lambda: client.fetch(creds()))

    assert len(server.requests()) == 1
    assert "://?" not in str(exc)
    assert f"http://127.0.0.1:{server.port}/v2/oauth/token" in str(exc)


# -- 401 -----------------------------------------------------------------------------------------


def assert_rejected_message(message: str, client_id: str = CLIENT_ID) -> None:
    assert "answered 401" in message
    assert "invalid_client" in message
    assert repr(client_id) in message
    assert "secret is wrong" in message
    assert "other environment" in message


def test_401_without_reread_is_rejected_at_once(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    exc = guard.raises(CredentialsRejected, 77, lambda: client.fetch(creds(WRONG_SECRET)))

    assert [r.status for r in server.token_requests()] == [401]
    assert_rejected_message(str(exc))
    assert "from source env" in str(exc)


# The 401 re-read (re-read the sources once, resend only credentials that changed) is the
# profile's: tests/test_profile.py (DESIGN §2; TokenClient.fetch raises CredentialsRejected).


def test_401_is_never_resent_by_the_client(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(Fault.http_status(503))
    exc = guard.raises(CredentialsRejected, 77, lambda: client.fetch(creds(WRONG_SECRET)))
    assert [r.status for r in server.token_requests()] == [503, 401]
    assert_rejected_message(str(exc))


# -- 429 -----------------------------------------------------------------------------------------


def test_429_retry_after_seconds_is_honoured(client: TokenClient, server: TokenServer) -> None:
    server.enqueue(Fault.http_status(429, retry_after="1"))

    fetched = client.fetch(creds())

    first, second = server.token_requests()
    assert (first.status, second.status) == (429, 200)
    assert fetched.requests == 2
    assert second.received_at - first.received_at >= 0.95  # waited as asked (a lower bound)


def test_429_retry_after_http_date_is_honoured(client: TokenClient, server: TokenServer) -> None:
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    server.enqueue(
        Fault.http_status(429, retry_after=email.utils.format_datetime(when, usegmt=True))
    )

    fetched = client.fetch(creds())

    first, second = server.token_requests()
    assert (first.status, second.status) == (429, 200)
    assert fetched.requests == 2
    assert second.received_at >= when.timestamp() - 0.05


def test_429_long_retry_after_ends_the_attempt(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(Fault.http_status(429, retry_after="120"))

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert isinstance(exc, AuthServerUnavailable)
    assert exc.retry_after == 120
    assert len(server.token_requests()) == 1
    assert "429" in str(exc)
    assert "120s" in str(exc)
    assert "Retry-After" in str(exc)


def test_429_without_retry_after_backs_off(
    client: TokenClient, server: TokenServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.enqueue(Fault.http_status(429))

    fetched = client.fetch(creds())

    assert [r.status for r in server.token_requests()] == [429, 200]
    assert fetched.requests == 2
    [retry] = retry_records(caplog)
    assert "429" in retry.getMessage()


def test_429_repeated_gives_up_after_four_requests(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(*[Fault.http_status(429)] * 10)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 4
    assert "429" in str(exc)
    assert "rate limited" in str(exc)
    assert "after 4 request(s)" in str(exc)


# -- Spring-style reuse of the current token -----------------------------------------------------


@pytest.fixture
def reuse_server(servers: Servers) -> TokenServer:
    return servers(reuse_tokens=True)


def first_token(client: TokenClient, server: TokenServer) -> Token:
    fetched = client.fetch(creds())
    assert fetched.reused is False
    server.clear()
    return fetched.token


def test_the_same_token_back_is_reused_and_never_extended(
    make_client: Callable[..., TokenClient], reuse_server: TokenServer
) -> None:
    client = make_client(reuse_server.url)
    previous = first_token(client, reuse_server)
    time.sleep(1.1)  # the server's expires_in drops by a whole second

    fetched = client.fetch(creds(), previous=previous)

    assert fetched.reused is True
    assert fetched.token.access_token == previous.access_token
    assert fetched.token.expires_at <= previous.expires_at
    assert len(reuse_server.token_requests()) == 1
    assert len(reuse_server.issued()) == 1


@pytest.mark.parametrize("expires_in", [0, MISSING], ids=["expires-in-0", "expires-in-missing"])
def test_the_same_token_in_its_last_second_is_reused(
    make_client: Callable[..., TokenClient],
    reuse_server: TokenServer,
    expires_in: Any,
) -> None:
    client = make_client(reuse_server.url)
    previous = first_token(client, reuse_server)
    reuse_server.enqueue(
        Fault.json_body(token_body(previous.access_token.reveal(), expires_in=expires_in))
    )

    before = datetime.now(UTC)
    fetched = client.fetch(creds(), previous=previous)

    assert fetched.reused is True
    assert fetched.token.access_token == previous.access_token
    assert fetched.token.expires_at <= previous.expires_at
    if expires_in == 0:
        assert before <= fetched.token.expires_at <= datetime.now(UTC)
    else:
        assert fetched.token.expires_at == previous.expires_at
    assert len(reuse_server.token_requests()) == 1


def test_the_same_token_with_a_longer_expires_in_is_not_extended(
    make_client: Callable[..., TokenClient], reuse_server: TokenServer
) -> None:
    client = make_client(reuse_server.url)
    previous = first_token(client, reuse_server)
    reuse_server.enqueue(
        Fault.json_body(token_body(previous.access_token.reveal(), expires_in=10 * LIFETIME))
    )

    fetched = client.fetch(creds(), previous=previous)

    assert fetched.reused is True
    assert fetched.token.expires_at == previous.expires_at


def test_a_different_token_with_expires_in_0_is_a_protocol_error(
    make_client: Callable[..., TokenClient], reuse_server: TokenServer, guard: Guard
) -> None:
    client = make_client(reuse_server.url)
    previous = first_token(client, reuse_server)
    other = guard.plant()
    reuse_server.enqueue(*[Fault.json_body(token_body(other, expires_in=0))] * 10)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds(), previous=previous))

    assert len(reuse_server.token_requests()) == 4
    assert "expires_in 0" in str(exc)
    assert "after 4 request(s)" in str(exc)


def test_a_new_token_with_previous_given_is_not_reused(
    client: TokenClient, server: TokenServer
) -> None:
    previous = first_token(client, server)

    fetched = client.fetch(creds(), previous=previous)

    assert fetched.reused is False
    assert fetched.token.access_token != previous.access_token
    assert len(server.issued()) == 2


# -- stopping ------------------------------------------------------------------------------------


def test_stopping_during_a_retry_wait_returns_promptly(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard
) -> None:
    stopping = threading.Event()
    timer = threading.Timer(0.1, stopping.set)
    logger = logging.getLogger("agent.oauth.test-stopping")
    handler = OnRetry(timer.start)  # the event is set while the client waits (15-30 s here)
    logger.addHandler(handler)
    client = make_client(
        server.url,
        policy=RetryPolicy(initial_seconds=30, max_seconds=30),
        stopping=stopping,
        logger=logger,
    )
    server.enqueue(*[Fault.http_status(503)] * 10)
    started = time.monotonic()
    try:
        exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))
    finally:
        timer.cancel()
        logger.removeHandler(handler)

    assert time.monotonic() - started < 10  # generous: the backoff alone was 15 s or more
    assert stopping.is_set()
    assert "stopping" in str(exc)
    assert "503" in str(exc)
    assert len(server.token_requests()) == 1


def test_stopping_already_set_makes_one_request(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard
) -> None:
    stopping = threading.Event()
    stopping.set()
    client = make_client(
        server.url, policy=RetryPolicy(initial_seconds=30, max_seconds=30), stopping=stopping
    )
    server.enqueue(*[Fault.http_status(503)] * 10)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert "after 1 request(s)" in str(exc)
    assert len(server.token_requests()) == 1


# -- bugs found ----------------------------------------------------------------------------------

LATIN1_BODY = b'{"error": "invalid_client", "error_description": "Identifiants invalides \xe9"}'


def test_200_with_invalid_utf8_is_a_protocol_error(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    body = b'{"access_token": "caf\xe9", "token_type": "bearer", "expires_in": 3600}'
    server.enqueue(*[Fault(status=200, body=body)] * 10)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 4
    assert "not JSON" in str(exc)


def test_503_with_a_latin1_error_body_is_retried(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(*[Fault(status=503, body=LATIN1_BODY)] * 10)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 4
    assert "503" in str(exc)


def test_401_with_a_latin1_error_body_is_rejected(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    server.enqueue(Fault(status=401, body=LATIN1_BODY))

    exc = guard.raises(CredentialsRejected, 77, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 1
    assert repr(CLIENT_ID) in str(exc)


def test_200_with_a_broken_content_encoding_is_retried(
    client: TokenClient, server: TokenServer, guard: Guard
) -> None:
    fault = Fault(status=200, body=b"this is not gzip", headers={"Content-Encoding": "gzip"})
    server.enqueue(*[fault] * 10)

    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))

    assert len(server.token_requests()) == 4
    assert "token request failed" in str(exc)


# -- hostile servers (DESIGN §10) ----------------------------------------------------------------

ONE = RetryPolicy(max_retries=0)


def _traced_peak(call: Callable[[], object]) -> int:
    """Peak bytes Python allocated (tracemalloc) while ``call`` ran, the server's included."""
    import tracemalloc

    tracemalloc.start()
    try:
        call()
    except AgentError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
def test_a_trickling_server_is_cut_off_at_request_timeout(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard, headers: bool
) -> None:
    server.enqueue(Fault.trickle(interval=0.2, headers=headers))
    client = make_client(server.url, policy=ONE, timeout=timedelta(seconds=1))
    started = time.monotonic()
    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))
    took = time.monotonic() - started
    assert took < 4  # one deadline for the exchange (the trickle alone would take ~60 s)
    assert "within 1s" in str(exc) and "request_timeout" in str(exc)


def test_a_server_that_never_answers_is_cut_off_at_request_timeout(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard
) -> None:
    server.enqueue(Fault.hang(), Fault.hang())
    client = make_client(
        server.url, policy=RetryPolicy(max_retries=1, initial_seconds=0.01, max_seconds=0.02)
    )
    started = time.monotonic()
    guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))
    assert time.monotonic() - started < 4
    assert len(server.token_requests()) == 2


@pytest.mark.parametrize(
    "fault",
    [
        Fault.endless(),
        Fault.compression_bomb(decoded_bytes=1 << 30, encoding="gzip"),
        Fault.compression_bomb(decoded_bytes=256 << 20, encoding="deflate"),
        Fault.oversized(total_bytes=100 * 1024 * 1024),
    ],
    ids=["endless", "gzip-bomb", "deflate-bomb", "oversized"],
)
def test_a_flooding_body_is_a_protocol_error_and_memory_stays_flat(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard, fault: Fault
) -> None:
    server.enqueue(fault)
    client = make_client(server.url, policy=ONE, timeout=timedelta(seconds=20))
    errors: list[AgentError] = []

    def fetch() -> None:
        try:
            client.fetch(creds())
        except AgentError as exc:
            errors.append(exc)
            raise

    peak = _traced_peak(fetch)
    assert len(errors) == 1 and isinstance(errors[0], AuthServerUnavailable)
    assert errors[0].outcome == "protocol_error"
    assert "larger than 1024 KiB" in str(errors[0])
    # 1 MiB kept at most, plus the server's own 64 KiB pieces and its ~1 MB cached bomb
    assert peak < 16 * 1024 * 1024, peak
    guard.assert_clean(errors[0])


def test_a_body_of_exactly_the_bound_is_read(
    make_client: Callable[..., TokenClient], server: TokenServer
) -> None:
    server.enqueue(Fault.oversized(total_bytes=1024 * 1024, in_field=False))
    assert make_client(server.url, policy=ONE).fetch(creds()).token.access_token


@pytest.mark.parametrize("status", [400, 401, 500])
def test_an_error_text_echoing_secrets_is_masked_cut_and_escaped(
    client: TokenClient, server: TokenServer, guard: Guard, status: int
) -> None:
    held = client.fetch(creds()).token
    server.enqueue(*[Fault.echo(status=status, token=held.access_token.reveal()) for _ in range(4)])
    error = {400: RequestRejected, 401: CredentialsRejected, 500: AuthServerUnavailable}[status]
    code = {400: 78, 401: 77, 500: 69}[status]
    exc = guard.raises(error, code, lambda: client.fetch(creds(), previous=held))
    text = str(exc)
    assert held.access_token.reveal() not in text
    assert "[REDACTED]" in text
    assert not any(ord(char) < 32 or ord(char) == 0x7F for char in text), repr(text)
    assert "\\x1b" in text  # shown escaped, not raw


def test_an_unasked_content_encoding_is_a_protocol_error(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard
) -> None:
    server.enqueue(Fault(status=200, body=b"\x1b\x00", headers={"Content-Encoding": "br"}))
    client = make_client(server.url, policy=ONE)
    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))
    assert "Content-Encoding 'br'" in str(exc)
    assert server.token_requests()[-1].headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.parametrize("expires_in", [10**20, 11 * 366 * 24 * 3600])
def test_an_absurd_expires_in_is_a_protocol_error(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard, expires_in: int
) -> None:
    server.enqueue(Fault.json_body(token_body(guard.plant(), expires_in=expires_in)))
    client = make_client(server.url, policy=ONE)
    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))
    assert "at most ten years" in str(exc)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1000000000000000", 300.0), ("9" * 400, 300.0), ("Fri, 31 Dec 9999 23:59:59 GMT", 300.0)],
)
def test_a_huge_retry_after_is_clamped(
    client: TokenClient, server: TokenServer, guard: Guard, value: str, expected: float
) -> None:
    server.enqueue(Fault.http_status(429, retry_after=value))
    exc = guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))
    assert isinstance(exc, AuthServerUnavailable)
    assert exc.retry_after == expected


def test_the_fast_retries_are_bounded_by_total_time_too(
    make_client: Callable[..., TokenClient], server: TokenServer, guard: Guard
) -> None:
    server.enqueue(*[Fault.hang() for _ in range(10)])
    policy = RetryPolicy(
        max_retries=10, initial_seconds=0.01, max_seconds=0.02, max_total_seconds=1.2
    )
    client = make_client(server.url, policy=policy, timeout=timedelta(seconds=0.5))
    guard.raises(AuthServerUnavailable, 69, lambda: client.fetch(creds()))
    assert 2 <= len(server.token_requests()) <= 3  # not 11: 3 requests of 0.5 s are past 1.2 s
