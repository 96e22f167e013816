"""The token-sink extension point."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from agent.models import Token, stored_is_newer


class TokenSink(Protocol):
    """Writes tokens somewhere consumers read them.

    ``check`` runs at start so that a bad path fails then, not at the first refresh;
    ``write`` raises :class:`agent.errors.SinkError` with a message naming the target.
    """

    #: a short label for logs and metrics, e.g. ``file:/run/dvs-agent/token``
    name: str
    #: consumers read this sink's target directly (a file): /readyz follows what it holds, and
    #: its close() never blocks (DESIGN §10 "Readiness is what consumers see")
    readiness: bool

    def check(self) -> None: ...

    def write(self, token: Token) -> None: ...

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until work a write started in the background (``on_change``) has ended; True
        when none runs."""
        ...

    def close(self) -> None: ...


def keep_stored(
    stored: Mapping[str, Any] | None, ours: Mapping[str, Any], *, sink: str, log: logging.Logger
) -> bool:
    """Write-back sinks, newest wins: True (logged) when the stored document should stay,
    because it is ours already or expires later than ours."""
    if stored is None:
        return False
    if stored == ours:
        log.debug("%s already holds this token", sink)
        return True
    if stored_is_newer(stored, ours):
        log.debug(
            "%s: newer token already stored (expires %s; ours %s): not written",
            sink,
            stored.get("expires_at"),
            ours["expires_at"],
        )
        return True
    return False
