"""APScheduler jobs: one refresh job and one version-poll job per profile; the work runs on a
thread of the profile's own.

Every trigger (time, a version change, SIGHUP) goes through :meth:`RefreshScheduler.trigger`,
which coalesces: while a profile's refresh (or poll) runs, further triggers set one pending
reason that the same thread picks up when it finishes, so refreshes of one profile never
overlap and a burst of triggers costs one refresh. The refresh job's fire time is always the
one the profile asked for (:class:`_ProfileTrigger` reads it), so APScheduler's own bookkeeping
cannot move it.

Profiles share nothing that one of them can exhaust (DESIGN §10): APScheduler's pool only hands
each job to a thread of the profile's own (which ends with the work), so N stuck profiles hold
N threads of their own and never a worker another profile needs.

Time: APScheduler keeps wall-clock times. Whether a refresh is due is decided on the agent's
clock (real elapsed time, :mod:`agent.clock`): the times handed to APScheduler are that clock's
converted to the wall clock, and a tick thread, sleeping on the monotonic clock, re-checks every
:data:`TICK` seconds: it starts a refresh that is due (after a suspend, or when APScheduler
waits for a wall time a clock step moved), and re-places every job when the wall clock stepped.
"""

from __future__ import annotations

import logging
import queue
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

from agent.clock import Clock, to_wall, utc_now, wall_offset
from agent.manager import Outcome, Profile, Reason
from agent.signals import signals_to_main_thread

_FAR = timedelta(days=3650)
#: worker threads of APScheduler's pool; jobs only hand work to the profiles' own threads, so
#: they never wait long (started only as jobs overlap)
POOL_WORKERS = 2
#: the tick: due refreshes are re-checked on the real-elapsed clock at least this often (s)
TICK = 5.0
#: a worker with nothing to do for this long ends (s)
WORKER_IDLE_SECONDS = 60.0

OutcomeHook = Callable[[Profile, Reason, Outcome], None]


class _Workers:
    """An elastic pool: a job goes to an idle worker if there is one, else to a new thread;
    a worker idle for ``idle_seconds`` ends. So no number of stuck jobs can keep another job
    from starting (each holds only its own thread), idle there are few threads or none, and
    polls every second reuse a warm thread instead of starting one each time.

    Workers block the daemon's signals (agent.signals), whichever thread submits."""

    def __init__(self, idle_seconds: float = WORKER_IDLE_SECONDS) -> None:
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[object, ...]]] = (
            queue.SimpleQueue()
        )
        #: workers waiting for a job (each job put on the queue has taken one of them)
        self._idle = 0

    def submit(self, work: Callable[..., None], *args: object) -> None:
        """Run ``work(*args)`` now, on a worker (raises RuntimeError if no thread can start)."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put((work, args))
                return
        thread = threading.Thread(
            target=self._worker, args=(work, args), name="dvs-worker", daemon=True
        )
        with signals_to_main_thread():
            thread.start()

    def _worker(self, work: Callable[..., None], args: tuple[object, ...]) -> None:
        while True:
            try:
                work(*args)
            except Exception:  # a bug in one job must not end the worker silently
                logging.getLogger("agent.schedule").exception("a scheduled job failed")
            with self._lock:
                self._idle += 1
            try:
                work, args = self._jobs.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    try:  # a job put just as the wait ended was meant for a worker: take it
                        work, args = self._jobs.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return


@dataclass(slots=True)
class _Slot:
    profile: Profile
    #: when the next refresh is due, on the agent's clock
    next_at: datetime
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: a thread works for this profile (a poll or a refresh)
    running: bool = False
    #: ... and it is a refresh (a poll's thread may go on to refresh)
    refreshing: bool = False
    pending: Reason | None = None
    poll_every: timedelta = timedelta(0)


class _ProfileTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires at the time the profile's last run asked for; never twice for one time."""

    def __init__(self, slot: _Slot, clock: Clock) -> None:
        self._slot = slot
        self._clock = clock

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        wanted = to_wall(self._clock, self._slot.next_at)
        if previous_fire_time is not None and wanted <= previous_fire_time:
            return now + _FAR  # the run in progress sets the next time when it ends
        return wanted

    def __str__(self) -> str:
        return "profile schedule"


class RefreshScheduler:
    """Owns the APScheduler instance and the tick; thread-safe."""

    def __init__(
        self,
        *,
        clock: Clock,
        on_outcome: OutcomeHook | None = None,
        on_tick: Callable[[], object] | None = None,
        max_workers: int = POOL_WORKERS,
        tick: float = TICK,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - poll phases
        self._on_outcome = on_outcome
        self._on_tick = on_tick
        self._tick_seconds = tick
        self._log = logger or logging.getLogger("agent.schedule")
        self._slots: dict[str, _Slot] = {}
        #: one-shot jobs by id: their time on the agent's clock (re-placed after a clock step)
        self._once: dict[str, datetime] = {}
        self._stopping = False
        self._stopped = threading.Event()
        self._offset = wall_offset(clock)
        self._tick_thread: threading.Thread | None = None
        self._workers = _Workers()
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

    def add(
        self,
        profile: Profile,
        *,
        first_run: datetime,
        poll_interval: timedelta,
        running: bool = False,
    ) -> None:
        """Schedule ``profile``; ``running``: its first attempt still runs on a thread of the
        caller's, which hands over with :meth:`release` when it ends."""
        slot = _Slot(
            profile=profile,
            next_at=self._clock() + _FAR if running else first_run,
            running=running,
            refreshing=running,
            poll_every=poll_interval,
        )
        self._slots[profile.name] = slot
        self._scheduler.add_job(
            self._run,
            trigger=_ProfileTrigger(slot, self._clock),
            args=(profile.name,),
            id=f"refresh:{profile.name}",
            name=f"refresh {profile.name}",
            next_run_time=to_wall(self._clock, slot.next_at),
            replace_existing=True,
        )
        if poll_interval > timedelta(0):
            self._add_poll(slot)

    def _add_poll(self, slot: _Slot) -> None:
        # Fixed period from a random phase: a fleet (or many profiles) polls spread over the
        # interval, and a rotation waits poll_interval/2 on average. (A jitter on every fire
        # would spread them too, but uneven gaps make the average wait longer.)
        interval = slot.poll_every.total_seconds()
        phase = self._rng.uniform(0, interval)
        name = slot.profile.name
        self._scheduler.add_job(
            self._poll,
            trigger=IntervalTrigger(
                seconds=interval,
                start_date=utc_now() + timedelta(seconds=phase),
                timezone="UTC",
            ),
            args=(name,),
            id=f"poll:{name}",
            name=f"poll {name}",
            misfire_grace_time=max(1, int(interval)),
            replace_existing=True,
        )

    def release(self, name: str, next_at: datetime) -> None:
        """The first attempt that :meth:`add` was told about (``running=True``) ended."""
        slot = self._slots.get(name)
        if slot is None:
            return
        with slot.lock:
            taken = _take_pending(slot)
            if taken is None or self._stopping:
                slot.running = slot.refreshing = False
                self._set_next(slot, next_at)
                return
        self._drive(slot, taken)

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
        """Run ``func`` once at ``when`` (the agent's clock; replaces the job of the same id)."""
        self._once[job_id] = when
        self._scheduler.add_job(
            self._run_once,
            trigger=DateTrigger(run_date=to_wall(self._clock, when), timezone="UTC"),
            args=(job_id, func),
            id=job_id,
            name=job_id,
            misfire_grace_time=None,
            replace_existing=True,
        )

    def _run_once(self, job_id: str, func: Callable[[], object]) -> None:
        self._once.pop(job_id, None)
        func()

    def remove(self, name: str) -> None:
        self._slots.pop(name, None)
        for job_id in (f"refresh:{name}", f"poll:{name}"):
            if self._scheduler.get_job(job_id) is not None:
                self._scheduler.remove_job(job_id)

    def start(self) -> None:
        self._scheduler.start()
        self._tick_thread = threading.Thread(target=self._tick, name="dvs-tick", daemon=True)
        self._tick_thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._stopped.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def busy(self) -> bool:
        """True while any profile's refresh runs."""
        return any(slot.refreshing for slot in list(self._slots.values()))

    def running(self, name: str) -> bool:
        """True while ``name``'s refresh runs."""
        slot = self._slots.get(name)
        return slot is not None and slot.refreshing

    def next_run(self, name: str) -> datetime | None:
        slot = self._slots.get(name)
        return slot.next_at if slot else None

    def next_fire(self, name: str) -> datetime | None:
        """When APScheduler will start ``name``'s refresh job (its wall-clock fire time, which
        :meth:`tick` re-places after a clock step); None when it has none."""
        job = self._scheduler.get_job(f"refresh:{name}")
        return None if job is None else job.next_run_time

    def poll_schedule(self, name: str) -> tuple[timedelta, datetime] | None:
        """``(interval, first fire)`` of ``name``'s version poll; None when it is not polled."""
        job = self._scheduler.get_job(f"poll:{name}")
        if job is None or not isinstance(job.trigger, IntervalTrigger):
            return None
        start: datetime = job.trigger.start_date
        return job.trigger.interval, start

    def set_next(self, name: str, when: datetime) -> None:
        """Move ``name``'s next scheduled refresh to ``when`` (the elapsed clock's time)."""
        slot = self._slots.get(name)
        if slot is not None:
            self._set_next(slot, when)

    def trigger(self, name: str, reason: Reason) -> None:
        """Re-auth ``name`` now (coalescing with a run in progress)."""
        slot = self._slots.get(name)
        if slot is None or self._stopping:
            return
        with slot.lock:
            _add_pending(slot, reason)
            if slot.running:
                return  # the thread working for this profile picks it up when it ends
            slot.running = slot.refreshing = True
            reason = _take_pending(slot) or reason
        self._spawn(slot, self._drive, reason)

    def _set_next(self, slot: _Slot, when: datetime) -> None:
        slot.next_at = when
        if self._stopping:
            return
        job = self._scheduler.get_job(f"refresh:{slot.profile.name}")
        if job is not None:
            job.modify(next_run_time=to_wall(self._clock, when))

    def _spawn(self, slot: _Slot, work: Callable[[_Slot, Reason], None], reason: Reason) -> None:
        """Run ``work`` on a worker of its own (an idle one, else a new thread)."""
        name = slot.profile.name
        try:
            self._workers.submit(work, slot, reason)
        except RuntimeError:  # no thread can be started now: try again at the next tick
            self._log.exception("cannot start a thread for %s", name)
            with slot.lock:
                slot.running = slot.refreshing = False
                _add_pending(slot, reason)

    def _run(self, name: str) -> None:
        """The refresh job (and the tick, for a refresh that is due): hands over at once."""
        slot = self._slots.get(name)
        if slot is None or self._stopping:
            return
        with slot.lock:
            if slot.running:
                if not slot.refreshing:  # a poll runs: its thread refreshes after it
                    _add_pending(slot, Reason.SCHEDULE)
                return  # a refresh runs: it sets the next time when it ends
            slot.running = slot.refreshing = True
            taken = _take_pending(slot)
        reason = taken or (Reason.SCHEDULE if slot.profile.token else Reason.START)
        self._spawn(slot, self._drive, reason)

    def _poll(self, name: str) -> None:
        """The poll job: the check runs on the profile's thread; on a change it refreshes."""
        slot = self._slots.get(name)
        if slot is None or self._stopping:
            return
        with slot.lock:
            if slot.running:
                return  # a refresh running re-reads the credentials anyway
            slot.running = True
        self._spawn(slot, self._poll_then_drive, Reason.ROTATION)

    def _poll_then_drive(self, slot: _Slot, reason: Reason) -> None:
        try:
            changed = slot.profile.poll()
        except Exception:  # a poll must never leave the slot marked running
            self._log.exception("poll failed", extra={"profile": slot.profile.name})
            changed = False
        with slot.lock:
            if changed:
                _add_pending(slot, Reason.ROTATION)
            taken = _take_pending(slot)
            if taken is None or self._stopping:
                slot.running = False
                return
            slot.refreshing = True
        self._drive(slot, taken)

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
                    slot.running = slot.refreshing = False
                    self._set_next(slot, outcome.next_at)
                    return
            reason = taken

    # ------------------------------------------------------------------------- the tick
    def _tick(self) -> None:
        """Every TICK seconds on the monotonic clock: due refreshes start, a wall-clock step
        re-places the jobs. Never lets an exception end the loop."""
        while not self._stopped.wait(self._tick_seconds):
            try:
                self.tick()
            except Exception:
                self._log.exception("schedule check failed")

    def tick(self) -> None:
        """One check (the tick thread's; also callable from tests)."""
        offset = wall_offset(self._clock)
        if abs(offset - self._offset) >= timedelta(seconds=1):
            self._log.warning(
                "the wall clock stepped by %+ds; refresh times follow real elapsed time and "
                "are kept",
                round((offset - self._offset).total_seconds()),
                extra={"event": "clock_step"},
            )
            self._offset = offset
            self._replace_jobs()
        now = self._clock()
        for name, slot in list(self._slots.items()):
            if not slot.running and slot.next_at <= now:
                self._run(name)
        if self._on_tick is not None:
            self._on_tick()

    def _replace_jobs(self) -> None:
        """After a wall-clock step: every job at its time on the agent's clock again."""
        for slot in list(self._slots.values()):
            with slot.lock:
                if not slot.running:
                    self._set_next(slot, slot.next_at)
            if slot.poll_every > timedelta(0):
                self._add_poll(slot)
        for job_id, when in list(self._once.items()):
            job = self._scheduler.get_job(job_id)
            if job is not None:
                job.modify(next_run_time=to_wall(self._clock, when))

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
