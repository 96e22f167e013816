"""Scale: what one dvs-agent costs with 1, 10 and 100 profiles, and what each extra one adds.

For each profile count it starts ONE real agent process (``.venv/bin/dvs-agent run``, a clean
environment, ``log_level = "warning"``, health listener off) whose profiles each read their
credentials from their own environment variables (``DVS_CLIENT_ID_<i>``/``DVS_CLIENT_SECRET_<i>``;
values in the environment are not polled, since they cannot change; with ``--secret-files`` each
secret is in a file, ``DVS_CLIENT_SECRET_<i>_FILE``, polled every second), and write a raw token
file, against the project's token server on
loopback (``expires_in`` 86399, so no refresh falls in the window). It reports:

- start → all files: from exec until every profile's token file exists;
- RSS and threads: ``VmRSS`` and ``Threads`` of /proc/PID/status, 20 s after all files exist;
- idle CPU: on-CPU time of the threads (/proc/PID/task/*/schedstat) over an idle window, ms/s;
- token requests the server saw (must equal the profile count: one per profile);

and the growth per extra profile between consecutive counts, against issue 5's targets
(env-only RSS ≤ 30 MiB at one profile; each extra profile ≤ 0.5 MiB and no thread of its own:
the thread count stays within main + scheduler + the shared pool's 4 workers at any count).

    .venv/bin/python bench/scale.py [--secret-files] [--counts 1,10,100] [--idle-seconds 30]

Numbers depend on the machine; the targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.devserver import TokenServer  # noqa: E402
from agent.schedule import POOL_WORKERS  # noqa: E402
from bench.measure import oncpu_seconds, proc_status, stop_process  # noqa: E402
from bench.runtime_venv import DEV_AGENT, install_agent  # noqa: E402

EXPIRES_IN = 86399
RSS_TARGET_MIB = 30.0
PER_PROFILE_TARGET_KIB = 512.0


@dataclass
class Sample:
    profiles: int
    start_s: float
    rss_kib: int
    threads: int
    cpu_ms_per_s: float
    token_requests: int
    token_statuses: Counter[int]
    rss_after_idle_kib: int


class BenchError(RuntimeError):
    pass


def _client(i: int) -> tuple[str, str]:
    return f"bench-client-{i}", f"bench-secret-{i}"


def _config(work: Path, token_url: str, count: int) -> Path:
    parts = [
        f"""[agent]
log_level = "warning"
log_format = "text"
state_dir = "{work}/state"

[health]
listen = ""
"""
    ]
    for i in range(count):
        name = f"p{i}"
        parts.append(
            f"""
[profiles.{name}]
token_url = "{token_url}"
sources = ["env"]

[profiles.{name}.env]
client_id_var = "DVS_CLIENT_ID_{i}"
client_secret_var = "DVS_CLIENT_SECRET_{i}"

[profiles.{name}.rotation]
poll_interval = "1s"

[[profiles.{name}.sinks]]
type = "file"
path = "{work}/tokens/{name}"
format = "raw"
"""
        )
    path = work / "agent.toml"
    path.write_text("".join(parts))
    return path


def _env(work: Path, count: int, secret_files: bool) -> dict[str, str]:
    """A clean environment: nothing inherited but the two variables of every profile."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "LANG": "C.UTF-8",
    }
    for i in range(count):
        client_id, secret = _client(i)
        env[f"DVS_CLIENT_ID_{i}"] = client_id
        if secret_files:
            path = work / "secrets" / f"p{i}"
            path.parent.mkdir(exist_ok=True)
            path.write_text(secret)
            env[f"DVS_CLIENT_SECRET_{i}_FILE"] = str(path)
        else:
            env[f"DVS_CLIENT_SECRET_{i}"] = secret
    return env


@contextmanager
def _agent(agent: Path, config: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    log = open(config.parent / "agent.log", "wb")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [str(agent), "run", "-c", str(config)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
            start_new_session=True,  # our Ctrl-C is not theirs: we stop it ourselves, below
        )
    except BaseException:
        log.close()
        raise
    try:
        yield proc
    finally:
        stop_process(proc)
        log.close()


def _log_tail(work: Path, lines: int = 20) -> str:
    try:
        text = (work / "agent.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _check_alive(proc: subprocess.Popen[bytes], work: Path, when: str) -> None:
    code = proc.poll()
    if code is not None:
        raise BenchError(f"the agent exited with {code} {when}; its log:\n{_log_tail(work)}")


def _sleep_watching(proc: subprocess.Popen[bytes], work: Path, seconds: float, when: str) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        _check_alive(proc, work, when)
        time.sleep(min(left, 0.5))
    _check_alive(proc, work, when)


def _check_files(work: Path, server: TokenServer, count: int) -> None:
    """Every file holds a token the server minted for that profile's own client."""
    issued = server.issued()
    for i in range(count):
        token = (work / "tokens" / f"p{i}").read_text()
        minted = issued.get(token)
        if minted is None or minted.client_id != _client(i)[0]:
            raise BenchError(f"tokens/p{i} does not hold a token minted for {_client(i)[0]}")


def measure(
    agent: Path,
    base: Path,
    count: int,
    settle: float,
    idle: float,
    start_timeout: float,
    secret_files: bool,
) -> Sample:
    work = base / f"n{count}"
    work.mkdir()
    clients = dict(_client(i) for i in range(count))
    with TokenServer(clients=clients, expires_in=EXPIRES_IN) as server:
        config = _config(work, server.url, count)
        env = _env(work, count, secret_files)
        files = [work / "tokens" / f"p{i}" for i in range(count)]
        started = time.monotonic()
        with _agent(agent, config, env) as proc:
            missing = list(files)
            while missing:
                _check_alive(proc, work, "before writing every token file")
                if time.monotonic() - started > start_timeout:
                    raise BenchError(
                        f"{len(missing)} of {count} token files still missing after "
                        f"{start_timeout:g} s; the agent's log:\n{_log_tail(work)}"
                    )
                missing = [path for path in missing if not path.exists()]
                if missing:
                    time.sleep(0.005)
            start_s = time.monotonic() - started
            _sleep_watching(proc, work, settle, "while settling")
            status = proc_status(proc.pid)
            rss_kib = int(status["VmRSS"].split()[0])
            threads = int(status["Threads"])
            cpu0, t0 = oncpu_seconds([proc.pid]), time.monotonic()
            _sleep_watching(proc, work, idle, "in the idle window")
            cpu1, t1 = oncpu_seconds([proc.pid]), time.monotonic()
            rss_after = int(proc_status(proc.pid)["VmRSS"].split()[0])
            _check_files(work, server, count)
        requests = server.token_requests()
    return Sample(
        profiles=count,
        start_s=start_s,
        rss_kib=rss_kib,
        threads=threads,
        cpu_ms_per_s=(cpu1 - cpu0) * 1000 / (t1 - t0),
        token_requests=len(requests),
        token_statuses=Counter(r.status for r in requests),
        rss_after_idle_kib=rss_after,
    )


#: what an env-only dvs-agent cannot run without, doing nothing: its libraries imported, one
#: token client (httpx imports httpcore only when a client is made) and a started scheduler
FLOOR_CODE = """\
import httpx, msgspec, tomllib
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
client = httpx.Client(verify=False)
scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(4)}, timezone="UTC")
scheduler.start()
print(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
scheduler.shutdown()
"""
FLOOR_WHAT = (
    "python importing httpx, msgspec, tomllib and APScheduler, with one httpx.Client "
    "and a started BackgroundScheduler, and nothing else"
)
#: the agent's idle threads at any profile count without the health listener or SQS: the main
#: thread, APScheduler's, the schedule's tick and APScheduler's pool workers (started as jobs
#: overlap); a refresh or poll runs on a short-lived thread of its profile's, which a sample
#: may catch while it runs
THREAD_BOUND = 3 + POOL_WORKERS


def import_floor_kib(python: Path) -> int:
    """VmRSS of the agent venv's python running :data:`FLOOR_CODE`: no agent code."""
    out = subprocess.run(
        [str(python), "-c", FLOOR_CODE], check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip())


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(
    samples: list[Sample], settle: float, idle: float, floor_kib: int, secret_files: bool
) -> bool:
    """Print the tables; True when the server saw exactly one token request per profile.

    The targets are reported (PASS/MISS), never asserted: a MISS does not fail the run.
    """
    all_ok = True
    print(
        "\none dvs-agent, env source "
        + ("(secrets in files, polled every 1s)" if secret_files else "(values in the environment)")
        + ", one raw file sink per profile; "
        f"RSS/threads {settle:g} s after all files, idle CPU over {idle:g} s"
    )
    header = (
        f"{'profiles':>8} | {'start→all files (s)':>19} | {'RSS MiB':>7} | {'threads':>7} | "
        f"{'idle CPU ms/s':>13} | {'token requests':>14}"
    )
    print(header)
    print("-" * len(header))
    for s in samples:
        ok = s.token_requests == s.profiles and s.token_statuses == Counter({200: s.profiles})
        all_ok &= ok
        print(
            f"{s.profiles:>8} | {s.start_s:>19.3f} | {s.rss_kib / 1024:>7.1f} | "
            f"{s.threads:>7} | {s.cpu_ms_per_s:>13.2f} | "
            f"{f'{s.token_requests} {_verdict(ok)}':>14}"
        )

    print("\ngrowth per extra profile")
    header = (
        f"{'profiles':>9} | {'ΔRSS/Δprofiles KiB':>18} | {'Δthreads':>8} | "
        f"{'ΔCPU/profile ms/s':>17}"
    )
    print(header)
    print("-" * len(header))
    for a, b in itertools.pairwise(samples):
        extra = b.profiles - a.profiles
        print(
            f"{f'{a.profiles}→{b.profiles}':>9} | "
            f"{(b.rss_kib - a.rss_kib) / extra:>18.1f} | {b.threads - a.threads:>+8} | "
            f"{(b.cpu_ms_per_s - a.cpu_ms_per_s) / extra:>17.3f}"
        )

    print("\ntargets (issue 5)")
    one = next((s for s in samples if s.profiles == 1), None)
    if one is not None:
        ok = one.rss_kib / 1024 <= RSS_TARGET_MIB
        print(
            f"  env-only RSS at 1 profile ≤ {RSS_TARGET_MIB:g} MiB: "
            f"{one.rss_kib / 1024:.1f} MiB  {_verdict(ok)}"
        )
        print(f"    floor: {FLOOR_WHAT}: {floor_kib / 1024:.1f} MiB")
    for a, b in itertools.pairwise(samples):
        extra = b.profiles - a.profiles
        per = (b.rss_kib - a.rss_kib) / extra
        print(
            f"  {a.profiles}→{b.profiles}: each extra profile ≤ "
            f"{PER_PROFILE_TARGET_KIB / 1024:g} MiB: {per:.1f} KiB  "
            f"{_verdict(per <= PER_PROFILE_TARGET_KIB)}; threads {b.threads - a.threads:+d}"
        )
    # A thread per profile would show as threads growing with the count past the bound; the
    # pool's workers start only when jobs overlap, so a count may add one or two of them.
    most = max(s.threads for s in samples)
    print(
        f"  no thread per profile: at most {most} threads at any count, bound "
        f"{THREAD_BOUND} (main, scheduler, tick, ≤ {POOL_WORKERS} pool workers started as "
        f"jobs overlap)  {_verdict(most <= THREAD_BOUND)}"
    )
    print(
        "  token requests = profiles (one each): "
        + _verdict(all(s.token_requests == s.profiles for s in samples))
    )

    after = ", ".join(f"{s.profiles}: {s.rss_after_idle_kib / 1024:.1f}" for s in samples)
    print(f"\nRSS MiB at the end of the idle window (profiles: MiB): {after}")
    print("idle CPU: on-CPU time of the agent's threads from /proc/PID/task/*/schedstat")
    return all_ok


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not counts or any(c < 1 for c in counts) or counts != sorted(set(counts)):
        raise argparse.ArgumentTypeError("counts must be increasing positive integers")
    return counts


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the agent is stopped, temp files removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=_counts, default=[1, 10, 100])
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument(
        "--settle-seconds", type=float, default=20.0, help="wait after all files, before RSS"
    )
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--quick", action="store_true", help="counts 1,10 with 5 s idle")
    parser.add_argument(
        "--secret-files",
        action="store_true",
        help="each secret in a file (…_FILE), which the agent polls every second",
    )
    parser.add_argument(
        "--dev-venv",
        action="store_true",
        help="run dvs-agent from the dev venv instead of a fresh runtime-only venv",
    )
    args = parser.parse_args()
    if args.quick:
        args.counts, args.idle_seconds = [1, 10], 5.0
    if args.idle_seconds <= 0 or args.settle_seconds < 0:
        parser.error("--idle-seconds must be > 0 and --settle-seconds ≥ 0")
    signal.signal(signal.SIGTERM, _on_sigterm)

    samples = []
    try:
        with tempfile.TemporaryDirectory(prefix="dvs-scale-") as tmp:
            agent = DEV_AGENT if args.dev_venv else install_agent(Path(tmp))
            floor_kib = import_floor_kib(agent.parent / "python")
            for count in args.counts:
                print(f"{count} profile(s)…", file=sys.stderr, flush=True)
                samples.append(
                    measure(
                        agent,
                        Path(tmp),
                        count,
                        args.settle_seconds,
                        args.idle_seconds,
                        args.start_timeout,
                        args.secret_files,
                    )
                )
    except KeyboardInterrupt:
        print("interrupted; the agent was stopped and its temp dir removed", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stderr.flush()
    if not report(samples, args.settle_seconds, args.idle_seconds, floor_kib, args.secret_files):
        print("error: the token server did not see one request per profile", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
