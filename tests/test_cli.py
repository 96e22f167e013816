"""The command line: help, version, usage errors, bad configs (exit 78 naming the key), check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.devserver import TokenServer
from tests.conftest import REPO, agent_env, run_cli, write_config


def test_version_and_help() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"dvs-agent {__version__}"
    help_text = run_cli("--help").stdout
    for word in ("run", "once", "check", "dev", "exit codes", "SIGHUP", "DVS_AGENT_CONFIG"):
        assert word in help_text
    assert "--force" in run_cli("once", "--help").stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "dvs-agent"
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert result.returncode == 0 and __version__ in result.stdout


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["once", "--bogus"], ["dev", "--port", "x"]])
def test_usage_errors_exit_64(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 64, result.stderr
    assert "usage:" in result.stderr


BAD_CONFIGS = [
    ("[profiles.dvs]\nsinkz = []\n", "sinkz"),
    ('[agent]\nlog_levl = "info"\n', "log_levl"),
    ('[profiles.dvs]\nrequest_timeout = "10 parsecs"\n', "profiles.dvs.request_timeout"),
    ('[profiles.dvs.rotation]\npoll_interval = "-5s"\n', "profiles.dvs.rotation.poll_interval"),
    ('[[profiles.dvs.sinks]]\npath = "/tmp/x"\nmode = "0666"\n', "profiles.dvs.sinks[0].mode"),
    ('[[profiles.dvs.sinks]]\npath = "/tmp/x"\nmode = "rw-r--r--"\n', "mode"),
    ('[profiles.dvs]\nenvironment = "staging"\n', "profiles.dvs.environment"),
    ('[profiles.dvs]\ntoken_url = "http://auth.example.com/token"\n', "token_url"),
    ("[profiles.dvs]\n", "sinks"),
    ("this is = not toml ]\n", "TOML"),
]


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS)
def test_bad_config_exits_78_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "agent.toml"
    sink = '\n[[profiles.dvs.sinks]]\npath = "/tmp/dvs-test-token"\n'
    complete = key in ("sinks", "TOML") or "[[profiles.dvs.sinks]]" in text
    config.write_text(text if complete else text + sink)
    for command in ("run", "once", "check"):
        result = run_cli(command, "-c", str(config))
        assert result.returncode == 78, (command, result.stderr)
        assert key in result.stderr, result.stderr
        assert str(config) in result.stderr


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run_cli("run", "-c", str(missing))
    assert result.returncode == 78
    assert str(missing) in result.stderr and "DVS_AGENT_CONFIG" in result.stderr
    env = agent_env(DVS_AGENT_CONFIG=str(missing))
    result = run_cli("once", env=env)
    assert result.returncode == 78 and str(missing) in result.stderr


def test_check_describes_the_config(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url)
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "profile dvs" in result.stdout and server.url in result.stdout
    assert f"{tmp_path}/token" in result.stdout
    assert server.token_requests() == []
    assert not (tmp_path / "state").exists()  # plain check touches nothing


def test_check_connect_reports_a_missing_variable(server: TokenServer, tmp_path: Path) -> None:
    env = agent_env()
    del env["DVS_CLIENT_ID"]
    result = run_cli("check", "--connect", "-c", str(write_config(tmp_path, server.url)), env=env)
    assert result.returncode == 78
    assert "DVS_CLIENT_ID" in result.stdout


def test_example_configs_are_valid() -> None:
    for name in ("agent.example.toml", "dev.toml"):
        result = run_cli("check", "-c", str(REPO / "config" / name))
        assert result.returncode == 0, result.stderr


def test_env_only_agent_does_not_import_boto3_or_hvac(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url)
    code = (
        "import sys\n"
        "from agent.cli import main\n"
        f"rc = main(['once', '-c', {str(config)!r}])\n"
        "heavy = [m for m in ('boto3', 'botocore', 'hvac', 'apscheduler', 'prometheus_client',"
        " 'redis') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=agent_env(),
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
