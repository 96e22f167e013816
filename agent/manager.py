"""One profile's token: the single path every trigger takes (sources → oauth → sinks → schedule).

``Profile.refresh(reason)`` never raises: it returns an :class:`Outcome` with the time of the
next run. Time (the scheduler), version polls, SIGHUP and 401s all end up here. One refresh,
read top to bottom in :meth:`Profile._refresh`: the credentials (:mod:`agent.sources`), the
token request (:mod:`agent.oauth`), the sinks (:mod:`agent.fanout`), and when to run next
(:mod:`agent.policy`, which also says how long to wait after a failure: :meth:`Profile._failed`).
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

from agent import policy
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
from agent.fanout import FanOut
from agent.fleet.coordinator import Deferred, Fleet, Shared
from agent.masking import Masker
from agent.models import Credentials, Token, rfc3339
from agent.oauth import Fetched, TokenClient
from agent.plugin import TokenSink
from agent.policy import Timing
from agent.recorder import NULL, Recorder
from agent.sources.chain import SourceChain
from agent.state import StateStore

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
class Outcome:
    """What one run of :meth:`Profile.refresh` did."""

    #: a token is held that the sinks have (new, reused or restored)
    ok: bool
    next_at: datetime
    #: a new token was written to the sinks
    new_token: bool = False
    error: AgentError | None = None


class Profile:
    """The state and the refresh path of one profile. Thread-safe (one run at a time).

    Sink writes run under the profile's lock, as part of the refresh: whether every sink has
    the token decides the outcome (``once``'s exit code, the degraded state, when the sinks
    are tried again). A slow sink delays only its own profile (the scheduler gives each profile
    a thread of its own), for at most the sink's timeout; ``on_change`` hooks already run off
    the lock (DESIGN §10).
    """

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
        fleet: Fleet | None = None,
    ) -> None:
        self.name = name
        #: fleet mode (DESIGN §13): the token is shared with the fleet's other agents
        self.fleet = fleet
        self.chain = chain
        self.client = client
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
        self._fanout = FanOut(name, sinks, clock=clock, logger=self._log, metrics=self._metrics)

        self.state = State.STARTING
        self.token: Token | None = None
        self.credentials: Credentials | None = None
        self.last_error: str | None = None
        self.last_refresh: datetime | None = None
        #: failed refreshes (or sink fan-outs) in a row: the retry delays grow with it
        self._failures = 0
        #: the held token's refresh time, drawn once per token (policy.refresh_at's jitter), so
        #: every caller (the schedule, due(), a sink retry's gate) sees one target
        self._planned: tuple[Token, datetime] | None = None
        #: when the sinks that missed the token held are tried again (None: none missed it)
        self._sink_retry_at: datetime | None = None
        #: the last attempt to obtain a token failed, or none could be made (the recorded
        #: token kept with every source down): writing the sinks again does not stand for it
        self._owes_refresh = False
        #: credentials read a moment ago by restore(): the first refresh need not read again
        self._just_read = False

    @property
    def sinks(self) -> list[TokenSink]:
        return self._fanout.sinks

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
        return self._fanout.seen_until(self.token)

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
        self._metrics.token(
            self.name, token.provider_slug, to_wall(self._clock, token.expires_at).timestamp()
        )
        self._metrics.last_success(self.name, to_wall(self._clock, self._clock()).timestamp())

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
            if token is not None and not token.is_valid(now):
                token = None
            if self.fleet is not None:  # the fleet's document first, the newer of the two
                shared = self.fleet.peek(credentials, token)
                if shared is not None:
                    self._adopt_shared(shared, Reason.START, recorded=token)
                    return True
            if token is None:
                return False
            self._owes_refresh = False
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
        self._owes_refresh = True
        self._adopt_recorded(token, State.DEGRADED)
        self.last_error = self._error_text(exc)
        self._log.warning(
            "no credential source answers (%s); keeping the recorded token, valid until %s",
            exc,
            self._when(token.expires_at),
            extra=self._extra("token_restored", expires_at=self._when(token.expires_at)),
        )

    def _adopt_recorded(self, token: Token, state: State) -> None:
        """Hold a token from state_dir and put it back into the sinks (not a new token): a
        sink that fails owes it, and the profile is degraded until every sink holds it."""
        self._hold(token)
        self.last_refresh = token.obtained_at
        self._fanout.put_back(token)
        self._written(token, self._refresh_at(token), new=False, state=state)

    def due(self) -> datetime:
        """When the held token should be refreshed (now if none); the same time at every call
        for one token."""
        if self.token is None:
            return self._clock()
        return self._refresh_at(self.token)

    def standing(self) -> Outcome:
        """What the token held amounts to without a refresh (after :meth:`restore`): ok when
        every sink holds it; ``next_at`` is when it is due, or the sinks' retry before that."""
        with self._lock:
            token = self.token
            if token is None:
                return Outcome(ok=False, next_at=self._clock())
            due = self._refresh_at(token)
            retry_at = self._sink_retry_at
            if not self._fanout.unwritten or retry_at is None:
                return Outcome(ok=True, next_at=due)
            return Outcome(ok=False, next_at=min(due, retry_at), error=self._unwritten_error())

    def _refresh_at(self, token: Token) -> datetime:
        """When ``token`` is due: drawn (with its jitter) once, then the same until another
        token is held, so that repeated calls agree and the schedule has one target."""
        planned = self._planned
        if planned is not None and planned[0] == token:
            return planned[1]
        at = policy.refresh_at(self._timing, token, self._rng)
        self._planned = (token, at)
        return at

    # ---------------------------------------------------------------- refresh
    def refresh(self, reason: Reason, *, final: bool = False) -> Outcome:
        """One refresh for ``reason``; ``final``: no other attempt follows (``once`` exits
        after it), so a failure is reported without a time for the next one."""
        with self._lock:
            trigger = ROTATION_TRIGGERS.get(reason)
            if trigger is not None:
                self._metrics.trigger(self.name, trigger)
            started = time.monotonic()
            try:
                return self._refresh(reason)
            except AgentError as exc:
                return self._failed(exc, final=final)
            except Exception as exc:  # a bug must not stop the schedule
                self._log.exception(
                    "unexpected error while refreshing", extra=self._extra("internal_error")
                )
                try:
                    error = AgentError(f"internal error: {type(exc).__name__}")
                    return self._failed(error, final=final)
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
        """One refresh: credentials → token request → sinks → the next run (raises AgentError)."""
        now = self._clock()
        held = self.token if self.token is not None and self.token.is_valid(now) else None
        # 1. sinks that missed the token held get it again; that is the whole run until the
        #    token is due for replacement, unless a refresh is owed (the last one failed)
        if (
            reason in (Reason.SCHEDULE, Reason.RETRY)
            and self._fanout.unwritten
            and held is not None
        ):
            if not self._owes_refresh and now < self._refresh_at(held):
                return self._deliver(held, new=False)
            if self._owes_refresh:  # consumers get it even if the refresh fails again
                self._fanout.retry(held)

        # 2. the credentials: read again, unless a scheduled refresh may use those in use
        credentials = self._credentials_for(reason)
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
        self._use(credentials, reason)

        # 3. the token request (its fast retries, and a 401's re-read, are the client's); in
        #    fleet mode the fleet's token first, and the request only as its lease holder
        planned: datetime | None = None
        if self.fleet is not None:
            got = self.fleet.obtain(
                credentials, reason.value, self.token, lambda c: self._fetch(c, reason)
            )
            if isinstance(got, Shared):
                return self._adopt_shared(got, reason)
            if isinstance(got, Deferred):
                return Outcome(ok=True, next_at=got.next_at)
            fetched, planned = got.fetched, got.next_at
        else:
            fetched = self._fetch(credentials, reason)
        if fetched.reused:
            return self._reused(fetched.token)

        # 4. a new token: recorded, then written to every sink; scheduled by policy.refresh_at
        token = fetched.token
        self._failures, self.last_error, self._owes_refresh = 0, None, False
        self._hold(token)
        if planned is not None:  # the fleet's refresh time, without per-host jitter
            self._planned = (token, planned)
        self.last_refresh = self._clock()
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
        return self._deliver(token, new=True)

    def _adopt_shared(
        self, shared: Shared, reason: Reason, *, recorded: Token | None = None
    ) -> Outcome:
        """Use the fleet's token (DESIGN §13): recorded and written to every sink when it is
        not the one held (``on_change`` then), else only its next read is planned. At start
        (``recorded``: the state file's token) the sinks get it back like a restored one."""
        token = shared.token
        current = self.token if self.token is not None else recorded
        changed = current is None or current.access_token != token.access_token
        self._failures, self.last_error, self._owes_refresh = 0, None, False
        if not changed and self.token is not None:
            self._planned = (self.token, shared.next_at)
            if self._fanout.unwritten:
                return self._deliver(self.token, new=False)
            return self._written(self.token, shared.next_at, new=False)
        self._hold(token)
        self._planned = (token, shared.next_at)
        self.last_refresh = self._clock()
        assert self.credentials is not None
        if changed:
            self._store.save(
                self.name, self._keyed_hash(self.credentials), token_to_wall(self._clock, token)
            )
            self._metrics.fleet_adoption(self.name)
            self._log.info(
                "adopted the fleet's token (generation %d, minted by %s), expires %s (%s)",
                shared.generation,
                shared.holder,
                self._when(token.expires_at),
                reason.value,
                extra=self._extra(
                    "fleet_adopted",
                    generation=shared.generation,
                    holder=shared.holder,
                    expires_at=self._when(token.expires_at),
                    reason=reason.value,
                ),
            )
        if changed:
            return self._deliver(token, new=True)
        self._fanout.put_back(token)  # at start: the state file's token is the fleet's
        self._succeeded(token)
        return self._written(token, shared.next_at, new=False)

    def _credentials_for(self, reason: Reason) -> Credentials:
        """The credentials to ask with: read from the sources, except the first refresh right
        after restore() read them, and a scheduled refresh of a healthy profile (version polls
        find rotations; with polling off, ``reread_on_schedule`` reads at every refresh)."""
        just_read, self._just_read = self._just_read, False
        reread = not (just_read and reason is Reason.START) and (
            self.credentials is None
            or reason is not Reason.SCHEDULE
            or self._timing.reread_on_schedule
            or self.state is not State.OK
        )
        credentials = self.chain.read() if reread else self.credentials
        assert credentials is not None
        return credentials

    def _recent(self, credentials: Credentials, held: Token | None, now: datetime) -> bool:
        """The held token is younger than SIGHUP_MIN_AGE, minted with these credentials from
        the same source and in every sink: another SIGHUP of a burst has nothing to add."""
        return (
            held is not None
            and not self._fanout.unwritten
            and self.state is State.OK
            and credentials.same_as(self.credentials)
            and self.credentials is not None
            and credentials.source == self.credentials.source  # a change of source rotates
            and timedelta(0) <= now - held.obtained_at < SIGHUP_MIN_AGE
        )

    def _use(self, credentials: Credentials, reason: Reason) -> None:
        """Make ``credentials`` the ones in use; a change (of secret or of source) is a
        rotation, counted at its first use whatever the server answers (DESIGN §11)."""
        if self.credentials is not None and (
            not credentials.same_as(self.credentials)
            or credentials.source != self.credentials.source
        ):
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

    def _fetch(self, credentials: Credentials, reason: Reason) -> Fetched:
        """Ask the auth server (counted once, by outcome). A 401 re-reads the sources (the
        store, not a cache) once; credentials that changed then are a rotation found by the
        401, and are sent at once (DESIGN §2). Unchanged ones leave the 401 standing."""
        previous = self.token if reason is not Reason.FORCE else None
        try:
            try:
                return self._counted(self.client.fetch(credentials, previous=previous))
            except CredentialsRejected:
                fresh = self._reread_after_401()
                if fresh is None or fresh.same_as(credentials):
                    raise
            self._metrics.trigger(self.name, "401")
            self._metrics.rotation(self.name, "401")
            self._remember(fresh)
            return self._counted(self.client.fetch(fresh, previous=previous))
        except AgentError as exc:
            self._count_request(exc)
            raise

    def _counted(self, fetched: Fetched) -> Fetched:
        self._count_request(None, reused=fetched.reused)
        return fetched

    def _reread_after_401(self) -> Credentials | None:
        try:
            return self.chain.read()
        except AgentError as exc:
            self._log.warning(
                "after a 401, re-reading the credentials failed: %s",
                exc,
                extra=self._extra("source_error"),
            )
            return None

    def _reused(self, token: Token) -> Outcome:
        """The server handed back the token held (DESIGN §2): the sinks have it already; ask
        again at its expiry, and past it a few times before that counts as a failure."""
        now = self._clock()
        self._hold(token)
        overdue = policy.reuse_overdue(self._timing, token, now)
        if overdue is not None:
            # the server keeps handing back a token past its expiry: stop polling fast
            raise AuthServerUnavailable(
                f"the auth server still returns the token that expired "
                f"{overdue.total_seconds():.0f}s ago instead of a new one"
            )
        self.last_error, self._owes_refresh = None, False
        self._fanout.retry(token)  # sinks that missed it get it now (it is still the newest)
        if not self._fanout.unwritten:
            self._failures = 0
        self._succeeded(token)
        self._log.info(
            "the auth server returned the token already held; asking again at its expiry %s",
            self._when(token.expires_at),
            extra=self._extra("token_unchanged", expires_at=self._when(token.expires_at)),
        )
        return self._written(
            token,
            policy.reuse_next_at(self._timing, token, now),
            new=False,
            state=State.OK if token.is_valid(now) else State.EXPIRED,
        )

    def _deliver(self, token: Token, *, new: bool) -> Outcome:
        """Write ``token`` (the token held) to the sinks: every sink for a new token, else
        those that missed it. Sinks still unwritten make the profile degraded and are tried
        again on a backoff, before the token is due for replacement."""
        if new:
            self._fanout.publish(token)
        else:
            self._fanout.retry(token)
        if new:
            self._succeeded(token)
        return self._written(token, self._refresh_at(token), new=new)

    def _written(
        self, token: Token, next_at: datetime, *, new: bool, state: State = State.OK
    ) -> Outcome:
        """The state and outcome once ``token``, the token held, went to the sinks (new,
        handed back, restored or retried): ``state`` and ``next_at`` when every sink holds it;
        else the profile is degraded (expired once the token is) and the sinks that missed it
        are tried again on a backoff, before ``next_at``."""
        unwritten = self._fanout.unwritten
        if not unwritten:
            self._sink_retry_at = None
            if state is State.OK:
                self.last_error = None
            self._set_state(state)
            return Outcome(ok=True, next_at=next_at, new_token=new)
        self._failures += 1
        error = self._unwritten_error()
        self.last_error = self._error_text(error)
        self._set_state(State.DEGRADED if token.is_valid(self._clock()) else State.EXPIRED)
        delay = policy.sink_retry_delay(self._timing, self._failures, self._rng)
        self._sink_retry_at = retry_at = self._clock() + delay
        return Outcome(ok=False, next_at=min(next_at, retry_at), new_token=new, error=error)

    def _unwritten_error(self) -> SinkError:
        return SinkError(f"not written: {', '.join(s.name for s in self._fanout.unwritten)}")

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

    def _failed(self, exc: AgentError, *, final: bool = False) -> Outcome:
        """Every failed refresh ends here: the state, the wait (policy.retry_delay), one log
        line; the token held is kept. ``final`` (``once``): the line names no next attempt."""
        self._failures += 1
        self._owes_refresh = True
        now = self._clock()
        held = self.token
        valid = held is not None and held.is_valid(now)
        if isinstance(exc, RequestRejected):
            self._set_state(State.MISCONFIGURED)
        else:
            self._set_state(State.DEGRADED if valid else State.EXPIRED)
        delay = policy.retry_delay(
            self._timing, now=now, held=held, failures=self._failures, error=exc, rng=self._rng
        )
        self.last_error = self._error_text(exc)
        kept = (
            f"; keeping the current token (valid until {self._when(held.expires_at)})"
            if valid and held is not None
            else "; no valid token is held"
        )
        if final:
            self._log.error(
                "refresh failed: %s%s",
                exc,
                kept,
                extra=self._extra("refresh_failed", reason=type(exc).__name__),
            )
            return Outcome(ok=False, next_at=now + delay, error=exc)
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
        if self.fleet is not None:
            self.fleet.close()
        for sink in self.sinks:
            sink.close()
