"""Profile (the one refresh path) with a controlled clock, a real token server and real files."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.devserver import Fault, TokenServer
from agent.errors import AuthServerUnavailable, CredentialsRejected, SinkError
from agent.manager import Profile, Reason, State
from agent.oauth import RetryPolicy, TokenClient
from agent.policy import Timing
from agent.sources.chain import SourceChain
from agent.sources.env import EnvSource
from agent.state import StateStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET, file_sink


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def env() -> dict[str, str]:
    return {"DVS_CLIENT_ID": CLIENT_ID, "DVS_CLIENT_SECRET": CLIENT_SECRET}


@pytest.fixture
def profile(
    server: TokenServer, tmp_path: Path, clock: Clock, env: dict[str, str]
) -> Iterator[Profile]:
    log = logging.getLogger("test.manager")
    client = TokenClient(
        token_url=server.url,
        profile="p",
        clock=clock,
        policy=RetryPolicy(max_retries=0),
        logger=log,
    )
    chain = SourceChain([EnvSource(environ=env)], profile="p", logger=log)
    prof = Profile(
        "p",
        chain=chain,
        client=client,
        sinks=[file_sink(tmp_path / "out" / "token")],
        store=StateStore(tmp_path / "state"),
        timing=Timing(refresh_before_expiry=timedelta(seconds=60)),
        clock=clock,
        logger=log,
    )
    prof.check_sinks()
    yield prof
    prof.close()


def test_success_schedules_by_the_formula(
    profile: Profile, server: TokenServer, clock: Clock
) -> None:
    outcome = profile.refresh(Reason.START)
    assert outcome.ok and outcome.new_token
    assert profile.state is State.OK
    delay = (outcome.next_at - clock.now).total_seconds()
    assert 0.95 * 0.9 * 86399 <= delay <= 0.9 * 86399  # 10 % rule, less up to 5 % jitter


def test_transient_failures_back_off_and_keep_the_token(
    profile: Profile, server: TokenServer, clock: Clock, tmp_path: Path
) -> None:
    assert profile.refresh(Reason.START).ok
    held = (tmp_path / "out" / "token").read_text()
    delays = []
    for _ in range(5):
        server.enqueue(Fault.http_status(503))
        outcome = profile.refresh(Reason.SCHEDULE)
        assert not outcome.ok and isinstance(outcome.error, AuthServerUnavailable)
        delays.append((outcome.next_at - clock.now).total_seconds())
    assert profile.state is State.DEGRADED
    assert (tmp_path / "out" / "token").read_text() == held
    assert 1.5 <= delays[0] <= 2 and delays[-1] > delays[0] * 8  # doubling from 2 s
    # once the held token has expired, the cap drops to 30 s
    clock.advance(90000)
    for _ in range(8):
        server.enqueue(Fault.http_status(503))
        outcome = profile.refresh(Reason.RETRY)
    assert profile.state is State.EXPIRED
    assert (outcome.next_at - clock.now).total_seconds() <= 30


def test_retry_never_sleeps_past_the_held_tokens_expiry(
    profile: Profile, server: TokenServer, clock: Clock
) -> None:
    assert profile.refresh(Reason.START).ok
    assert profile.token is not None
    clock.now = profile.token.expires_at - timedelta(seconds=20)
    for _ in range(10):
        server.enqueue(Fault.http_status(503))
        outcome = profile.refresh(Reason.RETRY)
    assert outcome.next_at <= profile.token.expires_at


def test_429_retry_after_is_honoured_by_the_schedule_up_to_its_cap(
    profile: Profile, server: TokenServer, clock: Clock
) -> None:
    # no token held: the wait is capped at 30 s (DESIGN §10)
    server.enqueue(Fault.http_status(429, retry_after="120"))
    outcome = profile.refresh(Reason.START)
    assert not outcome.ok
    assert (outcome.next_at - clock.now).total_seconds() == 30
    # a valid token held: obeyed up to 5 minutes
    assert profile.refresh(Reason.START).ok
    server.enqueue(Fault.http_status(429, retry_after="120"))
    outcome = profile.refresh(Reason.REFRESH)
    assert not outcome.ok and profile.state is State.DEGRADED
    assert (outcome.next_at - clock.now).total_seconds() >= 120
    server.enqueue(Fault.http_status(429, retry_after="86400000"))
    outcome = profile.refresh(Reason.REFRESH)
    assert not outcome.ok
    assert 120 <= (outcome.next_at - clock.now).total_seconds() <= 300


@pytest.mark.parametrize(
    "retry_after",
    [
        "1000000000000000",
        "9" * 400,
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Sat, 01 Jan 10000 0:0:0 GMT",
    ],
)
def test_a_huge_retry_after_never_escapes_or_freezes_the_profile(
    profile: Profile, server: TokenServer, clock: Clock, retry_after: str
) -> None:
    server.enqueue(Fault.http_status(429, retry_after=retry_after))
    outcome = profile.refresh(Reason.START)
    assert not outcome.ok and isinstance(outcome.error, AuthServerUnavailable)
    assert 1 <= (outcome.next_at - clock.now).total_seconds() <= 30
    clock.now = outcome.next_at
    assert profile.refresh(Reason.RETRY).ok  # the profile goes on


def test_401_backs_off_slowly(
    profile: Profile, server: TokenServer, clock: Clock, env: dict[str, str]
) -> None:
    assert profile.refresh(Reason.START).ok
    env["DVS_CLIENT_SECRET"] = "rotated-wrong"
    outcome = profile.refresh(Reason.ROTATION)
    assert isinstance(outcome.error, CredentialsRejected)
    assert profile.state is State.DEGRADED
    assert (outcome.next_at - clock.now).total_seconds() >= 45
    env["DVS_CLIENT_SECRET"] = CLIENT_SECRET
    assert profile.refresh(Reason.ROTATION).ok
    assert profile.state is State.OK


def test_failed_sink_is_retried_without_a_new_token(
    profile: Profile, server: TokenServer, clock: Clock, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (out / "token").mkdir()  # a directory at the path: the replace fails, even as root
    outcome = profile.refresh(Reason.START)
    assert not outcome.ok and isinstance(outcome.error, SinkError)
    assert profile.state is State.DEGRADED
    assert len(server.token_requests()) == 1
    (out / "token").rmdir()
    outcome = profile.refresh(Reason.RETRY)
    assert outcome.ok
    assert len(server.token_requests()) == 1  # the same token, written now
    assert (out / "token").read_text() in server.issued()


def test_same_token_after_expiry_stops_fast_polling(
    profile: Profile, server: TokenServer, clock: Clock, tmp_path: Path
) -> None:
    assert profile.refresh(Reason.START).ok
    assert profile.token is not None
    held = profile.token.access_token.reveal()
    mtime = (tmp_path / "out" / "token").stat().st_mtime_ns
    same = {"access_token": held, "token_type": "bearer", "expires_in": 0}
    clock.now = profile.token.expires_at
    server.enqueue(Fault.json_body(same))
    outcome = profile.refresh(Reason.SCHEDULE)
    assert outcome.ok and not outcome.new_token
    assert (outcome.next_at - clock.now).total_seconds() < 1  # asks again in a few hundred ms
    assert (tmp_path / "out" / "token").stat().st_mtime_ns == mtime
    clock.advance(30)
    server.enqueue(Fault.json_body(same))
    outcome = profile.refresh(Reason.SCHEDULE)
    assert not outcome.ok and (outcome.next_at - clock.now).total_seconds() >= 1


def test_a_sighup_burst_makes_one_request_unless_the_credentials_change(
    profile: Profile, server: TokenServer, clock: Clock, env: dict[str, str]
) -> None:
    assert profile.refresh(Reason.START).ok
    for _ in range(50):
        assert profile.refresh(Reason.SIGHUP).ok
    assert len(server.token_requests()) == 1  # the token is < 10 s old: nothing to add
    clock.advance(11)
    assert profile.refresh(Reason.SIGHUP).ok
    assert len(server.token_requests()) == 2  # older than 10 s: the runbook's re-auth
    server.set_secret(CLIENT_ID, "rotated-secret-value")
    env["DVS_CLIENT_SECRET"] = "rotated-secret-value"
    assert profile.refresh(Reason.SIGHUP).new_token  # new credentials: at once
    assert len(server.token_requests()) == 3
    assert profile.refresh(Reason.RELOAD).new_token  # new settings: always


class Recording:
    """A Recorder that keeps every report (agent.recorder.Recorder)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def __getattr__(self, name: str) -> object:
        def record(*args: object) -> None:
            self.calls.append((name, args))

        return record

    def of(self, name: str) -> list[tuple[object, ...]]:
        return [args for called, args in self.calls if called == name]


def test_metrics_say_what_they_name(
    server: TokenServer, tmp_path: Path, clock: Clock, env: dict[str, str]
) -> None:
    """rotations_total counts credential changes (at first use, whatever the answer),
    triggers_total the triggers, refresh_duration the whole refresh (DESIGN §11)."""
    recorder: Any = Recording()
    log = logging.getLogger("test.manager")
    client = TokenClient(
        token_url=server.url, profile="p", clock=clock, policy=RetryPolicy(max_retries=0)
    )
    profile = Profile(
        "p",
        chain=SourceChain([EnvSource(environ=env)], profile="p", logger=log),
        client=client,
        sinks=[file_sink(tmp_path / "token")],
        store=StateStore(tmp_path / "state"),
        timing=Timing(),
        clock=clock,
        logger=log,
        metrics=recorder,
    )
    assert profile.refresh(Reason.START).ok
    clock.advance(20)
    assert profile.refresh(Reason.REFRESH).ok  # a trigger, same credentials
    assert recorder.of("trigger") == [("p", "refresh")]
    assert recorder.of("rotation") == []
    env["DVS_CLIENT_SECRET"] = "rotated-but-not-at-the-server"
    outcome = profile.refresh(Reason.ROTATION)  # found by a poll; the server rejects it
    assert not outcome.ok
    assert recorder.of("rotation") == [("p", "poll")]
    assert recorder.of("trigger") == [("p", "refresh"), ("p", "poll")]
    assert len(recorder.of("refresh_duration")) == 3
    profile.close()
