"""Shared fixtures: the token-endpoint test server, config files, and the agent as a process."""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import Duration, FileMode
from agent.devserver import TokenServer
from agent.models import Secret, Token
from agent.sinks.file import FileSink, FileSinkConfig
from agent.sources.vault import VaultSourceConfig
from agent.stores.vault.settings import VaultAuth
from tests.servers import (
    MOTO_ENV,
    Bao,
    Moto,
    RedisServer,
    bao_server,
    free_port,
    moto_server,
    redis_server,
)

CLIENT_ID = "svc-client"
CLIENT_SECRET = "s3cr3t-Value_with+chars/and=more"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as srv:
        yield srv


def write_config(
    directory: Path,
    url: str,
    *,
    extra_profile: str = "",
    sinks: str | None = None,
    agent: str = "",
    poll: str = "30s",
    log_level: str = "debug",
    log_format: str = "json",
) -> Path:
    """A config with one profile ``dvs`` writing ``directory/token`` (raw) and token.json."""
    if sinks is None:
        sinks = f"""
[[profiles.dvs.sinks]]
type = "file"
path = "{directory}/token"
mode = "0640"

[[profiles.dvs.sinks]]
type = "file"
path = "{directory}/token.json"
format = "json"
"""
    path = directory / "agent.toml"
    # the default health port (8787) would be shared by every agent a test run starts, and
    # with a dvs-agent running on the machine: each config gets a free port of its own
    health = (
        ""
        if "[health]" in agent + extra_profile + sinks
        else (f'\n[health]\nlisten = "127.0.0.1:{free_port()}"\n')
    )
    path.write_text(
        f"""
[agent]
log_level = "{log_level}"
log_format = "{log_format}"
state_dir = "{directory}/state"
{agent}
{health}

[profiles.dvs]
token_url = "{url}"
{extra_profile}

[profiles.dvs.rotation]
poll_interval = "{poll}"
{sinks}
"""
    )
    return path


def set_health(config: Path, listen: str) -> Path:
    """``config`` (from :func:`write_config`) with ``health.listen`` set (``""``: off)."""
    text = config.read_text()
    table = '[health]\nlisten = "' + listen + '"\n'
    text, found = re.subn(r'\[health\]\nlisten = "[^"]*"\n', lambda _: table, text, count=1)
    if not found:
        text = text.replace("[profiles.dvs]", table + "\n[profiles.dvs]", 1)
    config.write_text(text)
    return config


def agent_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DVS_", "NOTIFY_SOCKET", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))
    }
    env.update({"DVS_CLIENT_ID": CLIENT_ID, "DVS_CLIENT_SECRET": CLIENT_SECRET})
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        env=agent_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def threads_taking_signals(pid: int) -> list[int]:
    """The threads of ``pid`` that do not block SIGHUP, SIGTERM and SIGINT (only the main
    thread should take them: one that another thread took would not wake the main thread)."""
    wanted = sum(1 << (s - 1) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT))
    taking = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda t: int(t.name)):
        status = (task / "status").read_text().splitlines()
        blocked = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
        if blocked & wanted != wanted:
            taking.append(int(task.name))
    return taking


def hour_token(
    value: str, *, scope: str | None = None, extensions: dict[str, object] | None = None
) -> Token:
    """A bearer token obtained now and valid for an hour."""
    now = datetime.now(UTC)
    return Token(
        access_token=Secret(value),
        token_type="bearer",
        expires_in=3600,
        obtained_at=now,
        expires_at=now + timedelta(seconds=3600),
        scope=scope,
        extensions=extensions or {},
    )


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


@dataclass
class AgentProcess:
    """``dvs-agent run`` as a child process; its stderr goes to a file the test can read."""

    config: Path
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    logs: list[str] = field(default_factory=list)
    #: more arguments of ``run`` (e.g. ``--log-format text``)
    args: tuple[str, ...] = ()
    #: RLIMIT_NOFILE (soft and hard) of the child; None: this process's
    nofile: int | None = None

    def start(self) -> AgentProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.log_path, "ab")  # noqa: SIM115 - closed by the child's lifetime
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "-c", str(self.config), *self.args],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            preexec_fn=limit if nofile is not None else None,
        )
        handle.close()
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


Spawn = Callable[..., AgentProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    started: list[AgentProcess] = []

    def _spawn(
        config: Path,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        nofile: int | None = None,
    ) -> AgentProcess:
        proc = AgentProcess(
            config=config,
            env=agent_env() if env is None else env,
            log_path=tmp_path / f"agent-{len(started)}.log",
            args=args,
            nofile=nofile,
        ).start()
        started.append(proc)
        return proc

    yield _spawn
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user (uid 65534) can reach: pytest's tmp_path is root-only,
    and the permission tests drop to that user (they test nothing as root)."""
    base = Path(tempfile.mkdtemp(prefix="dvs-agent-test-"))
    os.chmod(base, 0o755)  # noqa: S103 - uid 65534 must reach it
    try:
        yield base
    finally:
        for directory, _, _ in os.walk(base):
            os.chmod(directory, 0o755)  # noqa: S103 - so that rmtree works as root or not
        shutil.rmtree(base)


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """One OpenBao dev server for the session (KV v2 at secret/)."""
    with bao_server(tmp_path_factory.mktemp("bao")) as server:
        yield server


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """One moto_server for the session (Secrets Manager, SQS)."""
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (requirepass and an ACL user; see tests.servers)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS_* of the developer, empty AWS config files, no instance metadata."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only moto's dummy credentials: no AWS_* of the developer, no ~/.aws, no IMDS."""
    clean_aws_env(monkeypatch, tmp_path)
    for key, value in MOTO_ENV.items():
        monkeypatch.setenv(key, value)


def file_sink(
    path: Path | str,
    *,
    fmt: str = "raw",
    mode: int = 0o640,
    owner: str | None = None,
    group: str | None = None,
    on_change: list[str] | None = None,
    on_change_timeout: float = 30.0,
    profile: str = "",
    logger: logging.Logger | None = None,
) -> FileSink:
    """A file sink as a ``[[profiles.NAME.sinks]]`` entry with these keys would build it."""
    config = FileSinkConfig(
        path=str(path),
        format=fmt,  # type: ignore[arg-type]  # tests pass bad formats on purpose
        mode=FileMode(mode),
        owner=owner,
        group=group,
        on_change=on_change,
        on_change_timeout=Duration(seconds=on_change_timeout),
    )
    return FileSink(config, profile=profile, logger=logger)


def vault_auth(
    address: str, *, timeout: float = 10.0, config_key: str = "vault", **keys: Any
) -> VaultAuth:
    """The Vault connection settings a ``[vault]`` table with these keys would give."""
    return VaultAuth(
        address=address, config=VaultSourceConfig(**keys), timeout=timeout, config_key=config_key
    )


#: metric samples by (name, labels): what one /metrics page said
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metric_samples(text: str) -> Samples:
    """The samples of a Prometheus text page (the one parser of the tests)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_value(found: Samples, name: str, default: float | None = None, **labels: str) -> float:
    """The value of one sample; ``default`` when there is none (else KeyError)."""
    key = (name, frozenset(labels.items()))
    if default is not None:
        return found.get(key, default)
    return found[key]


def new_approle(
    root: Any, name: str, directory: Path, *, policy: str, ttl: str = "60s"
) -> tuple[str, str, Path, Path]:
    """An AppRole role ``name`` whose tokens carry ``policy`` for ``ttl`` (also their max TTL),
    made with the root hvac client ``root`` (AppRole enabled at auth/approle), and its values in
    files of ``directory`` (each value and a newline, as ops write them):
    ``(role_id, secret_id, role_id_file, secret_id_file)``."""
    root.auth.approle.create_or_update_approle(
        name, token_policies=[policy], token_ttl=ttl, token_max_ttl=ttl
    )
    role_id = str(root.auth.approle.read_role_id(name)["data"]["role_id"])
    secret_id = str(root.auth.approle.generate_secret_id(name)["data"]["secret_id"])
    role_id_file = directory / f"{name}.role_id"
    secret_id_file = directory / f"{name}.secret_id"
    role_id_file.write_text(role_id + "\n")
    secret_id_file.write_text(secret_id + "\n")
    return role_id, secret_id, role_id_file, secret_id_file
