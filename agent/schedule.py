"""APScheduler jobs: one refresh job and one version-poll job per profile, on a shared pool.

A poll that sees a change refreshes at once in its own thread (no hop through the scheduler).

Every trigger (time, a version change, SIGHUP) goes through :meth:`RefreshScheduler.trigger`,
which coalesces: while a profile's refresh runs, further triggers set one pending reason that
the same run picks up when it finishes, so refreshes of one profile never overlap and a burst of
triggers costs one refresh. The refresh job's fire time is always the one the profile asked for
(:class:`_ProfileTrigger` reads it), so APScheduler's own bookkeeping cannot move it.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from agent.manager import Outcome, Profile, Reason
from agent.oauth import Clock

_FAR = timedelta(days=3650)
#: worker threads of the shared pool that runs every job (started only as jobs overlap)
POOL_WORKERS = 4

OutcomeHook = Callable[[Profile, Reason, Outcome], None]


@dataclass(slots=True)
class _Slot:
    profile: Profile
    next_at: datetime
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: bool = False
    pending: Reason | None = None


class _ProfileTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires at the time the profile's last run asked for; never twice for one time."""

    def __init__(self, slot: _Slot) -> None:
        self._slot = slot

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        wanted = self._slot.next_at
        if previous_fire_time is not None and wanted <= previous_fire_time:
            return now + _FAR  # the run in progress sets the next time when it ends
        return wanted

    def __str__(self) -> str:
        return "profile schedule"


class RefreshScheduler:
    """Owns the APScheduler instance; thread-safe."""

    def __init__(
        self,
        *,
        clock: Clock,
        on_outcome: OutcomeHook | None = None,
        max_workers: int = POOL_WORKERS,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - poll phases
        self._on_outcome = on_outcome
        self._log = logger or logging.getLogger("agent.schedule")
        self._slots: dict[str, _Slot] = {}
        self._stopping = False
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=max_workers)},
            job_defaults={
                # a refresh that starts late (GC pause, suspended VM) must still run
                "misfire_grace_time": None,
                "coalesce": True,
                "max_instances": 1,
            },
            timezone="UTC",
        )
        self._scheduler.add_listener(self._job_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)

    def add(self, profile: Profile, *, first_run: datetime, poll_interval: timedelta) -> None:
        slot = _Slot(profile=profile, next_at=first_run)
        self._slots[profile.name] = slot
        self._scheduler.add_job(
            self._run,
            trigger=_ProfileTrigger(slot),
            args=(profile.name,),
            id=f"refresh:{profile.name}",
            name=f"refresh {profile.name}",
            next_run_time=first_run,
            replace_existing=True,
        )
        if poll_interval > timedelta(0):
            # Fixed period from a random phase: a fleet (or many profiles) polls spread over the
            # interval, and a rotation waits poll_interval/2 on average. (A jitter on every fire
            # would spread them too, but uneven gaps make the average wait longer.)
            phase = self._rng.uniform(0, poll_interval.total_seconds())
            self._scheduler.add_job(
                self._poll,
                trigger=IntervalTrigger(
                    seconds=poll_interval.total_seconds(),
                    start_date=self._clock() + timedelta(seconds=phase),
                    timezone="UTC",
                ),
                args=(profile.name,),
                id=f"poll:{profile.name}",
                name=f"poll {profile.name}",
                misfire_grace_time=max(1, int(poll_interval.total_seconds())),
                replace_existing=True,
            )

    def add_periodic(self, job_id: str, func: Callable[[], object], every: timedelta) -> None:
        """A small job on the same scheduler (e.g. the systemd watchdog ping)."""
        self._scheduler.add_job(
            func,
            trigger=IntervalTrigger(seconds=every.total_seconds(), timezone="UTC"),
            id=job_id,
            name=job_id,
            misfire_grace_time=max(1, int(every.total_seconds())),
            replace_existing=True,
        )

    def add_once(self, job_id: str, func: Callable[[], object], when: datetime) -> None:
        """Run ``func`` once at ``when`` (replaces the job of the same id)."""
        self._scheduler.add_job(
            func,
            trigger=DateTrigger(run_date=when, timezone="UTC"),
            id=job_id,
            name=job_id,
            misfire_grace_time=None,
            replace_existing=True,
        )

    def remove(self, name: str) -> None:
        self._slots.pop(name, None)
        for job_id in (f"refresh:{name}", f"poll:{name}"):
            if self._scheduler.get_job(job_id) is not None:
                self._scheduler.remove_job(job_id)

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        self._stopping = True
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def busy(self) -> bool:
        """True while any profile's refresh runs."""
        return any(slot.running for slot in self._slots.values())

    def running(self, name: str) -> bool:
        """True while ``name``'s refresh runs."""
        slot = self._slots.get(name)
        return slot is not None and slot.running

    def next_run(self, name: str) -> datetime | None:
        slot = self._slots.get(name)
        return slot.next_at if slot else None

    def trigger(self, name: str, reason: Reason) -> None:
        """Re-auth ``name`` now (coalescing with a run in progress)."""
        slot = self._slots.get(name)
        if slot is None or self._stopping:
            return
        with slot.lock:
            _add_pending(slot, reason)
            if not slot.running:
                self._set_next(slot, self._clock())

    def _set_next(self, slot: _Slot, when: datetime) -> None:
        slot.next_at = when
        if self._stopping:
            return
        job = self._scheduler.get_job(f"refresh:{slot.profile.name}")
        if job is not None:
            job.modify(next_run_time=when)

    def _run(self, name: str) -> None:
        """The refresh job."""
        slot = self._slots.get(name)
        if slot is None:
            return
        with slot.lock:
            if slot.running:
                return  # a poll's refresh is running: it sets the next time when it ends
            slot.running = True
            taken = _take_pending(slot)
        self._drive(slot, taken or (Reason.SCHEDULE if slot.profile.token else Reason.START))

    def _poll(self, name: str) -> None:
        """The poll job: on a change, refresh in this same thread, now."""
        slot = self._slots.get(name)
        if slot is None or self._stopping or self.running(name):
            return  # a refresh running re-reads the credentials anyway
        if not slot.profile.poll():
            return
        with slot.lock:
            if slot.running or self._stopping:
                _add_pending(slot, Reason.ROTATION)  # the refresh running picks it up
                return
            slot.running = True
        self._drive(slot, Reason.ROTATION)

    def _drive(self, slot: _Slot, reason: Reason) -> None:
        """Refresh until no trigger is pending (call with ``slot.running`` set)."""
        while True:
            outcome = slot.profile.refresh(reason)
            if self._on_outcome is not None:
                try:
                    self._on_outcome(slot.profile, reason, outcome)
                except Exception:
                    self._log.exception("outcome hook failed")
            with slot.lock:
                taken = _take_pending(slot)
                if taken is None or self._stopping:
                    slot.running = False
                    self._set_next(slot, outcome.next_at)
                    return
            reason = taken

    def _job_event(self, event: JobExecutionEvent) -> None:
        if event.exception is not None:
            self._log.error("job %s failed: %r", event.job_id, event.exception)
        else:
            self._log.warning("job %s missed its run time", event.job_id)


def _take_pending(slot: _Slot) -> Reason | None:
    """The pending trigger's reason, cleared (call with ``slot.lock`` held)."""
    reason, slot.pending = slot.pending, None
    return reason


def _add_pending(slot: _Slot, reason: Reason) -> None:
    """Set the pending trigger (call with ``slot.lock`` held); a retry never overrides another."""
    if slot.pending is None or reason is not Reason.RETRY:
        slot.pending = reason
