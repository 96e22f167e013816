"""Fleet mode: N ``dvs-agent run`` processes of one client against one Redis and a rate-limited
token server, with fleet mode off and on (DESIGN §13, issue 13).

For each N (10, 50, 200) and mode, a fresh ``redis-server`` (``tests.servers.redis_server``) and a
fresh token server (:class:`agent.devserver.TokenServer`, in this process, on loopback,
``rate_limit`` requests/s per client) are started, then N agent processes at once, each with its
own directory, config, state, raw token file and health port (``tests.fleet_agents``), a clean
environment, and the one client secret in a shared file (``DVS_CLIENT_SECRET_FILE``, polled every
second). Fleet mode on adds ``[profiles.dvs.fleet]`` (``store = "redis"``, ``lease``); off, the
config is otherwise the same. The phases, in order:

1. **Cold mass start** (day-long tokens): from the first spawn until every agent's file holds a
   token that the server minted and that has not expired; the token requests and 429s until
   then (plus 2 s for late ones).
2. **Idle** (same tokens, no refresh due): mean ``VmRSS`` of the agents after a settle; with fleet
   mode, Redis commands over the idle window (``INFO commandstats``, the bench's own ``INFO``
   left out) per agent per minute.
3. **Rotation**: the server's secret and the shared file are changed; until every file holds a
   valid token minted with the new secret; requests and 429s until then (plus 2 s).
4. **Lifetimes**: the server's tokens become ``--lifetime`` seconds long and the agents refresh
   them mid-life (``refresh_before_expiry`` = half of it): a second rotation moves every agent to
   such a token, then the token requests over ``--lifetimes`` refresh periods are counted.
5. **Take-over** (fleet mode only): a slow answer (``Fault.slow(120)``) is queued, so that the
   next scheduled mint hangs; its lease holder (the ``holder`` of the Redis lease, ``host:pid``)
   is SIGKILLed as soon as the lease shows; the time from the kill to the next token request is
   the take-over (target ≤ lease + 1 s).

    .venv/bin/python bench/fleet.py                  # sizes 10,50,200; the full run
    .venv/bin/python bench/fleet.py --quick          # a smoke run: sizes 5,10, shorter windows
    .venv/bin/python bench/fleet.py --sizes 20 --lease 2 --keep /tmp/fleet-logs

Numbers depend on the machine: targets are reported (PASS/MISS), never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Collection
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.devserver import Fault, TokenServer  # noqa: E402
from bench.hostile import _raise_nofile, machine, table  # noqa: E402
from bench.measure import proc_status  # noqa: E402
from bench.runtime_venv import DEV_AGENT, install_agent  # noqa: E402
from tests.fleet_agents import Fleet, FleetAgent, health_port  # noqa: E402
from tests.servers import RedisServer, redis_binary, redis_server  # noqa: E402
from tests.test_fleet_redis import fleet_table  # noqa: E402

CLIENT_ID = "bench-fleet-client"
#: the tokens of the cold start, the idle window and the first rotation: none is refreshed
LONG_TOKEN = 86399
KEY_PREFIX = "bench-fleet:"
#: requests answered after "all valid" that still belong to the phase (late pollers)
TAIL = 2.0
#: the slow answer that the lease holder waits for while it is killed
HANG = 120.0


class BenchError(RuntimeError):
    pass


@dataclass
class BenchFleet(Fleet):
    """:class:`tests.fleet_agents.Fleet` with the benches' processes: the given ``dvs-agent``
    (a runtime-only venv's), a clean environment, a session of its own (our Ctrl-C is not
    theirs: :meth:`stop` ends them), and each agent in :attr:`agents` as soon as it is spawned,
    so that an interrupted start leaves none behind."""

    agent_bin: Path = DEV_AGENT

    def spawn(self, index: int) -> FleetAgent:
        directory = self.base / f"agent-{index:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        agent = FleetAgent(index=index, directory=directory, port=health_port(self.ports))
        config = self.config(agent)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(directory),
            "LANG": "C.UTF-8",
            "DVS_CLIENT_ID": self.client_id,
            "DVS_CLIENT_SECRET_FILE": str(self.secret_file),
        }
        with open(directory / "agent.log", "ab") as log:  # the agent keeps its own copy
            agent.proc = subprocess.Popen(
                [str(self.agent_bin), "run", "-c", str(config)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
                start_new_session=True,  # our Ctrl-C is not theirs: stop() ends them
            )
        return agent

    def start(self) -> BenchFleet:
        self.base.mkdir(parents=True, exist_ok=True)
        if not self.secret_file.exists():
            self.rotate(self.secret)
        for i in range(self.n):
            self.agents.append(self.spawn(i))
        return self

    def alive_agents(self) -> list[FleetAgent]:
        return [a for a in self.agents if a.alive()]


# -- one run: N agents, one mode ---------------------------------------------------------------


@dataclass
class Phase:
    """Until every agent held a valid token: seconds (None: not within the deadline)."""

    seconds: float | None
    requests: int
    rate_limited: int
    #: agents without a valid token at the deadline (0 when ``seconds`` is set)
    missing: int = 0
    deadline: float = 0.0


@dataclass
class Run:
    n: int
    fleet: bool
    spawn_s: float = 0.0
    #: from the first spawn to the first token request the server saw
    first_request_s: float | None = None
    cold: Phase | None = None
    rotation: Phase | None = None
    #: moving to --lifetime tokens (the second rotation)
    transition: Phase | None = None
    lifetime_requests: float | None = None
    lifetime_429: float | None = None
    lifetime_ok: float | None = None
    periods: float = 0.0
    period_s: float = 0.0
    takeover_s: float | None = None
    takeover_requests: int | None = None
    takeover_converged_s: float | None = None
    idle_cmds: float | None = None
    idle_breakdown: Counter[str] = field(default_factory=Counter)
    idle_requests: int = 0
    rss_kib: float = 0.0
    rss_min_kib: int = 0
    rss_max_kib: int = 0
    events: Counter[str] = field(default_factory=Counter)
    tracebacks: int = 0
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def _valid(
    server: TokenServer,
    secret: str | None = None,
    *,
    after: float = 0.0,
    expired_too: bool = False,
) -> Callable[[], Collection[str]]:
    """The tokens the server minted (with ``secret``; issued after ``after``, Unix s) that have
    not expired (or, ``expired_too``, whether or not they have)."""

    def tokens() -> Collection[str]:
        now = time.time()
        return {
            token
            for token, minted in server.issued().items()
            if (expired_too or minted.expires_at > now)
            and (secret is None or minted.client_secret == secret)
            and minted.issued_at > after
        }

    return tokens


def _check_alive(fleet: BenchFleet, expected_dead: Collection[int] = ()) -> None:
    dead = [a for a in fleet.agents if not a.alive() and a.index not in expected_dead]
    if dead:
        tail = "\n".join(dead[0].log().splitlines()[-15:])
        raise BenchError(
            f"{len(dead)} agent(s) exited (first: agent {dead[0].index}, code "
            f"{dead[0].proc.returncode if dead[0].proc else '?'}); its log:\n{tail}"
        )


def _sleep(fleet: BenchFleet, seconds: float, dead: Collection[int] = ()) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        _check_alive(fleet, dead)
        time.sleep(min(left, 0.5))


def _until_all_valid(
    fleet: BenchFleet,
    server: TokenServer,
    started: float,
    deadline: float,
    valid: Callable[[], Collection[str]],
    dead: Collection[int] = (),
) -> Phase:
    """Wait until every live agent's file holds one of the ``valid`` tokens; the seconds are
    counted from ``started`` (monotonic); requests and 429s from the server's counts since
    the phase began (the caller resets them)."""
    seconds: float | None = None
    missing = 0
    while True:
        _check_alive(fleet, dead)
        good = valid()
        agents = fleet.alive_agents()
        missing = sum(1 for a in agents if a.token() not in good)
        now = time.monotonic()
        if missing == 0:
            seconds = now - started
            break
        if now - started > deadline:
            break
        time.sleep(0.1)
    if seconds is not None:
        _sleep(fleet, TAIL, dead)
    counts = server.client_counts(CLIENT_ID)
    return Phase(seconds, counts.requests, counts.rate_limited, missing, deadline)


def _rotate(fleet: BenchFleet, server: TokenServer, secret: str) -> float:
    """A rotation: the server accepts only ``secret`` from now on, and the shared file holds
    it; answers the monotonic time of the file's write."""
    server.set_secret(CLIENT_ID, secret)
    server.reset_counts()
    fleet.rotate(secret)
    return time.monotonic()


def _commandstats(redis: RedisServer) -> Counter[str]:
    client = redis.client()
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    calls: Counter[str] = Counter()
    for name, values in stats.items():
        command = name.removeprefix("cmdstat_")
        if command not in ("info", "auth", "hello", "client|setinfo", "client"):
            calls[command] = int(values["calls"])
    return calls


def _lease_holder(redis: RedisServer) -> int | None:
    """The pid of the Redis lease's holder (``host:pid``), or None when no lease is held."""
    client = redis.client()
    try:
        for key in client.scan_iter(match=f"{KEY_PREFIX}*:lease"):
            value = client.get(key)
            if value is None:
                continue
            holder = str(json.loads(value).get("holder", ""))
            with contextlib.suppress(ValueError):
                return int(holder.rpartition(":")[2])
    finally:
        client.close()
    return None


def _events(fleet: BenchFleet) -> tuple[Counter[str], int]:
    """The JSON log lines' events over every agent (``level:event``), and Tracebacks."""
    events: Counter[str] = Counter()
    tracebacks = 0
    for agent in fleet.agents:
        for line in agent.log().splitlines():
            if "Traceback" in line:
                tracebacks += 1
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError, AttributeError):
                doc = json.loads(line)
                events[f"{doc.get('level', '?')}:{doc.get('event', '-')}"] += 1
    return events, tracebacks


def _takeover(
    fleet: BenchFleet, server: TokenServer, redis: RedisServer, run: Run, lease: float
) -> None:
    """Queue a slow answer; the next scheduled mint hangs; SIGKILL its lease holder."""
    before = len(server.token_requests())
    server.enqueue(Fault.slow(HANG))
    if not server.wait_for_requests(before + 1, timeout=run.period_s + 30):
        run.notes.append("take-over: no scheduled mint came")
        return
    pid = None
    deadline = time.monotonic() + 10
    while pid is None and time.monotonic() < deadline:
        pid = _lease_holder(redis)
        if pid is None:
            time.sleep(0.02)
    holder = next((a for a in fleet.agents if a.proc is not None and a.proc.pid == pid), None)
    if holder is None:
        run.notes.append(f"take-over: the lease's holder pid {pid} is none of the agents")
        return
    assert holder.proc is not None
    os.kill(holder.proc.pid, signal.SIGKILL)
    killed, killed_mono = time.time(), time.monotonic()
    holder.proc.wait(10)
    dead = {holder.index}
    after: list[float] = []
    end = time.monotonic() + lease + 30
    while not after and time.monotonic() < end:
        _check_alive(fleet, dead)
        after = [r.received_at for r in server.token_requests() if r.received_at > killed]
        time.sleep(0.01)
    if not after:
        run.notes.append(f"take-over: no token request within {lease + 30:g} s of the kill")
        return
    run.takeover_s = min(after) - killed
    server.reset_counts()
    # every agent holds a token minted after the kill: the taker's
    fresh = _valid(server, fleet.secret, after=killed)
    phase = _until_all_valid(fleet, server, killed_mono, 60.0, fresh, dead=dead)
    run.takeover_converged_s = phase.seconds
    run.takeover_requests = sum(1 for r in server.token_requests() if r.received_at > killed)


def measure(agent_bin: Path, base: Path, n: int, fleet_on: bool, args: argparse.Namespace) -> Run:
    run = Run(n=n, fleet=fleet_on)
    began = time.monotonic()
    work = base / f"n{n}-{'on' if fleet_on else 'off'}"
    work.mkdir(parents=True)
    deadline = max(120.0, 3.0 * n)
    lifetime = args.lifetime
    run.period_s = lifetime / 2  # refresh_before_expiry = lifetime / 2 (policy.refresh_delay)
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(work / "redis"))
        server = stack.enter_context(
            TokenServer(
                clients={CLIENT_ID: "s3cret-0"}, expires_in=LONG_TOKEN, rate_limit=args.rate_limit
            )
        )
        table_text = (
            fleet_table(redis, work, lease=f"{args.lease:g}s", prefix=KEY_PREFIX)
            if fleet_on
            else ""
        )
        fleet = BenchFleet(
            base=work,
            token_url=server.url,
            fleet_table=table_text,
            secret="s3cret-0",
            n=n,
            client_id=CLIENT_ID,
            poll="1s",
            refresh_before_expiry=f"{lifetime / 2:g}s",
            agent_bin=agent_bin,
        )
        stack.callback(fleet.stop)  # first out: before the servers stop

        # 1. cold mass start
        label = f"N={n} fleet {'on' if fleet_on else 'off'}"
        print(f"{label}: starting {n} agents…", file=sys.stderr, flush=True)
        started, started_wall = time.monotonic(), time.time()
        fleet.start()
        run.spawn_s = time.monotonic() - started
        run.cold = _until_all_valid(fleet, server, started, deadline, _valid(server))
        first = server.token_requests()
        if first:
            run.first_request_s = min(r.received_at for r in first) - started_wall
        print(f"{label}: cold start {_secs(run.cold)}", file=sys.stderr, flush=True)

        # 2. idle: RSS after the settle; Redis commands over the window
        _sleep(fleet, args.settle)
        rss = [int(proc_status(a.proc.pid)["VmRSS"].split()[0]) for a in fleet.agents if a.proc]
        run.rss_kib = statistics.fmean(rss)
        run.rss_min_kib, run.rss_max_kib = min(rss), max(rss)
        if fleet_on:
            requests0 = len(server.token_requests())
            stats0, t0 = _commandstats(redis), time.monotonic()
            _sleep(fleet, args.idle)
            stats1, t1 = _commandstats(redis), time.monotonic()
            run.idle_breakdown = stats1 - stats0
            run.idle_cmds = sum(run.idle_breakdown.values()) / n / ((t1 - t0) / 60)
            run.idle_requests = len(server.token_requests()) - requests0

        # 3. rotation (day-long tokens still)
        print(f"{label}: rotation…", file=sys.stderr, flush=True)
        rotated = _rotate(fleet, server, "s3cret-1")
        run.rotation = _until_all_valid(
            fleet, server, rotated, deadline, _valid(server, "s3cret-1")
        )

        # 4. lifetimes: --lifetime tokens refreshed mid-life, reached by a second rotation
        print(f"{label}: {args.lifetimes:g} lifetimes of {lifetime:g} s tokens…", file=sys.stderr)
        server.expires_in = int(lifetime)
        rotated = _rotate(fleet, server, "s3cret-2")
        # every agent has had a short token (when the server is overwhelmed, not all of them
        # may hold a valid one at any moment)
        short = _valid(server, "s3cret-2", expired_too=True)
        run.transition = _until_all_valid(fleet, server, rotated, deadline, short)
        window_start = time.time()
        _sleep(fleet, args.lifetimes * run.period_s)
        window_end = time.time()
        window = [r for r in server.token_requests() if window_start <= r.received_at < window_end]
        run.periods = (window_end - window_start) / run.period_s
        run.lifetime_requests = len(window) / run.periods
        run.lifetime_429 = sum(1 for r in window if r.status == 429) / run.periods
        run.lifetime_ok = sum(1 for r in window if r.status == 200) / run.periods

        # 5. take-over after the holder is killed
        if fleet_on:
            print(f"{label}: take-over…", file=sys.stderr, flush=True)
            _takeover(fleet, server, redis, run, args.lease)

        run.events, run.tracebacks = _events(fleet)
        if args.keep is not None:
            target = args.keep / work.name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(work, target, ignore=shutil.ignore_patterns("*.sock", "dump.rdb"))
    run.elapsed_s = time.monotonic() - began
    print(f"{label}: done in {run.elapsed_s:.0f} s", file=sys.stderr, flush=True)
    return run


# -- report ------------------------------------------------------------------------------------


def _secs(phase: Phase | None) -> str:
    if phase is None:
        return "—"
    if phase.seconds is None:
        return f">{phase.deadline:g} ({phase.missing} without)"
    return f"{phase.seconds:.1f}"


def _req(phase: Phase | None) -> str:
    return "—" if phase is None else f"{phase.requests} / {phase.rate_limited}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(runs: list[Run], args: argparse.Namespace, command: str, total_s: float) -> None:
    header = [
        "N",
        "fleet",
        "spawn s",
        "cold start → all valid s",
        "cold: requests / 429s",
        "requests per lifetime (429s)",
        "rotation → all valid s",
        "rotation: requests / 429s",
        f"take-over s (≤ {args.lease + 1:g})",
        "Redis cmds/agent/min idle",
        "RSS MiB/agent",
        "extra RSS MiB",
    ]
    off = {r.n: r for r in runs if not r.fleet}
    rows = []
    for r in runs:
        if r.fleet and r.takeover_s is not None:
            takeover = f"{r.takeover_s:.2f} {_verdict(r.takeover_s <= args.lease + 1)}"
        else:
            takeover = "—" if not r.fleet else "n/a"
        extra = "—"
        if r.fleet and r.n in off:
            extra = f"{(r.rss_kib - off[r.n].rss_kib) / 1024:+.1f}"
        lifetime = "—"
        if r.lifetime_requests is not None:
            lifetime = f"{r.lifetime_requests:.1f} ({r.lifetime_429:.1f})"
        rows.append(
            [
                str(r.n),
                "on" if r.fleet else "off",
                f"{r.spawn_s:.1f}",
                _secs(r.cold),
                _req(r.cold),
                lifetime,
                _secs(r.rotation),
                _req(r.rotation),
                takeover,
                "—" if r.idle_cmds is None else f"{r.idle_cmds:.2f}",
                f"{r.rss_kib / 1024:.1f}",
                extra,
            ]
        )
    right = [True, False, *([True] * (len(header) - 2))]
    venv = "the dev venv" if args.dev_venv else "a fresh runtime-only venv"
    print(
        f"## Fleet mode\n\ncommand: `{command}`\n\nmachine: {machine()}, {_ram()}; agents: "
        f"`dvs-agent run` processes from {venv}, N at once, each its own health port; one "
        f"redis-server {_redis_version()} and agent.devserver.TokenServer (in the bench "
        f"process, rate limit {args.rate_limit}/s per client) on loopback; lease "
        f"{args.lease:g}s; lifetime tokens {args.lifetime:g} s refreshed every "
        f"{args.lifetime / 2:g} s, over {args.lifetimes:g} periods; idle window "
        f"{args.idle:g} s; total run {total_s:.0f} s\n"
    )
    print(table(header, rows, right))
    print(
        "\ntargets: requests per lifetime 1 with fleet mode (N without); 0 429s at the cold "
        f"start and the rotation; take-over ≤ lease + 1 s = {args.lease + 1:g} s. A token is in "
        "use for one refresh period (it is replaced at half its life): requests per lifetime "
        "are counted per refresh period"
    )
    print("\nper run:")
    for r in runs:
        mode = "on" if r.fleet else "off"
        parts = [f"N={r.n} {mode}: {r.elapsed_s:.0f} s in all"]
        if r.first_request_s is not None:
            parts.append(f"first token request {r.first_request_s:.1f} s after the first spawn")
        parts.append(
            f"RSS {r.rss_min_kib / 1024:.1f} to {r.rss_max_kib / 1024:.1f} MiB (mean "
            f"{r.rss_kib / 1024:.1f})"
        )
        if r.transition is not None:
            parts.append(f"move to short tokens {_secs(r.transition)} s, {_req(r.transition)}")
        if r.lifetime_ok is not None:
            parts.append(
                f"per lifetime {r.lifetime_ok:.1f} answered 200 of {r.lifetime_requests:.1f} "
                f"over {r.periods:.1f} periods"
            )
        if r.fleet:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(r.idle_breakdown.items())) or "none"
            parts.append(
                f"idle Redis commands: {shown}; token requests while idle {r.idle_requests}"
            )
            if r.takeover_s is not None:
                parts.append(
                    f"after the kill: {r.takeover_requests} token request(s), all valid after "
                    + (
                        f"{r.takeover_converged_s:.1f} s"
                        if r.takeover_converged_s is not None
                        else "(not within 60 s)"
                    )
                )
        parts.extend(r.notes)
        print("- " + "; ".join(parts))
        events = ", ".join(f"{k} {v}" for k, v in sorted(r.events.items()))
        print(f"  log events (level:event count): {events}; Tracebacks: {r.tracebacks}")
    print("\ntargets are reported, never asserted: a MISS does not fail the run")


def _ram() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
    return "RAM ?"


def _redis_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [redis_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        for word in out.split():
            if word.startswith("v="):
                return word[2:]
    return "?"


# -- main --------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or any(s < 2 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be integers ≥ 2")
    return sizes


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: agents stopped, servers stopped, temp removed


def _command() -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=[10, 50, 200], help="agent counts")
    parser.add_argument(
        "--rate-limit", type=int, default=10, help="token requests/s per client the server admits"
    )
    parser.add_argument("--lease", type=float, default=5.0, help="the fleet's mint lease, s")
    parser.add_argument(
        "--lifetime",
        type=float,
        default=20.0,
        help="token life (s) in the lifetime phase; refreshed at half of it",
    )
    parser.add_argument(
        "--lifetimes", type=float, default=4.0, help="refresh periods in the lifetime window"
    )
    parser.add_argument("--idle", type=float, default=60.0, help="idle window (s) for Redis")
    parser.add_argument("--settle", type=float, default=10.0, help="after the cold start, s")
    parser.add_argument("--modes", choices=["off", "on", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="a smoke run: sizes 5,10, short")
    parser.add_argument("--keep", type=Path, help="copy every run's directory (configs, logs) here")
    parser.add_argument(
        "--dev-venv",
        action="store_true",
        help="run dvs-agent from the dev venv instead of a fresh runtime-only venv",
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.idle, args.settle, args.lifetimes = [5, 10], 10.0, 3.0, 2.0
    if args.lifetime < 4 or args.lease <= 0 or args.rate_limit < 1 or args.lifetimes <= 0:
        parser.error("--lifetime ≥ 4, --lease > 0, --rate-limit ≥ 1 and --lifetimes > 0")
    signal.signal(signal.SIGTERM, _on_sigterm)
    # each agent holds a connection to the token server and one to Redis; health GETs beside
    _raise_nofile(16 * max(args.sizes) + 256)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.modes]

    command = _command()
    began = time.monotonic()
    runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory(prefix="dvs-fleet-") as tmp:
            base = Path(tmp)
            agent = DEV_AGENT if args.dev_venv else install_agent(base)
            for n in args.sizes:
                for fleet_on in modes:
                    runs.append(measure(agent, base, n, fleet_on, args))
    except KeyboardInterrupt:
        print(
            "interrupted; the agents and servers were stopped, the temp dir removed",
            file=sys.stderr,
        )
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stderr.flush()
    report(runs, args, command, time.monotonic() - began)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
