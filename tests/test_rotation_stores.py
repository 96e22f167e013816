"""Rotation through real stores (DESIGN §5, §9): OpenBao, moto_server (Secrets Manager, SQS).

The agent runs as a process; the stores and the token server are real; nothing is patched.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from agent.devserver import TokenServer
from tests.conftest import CLIENT_ID, Spawn, agent_env, run_cli, wait_for
from tests.servers import MOTO_ENV, Bao, Moto, bao_server, free_port, moto_server


def _config(tmp_path: Path, url: str, profile: str, poll: str = "1s") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[agent]
log_level = "debug"
state_dir = "{tmp_path}/state"

[profiles.dvs]
token_url = "{url}"
{profile}

[profiles.dvs.rotation]
poll_interval = "{poll}"

[[profiles.dvs.sinks]]
type = "file"
path = "{tmp_path}/token"
"""
    )
    return path


def _minted_with(server: TokenServer, token_path: Path, secret: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            token = token_path.read_text()
        except FileNotFoundError:
            return False
        issued = server.issued().get(token)
        return issued is not None and issued.client_secret == secret

    return check


def _vault_profile(bao: Bao, path: str, token_file: Path, extra: str = "") -> str:
    token_file.write_text(bao.root_token)
    return f"""
sources = ["vault"]
[profiles.dvs.vault]
address = "{bao.address}"
auth_method = "token"
token_file = "{token_file}"
path = "{path}"
{extra}
"""


def _kv_write(bao: Bao, path: str, secret: str) -> None:
    bao.client().secrets.kv.v2.create_or_update_secret(
        path=path, secret={"client_id": CLIENT_ID, "client_secret": secret}
    )


def test_vault_rotation_reauths_within_poll_interval(
    bao: Bao, server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    path = f"dvs/{uuid.uuid4().hex[:8]}"
    server.set_secret(CLIENT_ID, "v-1")
    _kv_write(bao, path, "v-1")
    profile = _vault_profile(bao, path, tmp_path / "vault-token")
    agent = spawn(_config(tmp_path, server.url, profile), agent_env())
    token = tmp_path / "token"
    assert wait_for(_minted_with(server, token, "v-1"), timeout=20), agent.output()
    for secret in ("v-2", "v-3"):
        server.set_secret(CLIENT_ID, secret)
        _kv_write(bao, path, secret)
        written = time.monotonic()
        assert wait_for(_minted_with(server, token, secret), timeout=15), agent.output()
        elapsed = time.monotonic() - written
        assert elapsed < 6, elapsed  # poll 1 s + 1 s, with generous room for a loaded machine
    assert agent.stop() == 0


def test_vault_approle_and_bad_rotation_then_recovery(
    bao: Bao, server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    root = bao.client()
    if "approle/" not in root.sys.list_auth_methods():
        root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy(
        name="dvs-e2e",
        policy='path "secret/data/dvs/*" { capabilities = ["read"] }\n'
        'path "secret/metadata/dvs/*" { capabilities = ["read"] }\n',
    )
    role = f"dvs-e2e-{uuid.uuid4().hex[:6]}"
    root.auth.approle.create_or_update_approle(role, token_policies=["dvs-e2e"], token_ttl="60s")
    role_id = root.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    (tmp_path / "role_id").write_text(role_id)
    (tmp_path / "secret_id").write_text(secret_id)
    path = f"dvs/{uuid.uuid4().hex[:8]}"
    server.set_secret(CLIENT_ID, "good-1")
    _kv_write(bao, path, "good-1")
    profile = f"""
sources = ["vault"]
[profiles.dvs.vault]
address = "{bao.address}"
auth_method = "approle"
role_id_file = "{tmp_path}/role_id"
secret_id_file = "{tmp_path}/secret_id"
path = "{path}"
"""
    agent = spawn(_config(tmp_path, server.url, profile), agent_env())
    token = tmp_path / "token"
    assert wait_for(_minted_with(server, token, "good-1"), timeout=20), agent.output()
    held = token.read_text()
    # ops rotate the store to a secret the auth server does not accept
    _kv_write(bao, path, "bad-secret")
    assert wait_for(lambda: "401" in agent.output(), timeout=15), agent.output()
    requests = len(server.token_requests())
    time.sleep(4)
    assert len(server.token_requests()) - requests <= 1  # slow backoff, no hammering
    assert token.read_text() == held  # the working token is kept
    assert "keeping the current token" in agent.output()
    # fixed in the store: recovery without a restart
    server.set_secret(CLIENT_ID, "good-2")
    _kv_write(bao, path, "good-2")
    assert wait_for(_minted_with(server, token, "good-2"), timeout=15), agent.output()
    output = agent.output()
    for value in (role_id, secret_id, "bad-secret", "good-2", bao.root_token):
        assert value not in output
    assert agent.stop() == 0


def _aws_profile(moto: Moto, name: str, extra: str = "") -> str:
    return f"""
sources = ["aws"]
[profiles.dvs.aws]
secret_id = "{name}"
region = "{moto.region}"
endpoint_url = "{moto.endpoint_url}"
{extra}
"""


def _secret_string(secret: str) -> str:
    return json.dumps({"client_id": CLIENT_ID, "client_secret": secret})


def test_aws_rotation_by_polling_and_by_stage_move(
    moto: Moto, server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    sm = moto.client("secretsmanager")
    name = f"dvs/{uuid.uuid4().hex[:8]}"
    sm.create_secret(Name=name, SecretString=_secret_string("a-1"))
    server.set_secret(CLIENT_ID, "a-1")
    agent = spawn(_config(tmp_path, server.url, _aws_profile(moto, name)), agent_env(**MOTO_ENV))
    token = tmp_path / "token"
    assert wait_for(_minted_with(server, token, "a-1"), timeout=20), agent.output()
    server.set_secret(CLIENT_ID, "a-2")
    sm.put_secret_value(SecretId=name, SecretString=_secret_string("a-2"))
    assert wait_for(_minted_with(server, token, "a-2"), timeout=15), agent.output()
    # a rotation that moves AWSCURRENT to a staged version
    staged = sm.put_secret_value(
        SecretId=name, SecretString=_secret_string("a-3"), VersionStages=["AWSPENDING"]
    )["VersionId"]
    current = next(
        vid
        for vid, stages in sm.describe_secret(SecretId=name)["VersionIdsToStages"].items()
        if "AWSCURRENT" in stages
    )
    time.sleep(2)
    assert _minted_with(server, token, "a-2")()  # AWSPENDING is not used
    server.set_secret(CLIENT_ID, "a-3")
    sm.update_secret_version_stage(
        SecretId=name,
        VersionStage="AWSCURRENT",
        MoveToVersionId=staged,
        RemoveFromVersionId=current,
    )
    assert wait_for(_minted_with(server, token, "a-3"), timeout=15), agent.output()
    assert agent.stop() == 0


def test_sqs_event_triggers_reauth_with_polling_off(
    moto: Moto, server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    sm, sqs = moto.client("secretsmanager"), moto.client("sqs")
    name = f"dvs/{uuid.uuid4().hex[:8]}"
    arn = sm.create_secret(Name=name, SecretString=_secret_string("e-1"))["ARN"]
    queue_url = sqs.create_queue(QueueName=f"rot-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    server.set_secret(CLIENT_ID, "e-1")
    profile = _aws_profile(moto, name, f'events_queue_url = "{queue_url}"')
    agent = spawn(_config(tmp_path, server.url, profile, poll="0"), agent_env(**MOTO_ENV))
    token = tmp_path / "token"
    assert wait_for(_minted_with(server, token, "e-1"), timeout=20), agent.output()
    server.set_secret(CLIENT_ID, "e-2")
    sm.put_secret_value(SecretId=name, SecretString=_secret_string("e-2"))
    time.sleep(2)
    assert _minted_with(server, token, "e-1")()  # polling is off: nothing yet
    event = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "AWS Service Event via CloudTrail",
        "source": "aws.secretsmanager",
        "detail": {
            "eventName": "RotationSucceeded",
            "additionalEventData": {"SecretId": arn},
        },
    }
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(event))
    assert wait_for(_minted_with(server, token, "e-2"), timeout=30), agent.output()
    assert wait_for(
        lambda: sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0).get("Messages") is None
    )
    assert agent.stop() == 0


def _sources_in_use(output: str) -> list[str]:
    found = []
    for line in output.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "token_refreshed":
            found.append(doc.get("source"))
    return found


def test_fallback_vault_then_aws_then_env(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    server.set_secret(CLIENT_ID, "shared")
    with bao_server(tmp_path / "bao") as bao, moto_server(tmp_path / "moto") as moto:
        path = "dvs/fallback"
        _kv_write(bao, path, "shared")
        name = "dvs/fallback"
        moto.client("secretsmanager").create_secret(
            Name=name, SecretString=_secret_string("shared")
        )
        token_file = tmp_path / "vault-token"
        token_file.write_text(bao.root_token)
        profile = f"""
sources = ["vault", "aws", "env"]
[profiles.dvs.vault]
address = "{bao.address}"
auth_method = "token"
token_file = "{token_file}"
path = "{path}"
[profiles.dvs.aws]
secret_id = "{name}"
region = "{moto.region}"
endpoint_url = "{moto.endpoint_url}"
"""
        env = agent_env(DVS_CLIENT_SECRET="shared", **MOTO_ENV)
        agent = spawn(_config(tmp_path, server.url, profile, poll="0"), env)
        assert wait_for(lambda: _sources_in_use(agent.output()) == ["vault"], timeout=20), (
            agent.output()
        )
        bao.stop()  # Vault down: the next re-read falls back to AWS
        agent.signal(signal.SIGHUP)
        assert wait_for(lambda: _sources_in_use(agent.output())[-1:] == ["aws"], timeout=20), (
            agent.output()
        )
        assert "earlier sources failed" in agent.output() and "vault" in agent.output()
        moto.stop()
        agent.signal(signal.SIGHUP)
        assert wait_for(lambda: _sources_in_use(agent.output())[-1:] == ["env"], timeout=30), (
            agent.output()
        )
        assert agent.stop() == 0


def test_vault_down_at_restart_keeps_serving_the_recorded_token(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    """Vault is down when the agent restarts: the recorded token is still valid, so it is
    written and served (degraded, ready) instead of leaving consumers without one."""
    server.set_secret(CLIENT_ID, "restart-secret")
    with bao_server(tmp_path / "bao") as bao:
        _kv_write(bao, "dvs/restart", "restart-secret")
        profile = _vault_profile(bao, "dvs/restart", tmp_path / "vault-token")
        config = _config(tmp_path, server.url, profile)
        first = run_cli("once", "-c", str(config), env=agent_env())
        assert first.returncode == 0, first.stderr
    token = (tmp_path / "token").read_text()
    (tmp_path / "token").unlink()  # e.g. /run emptied by the reboot that also took Vault down
    again = run_cli("once", "-c", str(config), env=agent_env())
    assert again.returncode == 0, again.stderr
    assert "keeping the recorded token" in again.stderr
    assert (tmp_path / "token").read_text() == token
    assert len(server.token_requests()) == 1
    # the daemon too: degraded but ready, the token in place, retrying the sources
    health_port = free_port()
    config.write_text(
        config.read_text().replace(
            "[profiles.dvs]", f'[health]\nlisten = "127.0.0.1:{health_port}"\n\n[profiles.dvs]', 1
        )
    )
    agent = spawn(config, agent_env())

    def state() -> str | None:
        try:
            body = httpx.get(f"http://127.0.0.1:{health_port}/readyz", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return None
        return str(body["profiles"]["dvs"]["state"])

    assert wait_for(lambda: state() == "degraded", timeout=20), agent.output()
    assert httpx.get(f"http://127.0.0.1:{health_port}/readyz", timeout=2).status_code == 200
    assert (tmp_path / "token").read_text() == token
    assert agent.stop() == 0
