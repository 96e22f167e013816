"""RefreshScheduler in-process: poll phases, a poll's own refresh, coalescing, one run at a time."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.manager import Outcome, Reason
from agent.schedule import RefreshScheduler
from tests.conftest import wait_for

FAR = timedelta(days=1)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class FakeProfile:
    """What the scheduler uses of a Profile: name, token, refresh(reason), poll()."""

    name: str
    token: object = "held"
    changes: int = 0  # polls that see a change
    hold: threading.Event = field(default_factory=threading.Event)
    refreshes: list[tuple[Reason, str]] = field(default_factory=list)
    polls: list[str] = field(default_factory=list)
    active: int = 0
    most_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.hold.set()

    def refresh(self, reason: Reason) -> Outcome:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.refreshes.append((reason, threading.current_thread().name))
        self.hold.wait(10)
        with self.lock:
            self.active -= 1
        return Outcome(ok=True, next_at=now() + FAR)

    def poll(self) -> bool:
        self.polls.append(threading.current_thread().name)
        if self.changes > 0:
            self.changes -= 1
            return True
        return False


@pytest.fixture
def scheduler() -> Iterator[RefreshScheduler]:
    scheduler = RefreshScheduler(clock=now, rng=random.Random(5))
    yield scheduler
    scheduler.shutdown()


def _add(scheduler: RefreshScheduler, profile: FakeProfile, poll: float) -> None:
    profile_: Any = profile
    scheduler.add(profile_, first_run=now() + FAR, poll_interval=timedelta(seconds=poll))


def test_polls_run_at_a_fixed_period_from_a_random_phase(scheduler: RefreshScheduler) -> None:
    before = now()
    for i in range(20):
        _add(scheduler, FakeProfile(f"p{i}"), poll=30)
    starts = []
    for i in range(20):
        schedule = scheduler.poll_schedule(f"p{i}")
        assert schedule is not None
        interval, start = schedule
        assert interval == timedelta(seconds=30)  # a fixed period: no jitter on every fire
        assert before <= start <= now() + timedelta(seconds=30)
        starts.append(start)
    # spread over the interval, not in step (20 uniform phases: the spread is ~27 s)
    assert max(starts) - min(starts) > timedelta(seconds=10)


def test_a_poll_that_sees_a_change_refreshes_in_its_own_thread(
    scheduler: RefreshScheduler,
) -> None:
    profile = FakeProfile("a", changes=1)
    _add(scheduler, profile, poll=0.2)
    scheduler.start()
    assert wait_for(lambda: profile.refreshes, timeout=10)
    reason, thread = profile.refreshes[0]
    assert reason is Reason.ROTATION
    assert thread == profile.polls[0]  # the poll's thread, no hop through the scheduler
    assert wait_for(lambda: len(profile.polls) >= 3, timeout=10)
    assert len(profile.refreshes) == 1  # later polls see no change


def test_triggers_during_a_polls_refresh_coalesce_into_one_more_run(
    scheduler: RefreshScheduler,
) -> None:
    profile = FakeProfile("a", changes=1)
    profile.hold.clear()  # the poll's refresh blocks until released
    _add(scheduler, profile, poll=0.2)
    scheduler.start()
    assert wait_for(lambda: profile.refreshes, timeout=10)
    assert scheduler.running("a") and scheduler.busy()
    for reason in (Reason.SIGHUP, Reason.REFRESH, Reason.RETRY):
        scheduler.trigger("a", reason)
    profile.hold.set()
    assert wait_for(lambda: len(profile.refreshes) == 2 and not scheduler.busy(), timeout=10)
    assert profile.refreshes[1][0] is Reason.REFRESH  # the last one; a retry overrides none
    assert profile.most_active == 1
    assert scheduler.next_run("a") is not None and scheduler.next_run("a") > now() + FAR / 2


def test_the_refresh_job_never_overlaps_a_polls_refresh(scheduler: RefreshScheduler) -> None:
    profile = FakeProfile("a", changes=1)
    profile.hold.clear()
    _add(scheduler, profile, poll=0.2)
    scheduler.start()
    assert wait_for(lambda: profile.refreshes, timeout=10)
    fired = now() + timedelta(hours=1)
    scheduler.set_next("a", now())  # the schedule comes due meanwhile
    assert wait_for(lambda: (scheduler.next_fire("a") or fired) > fired)
    assert len(profile.polls) == 1  # polls skip while a refresh runs
    profile.hold.set()
    assert wait_for(lambda: not scheduler.busy(), timeout=10)
    assert len(profile.refreshes) == 1  # the job saw the poll's refresh running and let it be
    assert profile.most_active == 1


def test_no_poll_refresh_after_shutdown(scheduler: RefreshScheduler) -> None:
    profile = FakeProfile("a")
    _add(scheduler, profile, poll=0.2)
    scheduler.start()
    assert wait_for(lambda: profile.polls, timeout=10)
    scheduler.shutdown()
    profile.changes = 5
    scheduler._poll("a")
    assert profile.refreshes == []


def test_workers_are_reused_never_shared_by_stuck_jobs() -> None:
    """A job goes to an idle worker, else to a new thread: stuck jobs hold only their own
    threads, and jobs one after another reuse one warm thread."""
    from agent.schedule import _Workers

    workers = _Workers(idle_seconds=30)
    names: list[str] = []
    done = threading.Event()

    def note() -> None:
        names.append(threading.current_thread().name + str(threading.get_ident()))
        done.set()

    for _ in range(5):  # one after another: the same thread
        done.clear()
        workers.submit(note)
        assert done.wait(5)
        assert wait_for(lambda: workers._idle == 1)
    assert len(set(names)) == 1
    stuck = threading.Event()
    for _ in range(10):  # ten stuck jobs ...
        workers.submit(stuck.wait, 30)
    done.clear()
    workers.submit(note)  # ... and another still runs at once
    assert done.wait(5)
    stuck.set()


def test_an_idle_worker_ends() -> None:
    from agent.schedule import _Workers

    workers = _Workers(idle_seconds=0.2)
    before = threading.active_count()
    ran = threading.Event()
    workers.submit(ran.set)
    assert ran.wait(5)
    assert wait_for(lambda: threading.active_count() == before, timeout=5)
