"""``Agent``: owns every profile built from the config (:mod:`agent.wiring`) and runs ``once``
or ``run``: the first tokens, the schedule, signals, the health adapter and reloads
(:mod:`agent.reload`); systemd hears of it through :mod:`agent.systemd`."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import msgspec

from agent.clock import Clock, ElapsedClock, to_wall, token_to_wall
from agent.config import Config, ProfileConfig, load_config
from agent.errors import (
    EX_OK,
    AgentError,
    ConfigError,
    SinkError,
    SourceEmpty,
    SourceUnavailable,
    most_severe,
)
from agent.logs import LogFlags, Redactor, set_format, set_level
from agent.manager import Outcome, Profile, Reason, State
from agent.models import Credentials, Token
from agent.oauth import TlsContexts
from agent.plugin import RotationListener
from agent.process import release_sighup
from agent.registry import Registry
from agent.reload import (
    Action,
    AddProfile,
    ChangeProfile,
    ChangeProxy,
    NeedsRestart,
    RemoveProfile,
    Retrigger,
    SetLogFormat,
    SetLogLevel,
    diff,
)
from agent.signals import SIGNALS, signals_to_main_thread
from agent.state import StateStore
from agent.systemd import Notifier, start_watchdog
from agent.wiring import build_profile, checked

if TYPE_CHECKING:
    from agent.health import HealthServer, ProfileStatus, RefreshAnswer
    from agent.metrics import Metrics
    from agent.proxy.service import ProxyService
    from agent.proxy.settings import ProxySpec
    from agent.schedule import RefreshScheduler

#: SIGTERM/SIGINT: stop within this long, whatever is in flight (files are replaced atomically)
STOP_DEADLINE_SECONDS = 4.0
#: `dvs-agent refresh`: at most one accepted request per profile in this many seconds
REFRESH_INTERVAL = 10.0
#: READY=1 and the schedule wait for first attempts at most request_timeout + this (DESIGN §7)
FIRST_ATTEMPT_GRACE_SECONDS = 5.0


class ListenError(SourceUnavailable):
    """The health listener cannot bind its address (exit 69, so systemd tries again)."""


@dataclass(frozen=True, slots=True)
class RunResult:
    code: int
    #: every worker finished before the deadline (else the caller should exit hard)
    clean: bool


class Agent:
    """One process, many profiles; profiles share nothing but the process."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        redactor: Redactor | None = None,
        logger: logging.Logger | None = None,
        metrics: Metrics | None = None,
        registry: Registry | None = None,
        log_flags: LogFlags | None = None,
    ) -> None:
        #: --log-level/--log-format: they win over the config's, also at every reload
        self._log_flags = log_flags if log_flags is not None else LogFlags()
        self.config = self._flagged(config)
        #: the kinds the config names (agent.registry); a reload finds them here too
        self._registry = registry if registry is not None else Registry()
        self.metrics = metrics
        self._config_path = config_path
        self._environ = os.environ if environ is None else environ
        #: the agent's time: real elapsed time, immune to wall-clock steps (agent.clock)
        self._clock: Clock = clock if clock is not None else ElapsedClock()
        self._redactor = redactor
        self._log = logger or logging.getLogger("agent")
        self._stopping = threading.Event()
        self.store = StateStore(Path(config.agent.state_dir), logger=self._log)
        self._tls = TlsContexts()
        self.profiles: dict[str, Profile] = {
            name: self._build(name, pc) for name, pc in config.profiles.items()
        }
        self._scheduler: RefreshScheduler | None = None
        self._first_done: set[str] = set()
        self._systemd = Notifier(self._environ)
        self._events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._listeners: list[RotationListener] = []
        self._health: HealthServer | None = None
        #: the local proxies (DESIGN §14); None while no profile has one
        self._proxy: ProxyService | None = None
        self._refresh_lock = threading.Lock()
        self._last_refresh_request: dict[str, float] = {}
        #: when each profile runs next after its first attempt (see _start_first_attempts)
        self._first_runs: dict[str, datetime] = {}
        self._first_threads: list[threading.Thread] = []
        #: guards the hand-over of first attempts still running when the scheduler starts
        self._first_lock = threading.Lock()
        self._handed_over: set[str] = set()
        self._expiry_lock = threading.Lock()

    # ------------------------------------------------------------------ building
    def _build(self, name: str, pc: ProfileConfig) -> Profile:
        return build_profile(
            name,
            pc,
            environ=self._environ,
            store=self.store,
            clock=self._clock,
            tls=self._tls,
            stopping=self._stopping,
            redactor=self._redactor,
            logger=self._log,
            metrics=self.metrics,
            registry=self._registry,
        )

    def prepare(self) -> None:
        """Fail at start, not at the first refresh: state_dir and every sink must be writable."""
        self.store.prepare()
        for profile in self.profiles.values():
            profile.check_sinks()

    def close(self) -> None:
        for profile in self.profiles.values():
            profile.close()

    def check_token(self, profile: Profile, credentials: Credentials) -> Token:
        """``check --connect``: one token request with ``credentials`` (a 401 is not retried
        with re-read ones), the token as the state file carries it (wall-clock times). The
        sinks are not written; :meth:`StateStore.save` records it for the first start."""
        return token_to_wall(self._clock, profile.client.fetch(credentials).token)

    # ---------------------------------------------------------------------- once
    def once(self, *, only: str | None = None, force: bool = False) -> int:
        """One token per profile into its sinks; the most severe exit code of all."""
        if only is not None and only not in self.profiles:
            raise ConfigError(
                f"--profile {only}: no such profile; the config has: {', '.join(self.profiles)}"
            )
        self.store.prepare()
        codes = []
        for name, profile in self.profiles.items():
            if only is not None and name != only:
                continue
            codes.append(self._once(profile, force=force))
        for profile in self.profiles.values():
            profile.settle()  # on_change hooks finish (each bounded by its timeout)
        return most_severe(codes)

    def _once(self, profile: Profile, *, force: bool) -> int:
        try:
            profile.check_sinks()
        except AgentError as exc:
            self._log.error("%s", exc, extra={"profile": profile.name})
            return exc.exit_code
        reason = Reason.FORCE if force else Reason.START
        outcome = self._restore_or_refresh(profile, reason, exit_after=True)
        if outcome.ok:
            return EX_OK
        return outcome.error.exit_code if outcome.error else 1

    def _restore_or_refresh(
        self, profile: Profile, reason: Reason | None, *, exit_after: bool = False
    ) -> Outcome:
        """How a profile gets its first token, for ``once``, at start and at a reload: the
        recorded token while it is valid for the current credentials (DESIGN §6), else a
        refresh for ``reason`` now (``FORCE`` skips the recorded token; None: no refresh here,
        the caller schedules one). ``next_at``: when the profile runs next.

        ``exit_after`` (``once``): a recorded token serves only while it is not yet due, and
        credentials that cannot be read end the attempt with their error; else that error is
        logged and the refresh reads them again."""
        if reason is not Reason.FORCE:
            try:
                if profile.restore() and (not exit_after or profile.due() > self._clock()):
                    return profile.standing()  # not ok while a sink lacks it
            except AgentError as exc:
                held = profile.token is not None
                if exit_after:
                    if (
                        isinstance(exc, SourceUnavailable)
                        and held
                        and profile.due() > self._clock()
                    ):
                        return profile.standing()  # the recorded token is kept (warned)
                    self._log.error("%s", exc, extra={"profile": profile.name})
                    return Outcome(ok=False, next_at=self._clock(), error=exc)
                self._log.error("%s", exc, extra={"profile": profile.name, "event": "source_error"})
                if held and reason is Reason.START:
                    reason = Reason.SCHEDULE  # the recorded token is held (degraded)
        if reason is None:
            return Outcome(ok=profile.token is not None, next_at=self._clock())
        return profile.refresh(reason, final=exit_after)

    # ----------------------------------------------------------------------- run
    def run(self) -> RunResult:
        """The daemon: first tokens, then the schedule; serve signals until SIGTERM/SIGINT."""
        # handlers first: a SIGTERM during start-up is a clean stop, not a kill
        previous = self._install_signals()
        reload_pending = False
        try:
            self._begin()
            # READY=1 when every first attempt ended, or at this deadline anyway: one hanging
            # tenant must not hold the unit, nor the others' schedule (DESIGN §7, §10)
            ready_by = time.monotonic() + self._first_attempt_grace()
            while True:
                try:
                    event = self._events.get(timeout=self._wait(ready_by))
                except queue.Empty:
                    event = "deadline"
                if event == "stop":
                    break
                if event in ("deadline", "started") and self._scheduler is None:
                    # every first attempt ended, a profile's next run is due, or the deadline
                    self._start_scheduler()
                    if reload_pending:
                        reload_pending = False
                        self.reload()
                if event == "deadline":
                    if time.monotonic() >= ready_by and not self._systemd.ready:
                        self._first_done.update(self.profiles)
                        self._check_ready()
                elif event == "reload" and self._scheduler is None:
                    reload_pending = True  # after the first attempts
                elif event == "reload":
                    self._drain("reload")  # a burst of SIGHUPs is one reload
                    self.reload()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self._shutdown()

    def _drain(self, kind: str) -> None:
        """Take further queued ``kind`` events (a "stop" among them is kept for the loop)."""
        keep = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event != kind:
                keep.append(event)
        for event in keep:
            self._events.put(event)

    def _wait(self, ready_by: float) -> float | None:
        """How long the main loop may wait for an event while starting (None: no limit).

        Until the schedule runs: until the earliest next run of a profile whose first attempt
        ended (a short token must not wait for a tenant that hangs), at most until
        ``ready_by``; then until ``ready_by`` for READY=1."""
        if self._systemd.ready:
            return None
        now = time.monotonic()
        until = ready_by
        if self._scheduler is None:
            with self._first_lock:
                runs = list(self._first_runs.values())
            if runs:
                due = (min(runs) - self._clock()).total_seconds()
                until = min(until, now + max(0.0, due))
        return max(0.0, until - now)

    def _first_attempt_grace(self) -> float:
        timeouts = [pc.request_timeout.total_seconds() for pc in self.config.profiles.values()]
        return max(timeouts, default=0.0) + FIRST_ATTEMPT_GRACE_SECONDS

    def _begin(self) -> None:
        """Check the sinks, open the health listener, start each profile's first attempt."""
        self._check_fixed_credentials()
        self.prepare()
        with signals_to_main_thread():
            self._start_health()
            self._start_proxies()
            self._start_first_attempts()

    def _check_fixed_credentials(self) -> None:
        """Exit 78 at start for a profile whose credentials can never be read: every source
        of its chain says they cannot change while the process lives (plain environment
        values) and they are missing now. Retrying for ever would hide a broken unit; 78
        lets systemd's RestartPreventExitStatus=78 apply (DESIGN §7). A profile with a
        source that can change (a ``_FILE``, Vault, AWS) keeps retrying as before."""
        problems = []
        for name, profile in self.profiles.items():
            if profile.chain.can_change():
                continue  # what is missing may appear later: a file, a store
            try:
                profile.chain.read()  # cannot change: what it says now, it says for ever
            except (SourceEmpty, ConfigError) as exc:
                problems.append(f"profile {name}: {exc}")
            except AgentError:
                continue  # unavailable now (not missing): retried as before
        if problems:
            raise ConfigError(
                "; ".join(problems) + "; exiting (78) instead of retrying for ever, as the "
                "agent's own environment cannot change while it runs: fix the environment it "
                "starts with (systemd: systemctl edit dvs-agent), then start it again"
            )

    def _start_first_attempts(self) -> None:
        """Each profile's recorded or first token, each on a short-lived thread of its own (no
        shared workers that a hanging profile could hold).

        The last one to finish posts "started"; APScheduler is imported only then (or at the
        start deadline), so that exec -> first token file does not wait for it
        (bench/compare.py measures that path)."""
        todo = list(self.profiles.values())
        if not todo:
            self._events.put("started")
            return
        left = len(todo)

        def work(profile: Profile) -> None:
            nonlocal left
            if self._stopping.is_set():
                return
            try:
                when = self._restore_or_refresh(profile, Reason.START).next_at
            except Exception:  # a bug must not keep the scheduler from starting
                self._log.exception("first attempt failed", extra={"profile": profile.name})
                when = self._clock()
            with self._first_lock:
                self._first_runs[profile.name] = when
                left -= 1
                self._events.put("started" if left == 0 else "first")
                handed_over = profile.name in self._handed_over
            if handed_over and self._scheduler is not None:
                # the schedule started while this attempt still ran: it takes over now
                self._first_done.add(profile.name)
                self._scheduler.release(profile.name, when)
                self._check_ready()
                self._arm_expiry()

        for profile in todo:
            thread = threading.Thread(
                target=work, args=(profile,), name=f"dvs-first-{profile.name}"[:15], daemon=True
            )
            thread.start()
            self._first_threads.append(thread)

    def _start_scheduler(self) -> None:
        from agent.schedule import RefreshScheduler  # APScheduler: only the daemon needs it

        scheduler = RefreshScheduler(
            clock=self._clock, on_outcome=self._on_outcome, on_tick=self._check_expiry
        )
        self._scheduler = scheduler
        start_watchdog(scheduler, self._environ)
        with self._first_lock:
            for profile in self.profiles.values():
                first_run = self._first_runs.get(profile.name)
                if first_run is None:
                    self._handed_over.add(profile.name)
                    self._log.warning(
                        "the first attempt is still running; starting the schedule for the "
                        "other profiles (it joins when its attempt ends)",
                        extra={"profile": profile.name, "event": "first_attempt_slow"},
                    )
                    pc = self.config.profiles[profile.name]
                    self._schedule(profile, pc, first_run=self._clock(), running=True)
                else:
                    self._schedule(profile, self.config.profiles[profile.name], first_run=first_run)
            self._first_done.update(self._first_runs)
        with signals_to_main_thread():
            scheduler.start()
            self._start_listeners()
        self._arm_expiry()
        self._log.info(
            "dvs-agent running with %d profile(s): %s",
            len(self.profiles),
            ", ".join(self.profiles),
            extra={"event": "started"},
        )
        self._check_ready()

    def stop(self) -> None:
        """Ask :meth:`run` to return (thread-safe and signal-safe)."""
        self._events.put("stop")

    def _install_signals(self) -> dict[int, signal._HANDLER]:
        previous: dict[int, signal._HANDLER] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._events.put("reload" if signum == signal.SIGHUP else "stop")

        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
        release_sighup()  # one that arrived while starting is delivered to the handler now
        return previous

    def _schedule(
        self,
        profile: Profile,
        pc: ProfileConfig,
        *,
        first_run: datetime,
        reason: Reason | None = None,
        running: bool = False,
    ) -> None:
        assert self._scheduler is not None
        poll: timedelta = pc.rotation.poll_interval  # the settings it was built with
        if poll > timedelta(0) and not profile.chain.can_change():
            self._log.info(
                "not polling: the credentials come from environment variables, which do not "
                "change while the agent runs; to rotate without a restart, give the values in "
                "files (DVS_CLIENT_SECRET_FILE, ..._FILE), which are polled",
                extra={"profile": profile.name, "event": "polling_off"},
            )
            poll = timedelta(0)
        self._scheduler.add(profile, first_run=first_run, poll_interval=poll, running=running)
        if reason is not None:
            self._scheduler.trigger(profile.name, reason)

    def _start_listeners(self) -> None:
        """The rotation triggers' listeners (AWS rotation events over SQS, DESIGN §5)."""
        built = {name: pc for name, pc in self.config.profiles.items() if name in self.profiles}
        for trigger in self._registry.triggers():
            for listener in trigger.listeners(
                built, self._on_rotation_event, logging.getLogger("agent.events")
            ):
                listener.start()
                self._listeners.append(listener)

    def _stop_listeners(self) -> None:
        for listener in self._listeners:
            listener.stop(timeout=2.0)
        self._listeners.clear()

    def _on_rotation_event(self, profile: str, detail: str) -> None:
        self._log.info(
            "rotation event: %s", detail, extra={"profile": profile, "event": "rotation_event"}
        )
        if self._scheduler is not None:
            self._scheduler.trigger(profile, Reason.EVENT)

    def _on_outcome(self, profile: Profile, reason: Reason, outcome: Outcome) -> None:
        if self._proxy is not None:
            self._proxy.refreshed(profile.name)  # a 401 replay may wait for it
        self._first_done.add(profile.name)
        self._check_ready()
        self._arm_expiry()

    def _status(self) -> str:
        bad = [f"{p.name}: {p.state.value}" for p in self.profiles.values() if p.state != State.OK]
        return "all profiles ok" if not bad else "not ok: " + "; ".join(bad)

    def _check_ready(self) -> None:
        """READY=1 once every profile finished its first attempt; then STATUS= on changes."""
        if not self._first_done.issuperset(self.profiles):
            return
        self._systemd.status(self._status())

    def _check_expiry(self) -> None:
        if any([profile.check_expiry() for profile in list(self.profiles.values())]):
            self._check_ready()

    def _arm_expiry(self) -> None:
        """One check when the first token held runs out, so that the state, its metric and
        STATUS= say "expired" from that moment (readyz and status also check when asked).
        A timer, not a periodic job: nothing wakes up for it while the tokens are valid."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        with self._expiry_lock:  # outcomes arrive from several threads: the last one is current
            held = [
                p.token.expires_at
                for p in list(self.profiles.values())
                if p.token is not None and p.state in (State.OK, State.DEGRADED)
            ]
            if held:
                scheduler.add_once("expiry", self._expiry_due, min(held))

    def _expiry_due(self) -> None:
        self._check_expiry()
        self._arm_expiry()

    # -------------------------------------------------------------------- health
    def _start_health(self) -> None:
        address = self.config.health.address
        if address is None:
            return
        from agent.health import HealthServer

        if self.metrics is None:
            raise RuntimeError("serving [health] needs an Agent built with metrics=Metrics()")
        host, port = address
        try:
            self._health = HealthServer(
                host,
                port,
                snapshot=self.snapshot,
                metrics=self.metrics,
                refresh=self.refresh_request,
                clock=self._wall_now,
                logger=logging.getLogger("agent.health"),
            )
        except OSError as exc:
            raise ListenError(
                f"health.listen {self.config.health.listen}: {exc.strerror or exc}; is another "
                'dvs-agent running? choose another port or set listen = "" to disable'
            ) from None
        self._health.start()

    # --------------------------------------------------------------------- proxy
    def _start_proxies(self, specs: list[ProxySpec] | None = None) -> None:
        """Each profile's local proxy (DESIGN §14); httptools is imported only when one is set."""
        from agent.proxy.settings import specs_of

        specs = specs_of(self.config.profiles) if specs is None else specs
        if not specs:
            return
        from agent.proxy.service import ProxyListenError, ProxyService
        from agent.proxy.tokens import ProfileTokens

        service = ProxyService(
            ProfileTokens(lambda: self.profiles, clock=self._clock, renew=self._proxy_renew),
            tls=self._tls,
            metrics=self.metrics,
            logger=logging.getLogger("agent.proxy"),
        )
        try:
            service.start(specs)
        except ProxyListenError as exc:
            raise ListenError(str(exc)) from None
        self._proxy = service

    def _apply_proxies(self) -> None:
        """A reload: the proxies of the config now running (started, restarted, stopped)."""
        from agent.proxy.settings import specs_of

        specs = specs_of(self.config.profiles)
        if self._proxy is not None:
            self._proxy.apply(specs)
            return
        if specs:
            try:
                with signals_to_main_thread():
                    self._start_proxies(specs)
            except ListenError as exc:
                self._log.error("%s", exc, extra={"event": "reload_failed"})

    def _proxy_renew(self, name: str) -> bool:
        """A proxy got 401 from its upstream: refresh now, within refresh's rate limit."""
        if self._scheduler is None or self._stopping.is_set():
            return False
        try:
            return self.refresh_request(name).accepted
        except KeyError:
            return False

    def _wall_now(self) -> datetime:
        """Now as the wall clock shows it (what /readyz compares the shown times with)."""
        return to_wall(self._clock, self._clock())

    def _shown(self, moment: datetime | None) -> datetime | None:
        return None if moment is None else to_wall(self._clock, moment)

    def snapshot(self) -> list[ProfileStatus]:
        """Each profile's state for /readyz (never a secret), times on the wall clock.

        ``expires_at`` is what consumers find: the held token's expiry, or an older one that a
        file sink could not replace (None while a file sink was never written)."""
        from agent.health import ProfileStatus

        self._check_expiry()  # the state says "expired" from the moment the token has
        return [
            ProfileStatus(
                name=p.name,
                state=p.state.value,
                expires_at=self._shown(p.seen_until()),
                provider_slug=p.token.provider_slug if p.token else None,
                last_refresh=self._shown(p.last_refresh),
                last_error=p.last_error,
                source=p.chain.current,
                fleet=None if p.fleet is None else p.fleet.status().document(),
            )
            for p in list(self.profiles.values())
        ]

    def refresh_request(self, name: str | None) -> RefreshAnswer:
        """``dvs-agent refresh``: re-auth now, at most once per REFRESH_INTERVAL per profile."""
        names = list(self.profiles) if name is None else [name]
        for each in names:
            if each not in self.profiles:
                raise KeyError(each)
        with self._refresh_lock:  # the health server's threads and the proxy's loop ask
            return self._refresh_now(names)

    def _refresh_now(self, names: list[str]) -> RefreshAnswer:
        from agent.health import RefreshAnswer

        now = time.monotonic()
        waits = [
            self._last_refresh_request.get(each, -REFRESH_INTERVAL) + REFRESH_INTERVAL - now
            for each in names
        ]
        if max(waits) > 0:
            return RefreshAnswer(
                accepted=False,
                retry_after=max(waits),
                message=f"refreshed less than {REFRESH_INTERVAL:g}s ago; try again later",
            )
        for each in names:
            self._last_refresh_request[each] = now
            if self._scheduler is not None:
                self._scheduler.trigger(each, Reason.REFRESH)
        return RefreshAnswer(accepted=True, message="re-authenticating " + ", ".join(names))

    def _shutdown(self) -> RunResult:
        self._log.info("stopping; token files are left in place", extra={"event": "stopping"})
        self._systemd.stopping()
        self._stopping.set()
        deadline = time.monotonic() + STOP_DEADLINE_SECONDS
        drain = self._drain_proxies(STOP_DEADLINE_SECONDS)
        self._stop_listeners()
        if self._health is not None:
            self._health.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown()
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if drain is not None:
            drain.join(max(0.0, deadline - time.monotonic()) + 2.0)
        clean = not self._busy()
        if clean:  # closing a client that a stuck thread still uses could block
            self.close()
        else:  # but running hooks are killed in any case (DESIGN §10)
            for profile in self.profiles.values():
                profile.stop_local()
        return RunResult(EX_OK, clean)

    def _drain_proxies(self, timeout: float) -> threading.Thread | None:
        """The proxies stop listening and drain their requests within ``timeout``, beside the
        rest of the stop (one deadline for both)."""
        proxy = self._proxy
        if proxy is None:
            return None
        with signals_to_main_thread():
            thread = threading.Thread(
                target=proxy.stop, args=(timeout,), name="dvs-proxy-stop", daemon=True
            )
            thread.start()
        return thread

    def _busy(self) -> bool:
        """A refresh (or a first attempt) is still running."""
        if any(thread.is_alive() for thread in self._first_threads):
            return True
        return self._scheduler is not None and self._scheduler.busy()

    # -------------------------------------------------------------------- reload
    def reload(self) -> None:
        """SIGHUP: re-read the config and the credentials of every profile now."""
        self._log.info(
            "SIGHUP: re-reading the config and every profile's credentials",
            extra={"event": "reload"},
        )
        new = self.config
        if self._config_path is not None:
            try:
                new = self._flagged(load_config(self._config_path, registry=self._registry))
            except ConfigError as exc:
                self._log.error(
                    "the new config is invalid, keeping the running one: %s",
                    exc,
                    extra={"event": "reload_failed"},
                )
        self._apply(new, diff(self.config, new))

    def _flagged(self, config: Config) -> Config:
        """``config`` with the command line's log level and format in place of its own."""
        flags = self._log_flags
        if flags.level is None and flags.format is None:
            return config
        section = msgspec.structs.replace(
            config.agent,
            log_level=flags.level or config.agent.log_level,
            log_format=flags.format or config.agent.log_format,
        )
        return msgspec.structs.replace(config, agent=section)

    def _apply(self, new: Config, actions: list[Action]) -> None:
        """Apply what :func:`agent.reload.diff` found; a profile whose new settings cannot be
        built keeps running with its old ones."""
        assert self._scheduler is not None
        old = self.config
        applied: dict[str, ProfileConfig] = {}  # what runs now, by profile
        for action in actions:
            match action:
                case NeedsRestart(key):
                    self._log.warning(
                        "%s changes take effect at the next restart", key, extra={"event": "reload"}
                    )
                case SetLogLevel(level):
                    set_level(level)
                    self._log.info("log level now %s", level, extra={"event": "reload"})
                case SetLogFormat(fmt):
                    set_format(fmt)  # in place: this very line is in the new format
                    self._log.info("log format now %s", fmt, extra={"event": "reload"})
                case RemoveProfile(name):
                    self._scheduler.remove(name)
                    self.profiles.pop(name).close()
                    if self.metrics is not None:
                        self.metrics.forget(name)
                    self._log.info("profile removed", extra={"profile": name, "event": "reload"})
                case Retrigger(name):
                    self._scheduler.trigger(name, Reason.SIGHUP)
                    applied[name] = old.profiles[name]
                case ChangeProxy(name, pc):
                    self._scheduler.trigger(name, Reason.SIGHUP)
                    applied[name] = pc
                case AddProfile(name, pc) | ChangeProfile(name, pc):
                    if self._rebuild(name, pc):
                        applied[name] = pc
                    elif name in old.profiles:
                        applied[name] = old.profiles[name]
        if new == old:
            return
        self.config = msgspec.structs.replace(new, profiles=applied)
        self._apply_proxies()
        self._stop_listeners()
        with signals_to_main_thread():
            self._start_listeners()

    def _rebuild(self, name: str, pc: ProfileConfig) -> bool:
        """Run profile ``name`` with the settings ``pc`` from now on, with a new token (False:
        they cannot be built, and what ran before runs on)."""
        assert self._scheduler is not None
        try:
            profile = checked(self._build(name, pc))  # closed when its sinks cannot write
        except (SinkError, ConfigError) as exc:
            self._log.error(
                "cannot apply the new settings, keeping the running ones: %s",
                exc,
                extra={"profile": name, "event": "reload_failed"},
            )
            return False
        if name in self.profiles:
            self._scheduler.remove(name)
            self.profiles.pop(name).close()
        self.profiles[name] = profile
        first_run = self._restore_or_refresh(profile, None).next_at
        self._schedule(profile, pc, first_run=first_run, reason=Reason.RELOAD)
        self._log.info("profile (re)configured", extra={"profile": name, "event": "reload"})
        return True
