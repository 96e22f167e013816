"""The health listener over real HTTP (httpx against a HealthServer on a free port) and Metrics.

The server's collaborators (the profile snapshot and the refresh callback) are fakes here: they
are what the agent passes in, and the server owns no state of its own.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.health import (
    AgentUnreachable,
    HealthServer,
    ProfileStatus,
    RefreshAnswer,
    _TokenBucket,
    fetch_status,
    request_refresh,
)
from agent.metrics import STATES, Metrics
from tests.conftest import metric_samples as samples
from tests.conftest import metric_value as value

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)

#: every metric name of DESIGN §8
DESIGN_METRICS = {
    "dvs_agent_token_expiry_timestamp_seconds",
    "dvs_agent_token_requests_total",
    "dvs_agent_rotations_total",
    "dvs_agent_triggers_total",
    "dvs_agent_sink_writes_total",
    "dvs_agent_source_errors_total",
    "dvs_agent_refresh_duration_seconds",
    "dvs_agent_profile_state",
    "dvs_agent_last_success_timestamp_seconds",
    "dvs_agent_source_in_use",
    "dvs_agent_login_credential_expiry_timestamp_seconds",
}

PROFILE_KEYS = {
    "state",
    "ready",
    "expires_at",
    "expires_in",
    "provider_slug",
    "last_refresh",
    "last_error",
    "source",
}


def status(
    name: str = "dvs",
    state: str = "ok",
    expires_in: float | None = 3600,
    *,
    last_error: str | None = None,
) -> ProfileStatus:
    """A profile whose token expires ``expires_in`` seconds after NOW (None: no token)."""
    return ProfileStatus(
        name=name,
        state=state,
        expires_at=None if expires_in is None else NOW + timedelta(seconds=expires_in),
        provider_slug=None if expires_in is None else "osigu-sandbox",
        last_refresh=None if expires_in is None else NOW - timedelta(minutes=5),
        last_error=last_error,
        source=None if expires_in is None else "vault",
    )


@dataclass
class FakeAgent:
    """The two callbacks the agent gives the server."""

    profiles: list[ProfileStatus] = field(default_factory=lambda: [status()])
    answer: RefreshAnswer = field(
        default_factory=lambda: RefreshAnswer(accepted=True, message="refresh scheduled")
    )
    refreshed: list[str | None] = field(default_factory=list)
    fail: Exception | None = None

    def snapshot(self) -> list[ProfileStatus]:
        if self.fail is not None:
            raise self.fail
        return list(self.profiles)

    def refresh(self, name: str | None) -> RefreshAnswer:
        if self.fail is not None:
            raise self.fail
        if name is not None and name not in {p.name for p in self.profiles}:
            raise KeyError(name)
        self.refreshed.append(name)
        return self.answer


@dataclass
class Running:
    server: HealthServer
    agent: FakeAgent
    metrics: Metrics

    @property
    def listen(self) -> str:
        host, port = self.server.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, trust_env=False, timeout=5)

    def post(self, path: str) -> httpx.Response:
        return httpx.post(self.url + path, trust_env=False, timeout=5)


def serve(host: str = "127.0.0.1", agent: FakeAgent | None = None) -> Running:
    agent = agent or FakeAgent()
    metrics = Metrics()
    server = HealthServer(
        host,
        0,
        snapshot=agent.snapshot,
        metrics=metrics,
        refresh=agent.refresh,
        clock=lambda: NOW,
    )
    server.start()
    return Running(server, agent, metrics)


@pytest.fixture
def health() -> Iterator[Running]:
    running = serve()
    yield running
    running.server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------- healthz, readyz


def test_healthz(health: Running) -> None:
    response = health.get("/healthz")
    assert response.status_code == 200
    assert response.text.strip() == "ok"
    head = httpx.head(health.url + "/healthz", trust_env=False)
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize(
    ("profiles", "code"),
    [
        pytest.param([status(state="starting", expires_in=None)], 503, id="starting-no-token"),
        # the first token is held a moment before its files are written
        pytest.param([status(state="starting", expires_in=120)], 503, id="starting-token-held"),
        pytest.param([status(state="expired", expires_in=-1)], 503, id="expired"),
        pytest.param([status(state="ok", expires_in=0)], 503, id="expires-now"),
        pytest.param([status("a"), status("b")], 200, id="all-valid"),
        pytest.param(
            [status("a"), status("b", "degraded", 120, last_error="credentials rejected (401)")],
            200,
            id="degraded-but-valid",
        ),
        pytest.param([status("a"), status("b", "starting", None)], 503, id="one-starting"),
        pytest.param([], 503, id="no-profiles"),
    ],
)
def test_readyz(health: Running, profiles: list[ProfileStatus], code: int) -> None:
    health.agent.profiles = profiles
    response = health.get("/readyz")
    assert response.status_code == code
    body = response.json()
    assert body["ready"] is (code == 200)
    assert set(body["profiles"]) == {p.name for p in profiles}
    for profile in profiles:
        assert body["profiles"][profile.name]["ready"] is profile.ready(NOW)


def test_readyz_one_profile(health: Running) -> None:
    health.agent.profiles = [
        status("good"),
        status("late", "starting", None),
        status("sad", "degraded", 30, last_error="auth server unavailable"),
    ]
    good = health.get("/readyz/good")
    assert good.status_code == 200
    assert good.json() == {"ready": True, "profiles": {"good": good.json()["profiles"]["good"]}}
    assert health.get("/readyz/late").status_code == 503
    assert health.get("/readyz/sad").status_code == 200
    unknown = health.get("/readyz/nope")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/json"
    assert unknown.json()["error"] == "unknown profile"


def test_readyz_body_fields(health: Running) -> None:
    health.agent.profiles = [
        status("dvs", "degraded", 90.7, last_error="credentials rejected (401)"),
        status("new", "starting", None),
    ]
    body = health.get("/readyz").json()
    assert set(body) == {"ready", "profiles"}
    dvs, new = body["profiles"]["dvs"], body["profiles"]["new"]
    assert set(dvs) == PROFILE_KEYS and set(new) == PROFILE_KEYS
    assert dvs == {
        "state": "degraded",
        "ready": True,
        "expires_at": "2026-11-28T12:01:30Z",
        "expires_in": 90,
        "provider_slug": "osigu-sandbox",
        "last_refresh": "2026-11-28T11:55:00Z",
        "last_error": "credentials rejected (401)",
        "source": "vault",
    }
    assert new == {
        "state": "starting",
        "ready": False,
        "expires_at": None,
        "expires_in": None,
        "provider_slug": None,
        "last_refresh": None,
        "last_error": None,
        "source": None,
    }
    # an expired token shows 0 seconds left, never a negative count
    health.agent.profiles = [status("old", "expired", -300)]
    assert health.get("/readyz").json()["profiles"]["old"]["expires_in"] == 0


def test_methods_and_unknown_paths(health: Running) -> None:
    for path in ("/healthz", "/readyz", "/readyz/dvs", "/metrics"):
        response = health.post(path)
        assert response.status_code == 405, path
        assert response.headers["allow"] == "GET, HEAD"
    refresh = health.get("/refresh")
    assert refresh.status_code == 405
    assert refresh.headers["allow"] == "POST"
    assert httpx.put(health.url + "/refresh", trust_env=False).status_code == 405
    for path in ("/", "/nope", "/healthzz", "/refresh/dvs", "/%2e%2e/etc/passwd"):
        assert health.get(path).status_code == 404, path
    # a body is ignored
    response = httpx.post(health.url + "/refresh", content=b"x" * 5000, trust_env=False)
    assert response.status_code == 202
    assert health.get("/healthz/").status_code == 200


def test_callback_exception_is_a_generic_500_logged_once(
    health: Running, caplog: pytest.LogCaptureFixture
) -> None:
    health.agent.fail = RuntimeError("detail-that-must-not-leak")
    with caplog.at_level(logging.DEBUG, logger="agent.health"):
        for _ in range(3):
            response = health.get("/readyz")
            assert response.status_code == 500
            assert "detail-that-must-not-leak" not in response.text
            assert "RuntimeError" not in response.text
        posted = health.post("/refresh")
        assert posted.status_code == 500
        assert "detail-that-must-not-leak" not in posted.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage().split(" failed")[0] for r in errors] == [
        "health endpoint /readyz",
        "health endpoint /refresh",
    ]
    assert all(r.exc_info for r in errors)
    health.agent.fail = None
    assert health.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------------- metrics


def exercise(metrics: Metrics, profile: str) -> None:
    """Call every Metrics method once or more for ``profile``."""
    for _ in range(3):
        metrics.token_request(profile, "ok")
    metrics.token_request(profile, "rate_limited")
    metrics.rotation(profile, "poll")
    metrics.rotation(profile, "poll")
    metrics.rotation(profile, "401")
    metrics.trigger(profile, "sighup")
    metrics.sink_write(profile, "file:/run/dvs-agent/token", "ok")
    metrics.sink_write(profile, "file:/run/dvs-agent/token", "error")
    metrics.source_error(profile, "vault")
    for seconds in (0.004, 0.2, 3.0):
        metrics.refresh_duration(profile, seconds)
    metrics.state(profile, "starting")
    metrics.state(profile, "degraded")
    metrics.token(profile, "osigu-sandbox", 1_800_000_000.0)
    metrics.last_success(profile, 1_799_990_000.0)
    metrics.source_in_use(profile, "aws", ["vault", "aws", "env"])
    metrics.login_credential_expiry(profile, "jwt", 1_800_000_100.0)


def test_metrics_endpoint_has_every_design_metric(health: Running) -> None:
    exercise(health.metrics, "dvs")
    response = health.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    names = {f.name for f in families} | {s.name for f in families for s in f.samples}
    assert names >= DESIGN_METRICS
    types = {f.name: f.type for f in families}
    assert types["dvs_agent_token_requests"] == "counter"
    assert types["dvs_agent_refresh_duration_seconds"] == "histogram"
    assert types["dvs_agent_profile_state"] == "gauge"


def test_metric_values() -> None:
    metrics = Metrics()
    exercise(metrics, "dvs")
    metrics.token_request("dvs", "ok")
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    found = samples(body.decode())
    total = "dvs_agent_token_requests_total"
    assert value(found, total, profile="dvs", outcome="ok") == 4
    assert value(found, total, profile="dvs", outcome="rate_limited") == 1
    assert value(found, "dvs_agent_rotations_total", profile="dvs", trigger="poll") == 2
    assert value(found, "dvs_agent_rotations_total", profile="dvs", trigger="401") == 1
    assert value(found, "dvs_agent_triggers_total", profile="dvs", trigger="sighup") == 1
    sink = "file:/run/dvs-agent/token"
    writes = "dvs_agent_sink_writes_total"
    assert value(found, writes, profile="dvs", sink=sink, outcome="ok") == 1
    assert value(found, writes, profile="dvs", sink=sink, outcome="error") == 1
    assert value(found, "dvs_agent_source_errors_total", profile="dvs", source="vault") == 1

    histogram = "dvs_agent_refresh_duration_seconds"
    assert value(found, histogram + "_count", profile="dvs") == 3
    assert value(found, histogram + "_sum", profile="dvs") == pytest.approx(3.204)
    assert value(found, histogram + "_bucket", profile="dvs", le="0.005") == 1
    assert value(found, histogram + "_bucket", profile="dvs", le="60.0") == 3
    assert value(found, histogram + "_bucket", profile="dvs", le="+Inf") == 3

    for state in STATES:
        expected = 1 if state == "degraded" else 0
        assert value(found, "dvs_agent_profile_state", profile="dvs", state=state) == expected
    expiry = "dvs_agent_token_expiry_timestamp_seconds"
    assert value(found, expiry, profile="dvs", provider_slug="osigu-sandbox") == 1_800_000_000
    last = "dvs_agent_last_success_timestamp_seconds"
    assert value(found, last, profile="dvs") == 1_799_990_000
    in_use = "dvs_agent_source_in_use"
    assert value(found, in_use, profile="dvs", source="aws") == 1
    assert value(found, in_use, profile="dvs", source="vault") == 0
    assert value(found, in_use, profile="dvs", source="env") == 0


def test_provider_slug_change_replaces_the_expiry_series() -> None:
    metrics = Metrics()
    metrics.token("dvs", "osigu-sandbox", 100.0)
    metrics.token("dvs", "osigu-sandbox", 200.0)
    metrics.token("dvs", "other-provider", 300.0)
    expiry = "dvs_agent_token_expiry_timestamp_seconds"
    series = {k: v for k, v in samples(metrics.render()[0].decode()).items() if k[0] == expiry}
    assert series == {
        (expiry, frozenset({("profile", "dvs"), ("provider_slug", "other-provider")})): 300
    }
    metrics.token("dvs", None, 400.0)
    series = {k: v for k, v in samples(metrics.render()[0].decode()).items() if k[0] == expiry}
    assert series == {(expiry, frozenset({("profile", "dvs"), ("provider_slug", "")})): 400}


def test_source_list_change_drops_unlisted_sources() -> None:
    metrics = Metrics()
    metrics.source_in_use("dvs", "vault", ["vault", "aws", "env"])
    metrics.source_in_use("dvs", "env", ["env"])
    in_use = {
        dict(labels)["source"]: v
        for (name, labels), v in samples(metrics.render()[0].decode()).items()
        if name == "dvs_agent_source_in_use"
    }
    assert in_use == {"env": 1}


def test_forget_removes_every_series_of_a_profile() -> None:
    metrics = Metrics()
    exercise(metrics, "gone")
    exercise(metrics, "kept")
    metrics.forget("gone")
    profiles = {dict(labels).get("profile") for _, labels in samples(metrics.render()[0].decode())}
    assert profiles == {"kept"}
    # it can come back, from zero
    metrics.token_request("gone", "ok")
    found = samples(metrics.render()[0].decode())
    assert value(found, "dvs_agent_token_requests_total", profile="gone", outcome="ok") == 1
    metrics.forget("never-seen")


def test_metrics_instances_are_independent() -> None:
    first, second = Metrics(), Metrics()  # no global registry: no "Duplicated timeseries"
    first.token_request("dvs", "ok")
    assert b'profile="dvs"' not in second.render()[0]
    with pytest.raises(ValueError, match="unknown profile state"):
        first.state("dvs", "fine")


# ----------------------------------------------------------------------------------- refresh


def test_refresh_accepted(health: Running) -> None:
    everything = health.post("/refresh")
    assert everything.status_code == 202
    assert everything.json() == {
        "accepted": True,
        "profile": None,
        "retry_after": None,
        "message": "refresh scheduled",
    }
    one = health.post("/refresh?profile=dvs")
    assert one.status_code == 202
    assert one.json()["profile"] == "dvs"
    assert health.agent.refreshed == [None, "dvs"]


def test_refresh_rate_limited_by_the_agent(health: Running) -> None:
    health.agent.answer = RefreshAnswer(accepted=False, retry_after=12.2, message="too soon")
    response = health.post("/refresh?profile=dvs")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "13"
    assert response.json()["retry_after"] == 12.2
    assert response.json()["message"] == "too soon"


def test_refresh_refused_without_a_wait(health: Running) -> None:
    health.agent.answer = RefreshAnswer(accepted=False, message="stopping")
    response = health.post("/refresh")
    assert response.status_code == 503
    assert response.json()["accepted"] is False


def test_refresh_unknown_profile_and_bad_query(health: Running) -> None:
    unknown = health.post("/refresh?profile=nope")
    assert unknown.status_code == 404
    assert unknown.json()["accepted"] is False
    assert health.post("/refresh?profile=a&profile=b").status_code == 400
    assert health.post("/refresh?profile=").status_code == 400
    assert health.agent.refreshed == []


def test_refresh_burst_limit(health: Running) -> None:
    started = time.monotonic()
    with httpx.Client(trust_env=False, timeout=5) as client:
        codes = [client.post(health.url + "/refresh").status_code for _ in range(30)]
        limited = client.post(health.url + "/refresh")
    elapsed = time.monotonic() - started
    accepted = codes.count(202)
    assert codes[:10] == [202] * 10
    assert 429 in codes
    assert accepted <= 10 + elapsed * 10 + 1
    assert set(codes) == {202, 429}
    # the server's own limit answers before the agent is asked
    assert len(health.agent.refreshed) == accepted
    if limited.status_code == 429:
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["accepted"] is False


def test_token_bucket() -> None:
    now = [100.0]
    bucket = _TokenBucket(10, clock=lambda: now[0])
    assert [bucket.take() for _ in range(10)] == [0.0] * 10
    assert bucket.take() == pytest.approx(0.1)
    now[0] += 0.11
    assert bucket.take() == 0.0
    assert bucket.take() > 0
    now[0] += 60  # refills to the burst size, not beyond
    assert sum(1 for _ in range(20) if bucket.take() == 0.0) == 10


# ----------------------------------------------------------------------------- CLI helpers


def test_client_helpers(health: Running) -> None:
    code, body = fetch_status(health.listen)
    assert code == 200 and body["ready"] is True and set(body["profiles"]["dvs"]) == PROFILE_KEYS
    health.agent.profiles = [status("dvs", "expired", -1)]
    assert fetch_status(health.listen)[0] == 503
    assert request_refresh(health.listen, None)[0] == 202
    code, body = request_refresh(health.listen, "dvs")
    assert code == 202 and body["profile"] == "dvs"
    assert request_refresh(health.listen, "nope")[0] == 404
    health.agent.answer = RefreshAnswer(accepted=False, retry_after=5)
    code, body = request_refresh(health.listen, "dvs")
    assert code == 429 and body["retry_after"] == 5
    assert health.agent.refreshed == [None, "dvs", "dvs"]


def test_client_helpers_against_a_closed_port() -> None:
    listen = f"127.0.0.1:{free_port()}"
    with pytest.raises(AgentUnreachable, match="not running") as raised:
        fetch_status(listen, timeout=2)
    assert isinstance(raised.value, ConnectionError)
    assert listen in str(raised.value)
    with pytest.raises(AgentUnreachable, match=r"\[health\] listen is disabled"):
        request_refresh(listen, "dvs", timeout=2)
    with pytest.raises(AgentUnreachable, match="disabled"):
        fetch_status("")


def test_client_helpers_map_a_wildcard_listen_to_loopback() -> None:
    running = serve("0.0.0.0")
    try:
        assert running.server.address[0] == "0.0.0.0"
        assert fetch_status(f"0.0.0.0:{running.server.address[1]}")[0] == 200
    finally:
        running.server.stop()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_loopback() -> None:
    running = serve("::1")
    try:
        host, port = running.server.address
        assert host == "::1"
        assert running.get("/healthz").status_code == 200
        code, body = fetch_status(f"[::1]:{port}")
        assert code == 200 and body["ready"] is True
        assert request_refresh(f"[::1]:{port}", "dvs")[0] == 202
    finally:
        running.server.stop()


# --------------------------------------------------------------------------------- lifecycle


def test_port_in_use_fails_at_construction(health: Running) -> None:
    host, port = health.server.address
    agent = FakeAgent()
    with pytest.raises(OSError):
        HealthServer(host, port, snapshot=agent.snapshot, metrics=Metrics(), refresh=agent.refresh)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(OSError):
            HealthServer(
                "127.0.0.1",
                sock.getsockname()[1],
                snapshot=agent.snapshot,
                metrics=Metrics(),
                refresh=agent.refresh,
            )


def test_stop_closes_the_listener() -> None:
    running = serve()
    listen = running.listen
    assert fetch_status(listen)[0] == 200
    running.server.stop()
    running.server.stop()  # twice is fine
    with pytest.raises(AgentUnreachable):
        fetch_status(listen, timeout=2)
    agent = FakeAgent()
    never_started = HealthServer(
        "127.0.0.1", 0, snapshot=agent.snapshot, metrics=Metrics(), refresh=agent.refresh
    )
    never_started.stop()


def test_request_lines_are_not_logged(capfd: pytest.CaptureFixture[str], health: Running) -> None:
    health.get("/healthz")
    health.get("/nope")
    captured = capfd.readouterr()
    assert "GET /" not in captured.err and "GET /" not in captured.out


def test_client_helpers_against_something_else(tmp_path: Path) -> None:
    handler = functools.partial(QuietFiles, directory=str(tmp_path))
    other = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(AgentUnreachable, match="without a dvs-agent JSON body"):
            fetch_status(f"127.0.0.1:{other.server_address[1]}")
    finally:
        other.shutdown()
        other.server_close()


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass
