"""The agent's time: deadlines on real elapsed time, the wall clock only to show times (DESIGN §10).

:class:`ElapsedClock` is the clock the daemon runs on. It reads like the wall clock (a UTC
``datetime``), but it advances with ``CLOCK_BOOTTIME``, the real time elapsed including time the
machine was suspended, from the wall time at start: a wall-clock step (NTP, an operator,
a VM host) never moves it, so a token's life is what the server gave, however the wall clock
jumps. Times that leave the process (token files, write-back documents, state files,
``/readyz``) are shown on the wall clock with :func:`to_wall`, and read back with
:func:`from_wall`; a plain callable clock (tests) has no offset.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from agent.models import Token

#: a clock: the current time, timezone-aware (the agent's time line)
Clock = Callable[[], datetime]

_NO_OFFSET = timedelta(0)


def utc_now() -> datetime:
    """The wall clock (for display and for components that only show times)."""
    return datetime.now(UTC)


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class ElapsedClock:
    """The wall time at construction plus the real time elapsed since (``CLOCK_BOOTTIME``).

    Calling it gives the agent's "now". :meth:`wall_offset` is how far the wall clock has moved
    away from it since (whole seconds, so a time shown twice renders the same)."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        elapsed: Callable[[], float] = _boottime,
    ) -> None:
        self._wall = wall
        self._elapsed = elapsed
        self._origin = wall() - elapsed()

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self._origin + self._elapsed(), UTC)

    def elapsed(self) -> float:
        """Seconds on the real-elapsed clock (monotonic, suspend included)."""
        return self._elapsed()

    def wall_offset(self) -> timedelta:
        return timedelta(seconds=round(self._wall() - self._elapsed() - self._origin))


def wall_offset(clock: Clock) -> timedelta:
    """Wall clock minus ``clock`` (zero for a clock that is not an :class:`ElapsedClock`)."""
    return clock.wall_offset() if isinstance(clock, ElapsedClock) else _NO_OFFSET


def to_wall(clock: Clock, moment: datetime) -> datetime:
    """A time of ``clock``'s line as the wall clock shows it now."""
    return moment + wall_offset(clock)


def from_wall(clock: Clock, moment: datetime) -> datetime:
    """A wall-clock time (a state file's, across a restart) on ``clock``'s line."""
    return moment - wall_offset(clock)


def token_to_wall(clock: Clock, token: Token) -> Token:
    """``token`` with its times as the wall clock shows them (what sinks and files carry)."""
    offset = wall_offset(clock)
    if not offset:
        return token
    return replace(
        token, obtained_at=token.obtained_at + offset, expires_at=token.expires_at + offset
    )


def token_from_wall(clock: Clock, token: Token) -> Token:
    """A token with wall-clock times (a state file's) on ``clock``'s line."""
    offset = wall_offset(clock)
    if not offset:
        return token
    return replace(
        token, obtained_at=token.obtained_at - offset, expires_at=token.expires_at - offset
    )
