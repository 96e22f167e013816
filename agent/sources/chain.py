"""The fallback chain: the profile's ``sources`` tried in order; the first that answers wins."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.errors import AgentError, SourceEmpty, SourceUnavailable
from agent.models import Credentials
from agent.plugin import CredentialSource


@dataclass(frozen=True, slots=True)
class Poll:
    """What a version poll found."""

    changed: bool
    #: why, for the log line ("version", "source env → vault")
    detail: str = ""


class SourceChain:
    """Reads credentials from the first source of the list that yields them.

    A source that is down while a later one answers is a warning, not a failure. When every
    source fails, the error is "unavailable" (exit 69) if any store was down, else "empty"
    (exit 78: nothing is configured). A source's configuration error propagates at once.
    """

    def __init__(
        self,
        sources: Sequence[CredentialSource],
        *,
        profile: str,
        logger: logging.Logger,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("a source chain needs at least one source")
        self._sources = list(sources)
        self._profile = profile
        self._log = logger
        #: called with a source's name each time it fails (metrics)
        self._on_error = on_error
        self._winner: CredentialSource | None = None
        self._version: str | None = None

    @property
    def names(self) -> list[str]:
        return [source.name for source in self._sources]

    @property
    def current(self) -> str | None:
        """Name of the source that produced the credentials in use."""
        return self._winner.name if self._winner else None

    def read(self) -> Credentials:
        """Read fresh credentials (never cached), remembering which source and version won."""
        failures: list[tuple[CredentialSource, AgentError]] = []
        for source in self._sources:
            try:
                credentials = source.read()
            except (SourceEmpty, SourceUnavailable) as exc:
                failures.append((source, exc))
                self._failed(source)
                continue
            if failures:
                self._log.warning(
                    "using credentials from source %s; earlier sources failed: %s",
                    source.name,
                    "; ".join(f"{s.name}: {e}" for s, e in failures),
                    extra={"profile": self._profile, "source": source.name},
                )
            if self._winner is not None and self._winner is not source:
                self._log.info(
                    "credential source changed from %s to %s",
                    self._winner.name,
                    source.name,
                    extra={"profile": self._profile, "source": source.name},
                )
            self._winner, self._version = source, credentials.version
            return credentials
        raise _combined(failures)

    def can_change(self) -> bool:
        """Whether any source's credentials can change while the agent runs (worth polling)."""
        return any(source.can_change() for source in self._sources)

    def poll(self) -> Poll:
        """Cheap check: has the winning source's version changed, or has an earlier one recovered?

        Only version calls are made; the secret itself is re-read by the caller when this says
        it changed.
        """
        if self._winner is None:
            return Poll(True, "no credentials read yet")
        for source in self._sources:
            if source is self._winner:
                break
            try:
                source.version()
            except (SourceEmpty, SourceUnavailable):
                continue
            return Poll(True, f"source {source.name} answers again (was {self._winner.name})")
        try:
            version = self._winner.version()
        except (SourceEmpty, SourceUnavailable) as exc:
            self._failed(self._winner)
            # The store in use is gone or down: re-read so a later source can take over.
            return Poll(True, f"source {self._winner.name} failed: {exc}")
        if version != self._version:
            return Poll(True, f"source {self._winner.name} has a new version")
        return Poll(False)

    def _failed(self, source: CredentialSource) -> None:
        if self._on_error is not None:
            self._on_error(source.name)

    def close(self) -> None:
        for source in self._sources:
            source.close()


def _combined(failures: list[tuple[CredentialSource, AgentError]]) -> AgentError:
    detail = "; ".join(f"{source.name}: {exc}" for source, exc in failures)
    if any(isinstance(exc, SourceUnavailable) for _, exc in failures):
        return SourceUnavailable(f"no credential source answered: {detail}")
    return SourceEmpty(f"no credentials in any source: {detail}")
