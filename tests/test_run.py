"""`dvs-agent run` as a real process: schedule, rotation triggers, signals, restarts."""

from __future__ import annotations

import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.devserver import Fault, TokenServer
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    REPO,
    Spawn,
    agent_env,
    threads_taking_signals,
    wait_for,
    write_config,
)
from tests.servers import free_port


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _file_env(tmp_path: Path, secret: str = CLIENT_SECRET) -> tuple[Path, dict[str, str]]:
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(secret)
    env = agent_env(DVS_CLIENT_SECRET_FILE=str(secret_file))
    del env["DVS_CLIENT_SECRET"]
    return secret_file, env


def test_short_tokens_refresh_without_a_request_storm(tmp_path: Path, spawn: Spawn) -> None:
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=1) as server:
        agent = spawn(write_config(tmp_path, server.url))
        assert server.wait_for_requests(1, timeout=15)
        time.sleep(5)
        count = len(server.token_requests())
        # one request per second at most (lifetime 1 s, never sooner than 1 s after obtaining)
        assert 2 <= count <= 9, count
        assert agent.stop() == 0


def test_refreshes_before_expiry_and_keeps_files_fresh(tmp_path: Path, spawn: Spawn) -> None:
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=3) as server:
        agent = spawn(write_config(tmp_path, server.url))
        assert server.wait_for_requests(3, timeout=20)
        token = tmp_path / "token"
        assert wait_for(lambda: _read(token) in server.issued())
        issued = server.issued()[_read(token) or ""]
        assert issued.expires_at > time.time()
        assert agent.stop() == 0
        assert token.exists()  # left in place on exit


def test_sigterm_stops_within_5s_even_mid_request(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    server.enqueue(Fault.slow(60))
    agent = spawn(write_config(tmp_path, server.url, extra_profile='request_timeout = "60s"'))
    assert server.wait_for_requests(1, timeout=15)
    time.sleep(0.3)
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5.5


def test_restart_within_token_life_sends_no_request(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    config = write_config(tmp_path, server.url)
    first = spawn(config)
    assert wait_for(lambda: _read(tmp_path / "token") in server.issued())
    assert first.stop() == 0
    second = spawn(config)
    assert wait_for(lambda: "dvs-agent running" in second.output())
    assert wait_for(lambda: "reusing the recorded token" in second.output())
    time.sleep(1)
    assert len(server.token_requests()) == 1
    assert second.stop() == 0


def test_sighup_rereads_credentials_and_reauths_now(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    secret_file, env = _file_env(tmp_path)
    agent = spawn(write_config(tmp_path, server.url, poll="0"), env)
    token = tmp_path / "token"
    assert wait_for(lambda: _read(token) in server.issued())
    before = _read(token)
    server.set_secret(CLIENT_ID, "rotated-1")
    secret_file.write_text("rotated-1\n")
    agent.signal(signal.SIGHUP)
    assert wait_for(lambda: _read(token) not in (before, None), timeout=10), agent.output()
    assert server.issued()[_read(token) or ""].client_secret == "rotated-1"
    assert agent.stop() == 0


def test_polled_rotation_reauths_within_poll_interval(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    secret_file, env = _file_env(tmp_path)
    agent = spawn(write_config(tmp_path, server.url, poll="1s"), env)
    token = tmp_path / "token"
    assert wait_for(lambda: _read(token) in server.issued())
    server.set_secret(CLIENT_ID, "rotated-2")
    secret_file.write_text("rotated-2")
    written = time.monotonic()
    assert wait_for(
        lambda: (
            (t := _read(token)) in server.issued()
            and server.issued()[t or ""].client_secret == "rotated-2"
        ),
        timeout=10,
    ), agent.output()
    # generous: poll interval 1 s + 1 s, on a shared machine x3
    assert time.monotonic() - written < 6
    assert "rotation detected" in agent.output()
    assert agent.stop() == 0


def test_credentials_straight_from_the_environment_are_not_polled(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    """A process's environment does not change under it: polling it would be a busy loop."""
    agent = spawn(write_config(tmp_path, server.url, poll="1s"))  # DVS_CLIENT_SECRET itself
    assert wait_for(lambda: '"event":"polling_off"' in agent.output()), agent.output()
    assert "DVS_CLIENT_SECRET_FILE" in agent.output()  # says how to rotate without a restart
    assert agent.stop() == 0
    _, env = _file_env(tmp_path)  # from a file: polled (see the rotation test above)
    agent = spawn(write_config(tmp_path, server.url, poll="1s"), env)
    assert wait_for(lambda: '"event":"started"' in agent.output()), agent.output()
    assert '"event":"polling_off"' not in agent.output()
    assert agent.stop() == 0


def test_bad_rotation_keeps_token_and_recovers(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    secret_file, env = _file_env(tmp_path)
    agent = spawn(write_config(tmp_path, server.url, poll="1s"), env)
    token = tmp_path / "token"
    assert wait_for(lambda: _read(token) in server.issued())
    good = _read(token)
    mtime = token.stat().st_mtime_ns
    secret_file.write_text("not-the-secret")  # ops rotated the store to a wrong value
    assert wait_for(lambda: "401" in agent.output(), timeout=10)
    count = len(server.token_requests())
    time.sleep(4)
    # slow backoff after a 401: no hammering (at most one more attempt in 4 s)
    assert len(server.token_requests()) - count <= 1
    assert _read(token) == good and token.stat().st_mtime_ns == mtime
    assert "keeping the current token" in agent.output()
    assert "not-the-secret" not in agent.output()
    secret_file.write_text(CLIENT_SECRET)  # fixed in the store
    assert wait_for(lambda: _read(token) not in (good, None), timeout=10), agent.output()
    assert agent.stop() == 0


def test_spring_style_same_token_is_not_rewritten(tmp_path: Path, spawn: Spawn) -> None:
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=4, reuse_tokens=True) as server:
        marker = tmp_path / "changes"
        sinks = f"""
[[profiles.dvs.sinks]]
type = "file"
path = "{tmp_path}/token"
on_change = ["sh", "-c", "echo x >> {marker}"]
"""
        agent = spawn(write_config(tmp_path, server.url, sinks=sinks))
        token = tmp_path / "token"
        assert wait_for(lambda: _read(token) in server.issued())
        first = _read(token) or ""
        expires_at = server.issued()[first].expires_at
        # the agent asks early (half-life), gets the same token back, leaves the file alone,
        # then asks again at the expiry and gets a new one within about a second
        assert wait_for(lambda: _read(token) not in (first, None), timeout=15), agent.output()
        switched = time.time()
        assert switched - expires_at < 2.5
        assert len(server.token_requests()) >= 3  # start, early (same token), at expiry
        assert "already held" in agent.output()
        assert wait_for(lambda: marker.exists() and len(marker.read_text().split()) == 2)
        assert agent.stop() == 0


def test_invalid_config_on_sighup_keeps_running(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    config = write_config(tmp_path, server.url)
    agent = spawn(config)
    assert wait_for(lambda: _read(tmp_path / "token") in server.issued())
    config.write_text(config.read_text() + "\n[agent2]\n")
    agent.signal(signal.SIGHUP)
    assert wait_for(lambda: "keeping the running one" in agent.output(), timeout=10)
    assert agent.proc is not None and agent.proc.poll() is None
    assert agent.stop() == 0


def test_sd_notify_ready_after_first_token(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(15)
    try:
        agent = spawn(write_config(tmp_path, server.url), agent_env(NOTIFY_SOCKET=address))
        message = sock.recv(4096).decode()
        assert "READY=1" in message
        assert "STATUS=all profiles ok" in message
        assert (tmp_path / "token").exists()
        assert agent.stop() == 0
        assert "STOPPING=1" in sock.recv(4096).decode()
    finally:
        sock.close()


def test_sd_notify_status_says_expired_when_the_token_runs_out(tmp_path: Path) -> None:
    """No health query involved: a timer at the token's expiry updates the state and STATUS=."""
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    env = agent_env(NOTIFY_SOCKET=address)
    try:
        with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=3) as server:
            config = write_config(
                tmp_path, server.url, poll="0", extra_profile='request_timeout = "30s"'
            )
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=REPO,
            )
            try:
                assert "READY=1" in sock.recv(4096).decode()
                # the refresh hangs across the expiry: no outcome tells the agent it expired
                server.enqueue(*[Fault.slow(20)] * 5)
                messages = []
                while not any("expired" in m for m in messages):
                    messages.append(sock.recv(4096).decode())
                late = time.time() - max(t.expires_at for t in server.issued().values())
                assert late < 3, (late, messages)  # at the expiry, not at a later poll
                assert any(m.startswith("STATUS=not ok: dvs: expired") for m in messages)
            finally:
                proc.terminate()
                assert proc.wait(10) == 0
    finally:
        sock.close()


def test_first_token_does_not_wait_for_the_scheduler(server: TokenServer, tmp_path: Path) -> None:
    """exec -> first file is the path ops wait on: APScheduler is imported after it."""
    server.enqueue(Fault.slow(1.5))  # the first token request is answered after 1.5 s
    config = write_config(tmp_path, server.url)
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "agent", "run", "-c", str(config)],
            env=agent_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        assert server.wait_for_requests(1, timeout=15)
        imported = re.compile(r"^import time:.*\|\s+apscheduler$", re.MULTILINE)
        assert not imported.search(log.read_text())  # the request is in flight
        assert wait_for(lambda: (tmp_path / "token").exists())
        assert wait_for(lambda: imported.search(log.read_text()) is not None)  # then the schedule
        assert wait_for(lambda: '"event":"started"' in log.read_text())
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_only_the_main_thread_takes_signals(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    """A SIGTERM taken by a worker thread would not wake the main thread: the stop would hang."""
    port = free_port()
    health = f'\n[health]\nlisten = "127.0.0.1:{port}"\n'
    agent = spawn(write_config(tmp_path, server.url, agent=health, poll="1s"))
    assert agent.proc is not None
    pid = agent.proc.pid
    assert wait_for(lambda: (tmp_path / "token").exists())
    time.sleep(2.5)  # polls have run on the scheduler's pool
    tids = sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())
    assert len(tids) >= 3, tids  # main, the scheduler, the health listener (and pool workers)
    assert threads_taking_signals(pid) == [pid]  # only the main thread
    for _ in range(5):  # and they work: reloads, then a stop
        agent.signal(signal.SIGHUP)
    assert agent.stop() == 0


def test_kill_9_at_random_moments_never_leaves_a_partial_token(
    tmp_path: Path, spawn: Spawn
) -> None:
    """An agent refreshing every second is SIGKILLed and restarted many times; every read of
    the token file is a complete token the server issued."""
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=2) as server:
        config = write_config(tmp_path, server.url, log_level="warning")
        token = tmp_path / "token"
        bad: list[str] = []
        reads = 0
        stop = threading.Event()

        def reader() -> None:
            nonlocal reads
            while not stop.is_set():
                content = _read(token)
                if content is None:
                    continue
                reads += 1
                if content not in server.issued():
                    bad.append(repr(content[:80]))

        agent = spawn(config)
        assert wait_for(lambda: token.exists(), timeout=15)
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        rng = random.Random(1234)
        try:
            for _ in range(20):
                time.sleep(rng.uniform(0.2, 1.5))
                agent.kill()
                agent = spawn(config)
        finally:
            time.sleep(1)
            stop.set()
            thread.join(5)
        assert agent.stop() == 0
        assert not bad, bad[:5]
        assert reads > 100
        assert len(server.issued()) >= 5
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == [] or all(".dvs-agent." in name for name in leftovers)


def test_unwritable_sink_at_start_exits_73(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sinks = f"""
[[profiles.dvs.sinks]]
type = "file"
path = "{blocker}/token"
"""
    agent = spawn(write_config(tmp_path, server.url, sinks=sinks))
    assert agent.proc is not None
    assert agent.proc.wait(15) == 73
    assert str(blocker) in agent.output()
