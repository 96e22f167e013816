"""What the write-back sinks share: the newest token wins (STYLE, Vault Agent)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from agent.models import stored_is_newer


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
