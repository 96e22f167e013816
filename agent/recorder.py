"""What the agent reports about itself, as a protocol, and a recorder that records nothing.

:class:`agent.metrics.Metrics` (Prometheus, imported only when the health listener is on)
implements :class:`Recorder`; :data:`NULL` stands in everywhere else, so that call sites
report unconditionally and need no ``if metrics is not None`` guards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Recorder(Protocol):
    """The reports of DESIGN §8 and §11, by profile."""

    def token_request(self, profile: str, outcome: str) -> None: ...

    def trigger(self, profile: str, trigger: str) -> None: ...

    def rotation(self, profile: str, trigger: str) -> None: ...

    def sink_write(self, profile: str, sink: str, outcome: str) -> None: ...

    def source_error(self, profile: str, source: str) -> None: ...

    def refresh_duration(self, profile: str, seconds: float) -> None: ...

    def state(self, profile: str, state: str) -> None: ...

    def token(self, profile: str, provider_slug: str | None, expires_at: float) -> None: ...

    def last_success(self, profile: str, at: float) -> None: ...

    def source_in_use(self, profile: str, source: str, sources: Sequence[str]) -> None: ...

    def login_credential_expiry(self, profile: str, method: str, at: float) -> None: ...

    def fleet_adoption(self, profile: str) -> None: ...

    def fleet_lease(self, profile: str, outcome: str) -> None: ...

    def fleet_store_up(self, profile: str, up: bool) -> None: ...

    def proxy_request(self, profile: str, status: int) -> None: ...

    def proxy_added(self, profile: str, seconds: float) -> None: ...

    def proxy_replay(self, profile: str) -> None: ...

    def forget(self, profile: str) -> None: ...


class NullRecorder:
    """Records nothing (``once``, ``check``, an agent without a health listener)."""

    def token_request(self, profile: str, outcome: str) -> None:
        pass

    def trigger(self, profile: str, trigger: str) -> None:
        pass

    def rotation(self, profile: str, trigger: str) -> None:
        pass

    def sink_write(self, profile: str, sink: str, outcome: str) -> None:
        pass

    def source_error(self, profile: str, source: str) -> None:
        pass

    def refresh_duration(self, profile: str, seconds: float) -> None:
        pass

    def state(self, profile: str, state: str) -> None:
        pass

    def token(self, profile: str, provider_slug: str | None, expires_at: float) -> None:
        pass

    def last_success(self, profile: str, at: float) -> None:
        pass

    def source_in_use(self, profile: str, source: str, sources: Sequence[str]) -> None:
        pass

    def login_credential_expiry(self, profile: str, method: str, at: float) -> None:
        pass

    def fleet_adoption(self, profile: str) -> None:
        pass

    def fleet_lease(self, profile: str, outcome: str) -> None:
        pass

    def fleet_store_up(self, profile: str, up: bool) -> None:
        pass

    def proxy_request(self, profile: str, status: int) -> None:
        pass

    def proxy_added(self, profile: str, seconds: float) -> None:
        pass

    def proxy_replay(self, profile: str) -> None:
        pass

    def forget(self, profile: str) -> None:
        pass


NULL: Recorder = NullRecorder()
