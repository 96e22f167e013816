"""The token-sink extension point."""

from __future__ import annotations

from typing import Protocol

from agent.models import Token


class TokenSink(Protocol):
    """Writes tokens somewhere consumers read them.

    ``check`` runs at start so that a bad path fails then, not at the first refresh;
    ``write`` raises :class:`agent.errors.SinkError` with a message naming the target.
    """

    #: a short label for logs and metrics, e.g. ``file:/run/dvs-agent/token``
    name: str

    def check(self) -> None: ...

    def write(self, token: Token) -> None: ...

    def close(self) -> None: ...
