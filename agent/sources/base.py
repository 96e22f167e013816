"""The credential-source extension point."""

from __future__ import annotations

from typing import Protocol

from agent.models import Credentials


class CredentialSource(Protocol):
    """Produces client credentials.

    ``read`` returns the current credentials (raising :class:`agent.errors.SourceEmpty` when
    there is nothing to read and :class:`agent.errors.SourceUnavailable` when the store cannot
    be asked now). ``version`` is a cheap check of what ``read`` would return: it changes when
    the credentials were rotated and is compared for equality only.
    """

    #: "env", "vault", "aws"
    name: str

    def read(self) -> Credentials: ...

    def version(self) -> str: ...

    def can_change(self) -> bool:
        """False when what ``read`` returns cannot change while the agent runs (polling it
        would be a busy loop); stores and files can change."""
        ...

    def close(self) -> None: ...
