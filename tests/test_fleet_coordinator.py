"""The fleet coordinator (DESIGN §13) in process: agents (:class:`Fleet` instances) sharing one
in-memory store, an injected clock (nothing sleeps for a token's life), fake token requests
that count themselves; a real thread only where the lease renewal must run, and short.

Each test counts the token requests it expects exactly: a fleet that asked one time too many,
or adopted what it must refuse, fails it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.errors import (
    AuthServerUnavailable,
    CredentialsRejected,
    FleetRateLimited,
    FleetRejected,
    RequestRejected,
)
from agent.fleet.coordinator import (
    MARKER_MEMORY,
    REFRESH_MINT_GAP,
    Deferred,
    Fleet,
    Minted,
    Obtained,
    Shared,
)
from agent.fleet.keys import FleetKeys
from agent.masking import MASK, Masker, variants
from agent.models import Credentials, Secret, Token
from agent.oauth import Fetched
from agent.policy import Timing
from agent.recorder import NullRecorder
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_for
from tests.fleet_memory import MemoryFleetStore

TOKEN_URL = "https://auth.example.test/v1/oauth/token"
CREDS = Credentials(
    client_id=CLIENT_ID, client_secret=Secret(CLIENT_SECRET), source="env", version="1"
)
ROTATED = Credentials(
    client_id=CLIENT_ID, client_secret=Secret("rotated-" + CLIENT_SECRET), source="env", version="2"
)
KEYS = FleetKeys.derive(CREDS, TOKEN_URL, None)
KEY = KEYS.key
#: the tokens' lifetime, and when Timing() refreshes them (3600 - max(60, 360))
LIFETIME = 3600
REFRESH = 3240
LEASE = timedelta(seconds=30)
PATIENCE = timedelta(hours=1)
#: an integral Unix time, so that the store's float times compare exactly
START = datetime(2026, 1, 1, tzinfo=UTC)
T0 = START.timestamp()


# ---------------------------------------------------------------------------------- helpers
class Clock:
    """The agent's clock, moved by the test."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Waits(threading.Event):
    """The coordinator's ``stopping`` event. A waiter's poll does not sleep: it moves the
    clock by the poll's delay and runs the test's next step (``real``: it sleeps for real).
    Past ``limit`` polls it raises, so that a coordinator that never ends its wait fails the
    test instead of hanging it."""

    def __init__(
        self,
        clock: Clock,
        steps: list[Callable[[], object]] | None = None,
        *,
        real: bool = False,
        limit: int = 1_000,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.steps = steps if steps is not None else []
        self.real = real
        self.limit = limit
        self.delays: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set() or timeout is None:
            return super().wait(timeout)
        self.delays.append(timeout)
        if len(self.delays) > self.limit:
            raise AssertionError(f"the waiter polled {self.limit} times without an end")
        if self.real:
            return super().wait(timeout)
        self.clock.advance(timeout)
        if self.steps:
            self.steps.pop(0)()
        return self.is_set()


class Minter:
    """The token request: counts its calls; ``errors`` are raised first (None: a success),
    ``during`` runs inside the next requests (another agent's move while this one asks)."""

    def __init__(self, clock: Clock, name: str) -> None:
        self.clock = clock
        self.name = name
        self.calls = 0
        self.errors: list[BaseException | None] = []
        self.during: list[Callable[[], object]] = []
        #: the agent's time of each request
        self.asked_at: list[datetime] = []
        #: the credentials each request was made with
        self.asked_with: list[Credentials] = []
        #: a token the server hands back again (same-token servers, DESIGN §2)
        self.reuse: Token | None = None
        #: credentials a 401 re-read found (the token is then theirs)
        self.rotated_to: Credentials | None = None
        self.minted: list[Token] = []

    def __call__(self, credentials: Credentials) -> Fetched:
        self.calls += 1
        self.asked_at.append(self.clock())
        self.asked_with.append(credentials)
        if self.during:
            self.during.pop(0)()
        if self.errors:
            error = self.errors.pop(0)
            if error is not None:
                raise error
        if self.reuse is not None:
            return Fetched(token=self.reuse, credentials=credentials, reused=True, requests=1)
        now = self.clock()
        token = Token(
            access_token=Secret(f"{self.name}-{self.calls}"),
            token_type="bearer",
            expires_in=LIFETIME,
            obtained_at=now,
            expires_at=now + timedelta(seconds=LIFETIME),
            scope="read write",
            extensions={"provider_slug": "osigu"},
        )
        self.minted.append(token)
        used = self.rotated_to or credentials
        return Fetched(token=token, credentials=used, reused=False, requests=1)


class Recording(NullRecorder):
    """The fleet's metrics, as calls."""

    def __init__(self) -> None:
        self.leases: list[str] = []
        self.store_up: list[bool] = []

    def fleet_lease(self, profile: str, outcome: str) -> None:
        assert profile == "dvs"
        self.leases.append(outcome)

    def fleet_store_up(self, profile: str, up: bool) -> None:
        assert profile == "dvs"
        self.store_up.append(up)

    def up(self) -> bool | None:
        """What ``dvs_agent_fleet_store_up`` shows now (None: never set)."""
        return self.store_up[-1] if self.store_up else None


@dataclass
class Agent:
    fleet: Fleet
    store: MemoryFleetStore
    mint: Minter
    metrics: Recording
    stopping: Waits
    clock: Clock

    def obtain(
        self, reason: str = "start", held: Token | None = None, credentials: Credentials = CREDS
    ) -> Obtained:
        return self.fleet.obtain(credentials, reason, held, self.mint)

    def status(self) -> dict[str, Any]:
        return self.fleet.status().document()


def make(
    shared: MemoryFleetStore,
    clock: Clock,
    name: str,
    *,
    lease: timedelta = LEASE,
    patience: timedelta = PATIENCE,
    token_url: str = TOKEN_URL,
    scope: str | None = None,
    steps: list[Callable[[], object]] | None = None,
    real_waits: bool = False,
    masker: Masker | None = None,
    seed: int = 1,
) -> Agent:
    """An agent named ``name`` (its lease holder id) with its own handle on ``shared``."""
    store = shared.handle()
    metrics = Recording()
    stopping = Waits(clock, steps, real=real_waits)
    fleet = Fleet(
        "dvs",
        store,
        lease=lease,
        token_url=token_url,
        scope=scope,
        clock=clock,
        timing=Timing(),
        patience=patience,
        stopping=stopping,
        masker=masker if masker is not None else Masker(),
        holder=name,
        rng=random.Random(seed),
        metrics=metrics,
    )
    return Agent(fleet, store, Minter(clock, name), metrics, stopping, clock)


def opened(store: MemoryFleetStore, kind: str, keys: FleetKeys = KEYS) -> dict[str, Any]:
    raw = store.entry(keys.key, kind)
    assert raw is not None, f"no {kind} entry"
    fields = keys.open(kind, raw)
    assert fields is not None, f"the {kind} entry is not signed with the fleet's key"
    return fields


def document(
    keys: FleetKeys,
    now: float,
    *,
    value: str = "hand-made-1",
    refresh_after: float = REFRESH,
    expires_after: float = LIFETIME,
    generation: int = 1,
    **fields: Any,
) -> bytes:
    """A token document as a minter would publish it at store time ``now``, signed."""
    body: dict[str, Any] = {
        "access_token": value,
        "token_type": "bearer",
        "expires_in": LIFETIME,
        "expires_at": "2026-01-01T01:00:00Z",
        "obtained_at": "2026-01-01T00:00:00Z",
        "scope": None,
        "provider_slug": None,
        "extensions": {},
        "refresh_at": now + refresh_after,
        "expires": now + expires_after,
        "published_at": now,
        "generation": generation,
        "holder": "hand:1",
    }
    body.update(fields)
    return keys.sign("token", body)


def valid_token(clock: Clock, value: str = "held-1") -> Token:
    """A token the agent holds from before, valid for another hour: the waits after a 429 or
    a 401 are then the long ones (DESIGN §10 shortens them when no valid token is held)."""
    return Token(
        Secret(value), "bearer", LIFETIME, clock.now, clock.now + timedelta(seconds=LIFETIME)
    )


def lease_of(holder: str, keys: FleetKeys = KEYS) -> bytes:
    return keys.sign("lease", {"holder": holder, "nonce": f"nonce-of-{holder}"})


def token_of(got: Obtained) -> str:
    if isinstance(got, Shared):
        return got.token.access_token.reveal()
    assert isinstance(got, Minted), got
    return got.fetched.token.access_token.reveal()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryFleetStore:
    return MemoryFleetStore(lambda: clock.now.timestamp(), name="memory:test")


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


# ------------------------------------------------------------------------- the memory store
def test_store_entries_expire_on_the_store_clock(store: MemoryFleetStore, clock: Clock) -> None:
    assert store.acquire(KEY, b"one", 5)
    assert not store.acquire(KEY, b"two", 5)  # set if absent
    clock.advance(4.999)
    snap = store.read(KEY)
    assert snap.now == pytest.approx(T0 + 4.999)
    assert snap.lease is not None and snap.lease.value == b"one"
    assert snap.lease.remaining == pytest.approx(0.001, abs=1e-6)
    clock.advance(0.001)
    assert store.read(KEY).lease is None  # or expired
    assert store.acquire(KEY, b"two", 5)
    assert store.entry(KEY, "lease") == b"two"


def test_store_renew_and_release_compare_the_value(store: MemoryFleetStore, clock: Clock) -> None:
    assert store.acquire(KEY, b"mine", 10)
    assert not store.renew(KEY, b"other", 100)
    assert store.expiry(KEY, "lease") == T0 + 10
    clock.advance(5)
    assert store.renew(KEY, b"mine", 10)
    assert store.expiry(KEY, "lease") == T0 + 15
    assert not store.release(KEY, b"other")
    assert store.entry(KEY, "lease") == b"mine"
    assert store.release(KEY, b"mine")
    assert not store.release(KEY, b"mine")
    assert not store.renew(KEY, b"mine", 10)  # an absent lease is not renewed
    assert store.acquire(KEY, b"x", 10)
    assert store.clear_lease(KEY) and not store.clear_lease(KEY)


def test_store_publish_takes_only_the_next_generation_and_remembers_it(
    store: MemoryFleetStore, clock: Clock
) -> None:
    assert not store.publish(KEY, b"g2", 2, 60)
    assert store.publish(KEY, b"g1", 1, 60)
    assert not store.publish(KEY, b"g1-again", 1, 60)  # that generation is taken: newest wins
    assert store.publish(KEY, b"g2", 2, 60)
    assert not store.publish(KEY, b"stale", 1, 60)
    clock.advance(60)
    snap = store.read(KEY)
    assert snap.token is None and snap.generation == 2  # the counter outlives the document
    assert store.publish(KEY, b"g3", 3, 60)
    store.mark(KEY, b"m", 10)
    assert store.read(KEY).marker is not None
    store.mark(KEY, None, 0)
    assert store.read(KEY).marker is None


def test_store_failure_switches_counts_and_handles(store: MemoryFleetStore) -> None:
    from agent.errors import FleetStoreError

    other = store.handle()
    store.go_down()
    with pytest.raises(FleetStoreError):
        store.read(KEY)
    assert other.read(KEY).generation == 0  # another agent's handle still answers
    store.come_back()
    store.fail_next(2)
    for _ in range(2):
        with pytest.raises(FleetStoreError):
            store.read(KEY)
    store.read(KEY)
    store.fail_method("publish")
    with pytest.raises(FleetStoreError):
        store.publish(KEY, b"x", 1, 10)
    assert store.acquire(KEY, b"x", 10)
    store.come_back()
    store.fail_next(1, "release")
    store.read(KEY)
    with pytest.raises(FleetStoreError):
        store.release(KEY, b"x")
    assert store.release(KEY, b"x")
    assert store.calls["read"] == 5 and store.failures["read"] == 3
    assert store.calls["publish"] == 1 and store.failures["publish"] == 1
    assert other.calls["read"] == 1 and store.all_calls["read"] == 6
    with pytest.raises(ValueError):
        store.fail_method("nonsense")


# ------------------------------------------------------------------ minting and adopting
def test_first_agent_mints_and_publishes_and_a_second_adopts_without_asking(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    got = a.obtain("start")
    assert isinstance(got, Minted)
    assert a.mint.calls == 1
    assert got.next_at == START + timedelta(seconds=REFRESH)  # no per-host jitter
    assert a.metrics.leases == ["won"]
    assert store.entry(KEY, "lease") is None  # released
    assert store.generation(KEY) == 1
    doc = opened(store, "token")
    assert doc["access_token"] == "agent-a-1"
    assert doc["generation"] == 1 and doc["holder"] == "agent-a"
    assert doc["refresh_at"] == T0 + REFRESH
    assert doc["expires"] == T0 + LIFETIME
    assert doc["published_at"] == T0
    assert doc["provider_slug"] == "osigu"  # the sinks' document, plus the fleet's fields
    assert store.expiry(KEY, "token") == T0 + LIFETIME  # kept for the token's remaining life

    clock.advance(100)
    shared = b.obtain("start")
    assert isinstance(shared, Shared)
    assert shared.token.access_token.reveal() == "agent-a-1"
    assert shared.token.expires_at == START + timedelta(seconds=LIFETIME)
    assert shared.generation == 1 and shared.holder == "agent-a"
    refresh = START + timedelta(seconds=REFRESH)
    assert refresh <= shared.next_at <= refresh + timedelta(seconds=1)
    assert b.mint.calls == 0
    assert b.store.calls["acquire"] == 0 and b.store.calls["publish"] == 0
    assert b.metrics.leases == []

    clock.advance(REFRESH - 200)  # the schedule, before refresh_at: still the fleet's token
    again = b.obtain("schedule", held=shared.token)
    assert isinstance(again, Shared) and again.generation == 1
    assert (a.mint.calls, b.mint.calls) == (1, 0)
    assert a.status()["role"] == "minter" and b.status()["role"] == "adopter"


def test_remaining_life_is_the_stores_not_the_hosts_clock(clock: Clock) -> None:
    # the store's clock is 500 s ahead of agent a's, agent b's an hour ahead of both
    store = MemoryFleetStore(lambda: clock.now.timestamp() + 500)
    b_clock = Clock(START + timedelta(hours=1))
    a, b = make(store, clock, "agent-a"), make(store, b_clock, "agent-b")
    assert isinstance(a.obtain("start"), Minted)
    assert opened(store, "token")["expires"] == T0 + 500 + LIFETIME
    clock.advance(100)
    b_clock.advance(100)
    shared = b.obtain("schedule")
    assert isinstance(shared, Shared)
    # 3500 s remain, on b's own time line
    assert shared.token.expires_at == b_clock.now + timedelta(seconds=LIFETIME - 100)
    assert shared.token.obtained_at == b_clock.now - timedelta(seconds=100)
    due = b_clock.now + timedelta(seconds=REFRESH - 100)
    assert due <= shared.next_at <= due + timedelta(seconds=1)
    assert b.mint.calls == 0


def test_a_hand_made_document_signed_with_the_fleet_key_is_adopted(
    store: MemoryFleetStore, clock: Clock
) -> None:
    """The baseline of the refusals below: what ``document`` builds is adoptable."""
    store.put(KEY, "token", document(KEYS, T0), LIFETIME)
    store.set_generation(KEY, 1)
    b = make(store, clock, "agent-b")
    got = b.obtain("start")
    assert isinstance(got, Shared) and token_of(got) == "hand-made-1"
    assert b.mint.calls == 0 and b.status()["store_up"] is True


def _other_key() -> bytes:
    other = Credentials(CLIENT_ID, Secret("another-secret-value"), "env", "1")
    return document(FleetKeys.derive(other, TOKEN_URL, None), T0)


def _right_name_wrong_mac() -> bytes:
    forger = FleetKeys(key=KEY, _mac_key=b"\x07" * 32)
    return document(forger, T0)


def _tampered() -> bytes:
    return document(KEYS, T0).replace(b"hand-made-1", b"hand-made-2")


def _unsigned() -> bytes:
    return document(KEYS, T0).replace(b'"hmac":"', b'"hmac":"0')


@pytest.mark.parametrize(
    "forged",
    [_other_key, _right_name_wrong_mac, _tampered, _unsigned],
    ids=["other-fleet-key", "wrong-mac-key", "tampered", "bad-hmac"],
)
def test_a_document_not_signed_by_the_fleet_is_refused_and_counts_as_store_down(
    store: MemoryFleetStore, clock: Clock, forged: Callable[[], bytes]
) -> None:
    value = forged()
    store.put(KEY, "token", value, LIFETIME)
    store.set_generation(KEY, 1)
    b = make(store, clock, "agent-b")
    assert b.fleet.peek(CREDS, None) is None
    got = b.obtain("start")
    assert isinstance(got, Minted) and got.next_at is None  # alone: not published
    assert token_of(got) == "agent-b-1"
    assert b.mint.calls == 1
    assert b.store.calls["acquire"] == 0 and b.store.calls["publish"] == 0
    status = b.status()
    assert status["store_up"] is False and status["role"] == "alone"
    assert "not signed" in status["last_error"]
    assert b.metrics.up() is False
    assert store.entry(KEY, "token") == value  # nothing of it was used, nothing overwritten


@pytest.mark.parametrize("kind", ["lease", "marker"])
def test_a_lease_or_marker_not_signed_by_the_fleet_counts_as_store_down(
    store: MemoryFleetStore, clock: Clock, kind: str
) -> None:
    forger = FleetKeys(key=KEY, _mac_key=b"\x07" * 32)
    store.put(KEY, kind, forger.sign(kind, {"holder": "x", "not_before": T0 + 999}), 60)
    b = make(store, clock, "agent-b")
    got = b.obtain("start")
    assert isinstance(got, Minted) and got.next_at is None
    assert b.mint.calls == 1 and b.status()["store_up"] is False


@pytest.mark.parametrize(
    "fields",
    [
        {"token_type": "mac"},
        {"access_token": "has space"},
        {"access_token": ""},
        {"expires_in": 0},
        {"expires_in": "3600"},
        {"generation": 0},
        {"refresh_at": "soon"},
        {"expires": -1},
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_a_signed_document_failing_the_token_checks_is_refused(
    store: MemoryFleetStore, clock: Clock, fields: dict[str, Any]
) -> None:
    store.put(KEY, "token", document(KEYS, T0, **fields), LIFETIME)
    b = make(store, clock, "agent-b")
    got = b.obtain("start")
    assert isinstance(got, Minted) and token_of(got) == "agent-b-1"
    assert b.mint.calls == 1
    assert b.status()["store_up"] is False
    assert "token checks" in b.status()["last_error"]


def test_a_signed_document_with_an_out_of_range_time_counts_as_store_down(
    store: MemoryFleetStore, clock: Clock
) -> None:
    store.put(KEY, "token", document(KEYS, T0, refresh_after=1e12), LIFETIME)
    b = make(store, clock, "agent-b")
    assert b.fleet.peek(CREDS, None) is None  # "never raises"
    got = b.obtain("start")
    assert isinstance(got, Minted) and b.mint.calls == 1


def test_a_document_past_its_refresh_time_is_not_adopted(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    assert isinstance(a.obtain("start"), Minted)
    clock.advance(REFRESH - 0.5)
    assert isinstance(b.obtain("schedule"), Shared)
    assert b.fleet.peek(CREDS, None) is not None
    clock.advance(0.5)  # refresh_at: nearly expired, the fleet needs a new one
    assert b.fleet.peek(CREDS, None) is None
    got = b.obtain("schedule")
    assert isinstance(got, Minted) and token_of(got) == "agent-b-1"
    assert (a.mint.calls, b.mint.calls) == (1, 1)
    assert b.metrics.leases == ["won"]
    assert opened(store, "token")["generation"] == 2
    assert store.generation(KEY) == 2


def test_an_expired_document_is_gone_and_a_new_one_is_minted(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    assert isinstance(a.obtain("start"), Minted)
    clock.advance(LIFETIME)
    assert store.entry(KEY, "token") is None
    got = b.obtain("start")
    assert isinstance(got, Minted) and b.mint.calls == 1
    assert opened(store, "token")["generation"] == 2  # the counter went on


@pytest.mark.parametrize("reason", ["start", "schedule", "rotation"])
def test_a_document_whose_token_expired_is_not_adopted_even_if_the_entry_lives(
    store: MemoryFleetStore, clock: Clock, reason: str
) -> None:
    # a store that keeps the entry past the token's expiry (no expiry known)
    store.put(KEY, "token", document(KEYS, T0 - LIFETIME - 10, refresh_after=REFRESH), None)
    store.set_generation(KEY, 1)
    b = make(store, clock, "agent-b")
    assert b.fleet.peek(CREDS, None) is None
    got = b.obtain(reason)
    assert isinstance(got, Minted) and b.mint.calls == 1
    assert b.status()["store_up"] is True
    assert opened(store, "token")["access_token"] == "agent-b-1"


@pytest.mark.parametrize("reason", ["refresh", "force"])
def test_refresh_never_adopts_an_expired_token(
    store: MemoryFleetStore, clock: Clock, reason: str
) -> None:
    store.put(KEY, "token", document(KEYS, T0 - LIFETIME - 10), None)
    store.set_generation(KEY, 1)
    b = make(store, clock, "agent-b")
    got = b.obtain(reason, held=None)
    if isinstance(got, Shared):
        assert got.token.is_valid(clock()), "adopted a token that has expired"
    assert b.mint.calls == 1


def test_peek_at_start_takes_the_newer_of_the_document_and_the_state_file(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    assert b.fleet.peek(CREDS, None) is None  # nothing shared yet
    assert isinstance(a.obtain("start"), Minted)
    clock.advance(10)

    def recorded(value: str, expires_in: float) -> Token:
        return Token(
            Secret(value),
            "bearer",
            LIFETIME,
            clock.now - timedelta(seconds=LIFETIME - expires_in),
            clock.now + timedelta(seconds=expires_in),
        )

    shared = b.fleet.peek(CREDS, None)
    assert shared is not None and shared.token.access_token.reveal() == "agent-a-1"
    older = b.fleet.peek(CREDS, recorded("old-one", 100))
    assert older is not None and older.token.access_token.reveal() == "agent-a-1"
    assert b.fleet.peek(CREDS, recorded("newer-one", LIFETIME)) is None  # the state file's
    same = b.fleet.peek(CREDS, a.mint.minted[0])
    assert same is not None
    b.store.go_down()
    assert b.fleet.peek(CREDS, None) is None  # never raises
    assert b.status()["store_up"] is False
    assert b.mint.calls == 0 and b.store.calls["acquire"] == 0


# --------------------------------------------------------------------- newest generation wins
def test_a_holder_whose_lease_ran_out_adopts_the_newer_publish_instead_of_its_own(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    results: list[Obtained] = []

    def meanwhile() -> None:
        clock.advance(LEASE.total_seconds() + 1)  # a's lease runs out while it asks
        results.append(b.obtain("start"))

    a.mint.during.append(meanwhile)
    got = a.obtain("start")
    assert isinstance(results[0], Minted) and token_of(results[0]) == "agent-b-1"
    assert isinstance(got, Shared)  # the stale publisher loses and adopts the winner
    assert token_of(got) == "agent-b-1" and got.generation == 1 and got.holder == "agent-b"
    assert (a.mint.calls, b.mint.calls) == (1, 1)
    assert a.store.calls["publish"] == 0
    assert opened(store, "token")["access_token"] == "agent-b-1"
    assert store.generation(KEY) == 1
    c = make(store, clock, "agent-c")
    assert token_of(c.obtain("start")) == "agent-b-1" and c.mint.calls == 0


def test_the_minter_publishes_before_it_releases_the_lease(
    store: MemoryFleetStore, clock: Clock
) -> None:
    """An agent that takes the lease right after the minter finds its document (and does not
    ask again in between)."""
    a = make(store, clock, "agent-a")
    at_publish: list[bytes | None] = []
    a.store.before("publish", lambda: at_publish.append(store.entry(KEY, "lease")))
    assert isinstance(a.obtain("start"), Minted)
    assert at_publish[0] is not None
    lease = KEYS.open("lease", at_publish[0])
    assert lease is not None and lease["holder"] == "agent-a"
    assert store.entry(KEY, "lease") is None and a.store.calls["release"] == 1


def test_a_publish_that_loses_the_generation_race_adopts_the_winner(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    results: list[Obtained] = []

    def meanwhile() -> None:
        # between a's last read and its publish, a's lease runs out and b asks and publishes
        clock.advance(LEASE.total_seconds() + 1)
        results.append(b.obtain("start"))

    a.store.before("publish", meanwhile)
    got = a.obtain("start")
    assert token_of(results[0]) == "agent-b-1"
    assert b.stopping.delays == [] and b.metrics.leases == ["won"]
    assert isinstance(got, Shared) and token_of(got) == "agent-b-1"
    assert a.store.calls["publish"] == 1  # tried generation 1, which b took first
    assert opened(store, "token")["access_token"] == "agent-b-1"
    assert store.generation(KEY) == 1
    assert (a.mint.calls, b.mint.calls) == (1, 1)


def test_a_publish_takes_the_generation_after_the_stores(
    store: MemoryFleetStore, clock: Clock
) -> None:
    # the store's counter, not the document this agent saw, names the next generation
    store.put(KEY, "token", document(KEYS, T0, value="gen-five", generation=5), LIFETIME)
    store.set_generation(KEY, 5)
    a = make(store, clock, "agent-a")
    clock.advance(REFRESH)
    got = a.obtain("schedule")
    assert isinstance(got, Minted)
    assert opened(store, "token")["generation"] == 6  # the store's counter + 1
    assert a.status()["generation"] == 6


# ------------------------------------------------------------------------------- the lease
def test_only_the_lease_holder_asks_the_other_waits_and_adopts(
    store: MemoryFleetStore, clock: Clock, pool: ThreadPoolExecutor
) -> None:
    go = threading.Event()
    a = make(store, clock, "agent-a")
    a.mint.during.append(lambda: go.wait(5))
    first = pool.submit(a.obtain, "start")
    assert wait_for(lambda: store.entry(KEY, "lease") is not None, timeout=5)
    b = make(store, clock, "agent-b", steps=[go.set, lambda: first.result(5)])
    got_b = b.obtain("start")
    got_a = first.result(5)
    assert isinstance(got_a, Minted) and isinstance(got_b, Shared)
    assert token_of(got_b) == token_of(got_a) == "agent-a-1"
    assert (a.mint.calls, b.mint.calls) == (1, 0)
    assert b.store.calls["acquire"] == 0  # a live lease is not even tried
    assert 1 <= len(b.stopping.delays) <= 2
    assert all(0.2 <= delay <= 0.3 for delay in b.stopping.delays)  # 250 ms ±20 %


def test_two_agents_racing_for_the_lease_make_one_request(
    store: MemoryFleetStore, clock: Clock, pool: ThreadPoolExecutor
) -> None:
    barrier = threading.Barrier(2, timeout=5)
    a = make(store, clock, "agent-a", real_waits=True)
    b = make(store, clock, "agent-b", real_waits=True)
    for agent in (a, b):  # both have read an empty store when they try the lease
        agent.store.before("acquire", barrier.wait)
        # the winner asks only once the other lost (else it may be done before the other
        # tries, which is no race)
        agent.mint.during.append(
            lambda: wait_for(lambda: "lost" in a.metrics.leases + b.metrics.leases, timeout=5)
        )
    futures = [pool.submit(agent.obtain, "start") for agent in (a, b)]
    got = [future.result(10) for future in futures]
    assert a.mint.calls + b.mint.calls == 1
    assert sorted(type(g).__name__ for g in got) == ["Minted", "Shared"]
    assert token_of(got[0]) == token_of(got[1])
    assert sorted(a.metrics.leases + b.metrics.leases) == ["lost", "won"]
    assert store.all_calls["publish"] == 1


def test_the_lease_winner_adopts_what_was_published_just_before_it_won(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    # b read an empty store; before its acquire, a asks, publishes and lets the lease go
    b.store.before("acquire", lambda: a.obtain("start"))
    got = b.obtain("start")
    assert isinstance(got, Shared) and token_of(got) == "agent-a-1"
    assert (a.mint.calls, b.mint.calls) == (1, 0)
    assert b.metrics.leases == ["won"]
    assert b.store.calls["release"] == 1 and store.entry(KEY, "lease") is None


def test_a_holder_that_disappears_is_replaced_when_its_lease_ends(
    store: MemoryFleetStore, clock: Clock
) -> None:
    store.put(KEY, "lease", lease_of("agent-dead"), LEASE.total_seconds())
    b = make(store, clock, "agent-b")
    got = b.obtain("start")
    assert isinstance(got, Minted) and b.mint.calls == 1
    asked = (b.mint.asked_at[0] - START).total_seconds()
    assert LEASE.total_seconds() <= asked <= LEASE.total_seconds() + 0.3
    assert b.metrics.leases == ["expired", "won"]
    assert b.store.calls["acquire"] == 1
    assert opened(store, "token")["holder"] == "agent-b"


def test_while_waiting_the_status_names_the_holder(store: MemoryFleetStore, clock: Clock) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    seen: list[dict[str, Any]] = []

    def meanwhile() -> None:
        seen.append(a.status())
        b.fleet.peek(CREDS, None)
        seen.append(b.status())

    a.mint.during.append(meanwhile)
    assert isinstance(a.obtain("start"), Minted)
    assert seen[0]["lease_holder"] == "agent-a" and seen[1]["lease_holder"] == "agent-a"
    assert a.status()["lease_holder"] is None  # released


def test_a_holder_that_keeps_its_lease_without_publishing_is_passed_over(
    store: MemoryFleetStore, clock: Clock
) -> None:
    stuck = lease_of("agent-stuck")
    store.put(KEY, "lease", stuck, 3600)
    b = make(
        store,
        clock,
        "agent-b",
        patience=timedelta(seconds=0.05),
        steps=[lambda: time.sleep(0.06)],
    )
    got = b.obtain("start")
    assert isinstance(got, Minted) and b.mint.calls == 1
    assert b.store.calls["acquire"] == 0  # asked without the lease
    assert opened(store, "token")["holder"] == "agent-b"  # and published
    assert store.entry(KEY, "lease") == stuck  # never drops another's lease


def test_stopping_while_waiting_ends_the_wait_without_a_request(
    store: MemoryFleetStore, clock: Clock
) -> None:
    store.put(KEY, "lease", lease_of("agent-a"), 3600)
    b = make(store, clock, "agent-b")
    b.stopping.steps.append(b.stopping.set)
    with pytest.raises(AuthServerUnavailable, match="stopping"):
        b.obtain("start")
    assert b.mint.calls == 0


@pytest.mark.parametrize(
    "error",
    [
        None,
        AuthServerUnavailable("503"),
        AuthServerUnavailable("429", retry_after=5, outcome="rate_limited"),
        CredentialsRejected("401"),
        RequestRejected("400"),
        KeyboardInterrupt(),
    ],
    ids=["success", "503", "429", "401", "400", "interrupt"],
)
def test_the_lease_is_released_after_success_and_after_failure(
    store: MemoryFleetStore, clock: Clock, error: BaseException | None
) -> None:
    a = make(store, clock, "agent-a")
    a.mint.errors.append(error)
    held: list[bytes | None] = []
    a.mint.during.append(lambda: held.append(store.entry(KEY, "lease")))
    if error is None:
        assert isinstance(a.obtain("start"), Minted)
    else:
        with pytest.raises(type(error)):
            a.obtain("start")
    assert held[0] is not None and KEYS.open("lease", held[0]) is not None
    assert store.entry(KEY, "lease") is None
    assert a.store.calls["release"] == 1 and a.mint.calls == 1
    assert a.status()["lease_holder"] is None


def test_the_holder_releases_only_its_own_lease(store: MemoryFleetStore, clock: Clock) -> None:
    a = make(store, clock, "agent-a")
    others = lease_of("agent-c")

    def meanwhile() -> None:
        clock.advance(LEASE.total_seconds() + 1)
        assert store.acquire(KEY, others, LEASE.total_seconds())

    a.mint.during.append(meanwhile)
    assert isinstance(a.obtain("start"), Minted)
    assert a.store.calls["release"] == 1
    assert store.entry(KEY, "lease") == others


def test_a_release_that_fails_leaves_the_lease_to_run_out(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    a.store.fail_method("release")
    got = a.obtain("start")
    assert isinstance(got, Minted) and got.next_at is not None  # published all the same
    assert store.entry(KEY, "lease") is not None
    assert store.expiry(KEY, "lease") == T0 + LEASE.total_seconds()
    assert isinstance(b.obtain("start"), Shared) and b.mint.calls == 0


def test_fleet_release_clears_whatever_lease_there_is(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a = make(store, clock, "agent-a")
    assert a.fleet.release(CREDS) is False
    store.put(KEY, "lease", lease_of("agent-stuck"), 3600)
    assert a.fleet.release(CREDS) is True
    assert store.entry(KEY, "lease") is None


def test_the_holder_renews_its_lease_while_its_request_runs(clock: Clock) -> None:
    store = MemoryFleetStore(time.time)  # the lease runs out in real time
    a = make(store, clock, "agent-a", lease=timedelta(seconds=0.6))
    key_holder: list[bytes | None] = []

    def slow() -> None:
        time.sleep(1.0)  # longer than the lease
        key_holder.append(store.entry(KEY, "lease"))

    a.mint.during.append(slow)
    assert isinstance(a.obtain("start"), Minted)
    assert key_holder[0] is not None, "the lease ran out while the holder asked"
    assert a.store.calls["renew"] >= 3  # every third of the lease
    assert a.metrics.leases.count("renewed") == a.store.calls["renew"]
    assert store.entry(KEY, "lease") is None
    renewed = a.store.calls["renew"]
    time.sleep(0.3)
    assert a.store.calls["renew"] == renewed  # the renewal ended with the request


def test_renewal_goes_on_after_a_store_error(clock: Clock) -> None:
    store = MemoryFleetStore(time.time)
    a = make(store, clock, "agent-a", lease=timedelta(seconds=0.6))
    a.store.fail_next(1, "renew")
    kept: list[bool] = []

    def slow() -> None:
        time.sleep(0.9)
        kept.append(store.entry(KEY, "lease") is not None)

    a.mint.during.append(slow)
    assert isinstance(a.obtain("start"), Minted)
    assert kept == [True]
    assert a.store.failures["renew"] == 1 and a.store.calls["renew"] >= 3


def test_renewal_stops_when_the_lease_was_lost(clock: Clock) -> None:
    store = MemoryFleetStore(time.time)
    a = make(store, clock, "agent-a", lease=timedelta(seconds=0.3))
    renews: list[int] = []

    def lose_it() -> None:
        store.clear_lease(KEY)  # `dvs-agent fleet release` by hand
        time.sleep(0.25)
        renews.append(a.store.calls["renew"])
        time.sleep(0.25)
        renews.append(a.store.calls["renew"])

    a.mint.during.append(lose_it)
    assert isinstance(a.obtain("start"), Minted)
    assert renews == [1, 1]
    assert a.metrics.leases == ["won", "expired"]


# ------------------------------------------------------------------------------- markers
def test_a_429_sets_not_before_and_the_fleet_does_not_ask_before_it(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    held = valid_token(clock)
    a.mint.errors.append(AuthServerUnavailable("429", retry_after=120, outcome="rate_limited"))
    with pytest.raises(AuthServerUnavailable) as raised:
        a.obtain("start", held=held)
    assert not isinstance(raised.value, FleetRateLimited)  # a's own answer
    marker = opened(store, "marker")
    assert marker["not_before"] == T0 + 120
    assert marker["strikes_busy"] == 1 and marker["rejected_until"] == 0
    assert marker["by"] == "agent-a"
    assert store.expiry(KEY, "marker") == T0 + 120 + MARKER_MEMORY.total_seconds()

    with pytest.raises(FleetRateLimited) as waiting:
        b.obtain("start", held=held)
    assert waiting.value.retry_after == 120
    clock.advance(60)
    with pytest.raises(FleetRateLimited) as waiting:
        b.obtain("schedule", held=held)
    assert waiting.value.retry_after == 60
    assert b.mint.calls == 0 and b.store.calls["acquire"] == 0
    with pytest.raises(FleetRateLimited):
        a.obtain("retry", held=held)  # nor does the one that was answered 429
    assert a.mint.calls == 1

    clock.advance(60)
    got = b.obtain("retry", held=held)
    assert isinstance(got, Minted) and b.mint.calls == 1
    assert store.entry(KEY, "marker") is None  # a publish clears it


def test_a_429_seen_by_the_holder_stops_its_waiters(
    store: MemoryFleetStore, clock: Clock, pool: ThreadPoolExecutor
) -> None:
    go = threading.Event()
    a = make(store, clock, "agent-a")
    a.mint.errors.append(AuthServerUnavailable("429", retry_after=30, outcome="rate_limited"))
    a.mint.during.append(lambda: go.wait(5))
    first = pool.submit(a.obtain, "start")
    assert wait_for(lambda: store.entry(KEY, "lease") is not None, timeout=5)
    b = make(store, clock, "agent-b", steps=[go.set, lambda: first.exception(5)])
    with pytest.raises(FleetRateLimited):
        b.obtain("start")
    assert isinstance(first.exception(5), AuthServerUnavailable)
    assert (a.mint.calls, b.mint.calls) == (1, 0)


def test_the_marker_won_by_the_lease_winner_is_obeyed(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    a.mint.errors.append(AuthServerUnavailable("429", retry_after=30, outcome="rate_limited"))

    def a_is_answered_429() -> None:
        with pytest.raises(AuthServerUnavailable):
            a.obtain("start")

    b.store.before("acquire", a_is_answered_429)
    with pytest.raises(FleetRateLimited):
        b.obtain("start")
    assert (a.mint.calls, b.mint.calls) == (1, 0)
    assert b.metrics.leases == ["won"] and store.entry(KEY, "lease") is None


def test_retry_after_in_the_marker_is_clamped_to_the_retry_cap(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a = make(store, clock, "agent-a")
    a.mint.errors.append(AuthServerUnavailable("429", retry_after=86400, outcome="rate_limited"))
    with pytest.raises(AuthServerUnavailable):
        a.obtain("start", held=valid_token(clock))
    assert opened(store, "marker")["not_before"] == T0 + Timing().retry_cap.total_seconds()


@pytest.mark.parametrize("answer", ["429", "401-twice", "read-without-a-token"])
def test_the_marker_is_capped_like_a_single_agent_without_a_valid_token(
    store: MemoryFleetStore, clock: Clock, answer: str
) -> None:
    a = make(store, clock, "agent-a")
    timing = Timing()
    if answer == "read-without-a-token":
        # the holder had a valid token: 120 s for it; an agent whose token is gone waits 30 s
        a.mint.errors.append(AuthServerUnavailable("429", retry_after=120, outcome="rate_limited"))
        with pytest.raises(AuthServerUnavailable):
            a.obtain("schedule", held=valid_token(clock))
        c = make(store, clock, "agent-c")
        with pytest.raises(FleetRateLimited) as waiting:
            c.obtain("start", held=None)
        wait = waiting.value.retry_after
        assert wait is not None and wait <= timing.retry_cap_expired.total_seconds()
        clock.advance(timing.retry_cap_expired.total_seconds())
        assert isinstance(c.obtain("retry", held=None), Minted)
        assert (a.mint.calls, c.mint.calls) == (1, 1)
        return
    if answer == "429":
        a.mint.errors.append(AuthServerUnavailable("429", retry_after=120, outcome="rate_limited"))
        cap = timing.retry_cap_expired.total_seconds()
        field_name = "not_before"
    else:
        a.mint.errors.extend([CredentialsRejected("401"), CredentialsRejected("401")])
        with pytest.raises(CredentialsRejected):
            a.obtain("start", held=None)
        clock.advance(60.001)
        cap = max(timing.retry_cap_expired, timing.rejected_first).total_seconds()
        field_name = "rejected_until"
    with pytest.raises((AuthServerUnavailable, CredentialsRejected)):
        a.obtain("start", held=None)
    assert a.mint.calls == (1 if answer == "429" else 2)
    waited = opened(store, "marker")[field_name] - clock.now.timestamp()
    assert waited <= cap + 0.001


def test_failures_without_retry_after_back_off_for_the_whole_fleet(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    a.mint.errors.append(AuthServerUnavailable("503"))
    with pytest.raises(AuthServerUnavailable):
        a.obtain("start")
    first = opened(store, "marker")["not_before"] - T0
    assert 1.5 <= first <= 2.0  # retry_first, less up to 25 %
    clock.advance(first + 0.001)
    b.mint.errors.append(AuthServerUnavailable("503"))
    with pytest.raises(AuthServerUnavailable):
        b.obtain("start")
    marker = opened(store, "marker")
    assert marker["strikes_busy"] == 2
    assert 2.999 <= marker["not_before"] - clock.now.timestamp() <= 4.001  # doubled
    assert (a.mint.calls, b.mint.calls) == (1, 1)


def test_a_401_sets_rejected_until_and_the_fleet_does_not_ask_before_it(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b, c = (make(store, clock, f"agent-{n}") for n in "abc")
    held = valid_token(clock)
    a.mint.errors.append(CredentialsRejected("401"))
    with pytest.raises(CredentialsRejected) as raised:
        a.obtain("start", held=held)
    assert not isinstance(raised.value, FleetRejected)
    marker = opened(store, "marker")
    wait = marker["rejected_until"] - T0
    assert 44.999 <= wait <= 60.001  # rejected_first, less up to 25 %
    assert marker["strikes_rejected"] == 1 and marker["not_before"] == 0
    with pytest.raises(FleetRejected) as waiting:
        b.obtain("rotation", held=held)
    assert waiting.value.retry_after == pytest.approx(wait)
    assert b.mint.calls == 0

    clock.advance(wait + 0.001)
    b.mint.errors.append(CredentialsRejected("401"))
    with pytest.raises(CredentialsRejected):
        b.obtain("retry", held=held)
    marker = opened(store, "marker")
    assert marker["strikes_rejected"] == 2
    second = marker["rejected_until"] - clock.now.timestamp()
    assert 89.999 <= second <= 120.001  # doubled, toward rejected_cap
    with pytest.raises(FleetRejected):
        c.obtain("start", held=held)
    assert (a.mint.calls, b.mint.calls, c.mint.calls) == (1, 1, 0)

    clock.advance(second + 0.001)
    assert isinstance(c.obtain("retry", held=held), Minted)
    assert store.entry(KEY, "marker") is None
    assert (a.mint.calls, b.mint.calls, c.mint.calls) == (1, 1, 1)


def test_a_failure_while_stopping_sets_no_marker(store: MemoryFleetStore, clock: Clock) -> None:
    a = make(store, clock, "agent-a")
    a.mint.during.append(a.stopping.set)
    a.mint.errors.append(AuthServerUnavailable("stopping: request cut"))
    with pytest.raises(AuthServerUnavailable):
        a.obtain("start")
    assert store.entry(KEY, "marker") is None


def test_a_400_sets_no_marker(store: MemoryFleetStore, clock: Clock) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    a.mint.errors.append(RequestRejected("400"))
    with pytest.raises(RequestRejected):
        a.obtain("start")
    assert store.entry(KEY, "marker") is None
    assert isinstance(b.obtain("start"), Minted) and b.mint.calls == 1


def test_a_marker_does_not_stop_the_adoption_of_a_good_document(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, c = make(store, clock, "agent-a"), make(store, clock, "agent-c")
    assert isinstance(a.obtain("start"), Minted)
    clock.advance(REFRESH_MINT_GAP + 10)
    a.mint.errors.append(AuthServerUnavailable("429", retry_after=60, outcome="rate_limited"))
    with pytest.raises(AuthServerUnavailable):
        a.obtain("refresh", held=a.mint.minted[0])  # a consumer's 401: a new token, a 429
    assert store.entry(KEY, "marker") is not None
    got = c.obtain("start")  # the shared token is still good until its refresh_at
    assert isinstance(got, Shared) and token_of(got) == "agent-a-1"
    assert c.mint.calls == 0


# ------------------------------------------------------------------------------- refresh
@pytest.mark.parametrize("reason", ["refresh", "force"])
def test_refresh_mints_a_new_token_when_the_shared_one_is_the_one_held(
    store: MemoryFleetStore, clock: Clock, reason: str
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    assert isinstance(a.obtain("start"), Minted)
    first = a.mint.minted[0]
    assert isinstance(b.obtain("start"), Shared)
    clock.advance(REFRESH_MINT_GAP)
    got = b.obtain(reason, held=first)  # a consumer of b got a 401 with the fleet's token
    assert isinstance(got, Minted) and token_of(got) == "agent-b-1"
    assert opened(store, "token")["generation"] == 2
    # a holds the old one: the shared token now differs, so a's refresh adopts it
    again = a.obtain(reason, held=first)
    assert isinstance(again, Shared) and token_of(again) == "agent-b-1"
    assert (a.mint.calls, b.mint.calls) == (1, 1)


def test_refresh_within_10s_of_a_publish_adopts_the_same_token(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    assert isinstance(a.obtain("start"), Minted)
    first = a.mint.minted[0]
    clock.advance(REFRESH_MINT_GAP - 0.5)
    for agent in (a, b):
        got = agent.obtain("refresh", held=first)
        assert isinstance(got, Shared) and token_of(got) == "agent-a-1"
    assert (a.mint.calls, b.mint.calls) == (1, 0)
    clock.advance(0.5)  # 10 s after the publish: one more for the fleet
    assert isinstance(b.obtain("refresh", held=first), Minted)
    assert (a.mint.calls, b.mint.calls) == (1, 1)
    assert isinstance(a.obtain("refresh", held=b.mint.minted[0]), Shared)
    assert (a.mint.calls, b.mint.calls) == (1, 1)


def test_refresh_with_nothing_shared_mints(store: MemoryFleetStore, clock: Clock) -> None:
    a = make(store, clock, "agent-a")
    assert isinstance(a.obtain("refresh", held=None), Minted)
    assert a.mint.calls == 1 and store.generation(KEY) == 1


def test_a_refresh_waits_for_a_holder_and_adopts_its_token(
    store: MemoryFleetStore, clock: Clock, pool: ThreadPoolExecutor
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    assert isinstance(a.obtain("start"), Minted)
    first = a.mint.minted[0]
    clock.advance(60)
    go = threading.Event()
    a.mint.during.append(lambda: go.wait(5))
    pending = pool.submit(a.obtain, "refresh", first)
    assert wait_for(lambda: store.entry(KEY, "lease") is not None, timeout=5)
    b.stopping.steps.extend([go.set, lambda: pending.result(5)])
    got = b.obtain("refresh", held=first)
    assert isinstance(got, Shared) and token_of(got) == "agent-a-2"
    assert isinstance(pending.result(5), Minted)
    assert (a.mint.calls, b.mint.calls) == (2, 0)  # one refresh for the fleet


# ------------------------------------------------------------------- same-token servers
def test_a_same_token_answer_is_published_again_until_its_expiry(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    assert isinstance(a.obtain("start"), Minted)
    first = a.mint.minted[0]
    clock.advance(REFRESH)
    a.mint.reuse = first  # the server hands back the token already shared
    got = a.obtain("schedule", held=first)
    assert isinstance(got, Minted) and got.next_at == first.expires_at
    doc = opened(store, "token")
    assert doc["generation"] == 2 and doc["refresh_at"] == T0 + LIFETIME
    clock.advance(LIFETIME - REFRESH - 10)  # 10 s before expiry: adopted, nobody asks
    shared = b.obtain("schedule")
    assert isinstance(shared, Shared) and token_of(shared) == "agent-a-1"
    assert shared.next_at == first.expires_at
    assert (a.mint.calls, b.mint.calls) == (2, 0)


# ------------------------------------------------------------------------- the store down
def test_store_down_defers_a_scheduled_refresh_then_mints_alone_and_rejoins(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b", seed=3)
    assert isinstance(a.obtain("start"), Minted)
    shared = b.obtain("start")
    assert isinstance(shared, Shared)
    held = shared.token
    clock.advance(100)
    b.store.go_down()  # only b loses the store
    deferred = b.obtain("schedule", held=held)
    assert isinstance(deferred, Deferred)
    latest = clock.now + (held.expires_at - clock.now) / 2
    assert clock.now <= deferred.next_at <= latest
    again = b.obtain("retry", held=held)  # drawn once per token held
    assert isinstance(again, Deferred) and again.next_at == deferred.next_at
    assert b.mint.calls == 0
    status = b.status()
    assert status["store_up"] is False and status["last_error"]
    assert b.metrics.up() is False

    clock.now = deferred.next_at
    alone = b.obtain("schedule", held=held)
    assert isinstance(alone, Minted) and alone.next_at is None  # its own schedule
    assert b.mint.calls == 1 and b.status()["role"] == "alone"
    assert store.generation(KEY) == 1  # nothing published
    assert isinstance(a.obtain("schedule", held=a.mint.minted[0]), Shared)  # a unaffected

    b.store.come_back()
    back = b.obtain("schedule", held=alone.fetched.token)
    assert isinstance(back, Shared) and token_of(back) == "agent-a-1"  # it rejoins
    status = b.status()
    assert status["store_up"] is True and status["last_error"] is None
    assert status["role"] == "adopter"
    assert b.metrics.up() is True
    assert (a.mint.calls, b.mint.calls) == (1, 1)


@pytest.mark.parametrize("reason", ["start", "rotation", "refresh", "force", "event"])
def test_store_down_mints_at_once_for_other_reasons(
    store: MemoryFleetStore, clock: Clock, reason: str
) -> None:
    b = make(store, clock, "agent-b")
    held = Token(Secret("held-1"), "bearer", LIFETIME, START, START + timedelta(hours=1))
    b.store.go_down()
    got = b.obtain(reason, held=held)
    assert isinstance(got, Minted) and got.next_at is None
    assert b.mint.calls == 1


def test_store_down_with_an_expired_token_mints_at_once(
    store: MemoryFleetStore, clock: Clock
) -> None:
    b = make(store, clock, "agent-b")
    held = Token(Secret("held-1"), "bearer", 60, START - timedelta(hours=2), START)
    b.store.go_down()
    assert isinstance(b.obtain("schedule", held=held), Minted)
    assert isinstance(b.obtain("retry", held=None), Minted)
    assert b.mint.calls == 2


@pytest.mark.parametrize(
    ("method", "calls"),
    [("acquire", 1), ("publish", 1), ("read", 2)],
    ids=["acquire", "publish", "read-after-winning"],
)
def test_a_store_failing_mid_protocol_still_gives_one_token(
    store: MemoryFleetStore, clock: Clock, method: str, calls: int
) -> None:
    a = make(store, clock, "agent-a")
    if method == "read":
        a.store.before("acquire", lambda: a.store.fail_next(1, "read"))
    else:
        a.store.fail_method(method)
    got = a.obtain("start")
    assert isinstance(got, Minted) and got.next_at is None
    assert a.mint.calls == 1
    assert a.store.calls[method] == calls
    assert store.entry(KEY, "lease") is None  # released (or never taken)
    assert a.status()["store_up"] is False
    assert a.metrics.up() is False


def test_a_marker_that_cannot_be_written_leaves_the_error_as_it_was(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a = make(store, clock, "agent-a")
    a.store.fail_method("mark")
    a.mint.errors.append(AuthServerUnavailable("429", retry_after=60, outcome="rate_limited"))
    with pytest.raises(AuthServerUnavailable) as raised:
        a.obtain("start")
    assert raised.value.retry_after == 60
    assert a.status()["store_up"] is False and store.entry(KEY, "lease") is None


def test_the_store_error_in_status_is_masked(store: MemoryFleetStore, clock: Clock) -> None:
    masker = Masker()
    masker.add(CLIENT_SECRET)
    b = make(store, clock, "agent-b", masker=masker)
    b.store.go_down(f"AUTH failed for password {CLIENT_SECRET}")
    assert isinstance(b.obtain("start"), Minted)
    shown = b.status()["last_error"]
    assert CLIENT_SECRET not in shown and MASK in shown


# ---------------------------------------------------------------------------------- status
def test_status_document(store: MemoryFleetStore, clock: Clock) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    assert a.status() == {
        "store": "memory:test",
        "store_up": None,
        "role": None,
        "lease_holder": None,
        "generation": 0,
        "last_error": None,
    }
    assert isinstance(a.obtain("start"), Minted)
    assert a.status() == {
        "store": "memory:test",
        "store_up": True,
        "role": "minter",
        "lease_holder": None,
        "generation": 1,
        "last_error": None,
    }
    assert isinstance(b.obtain("start"), Shared)
    assert b.status()["role"] == "adopter" and b.status()["generation"] == 1
    b.store.go_down()
    b.obtain("start")
    assert b.status()["store_up"] is False and b.status()["role"] == "alone"
    assert "made to fail" in b.status()["last_error"]


def test_close_closes_the_store(store: MemoryFleetStore, clock: Clock) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    a.fleet.close()
    assert a.store.closed and not b.store.closed
    assert isinstance(b.obtain("start"), Minted)  # the other agent's handle is its own


# ------------------------------------------------------------------- keys and the secret
def test_nothing_written_to_the_store_holds_the_client_secret(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    a.mint.errors.extend([AuthServerUnavailable("429", retry_after=5), CredentialsRejected("401")])
    with pytest.raises(AuthServerUnavailable):
        a.obtain("start")
    clock.advance(5)
    with pytest.raises(CredentialsRejected):
        a.obtain("start")
    clock.advance(3600)
    assert isinstance(a.obtain("start"), Minted)
    clock.advance(REFRESH_MINT_GAP)
    assert isinstance(b.obtain("refresh", held=a.mint.minted[0]), Minted)
    assert isinstance(b.obtain("start", credentials=ROTATED), Minted)
    writes = store.writes
    assert {w.method for w in writes} == {"acquire", "publish", "mark"}
    forms = [*variants(CLIENT_SECRET), *variants(ROTATED.client_secret.reveal())]
    for write in writes:
        for form in forms:
            assert form.encode() not in write.value, write.method
            assert form not in write.key
        assert b"client_secret" not in write.value
    assert {w.key for w in writes} == {KEY, FleetKeys.derive(ROTATED, TOKEN_URL, None).key}


@pytest.mark.parametrize(
    ("token_url", "scope", "shares"),
    [
        (TOKEN_URL, None, True),
        (TOKEN_URL, "", True),
        (TOKEN_URL + "/", None, False),
        ("https://sandbox.osigu.com/v1/oauth/token", None, False),
        (TOKEN_URL, "read", False),
    ],
)
def test_only_the_same_credentials_and_endpoint_share(
    store: MemoryFleetStore, clock: Clock, token_url: str, scope: str | None, shares: bool
) -> None:
    a = make(store, clock, "agent-a")
    b = make(store, clock, "agent-b", token_url=token_url, scope=scope)
    assert isinstance(a.obtain("start"), Minted)
    got = b.obtain("start")
    assert isinstance(got, Shared if shares else Minted)
    assert b.mint.calls == (0 if shares else 1)


def test_scope_words_are_sorted_for_the_fleet_key(store: MemoryFleetStore, clock: Clock) -> None:
    a = make(store, clock, "agent-a", scope="write read")
    b = make(store, clock, "agent-b", scope="read  write")
    assert isinstance(a.obtain("start"), Minted)
    assert isinstance(b.obtain("start"), Shared) and b.mint.calls == 0


def test_a_rotated_secret_is_a_new_fleet(store: MemoryFleetStore, clock: Clock) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    assert isinstance(a.obtain("start"), Minted)
    got = b.obtain("rotation", credentials=ROTATED)
    assert isinstance(got, Minted) and b.mint.calls == 1
    rotated = FleetKeys.derive(ROTATED, TOKEN_URL, None)
    assert rotated.key != KEY
    assert opened(store, "token", rotated)["access_token"] == "agent-b-1"
    assert opened(store, "token")["access_token"] == "agent-a-1"


def test_a_token_minted_with_re_read_credentials_is_published_for_them(
    store: MemoryFleetStore, clock: Clock
) -> None:
    a, b = make(store, clock, "agent-a"), make(store, clock, "agent-b")
    a.mint.rotated_to = ROTATED  # the 401 re-read found a new secret, which was accepted
    got = a.obtain("start", credentials=CREDS)
    assert isinstance(got, Minted) and got.next_at is not None
    rotated = FleetKeys.derive(ROTATED, TOKEN_URL, None)
    assert store.entry(KEY, "token") is None and store.generation(KEY) == 0
    assert opened(store, "token", rotated)["access_token"] == "agent-a-1"
    shared = b.obtain("rotation", credentials=ROTATED)
    assert isinstance(shared, Shared) and b.mint.calls == 0


def test_the_fleet_key_is_a_hex_hmac_that_reveals_no_secret() -> None:
    assert len(KEY) == 64 and int(KEY, 16) >= 0
    assert CLIENT_SECRET not in repr(KEYS)
    assert FleetKeys.derive(CREDS, TOKEN_URL, "").key == KEY
