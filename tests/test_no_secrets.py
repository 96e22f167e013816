"""No client secret, token or Authorization header in any output, at debug level, on good and
bad paths alike."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

from agent.devserver import Fault, TokenServer
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Spawn,
    agent_env,
    run_cli,
    wait_for,
    write_config,
)


def _forbidden(server: TokenServer, *secrets: str) -> list[str]:
    values = [CLIENT_SECRET, *secrets, *server.issued()]
    for secret in [CLIENT_SECRET, *secrets]:
        basic = base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode()
        values += [basic, basic[:24]]
    return values


def _assert_clean(text: str, forbidden: list[str]) -> None:
    for value in forbidden:
        assert value not in text, f"a secret value leaked into the output: {value[:4]}…"


def test_once_scenarios_at_debug_level_leak_nothing(server: TokenServer, tmp_path: Path) -> None:
    outputs = []
    for fmt in ("json", "text"):
        config = write_config(tmp_path, server.url, log_level="debug", log_format=fmt)
        scenarios: list[tuple[list[Fault], dict[str, str], list[str]]] = [
            ([], agent_env(), ["--force"]),
            ([Fault.http_status(503), Fault.malformed_json()], agent_env(), ["--force"]),
            ([Fault.html()] * 4, agent_env(), ["--force"]),
            ([Fault.http_status(429, retry_after="300")], agent_env(), ["--force"]),
            ([Fault.http_status(400)], agent_env(), ["--force"]),
            ([], agent_env(DVS_CLIENT_SECRET="the-wrong-secret"), ["--force"]),
            ([], agent_env(), []),  # reuse from state
            # servers that echo the secret, the Basic header and a token back (DESIGN §10)
            ([Fault.echo(status=401)], agent_env(), ["--force"]),
            ([Fault.echo(status=400, html=True)], agent_env(), ["--force"]),
            ([Fault.echo(status=503)] * 4, agent_env(), ["--force"]),
        ]
        for faults, env, args in scenarios:
            server.enqueue(*faults)
            result = run_cli("once", "-c", str(config), *args, env=env)
            outputs.append(result.stdout + result.stderr)
        # a 200 whose body is not a valid response echoes nothing of it
        server.enqueue(
            *[Fault.json_body({"access_token": "leaky token with spaces", "expires_in": 1})] * 4
        )
        result = run_cli("once", "-c", str(config), "--force")
        assert result.returncode == 69
        outputs.append(result.stdout + result.stderr)
        assert "leaky token" not in result.stderr
    joined = "\n".join(outputs)
    assert "debug" in joined.lower()  # the runs did log at debug level
    assert "[REDACTED]" in joined  # the echoes were there, masked
    assert "\x1b" not in joined  # and their terminal escapes never reach the output raw
    _assert_clean(joined, _forbidden(server, "the-wrong-secret"))
    assert len(server.issued()) >= 2


def test_daemon_with_rotation_at_debug_level_leaks_nothing(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(CLIENT_SECRET)
    env = agent_env(DVS_CLIENT_SECRET_FILE=str(secret_file))
    del env["DVS_CLIENT_SECRET"]
    server.expires_in = 2
    agent = spawn(write_config(tmp_path, server.url, poll="1s", log_level="debug"), env)
    assert server.wait_for_requests(2, timeout=15)
    secret_file.write_text("wrong-rotated-secret")
    assert wait_for(lambda: "401" in agent.output(), timeout=10)
    server.set_secret(CLIENT_ID, "good-rotated-secret")
    secret_file.write_text("good-rotated-secret")
    assert wait_for(
        lambda: any(t.client_secret == "good-rotated-secret" for t in server.issued().values()),
        timeout=10,
    )
    agent.signal(signal.SIGHUP)
    time.sleep(1)
    assert agent.stop() == 0
    output = agent.output()
    assert '"level":"debug"' in output
    _assert_clean(output, _forbidden(server, "wrong-rotated-secret", "good-rotated-secret"))


def test_check_connect_prints_no_secret(server: TokenServer, tmp_path: Path) -> None:
    result = run_cli("check", "--connect", "-c", str(write_config(tmp_path, server.url)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert CLIENT_ID in result.stdout
    _assert_clean(result.stdout + result.stderr, _forbidden(server))
