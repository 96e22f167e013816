"""When a profile runs next: the schedule of DESIGN §6 and the retry delays after a failure.

Pure: every function takes the time, the token held, the failure count, the error and the
random source it needs, and only computes (no I/O, no logging, no clock of its own). The
profile (:mod:`agent.manager`) does the I/O and asks here when to come back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.errors import (
    AgentError,
    AuthServerUnavailable,
    CredentialsRejected,
    FleetRejected,
    RequestRejected,
)
from agent.models import Token
from agent.retry import Backoff

ONE_SECOND = timedelta(seconds=1)
#: the retry delays take a random share of up to this off each wait (agent.retry.Backoff)
RETRY_JITTER = 0.25


@dataclass(frozen=True, slots=True)
class Timing:
    """The schedule of DESIGN §6 (all timedeltas)."""

    refresh_before_expiry: timedelta = timedelta(seconds=60)
    #: each delay is shortened by a random fraction up to this, so a fleet does not align
    jitter: float = 0.05
    retry_first: timedelta = timedelta(seconds=2)
    retry_cap: timedelta = timedelta(minutes=5)
    retry_cap_expired: timedelta = timedelta(seconds=30)
    #: after 401 (unchanged credentials) or 400/405: slow, capped
    rejected_first: timedelta = timedelta(minutes=1)
    rejected_cap: timedelta = timedelta(minutes=15)
    #: after the server handed back a token we hold, at and past its expiry
    reuse_poll: timedelta = timedelta(milliseconds=300)
    #: past its expiry, how long the same token may come back before that counts as a failure
    reuse_patience: timedelta = timedelta(seconds=10)
    #: re-read the sources at every scheduled refresh (when version polling is off)
    reread_on_schedule: bool = False

    def refresh_delay(self, lifetime: timedelta) -> timedelta:
        """``max(lifetime - max(margin, lifetime/10), lifetime/2, 1 s)``."""
        margin = max(self.refresh_before_expiry, lifetime / 10)
        return max(lifetime - margin, lifetime / 2, ONE_SECOND)


# ------------------------------------------------------------------------- the schedule
def refresh_at(timing: Timing, token: Token, rng: random.Random) -> datetime:
    """When ``token`` should be replaced: :meth:`Timing.refresh_delay` after it was obtained,
    less a random share of up to ``timing.jitter`` of that delay, and never sooner than 1 s.

    Each call draws the jitter again: call it once per token and keep the answer (the profile
    does, :meth:`agent.manager.Profile.due`), so that the schedule has one target."""
    delay = timing.refresh_delay(token.lifetime)
    delay -= delay * rng.uniform(0, timing.jitter)
    return token.obtained_at + max(delay, ONE_SECOND)


def reuse_next_at(timing: Timing, token: Token, now: datetime) -> datetime:
    """The server handed back the token held (DESIGN §2): ask again right at its expiry, and
    past it every ``timing.reuse_poll``."""
    return max(token.expires_at, now + timing.reuse_poll)


def reuse_overdue(timing: Timing, token: Token, now: datetime) -> timedelta | None:
    """How long past its expiry the server still hands back ``token``, once that is longer than
    ``timing.reuse_patience`` (then it counts as a failure); None while it is not."""
    overdue = now - token.expires_at
    return overdue if overdue > timing.reuse_patience else None


# --------------------------------------------------------------------------- the retries
def backoff(first: timedelta, cap: timedelta, failures: int, rng: random.Random) -> timedelta:
    """The wait after failure number ``failures`` (1-based) in a row: ``first`` doubling up to
    ``cap``, less a random share of up to :data:`RETRY_JITTER`."""
    wait = Backoff(first.total_seconds(), cap.total_seconds(), jitter=RETRY_JITTER)
    return timedelta(seconds=wait.delay(failures - 1, rng))


def sink_retry_delay(timing: Timing, failures: int, rng: random.Random) -> timedelta:
    """The wait before sinks that missed the token held are written again."""
    return backoff(timing.retry_first, timing.retry_cap, failures, rng)


def retry_delay(
    timing: Timing,
    *,
    now: datetime,
    held: Token | None,
    failures: int,
    error: AgentError,
    rng: random.Random,
) -> timedelta:
    """The wait after a failed refresh (``failures`` in a row, this one included).

    - 400/405 (:class:`RequestRejected`) and 401 with unchanged credentials
      (:class:`CredentialsRejected`): slow, ``rejected_first`` doubling up to ``rejected_cap``;
      with no valid token held, at most ``max(retry_cap_expired, rejected_first)``.
    - everything else (5xx, 429, timeouts, protocol errors, sources, internal errors):
      ``retry_first`` doubling up to ``retry_cap``, or ``retry_cap_expired`` once no valid token
      is held; a ``Retry-After`` is obeyed up to that cap, never beyond (DESIGN §10).
    - except after a 400/405, never past the expiry of a valid token held (when more than 1 s
      of it is left), so a retry runs before consumers are left without one.
    - never less than 1 s.
    """
    valid = held is not None and held.is_valid(now)
    if isinstance(error, FleetRejected):  # the fleet's marker: when the fleet may ask again
        delay = timedelta(seconds=max(error.retry_after, 0.0) + rng.uniform(0, 1))
    elif isinstance(error, RequestRejected | CredentialsRejected):
        delay = backoff(timing.rejected_first, timing.rejected_cap, failures, rng)
        if not valid:
            delay = min(delay, max(timing.retry_cap_expired, timing.rejected_first))
    else:
        cap = timing.retry_cap if valid else timing.retry_cap_expired
        delay = backoff(timing.retry_first, cap, failures, rng)
        if isinstance(error, AuthServerUnavailable) and error.retry_after is not None:
            asked = timedelta(seconds=min(max(error.retry_after, 0.0), cap.total_seconds()))
            delay = max(delay, asked)
    if held is not None and valid and not isinstance(error, RequestRejected):
        until_expiry = held.expires_at - now
        if until_expiry > ONE_SECOND:
            delay = min(delay, until_expiry)
    return max(delay, ONE_SECOND)
