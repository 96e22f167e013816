"""`dvs-agent once` end to end: real process, real HTTP, the outcome table's exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from agent.devserver import Fault, TokenServer
from tests.conftest import CLIENT_ID, CLIENT_SECRET, agent_env, run_cli, write_config


def _once(config: Path, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_cli("once", "-c", str(config), *extra, env=env)


def test_once_writes_every_sink_and_exits_0(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url)
    result = _once(config)
    assert result.returncode == 0, result.stderr
    issued = server.issued()
    assert len(server.token_requests()) == 1
    raw = (tmp_path / "token").read_text()
    assert raw in issued and not raw.endswith("\n")
    assert issued[raw].client_secret == CLIENT_SECRET
    doc = json.loads((tmp_path / "token.json").read_text())
    assert doc["access_token"] == raw
    assert doc["provider_slug"] == "br-gamma"
    assert doc["expires_in"] == 86399
    assert doc["expires_at"].endswith("Z")
    assert oct((tmp_path / "token").stat().st_mode & 0o777) == oct(0o640)
    state = tmp_path / "state"
    assert state.stat().st_mode & 0o777 == 0o700
    for child in state.iterdir():
        assert child.stat().st_mode & 0o777 == 0o600
        assert CLIENT_SECRET not in child.read_text()


def test_wire_shape_is_the_seeds(server: TokenServer, tmp_path: Path) -> None:
    assert _once(write_config(tmp_path, server.url)).returncode == 0
    (request,) = server.token_requests()
    assert request.method == "POST"
    assert request.path == "/v1/oauth/token"
    assert request.query == {"grant_type": ["client_credentials"]}
    assert request.headers["authorization"].startswith("Basic ")
    assert (request.client_id, request.client_secret) == (CLIENT_ID, CLIENT_SECRET)
    assert request.body == b""
    assert "content-type" not in request.headers


def test_restart_within_token_life_sends_no_request(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url)
    assert _once(config).returncode == 0
    first = (tmp_path / "token").read_text()
    (tmp_path / "token").unlink()  # e.g. /run emptied by a reboot
    assert _once(config).returncode == 0
    assert len(server.token_requests()) == 1
    assert (tmp_path / "token").read_text() == first
    # --force mints a new one
    assert _once(config, "--force").returncode == 0
    assert len(server.token_requests()) == 2
    assert (tmp_path / "token").read_text() != first


def test_recorded_token_not_reused_for_other_credentials(
    server: TokenServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, server.url)
    assert _once(config).returncode == 0
    server.set_secret(CLIENT_ID, "rotated-secret")
    result = _once(config, env=agent_env(DVS_CLIENT_SECRET="rotated-secret"))
    assert result.returncode == 0, result.stderr
    assert len(server.token_requests()) == 2
    token = (tmp_path / "token").read_text()
    assert server.issued()[token].client_secret == "rotated-secret"


def test_5xx_gives_up_after_four_requests_and_exits_69(server: TokenServer, tmp_path: Path) -> None:
    server.enqueue(*[Fault.http_status(503)] * 10)
    result = _once(write_config(tmp_path, server.url))
    assert result.returncode == 69, result.stderr
    assert len(server.token_requests()) == 4
    assert "503" in result.stderr
    assert not (tmp_path / "token").exists()


def test_5xx_then_success(server: TokenServer, tmp_path: Path) -> None:
    server.enqueue(Fault.http_status(502), Fault.http_status(500))
    result = _once(write_config(tmp_path, server.url))
    assert result.returncode == 0, result.stderr
    assert len(server.token_requests()) == 3


def test_protocol_error_retried_like_5xx(server: TokenServer, tmp_path: Path) -> None:
    server.enqueue(Fault.malformed_json(), Fault.html(), Fault.json_body({"access_token": "x"}))
    result = _once(write_config(tmp_path, server.url))
    assert result.returncode == 0, result.stderr
    assert len(server.token_requests()) == 4


def test_401_with_unchanged_credentials_exits_77(server: TokenServer, tmp_path: Path) -> None:
    result = _once(
        write_config(tmp_path, server.url), env=agent_env(DVS_CLIENT_SECRET="wrong-secret")
    )
    assert result.returncode == 77, result.stderr
    # re-read once: unchanged, so no resend
    assert len(server.token_requests()) == 1
    assert "401" in result.stderr and "other environment" in result.stderr
    assert "wrong-secret" not in result.stderr


def test_400_and_405_exit_78_without_retry(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url)
    for status in (400, 405):
        server.clear()
        server.enqueue(Fault.http_status(status))
        result = _once(config)
        assert result.returncode == 78, result.stderr
        assert len(server.token_requests()) == 1
        assert str(status) in result.stderr


def test_body_mode_against_a_standard_server(tmp_path: Path) -> None:
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, accept_body_grant=True) as server:
        config = write_config(tmp_path, server.url, extra_profile='grant_type_location = "body"')
        result = _once(config)
        assert result.returncode == 0, result.stderr
        (request,) = server.token_requests()
        assert request.query == {}
        assert request.body == b"grant_type=client_credentials"
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"


def test_osigu_rejects_body_mode_with_78(server: TokenServer, tmp_path: Path) -> None:
    # a secret that form-encoding leaves unchanged, so the server gets past authentication
    server.add_client("plain-client", "plainsecret")
    config = write_config(tmp_path, server.url, extra_profile='grant_type_location = "body"')
    env = agent_env(DVS_CLIENT_ID="plain-client", DVS_CLIENT_SECRET="plainsecret")
    result = _once(config, env=env)
    assert result.returncode == 78
    assert "grant_type_location" in result.stderr


def test_429_with_long_retry_after_exits_69_naming_the_wait(
    server: TokenServer, tmp_path: Path
) -> None:
    server.enqueue(Fault.http_status(429, retry_after="120"))
    result = _once(write_config(tmp_path, server.url))
    assert result.returncode == 69
    assert len(server.token_requests()) == 1
    assert "120" in result.stderr


def test_429_with_short_retry_after_waits_and_succeeds(server: TokenServer, tmp_path: Path) -> None:
    server.enqueue(Fault.http_status(429, retry_after="1"))
    result = _once(write_config(tmp_path, server.url))
    assert result.returncode == 0, result.stderr
    requests = server.token_requests()
    assert len(requests) == 2
    assert requests[1].received_at - requests[0].received_at >= 0.9


def test_unreachable_server_exits_69(tmp_path: Path) -> None:
    server = TokenServer()
    url = server.url  # a port that was bound, now closed
    server.stop()
    result = _once(write_config(tmp_path, url))
    assert result.returncode == 69
    assert "cannot reach" in result.stderr


def test_missing_credentials_is_a_config_error(server: TokenServer, tmp_path: Path) -> None:
    env = agent_env()
    del env["DVS_CLIENT_SECRET"]
    result = _once(write_config(tmp_path, server.url), env=env)
    assert result.returncode == 78
    assert "DVS_CLIENT_SECRET" in result.stderr
    assert server.token_requests() == []


def test_credentials_from_file_variables(server: TokenServer, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    env = agent_env(DVS_CLIENT_SECRET_FILE=str(secret_file))
    del env["DVS_CLIENT_SECRET"]
    result = _once(write_config(tmp_path, server.url), env=env)
    assert result.returncode == 0, result.stderr
    # both the variable and its _FILE: refused
    env["DVS_CLIENT_SECRET"] = CLIENT_SECRET
    result = _once(write_config(tmp_path, server.url), "--force", env=env)
    assert result.returncode == 78
    assert "DVS_CLIENT_SECRET_FILE" in result.stderr


def test_unwritable_sink_exits_73_before_any_request(server: TokenServer, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    sinks = f"""
[[profiles.dvs.sinks]]
type = "file"
path = "{blocker}/token"
"""
    result = _once(write_config(tmp_path, server.url, sinks=sinks))
    assert result.returncode == 73, result.stderr
    assert str(blocker) in result.stderr
    assert server.token_requests() == []


def test_most_severe_exit_code_across_profiles(server: TokenServer, tmp_path: Path) -> None:
    profile_b = f"""
[profiles.other]
token_url = "{server.url}"
[profiles.other.env]
client_secret_var = "OTHER_SECRET"
[[profiles.other.sinks]]
type = "file"
path = "{tmp_path}/other-token"
"""
    config = write_config(tmp_path, server.url, agent="")
    config.write_text(config.read_text() + profile_b)
    result = _once(config, env=agent_env(OTHER_SECRET="bad"))
    assert result.returncode == 77, result.stderr
    assert (tmp_path / "token").exists()
    only = _once(config, "--profile", "dvs")
    assert only.returncode == 0
    unknown = _once(config, "--profile", "nope")
    assert unknown.returncode == 78
    assert "nope" in unknown.stderr


def test_tokens_never_written_by_failed_attempts(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url)
    assert _once(config).returncode == 0
    good = (tmp_path / "token").read_text()
    server.enqueue(*[Fault.http_status(503)] * 4)
    assert _once(config, "--force").returncode == 69
    assert (tmp_path / "token").read_text() == good
    assert os.listdir(tmp_path).count("token") == 1


def test_stale_state_temp_files_are_removed(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url)
    assert _once(config).returncode == 0
    stale = tmp_path / "state" / ".dvs.json.0123456789ab.tmp"  # a kill -9 mid-save
    stale.write_text("partial")
    keep = tmp_path / "state" / "notes.tmp"
    keep.write_text("not ours")
    assert _once(config).returncode == 0
    assert not stale.exists() and keep.exists()
