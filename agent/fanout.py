"""A profile's sink fan-out: the token held goes to every sink, and a sink that missed it owes it.

One sink failing never keeps the others from being written. The sinks that failed are
remembered and written again by :meth:`FanOut.retry`, always with the token the profile holds
then (newest wins: a new token replaces what they owed, so an older one is never written
after it). Sinks that consumers read directly (``readiness``: file sinks) remember until when
the token they hold is valid, which is what readiness follows (DESIGN §10 "Readiness is what
consumers see"). Each write is counted (``dvs_agent_sink_writes_total``) and a failure logged.

The fan-out runs on the thread of the refresh that obtained the token, under that profile's
lock (see :class:`agent.manager.Profile`): its result is part of the refresh's outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from agent.clock import Clock, token_to_wall
from agent.errors import SinkError
from agent.models import Token
from agent.plugin import TokenSink
from agent.recorder import Recorder


class FanOut:
    """Writes one profile's token to its sinks. Not thread-safe: the profile serialises."""

    def __init__(
        self,
        profile: str,
        sinks: Sequence[TokenSink],
        *,
        clock: Clock,
        logger: logging.Logger,
        metrics: Recorder,
    ) -> None:
        self._profile = profile
        self.sinks = list(sinks)
        self._clock = clock
        self._log = logger
        self._metrics = metrics
        #: sinks that missed the token held (written again until written or superseded)
        self._unwritten: list[TokenSink] = []
        #: the expiry of the token each readiness sink holds, None until one is written
        self._seen_until: dict[str, datetime | None] = {
            sink.name: None for sink in self.sinks if sink.readiness
        }

    @property
    def unwritten(self) -> tuple[TokenSink, ...]:
        """The sinks that do not hold the token held yet."""
        return tuple(self._unwritten)

    def publish(self, token: Token) -> None:
        """A new token: every sink owes it (whatever an older one owed), and is written now."""
        self._unwritten = list(self.sinks)
        self.retry(token)

    def retry(self, token: Token) -> None:
        """Write ``token``, the newest token held, to the sinks that owe it."""
        self._unwritten = self._write(token, self._unwritten)

    def put_back(self, token: Token) -> None:
        """A token recorded in state_dir back into every sink (files may be gone after a
        reboot): for the sinks it is as a new token is, so one that fails owes it and is
        written again by :meth:`retry` until it holds it or a newer token replaces it."""
        self.publish(token)

    def seen_until(self, held: Token | None) -> datetime | None:
        """Until when consumers find a valid token: the expiry of ``held``, or earlier when a
        readiness sink still holds an older one; None when any of them holds none."""
        if held is None:
            return None
        until: datetime | None = held.expires_at
        for expiry in list(self._seen_until.values()):
            if expiry is None:
                return None
            until = min(until, expiry) if until is not None else expiry
        return until

    def _write(self, token: Token, sinks: Sequence[TokenSink]) -> list[TokenSink]:
        """Write ``token`` to each of ``sinks`` (one failing never blocks the others); returns
        the sinks that failed."""
        failed = []
        shown = token_to_wall(self._clock, token)
        for sink in sinks:
            try:
                sink.write(shown)
            except SinkError as exc:
                failed.append(sink)
                self._metrics.sink_write(self._profile, sink.name, "error")
                self._log.error(
                    "cannot write %s: %s",
                    sink.name,
                    exc,
                    extra={"profile": self._profile, "event": "sink_error", "sink": sink.name},
                )
            else:
                if sink.name in self._seen_until:
                    self._seen_until[sink.name] = token.expires_at
                self._metrics.sink_write(self._profile, sink.name, "ok")
        return failed
