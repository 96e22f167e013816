"""Real elapsed time (DESIGN §10): wall-clock steps never move a refresh or a token's expiry;
a suspend (real time passing while nothing runs) starts a due refresh within a tick.

In-process with injected clocks, and the running daemon under libfaketime (Debian package
``faketime``) with ``FAKETIME_DONT_FAKE_MONOTONIC=1``: only its wall clock jumps, while the test
and its token server keep the real time.
"""

from __future__ import annotations

import glob
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.clock import ElapsedClock, to_wall, token_to_wall, wall_offset
from agent.devserver import TokenServer
from agent.manager import Outcome, Reason
from agent.models import Secret, Token
from agent.schedule import RefreshScheduler
from tests.conftest import CLIENT_ID, CLIENT_SECRET, Spawn, agent_env, wait_for, write_config
from tests.servers import free_port

pytestmark = pytest.mark.timeout(180)


class Clocks:
    """A wall clock and a CLOCK_BOOTTIME that tests move independently."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.elapsed = 1000.0

    def step_wall(self, seconds: float) -> None:
        self.wall += seconds

    def pass_time(self, seconds: float) -> None:  # real time: both move (a suspend too)
        self.wall += seconds
        self.elapsed += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def clock(clocks: Clocks) -> ElapsedClock:
    return ElapsedClock(wall=lambda: clocks.wall, elapsed=lambda: clocks.elapsed)


def token(obtained: datetime, seconds: int) -> Token:
    return Token(
        access_token=Secret("t0k3n"),
        token_type="bearer",
        expires_in=seconds,
        obtained_at=obtained,
        expires_at=obtained + timedelta(seconds=seconds),
    )


def test_a_wall_clock_step_moves_neither_now_nor_expiry(
    clocks: Clocks, clock: ElapsedClock
) -> None:
    start = clock()
    held = token(start, 20)
    clocks.step_wall(3 * 3600)  # forward 3 h: the token is still valid
    assert clock() == start and held.is_valid(clock())
    assert wall_offset(clock) == timedelta(hours=3)
    # shown on the wall clock: what a consumer with the stepped clock must compare with
    assert token_to_wall(clock, held).expires_at == held.expires_at + timedelta(hours=3)
    clocks.step_wall(-4 * 3600)  # back 1 h from the start: still 20 s of real life, no more
    assert held.is_valid(clock())
    clocks.pass_time(21)
    assert not held.is_valid(clock())  # expired after 21 real seconds, whatever the wall says
    assert to_wall(clock, clock()).timestamp() == pytest.approx(clocks.wall)


def test_a_suspend_counts_as_elapsed_time(clocks: Clocks, clock: ElapsedClock) -> None:
    held = token(clock(), 3600)
    clocks.pass_time(2 * 3600)  # CLOCK_BOOTTIME includes the time the machine slept
    assert not held.is_valid(clock())
    assert wall_offset(clock) == timedelta(0)


class FakeProfile:
    name = "p"
    token: object = "held"

    def __init__(self) -> None:
        self.refreshes: list[Reason] = []
        self.done = threading.Event()

    def refresh(self, reason: Reason) -> Outcome:
        self.refreshes.append(reason)
        self.done.set()
        return Outcome(ok=True, next_at=datetime.now(UTC) + timedelta(days=1))

    def poll(self) -> bool:
        return False


@pytest.fixture
def scheduler(clocks: Clocks, clock: ElapsedClock) -> Iterator[RefreshScheduler]:
    made = RefreshScheduler(clock=clock, tick=3600, rng=random.Random(1))
    yield made
    made.shutdown()


def test_the_tick_starts_a_refresh_that_is_due_on_elapsed_time(
    clocks: Clocks, clock: ElapsedClock, scheduler: RefreshScheduler
) -> None:
    """After a suspend APScheduler still sleeps on its old wall-clock plan; the tick acts."""
    profile: Any = FakeProfile()
    scheduler.add(profile, first_run=clock() + timedelta(hours=1), poll_interval=timedelta(0))
    scheduler.start()
    scheduler.tick()
    assert not profile.refreshes  # not due yet
    clocks.elapsed += 2 * 3600  # the machine slept 2 h (the fake wall clock did not move)
    scheduler.tick()
    assert profile.done.wait(10)
    assert profile.refreshes == [Reason.SCHEDULE]


def test_a_wall_clock_step_replaces_the_jobs_at_their_elapsed_times(
    clocks: Clocks, clock: ElapsedClock, scheduler: RefreshScheduler
) -> None:
    profile: Any = FakeProfile()
    due = clock() + timedelta(minutes=10)
    scheduler.add(profile, first_run=due, poll_interval=timedelta(0))
    assert scheduler.next_fire("p") == due
    clocks.step_wall(-3600)  # back 1 h: APScheduler (wall clock) would wait 1 h 10 min
    scheduler.tick()
    assert scheduler.next_fire("p") == due - timedelta(hours=1)
    assert scheduler.next_run("p") == due  # the elapsed-time deadline did not move


# --------------------------------------------------------------------- the daemon, faketime


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        if os.environ.get("CI"):
            pytest.fail("libfaketime is missing: `make test` installs the faketime package")
        pytest.skip("the Debian package faketime is not installed")
    return found[0]


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    return response.status_code, response.json()["profiles"]["dvs"]


@pytest.mark.parametrize("step", ["+3h", "-1h"])
def test_the_running_daemon_follows_real_time_across_a_wall_clock_step(
    tmp_path: Path, spawn: Spawn, step: str
) -> None:
    """With 20 s tokens and polling off, the wall clock of the agent jumps: tokens are still
    refreshed on real time, the file never holds an expired token for long, and /readyz
    never says ok for a token the server has expired, nor expired for a valid one."""
    library = _libfaketime()
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    port = free_port()
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=20) as server:
        config = write_config(
            tmp_path, server.url, poll="0", agent=f'\n[health]\nlisten = "127.0.0.1:{port}"\n'
        )
        env = agent_env(
            LD_PRELOAD=library,
            FAKETIME_TIMESTAMP_FILE=str(offset_file),
            FAKETIME_DONT_FAKE_MONOTONIC="1",
            FAKETIME_NO_CACHE="1",
        )
        agent = spawn(config, env)
        token_file = tmp_path / "token"
        assert wait_for(lambda: token_file.exists(), timeout=20), agent.output()
        time.sleep(1)
        offset_file.write_text(f"{step}\n")
        shift = 3 * 3600 if step == "+3h" else -3600
        deadline = time.time() + 45
        worst_stale = 0.0
        checked = 0
        while time.time() < deadline:
            code, profile = _readyz(port)
            held = token_file.read_text()
            issued = server.issued().get(held)
            assert issued is not None
            now = time.time()
            worst_stale = max(worst_stale, now - issued.expires_at)
            # the state agrees with the server's view of the token consumers hold: never ok
            # for a token the server expired, never expired for one valid a while yet
            if code == 200:
                assert now < issued.expires_at + 1, profile
            if now < issued.expires_at - 2:
                assert code == 200, profile
            checked += 1
            time.sleep(0.25)
        assert checked > 50
        assert worst_stale <= 1.5, f"the token file held an expired token for {worst_stale:.1f}s"
        tokens = {r.access_token for r in server.token_requests() if r.status == 200}
        assert len(tokens) >= 3  # refreshed about every 10 s of real time
        document = json.loads((tmp_path / "token.json").read_text())
        written = datetime.fromisoformat(document["expires_at"].replace("Z", "+00:00"))
        last = server.issued()[document["access_token"]]
        assert abs(written.timestamp() - shift - last.expires_at) <= 2
        assert '"event":"clock_step"' in agent.output()
        assert agent.stop() == 0
