"""Profile in process: an injected clock, a real TokenClient over httpx.MockTransport, and
sources and sinks written here (the extension points, not the store clients).

Fast and deterministic: nothing sleeps (the clock is advanced by hand, the client makes no
retries of its own), so every edge of the one refresh path can be driven from here.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from agent.errors import (
    AgentError,
    AuthServerUnavailable,
    CredentialsRejected,
    RequestRejected,
    SinkError,
    SourceUnavailable,
)
from agent.manager import Outcome, Profile, Reason, State
from agent.models import Credentials, Secret, Token
from agent.oauth import RetryPolicy, TokenClient
from agent.policy import Timing
from agent.sources.chain import SourceChain
from agent.state import StateStore

CLIENT_ID = "svc-client"
SECRET = "s3cr3t-Value"
LIFETIME = 3600


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


Answer = Callable[[httpx.Request], httpx.Response]


class AuthServer:
    """The token endpoint as a MockTransport handler: a new token for the right Basic
    credentials, 401 for others; ``answers`` queued first are sent instead, in order."""

    def __init__(self) -> None:
        self.secret = SECRET
        self.answers: list[Answer] = []
        #: (client_id, secret) of each request
        self.sent: list[tuple[str, str]] = []
        self.issued: list[str] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.params["grant_type"] == "client_credentials"
        scheme, _, value = request.headers["authorization"].partition(" ")
        assert scheme == "Basic"
        client_id, _, secret = base64.b64decode(value).decode().partition(":")
        self.sent.append((client_id, unquote(secret)))
        if self.answers:
            return self.answers.pop(0)(request)
        if (client_id, secret) != (CLIENT_ID, self.secret):
            return reply(401, {"error": "invalid_client"})
        token = f"tok-{len(self.issued) + 1}"
        self.issued.append(token)
        return reply(200, token_body(token))

    def then(self, *answers: Answer) -> None:
        self.answers.extend(answers)


def reply(code: int, content: bytes | Any, **headers: str) -> httpx.Response:
    """An answer as a server streams it (``httpx.Response(content=...)`` would be read already,
    and the client reads the body itself, bounded)."""
    if not isinstance(content, bytes):
        content = json.dumps(content).encode()
        headers.setdefault("Content-Type", "application/json")
    return httpx.Response(code, headers=headers, stream=httpx.ByteStream(content))


def token_body(token: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": token,
        "token_type": "bearer",
        "expires_in": LIFETIME,
        "scope": "read write",
        "extensions": {"provider_slug": "acme"},
    }
    body.update(fields)
    return body


def status(code: int, **headers: str) -> Answer:
    return lambda request: reply(code, {"error": f"e{code}"}, **headers)


def body(content: bytes | dict[str, Any]) -> Answer:
    return lambda request: reply(200, content)


class FakeSource:
    """A credential source whose secret the test changes; counts its reads."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.secret = SECRET
        self.reads = 0
        self.error: Exception | None = None

    def read(self) -> Credentials:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return Credentials(CLIENT_ID, Secret(self.secret), source=self.name, version=self.secret)

    def version(self) -> str:
        return self.secret

    def can_change(self) -> bool:
        return True

    def close(self) -> None:
        pass


class FakeSink:
    """A token sink that keeps what it was given; ``fail`` makes writes raise SinkError."""

    def __init__(self, name: str, *, readiness: bool = True, pause: float = 0.0) -> None:
        self.name = name
        self.readiness = readiness
        self.pause = pause
        self.fail: BaseException | None = None
        self.written: list[str] = []

    def check(self) -> None:
        pass

    def write(self, token: Token) -> None:
        time.sleep(self.pause)
        if self.fail is not None:
            raise self.fail
        self.written.append(token.access_token.reveal())

    def settle(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass

    @property
    def holds(self) -> str | None:
        return self.written[-1] if self.written else None


class Recording:
    """A Recorder (agent.recorder.Recorder) that keeps every report."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.broken: set[str] = set()

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: object) -> None:
            if name in self.broken:
                raise RuntimeError(f"{name} is broken")
            self.calls.append((name, args))

        return record

    def of(self, name: str) -> list[tuple[object, ...]]:
        return [args for called, args in self.calls if called == name]


class World:
    """One profile, and everything around it the tests drive."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        sinks: int = 2,
        timing: Timing | None = None,
        state_dir: Path | None = None,
        policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = Clock()
        self.server = AuthServer()
        self.source = FakeSource()
        self.sinks = [FakeSink(f"sink-{n}") for n in range(sinks)]
        self.metrics: Any = Recording()
        self.http = httpx.Client(transport=httpx.MockTransport(self.server.handle))
        log = logging.getLogger("test.profile")
        self.profile = Profile(
            "p",
            chain=SourceChain([self.source], profile="p", logger=log),
            client=TokenClient(
                token_url="https://auth.example/v1/oauth/token",
                profile="p",
                http=self.http,
                policy=policy or RetryPolicy(max_retries=0),
                clock=self.clock,
                logger=log,
            ),
            sinks=self.sinks,
            store=StateStore(state_dir or tmp_path / "state"),
            timing=timing or Timing(),
            clock=self.clock,
            rng=rng,
            logger=log,
            metrics=self.metrics,
        )

    def refresh(self, reason: Reason) -> Outcome:
        return self.profile.refresh(reason)

    def wait(self, outcome: Outcome) -> float:
        """Seconds from now until the run the outcome asks for."""
        return (outcome.next_at - self.clock.now).total_seconds()

    def held(self) -> str:
        assert self.profile.token is not None
        return self.profile.token.access_token.reveal()

    def requests(self, outcome: str | None = None) -> int:
        return len([a for a in self.metrics.of("token_request") if outcome in (None, a[1])])


MakeWorld = Callable[..., World]


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[MakeWorld]:
    made: list[World] = []

    def make(**options: Any) -> World:
        made.append(World(tmp_path / str(len(made)), **options))
        return made[-1]

    yield make
    for each in made:
        each.profile.close()
        each.http.close()


@pytest.fixture
def world(make_world: MakeWorld) -> World:
    return make_world()


# --------------------------------------------------------------------------- a new token
def test_the_first_token_goes_to_every_sink_and_is_scheduled_by_the_formula(
    world: World,
) -> None:
    outcome = world.refresh(Reason.START)
    assert outcome.ok and outcome.new_token and outcome.error is None
    assert world.profile.state is State.OK
    assert world.server.sent == [(CLIENT_ID, SECRET)]
    assert [sink.written for sink in world.sinks] == [["tok-1"], ["tok-1"]]
    assert world.held() == "tok-1" and world.profile.last_refresh == world.clock.now
    # 1 h: refreshed when 10 % is left (6 min > the 60 s margin), less up to 5 % jitter
    assert 0.95 * 0.9 * LIFETIME <= world.wait(outcome) <= 0.9 * LIFETIME
    assert world.profile.seen_until() == world.clock.now + timedelta(seconds=LIFETIME)
    assert world.metrics.of("token_request") == [("p", "ok")]
    assert world.metrics.of("sink_write") == [("p", "sink-0", "ok"), ("p", "sink-1", "ok")]
    assert world.metrics.of("state")[-1] == ("p", "ok")


def test_a_scheduled_refresh_uses_the_credentials_in_use(world: World) -> None:
    first = world.refresh(Reason.START)
    reads = world.source.reads
    world.clock.now = first.next_at
    outcome = world.refresh(Reason.SCHEDULE)
    assert outcome.ok and outcome.new_token
    assert world.source.reads == reads  # version polls find rotations; the schedule does not read
    assert [sink.holds for sink in world.sinks] == ["tok-2", "tok-2"]
    assert 0.95 * 0.9 * LIFETIME <= world.wait(outcome) <= 0.9 * LIFETIME


def test_with_polling_off_every_scheduled_refresh_reads_the_sources(
    make_world: MakeWorld,
) -> None:
    world = make_world(timing=Timing(reread_on_schedule=True))
    world.refresh(Reason.START)
    reads = world.source.reads
    world.refresh(Reason.SCHEDULE)
    assert world.source.reads == reads + 1


def test_the_same_token_back_is_neither_rewritten_nor_a_new_token(world: World) -> None:
    world.refresh(Reason.START)
    world.clock.advance(600)
    world.server.then(body(token_body("tok-1", expires_in=100)))
    outcome = world.refresh(Reason.SCHEDULE)
    assert outcome.ok and not outcome.new_token
    assert [sink.written for sink in world.sinks] == [["tok-1"], ["tok-1"]]
    assert world.metrics.of("token_request")[-1] == ("p", "reused")
    assert outcome.next_at == world.clock.now + timedelta(seconds=100)  # at its (earlier) expiry


class Drifting(random.Random):
    """A random source whose every ``uniform`` lands elsewhere in its range: a jitter drawn
    again shows as another time."""

    def __init__(self) -> None:
        super().__init__(0)
        self.draws = 0

    def uniform(self, a: float, b: float) -> float:
        self.draws += 1
        return a + (b - a) * ((self.draws * 0.37) % 1)


def test_the_refresh_time_is_drawn_once_per_token(make_world: MakeWorld) -> None:
    """The jitter is drawn when a token is obtained; asking again (due(), a coalesced SIGHUP,
    a sink retry before it is due) gives the same time, so the schedule has one target."""
    world = make_world(rng=Drifting())
    world.sinks[1].fail = SinkError("disk full")
    first = world.refresh(Reason.START)
    planned = world.profile.due()
    assert world.profile.due() == world.profile.due() == planned
    assert first.next_at < planned  # the sink retry comes first
    world.clock.advance(2)
    assert world.refresh(Reason.RETRY).next_at < planned  # still failing: retried again
    world.sinks[1].fail = None
    world.clock.advance(4)
    retried = world.refresh(Reason.RETRY)
    assert retried.ok and not retried.new_token and retried.next_at == planned
    world.clock.advance(11)
    coalesced = world.refresh(Reason.SIGHUP)  # older than 10 s: a new token
    assert coalesced.new_token and world.profile.due() == coalesced.next_at
    assert world.refresh(Reason.SIGHUP).next_at == coalesced.next_at  # coalesced: the same
    assert world.profile.due() == coalesced.next_at
    # the next token draws its own
    obtained = world.clock.now
    assert coalesced.next_at - obtained != planned - (obtained - timedelta(seconds=17))


# ------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("code", [500, 502, 503, 504, 408])
def test_a_5xx_keeps_the_token_and_backs_off_from_seconds(world: World, code: int) -> None:
    world.refresh(Reason.START)
    waits = []
    for _ in range(5):
        world.server.then(status(code))
        outcome = world.refresh(Reason.SCHEDULE)
        assert not outcome.ok and isinstance(outcome.error, AuthServerUnavailable)
        waits.append(world.wait(outcome))
    assert world.profile.state is State.DEGRADED
    assert world.held() == "tok-1" and [s.written for s in world.sinks] == [["tok-1"]] * 2
    assert 1.5 <= waits[0] <= 2 and 24 <= waits[4] <= 32  # doubling from 2 s
    assert world.profile.last_error is not None and str(code) in world.profile.last_error
    assert world.requests("unavailable") == 5
    world.server.then(status(503))
    world.clock.advance(LIFETIME)  # the token has expired: the cap drops to 30 s
    outcome = world.refresh(Reason.RETRY)
    assert world.profile.state is State.EXPIRED and world.wait(outcome) <= 30
    assert world.refresh(Reason.RETRY).ok  # and a recovered server ends it
    assert world.profile.state is State.OK and world.profile.last_error is None
    world.server.then(status(code))
    outcome = world.refresh(Reason.REFRESH)
    assert 1.5 <= world.wait(outcome) <= 2  # the backoff starts again from its first step


def test_a_429s_retry_after_is_honoured_up_to_its_cap(world: World) -> None:
    code = 429
    world.server.then(status(code, **{"Retry-After": "120"}))
    outcome = world.refresh(Reason.START)  # no token held: at most 30 s
    assert not outcome.ok and world.wait(outcome) == 30
    assert world.profile.state is State.EXPIRED
    assert world.refresh(Reason.RETRY).ok
    world.server.then(status(code, **{"Retry-After": "120"}))
    outcome = world.refresh(Reason.REFRESH)  # a valid token held: obeyed, up to 5 minutes
    assert world.profile.state is State.DEGRADED and 120 <= world.wait(outcome) <= 300
    later = format_datetime(world.clock.now + timedelta(days=3), usegmt=True)
    world.server.then(status(code, **{"Retry-After": later}))
    outcome = world.refresh(Reason.REFRESH)
    assert world.wait(outcome) == 300


def test_a_429_without_retry_after_backs_off_like_a_5xx(world: World) -> None:
    world.refresh(Reason.START)
    world.server.then(status(429))
    outcome = world.refresh(Reason.REFRESH)
    assert isinstance(outcome.error, AuthServerUnavailable) and 1.5 <= world.wait(outcome) <= 2
    assert world.requests("rate_limited") == 1


@pytest.mark.parametrize("code", [400, 405])
def test_a_400_is_misconfigured_retried_slowly_and_the_token_kept(world: World, code: int) -> None:
    world.refresh(Reason.START)
    world.clock.now = world.profile.due()
    world.server.then(status(code))
    outcome = world.refresh(Reason.SCHEDULE)
    assert isinstance(outcome.error, RequestRejected) and "answered" in str(outcome.error)
    assert world.profile.state is State.MISCONFIGURED
    assert 45 <= world.wait(outcome) <= 60
    assert world.held() == "tok-1" and world.requests("misconfigured") == 1
    assert len(world.server.sent) == 2  # never retried fast


def test_a_401_with_unchanged_credentials_rereads_once_then_backs_off(world: World) -> None:
    world.refresh(Reason.START)
    world.clock.advance(60)
    world.server.secret = "rotated-at-the-server"  # the source still has the old one
    reads = world.source.reads
    outcome = world.refresh(Reason.REFRESH)
    assert isinstance(outcome.error, CredentialsRejected)
    assert world.source.reads == reads + 2  # the trigger's read, and the 401's re-read
    assert len(world.server.sent) == 2  # not sent again: the credentials did not change
    assert world.profile.state is State.DEGRADED and world.held() == "tok-1"
    assert 45 <= world.wait(outcome) <= 60
    assert world.requests("rejected") == 1
    assert world.metrics.of("rotation") == []
    # no valid token: EXPIRED, and a minute at most between attempts
    world.clock.advance(LIFETIME)
    for _ in range(6):
        outcome = world.refresh(Reason.RETRY)
    assert world.profile.state is State.EXPIRED and 45 <= world.wait(outcome) <= 60


def test_a_401_with_changed_credentials_is_sent_again_at_once(world: World) -> None:
    world.refresh(Reason.START)
    world.clock.now = world.profile.due()
    world.server.secret = world.source.secret = "rotated"  # a rotation no poll has seen yet
    outcome = world.refresh(Reason.SCHEDULE)  # sent with the credentials in use
    assert outcome.ok and outcome.new_token
    assert world.server.sent[1:] == [(CLIENT_ID, SECRET), (CLIENT_ID, "rotated")]
    assert world.profile.credentials is not None
    assert world.profile.credentials.client_secret.reveal() == "rotated"
    assert world.metrics.of("trigger") == [("p", "401")]
    assert world.metrics.of("rotation") == [("p", "401")]
    assert [sink.holds for sink in world.sinks] == ["tok-2", "tok-2"]
    world.clock.advance(60)
    world.refresh(Reason.REFRESH)  # the new credentials are in use now: no second rotation
    assert world.metrics.of("rotation") == [("p", "401")]


def test_a_401_after_the_resend_is_final_without_a_third_request(world: World) -> None:
    world.refresh(Reason.START)
    world.clock.advance(60)
    world.server.secret = "rotated-at-the-server"
    world.source.secret = "also-wrong"  # the store changed, but not to the server's secret
    outcome = world.refresh(Reason.SCHEDULE)
    assert isinstance(outcome.error, CredentialsRejected)
    assert world.server.sent[1:] == [(CLIENT_ID, SECRET), (CLIENT_ID, "also-wrong")]
    assert world.requests("rejected") == 1  # one refresh, one counted request outcome
    assert world.metrics.of("rotation") == [("p", "401")]  # new credentials were used
    assert world.profile.state is State.DEGRADED and world.held() == "tok-1"


def test_a_401_whose_re_read_fails_stands_and_is_logged(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.refresh(Reason.START)
    world.clock.now = world.profile.due()
    world.server.secret = "rotated-at-the-server"
    world.source.error = SourceUnavailable("vault at https://vault.internal:8200 is sealed")
    with caplog.at_level(logging.WARNING):
        outcome = world.refresh(Reason.SCHEDULE)  # sent with the credentials in use
    assert isinstance(outcome.error, CredentialsRejected)
    assert len(world.server.sent) == 2
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "source_error"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "re-reading the credentials failed" in warnings[0].getMessage()
    assert "sealed" in warnings[0].getMessage()


def test_a_401_on_a_retry_still_re_reads(make_world: MakeWorld) -> None:
    world = make_world(policy=RetryPolicy(max_retries=1, initial_seconds=0.01))
    world.refresh(Reason.START)
    world.clock.now = world.profile.due()
    world.server.secret = world.source.secret = "rotated"
    world.server.then(status(503))
    outcome = world.refresh(Reason.SCHEDULE)
    assert outcome.ok and outcome.new_token
    assert world.server.sent[1:] == [(CLIENT_ID, SECRET)] * 2 + [(CLIENT_ID, "rotated")]
    assert world.requests("ok") == 2  # the start's and this one's


@pytest.mark.parametrize(
    "answer",
    [
        body(b"<html>captive portal</html>"),
        body(b"[1, 2]"),
        body(token_body("")),
        body(token_body("has space")),
        body(token_body("tok-x", token_type="mac")),
        body(token_body("tok-x", expires_in=0)),
        body(token_body("tok-x", expires_in="3600")),
        body({"token_type": "bearer", "expires_in": 60}),
    ],
    ids=["html", "array", "empty", "not-b64token", "mac", "expires-0", "expires-str", "none"],
)
def test_a_protocol_error_writes_nothing_and_retries_like_a_5xx(
    world: World, answer: Answer
) -> None:
    world.refresh(Reason.START)
    world.server.then(answer)
    outcome = world.refresh(Reason.REFRESH)
    assert not outcome.ok and isinstance(outcome.error, AuthServerUnavailable)
    assert world.requests("protocol_error") == 1
    assert world.held() == "tok-1" and [s.written for s in world.sinks] == [["tok-1"]] * 2
    assert world.profile.state is State.DEGRADED and 1.5 <= world.wait(outcome) <= 2


def test_a_source_down_keeps_the_token(world: World) -> None:
    world.refresh(Reason.START)
    world.source.error = SourceUnavailable("vault is sealed")
    outcome = world.refresh(Reason.ROTATION)
    assert isinstance(outcome.error, SourceUnavailable) and world.held() == "tok-1"
    assert world.profile.state is State.DEGRADED and 1.5 <= world.wait(outcome) <= 2
    assert len(world.server.sent) == 1


# ------------------------------------------------------------------------------- the sinks
def test_a_failed_sink_gets_the_newest_token_when_it_recovers(world: World) -> None:
    good, bad = world.sinks
    bad.fail = SinkError("disk full")
    outcome = world.refresh(Reason.START)
    assert not outcome.ok and outcome.new_token and isinstance(outcome.error, SinkError)
    assert "sink-1" in str(outcome.error) and "sink-0" not in str(outcome.error)
    assert world.profile.state is State.DEGRADED
    assert good.written == ["tok-1"] and bad.written == []
    assert 1.5 <= world.wait(outcome) <= 2
    assert world.profile.seen_until() is None  # consumers of sink-1 have no token
    # retried on a backoff without a new request while the token is not due
    world.clock.advance(2)
    outcome = world.refresh(Reason.RETRY)
    assert not outcome.ok and not outcome.new_token and 3 <= world.wait(outcome) <= 4
    assert len(world.server.sent) == 1 and good.written == ["tok-1"]
    # a newer token arrives while the sink is still down: it owes that one now
    world.clock.advance(60)
    world.refresh(Reason.REFRESH)
    assert good.written == ["tok-1", "tok-2"] and bad.written == []
    tok2_expires = world.clock.now + timedelta(seconds=LIFETIME)
    bad.fail = None
    world.clock.advance(2)
    outcome = world.refresh(Reason.RETRY)
    assert outcome.ok and world.profile.state is State.OK
    assert bad.written == ["tok-2"]  # the newest, never the older one it missed
    assert good.written == ["tok-1", "tok-2"]  # a sink that has it is not written again
    assert len(world.server.sent) == 2
    assert world.profile.seen_until() == tok2_expires
    assert ("p", "sink-1", "error") in world.metrics.of("sink_write")


def test_a_sink_still_down_when_the_token_is_due_gets_the_next_one(world: World) -> None:
    world.sinks[1].fail = SinkError("read-only")
    world.refresh(Reason.START)
    world.clock.advance(LIFETIME - 1)  # a second before tok-1 expires
    world.sinks[1].fail = None
    outcome = world.refresh(Reason.RETRY)  # due: a new token, for every sink
    assert outcome.ok and outcome.new_token
    assert [sink.written for sink in world.sinks] == [["tok-1", "tok-2"], ["tok-2"]]


def test_a_sighup_with_a_sink_unwritten_is_not_coalesced(world: World) -> None:
    world.sinks[0].fail = SinkError("gone")
    world.refresh(Reason.START)
    world.sinks[0].fail = None
    assert world.refresh(Reason.SIGHUP).ok
    assert len(world.server.sent) == 2 and world.sinks[0].written == ["tok-2"]


def test_a_sighup_is_coalesced_only_when_every_sink_has_the_token(world: World) -> None:
    world.sinks[1].fail = SinkError("down")
    world.server.then(body(token_body("short", expires_in=4)))
    world.refresh(Reason.START)
    world.clock.advance(3)  # due (half of 4 s): the server hands the same token back
    world.server.then(body(token_body("short", expires_in=1)))
    handed_back = world.refresh(Reason.SCHEDULE)
    assert not handed_back.ok and world.profile.state is State.DEGRADED  # sink-1 lacks it
    world.sinks[1].fail = None
    assert world.refresh(Reason.SIGHUP).new_token  # sink-1 never had it: not coalesced
    assert world.sinks[1].written == ["tok-1"]


# ----------------------------------------------------------------------------- restore
def test_a_recorded_token_is_put_back_into_every_sink_without_a_request(
    make_world: MakeWorld, tmp_path: Path
) -> None:
    first = make_world(state_dir=tmp_path / "shared")
    first.refresh(Reason.START)
    again = make_world(state_dir=tmp_path / "shared")  # a restart
    again.clock.now = first.clock.now + timedelta(seconds=60)
    assert again.profile.restore()
    assert again.held() == "tok-1" and again.profile.state is State.OK
    assert [sink.written for sink in again.sinks] == [["tok-1"], ["tok-1"]]
    assert again.server.sent == [] and again.source.reads == 1
    assert again.profile.seen_until() == first.clock.now + timedelta(seconds=LIFETIME)
    since_obtained = (again.profile.due() - first.clock.now).total_seconds()
    assert 0.95 * 0.9 * LIFETIME <= since_obtained <= 0.9 * LIFETIME
    assert again.metrics.of("token_request") == []  # not a new token


def test_with_every_source_down_a_recorded_token_is_kept_degraded(
    make_world: MakeWorld, tmp_path: Path
) -> None:
    make_world(state_dir=tmp_path / "shared").refresh(Reason.START)
    again = make_world(state_dir=tmp_path / "shared")
    again.source.error = SourceUnavailable("vault is sealed")
    with pytest.raises(SourceUnavailable):
        again.profile.restore()
    assert again.held() == "tok-1" and again.profile.state is State.DEGRADED
    assert [sink.holds for sink in again.sinks] == ["tok-1", "tok-1"]
    assert "vault is sealed" in (again.profile.last_error or "")


def test_a_sink_that_fails_while_the_recorded_token_is_put_back_is_retried(
    make_world: MakeWorld, tmp_path: Path
) -> None:
    """A restart whose put-back fails for one sink: that sink owes the recorded token, the
    profile is degraded until it holds it, and it is retried soon, without a request."""
    make_world(state_dir=tmp_path / "shared").refresh(Reason.START)
    again = make_world(state_dir=tmp_path / "shared")  # a restart
    again.clock.advance(60)
    again.sinks[1].fail = SinkError("disk full")
    assert again.profile.restore()
    assert again.held() == "tok-1" and [s.written for s in again.sinks] == [["tok-1"], []]
    assert again.profile.state is State.DEGRADED
    assert "sink-1" in (again.profile.last_error or "")
    assert again.metrics.of("state")[-1] == ("p", "degraded")
    assert again.profile.seen_until() is None  # consumers of sink-1 have no token
    standing = again.profile.standing()
    assert not standing.ok and isinstance(standing.error, SinkError)
    assert 1.5 <= again.wait(standing) <= 2  # a sink retry, not the token's refresh time
    again.clock.advance(2)
    still = again.refresh(Reason.RETRY)
    assert not still.ok and again.profile.state is State.DEGRADED
    again.sinks[1].fail = None
    again.clock.now = still.next_at
    outcome = again.refresh(Reason.RETRY)
    assert outcome.ok and not outcome.new_token and again.profile.state is State.OK
    assert [s.written for s in again.sinks] == [["tok-1"], ["tok-1"]]  # newest wins, once each
    assert again.server.sent == [] and again.profile.last_error is None
    assert again.profile.standing().ok


def test_with_every_source_down_a_sink_that_missed_the_recorded_token_does_not_wait(
    make_world: MakeWorld, tmp_path: Path
) -> None:
    """The sink retry does not stand in for the refresh the profile owes: the sink gets the
    recorded token and the sources are read again on their own backoff."""
    make_world(state_dir=tmp_path / "shared").refresh(Reason.START)
    again = make_world(state_dir=tmp_path / "shared")
    again.server.issued.append("tok-1")  # the first run's: this server issues tok-2 next
    again.source.error = SourceUnavailable("vault is sealed")
    again.sinks[1].fail = SinkError("disk full")
    with pytest.raises(SourceUnavailable):
        again.profile.restore()
    assert again.profile.state is State.DEGRADED and not again.profile.standing().ok
    again.sinks[1].fail = None
    reads = again.source.reads
    outcome = again.refresh(Reason.SCHEDULE)  # what the daemon runs next
    assert [s.written for s in again.sinks] == [["tok-1"], ["tok-1"]]
    assert again.source.reads == reads + 1 and isinstance(outcome.error, SourceUnavailable)
    assert again.profile.state is State.DEGRADED and again.wait(outcome) <= 4  # a backoff
    again.source.error = None
    again.clock.now = outcome.next_at
    assert again.refresh(Reason.RETRY).new_token and again.profile.state is State.OK
    assert [s.holds for s in again.sinks] == ["tok-2", "tok-2"]


def test_a_put_back_failure_is_forgotten_for_a_newer_token(
    make_world: MakeWorld, tmp_path: Path
) -> None:
    make_world(state_dir=tmp_path / "shared").refresh(Reason.START)
    again = make_world(state_dir=tmp_path / "shared")
    again.server.issued.append("tok-1")  # the first run's: this server issues tok-2 next
    again.sinks[0].fail = SinkError("disk full")
    assert again.profile.restore()
    again.sinks[0].fail = None
    again.clock.advance(60)
    assert again.refresh(Reason.REFRESH).new_token  # the recorded one is superseded
    assert [s.written for s in again.sinks] == [["tok-2"], ["tok-1", "tok-2"]]
    assert again.profile.state is State.OK
    again.clock.advance(2)
    assert again.refresh(Reason.RETRY).ok  # nothing owed: a refresh as usual
    assert [s.holds for s in again.sinks] == ["tok-3", "tok-3"]


def test_a_token_handed_back_again_is_degraded_while_a_sink_lacks_it(world: World) -> None:
    world.sinks[1].fail = SinkError("disk full")
    world.refresh(Reason.START)
    world.clock.now = world.profile.due()
    world.server.then(body(token_body("tok-1", expires_in=300)))
    outcome = world.refresh(Reason.SCHEDULE)  # the same token back: not a new token
    assert not outcome.ok and not outcome.new_token and isinstance(outcome.error, SinkError)
    assert world.profile.state is State.DEGRADED
    assert world.metrics.of("state")[-1] == ("p", "degraded")
    assert "sink-1" in (world.profile.last_error or "")
    assert world.wait(outcome) < 300  # the sink is retried before the token's expiry
    world.sinks[1].fail = None
    world.clock.now = outcome.next_at
    world.server.then(body(token_body("tok-1", expires_in=290)))
    outcome = world.refresh(Reason.RETRY)
    assert outcome.ok and world.profile.state is State.OK and world.profile.last_error is None
    assert [s.written for s in world.sinks] == [["tok-1"], ["tok-1"]]


# ---------------------------------------------------------------------- triggers, metrics
def test_a_sighup_burst_makes_one_request_unless_the_credentials_change(world: World) -> None:
    world.refresh(Reason.START)
    for _ in range(50):
        outcome = world.refresh(Reason.SIGHUP)
        assert outcome.ok and not outcome.new_token
    assert len(world.server.sent) == 1  # the token is < 10 s old: nothing to add
    assert 0.95 * 0.9 * LIFETIME <= world.wait(outcome) <= 0.9 * LIFETIME
    world.clock.advance(11)
    assert world.refresh(Reason.SIGHUP).new_token  # older than 10 s: the runbook's re-auth
    assert len(world.server.sent) == 2
    world.server.secret = world.source.secret = "rotated"
    assert world.refresh(Reason.SIGHUP).new_token  # new credentials: at once
    world.source.name = "other"  # the same secret from another source is a change too
    assert world.refresh(Reason.SIGHUP).new_token
    assert world.refresh(Reason.RELOAD).new_token  # new settings: always
    assert len(world.server.sent) == 5
    assert world.metrics.of("trigger").count(("p", "sighup")) == 54


def test_a_rotation_is_counted_once_at_the_first_use_of_new_credentials(world: World) -> None:
    world.refresh(Reason.START)
    world.clock.advance(20)
    assert world.refresh(Reason.REFRESH).ok  # a trigger, same credentials
    assert world.metrics.of("rotation") == []
    world.source.secret = "rotated-but-not-at-the-server"
    outcome = world.refresh(Reason.ROTATION)  # found by a poll; the server rejects it
    assert isinstance(outcome.error, CredentialsRejected)
    assert world.metrics.of("rotation") == [("p", "poll")]
    world.refresh(Reason.RETRY)  # the same new credentials again: not another rotation
    world.refresh(Reason.EVENT)
    assert world.metrics.of("rotation") == [("p", "poll")]
    assert world.metrics.of("trigger") == [("p", "refresh"), ("p", "poll"), ("p", "event")]


def test_refresh_duration_times_the_whole_refresh_sinks_included(
    make_world: MakeWorld,
) -> None:
    world = make_world(sinks=1)
    world.sinks[0].pause = 0.05
    world.refresh(Reason.START)
    world.server.then(status(503))
    world.refresh(Reason.REFRESH)
    world.clock.advance(2)
    world.refresh(Reason.SIGHUP)
    durations = [args[1] for args in world.metrics.of("refresh_duration")]
    assert len(durations) == 3 and all(isinstance(d, float) for d in durations)
    assert durations[0] >= 0.05  # the sink's write is part of it


def test_last_success_and_the_token_gauge_follow_the_injected_clock(world: World) -> None:
    world.refresh(Reason.START)
    assert world.metrics.of("last_success") == [("p", world.clock.now.timestamp())]
    expires = world.clock.now.timestamp() + LIFETIME
    assert world.metrics.of("token") == [("p", "acme", expires)]


# ------------------------------------------------------------------------ nothing escapes
def explode(request: httpx.Request) -> httpx.Response:
    raise KeyError("a bug below the token client")


@pytest.mark.parametrize(
    "break_it",
    [
        lambda w: setattr(w.sinks[0], "fail", RuntimeError("a bug in a sink")),
        lambda w: setattr(w.source, "error", ValueError("a bug in a source")),
        lambda w: w.server.then(explode),
        lambda w: w.server.then(status(302, Location="https://elsewhere.example/")),
        lambda w: w.server.then(status(418)),
    ],
    ids=["sink", "source", "transport", "redirect", "teapot"],
)
def test_nothing_escapes_a_refresh_and_the_profile_goes_on(
    world: World, break_it: Callable[[World], None]
) -> None:
    world.refresh(Reason.START)
    world.clock.advance(60)
    break_it(world)
    outcome = world.refresh(Reason.REFRESH)
    assert not outcome.ok and isinstance(outcome.error, AgentError)
    assert outcome.next_at > world.clock.now and world.held() in world.server.issued
    world.sinks[0].fail = None
    world.source.error = None
    world.clock.now = outcome.next_at
    assert world.refresh(Reason.RETRY).ok  # the profile goes on


def test_a_failure_while_handling_a_failure_still_returns_an_outcome(world: World) -> None:
    world.metrics.broken.add("state")  # every state change raises
    outcome = world.refresh(Reason.START)
    assert not outcome.ok and isinstance(outcome.error, AgentError)
    assert world.wait(outcome) == 30
    assert world.metrics.of("refresh_duration")  # still timed
