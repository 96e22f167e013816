"""on_change runs beside the refresh, not in it (DESIGN §10), with real processes.

Each hook is a small shell script written by the test. Deadlines are generous and nothing
asserts speed: a hook that would block ``write()`` sleeps far longer than any deadline here,
so a blocked ``write()`` shows as a hook that is no longer running, not as a slow test.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.devserver import TokenServer
from agent.hooks import STDERR_KEPT, HookRunner, last_line
from agent.masking import MASK
from agent.models import Token
from agent.signals import SIGNALS
from agent.sinks.file import FileSink
from tests.conftest import Spawn, file_sink, hour_token, wait_for, write_config

#: the bits of SIGHUP, SIGTERM and SIGINT in a /proc status mask
SIGNAL_BITS = sum(1 << (s - 1) for s in SIGNALS)
#: signals 1-31; glibc's posix_spawn leaves its internal 32 and 33 ignored in the child
STANDARD_SIGNAL_BITS = (1 << 31) - 1


def make_token(value: str) -> Token:
    return hour_token(value, scope="read")


def script(directory: Path, name: str, body: str) -> str:
    """An executable ``/bin/sh`` script; its path."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its new parent to reap it counts)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def pid_in(path: Path) -> int:
    assert wait_for(lambda: path.exists() and path.read_text().strip(), timeout=30), path
    return int(path.read_text().split()[-1])


def mask_of(status: str, field: str) -> int:
    line = next(line for line in status.splitlines() if line.startswith(field + ":"))
    return int(line.split()[1], 16)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


@pytest.fixture
def sinks() -> Iterator[list[FileSink]]:
    """Sinks the test made: closed at the end, so that no hook outlives its test."""
    made: list[FileSink] = []
    yield made
    for sink in made:
        sink.close()


def test_write_returns_at_once_while_a_hook_hangs(
    tmp_path: Path, sinks: list[FileSink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    leader = tmp_path / "leader"
    hook = script(tmp_path, "hang", f'echo $$ >> "{leader}"\nexec sleep 1000\n')
    path = tmp_path / "token"
    sink = file_sink(path, on_change=[hook], on_change_timeout=60)
    sinks.append(sink)
    sink.write(make_token("tok-first"))
    pid = pid_in(leader)
    # write() returned while the hook runs (it would have waited 60 s for it before)
    assert not gone(pid)
    sink.write(make_token("tok-second"))  # a refresh during the hanging hook is not blocked
    assert path.read_text() == "tok-second"
    assert not gone(pid)
    assert leader.read_text().split() == [str(pid)]  # one run at a time: the next one waits
    # the hook's thread (started from this, the main thread) does not take the daemon's signals
    [thread] = [t for t in threading.enumerate() if t.name == f"on_change {path}"]
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    assert mask_of(status, "SigBlk") & SIGNAL_BITS == SIGNAL_BITS
    sink.close()
    assert wait_for(lambda: gone(pid), timeout=10)
    assert sink.settle(30)
    assert leader.read_text().split() == [str(pid)]  # the pending run was dropped at close


def test_a_background_child_holding_stderr_does_not_delay_the_next_run(
    tmp_path: Path, sinks: list[FileSink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    children = tmp_path / "children"
    hook = script(
        tmp_path,
        "background",
        f'sleep 1000 &\necho $! >> "{children}"\necho "reload queued" >&2\nexit 3\n',
    )
    sink = file_sink(tmp_path / "token", on_change=[hook], on_change_timeout=60)
    sinks.append(sink)
    try:
        for n in range(2):
            sink.write(make_token(f"tok-{n}"))
            # reported long before the 60 s timeout, though `sleep 1000` still holds stderr
            assert sink.settle(20)
            assert len(messages(caplog, logging.WARNING)) == n + 1
        for message in messages(caplog, logging.WARNING):
            assert message.endswith(f"{hook} failed with exit code 3: reload queued")
        pids = [int(pid) for pid in children.read_text().split()]
        assert len(pids) == 2
        assert not any(gone(pid) for pid in pids)  # they held stderr all along
    finally:
        if children.exists():
            for pid in children.read_text().split():
                os.kill(int(pid), signal.SIGKILL)


def test_newer_tokens_during_a_run_coalesce_into_one_more_run_with_the_newest(
    tmp_path: Path, sinks: list[FileSink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runs = tmp_path / "runs"
    release = tmp_path / "release"
    hook = script(
        tmp_path,
        "slow",
        f'cat "$DVS_TOKEN_FILE" >> "{runs}"\necho >> "{runs}"\n'
        f'while [ ! -e "{release}" ]; do sleep 0.05; done\n',
    )
    sink = file_sink(tmp_path / "token", on_change=[hook], on_change_timeout=60)
    sinks.append(sink)
    sink.write(make_token("tok-0"))
    assert wait_for(lambda: runs.exists() and runs.read_text().split() == ["tok-0"], timeout=30)
    for n in range(1, 6):
        sink.write(make_token(f"tok-{n}"))
    release.touch()
    assert sink.settle(30)
    assert runs.read_text().split() == ["tok-0", "tok-5"]
    assert len(messages(caplog, logging.INFO)) == 2
    assert all("succeeded" in m for m in messages(caplog, logging.INFO))
    assert messages(caplog, logging.WARNING) == []


def test_the_newest_token_always_gets_a_run(
    tmp_path: Path, sinks: list[FileSink], caplog: pytest.LogCaptureFixture
) -> None:
    # writes racing with runs that end: a token written as a run ends is never left unrun
    caplog.set_level(logging.DEBUG)
    runs = tmp_path / "runs"
    hook = script(tmp_path, "fast", f'cat "$DVS_TOKEN_FILE" >> "{runs}"\necho >> "{runs}"\n')
    sink = file_sink(tmp_path / "token", on_change=[hook])
    sinks.append(sink)
    for n in range(40):
        sink.write(make_token(f"tok-{n}"))
        time.sleep(0.002 * (n % 7))
    assert sink.settle(60)
    seen = runs.read_text().split()
    assert seen[-1] == "tok-39"
    numbers = [int(t.split("-")[1]) for t in seen]
    assert numbers == sorted(numbers)  # each run reads the file as it is then: never older
    assert messages(caplog, logging.WARNING) == []


def test_timeout_kills_the_whole_group(
    tmp_path: Path, sinks: list[FileSink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    leader, child = tmp_path / "leader", tmp_path / "child"
    hook = script(
        tmp_path,
        "stuck",
        f'sleep 1000 &\necho $! > "{child}"\necho $$ > "{leader}"\nwait\n',
    )
    sink = file_sink(tmp_path / "token", on_change=[hook], on_change_timeout=1)
    sinks.append(sink)
    sink.write(make_token("tok-1"))
    leader_pid, child_pid = pid_in(leader), pid_in(child)
    assert sink.settle(30)
    [message] = messages(caplog, logging.WARNING)
    assert f"{hook} timed out after 1s and was killed (exit code {-signal.SIGKILL})" in message
    assert wait_for(lambda: gone(leader_pid) and gone(child_pid), timeout=10)


def test_close_kills_a_running_group_and_later_writes_run_nothing(
    tmp_path: Path, sinks: list[FileSink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    leader, child = tmp_path / "leader", tmp_path / "child"
    hook = script(
        tmp_path,
        "stuck",
        f'sleep 1000 &\necho $! >> "{child}"\necho $$ >> "{leader}"\nwait\n',
    )
    path = tmp_path / "token"
    sink = file_sink(path, on_change=[hook], on_change_timeout=60)
    sinks.append(sink)
    sink.write(make_token("tok-1"))
    leader_pid, child_pid = pid_in(leader), pid_in(child)
    sink.close()
    sink.close()  # idempotent
    assert wait_for(lambda: gone(leader_pid) and gone(child_pid), timeout=10)
    assert sink.settle(30)
    [message] = messages(caplog, logging.WARNING)
    assert f"{hook} was killed as the agent stops (exit code {-signal.SIGKILL})" in message
    sink.write(make_token("tok-2"))  # the file is still written; the hook is not run
    assert path.read_text() == "tok-2"
    assert sink.settle(0)  # nothing runs, nothing is pending
    assert leader.read_text().split() == [str(leader_pid)]


def test_stop_is_immediate_idempotent_and_final(tmp_path: Path) -> None:
    leader = tmp_path / "leader"
    hook = script(tmp_path, "hang", f'echo $$ >> "{leader}"\nexec sleep 1000\n')
    runner = HookRunner([hook], timeout=60, env={}, label="test")
    runner.submit(["tok-1"])
    pid = pid_in(leader)
    runner.submit(["tok-2"])  # pending
    stopper = threading.Thread(target=runner.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive()  # stop() does not wait for the hook to end
    runner.stop()
    assert wait_for(lambda: gone(pid), timeout=10)
    assert runner.wait(30)
    runner.submit(["tok-3"])
    assert not runner.busy
    assert leader.read_text().split() == [str(pid)]


def test_the_environment_is_an_allowlist(
    tmp_path: Path,
    sinks: list[FileSink],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name, value in {
        "DVS_CLIENT_SECRET": "the-client-secret",
        "DVS_CLIENT_ID": "svc-client",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "CREDENTIALS_DIRECTORY": "/run/credentials/dvs-agent.service",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "SOMETHING_ELSE": "1",
        "TZ": "UTC",
        "LC_TIME": "C",
        "HOME": "/home/someone",
        "USER": "someone",
    }.items():
        monkeypatch.setenv(name, value)
    dump = tmp_path / "env.json"
    hook = [
        sys.executable,
        "-c",
        "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))",
        str(dump),
    ]
    monkeypatch.chdir(tmp_path)
    sink = file_sink(Path("token"), on_change=hook, profile="dvs")
    sinks.append(sink)
    sink.write(make_token("tok-1"))
    assert sink.settle(30)
    assert messages(caplog, logging.WARNING) == []
    env = json.loads(dump.read_text())
    allowed = {"PATH", "LANG", "TZ", "HOME", "USER", "DVS_PROFILE", "DVS_TOKEN_FILE"}
    assert {name for name in env if not name.startswith("LC_")} <= allowed
    assert env["DVS_PROFILE"] == "dvs"
    assert env["DVS_TOKEN_FILE"] == str(tmp_path / "token")  # absolute
    assert env["PATH"] == os.environ["PATH"]
    assert (env["TZ"], env["LC_TIME"], env["HOME"], env["USER"]) == (
        "UTC",
        "C",
        "/home/someone",
        "someone",
    )
    for name in ("DVS_CLIENT_SECRET", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY", "SOMETHING_ELSE"):
        assert name not in env
    assert "the-client-secret" not in dump.read_text()


def test_the_hook_starts_with_an_empty_signal_mask_and_default_dispositions(
    tmp_path: Path, sinks: list[FileSink]
) -> None:
    status = tmp_path / "status"
    sink = file_sink(tmp_path / "token", on_change=["cp", "/proc/self/status", str(status)])
    sinks.append(sink)
    seen: list[int] = []

    def write_like_a_daemon_thread() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        seen.append(mask_of(Path("/proc/thread-self/status").read_text(), "SigBlk"))
        sink.write(make_token("tok-1"))

    thread = threading.Thread(target=write_like_a_daemon_thread)
    thread.start()
    thread.join(30)
    assert seen and seen[0] & SIGNAL_BITS == SIGNAL_BITS  # the writer did block them
    assert sink.settle(30)
    text = status.read_text()
    assert mask_of(text, "SigBlk") == 0
    # Python ignores SIGPIPE and SIGXFSZ; the hook gets them (and every other) at default
    assert mask_of(text, "SigIgn") & STANDARD_SIGNAL_BITS == 0


def test_stderr_is_masked_cut_and_escaped(
    tmp_path: Path, sinks: list[FileSink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "tok-" + "Zq8" * 14
    hook = script(
        tmp_path,
        "noisy",
        "printf 'first line\\n' >&2\n"
        'token="$(cat "$DVS_TOKEN_FILE")"\n'
        "printf 'bad \\033[31m%s\\033[0m\\r%0300d\\n\\n  \\n' \"$token\" 0 >&2\n"
        "exit 4\n",
    )
    path = tmp_path / "token"
    sink = file_sink(path, on_change=[hook])
    sinks.append(sink)
    sink.write(make_token(secret))
    assert sink.settle(30)
    assert path.read_text() == secret
    [message] = messages(caplog, logging.WARNING)
    prefix = f"on_change for {path}: {hook} failed with exit code 4: "
    assert message.startswith(prefix)
    tail = message[len(prefix) :]
    assert tail.startswith(f"bad \\x1b[31m{MASK}\\x1b[0m\\r000")
    assert "\x1b" not in message and "\r" not in message
    assert tail.endswith("…")
    # cut to 200 characters (then escaped: each escape is longer than its character)
    assert len(tail.replace("\\x1b", "\x1b").replace("\\r", "\r")) == 201
    assert secret not in caplog.text
    assert "first line" not in caplog.text


def test_stderr_is_read_bounded_and_its_last_line_shown(
    tmp_path: Path, sinks: list[FileSink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    code = "import sys; sys.stderr.write('x' * 1000000 + '\\nthe last words\\n'); sys.exit(1)"
    sink = file_sink(tmp_path / "token", on_change=[sys.executable, "-c", code])
    sinks.append(sink)
    sink.write(make_token("tok-1"))
    assert sink.settle(30)
    [message] = messages(caplog, logging.WARNING)
    assert message.endswith("failed with exit code 1: the last words")


def test_last_line_never_shows_the_partial_first_line_of_a_cut_stderr() -> None:
    secret = "tok-abcdefghijklmnop"
    # the kept bytes begin inside the secret: its tail would not be recognised as the secret
    kept = (f"bad {secret}\n" + "y" * (STDERR_KEPT - 30) + "\nlast\n").encode()[-STDERR_KEPT:]
    assert last_line(kept, truncated=True, secrets=[secret]) == "last"
    assert last_line(b"mnop no newline", truncated=True) == "(stderr line too long to show)"
    assert last_line(b"", secrets=[secret]) == "(no stderr)"
    assert last_line(f"ok\r\nsaw {secret}\r\n".encode(), secrets=[secret]) == f"saw {MASK}"


# -- the agent as a process -------------------------------------------------------------------


def test_a_hanging_hook_never_leaves_an_expired_token_and_dies_with_the_agent(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    server.expires_in = 2
    pids = tmp_path / "hook-pids"
    hook = script(tmp_path, "hang", f'echo $$ >> "{pids}"\nexec sleep 1000\n')
    token = tmp_path / "token"
    sinks = f"""
[[profiles.dvs.sinks]]
type = "file"
path = "{token}"
on_change = ["{hook}"]
on_change_timeout = "60s"
"""
    agent = spawn(write_config(tmp_path, server.url, sinks=sinks))

    def read() -> str | None:
        try:
            return token.read_text()
        except FileNotFoundError:
            return None

    assert wait_for(lambda: read() in server.issued(), timeout=30), agent.output()
    pid_in(pids)
    worst = 0.0
    seen: set[str] = set()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        value, now = read(), time.time()
        issued = server.issued().get(value or "")
        assert issued is not None, value
        seen.add(issued.access_token)
        worst = max(worst, now - issued.expires_at)
        time.sleep(0.05)
    assert worst < 1.0, (worst, agent.output()[-3000:])
    assert len(seen) >= 4  # the refreshes went on while the hook hung
    [pid] = [int(p) for p in pids.read_text().split()]  # one run at a time: still the first
    assert not gone(pid)
    assert agent.stop() == 0
    assert wait_for(lambda: gone(pid), timeout=5), agent.output()[-3000:]
    assert stat.S_ISREG(token.stat().st_mode)  # the token file is left in place
