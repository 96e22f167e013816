"""One profile's part in its fleet (DESIGN §13): adopt the shared token, or take the mint lease,
ask the auth server, publish, release; markers for 429s and 401s; the store-down fallback.

:meth:`Fleet.obtain` stands where the token request was (:meth:`agent.manager.Profile._refresh`)
and answers one of:

- :class:`Shared`: a document this agent adopts (written to its sinks and ``state_dir``; no
  request was made);
- :class:`Minted`: this agent asked (as the lease holder, or alone while the store is down) and
  published what it got;
- :class:`Deferred`: the store is down and the token held is still good: this agent mints on
  its own at a moment drawn for it, so that a fleet without its store does not ask at once.

It raises the token request's errors, and :class:`~agent.errors.FleetRejected` /
:class:`~agent.errors.FleetRateLimited` when the fleet's marker says to wait (no request made).

Times: whatever the store holds is judged on the store's clock (the snapshot's ``now``: Redis
``TIME``, Vault's ``Date``), converted to the agent's clock from the agent's time just before
the read (so a remaining life is never stretched by the read's latency); no host's wall clock
decides whether a document is fresh.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from agent import policy
from agent.clock import Clock, token_to_wall
from agent.errors import (
    AuthServerUnavailable,
    CredentialsRejected,
    FleetRateLimited,
    FleetRejected,
    FleetStoreError,
    RequestRejected,
)
from agent.fleet.keys import FleetKeys
from agent.masking import Masker
from agent.models import Credentials, Secret, Token, is_access_token, rfc3339
from agent.oauth import Fetched
from agent.plugin import FleetStore, Snapshot, Stored
from agent.policy import Timing
from agent.recorder import NULL, Recorder
from agent.signals import signals_to_main_thread

#: how often an agent waiting for the lease holder reads the document (s), ±POLL_JITTER
POLL = 0.25
POLL_JITTER = 0.2
#: `refresh` (a consumer's 401) mints for the whole fleet at most once per this (s)
REFRESH_MINT_GAP = 10.0
#: adopters read again at the document's refresh_at plus up to this (s), so that a fleet does
#: not read in one instant
ADOPT_SPREAD = 1.0
#: the mint lease of a fleet store kind whose Struct has no ``lease``
DEFAULT_LEASE = timedelta(seconds=30)
#: a waiter passes over a holder that renews its lease without publishing after lease +
#: request_timeout + this
LEASE_GRACE = timedelta(seconds=90)
#: the marker outlives its wait by this much, so that strikes (the backoff's count) survive
MARKER_MEMORY = timedelta(minutes=15)

Role = Literal["minter", "adopter", "alone"]
#: a token request with these credentials (the profile's own, with its 401 re-read)
Mint = Callable[[Credentials], Fetched]


@dataclass(frozen=True, slots=True)
class Shared:
    """A document of the fleet to adopt."""

    token: Token
    #: when this agent reads the store again (the document's refresh_at, spread)
    next_at: datetime
    generation: int
    #: the agent that minted it (``host:pid``)
    holder: str


@dataclass(frozen=True, slots=True)
class Minted:
    """This agent asked the auth server."""

    fetched: Fetched
    #: when the token is due (the published refresh_at, no per-host jitter); None: the
    #: profile's own schedule (it was not published)
    next_at: datetime | None


@dataclass(frozen=True, slots=True)
class Deferred:
    """The store is down: mint alone at ``next_at`` (the token held is good until then)."""

    next_at: datetime


Obtained = Shared | Minted | Deferred


@dataclass(frozen=True, slots=True)
class _Doc:
    token: Token
    refresh_local: datetime
    generation: int
    holder: str
    #: store time of the publish
    published: float


@dataclass(frozen=True, slots=True)
class _Marker:
    not_before: float = 0.0
    rejected_until: float = 0.0
    strikes_busy: int = 0
    strikes_rejected: int = 0
    by: str = "?"
    #: when it was written (the store's clock); None: not said
    at: float | None = None


@dataclass(frozen=True, slots=True)
class _View:
    """A snapshot, checked and converted: what the fleet holds for one key."""

    keys: FleetKeys
    #: the store's time of the read (Unix s) and the agent's just before it
    now: float
    local: datetime
    doc: _Doc | None
    lease_holder: str | None
    marker: _Marker | None
    generation: int

    def store_time(self, moment: datetime) -> float:
        """An agent-clock time as the store's."""
        return self.now + (moment - self.local).total_seconds()

    def local_time(self, store_time: float) -> datetime:
        return self.local + timedelta(seconds=store_time - self.now)


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """What ``status`` shows of a profile's fleet."""

    store: str
    #: None: not asked yet
    up: bool | None
    role: Role | None
    lease_holder: str | None
    generation: int
    last_error: str | None

    def document(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "store_up": self.up,
            "role": self.role,
            "lease_holder": self.lease_holder,
            "generation": self.generation,
            "last_error": self.last_error,
        }


def holder_id() -> str:
    """``host:pid``: who holds a lease, in status and logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Fleet:
    """The fleet protocol for one profile (called under the profile's lock)."""

    def __init__(
        self,
        profile: str,
        store: FleetStore,
        *,
        lease: timedelta,
        token_url: str,
        scope: str | None,
        clock: Clock,
        timing: Timing,
        patience: timedelta,
        stopping: threading.Event,
        masker: Masker,
        holder: str | None = None,
        rng: random.Random | None = None,
        logger: logging.Logger | None = None,
        metrics: Recorder | None = None,
    ) -> None:
        self.profile = profile
        self.store = store
        self._lease = lease
        self._token_url = token_url
        self._scope = scope
        self._clock = clock
        self._timing = timing
        #: how long a waiter waits for a holder that keeps its lease without publishing
        self._patience = patience
        self._stopping = stopping
        self._masker = masker
        self.holder = holder or holder_id()
        self._rng = rng or random.Random()  # noqa: S311 - jitter
        self._log = logger or logging.getLogger("agent.fleet")
        self._metrics: Recorder = metrics if metrics is not None else NULL
        self._up: bool | None = None
        self._role: Role | None = None
        self._lease_holder: str | None = None
        self._generation = 0
        self._last_error: str | None = None
        #: store down: when this agent mints alone (drawn once per token held)
        self._fallback: tuple[Token, datetime] | None = None

    # ------------------------------------------------------------------ public
    def keys(self, credentials: Credentials) -> FleetKeys:
        return FleetKeys.derive(credentials, self._token_url, self._scope)

    def status(self) -> FleetStatus:
        return FleetStatus(
            store=self.store.name,
            up=self._up,
            role=self._role,
            lease_holder=self._lease_holder,
            generation=self._generation,
            last_error=self._last_error,
        )

    def peek(self, credentials: Credentials, recorded: Token | None) -> Shared | None:
        """At start, before the state file is used: the fleet's document if it is adoptable
        and newer than ``recorded`` (the state file's token, valid); never raises."""
        keys = self.keys(credentials)
        try:
            view = self._read(keys)
        except FleetStoreError as exc:
            self._down(exc)
            return None
        doc = view.doc
        if doc is None or view.now >= view.store_time(doc.refresh_local):
            return None
        if (
            recorded is not None
            and recorded.access_token != doc.token.access_token
            and recorded.expires_at > doc.token.expires_at
        ):
            return None  # the recorded token is the newer: it is used, and replaced when due
        return self._adopt(doc)

    def release(self, credentials: Credentials) -> bool:
        """Drop the lease of these credentials' fleet, whoever holds it (raises
        FleetStoreError)."""
        return self.store.clear_lease(self.keys(credentials).key)

    def obtain(
        self,
        credentials: Credentials,
        reason: str,
        held: Token | None,
        mint: Mint,
    ) -> Obtained:
        """The token for a refresh for ``reason`` (a :class:`agent.manager.Reason` value)."""
        keys = self.keys(credentials)
        try:
            view = self._read(keys)
        except FleetStoreError as exc:
            return self._alone(exc, credentials, reason, held, mint)
        # a good document is adopted even while a marker is up: adoption asks nothing
        shared = self._adoptable(view, reason, held)
        if shared is not None:
            return shared
        self._blocked(view, held)
        return self._mint_or_wait(view, credentials, reason, held, mint)

    # ------------------------------------------------------------------ reading
    def _read(self, keys: FleetKeys) -> _View:
        """The fleet's entries for ``keys`` (raises FleetStoreError, also for an entry that
        fails its signature or the token checks: the store is then as good as down)."""
        local = self._clock()
        snapshot = self.store.read(keys.key)
        view = self._view(keys, snapshot, local)
        self._is_up()
        self._generation = view.generation
        self._lease_holder = view.lease_holder
        return view

    def _view(self, keys: FleetKeys, snap: Snapshot, local: datetime) -> _View:
        doc = None if snap.token is None else self._doc(keys, snap, snap.token, local)
        holder = None
        if snap.lease is not None:
            lease = self._opened(keys, "lease", snap.lease)
            holder = str(lease.get("holder", "?"))
        marker = None
        if snap.marker is not None:
            marker = _marker_of(self._opened(keys, "marker", snap.marker), self.store.name)
        return _View(
            keys=keys,
            now=snap.now,
            local=local,
            doc=doc,
            lease_holder=holder,
            marker=marker,
            generation=max(snap.generation, doc.generation if doc is not None else 0),
        )

    def _opened(self, keys: FleetKeys, kind: str, stored: Stored) -> dict[str, Any]:
        fields = keys.open(kind, stored.value)
        if fields is None:
            raise FleetStoreError(
                f"{self.store.name}: the fleet's {kind} entry ({keys.key[:12]}…) is not signed "
                "with these credentials: it was written by something other than an agent of "
                "this client, or altered; ignoring the store until it is replaced"
            )
        return fields

    def _doc(self, keys: FleetKeys, snap: Snapshot, stored: Stored, local: datetime) -> _Doc:
        fields = self._opened(keys, "token", stored)
        problem = _token_problem(fields)
        if problem is not None:
            raise FleetStoreError(
                f"{self.store.name}: the fleet's token document fails the token checks "
                f"({problem}); ignoring the store until it is replaced"
            )
        try:
            return self._doc_of(fields, snap, stored, local)
        except (OverflowError, ValueError, TypeError, KeyError):
            # signed by a holder of the secret, but with times no clock can hold
            raise FleetStoreError(
                f"{self.store.name}: the fleet's token document has times out of range; "
                "ignoring the store until it is replaced"
            ) from None

    def _doc_of(
        self, fields: dict[str, Any], snap: Snapshot, stored: Stored, local: datetime
    ) -> _Doc:
        expires_store = float(fields["expires"])
        remaining = stored.remaining if stored.remaining is not None else expires_store - snap.now
        remaining = min(remaining, expires_store - snap.now)
        expires_local = local + timedelta(seconds=remaining)
        expires_in = int(fields["expires_in"])
        token = Token(
            access_token=Secret(fields["access_token"]),
            token_type=str(fields["token_type"]).lower(),
            expires_in=expires_in,
            obtained_at=expires_local - timedelta(seconds=expires_in),
            expires_at=expires_local,
            scope=fields.get("scope") if isinstance(fields.get("scope"), str) else None,
            extensions=fields["extensions"] if isinstance(fields.get("extensions"), dict) else {},
        )
        self._masker.add(token.access_token.reveal())
        refresh_local = local + timedelta(seconds=float(fields["refresh_at"]) - snap.now)
        return _Doc(
            token=token,
            refresh_local=min(refresh_local, expires_local),
            generation=int(fields["generation"]),
            holder=str(fields.get("holder", "?")),
            published=float(fields["published_at"]),
        )

    # ------------------------------------------------------------------ deciding
    def _blocked(self, view: _View, held: Token | None) -> None:
        """Raise when the fleet's marker says to wait (no request is made). An agent without
        a valid token waits no longer than a single agent would (DESIGN §10: 30 s after a 429,
        ``rejected_first`` after a 401), whoever wrote the marker."""
        marker = view.marker
        if marker is None:
            return
        rejected_until, not_before = marker.rejected_until, marker.not_before
        if marker.at is not None and (held is None or not held.is_valid(self._clock())):
            t = self._timing
            not_before = min(not_before, marker.at + t.retry_cap_expired.total_seconds())
            rejected_until = min(
                rejected_until,
                marker.at + max(t.retry_cap_expired, t.rejected_first).total_seconds(),
            )
        if rejected_until > view.now:
            wait = rejected_until - view.now
            raise FleetRejected(
                f"the auth server rejected these credentials (401) when {marker.by} asked for "
                f"the fleet; no agent of the fleet asks again before "
                f"{rfc3339(self._wall(view.local_time(rejected_until)))} (in "
                f"{wait:.0f}s): fix the client secret in the source, or rotate it",
                retry_after=wait,
            )
        if not_before > view.now:
            wait = not_before - view.now
            raise FleetRateLimited(
                f"the auth server asked the fleet to slow down (429 or failures seen by "
                f"{marker.by}); no agent of the fleet asks again before "
                f"{rfc3339(self._wall(view.local_time(not_before)))} (in {wait:.0f}s)",
                retry_after=wait,
            )

    def _adoptable(self, view: _View, reason: str, held: Token | None) -> Shared | None:
        doc = view.doc
        if doc is None:
            return None
        differs = held is None or held.access_token != doc.token.access_token
        if reason in ("refresh", "force"):
            if differs and doc.token.is_valid(self._clock()):
                return self._adopt(doc)
            age = view.now - doc.published
            if 0 <= age < REFRESH_MINT_GAP:
                self._log.info(
                    "the fleet's token was minted %.0fs ago by %s: no new one (at most one "
                    "refresh per %.0fs for the whole fleet)",
                    age,
                    doc.holder,
                    REFRESH_MINT_GAP,
                    extra=self._extra("fleet_refresh_coalesced"),
                )
                return self._adopt(doc)
            return None
        if view.now < view.store_time(doc.refresh_local):
            return self._adopt(doc)
        return None

    def _adopt(self, doc: _Doc) -> Shared:
        self._role = "adopter"
        return self._shared(doc)

    def _shared(self, doc: _Doc) -> Shared:
        room = (doc.token.expires_at - doc.refresh_local).total_seconds() / 4
        spread = self._rng.uniform(0, max(0.0, min(ADOPT_SPREAD, room)))
        return Shared(
            token=doc.token,
            next_at=doc.refresh_local + timedelta(seconds=spread),
            generation=doc.generation,
            holder=doc.holder,
        )

    # ------------------------------------------------------------------ the lease
    def _mint_or_wait(
        self,
        view: _View,
        credentials: Credentials,
        reason: str,
        held: Token | None,
        mint: Mint,
    ) -> Obtained:
        """Take the lease and mint, or wait for its holder's document (and take over when
        its lease ends without one)."""
        keys = view.keys
        began = time.monotonic()
        seen = view.generation
        holder_seen = view.lease_holder
        while True:
            if view.lease_holder is None:
                if holder_seen is not None:  # a holder went away without publishing
                    self._metrics.fleet_lease(self.profile, "expired")
                    self._log.warning(
                        "the mint lease of %s ended without a new token: taking over",
                        holder_seen,
                        extra=self._extra("fleet_lease_expired", holder=holder_seen),
                    )
                value = keys.sign("lease", {"holder": self.holder, "nonce": secrets.token_hex(16)})
                try:
                    won = self.store.acquire(keys.key, value, self._lease.total_seconds())
                except FleetStoreError as exc:
                    return self._alone(exc, credentials, reason, held, mint)
                if won:
                    self._metrics.fleet_lease(self.profile, "won")
                    self._lease_holder = self.holder
                    # the lease may have come free because its holder just published: read
                    # again, so that a document newer than the one we decided on is adopted
                    try:
                        fresh = self._read(keys)
                    except FleetStoreError as exc:
                        self._release(keys, value)
                        return self._alone(exc, credentials, reason, held, mint)
                    if fresh.doc is not None and fresh.generation > seen:
                        shared = self._adoptable(fresh, reason, held)
                        if shared is not None:
                            self._release(keys, value)
                            return shared
                    try:
                        self._blocked(fresh, held)  # the holder before us may have met a 429 or 401
                    except (FleetRejected, FleetRateLimited):
                        self._release(keys, value)
                        raise
                    return self._mint(fresh, credentials, mint, held, lease=value)
                self._metrics.fleet_lease(self.profile, "lost")
            elif view.lease_holder != holder_seen:
                holder_seen = view.lease_holder
            if time.monotonic() - began > self._patience.total_seconds():
                self._log.warning(
                    "%s has held the mint lease for over %.0fs without publishing a token: "
                    "asking without the lease",
                    view.lease_holder,
                    self._patience.total_seconds(),
                    extra=self._extra("fleet_lease_stuck", holder=view.lease_holder),
                )
                return self._mint(view, credentials, mint, held, lease=None)
            delay = POLL * (1 + self._rng.uniform(-POLL_JITTER, POLL_JITTER))
            if self._stopping.wait(delay):
                raise AuthServerUnavailable("stopping while waiting for the fleet's token")
            try:
                view = self._read(keys)
            except FleetStoreError as exc:
                return self._alone(exc, credentials, reason, held, mint)
            if view.doc is not None and view.generation > seen:
                return self._adopt(view.doc)
            self._blocked(view, held)
            holder_seen = holder_seen if view.lease_holder is None else view.lease_holder

    def _mint(
        self,
        view: _View,
        credentials: Credentials,
        mint: Mint,
        held: Token | None,
        *,
        lease: bytes | None,
    ) -> Obtained:
        """Ask as the lease holder (``lease``: our lease's value, renewed while the request
        runs; None: without the lease), then publish and release."""
        keys = view.keys
        renewal = None if lease is None else _Renewal(self, keys.key, lease)
        try:
            try:
                fetched = mint(credentials)
            except (RequestRejected, FleetRejected, FleetRateLimited):
                raise
            except CredentialsRejected as exc:
                self._mark(view, exc, held)
                raise
            except AuthServerUnavailable as exc:
                if not self._stopping.is_set():
                    self._mark(view, exc, held)
                raise
            finally:
                if renewal is not None:
                    renewal.stop()
            self._role = "minter"
            # published before the lease is released: an agent that takes the lease next
            # finds the document, and does not ask again in between
            return self._publish(view, credentials, fetched)
        finally:
            if lease is not None:
                self._release(keys, lease)

    def _publish(self, view: _View, credentials: Credentials, fetched: Fetched) -> Obtained:
        token = fetched.token
        keys = view.keys if fetched.credentials.same_as(credentials) else None
        if keys is None:  # a 401 re-read found rotated credentials: their fleet's entries
            keys = self.keys(fetched.credentials)
        if fetched.reused:  # same-token servers (§2): only the holder asks again, at expiry
            refresh_local = token.expires_at
        else:
            refresh_local = token.obtained_at + self._timing.refresh_delay(token.lifetime)
        try:
            fresh = self._read(keys)
            if (
                fresh.doc is not None
                and fresh.generation > view.generation
                and fresh.doc.token.access_token != token.access_token
                and fresh.now < fresh.store_time(fresh.doc.refresh_local)
            ):
                # another agent published while we asked (our lease ran out): the newest
                # generation wins, so that the fleet holds one token
                return self._adopt(fresh.doc)
            ttl = (token.expires_at - fresh.local).total_seconds()
            generation = fresh.generation + 1
            shown = token_to_wall(self._clock, token).document()
            value = keys.sign(
                "token",
                {
                    **shown,
                    "refresh_at": round(fresh.store_time(refresh_local), 3),
                    "expires": round(fresh.store_time(token.expires_at), 3),
                    "published_at": round(fresh.now, 3),
                    "generation": generation,
                    "holder": self.holder,
                },
            )
            if ttl <= 0:
                return Minted(fetched, next_at=None)
            if not self.store.publish(keys.key, value, generation, ttl):
                again = self._read(keys)
                if again.doc is not None:
                    return self._adopt(again.doc)
                return Minted(fetched, next_at=None)
            self._generation = generation
            if fresh.marker is not None:
                self.store.mark(keys.key, None, 0)
        except FleetStoreError as exc:
            self._down(exc)
            return Minted(fetched, next_at=None)
        self._log.info(
            "published the token for the fleet (generation %d)",
            generation,
            extra=self._extra("fleet_published", generation=generation),
        )
        return Minted(fetched, next_at=refresh_local)

    def _release(self, keys: FleetKeys, lease: bytes) -> None:
        try:
            self.store.release(keys.key, lease)
        except FleetStoreError as exc:  # it runs out on its own
            self._log.warning(
                "could not release the mint lease (%s); it ends by itself within %.0fs",
                exc,
                self._lease.total_seconds(),
                extra=self._extra("fleet_store_error"),
            )
        self._lease_holder = None

    def _mark(
        self, view: _View, error: CredentialsRejected | AuthServerUnavailable, held: Token | None
    ) -> None:
        """Publish that the fleet must wait after a 401 or a 429 or failure: the wait a
        single agent in this one's place would wait (:func:`agent.policy.retry_delay`, with
        the marker's strikes as its failures in a row), so the fleet asks once per backoff."""
        marker = view.marker or _Marker()
        now = view.store_time(self._clock())
        rejected = isinstance(error, CredentialsRejected)
        strikes = (marker.strikes_rejected if rejected else marker.strikes_busy) + 1
        wait = policy.retry_delay(
            self._timing,
            now=self._clock(),
            held=held,
            failures=strikes,
            error=error,
            rng=self._rng,
        )
        until = round(now + wait.total_seconds(), 3)
        fields = {
            "not_before": marker.not_before if rejected else until,
            "rejected_until": until if rejected else marker.rejected_until,
            "strikes_busy": marker.strikes_busy if rejected else strikes,
            "strikes_rejected": strikes if rejected else marker.strikes_rejected,
            "at": round(now, 3),
        }
        value = view.keys.sign("marker", {**fields, "by": self.holder})
        try:
            self.store.mark(view.keys.key, value, (wait + MARKER_MEMORY).total_seconds())
        except FleetStoreError as exc:
            self._down(exc)

    # ------------------------------------------------------------------ store down
    def _alone(
        self,
        exc: FleetStoreError,
        credentials: Credentials,
        reason: str,
        held: Token | None,
        mint: Mint,
    ) -> Obtained:
        """The store cannot be used: mint on our own, as without fleet mode; a scheduled
        refresh with a good token held waits for a moment drawn for this agent first, so
        that the fleet's agents (which share one refresh time) do not ask at once."""
        self._down(exc)
        now = self._clock()
        if held is not None and held.is_valid(now) and reason in ("schedule", "retry"):
            planned = self._fallback
            if planned is None or planned[0] != held:
                room = (held.expires_at - now) / 2
                at = now + room * self._rng.uniform(0, 1)
                self._fallback = planned = (held, at)
            if now < planned[1]:
                return Deferred(planned[1])
        self._fallback = None
        self._role = "alone"
        return Minted(mint(credentials), next_at=None)

    def _down(self, exc: FleetStoreError) -> None:
        text = self._masker.shown(exc)
        if self._up is not False or text != self._last_error:
            self._log.warning(
                "fleet store %s cannot be used (%s): this agent asks the auth server on its "
                "own until it can",
                self.store.name,
                text,
                extra=self._extra("fleet_store_down"),
            )
        self._up = False
        self._last_error = text
        self._metrics.fleet_store_up(self.profile, False)

    def _is_up(self) -> None:
        if self._up is False:
            self._log.info(
                "fleet store %s answers again", self.store.name, extra=self._extra("fleet_store_up")
            )
        self._up = True
        self._last_error = None
        self._fallback = None
        self._metrics.fleet_store_up(self.profile, True)

    # ------------------------------------------------------------------ helpers
    def _extra(self, event: str, **fields: object) -> dict[str, object]:
        return {"profile": self.profile, "event": event, **fields}

    def _wall(self, moment: datetime) -> datetime:
        from agent.clock import to_wall

        return to_wall(self._clock, moment)

    def close(self) -> None:
        self.store.close()


class _Renewal:
    """Renews the lease every third of its length while the holder's request runs."""

    def __init__(self, fleet: Fleet, key: str, value: bytes) -> None:
        self._fleet = fleet
        self._key = key
        self._value = value
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dvs-fleet-lease", daemon=True)
        with signals_to_main_thread():
            self._thread.start()

    def _run(self) -> None:
        fleet = self._fleet
        ttl = fleet._lease.total_seconds()
        while not self._done.wait(ttl / 3):
            try:
                kept = fleet.store.renew(self._key, self._value, ttl)
            except FleetStoreError:
                continue  # it may answer at the next try; the lease may run out meanwhile
            except Exception:
                fleet._log.exception("renewing the mint lease failed")
                continue
            if kept:
                fleet._metrics.fleet_lease(fleet.profile, "renewed")
                continue
            fleet._metrics.fleet_lease(fleet.profile, "expired")
            fleet._log.warning(
                "the mint lease ran out while the token request was running: another agent "
                "may ask too (raise lease above the token request's duration)",
                extra=fleet._extra("fleet_lease_lost"),
            )
            return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def _marker_of(fields: dict[str, Any], store: str) -> _Marker:
    def number(name: str) -> float:
        value = fields.get(name, 0)
        return float(value) if isinstance(value, int | float) else 0.0

    def count(name: str) -> int:
        value = fields.get(name, 0)
        return value if isinstance(value, int) and 0 <= value < 1000 else 0

    return _Marker(
        not_before=number("not_before"),
        rejected_until=number("rejected_until"),
        strikes_busy=count("strikes_busy"),
        strikes_rejected=count("strikes_rejected"),
        by=str(fields.get("by", store))[:200],
        at=number("at") if isinstance(fields.get("at"), int | float) else None,
    )


def _token_problem(fields: dict[str, Any]) -> str | None:
    """What makes a shared document unusable (the §2 checks of a token answer), or None."""
    access_token = fields.get("access_token")
    if not isinstance(access_token, str) or not is_access_token(access_token):
        return "its access_token is not an RFC 6750 token"
    token_type = fields.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        return "its token_type is not bearer"
    expires_in = fields.get("expires_in")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        return "its expires_in is not a whole number of seconds > 0"
    for name in ("refresh_at", "expires", "published_at"):
        value = fields.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            return f"its {name} is not a time"
    generation = fields.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        return "its generation is not a positive integer"
    return None
