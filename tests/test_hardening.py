"""DESIGN §10 against the running daemon: a hostile or broken server, clock, signal burst or disk
never freezes a profile, leaks a secret or loses a token (real processes, the project's token
server with its fault modes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from agent.devserver import Fault, TokenServer
from tests.conftest import REPO, Spawn, agent_env, file_sink, wait_for
from tests.servers import free_port

pytestmark = pytest.mark.timeout(180)

HEALTHY, STUCK = "healthy-client", "stuck-client"
HEALTHY_SECRET, STUCK_SECRET = "healthy-Secret-9f2c", "stuck-Secret-77ab"


def two_profiles(directory: Path, url: str, *, health_port: int, stuck_timeout: str = "3s") -> Path:
    """Profiles ``healthy`` and ``stuck``, each with its own client and token file."""
    parts = [
        f'[agent]\nlog_level = "debug"\nstate_dir = "{directory}/state"\n',
        f'[health]\nlisten = "127.0.0.1:{health_port}"\n',
    ]
    for name, timeout in (("healthy", "3s"), ("stuck", stuck_timeout)):
        upper = name.upper()
        parts.append(
            f"""
[profiles.{name}]
token_url = "{url}"
request_timeout = "{timeout}"

[profiles.{name}.env]
client_id_var = "{upper}_ID"
client_secret_var = "{upper}_SECRET"

[profiles.{name}.rotation]
poll_interval = "0"

[[profiles.{name}.sinks]]
type = "file"
path = "{directory}/{name}/token"
"""
        )
    path = directory / "agent.toml"
    path.write_text("\n".join(parts))
    return path


def two_env() -> dict[str, str]:
    env = agent_env()
    env.pop("DVS_CLIENT_ID")
    env.pop("DVS_CLIENT_SECRET")
    env.update(
        {
            "HEALTHY_ID": HEALTHY,
            "HEALTHY_SECRET": HEALTHY_SECRET,
            "STUCK_ID": STUCK,
            "STUCK_SECRET": STUCK_SECRET,
        }
    )
    return env


@dataclass
class Freshness:
    """Reads a token file every 50 ms; the longest time it held a token the server had expired
    (or, after its first token, held none)."""

    path: Path
    server: TokenServer
    worst: float = 0.0
    seen: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _stale_since: float | None = None

    def start(self) -> Freshness:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            try:
                token = self.path.read_text()
            except OSError:
                token = ""
            issued = self.server.issued().get(token)
            now = time.time()
            if issued is not None:
                self.seen.add(token)
            fresh = issued is not None and now < issued.expires_at
            if fresh or not self.seen:
                self._stale_since = None
                continue
            if self._stale_since is None:
                self._stale_since = issued.expires_at if issued is not None else now
            self.worst = max(self.worst, now - self._stale_since)

    def stop(self) -> float:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(5)
        return self.worst


NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def nobody_dir(shared_dir: Path) -> Path:
    """A directory uid 65534 owns (the agent runs as that user)."""
    if os.geteuid() == 0:
        os.chown(shared_dir, NOBODY, NOBODY)
    return shared_dir


@pytest.fixture
def short_server() -> Iterator[TokenServer]:
    with TokenServer(clients={HEALTHY: HEALTHY_SECRET, STUCK: STUCK_SECRET}, expires_in=4) as srv:
        yield srv


STUCK_FAULTS = {
    "hang": Fault.hang,
    "trickle-headers": lambda: Fault.trickle(interval=0.5, headers=True),
    "trickle-body": lambda: Fault.trickle(interval=0.5),
}


@pytest.mark.parametrize(
    ("fault", "when"),
    [("hang", "start"), ("trickle-headers", "start"), ("trickle-body", "later"), ("hang", "later")],
)
def test_a_stuck_profile_never_delays_another(
    tmp_path: Path, spawn: Spawn, short_server: TokenServer, fault: str, when: str
) -> None:
    """One profile's endpoint hangs or trickles; the other keeps its 4 s tokens fresh."""
    server = short_server
    stuck = [STUCK_FAULTS[fault]() for _ in range(200)]
    if when == "start":
        server.enqueue(*stuck, client_id=STUCK)
    port = free_port()
    agent = spawn(two_profiles(tmp_path, server.url, health_port=port), two_env())
    watch = Freshness(tmp_path / "healthy" / "token", server).start()
    assert wait_for(lambda: watch.seen, timeout=20), agent.output()
    if when == "later":
        assert wait_for(lambda: (tmp_path / "stuck" / "token").exists(), timeout=20)
        server.enqueue(*stuck, client_id=STUCK)
    before = len(server.token_requests(client_id=HEALTHY))
    time.sleep(14)
    worst = watch.stop()
    refreshed = len(server.token_requests(client_id=HEALTHY)) - before
    assert worst <= 1.5, f"the healthy token file held an expired token for {worst:.1f}s"
    assert refreshed >= 4, refreshed  # about one every 2 s
    # the stuck profile is being tried (not frozen), and says so
    assert len(server.token_requests(client_id=STUCK)) >= 2
    body = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
    assert body["profiles"]["healthy"]["ready"] is True
    assert body["profiles"]["stuck"]["state"] in ("starting", "expired", "degraded")
    assert agent.stop() == 0


def test_sighup_and_refresh_reach_a_profile_after_its_stuck_exchange(
    tmp_path: Path, spawn: Spawn, short_server: TokenServer
) -> None:
    """A hanging exchange ends at request_timeout; a SIGHUP sent meanwhile then runs."""
    server = short_server
    port = free_port()
    agent = spawn(two_profiles(tmp_path, server.url, health_port=port), two_env())
    assert wait_for(lambda: (tmp_path / "stuck" / "token").exists(), timeout=20)
    server.enqueue(Fault.hang(), client_id=STUCK)
    assert server.wait_for_requests(1, timeout=10, client_id=STUCK)
    count = len(server.token_requests(client_id=STUCK))
    assert wait_for(
        lambda: any(r.status == 0 for r in server.token_requests(client_id=STUCK)), timeout=10
    )
    agent.signal(signal.SIGHUP)
    # the hanging request is cut at 3 s, then the retry (or the SIGHUP's re-auth) gets a token
    assert wait_for(
        lambda: any(r.status == 200 for r in server.token_requests(client_id=STUCK)[count:]),
        timeout=15,
    ), agent.output()
    assert agent.stop() == 0


def test_a_sighup_burst_costs_at_most_one_request_and_an_early_sighup_is_not_fatal(
    tmp_path: Path, spawn: Spawn, short_server: TokenServer
) -> None:
    server = short_server
    server.expires_in = 3600
    port = free_port()
    config = two_profiles(tmp_path, server.url, health_port=port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "-c", str(config)],
        env=two_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        # SIGHUPs from the agent's first line on (SIGHUP blocked), while it still imports
        # what takes time (the interpreter's own start before that, ~20-40 ms, runs no code
        # of ours; systemd sends no reload before READY=1)
        assert wait_for(lambda: _sighup_blocked(proc.pid), timeout=10, step=0.001)
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.005)
        assert proc.poll() is None, "a SIGHUP while starting killed the agent"
        assert wait_for(lambda: (tmp_path / "healthy" / "token").exists(), timeout=20)
        time.sleep(1)
        before = len(server.token_requests())
        for _ in range(200):
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        time.sleep(2)
        after = len(server.token_requests())
        # two profiles: at most one re-auth each for the whole burst (tokens < 10 s old: none)
        assert after - before <= 2, after - before
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()[-2000:]


def _sighup_blocked(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    blocked = next(line for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(int(blocked.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def test_a_full_file_sink_makes_the_profile_not_ready_once_its_token_expired(
    tmp_path: Path, nobody_dir: Path, short_server: TokenServer
) -> None:
    """The agent (uid 65534) cannot replace its token file any more: /readyz follows the file."""
    server = short_server
    port = free_port()
    config = two_profiles(nobody_dir, server.url, health_port=port)
    os.chmod(config, 0o644)
    out = tmp_path / "agent.log"
    with open(out, "wb") as log:
        proc = subprocess.Popen(
            [*SETPRIV, sys.executable, "-m", "agent", "run", "-c", str(config)],
            env=two_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        token_dir = nobody_dir / "healthy"
        assert wait_for(lambda: (token_dir / "token").exists(), timeout=20), out.read_text()
        url = f"http://127.0.0.1:{port}/readyz/healthy"
        assert wait_for(lambda: httpx.get(url, timeout=5).status_code == 200)
        os.chmod(token_dir, 0o555)  # noqa: S103 - the agent can no longer write the directory
        held = (token_dir / "token").read_text()
        expires = server.issued()[held].expires_at
        # while the file's token is valid: degraded but ready; once it expired: 503, expired
        assert wait_for(lambda: httpx.get(url, timeout=5).status_code == 503, timeout=15)
        assert time.time() >= expires - 0.5
        body = httpx.get(url, timeout=5).json()["profiles"]["healthy"]
        assert body["state"] == "expired", body
        assert "not written" in (body["last_error"] or ""), body
        os.chmod(token_dir, 0o755)  # noqa: S103 - fixed: the next retry writes it
        assert wait_for(lambda: httpx.get(url, timeout=5).status_code == 200, timeout=40)
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_check_of_a_sink_never_removes_this_process_temp_files(tmp_path: Path) -> None:
    """A reload checks a rebuilt sink while another profile's write may be in flight."""

    sink = file_sink(tmp_path / "token")
    sink.check()
    ours = tmp_path / f".token.dvs-agent.{os.getpid() & 0xFFFFFFFF:08x}00c0ffee.tmp"
    stale = tmp_path / ".token.dvs-agent.7fffffffdeadbeef.tmp"  # no such pid: a kill -9's
    ours.write_text("in flight")
    stale.write_text("left by a kill -9")
    sink.check()
    assert ours.exists() and not stale.exists()


def test_hooks_and_proc_cannot_read_the_agents_environment(
    nobody_dir: Path, short_server: TokenServer
) -> None:
    """The agent is non-dumpable: its /proc/PID/environ is closed to its own uid's processes."""
    server = short_server
    port = free_port()
    config = two_profiles(nobody_dir, server.url, health_port=port)
    os.chmod(config, 0o644)
    proc = subprocess.Popen(
        [*SETPRIV, sys.executable, "-m", "agent", "run", "-c", str(config)],
        env=two_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        assert wait_for(lambda: (nobody_dir / "healthy" / "token").exists(), timeout=20)
        probe = subprocess.run(
            [*SETPRIV, "cat", f"/proc/{proc.pid}/environ"],
            capture_output=True,
            check=False,
        )
        assert probe.returncode != 0
        assert HEALTHY_SECRET.encode() not in probe.stdout
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert "Uid:\t65534" in status  # the probe was the agent's own uid
    finally:
        proc.terminate()
        proc.wait(15)


def _readyz(port: int) -> dict[str, object]:
    response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    document: dict[str, object] = response.json()
    document["status"] = response.status_code
    return document


def test_readyz_and_status_never_show_an_echoed_secret_or_raw_controls(
    tmp_path: Path, spawn: Spawn, short_server: TokenServer
) -> None:
    server = short_server
    port = free_port()
    agent = spawn(two_profiles(tmp_path, server.url, health_port=port), two_env())
    assert wait_for(lambda: (tmp_path / "stuck" / "token").exists(), timeout=20)
    held = (tmp_path / "stuck" / "token").read_text()
    server.enqueue(*[Fault.echo(status=500, token=held) for _ in range(40)], client_id=STUCK)
    assert wait_for(lambda: "answered 500" in json.dumps(_readyz(port)), timeout=20)
    status = subprocess.run(
        [sys.executable, "-m", "agent", "status", "-c", str(tmp_path / "agent.toml")],
        capture_output=True,
        text=True,
        env=two_env(),
        cwd=REPO,
        check=False,
    )
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for where, text in (
        ("readyz", json.dumps(_readyz(port))),
        ("status", status.stdout + status.stderr),
        ("metrics", metrics),
        ("log", agent.output()),
    ):
        for secret in (STUCK_SECRET, held, HEALTHY_SECRET):
            assert secret not in text, where
        assert "\x1b" not in text and "\\u001b[2J" not in text.replace("\\\\", "\\"), where
    assert "[REDACTED]" in status.stdout
    assert "\\x1b" in status.stdout  # escaped, visible
    assert agent.stop() == 0


@pytest.mark.parametrize("retry_after", ["1000000000000000", "86400000"])
def test_once_with_a_huge_retry_after_exits_69_naming_a_clamped_wait(
    tmp_path: Path, retry_after: str
) -> None:
    from tests.conftest import CLIENT_ID, CLIENT_SECRET, run_cli, write_config

    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        server.enqueue(Fault.http_status(429, retry_after=retry_after))
        result = run_cli("once", "-c", str(write_config(tmp_path, server.url)))
    assert result.returncode == 69, result.stderr
    assert "Traceback" not in result.stderr
    assert "asks to wait 300s" in result.stderr


def test_ready_is_sent_at_request_timeout_plus_5s_while_a_first_attempt_hangs(
    tmp_path: Path, spawn: Spawn, short_server: TokenServer
) -> None:
    import socket

    server = short_server
    server.expires_in = 3600
    server.enqueue(*[Fault.hang() for _ in range(10)], client_id=STUCK)
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(30)
    try:
        env = two_env()
        env["NOTIFY_SOCKET"] = address
        started = time.monotonic()
        config = two_profiles(tmp_path, server.url, health_port=free_port(), stuck_timeout="4s")
        agent = spawn(config, env)
        message = sock.recv(4096).decode()
        waited = time.monotonic() - started
        assert "READY=1" in message
        assert "stuck: starting" in message  # STATUS= names the one still trying
        assert (tmp_path / "healthy" / "token").exists()
        assert 4 + 5 - 1 <= waited <= 4 + 5 + 10, waited  # request_timeout + 5 s
        assert agent.stop() == 0
    finally:
        sock.close()
