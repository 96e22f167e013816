"""Operating the agent: /readyz, /metrics, status/refresh, the systemd watchdog, write-back
sinks through a running agent. Real processes and servers throughout."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from agent.devserver import Fault, TokenServer
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    REPO,
    Samples,
    Spawn,
    agent_env,
    metric_samples,
    metric_value,
    run_cli,
    set_health,
    wait_for,
    write_config,
)
from tests.servers import RedisServer, bao_server, free_port


def _health_config(tmp_path: Path, url: str, **kwargs: str) -> tuple[Path, str]:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    config = set_health(write_config(tmp_path, url, **kwargs), listen)
    return config, listen


def _readyz(listen: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    response = httpx.get(f"http://{listen}/readyz", timeout=5)
    return response.status_code, response.json()


def _up(listen: str) -> bool:
    try:
        return httpx.get(f"http://{listen}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _metrics(listen: str) -> Samples:
    return metric_samples(httpx.get(f"http://{listen}/metrics", timeout=5).text)


def _value(metrics: Samples, name: str, **labels: str) -> float:
    return metric_value(metrics, name, 0.0, **labels)


def test_readyz_and_metrics_follow_the_token(tmp_path: Path, spawn: Spawn) -> None:
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=4) as server:
        server.enqueue(Fault.slow(2))  # the first token takes a while
        config, listen = _health_config(tmp_path, server.url)
        agent = spawn(config)
        assert wait_for(lambda: _up(listen), timeout=15), agent.output()
        code, body = _readyz(listen)
        assert code == 503 and body["profiles"]["dvs"]["state"] == "starting"
        assert wait_for(lambda: _readyz(listen)[0] == 200, timeout=15), agent.output()
        before = json.loads((tmp_path / "token.json").read_text())
        code, body = _readyz(listen)
        doc = json.loads((tmp_path / "token.json").read_text())
        profile = body["profiles"]["dvs"]
        assert profile["state"] == "ok" and profile["provider_slug"] == "br-gamma"
        assert profile["source"] == "env"
        # (a 4 s token is refreshed every 2 s: the file may have moved on meanwhile)
        assert profile["expires_at"] in (before["expires_at"], doc["expires_at"])
        assert doc["access_token"] not in json.dumps(body)
        assert httpx.get(f"http://{listen}/readyz/dvs", timeout=5).status_code == 200
        assert httpx.get(f"http://{listen}/readyz/nope", timeout=5).status_code == 404

        metrics = _metrics(listen)
        assert _value(metrics, "dvs_agent_token_requests_total", profile="dvs", outcome="ok") >= 1
        assert _value(metrics, "dvs_agent_profile_state", profile="dvs", state="ok") == 1
        assert _value(metrics, "dvs_agent_profile_state", profile="dvs", state="starting") == 0
        assert _value(metrics, "dvs_agent_source_in_use", profile="dvs", source="env") == 1
        assert (
            _value(
                metrics,
                "dvs_agent_sink_writes_total",
                profile="dvs",
                sink=f"file:{tmp_path}/token",
                outcome="ok",
            )
            >= 1
        )
        assert _value(metrics, "dvs_agent_refresh_duration_seconds_count", profile="dvs") >= 1
        expiry = _value(
            metrics,
            "dvs_agent_token_expiry_timestamp_seconds",
            profile="dvs",
            provider_slug="br-gamma",
        )
        assert expiry > time.time()
        assert _value(metrics, "dvs_agent_last_success_timestamp_seconds", profile="dvs") > 0

        # the auth server goes down: the token expires without a refresh
        server.enqueue(*[Fault.http_status(503)] * 200)
        assert wait_for(lambda: _readyz(listen)[0] == 503, timeout=20), agent.output()
        code, body = _readyz(listen)
        assert body["profiles"]["dvs"]["state"] == "expired"
        assert wait_for(lambda: _readyz(listen)[1]["profiles"]["dvs"]["last_error"], timeout=20)
        assert "503" in _readyz(listen)[1]["profiles"]["dvs"]["last_error"]
        metrics = _metrics(listen)
        assert (
            _value(metrics, "dvs_agent_token_requests_total", profile="dvs", outcome="unavailable")
            >= 1
        )
        assert _value(metrics, "dvs_agent_profile_state", profile="dvs", state="expired") == 1
        # status says so and exits 69
        result = run_cli("status", "-c", str(config))
        assert result.returncode == 69, result.stderr
        assert "dvs: expired" in result.stdout
        assert agent.stop() == 0


def test_bad_rotation_is_degraded_but_ready(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(CLIENT_SECRET)
    env = agent_env(DVS_CLIENT_SECRET_FILE=str(secret_file))
    del env["DVS_CLIENT_SECRET"]
    config, listen = _health_config(tmp_path, server.url, poll="1s")
    agent = spawn(config, env)
    assert wait_for(lambda: _up(listen) and _readyz(listen)[0] == 200, timeout=20)
    secret_file.write_text("rotated-to-a-wrong-secret")
    assert wait_for(
        lambda: _readyz(listen)[1]["profiles"]["dvs"]["state"] == "degraded", timeout=15
    ), agent.output()
    code, body = _readyz(listen)
    assert code == 200  # the kept token still works: an orchestrator must not pull the service
    assert "401" in body["profiles"]["dvs"]["last_error"]
    metrics = _metrics(listen)
    assert _value(metrics, "dvs_agent_profile_state", profile="dvs", state="degraded") == 1
    assert _value(metrics, "dvs_agent_token_requests_total", profile="dvs", outcome="rejected") >= 1
    # the new (wrong) secret is a rotation from its first use, whatever the server answered
    assert _value(metrics, "dvs_agent_rotations_total", profile="dvs", trigger="poll") == 1
    assert _value(metrics, "dvs_agent_triggers_total", profile="dvs", trigger="poll") >= 1
    result = run_cli("status", "-c", str(config))
    assert result.returncode == 0 and "dvs: degraded" in result.stdout
    assert "rotated-to-a-wrong-secret" not in result.stdout + agent.output()
    assert agent.stop() == 0


def test_status_and_refresh_commands(server: TokenServer, tmp_path: Path, spawn: Spawn) -> None:
    config, listen = _health_config(tmp_path, server.url)
    not_running = run_cli("status", "-c", str(config))
    assert not_running.returncode == 69 and "not running" in not_running.stderr
    agent = spawn(config)
    assert wait_for(lambda: _up(listen) and _readyz(listen)[0] == 200, timeout=20)
    status = run_cli("status", "-c", str(config))
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("dvs: ok") and "provider br-gamma" in status.stdout
    before = len(server.token_requests())
    refresh = run_cli("refresh", "-c", str(config), "--profile", "dvs")
    assert refresh.returncode == 0, refresh.stderr
    assert server.wait_for_requests(before + 1, timeout=10)
    again = run_cli("refresh", "-c", str(config))
    assert again.returncode == 75 and "retry in" in again.stderr  # rate-limited: try later
    unknown = run_cli("refresh", "-c", str(config), "--profile", "nope")
    assert unknown.returncode == 78
    metrics = _metrics(listen)
    # a trigger, not a rotation: the credentials did not change (DESIGN §11)
    assert _value(metrics, "dvs_agent_triggers_total", profile="dvs", trigger="refresh") == 1
    assert not any(name == "dvs_agent_rotations_total" for name, _ in metrics)
    assert agent.stop() == 0


def test_health_listens_only_on_the_configured_address(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    config, listen = _health_config(tmp_path, server.url)
    agent = spawn(config)
    assert wait_for(lambda: _up(listen), timeout=15)
    port = int(listen.rsplit(":", 1)[1])
    with socket.socket() as sock:  # another loopback address: nothing listens there
        sock.settimeout(2)
        assert sock.connect_ex(("127.0.0.2", port)) != 0
    assert agent.stop() == 0


def test_port_in_use_fails_at_start_with_69(server: TokenServer, tmp_path: Path) -> None:
    config, listen = _health_config(tmp_path, server.url)
    host, port = listen.rsplit(":", 1)
    with socket.socket() as sock:
        sock.bind((host, int(port)))
        sock.listen()
        result = run_cli("run", "-c", str(config), timeout=30)
    assert result.returncode == 69
    assert "health.listen" in result.stderr


def test_watchdog_pings(server: TokenServer, tmp_path: Path, spawn: Spawn) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(10)
        env = agent_env(NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
        agent = spawn(write_config(tmp_path, server.url), env)
        messages: list[str] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and messages.count("WATCHDOG=1") < 3:
            messages.append(sock.recv(4096).decode())
        assert messages.count("WATCHDOG=1") >= 3, messages
        assert any("READY=1" in m for m in messages)
        assert agent.stop() == 0


def test_write_back_sinks_through_the_agent_one_down(
    server: TokenServer, redis: RedisServer, tmp_path: Path, spawn: Spawn
) -> None:
    with bao_server(tmp_path / "bao") as bao:
        bao_address = bao.address
    # Vault is down from the start: the file and Redis sinks must still be written
    key = f"dvs-agent:e2e:{time.monotonic_ns()}"
    sinks = f"""
[[profiles.dvs.sinks]]
type = "file"
path = "{tmp_path}/token"

[[profiles.dvs.sinks]]
type = "redis"
url = "{redis.url()}"
key = "{key}"
password_env = "REDIS_PASSWORD"

[[profiles.dvs.sinks]]
type = "vault"
address = "{bao_address}"
auth_method = "token"
token_file = "{tmp_path}/vault-token"
path = "dvs/token-copy"
"""
    (tmp_path / "vault-token").write_text("unused")
    config, listen = _health_config(tmp_path, server.url, sinks=sinks)
    agent = spawn(config, agent_env(REDIS_PASSWORD=redis.password))
    assert wait_for(lambda: (tmp_path / "token").exists(), timeout=20), agent.output()
    token = (tmp_path / "token").read_text()
    # the sinks are written in order: the Redis key may land a moment after the file
    assert wait_for(lambda: redis.client().get(key) is not None, timeout=15), agent.output()
    stored = redis.client().get(key)
    assert stored is not None and json.loads(stored)["access_token"] == token
    assert 0 < redis.client().pttl(key) <= 86399 * 1000
    assert wait_for(lambda: "cannot write vault:" in agent.output(), timeout=15), agent.output()
    assert wait_for(
        lambda: (
            _value(
                _metrics(listen),
                "dvs_agent_sink_writes_total",
                profile="dvs",
                sink="vault:secret/dvs/token-copy",
                outcome="error",
            )
            >= 1
        ),
        timeout=15,
    )
    code, body = _readyz(listen)
    assert code == 200 and body["profiles"]["dvs"]["state"] == "degraded"
    assert redis.password not in agent.output() and token not in agent.output()
    assert agent.stop() == 0


def test_systemd_unit_is_hardened() -> None:
    unit = (REPO / "config" / "dvs-agent.service").read_text()
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    assert settings["Type"] == ["notify"]
    assert settings["RestartPreventExitStatus"] == ["78"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert "WatchdogSec" in settings
    assert "User" in settings or settings.get("DynamicUser") == ["yes"]
    paths = " ".join(settings["ReadWritePaths"]).split()
    assert "/run/dvs-agent" in paths and "/var/lib/dvs-agent" in paths
    assert settings["ExecStart"][0].endswith("dvs-agent run -c /etc/dvs-agent/agent.toml")


@pytest.mark.parametrize("command", ["status", "refresh"])
def test_status_and_refresh_need_the_listener(
    server: TokenServer, tmp_path: Path, command: str
) -> None:
    config = set_health(write_config(tmp_path, server.url), "")
    result = run_cli(command, "-c", str(config))
    assert result.returncode == 69
    assert "listen" in result.stderr
