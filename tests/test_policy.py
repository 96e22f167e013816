"""agent.policy: the schedule of DESIGN §6 and the retry delays after a failure (pure functions)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from agent import policy
from agent.errors import (
    AgentError,
    AuthServerUnavailable,
    CredentialsRejected,
    RequestRejected,
    SinkError,
    SourceUnavailable,
)
from agent.models import Secret, Token
from agent.policy import Timing

S = timedelta(seconds=1)
H = timedelta(hours=1)
NOW = datetime(2030, 1, 1, tzinfo=UTC)
TIMING = Timing()


class Fixed(random.Random):
    """A random source whose ``uniform(a, b)`` is always at ``share`` of the way from a to b."""

    def __init__(self, share: float) -> None:
        super().__init__(0)
        self.share = share
        self.asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.asked.append((a, b))
        return a + (b - a) * self.share


NO_JITTER, FULL_JITTER = 0.0, 1.0


def token(*, obtained: datetime = NOW, lifetime: timedelta = 24 * H) -> Token:
    return Token(
        access_token=Secret("tok"),
        token_type="bearer",
        expires_in=int(lifetime.total_seconds()),
        obtained_at=obtained,
        expires_at=obtained + lifetime,
    )


def expiring_in(left: timedelta) -> Token:
    """A token obtained an hour ago that has ``left`` to live (negative: expired)."""
    return token(obtained=NOW - H, lifetime=H + left)


def delay(
    error: AgentError,
    *,
    held: Token | None = None,
    failures: int = 1,
    share: float = NO_JITTER,
    timing: Timing = TIMING,
) -> timedelta:
    return policy.retry_delay(
        timing, now=NOW, held=held, failures=failures, error=error, rng=Fixed(share)
    )


def unavailable(retry_after: float | None = None) -> AuthServerUnavailable:
    return AuthServerUnavailable("503", retry_after=retry_after)


# ------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize(
    ("lifetime", "margin", "expected"),
    [
        (24 * H, 60 * S, 21.6 * H),  # the 10 % rule wins over a small margin
        (300 * S, 60 * S, 240 * S),  # the margin wins
        (30 * S, 60 * S, 15 * S),  # shorter than the margin: half its life, no storm
        (1 * S, 60 * S, 1 * S),  # never sooner than 1 s
    ],
)
def test_the_schedule_formula(lifetime: timedelta, margin: timedelta, expected: timedelta) -> None:
    timing = Timing(refresh_before_expiry=margin)
    assert timing.refresh_delay(lifetime) == expected
    held = token(lifetime=lifetime)
    assert policy.refresh_at(timing, held, Fixed(NO_JITTER)) == NOW + expected


def test_jitter_takes_at_most_its_share_off_the_delay() -> None:
    held = token(lifetime=24 * H)
    rng = Fixed(FULL_JITTER)
    assert policy.refresh_at(TIMING, held, rng) == NOW + 21.6 * H * (1 - TIMING.jitter)
    assert rng.asked == [(0, TIMING.jitter)]
    spread = {policy.refresh_at(TIMING, held, random.Random(seed)) for seed in range(200)}
    assert len(spread) > 100  # a fleet does not refresh in lockstep
    assert all(NOW + 21.6 * H * 0.95 <= at <= NOW + 21.6 * H for at in spread)


def test_jitter_never_brings_a_refresh_under_one_second() -> None:
    held = token(lifetime=1 * S)
    assert policy.refresh_at(Timing(jitter=0.5), held, Fixed(FULL_JITTER)) == NOW + S


def test_a_token_handed_back_is_asked_for_at_its_expiry_then_every_few_hundred_ms() -> None:
    early = expiring_in(40 * S)
    assert policy.reuse_next_at(TIMING, early, NOW) == early.expires_at
    late = expiring_in(-5 * S)
    assert policy.reuse_next_at(TIMING, late, NOW) == NOW + TIMING.reuse_poll
    assert policy.reuse_overdue(TIMING, late, NOW) is None  # within reuse_patience
    assert policy.reuse_overdue(TIMING, expiring_in(-11 * S), NOW) == 11 * S


# --------------------------------------------------------------------------- the retries
def test_backoff_doubles_from_first_up_to_the_cap_less_jitter() -> None:
    waits = [policy.backoff(2 * S, 60 * S, n, Fixed(NO_JITTER)) for n in range(1, 8)]
    assert waits == [2 * S, 4 * S, 8 * S, 16 * S, 32 * S, 60 * S, 60 * S]
    assert policy.backoff(2 * S, 60 * S, 1, Fixed(FULL_JITTER)) == 2 * S * 0.75
    assert policy.backoff(2 * S, 60 * S, 10**6, Fixed(NO_JITTER)) == 60 * S  # no overflow


@pytest.mark.parametrize(
    "error",
    [
        unavailable(),
        AuthServerUnavailable("protocol", outcome="protocol_error"),
        SourceUnavailable("vault down"),
        AgentError("internal error: KeyError"),
    ],
)
def test_transient_failures_start_at_seconds_and_cap_at_minutes(error: AgentError) -> None:
    held = expiring_in(2 * H)
    assert delay(error, held=held) == 2 * S
    assert delay(error, held=held, share=FULL_JITTER) == 1.5 * S
    assert delay(error, held=held, failures=3) == 8 * S
    assert delay(error, held=held, failures=30) == TIMING.retry_cap


@pytest.mark.parametrize("held", [None, expiring_in(-1 * S)], ids=["none", "expired"])
def test_without_a_valid_token_the_cap_drops_to_30s(held: Token | None) -> None:
    assert delay(unavailable(), held=held, failures=30) == TIMING.retry_cap_expired
    assert delay(unavailable(), held=held, failures=1) == 2 * S


def test_retry_after_is_obeyed_up_to_the_cap_never_beyond() -> None:
    held = expiring_in(2 * H)
    assert delay(unavailable(120), held=held) == 120 * S
    assert delay(unavailable(86_400_000), held=held) == TIMING.retry_cap
    assert delay(unavailable(120), held=None) == TIMING.retry_cap_expired
    assert delay(unavailable(-50), held=held) == 2 * S  # a negative wait is no wait
    # a Retry-After shorter than the backoff reached does not shorten it
    assert delay(unavailable(5), held=held, failures=6) == 64 * S


def test_401_and_400_back_off_slowly_from_a_minute_to_15_minutes() -> None:
    held = expiring_in(2 * H)
    for error in (CredentialsRejected("401"), RequestRejected("400")):
        assert delay(error, held=held) == TIMING.rejected_first
        assert delay(error, held=held, share=FULL_JITTER) == 45 * S
        assert delay(error, held=held, failures=30) == TIMING.rejected_cap
        assert delay(error, held=held, failures=30, timing=Timing(rejected_cap=H)) == H


@pytest.mark.parametrize("error", [CredentialsRejected("401"), RequestRejected("400")])
def test_rejected_without_a_valid_token_waits_at_most_a_minute(error: AgentError) -> None:
    assert delay(error, held=None, failures=30) == max(
        TIMING.retry_cap_expired, TIMING.rejected_first
    )
    slow = Timing(retry_cap_expired=90 * S)
    assert delay(error, held=expiring_in(-S), failures=30, timing=slow) == 90 * S


@pytest.mark.parametrize(
    "error", [unavailable(), unavailable(retry_after=300), CredentialsRejected("401")]
)
def test_a_retry_never_sleeps_through_the_held_tokens_expiry(error: AgentError) -> None:
    assert delay(error, held=expiring_in(20 * S), failures=30) == 20 * S
    assert delay(error, held=expiring_in(1.5 * S), failures=30) == 1.5 * S


def test_a_400_is_not_bounded_by_the_expiry() -> None:
    """The agent is misconfigured: asking again before the expiry would not help."""
    assert delay(RequestRejected("400"), held=expiring_in(20 * S)) == TIMING.rejected_first


def test_the_expiry_bound_leaves_the_last_second_alone() -> None:
    """With 1 s or less left the bound would mean a retry storm: the backoff stays."""
    assert delay(unavailable(), held=expiring_in(0.5 * S), failures=3) == 8 * S


def test_a_retry_waits_at_least_one_second() -> None:
    fast = Timing(retry_first=timedelta(milliseconds=100))
    assert delay(unavailable(), held=expiring_in(2 * H), timing=fast) == S
    assert delay(unavailable(0.2), held=None, timing=fast) == S


def test_the_delays_come_from_the_injected_rng() -> None:
    a = delay(unavailable(), held=None, failures=4, share=0.3)
    assert a == 16 * S - 16 * S * 0.25 * 0.3
    seeded = [
        policy.retry_delay(
            TIMING,
            now=NOW,
            held=None,
            failures=4,
            error=unavailable(),
            rng=random.Random(7),
        )
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_unwritten_sinks_are_retried_on_the_transient_backoff() -> None:
    assert policy.sink_retry_delay(TIMING, 1, Fixed(NO_JITTER)) == TIMING.retry_first
    assert policy.sink_retry_delay(TIMING, 30, Fixed(NO_JITTER)) == TIMING.retry_cap
    assert delay(SinkError("not written"), held=expiring_in(2 * H)) == TIMING.retry_first
