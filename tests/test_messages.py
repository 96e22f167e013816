"""What the agent tells ops (issue 14, item 5): every error once, no retry promised by a command
that exits, permission hints that name the existing directory, 75 for a refused `refresh`, log
settings that a SIGHUP applies and that the command line overrides. Real processes throughout;
the permission tests drop to uid 65534 with ``setpriv`` (the tests run as root in CI)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agent.devserver import Fault, TokenServer
from tests.conftest import REPO, Spawn, agent_env, run_cli, set_health, wait_for, write_config
from tests.servers import free_port
from tests.test_dev import _free_pair

NOBODY = 65534
#: the typo of the bad config below, and the start of its message
TYPO = "profiles.dvs.sinkz: unknown key"


def _no_listener(config: Path) -> Path:
    """``config`` without the health listener (its default port may be taken meanwhile)."""
    return set_health(config, "")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# ----------------------------------------------------------------- every error printed once


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("command", ["check", "once", "run", "refresh", "status"])
def test_a_config_error_is_printed_once(tmp_path: Path, command: str, fmt: str) -> None:
    # before logging is set up (the config is what would set it up)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nlog_format = "{fmt}"\n\n[profiles.dvs]\nsinkz = []\n\n'
        '[[profiles.dvs.sinks]]\npath = "/tmp/dvs-test-token"\n'
    )
    result = run_cli(command, "-c", str(config))
    assert result.returncode == 78, result.stderr
    assert result.stderr.count(TYPO) == 1, result.stderr
    assert result.stdout.count(TYPO) == 0
    (line,) = _lines(result.stderr)
    assert line.startswith(f"dvs-agent: error: {config}: {TYPO}"), line


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("command", ["once", "run"])
def test_an_error_after_logging_is_set_up_is_printed_once(
    server: TokenServer, tmp_path: Path, command: str, fmt: str
) -> None:
    env = agent_env()
    del env["DVS_CLIENT_ID"]  # a plain variable: run exits 78 at start, once for its profile
    config = write_config(tmp_path, server.url, log_format=fmt)
    result = run_cli(command, "-c", str(config), env=env, timeout=30)
    assert result.returncode == 78, result.stderr
    assert result.stderr.count("DVS_CLIENT_ID is not set") == 1, result.stderr
    assert "dvs-agent: error:" not in result.stderr  # the log line is the one report
    errors = [line for line in _lines(result.stderr) if "DVS_CLIENT_ID is not set" in line]
    assert _is_json(errors[0]) == (fmt == "json"), errors


def test_check_connect_reports_a_source_error_once(server: TokenServer, tmp_path: Path) -> None:
    env = agent_env()
    del env["DVS_CLIENT_ID"]
    result = run_cli("check", "--connect", "-c", str(write_config(tmp_path, server.url)), env=env)
    assert result.returncode == 78
    assert (result.stdout + result.stderr).count("DVS_CLIENT_ID is not set") == 1


# ------------------------------------------------------------ once promises no next attempt


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param([Fault.http_status(503)] * 10, id="503"),
        pytest.param([Fault.http_status(429, retry_after="3600")], id="429-retry-after"),
    ],
)
def test_once_says_what_happened_without_promising_a_retry(
    server: TokenServer, tmp_path: Path, faults: list[Fault]
) -> None:
    server.enqueue(*faults)
    result = run_cli("once", "-c", str(write_config(tmp_path, server.url, log_format="text")))
    assert result.returncode == 69, result.stderr
    (failed,) = [line for line in _lines(result.stderr) if "refresh failed" in line]
    assert "no valid token is held" in failed
    for promise in ("next attempt", "will wait", "asking again", "will try again"):
        assert promise not in result.stderr, result.stderr


def test_the_daemon_still_says_when_it_tries_again(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    server.enqueue(Fault.http_status(429, retry_after="3600"))
    agent = spawn(_no_listener(write_config(tmp_path, server.url, log_format="text")))
    assert wait_for(lambda: "next attempt in" in agent.output(), timeout=20), agent.output()
    assert "will wait before asking again" not in agent.output()  # said once, by the schedule
    assert agent.stop() == 0


# -------------------------------------------------- permission hints name an existing directory


def _as_unprivileged(*args: str) -> tuple[int, subprocess.CompletedProcess[str]]:
    """``dvs-agent ARGS`` as uid 65534 (or as the unprivileged user running the tests)."""
    argv = [sys.executable, "-m", "agent", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux): cannot drop privileges")
        argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
        uid = NOBODY
    else:
        uid = os.geteuid()
    result = subprocess.run(
        argv, env=agent_env(), capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )
    return uid, result


def _owned(directory: Path) -> Path:
    """A directory the unprivileged user owns."""
    directory.mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(directory, NOBODY, NOBODY)
    return directory


def _read_only(directory: Path, mode: int = 0o555) -> Path:
    directory.mkdir()
    os.chmod(directory, mode)
    return directory


def _config(directory: Path, url: str, *, state_dir: Path, sink: Path) -> Path:
    path = directory / "agent.toml"
    path.write_text(
        f'[agent]\nlog_format = "text"\nstate_dir = "{state_dir}"\n\n'
        f'[profiles.dvs]\ntoken_url = "{url}"\n\n'
        f'[[profiles.dvs.sinks]]\ntype = "file"\npath = "{sink}"\n'
    )
    path.chmod(0o644)
    return path


def test_a_sink_below_missing_directories_names_the_nearest_existing_one(
    server: TokenServer, shared_dir: Path
) -> None:
    # /ro exists and is not writable; /ro/b is missing: /ro needs the access, not /ro/b/c
    ro = _read_only(shared_dir / "ro")
    sink = ro / "b" / "c" / "token"
    state = _owned(shared_dir / "mine") / "state"
    uid, result = _as_unprivileged(
        "once", "-c", str(_config(shared_dir, server.url, state_dir=state, sink=sink))
    )
    assert result.returncode == 73, result.stderr
    message = result.stderr
    assert f"{ro}, the nearest existing directory above {sink}, needs write and search" in message
    assert f"the agent's uid {uid}" in message
    assert f"access to {ro / 'b'}" not in message and "sinks.path" in message
    assert not (ro / "b").exists()
    assert server.token_requests() == []


def test_a_sink_in_a_directory_it_cannot_search_names_that_directory(
    server: TokenServer, shared_dir: Path
) -> None:
    closed = _read_only(shared_dir / "closed", 0o700)  # root's: uid 65534 cannot enter it
    (closed / "inner").mkdir()
    sink = closed / "inner" / "token"
    state = _owned(shared_dir / "mine") / "state"
    if os.geteuid() != 0:
        pytest.skip("the directory must belong to another user")
    _, result = _as_unprivileged(
        "once", "-c", str(_config(shared_dir, server.url, state_dir=state, sink=sink))
    )
    assert result.returncode == 73, result.stderr
    assert f"{closed} needs search (x) access for the agent's uid {NOBODY}" in result.stderr
    assert f"access to {closed / 'inner'}" not in result.stderr


def test_a_state_dir_below_missing_directories_names_the_nearest_existing_one(
    server: TokenServer, shared_dir: Path
) -> None:
    ro = _read_only(shared_dir / "ro")
    state = ro / "lib" / "dvs-agent"
    sink = _owned(shared_dir / "mine") / "token"
    uid, result = _as_unprivileged(
        "once", "-c", str(_config(shared_dir, server.url, state_dir=state, sink=sink))
    )
    assert result.returncode == 73, result.stderr
    assert f"agent.state_dir {state}: " in result.stderr
    assert f"{ro}, the nearest existing directory above {state}, needs write and search" in (
        result.stderr
    )
    assert f"the agent's uid {uid}" in result.stderr
    assert not (ro / "lib").exists()


# --------------------------------------------------------------- refresh refused: exit 75


def test_refresh_refused_by_the_rate_limit_exits_75(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    config = set_health(write_config(tmp_path, server.url), listen)
    agent = spawn(config)

    def ready() -> bool:
        try:
            return httpx.get(f"http://{listen}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(ready, timeout=20), agent.output()
    first = run_cli("refresh", "-c", str(config))
    assert first.returncode == 0, first.stderr
    again = run_cli("refresh", "-c", str(config))
    assert again.returncode == 75, again.stderr  # EX_TEMPFAIL: try later
    assert "try again" in again.stderr and "retry in" in again.stderr
    assert agent.stop() == 0
    assert "75 refresh refused by the rate limit" in run_cli("--help").stdout


# ------------------------------------------------------------ SIGHUP applies log settings


def test_sighup_applies_a_new_log_format_and_level_at_once(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    config = _no_listener(
        write_config(tmp_path, server.url, log_level="warning", log_format="json")
    )
    agent = spawn(config)
    assert wait_for(lambda: (tmp_path / "token").exists(), timeout=20), agent.output()
    assert "INFO" not in agent.output()
    _no_listener(write_config(tmp_path, server.url, log_level="info", log_format="text"))
    agent.signal(signal.SIGHUP)
    assert wait_for(lambda: "log format now text" in agent.output(), timeout=15), agent.output()
    time.sleep(0.5)
    output = agent.output()
    after = _lines(output.split("log format now text", 1)[1])
    (switched,) = [line for line in _lines(output) if "log format now text" in line]
    assert not _is_json(switched) and " INFO " in switched, output
    assert after and not any(_is_json(line) for line in after), output
    assert "restart" not in switched
    assert agent.stop() == 0


# ---------------------------------------------------------- --log-level and --log-format


@pytest.mark.parametrize("command", ["run", "once", "check", "dev"])
def test_log_flags_are_in_the_help_of_each_command_that_logs(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    for flag in ("--log-level", "--log-format", "overrides agent.log_level"):
        assert flag in " ".join(result.stdout.split()), result.stdout


def test_once_log_flags_override_the_config(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url, log_level="debug", log_format="json")
    result = run_cli("once", "-c", str(config), "--log-format", "text", "--log-level", "info")
    assert result.returncode == 0, result.stderr
    lines = _lines(result.stderr)
    assert any("new token for provider" in line and " INFO " in line for line in lines), lines
    assert not any(_is_json(line) for line in lines), lines
    assert not any(" DEBUG " in line for line in lines), lines
    bad = run_cli("once", "-c", str(config), "--log-format", "xml")
    assert bad.returncode == 64 and "--log-format" in bad.stderr


def test_run_log_flags_still_win_after_a_sighup(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    config = _no_listener(write_config(tmp_path, server.url, log_level="debug", log_format="json"))
    agent = spawn(config, args=("--log-format", "text", "--log-level", "info"))
    assert wait_for(lambda: (tmp_path / "token").exists(), timeout=20), agent.output()
    # the file still says json and debug; a changed setting makes the reload visible
    _no_listener(
        write_config(tmp_path, server.url, log_level="debug", log_format="json", poll="20s")
    )
    agent.signal(signal.SIGHUP)
    assert wait_for(lambda: "profile (re)configured" in agent.output(), timeout=15), agent.output()
    time.sleep(0.5)
    lines = _lines(agent.output())
    assert not any(_is_json(line) for line in lines), lines
    assert not any(" DEBUG " in line for line in lines), lines
    assert agent.stop() == 0


def test_dev_log_flags(tmp_path: Path) -> None:
    port = _free_pair()
    directory = tmp_path / "dev"
    argv = ["dev", "--log-format", "json", "--dir", str(directory), "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *argv],
        cwd=REPO,
        env=agent_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_for(lambda: (directory / "token").exists(), timeout=20)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, output
    (line,) = [line for line in _lines(output) if "new token for provider" in line]
    assert _is_json(line), output
