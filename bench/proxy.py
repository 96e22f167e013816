"""The agent's local bearer proxy (DESIGN §14) under load, beside nginx and the upstream direct.

One run, three targets, each hit by ``wrk --latency`` at 1 connection (``-t1 -c1``) and at 64
(``-t2 -c64``) on ``GET /hello``:

* ``direct``: the upstream itself, nginx (1 worker) answering ``return 200 "hello\\n"``
  (``--upstream api``: the project's test API, tests/api_server.py, in this process);
* ``nginx``: a second nginx as a plain reverse proxy to it (1 worker, keepalive to the upstream,
  ``proxy_set_header Authorization``), the practical limit;
* ``agent``: a real ``dvs-agent run -c CONFIG`` process whose one profile has a
  ``[profiles.bench.proxy]`` table (``listen = "127.0.0.1:PORT"``, ``allow_tcp = true``,
  ``upstream`` the upstream) and no sink, its token from the project's token server
  (``agent.devserver.TokenServer``, in this process). It counts as ready once ``/hello``
  through it answers 200 (it answers 503 until it holds a token).

Rounds (``--rounds``, default 3) rotate the order of the targets; medians are reported. RSS of
each proxy process (nginx: its one worker; the agent: its process): ``VmRSS`` once ready, before
any load (``VmHWM`` reset there), then ``VmHWM`` and ``VmRSS`` after every round. Targets
(issue 15) are printed beside the measured values, never asserted: added p50 ≤ 1 ms at 1
connection (agent - direct), throughput ≥ 0.3x nginx's at 64 connections (known unreachable for
one Python process on 2 cores: bench/proxy-stacks.md measured about 0.09x), RSS growth under
load ≤ 10 MiB.

    make bench-proxy                                 # = .venv/bin/python bench/proxy.py
    make bench-proxy BENCH_PROXY_ARGS=--quick        # 3 s runs, 1 round
    .venv/bin/python bench/proxy.py --duration 5 --rounds 1 --markdown /tmp/proxy.md
    .venv/bin/python bench/proxy.py --targets direct,nginx   # without the agent

Needs ``wrk`` and nginx with the echo module (Debian: ``apt-get install wrk nginx-light``);
exits 2 naming them when they are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.devserver import TokenServer  # noqa: E402
from bench.proxy_stacks import (  # noqa: E402
    NGINX_ECHO,
    PROXY_SERVER,
    _us,
    children,
    cpu_seconds,
    free_port,
    reset_hwm,
    start_nginx,
    status_kib,
    stop,
)
from tests.api_server import ApiServer  # noqa: E402

CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-secret"
PROFILE = "bench"
PATH = "/hello"
HELLO = b"hello\n"
#: the Authorization nginx (the reference proxy) adds
NGINX_BEARER = "Bearer x"
TARGETS = ("direct", "nginx", "agent")
#: (key, wrk threads, connections)
LOADS = (("c1", 1, 1), ("c64", 2, 64))
APT_HINT = "apt-get install wrk nginx-light"
#: after each wrk run: the requests it left in flight end (499) before anything is read
SETTLE_SECONDS = 0.5
#: the issue's targets
ADDED_P50_MS = 1.0
RATIO_C64 = 0.3
GROWTH_MIB = 10.0

UPSTREAM_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        location = /hello {{ default_type text/plain; return 200 "hello\\n"; }}
        location / {{ default_type text/plain; return 404 "not found\\n"; }}
    }}
"""

AGENT_CONFIG = """\
[agent]
log_level = "{log_level}"
log_format = "json"
state_dir = "{state}"

[health]
listen = "127.0.0.1:{health}"

[profiles.{profile}]
token_url = "{token_url}"

[profiles.{profile}.rotation]
poll_interval = "0"

[profiles.{profile}.proxy]
listen = "127.0.0.1:{port}"
allow_tcp = true
upstream = "{upstream}"
access_log = {access_log}
"""


class BenchError(Exception):
    """The bench cannot go on; the message says why."""


@dataclass
class Target:
    name: str
    port: int
    #: the process whose RSS and CPU are the proxy's (nginx: its worker); None: direct
    pid: int | None = None
    idle: float = 0.0
    peak: float = 0.0
    after: float = 0.0
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    #: why it was not measured (the agent failed to start...)
    skipped: str = ""


def wrk(port: int, threads: int, conns: int, seconds: float) -> dict[str, float]:
    """One wrk run on ``/hello``: req/s, p50 and p99 (µs), socket errors and non-2xx answers."""
    out = subprocess.run(
        [
            *("wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--latency"),
            *("--timeout", "5s", f"http://127.0.0.1:{port}{PATH}"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if len(lat) != 2 or rps is None or total is None:
        raise BenchError(f"wrk on port {port}: unexpected output\n{out}")
    socket_errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(rps[1]),
        "requests": float(total[1]),
        "p50": _us(lat["50"]),
        "p99": _us(lat["99"]),
        "errors": float(socket_errors),
        "non2xx": float(non2xx[1]) if non2xx else 0.0,
    }


def get(port: int, path: str = PATH, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def missing_tools() -> list[str]:
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if shutil.which("nginx") is not None and not Path(NGINX_ECHO).exists():
        missing.append(f"nginx's echo module ({NGINX_ECHO})")
    return missing


def tool_versions() -> str:
    versions = []
    for argv in (["nginx", "-v"], ["wrk", "-v"]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        text = (done.stdout + done.stderr).strip().splitlines()
        found = re.search(r"(nginx/[\d.]+|wrk \S+)", text[0] if text else "")
        versions.append(found[1] if found else argv[0])
    return ", ".join(versions)


# --------------------------------------------------------------------------- the agent


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    health: int

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def start_agent(
    base: Path, upstream: str, token_url: str, argv: list[str], args: argparse.Namespace
) -> Agent:
    """``dvs-agent run`` with one profile, a proxy and no sink; returns once it is listening."""
    port, health = free_port(), free_port()
    config = base / "agent.toml"
    config.write_text(
        AGENT_CONFIG.format(
            log_level=args.log_level,
            state=base / "state",
            health=health,
            profile=PROFILE,
            token_url=token_url,
            port=port,
            upstream=upstream,
            access_log="true" if args.access_log == "on" else "false",
        )
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DVS_", "NOTIFY_SOCKET", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))
    }
    env.update({"DVS_CLIENT_ID": CLIENT_ID, "DVS_CLIENT_SECRET": CLIENT_SECRET})
    log = base / "agent.log"
    with log.open("ab") as handle:  # a file, never a pipe nobody reads
        proc = subprocess.Popen(
            [*argv, "run", "-c", str(config)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=base,
            start_new_session=True,
        )
    return Agent(proc, log, port, health)


def wait_ready(agent: Agent, timeout: float = 30.0) -> float:
    """Seconds until ``/hello`` through the agent's proxy answers 200 (503 until it has a
    token); raises BenchError if the agent exits or it never does."""
    began = time.monotonic()
    last = "no answer"
    while time.monotonic() - began < timeout:
        if agent.proc.poll() is not None:
            raise BenchError(
                f"dvs-agent exited with {agent.proc.returncode} before its proxy answered:\n"
                + agent.tail()
            )
        try:
            status, body = get(agent.port)
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200 and body == HELLO:
                return time.monotonic() - began
            last = f"{status} {body[:200]!r}"
        time.sleep(0.05)
    raise BenchError(f"the agent's proxy did not answer 200 in {timeout:g} s (last: {last})")


def stop_agent(agent: Agent) -> tuple[int, float]:
    """SIGTERM; (exit code, seconds to exit)."""
    began = time.monotonic()
    code = stop(agent.proc)
    return code, time.monotonic() - began


def proxy_metrics(health: int) -> dict[str, float]:
    """What the agent's /metrics says of its proxy: requests by status, mean added seconds."""
    try:
        status, body = get(health, "/metrics", timeout=5)
    except OSError:
        return {}
    if status != 200:
        return {}
    found: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        m = re.match(r'dvs_agent_proxy_requests_total\{[^}]*status="(\d+)"[^}]*\}\s+(\S+)', line)
        if m:
            found[f"status {m[1]}"] = found.get(f"status {m[1]}", 0.0) + float(m[2])
        m = re.match(r"dvs_agent_proxy_added_seconds_(sum|count)\{[^}]*\}\s+(\S+)", line)
        if m:
            found[f"added {m[1]}"] = float(m[2])
        m = re.match(r"dvs_agent_proxy_replays_total\{[^}]*\}\s+(\S+)", line)
        if m:
            found["replays"] = float(m[1])
    return found


# --------------------------------------------------------------------------- the run


def _med(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def measure(targets: list[Target], args: argparse.Namespace) -> None:
    live = [t for t in targets if not t.skipped]
    if not live:
        return
    for t in live:
        if t.pid:
            t.idle = status_kib(t.pid, "VmRSS")
            reset_hwm(t.pid)
    print("warm-up…", flush=True)
    for t in live:
        wrk(t.port, 2, 64, min(2.0, args.duration))
    time.sleep(SETTLE_SECONDS)
    for rnd in range(args.rounds):
        order = live[rnd % len(live) :] + live[: rnd % len(live)]
        for t in order:
            for key, threads, conns in LOADS if rnd % 2 == 0 else LOADS[::-1]:
                cpu0 = cpu_seconds(t.pid) if t.pid else 0.0
                r = wrk(t.port, threads, conns, args.duration)
                time.sleep(SETTLE_SECONDS)
                cpu = (cpu_seconds(t.pid) - cpu0) if t.pid else 0.0
                r["cpu_us"] = cpu / r["requests"] * 1e6 if r["requests"] else 0.0
                t.runs.setdefault(key, []).append(r)
                bad = f", {r['non2xx']:.0f} non-2xx" if r["non2xx"] else ""
                print(
                    f"round {rnd + 1}/{args.rounds} {t.name} {key}: {r['rps']:.0f} req/s, "
                    f"p50 {r['p50'] / 1000:.3f} ms, p99 {r['p99'] / 1000:.3f} ms{bad}",
                    flush=True,
                )
    for t in live:
        if t.pid:
            t.peak = status_kib(t.pid, "VmHWM")
            t.after = status_kib(t.pid, "VmRSS")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(targets: list[Target], args: argparse.Namespace, notes: list[str], took: float) -> str:
    by_name = {t.name: t for t in targets}
    lines = [
        f"## Local proxy ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {tool_versions()}, "
        f"{took:.0f} s)",
        "",
        f"`{shlex.join(['bench/proxy.py', *sys.argv[1:]])}`: wrk on `GET {PATH}` "
        f"(`{HELLO!r}` from the upstream), {args.duration:g} s per run, median of "
        f"{args.rounds} round(s); upstream: {args.upstream}.",
        "",
        "| target | c1 req/s | c1 p50 ms | c1 p99 ms | c64 req/s | c64 p50 ms | c64 p99 ms "
        "| CPU µs/req c64 | RSS before MiB | VmHWM MiB | RSS after MiB | errors | non-2xx |",
        "|---|" + "---:|" * 12,
    ]
    for t in targets:
        if t.skipped:
            lines.append(f"| {t.name} | not run: {t.skipped} |" + " |" * 11)
            continue
        c1, c64 = t.runs["c1"], t.runs["c64"]
        mem = (
            f"{t.idle:.1f} | {t.peak:.1f} | {t.after:.1f}" if t.pid else "— | — | —"
        )  # direct: no proxy process
        cpu = f"{_med(c64, 'cpu_us'):.0f}" if t.pid else "—"
        lines.append(
            f"| {t.name} | {_med(c1, 'rps'):.0f} | {_med(c1, 'p50') / 1000:.3f} "
            f"| {_med(c1, 'p99') / 1000:.3f} | {_med(c64, 'rps'):.0f} "
            f"| {_med(c64, 'p50') / 1000:.3f} | {_med(c64, 'p99') / 1000:.3f} | {cpu} | {mem} "
            f"| {sum(r['errors'] for r in c1 + c64):.0f} "
            f"| {sum(r['non2xx'] for r in c1 + c64):.0f} |"
        )
    lines += ["", "| measure | measured | target | |", "|---|---:|---:|---|"]
    direct, nginx, agent = (by_name.get(n) for n in TARGETS)

    def ok(t: Target | None) -> bool:
        return t is not None and not t.skipped and bool(t.runs)

    if ok(direct) and ok(nginx):
        assert direct is not None and nginx is not None
        added = (_med(nginx.runs["c1"], "p50") - _med(direct.runs["c1"], "p50")) / 1000
        lines.append(f"| nginx: added p50 at 1 connection (vs direct) | {added:+.3f} ms | | |")
    if ok(direct) and ok(agent):
        assert direct is not None and agent is not None
        added = (_med(agent.runs["c1"], "p50") - _med(direct.runs["c1"], "p50")) / 1000
        lines.append(
            f"| agent: added p50 at 1 connection (vs direct) | {added:+.3f} ms "
            f"| ≤ {ADDED_P50_MS:g} ms | {_verdict(added <= ADDED_P50_MS)} |"
        )
    if ok(nginx) and ok(agent):
        assert nginx is not None and agent is not None
        ratio = _med(agent.runs["c64"], "rps") / _med(nginx.runs["c64"], "rps")
        lines.append(
            f"| agent: req/s ÷ nginx req/s at 64 connections | {ratio:.2f}x "
            f"| ≥ {RATIO_C64:g}x | {_verdict(ratio >= RATIO_C64)} |"
        )
    if ok(agent):
        assert agent is not None
        growth = agent.peak - agent.idle
        lines.append(
            f"| agent: RSS growth under load (VmHWM - RSS before) | {growth:+.1f} MiB "
            f"| ≤ {GROWTH_MIB:g} MiB | {_verdict(growth <= GROWTH_MIB)} |"
        )
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def upstream_server(kind: str, base: Path, procs: list[subprocess.Popen[bytes]]) -> Iterator[int]:
    """The upstream's port: nginx (its process appended to ``procs``) or the test API."""
    if kind == "nginx":
        port = free_port()
        procs.append(start_nginx(base, "upstream", port, UPSTREAM_SERVER.format(port=port)))
        yield port
        return
    with ApiServer(check_tokens=False, record=False) as api:
        yield api.port


def run(args: argparse.Namespace) -> int:
    missing = missing_tools()
    if missing:
        print(f"missing: {', '.join(missing)}; on Debian: {APT_HINT}", file=sys.stderr)
        return 2
    wanted = [n for n in TARGETS if n in args.targets.split(",")]
    if not wanted:
        print(f"--targets: none of {', '.join(TARGETS)}", file=sys.stderr)
        return 64
    began = time.monotonic()
    notes: list[str] = []
    targets: list[Target] = []
    procs: list[subprocess.Popen[bytes]] = []
    agent: Agent | None = None
    failed = False
    base = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    try:
        with (
            TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as tokens,
            upstream_server(args.upstream, base, procs) as up_port,
        ):
            upstream = f"http://127.0.0.1:{up_port}"
            if "direct" in wanted:
                targets.append(Target("direct", up_port))
            if "nginx" in wanted:
                port = free_port()
                conf = PROXY_SERVER.format(port=port, upstream=up_port, bearer=NGINX_BEARER)
                proc = start_nginx(base, "nginx-proxy", port, conf)
                procs.append(proc)
                targets.append(Target("nginx", port, children(proc.pid)[0]))
            if "agent" in wanted:
                argv = [args.python, "-m", "agent"]
                agent = start_agent(base, upstream, tokens.url, argv, args)
                target = Target("agent", agent.port, agent.proc.pid)
                try:
                    ready = wait_ready(agent)
                    notes.append(
                        f"agent: `{shlex.join(argv)} run`, proxy ready (first 200) "
                        f"{ready:.2f} s after spawn; access_log = {args.access_log}, "
                        f"log_level = {args.log_level}, its log to a file"
                    )
                except BenchError as exc:
                    failed = True
                    print(f"agent: {exc}", file=sys.stderr)
                    target.skipped = str(exc).splitlines()[0]
                    stop_agent(agent)
                    agent = None
                targets.append(target)
            for t in targets:
                if t.skipped:
                    continue
                status, answer = get(t.port)
                if status != 200 or answer != HELLO:
                    raise BenchError(f"{t.name}: GET {PATH} answered {status} {answer[:100]!r}")
            measure(targets, args)
            if agent is not None:
                seen = proxy_metrics(agent.health)
                if seen:
                    statuses = ", ".join(
                        f"{k}: {v:.0f}" for k, v in sorted(seen.items()) if k.startswith("status")
                    )
                    mean = ""
                    if seen.get("added count"):
                        mean = (
                            f"; mean `dvs_agent_proxy_added_seconds` "
                            f"{seen['added sum'] / seen['added count'] * 1000:.3f} ms"
                        )
                    notes.append(
                        f"agent's /metrics: proxy requests {statuses or 'none'}{mean}; "
                        f"replays {seen.get('replays', 0):.0f}"
                    )
                code, took = stop_agent(agent)
                notes.append(f"agent: SIGTERM → exit {code} in {took:.2f} s")
                if code != 0:
                    notes.append(f"agent's log tail:\n\n```\n{agent.tail()}\n```")
                agent = None
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if agent is not None:
            stop_agent(agent)
        for proc in reversed(procs):
            stop(proc)
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    text = report(targets, args, notes, time.monotonic() - began)
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
        print(f"written to {args.markdown}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, order rotated; medians")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 round")
    parser.add_argument("--markdown", metavar="FILE", help="also write the report here")
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated: direct,nginx,agent"
    )
    parser.add_argument(
        "--upstream",
        choices=["nginx", "api"],
        default="nginx",
        help="nginx (default), or tests/api_server.py in this process (slower, GIL-bound)",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="the interpreter that runs `-m agent`"
    )
    parser.add_argument(
        "--access-log",
        choices=["on", "off"],
        default="off",
        help="the agent's access_log (off: its default)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 3.0, 1
    if args.duration <= 0 or args.rounds < 1:
        parser.error("--duration > 0 and --rounds ≥ 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
