"""One profile's token: the single path every trigger takes (sources → oauth → sinks → schedule).

``Profile.refresh(reason)`` never raises: it returns an :class:`Outcome` with the time of the
next run. Time (the scheduler), version polls, SIGHUP and 401s all end up here.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from agent.clock import Clock, to_wall, token_from_wall, token_to_wall
from agent.errors import (
    AgentError,
    AuthServerUnavailable,
    ConfigError,
    CredentialsRejected,
    RequestRejected,
    SinkError,
    SourceUnavailable,
)
from agent.masking import Masker
from agent.models import Credentials, Token, rfc3339
from agent.oauth import TokenClient
from agent.recorder import NULL, Recorder
from agent.retry import Backoff
from agent.sinks.base import TokenSink
from agent.sources.chain import SourceChain
from agent.state import StateStore

ONE_SECOND = timedelta(seconds=1)
#: SIGHUP bursts: a re-auth only when the token held is at least this old (or the credentials
#: changed); DESIGN §10 "SIGHUP coalesces"
SIGHUP_MIN_AGE = timedelta(seconds=10)


class State(StrEnum):
    STARTING = "starting"  # no attempt finished yet
    OK = "ok"
    DEGRADED = "degraded"  # the last refresh failed; the kept token is still valid
    EXPIRED = "expired"  # no valid token
    MISCONFIGURED = "misconfigured"  # the auth server answered 400/405


class Reason(StrEnum):
    """Why a refresh runs (logged; the rotation triggers re-read the credentials)."""

    START = "start"
    SCHEDULE = "schedule"
    RETRY = "retry"
    ROTATION = "rotation"
    SIGHUP = "sighup"
    RELOAD = "reload"  # SIGHUP changed the profile's settings: always a new token
    EVENT = "event"  # an AWS rotation event (EventBridge → SQS)
    REFRESH = "refresh"  # `dvs-agent refresh` (a consumer got a 401 with the current token)
    FORCE = "force"


#: the trigger label (dvs_agent_triggers_total, dvs_agent_rotations_total) of each reason
#: that is a rotation trigger
ROTATION_TRIGGERS = {
    Reason.ROTATION: "poll",
    Reason.SIGHUP: "sighup",
    Reason.RELOAD: "sighup",
    Reason.EVENT: "event",
    Reason.REFRESH: "refresh",
}


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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one run of :meth:`Profile.refresh` did."""

    #: a token is held that the sinks have (new, reused or restored)
    ok: bool
    next_at: datetime
    #: a new token was written to the sinks
    new_token: bool = False
    error: AgentError | None = None


class Profile:
    """The state and the refresh path of one profile. Thread-safe (one run at a time)."""

    def __init__(
        self,
        name: str,
        *,
        chain: SourceChain,
        client: TokenClient,
        sinks: Sequence[TokenSink],
        store: StateStore,
        timing: Timing,
        clock: Clock,
        redactor: Masker | None = None,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
        metrics: Recorder | None = None,
    ) -> None:
        self.name = name
        self.chain = chain
        self.client = client
        self.sinks = list(sinks)
        self._store = store
        self._timing = timing
        self._clock = clock
        #: every secret and token this profile held, masked in last_error (and, when it is
        #: the log filter, in every log line)
        self._masker = redactor if redactor is not None else Masker()
        self._rng = rng or random.Random()  # noqa: S311 - jitter
        self._log = logger or logging.getLogger("agent")
        self._lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._metrics: Recorder = metrics if metrics is not None else NULL

        self.state = State.STARTING
        self.token: Token | None = None
        self.credentials: Credentials | None = None
        self.last_error: str | None = None
        self.last_refresh: datetime | None = None
        self._failures = 0
        #: credentials read a moment ago by restore(): the first refresh need not read again
        self._just_read = False
        #: sinks that missed the current token (retried until written or superseded)
        self._unwritten: list[TokenSink] = []
        #: what each sink consumers read directly (file sinks) holds: the expiry of its token,
        #: None until written; readiness follows it (DESIGN §10 "Readiness is what consumers see")
        self._seen_until: dict[str, datetime | None] = {
            sink.name: None for sink in self.sinks if sink.readiness
        }

    # ---------------------------------------------------------------- helpers
    def _extra(self, event: str, **fields: object) -> dict[str, object]:
        return {"profile": self.name, "event": event, **fields}

    def _set_state(self, state: State) -> None:
        with self._state_lock:
            self.state = state
            self._metrics.state(self.name, state.value)

    def seen_until(self) -> datetime | None:
        """Until when consumers find a valid token: the held token's expiry, or earlier when a
        file sink still holds an older one (a full disk, an unwritable dir); None: none."""
        token = self.token
        if token is None:
            return None
        until: datetime | None = token.expires_at
        for held in list(self._seen_until.values()):
            if held is None:
                return None
            until = min(until, held) if until is not None else held
        return until

    def check_expiry(self) -> bool:
        """Mark the profile expired once what consumers see has run out (True when that
        happened now): the held token, or the older one a file sink could not replace.

        Runs beside a refresh in progress: a refresh that holds a new token wins.
        """
        token = self.token
        until = self.seen_until()
        if token is None or (until is not None and self._clock() < until):
            return False
        with self._state_lock:
            if self.token is not token or self.state not in (State.OK, State.DEGRADED):
                return False
            self.state = State.EXPIRED
            self._metrics.state(self.name, State.EXPIRED.value)
        if token.is_valid(self._clock()):
            self._log.error(
                "a token file still holds a token that has expired (%s): consumers cannot "
                "use it; the agent holds a valid one but cannot write it there",
                self.last_error or "not written",
                extra=self._extra("token_expired", expires_at=self._when(token.expires_at)),
            )
            return True
        self._log.error(
            "the token expired at %s and no new one could be obtained yet",
            self._when(token.expires_at),
            extra=self._extra("token_expired", expires_at=self._when(token.expires_at)),
        )
        return True

    def _succeeded(self, token: Token) -> None:
        expires = to_wall(self._clock, token.expires_at).timestamp()
        self._metrics.token(self.name, token.provider_slug, expires)
        self._metrics.last_success(self.name, time.time())

    def _remember(self, credentials: Credentials) -> None:
        self._metrics.source_in_use(self.name, credentials.source, self.chain.names)
        self.credentials = credentials
        self._masker.add(credentials.client_secret.reveal())

    def _hold(self, token: Token) -> None:
        self.token = token
        self._masker.add(token.access_token.reveal())

    def _when(self, moment: datetime) -> str:
        """A time of the agent's clock as logs show it (the wall clock, RFC 3339)."""
        return rfc3339(to_wall(self._clock, moment))

    def _error_text(self, exc: BaseException) -> str:
        """An error as /readyz, status and metrics show it: secrets masked, controls escaped."""
        return self._masker.shown(exc)

    def _load(self, fingerprint: str | None) -> Token | None:
        token = self._store.load(self.name, fingerprint)
        return None if token is None else token_from_wall(self._clock, token)

    def _keyed_hash(self, credentials: Credentials) -> str:
        return credentials.fingerprint(self._store.key)

    def check_sinks(self) -> None:
        """Each sink proves at start that it can write (raises SinkError)."""
        for sink in self.sinks:
            sink.check()

    # ---------------------------------------------------------------- restore
    def restore(self) -> bool:
        """Take the recorded token for the current credentials, if still valid.

        Reads the credentials (raises the source's error). The sinks are written again with
        it (files may be gone after a reboot), without counting as a new token. When every
        source is unavailable (a store down at start), the recorded token is used all the same
        while it is valid, the profile is degraded, and the source's error is raised after.
        """
        with self._lock:
            try:
                credentials = self.chain.read()
            except SourceUnavailable as exc:
                self._restore_without_sources(exc)
                raise
            self._remember(credentials)
            self._just_read = True
            token = self._load(self._keyed_hash(credentials))
            now = self._clock()
            if token is None or not token.is_valid(now):
                return False
            self._adopt_recorded(token, State.OK)
            self._succeeded(token)
            self._log.info(
                "reusing the recorded token (provider %s), valid until %s",
                token.provider_slug or "?",
                self._when(token.expires_at),
                extra=self._extra(
                    "token_restored",
                    provider_slug=token.provider_slug,
                    expires_at=self._when(token.expires_at),
                ),
            )
            return True

    def _restore_without_sources(self, exc: SourceUnavailable) -> None:
        token = self._load(None)
        if token is None or not token.is_valid(self._clock()):
            return
        self._adopt_recorded(token, State.DEGRADED)
        self.last_error = self._error_text(exc)
        self._log.warning(
            "no credential source answers (%s); keeping the recorded token, valid until %s",
            exc,
            self._when(token.expires_at),
            extra=self._extra("token_restored", expires_at=self._when(token.expires_at)),
        )

    def _adopt_recorded(self, token: Token, state: State) -> None:
        """Hold a token from state_dir and put it back into the sinks (not a new token)."""
        self._hold(token)
        self._write_sinks(token)
        self._set_state(state)
        self.last_refresh = token.obtained_at

    def due(self) -> datetime:
        """When the held token should be refreshed (now if none)."""
        if self.token is None:
            return self._clock()
        return self._refresh_at(self.token)

    def _refresh_at(self, token: Token) -> datetime:
        delay = self._timing.refresh_delay(token.lifetime)
        delay -= delay * self._rng.uniform(0, self._timing.jitter)
        return token.obtained_at + max(delay, ONE_SECOND)

    # ---------------------------------------------------------------- refresh
    def refresh(self, reason: Reason) -> Outcome:
        with self._lock:
            trigger = ROTATION_TRIGGERS.get(reason)
            if trigger is not None:
                self._metrics.trigger(self.name, trigger)
            started = time.monotonic()
            try:
                return self._refresh(reason)
            except AgentError as exc:
                return self._failed(exc)
            except Exception as exc:  # a bug must not stop the schedule
                self._log.exception(
                    "unexpected error while refreshing", extra=self._extra("internal_error")
                )
                try:
                    return self._failed(AgentError(f"internal error: {type(exc).__name__}"))
                except Exception:  # nothing may escape a refresh, or the profile would freeze
                    self._log.exception("unexpected error", extra=self._extra("internal_error"))
                    return Outcome(
                        ok=False,
                        next_at=self._clock() + self._timing.retry_cap_expired,
                        error=AgentError("internal error"),
                    )
            finally:  # the whole refresh: sources, token request and sinks (DESIGN §11)
                self._metrics.refresh_duration(self.name, time.monotonic() - started)

    def _refresh(self, reason: Reason) -> Outcome:
        now = self._clock()
        held = self.token if self.token is not None and self.token.is_valid(now) else None
        if (
            reason in (Reason.SCHEDULE, Reason.RETRY)
            and self._unwritten
            and held is not None
            and now < self._refresh_at(held)
        ):
            return self._retry_sinks(held)

        just_read, self._just_read = self._just_read, False
        reread = not (just_read and reason is Reason.START) and (
            self.credentials is None
            or reason is not Reason.SCHEDULE
            or self._timing.reread_on_schedule
            or self.state is not State.OK
        )
        credentials = self.chain.read() if reread else self.credentials
        assert credentials is not None
        if reason is Reason.SIGHUP and self._recent(credentials, held, now):
            assert held is not None
            self._log.info(
                "SIGHUP: the credentials are unchanged and the token was obtained %ds ago: "
                "no new request (at most one per %ds)",
                (now - held.obtained_at).total_seconds(),
                SIGHUP_MIN_AGE.total_seconds(),
                extra=self._extra("sighup_coalesced"),
            )
            return Outcome(ok=True, next_at=self._refresh_at(held))
        if self.credentials is not None and (
            not credentials.same_as(self.credentials)
            or credentials.source != self.credentials.source
        ):
            # a rotation: counted at the first use of the new credentials, whatever the answer
            self._metrics.rotation(self.name, ROTATION_TRIGGERS.get(reason, "schedule"))
        if self.credentials is not None and not credentials.same_as(self.credentials):
            self._log.info(
                "new credentials from source %s (client_id %r)",
                credentials.source,
                credentials.client_id,
                extra=self._extra("credentials_changed", source=credentials.source),
            )
        self._remember(credentials)
        if self.token is None:
            # a server may echo the token it gave an earlier run (recorded in state_dir): it
            # must be masked like the tokens held
            recorded = self._load(self._keyed_hash(credentials))
            if recorded is not None:
                self._masker.add(recorded.access_token.reveal())

        try:
            fetched = self.client.fetch(
                credentials,
                previous=self.token if reason is not Reason.FORCE else None,
                reread=self.chain.read,
            )
        except AgentError as exc:
            self._count_request(exc)
            raise
        self._count_request(None, reused=fetched.reused)
        if fetched.credentials is not credentials:
            if not fetched.credentials.same_as(credentials):
                self._metrics.trigger(self.name, "401")
                self._metrics.rotation(self.name, "401")
            self._remember(fetched.credentials)
        now = self._clock()
        if fetched.reused:
            self._hold(fetched.token)
            overdue = now - fetched.token.expires_at
            if overdue > self._timing.reuse_patience:
                # the server keeps handing back a token past its expiry: stop polling fast
                return self._failed(
                    AuthServerUnavailable(
                        f"the auth server still returns the token that expired "
                        f"{overdue.total_seconds():.0f}s ago instead of a new one"
                    )
                )
            self._failures, self.last_error = 0, None
            self._set_state(State.OK if fetched.token.is_valid(now) else State.EXPIRED)
            self._succeeded(fetched.token)
            next_at = max(fetched.token.expires_at, now + self._timing.reuse_poll)
            self._log.info(
                "the auth server returned the token already held; asking again at its expiry %s",
                self._when(fetched.token.expires_at),
                extra=self._extra(
                    "token_unchanged", expires_at=self._when(fetched.token.expires_at)
                ),
            )
            return Outcome(ok=True, next_at=next_at)

        token = fetched.token
        self._failures, self.last_error = 0, None
        self._hold(token)
        self.last_refresh = now
        self._store.save(
            self.name, self._keyed_hash(fetched.credentials), token_to_wall(self._clock, token)
        )
        self._log.info(
            "new token for provider %s, expires %s (%s)",
            token.provider_slug or "?",
            self._when(token.expires_at),
            reason.value,
            extra=self._extra(
                "token_refreshed",
                provider_slug=token.provider_slug,
                expires_at=self._when(token.expires_at),
                reason=reason.value,
                source=fetched.credentials.source,
            ),
        )
        self._unwritten = list(self.sinks)
        return self._retry_sinks(token, new=True)

    def _recent(self, credentials: Credentials, held: Token | None, now: datetime) -> bool:
        """The held token is younger than SIGHUP_MIN_AGE, minted with these credentials from
        the same source and in every sink: another SIGHUP of a burst has nothing to add."""
        return (
            held is not None
            and not self._unwritten
            and self.state is State.OK
            and credentials.same_as(self.credentials)
            and self.credentials is not None
            and credentials.source == self.credentials.source  # a change of source rotates
            and timedelta(0) <= now - held.obtained_at < SIGHUP_MIN_AGE
        )

    def _retry_sinks(self, token: Token, *, new: bool = False) -> Outcome:
        self._unwritten = self._write_sinks(token, only=self._unwritten)
        next_at = self._refresh_at(token)
        if new:
            self._succeeded(token)
        if not self._unwritten:
            self._set_state(State.OK)
            return Outcome(ok=True, next_at=next_at, new_token=new)
        self._failures += 1
        names = ", ".join(sink.name for sink in self._unwritten)
        error = SinkError(f"not written: {names}")
        self.last_error = self._error_text(error)
        self._set_state(State.DEGRADED)
        retry_at = self._clock() + self._backoff(self._timing.retry_first, self._timing.retry_cap)
        return Outcome(ok=False, next_at=min(next_at, retry_at), new_token=new, error=error)

    def _write_sinks(
        self, token: Token, *, only: Sequence[TokenSink] | None = None
    ) -> list[TokenSink]:
        """Write every sink (one failing never blocks the others); returns those that failed."""
        failed = []
        shown = token_to_wall(self._clock, token)
        for sink in self.sinks if only is None else only:
            try:
                sink.write(shown)
            except SinkError as exc:
                failed.append(sink)
                self._metrics.sink_write(self.name, sink.name, "error")
                self._log.error(
                    "cannot write %s: %s",
                    sink.name,
                    exc,
                    extra=self._extra("sink_error", sink=sink.name),
                )
            else:
                if sink.name in self._seen_until:
                    self._seen_until[sink.name] = token.expires_at
                self._metrics.sink_write(self.name, sink.name, "ok")
        return failed

    # ---------------------------------------------------------------- failure
    def _count_request(self, exc: AgentError | None, *, reused: bool = False) -> None:
        if exc is None:
            outcome = "reused" if reused else "ok"
        elif isinstance(exc, CredentialsRejected):
            outcome = "rejected"
        elif isinstance(exc, RequestRejected):
            outcome = "misconfigured"
        elif isinstance(exc, AuthServerUnavailable):
            outcome = exc.outcome
        else:
            outcome = "error"
        self._metrics.token_request(self.name, outcome)

    def _backoff(self, first: timedelta, cap: timedelta) -> timedelta:
        backoff = Backoff(first.total_seconds(), cap.total_seconds(), jitter=0.25)
        return timedelta(seconds=backoff.delay(self._failures - 1, self._rng))

    def _failed(self, exc: AgentError) -> Outcome:
        self._failures += 1
        now = self._clock()
        valid = self.token is not None and self.token.is_valid(now)
        timing = self._timing
        if isinstance(exc, RequestRejected):
            self._set_state(State.MISCONFIGURED)
            delay = self._backoff(timing.rejected_first, timing.rejected_cap)
        elif isinstance(exc, CredentialsRejected):
            self._set_state(State.DEGRADED if valid else State.EXPIRED)
            delay = self._backoff(timing.rejected_first, timing.rejected_cap)
        else:
            self._set_state(State.DEGRADED if valid else State.EXPIRED)
            cap = timing.retry_cap if valid else timing.retry_cap_expired
            delay = self._backoff(timing.retry_first, cap)
            if isinstance(exc, AuthServerUnavailable) and exc.retry_after is not None:
                # Retry-After is obeyed up to the cap, never beyond (DESIGN §10)
                asked = timedelta(seconds=min(max(exc.retry_after, 0.0), cap.total_seconds()))
                delay = max(delay, asked)
        if not valid and isinstance(exc, CredentialsRejected | RequestRejected):
            delay = min(delay, max(timing.retry_cap_expired, timing.rejected_first))
        if valid and self.token is not None and not isinstance(exc, RequestRejected):
            # never sleep through the expiry of the token we hold
            until_expiry = self.token.expires_at - now
            if until_expiry > ONE_SECOND:
                delay = min(delay, until_expiry)
        delay = max(delay, ONE_SECOND)
        self.last_error = self._error_text(exc)
        kept = (
            f"; keeping the current token (valid until {self._when(self.token.expires_at)})"
            if valid and self.token is not None
            else "; no valid token is held"
        )
        self._log.error(
            "refresh failed: %s%s; next attempt in %ds",
            exc,
            kept,
            round(delay.total_seconds()),
            extra=self._extra(
                "refresh_failed",
                reason=type(exc).__name__,
                retry_in=round(delay.total_seconds(), 1),
            ),
        )
        return Outcome(ok=False, next_at=now + delay, error=exc)

    # ---------------------------------------------------------------- polling
    def poll(self) -> bool:
        """Cheap version check of the sources; True when a re-auth is needed now.

        Skipped (False) while a refresh of this profile runs: that refresh reads them anyway.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            result = self.chain.poll()
        except ConfigError as exc:
            self._log.error("source check failed: %s", exc, extra=self._extra("source_error"))
            return False
        finally:
            self._lock.release()
        if result.changed:
            self._log.info(
                "rotation detected: %s", result.detail, extra=self._extra("rotation_detected")
            )
        return result.changed

    def settle(self, timeout: float | None = None) -> bool:
        """Wait for the sinks' background work (``on_change``) to end; True when none runs."""
        return all([sink.settle(timeout) for sink in self.sinks])

    def stop_local(self) -> None:
        """Close the sinks whose close never blocks (file sinks: their hooks are killed), for
        a stop while a refresh still runs and the rest cannot be closed safely."""
        for sink in self.sinks:
            if sink.readiness:
                sink.close()

    def close(self) -> None:
        self.client.close()
        self.chain.close()
        for sink in self.sinks:
            sink.close()
