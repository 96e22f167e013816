"""Hostile input: what a hostile token server or health client costs a real dvs-agent (DESIGN §10).

Three measurements, each against real agent processes (``python -m agent run -c CONFIG`` from a
fresh runtime-only venv, or the dev venv with ``--dev-venv``; a clean environment, env
credentials, one raw file sink per profile, no recorded state) and the project's token server
(:class:`agent.devserver.TokenServer`, run in this process on loopback):

1. **Peak RSS per hostile body.** One agent per fault, each with ONE profile
   (``DVS_CLIENT_ID``/``DVS_CLIENT_SECRET``, ``request_timeout = "5s"``, its own client id), all
   started together. After its first (healthy) token and a settle, its idle ``VmRSS`` is read
   and its ``VmHWM`` reset to it (``/proc/PID/clear_refs`` ``5``); then the fault is queued
   ``--faults-per-agent`` (4) times for its client only and one refresh is asked for
   (``POST /refresh`` on its health listener): the refresh's request and its 3 fast retries
   all get the fault, so the refresh fails, and the scheduled retry (about 2 s later) is
   answered normally. ``VmRSS`` is sampled every 10 ms until that retry's token is in the file.
   Peak = max(``VmHWM``, sampled ``VmRSS``); reported as peak - idle, beside an agent whose
   refresh is answered normally (the baseline).
2. **A healthy profile beside stuck ones.** One agent with one healthy profile (4 s tokens:
   it refreshes about every 2 s) and N stuck profiles (N = 0, 1, 4, 16; each its own client
   id with ``Fault.hang()`` queued for every attempt, so each attempt hangs until
   ``request_timeout`` and retries on backoff). Over a window (25 s) after the healthy
   profile's first token, the server's records give the healthy profile's gaps between token
   requests, and its token file is read every 50 ms to find how long it held an expired token.
   Reported against N = 0.
3. **Threads under slowloris.** One agent with ``[health] listen``; its idle thread count
   (``/proc/PID/task``), then 500 connections that each send a partial request line one byte
   per second (one that the agent closes is opened again at the next second, as an attacker
   would), with a normal ``GET /healthz`` probe once a second beside them; threads sampled
   every 100 ms.

    .venv/bin/python bench/hostile.py            # about 3 minutes, the venv's install included
    .venv/bin/python bench/hostile.py --quick    # a smoke run (about 1 minute)
    .venv/bin/python bench/hostile.py --only stuck --stuck 0,16 --window 60

Numbers depend on the machine: targets are reported (PASS/MISS), never asserted; a MISS does not
fail the run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import itertools
import json
import os
import platform
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.devserver import Fault, RecordedRequest, TokenServer  # noqa: E402
from bench.measure import proc_status, stop_process  # noqa: E402
from bench.runtime_venv import DEV_AGENT, install_agent  # noqa: E402

MIB = 1024.0
LONG_TOKEN = 86399
REQUEST_TIMEOUT = 5.0
#: 1: a hostile body may add at most this much to the idle RSS
RSS_TARGET_MIB = 5.0
#: 2: "unchanged against N = 0": the max gap within this much of N = 0's, no longer expired
GAP_TOLERANCE_S = 0.5
EXPIRED_TOLERANCE_S = 0.1
SHORT_TOKEN = 4
#: 3: the health listener's cap (DESIGN §10): threads ≤ idle + this
HEALTH_CAP = 64
SLOWLORIS_LINE = b"GET /healthz?" + b"a" * 4096  # never ends: no CRLF within the run
#: how long one agent may take to write its first token file
START_TIMEOUT = 60.0

#: 1: the hostile bodies, by name (the server's faults; each queued for one client only)
FAULTS: list[tuple[str, Callable[[], Fault]]] = [
    ("endless chunked body", Fault.endless),
    ("gzip bomb (1 GiB decoded)", lambda: Fault.compression_bomb(1 << 30, "gzip")),
    ("deflate bomb (1 GiB decoded)", lambda: Fault.compression_bomb(1 << 30, "deflate")),
    ("oversized body (100 MiB)", lambda: Fault.oversized(100 * 1024 * 1024)),
    ("trickled body (1 B/s)", lambda: Fault.trickle(1.0)),
    ("trickled headers (1 B/s)", lambda: Fault.trickle(1.0, headers=True)),
]
BASELINE = "none: a normal answer (baseline)"


class BenchError(RuntimeError):
    pass


# -- agents ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileSpec:
    name: str
    client_id: str
    secret: str
    #: the profile's credential variables (DVS_CLIENT_ID / DVS_CLIENT_SECRET by default)
    id_var: str = "DVS_CLIENT_ID"
    secret_var: str = "DVS_CLIENT_SECRET"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write_config(
    work: Path, token_url: str, profiles: Sequence[ProfileSpec], health_port: int | None
) -> Path:
    listen = f"127.0.0.1:{health_port}" if health_port is not None else ""
    parts = [
        f"""[agent]
log_level = "warning"
log_format = "json"
state_dir = "{work}/state"

[health]
listen = "{listen}"
"""
    ]
    for p in profiles:
        parts.append(
            f"""
[profiles.{p.name}]
token_url = "{token_url}"
request_timeout = "{REQUEST_TIMEOUT:g}s"
sources = ["env"]

[profiles.{p.name}.env]
client_id_var = "{p.id_var}"
client_secret_var = "{p.secret_var}"

[profiles.{p.name}.rotation]
poll_interval = "0"

[[profiles.{p.name}.sinks]]
type = "file"
path = "{work}/tokens/{p.name}"
format = "raw"
"""
        )
    path = work / "agent.toml"
    path.write_text("".join(parts))
    return path


def _env(work: Path, profiles: Sequence[ProfileSpec]) -> dict[str, str]:
    """A clean environment: nothing inherited but what each profile reads."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8"}
    for p in profiles:
        env[p.id_var] = p.client_id
        env[p.secret_var] = p.secret
    return env


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    work: Path
    health_port: int | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def token_file(self, profile: str) -> Path:
        return self.work / "tokens" / profile

    def read_token(self, profile: str) -> str | None:
        try:
            return self.token_file(profile).read_text()
        except OSError:
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.work / "agent.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def check_alive(self, when: str) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"the agent exited with {code} {when}; its log:\n{self.log_tail()}")

    def wait_for_file(self, profile: str, timeout: float = START_TIMEOUT) -> float:
        """Seconds until the profile's token file exists (from now)."""
        started = time.monotonic()
        while not self.token_file(profile).exists():
            self.check_alive(f"before writing {profile}'s token file")
            if time.monotonic() - started > timeout:
                raise BenchError(
                    f"no token file for {profile} after {timeout:g} s; the agent's log:\n"
                    + self.log_tail()
                )
            time.sleep(0.005)
        return time.monotonic() - started

    def errors(self) -> list[str]:
        """Why the agent's token requests failed, as it logged them (JSON log lines)."""
        try:
            text = (self.work / "agent.log").read_text(errors="replace")
        except OSError:
            return []
        found = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                doc = json.loads(line)
                msg = str(doc.get("msg", ""))
                if doc.get("event") == "token_retry":
                    found.append(re.sub(r"; retry \d+ of \d+ in [\d.]+s$", "", msg))
                elif msg.startswith("refresh failed: "):
                    found.append(re.sub(r"; (keeping|no valid).*$", "", msg[16:]))
        return found


@contextmanager
def _agent(
    python: Path,
    work: Path,
    token_url: str,
    profiles: Sequence[ProfileSpec],
    health_port: int | None = None,
) -> Iterator[Agent]:
    work.mkdir(parents=True)
    config = _write_config(work, token_url, profiles, health_port)
    log = open(work / "agent.log", "wb")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [str(python), "-m", "agent", "run", "-c", str(config)],
            env=_env(work, profiles),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,  # not the checkout: -m agent imports the installed package
            start_new_session=True,  # our Ctrl-C is not theirs: we stop it ourselves, below
        )
    except BaseException:
        log.close()
        raise
    try:
        yield Agent(proc, work, health_port)
    finally:
        stop_process(proc)
        log.close()


def _kib(status: dict[str, str], name: str) -> int:
    return int(status[name].split()[0])


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current VmRSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _post_refresh(port: int, profile: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", f"/refresh?profile={profile}")
        status = conn.getresponse().status
    finally:
        conn.close()
    return status


# -- 1: peak RSS per hostile body -----------------------------------------------------------------


@dataclass
class RssRun:
    fault: str
    agent: Agent
    client_id: str
    queued: int
    idle_kib: int = 0
    hwm_reset: bool = False
    trigger_at: float = 0.0
    before: int = 0
    peak_sampled_kib: int = 0
    peak_kib: int = 0
    after_kib: int = 0
    recovered_s: float | None = None
    attempts: int = 0
    hostile_token_written: bool = False
    error: str = ""


def measure_rss(
    python: Path, base: Path, per_agent: int, settle: float, limit: float
) -> list[RssRun]:
    """Part 1: one agent per fault (and one baseline), all at once; see the module doc."""
    kinds: list[tuple[str, Callable[[], Fault] | None]] = [(BASELINE, None), *FAULTS]
    clients = {f"hostile-{i}": f"hostile-secret-{i}" for i in range(len(kinds))}
    runs: list[RssRun] = []
    with TokenServer(clients=clients, expires_in=LONG_TOKEN) as server, ExitStack() as stack:
        for i, (name, _) in enumerate(kinds):
            spec = ProfileSpec("p", f"hostile-{i}", f"hostile-secret-{i}")
            agent = stack.enter_context(
                _agent(python, base / f"rss{i}", server.url, [spec], _free_port())
            )
            runs.append(RssRun(name, agent, spec.client_id, 0 if i == 0 else per_agent))
        # compress the bombs now (about 2 s per GiB each), while the agents start
        for _, build in FAULTS:
            fault = build()
            if fault.bomb_bytes:
                server.enqueue(fault, client_id="warm-up")
        for run in runs:
            run.agent.wait_for_file("p")
        time.sleep(settle)
        for run, (_, make) in zip(runs, kinds, strict=True):
            run.agent.check_alive("after its first token")
            run.idle_kib = _kib(proc_status(run.agent.pid), "VmRSS")
            run.hwm_reset = _reset_hwm(run.agent.pid)
            run.peak_sampled_kib = run.idle_kib
            if make is not None:
                server.enqueue(*(make() for _ in range(run.queued)), client_id=run.client_id)
            run.before = len(server.token_requests(client_id=run.client_id))
        for run in runs:
            assert run.agent.health_port is not None
            answered = _post_refresh(run.agent.health_port, "p")
            if answered != 202:
                raise BenchError(f"POST /refresh answered {answered}; log:\n{run.agent.log_tail()}")
            run.trigger_at = time.monotonic()
        pending = list(runs)
        deadline = time.monotonic() + limit
        while pending and time.monotonic() < deadline:
            for run in list(pending):
                try:
                    status = proc_status(run.agent.pid)
                except OSError:
                    run.agent.check_alive("while fed a hostile body")
                    raise
                run.peak_sampled_kib = max(run.peak_sampled_kib, _kib(status, "VmRSS"))
                requests = server.token_requests(client_id=run.client_id)[run.before :]
                held = run.agent.read_token("p")
                hostile = {r.access_token for r in requests[: run.queued] if r.access_token}
                if held is not None and held in hostile:
                    run.hostile_token_written = True
                if len(requests) > run.queued:
                    healthy = requests[run.queued]
                    if healthy.access_token is not None and held == healthy.access_token:
                        run.recovered_s = time.monotonic() - run.trigger_at
                        pending.remove(run)
            time.sleep(0.01)
        for run in runs:
            run.agent.check_alive("after the hostile bodies")
            status = proc_status(run.agent.pid)
            run.after_kib = _kib(status, "VmRSS")
            hwm = _kib(status, "VmHWM") if run.hwm_reset else 0
            run.peak_kib = max(hwm, run.peak_sampled_kib)
            requests = server.token_requests(client_id=run.client_id)[run.before :]
            run.attempts = len(requests)
            errors = run.agent.errors()
            run.error = errors[0].replace(server.url, "the server") if errors else ""
        server.stop()  # ends answers still being sent before the agents are stopped
    return runs


# -- 2: a healthy profile beside stuck ones -------------------------------------------------------


@dataclass
class StuckRun:
    stuck: int
    start_s: float
    window_s: float
    refreshes: int
    statuses: list[int]
    max_gap_s: float
    median_gap_s: float
    longest_expired_s: float
    expired_reads: int
    reads: int
    max_threads: int
    first_threads: int
    stuck_attempts: int


HEALTHY = "healthy-client"


def _healthy_gaps(requests: list[RecordedRequest], start: float, end: float) -> list[float]:
    """Gaps between the healthy profile's token requests in [start, end], and the tail."""
    times = [r.received_at for r in requests if start - 1.0 <= r.received_at <= end]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    if times:
        gaps.append(end - times[-1])  # a refresh that never came shows as a long tail
    return gaps


def measure_stuck(python: Path, base: Path, stuck: int, window: float) -> StuckRun:
    """Part 2 for one N: one agent, 1 healthy + N stuck profiles; see the module doc."""
    healthy = ProfileSpec("healthy", HEALTHY, "healthy-secret", "DVS_ID_H", "DVS_SECRET_H")
    stuck_specs = [
        ProfileSpec(
            f"stuck{i}", f"stuck-client-{i}", f"stuck-secret-{i}", f"DVS_ID_{i}", f"DVS_SECRET_{i}"
        )
        for i in range(stuck)
    ]
    clients = {p.client_id: p.secret for p in [healthy, *stuck_specs]}
    # every attempt of a stuck profile hangs: far more than its backoff allows in the window
    hangs = int(window / 2) + 20
    with TokenServer(clients=clients, expires_in=SHORT_TOKEN) as server:
        for p in stuck_specs:
            server.enqueue(*(Fault.hang() for _ in range(hangs)), client_id=p.client_id)
        with _agent(python, base / f"stuck{stuck}", server.url, [healthy, *stuck_specs]) as agent:
            start_s = agent.wait_for_file("healthy")
            first_threads = _threads(agent.pid)
            begin = time.time()
            end_at = time.monotonic() + window
            longest = current = 0.0
            expired_reads = reads = 0
            max_threads = first_threads
            last = time.monotonic()
            while (now := time.monotonic()) < end_at:
                agent.check_alive("with stuck profiles")
                token = agent.read_token("healthy")
                minted = server.issued().get(token or "")
                reads += 1
                if minted is None or time.time() >= minted.expires_at:
                    expired_reads += 1
                    current += now - last
                    longest = max(longest, current)
                else:
                    current = 0.0
                last = now
                with contextlib.suppress(OSError):
                    max_threads = max(max_threads, _threads(agent.pid))
                time.sleep(0.05)
            finish = time.time()
            server.stop()  # ends the hanging answers, so the agent stops at once
        requests = server.token_requests(client_id=HEALTHY)
        in_window = [r for r in requests if begin - 1.0 <= r.received_at <= finish]
        gaps = _healthy_gaps(requests, begin, finish)
        stuck_attempts = sum(len(server.token_requests(client_id=p.client_id)) for p in stuck_specs)
    return StuckRun(
        stuck=stuck,
        start_s=start_s,
        window_s=finish - begin,
        refreshes=len(in_window),
        statuses=[r.status for r in in_window],
        max_gap_s=max(gaps) if gaps else window,
        median_gap_s=statistics.median(gaps[:-1]) if len(gaps) > 1 else 0.0,
        longest_expired_s=longest,
        expired_reads=expired_reads,
        reads=reads,
        max_threads=max_threads,
        first_threads=first_threads,
        stuck_attempts=stuck_attempts,
    )


# -- 3: slowloris on the health listener ----------------------------------------------------------


@dataclass
class SlowlorisRun:
    connections: int
    duration_s: float
    idle_threads: int
    max_threads: int
    median_threads: float
    idle_fds: int
    max_fds: int
    closed_by_agent: int
    connects: int
    longest_held_s: float
    probes: int
    probes_ok: int
    probe_failures: Counter[str]
    nofile: tuple[int, int]


@dataclass
class _Slot:
    sock: socket.socket | None = None
    connected: bool = False
    sent: int = 0
    opened_at: float = 0.0


def _raise_nofile(wanted: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class _Prober(threading.Thread):
    """``GET /healthz`` once a second: does a normal client still get an answer?"""

    def __init__(self, port: int) -> None:
        super().__init__(name="healthz-probe", daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.tries = 0
        self.ok = 0
        self.failures: Counter[str] = Counter()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.tries += 1
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/healthz")
                status = conn.getresponse().status
                if status == 200:
                    self.ok += 1
                else:
                    self.failures[f"HTTP {status}"] += 1
            except (OSError, http.client.HTTPException) as exc:
                self.failures[type(exc).__name__] += 1
            finally:
                conn.close()


def _open(slot: _Slot, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    code = sock.connect_ex(("127.0.0.1", port))
    if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
        sock.close()
        return
    slot.sock, slot.connected, slot.sent = sock, code == 0, 0
    slot.opened_at = time.monotonic()


def _close(slot: _Slot) -> None:
    if slot.sock is not None:
        with contextlib.suppress(OSError):
            slot.sock.close()
    slot.sock, slot.connected, slot.sent = None, False, 0


def _slowloris_tick(slots: list[_Slot], port: int) -> tuple[int, int, float]:
    """One second of the attack: a byte on every open connection; a closed one is reopened.
    Returns (connections the agent closed, connections opened, the longest a closed one
    lived)."""
    closed = opened = 0
    held = 0.0
    connecting = [s for s in slots if s.sock is not None and not s.connected]
    if connecting:
        poller = select.poll()
        by_fd = {}
        for s in connecting:
            assert s.sock is not None
            poller.register(s.sock, select.POLLOUT)
            by_fd[s.sock.fileno()] = s
        for fd, _ in poller.poll(0):
            s = by_fd[fd]
            assert s.sock is not None
            if s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                s.connected = True
            else:
                _close(s)
    for slot in slots:
        if slot.sock is None:
            _open(slot, port)
            opened += slot.sock is not None
            continue
        if not slot.connected:
            continue
        try:
            data = slot.sock.recv(4096)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data is None:
            try:
                slot.sock.send(SLOWLORIS_LINE[slot.sent : slot.sent + 1])
                slot.sent += 1
                continue
            except BlockingIOError:
                continue
            except OSError:
                pass
        # closed, or answered (then closed): the agent let it go; seen within a second
        closed += 1
        held = max(held, time.monotonic() - slot.opened_at)
        _close(slot)
    return closed, opened, held


def measure_slowloris(python: Path, base: Path, count: int, duration: float) -> SlowlorisRun:
    """Part 3: threads of an agent whose health listener is under slowloris."""
    nofile = _raise_nofile(count + 256)
    spec = ProfileSpec("p", "slow-client", "slow-secret")
    port = _free_port()
    with (
        TokenServer(clients={spec.client_id: spec.secret}, expires_in=LONG_TOKEN) as server,
        _agent(python, base / "slowloris", server.url, [spec], port) as agent,
    ):
        agent.wait_for_file("p")
        time.sleep(2.0)
        idle = _threads(agent.pid)
        idle_fds = _fds(agent.pid)
        slots = [_Slot() for _ in range(count)]
        prober = _Prober(port)
        samples: list[int] = []
        max_fds = idle_fds
        closed = connects = 0
        longest = 0.0
        started = time.monotonic()
        next_tick = started
        prober.start()
        try:
            while (now := time.monotonic()) < started + duration:
                if now >= next_tick:
                    c, o, held = _slowloris_tick(slots, port)
                    closed, connects, longest = closed + c, connects + o, max(longest, held)
                    next_tick += 1.0
                agent.check_alive("under slowloris")
                with contextlib.suppress(OSError):
                    samples.append(_threads(agent.pid))
                    max_fds = max(max_fds, _fds(agent.pid))
                time.sleep(0.1)
            elapsed = time.monotonic() - started
        finally:
            prober.stop.set()
            for slot in slots:
                _close(slot)
            prober.join(5)
    return SlowlorisRun(
        connections=count,
        duration_s=elapsed,
        idle_threads=idle,
        max_threads=max(samples, default=idle),
        median_threads=statistics.median(samples) if samples else float(idle),
        idle_fds=idle_fds,
        max_fds=max_fds,
        closed_by_agent=closed,
        connects=connects,
        longest_held_s=longest,
        probes=prober.tries,
        probes_ok=prober.ok,
        probe_failures=prober.failures,
        nofile=nofile,
    )


# -- report ---------------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        cells = [
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ]
        return "| " + " | ".join(cells) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else ("-" * (w + 2))
            for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _short(text: str, limit: int = 70) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0))
    return (
        f"{usable} usable cores ({cores} online, {model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def report_rss(runs: list[RssRun], per_agent: int, settle: float) -> None:
    base = runs[0]
    print("\n### 1. Peak RSS while fed a hostile body\n")
    print(
        f"{len(runs)} agent processes at once, one per row, each with ONE profile "
        f"(request_timeout {REQUEST_TIMEOUT:g} s); idle = VmRSS {settle:g} s after its first "
        f"token; then the fault queued {per_agent}x for its client and one POST /refresh: "
        f"the first {per_agent} requests (a refresh's request and its 3 fast retries, then "
        "the scheduled retries) get it, the next is answered normally; peak = max(VmHWM reset "
        "to idle, VmRSS sampled every 10 ms) until that answer's token is in the file. "
        "Machine as above; the 7 agents share it.\n"
    )
    header = (
        "hostile body",
        "idle MiB",
        "peak MiB",
        "peak - idle MiB",
        "peak / baseline peak",
        "after - idle MiB",
        "requests: hostile + normal",
        "recovered after s",
        f"≤ {RSS_TARGET_MIB:g} MiB",
        "what the agent logged (first failure)",
    )
    rows = []
    for run in runs:
        delta = (run.peak_kib - run.idle_kib) / MIB
        rows.append(
            (
                run.fault,
                f"{run.idle_kib / MIB:.1f}",
                f"{run.peak_kib / MIB:.1f}",
                f"{delta:+.2f}",
                f"{run.peak_kib / base.peak_kib:.3f}x",
                f"{(run.after_kib - run.idle_kib) / MIB:+.2f}",
                f"{min(run.attempts, run.queued)} + {max(run.attempts - run.queued, 0)}",
                "not in time" if run.recovered_s is None else f"{run.recovered_s:.1f}",
                _verdict(delta <= RSS_TARGET_MIB and not run.hostile_token_written),
                _short(run.error, 100) if run.error else "-",
            )
        )
    print(table(header, rows, [False, True, True, True, True, True, True, True, False, False]))
    if not all(run.hwm_reset for run in runs):
        print("\nnote: /proc/PID/clear_refs was refused: peaks are sampled VmRSS only")
    bad = [run.fault for run in runs if run.hostile_token_written]
    if bad:
        print(f"\nMISS: a token from a hostile answer reached the file: {', '.join(bad)}")


def report_stuck(runs: list[StuckRun], window: float) -> None:
    base = runs[0]
    print("\n### 2. A healthy profile's refreshes while other profiles are stuck\n")
    print(
        f"One agent process per row: 1 healthy profile ({SHORT_TOKEN} s tokens, so a refresh "
        f"about every {SHORT_TOKEN / 2:g} s) and N stuck profiles, each attempt of which hangs "
        f"until request_timeout ({REQUEST_TIMEOUT:g} s); {window:g} s window from the healthy "
        "profile's first token; its token file read every 50 ms (so expired times are to "
        "50 ms). Target: the same as N = 0 "
        f"(max gap within {GAP_TOLERANCE_S:g} s of it, expired time within "
        f"{EXPIRED_TOLERANCE_S:g} s).\n"
    )
    header = (
        "stuck N",
        "start → healthy file s",
        "healthy token requests",
        "median gap s",
        "max gap s",
        "max gap / N=0",
        "longest expired in file s",
        "stuck attempts",
        "threads at first token → max",
        "same as N = 0",
    )
    rows = []
    for run in runs:
        ok = (
            run.max_gap_s <= base.max_gap_s + GAP_TOLERANCE_S
            and run.longest_expired_s <= base.longest_expired_s + EXPIRED_TOLERANCE_S
            and all(s == 200 for s in run.statuses)
        )
        statuses = "" if all(s == 200 for s in run.statuses) else f" ({set(run.statuses)})"
        rows.append(
            (
                str(run.stuck),
                f"{run.start_s:.2f}",
                f"{run.refreshes}{statuses}",
                f"{run.median_gap_s:.2f}",
                f"{run.max_gap_s:.2f}",
                f"{run.max_gap_s / base.max_gap_s:.2f}x" if base.max_gap_s else "-",
                f"{run.longest_expired_s:.2f} ({run.expired_reads}/{run.reads} reads)",
                str(run.stuck_attempts),
                f"{run.first_threads} → {run.max_threads}",
                _verdict(ok),
            )
        )
    print(table(header, rows, [True] * 9 + [False]))


def report_slowloris(run: SlowlorisRun) -> None:
    print("\n### 3. Threads under slowloris on the health port\n")
    print(
        f"One agent process (1 profile, [health] listen on loopback); {run.connections} "
        "connections each sending a partial request line one byte per second for "
        f"{run.duration_s:.0f} s (one the agent closes is reopened at the next second); threads "
        "(/proc/PID/task) and descriptors (/proc/PID/fd) sampled every 100 ms; a GET /healthz "
        "probe (2 s timeout) once a second beside them. Bench RLIMIT_NOFILE "
        f"{run.nofile[0]}/{run.nofile[1]} (the agent inherits it).\n"
    )
    header = (
        "idle threads",
        "max threads",
        "median threads",
        "max - idle",
        f"max ≤ {HEALTH_CAP} + idle",
        "agent fds idle → max",
        "connects",
        "closed by agent",
        "longest held s",
        "healthz probes answered",
    )
    ok = run.max_threads <= HEALTH_CAP + run.idle_threads
    failed = ", ".join(f"{n} {kind}" for kind, n in run.probe_failures.most_common())
    row = (
        str(run.idle_threads),
        str(run.max_threads),
        f"{run.median_threads:.0f}",
        f"{run.max_threads - run.idle_threads:+d}",
        _verdict(ok),
        f"{run.idle_fds} → {run.max_fds}",
        str(run.connects),
        str(run.closed_by_agent),
        f"{run.longest_held_s:.1f}",
        f"{run.probes_ok}/{run.probes}" + (f" ({failed})" if failed else ""),
    )
    print(table(header, [row], [True] * 4 + [False] + [True] * 5))


# -- main -----------------------------------------------------------------------------------------


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not counts or counts[0] != 0 or counts != sorted(set(counts)):
        raise argparse.ArgumentTypeError("counts must be increasing and start with 0 (baseline)")
    return counts


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: agents stopped, temp files removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--faults-per-agent",
        type=int,
        default=4,
        help="1: times each fault is queued (the refresh, then its retries)",
    )
    parser.add_argument("--stuck", type=_counts, default=[0, 1, 4, 16], help="2: stuck counts")
    parser.add_argument("--window", type=float, default=25.0, help="2: seconds per count")
    parser.add_argument("--connections", type=int, default=500, help="3: slowloris connections")
    parser.add_argument("--attack-seconds", type=float, default=15.0, help="3: its duration")
    parser.add_argument(
        "--only", choices=["rss", "stuck", "slowloris"], action="append", help="run only these"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: each fault once, stuck 0 and 16 for 8 s, 6 s of slowloris",
    )
    parser.add_argument(
        "--dev-venv",
        action="store_true",
        help="run the agent from the dev venv instead of a fresh runtime-only venv",
    )
    args = parser.parse_args()
    if args.quick:
        args.faults_per_agent, args.stuck, args.window, args.attack_seconds = 1, [0, 16], 8.0, 6.0
    if args.faults_per_agent < 1 or args.window <= 4 or args.connections < 1:
        parser.error("--faults-per-agent ≥ 1, --window > 4 and --connections ≥ 1")
    parts = set(args.only or ["rss", "stuck", "slowloris"])
    signal.signal(signal.SIGTERM, _on_sigterm)

    settle = 2.0
    # each hostile request may take request_timeout, then a retry's wait (a few seconds)
    rss_limit = args.faults_per_agent * (REQUEST_TIMEOUT + 4.0) + 30.0
    rss: list[RssRun] = []
    stuck: list[StuckRun] = []
    slow: SlowlorisRun | None = None
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="dvs-hostile-") as tmp:
            base = Path(tmp)
            agent = DEV_AGENT if args.dev_venv else install_agent(base)
            python = agent.parent / "python"
            if "rss" in parts:
                print("1: hostile bodies…", file=sys.stderr, flush=True)
                rss = measure_rss(python, base, args.faults_per_agent, settle, rss_limit)
            if "stuck" in parts:
                for n in args.stuck:
                    print(f"2: {n} stuck profile(s)…", file=sys.stderr, flush=True)
                    stuck.append(measure_stuck(python, base, n, args.window))
            if "slowloris" in parts:
                print(f"3: {args.connections} slowloris connections…", file=sys.stderr, flush=True)
                slow = measure_slowloris(python, base, args.connections, args.attack_seconds)
    except KeyboardInterrupt:
        print("interrupted; the agents were stopped and the temp dir removed", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stderr.flush()
    venv = "the dev venv" if args.dev_venv else "a fresh runtime-only venv"
    print(
        f"## Hostile input\n\nmachine: {machine()}; agent: `python -m agent run` from {venv}; "
        f"token server: agent.devserver.TokenServer in the bench process, on loopback; "
        f"total run {time.monotonic() - began:.0f} s"
    )
    if rss:
        report_rss(rss, args.faults_per_agent, settle)
    if stuck:
        report_stuck(stuck, args.window)
    if slow is not None:
        report_slowloris(slow)
    print("\ntargets are reported, never asserted: a MISS does not fail the run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
