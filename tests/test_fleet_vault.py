"""Fleet mode with the Vault store on a real OpenBao, agents as processes (DESIGN §13).

The cases of the Redis tests that rest on the store's own semantics: one token request at a
cold mass start and one after a rotation, the lease holder SIGKILLed while its request hangs is
replaced within the lease, and Vault holds the token document but never the client secret.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest

from agent.devserver import Fault, TokenServer
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_for
from tests.fleet_agents import fleet_of
from tests.servers import Bao

pytestmark = pytest.mark.timeout(300)

N = 20
RATE_LIMIT = 5


def fleet_table(bao: Bao, base: Path, *, path: str, lease: str = "5s") -> str:
    token = base / "vault-token"
    base.mkdir(parents=True, exist_ok=True)
    token.write_text(bao.root_token + "\n")
    token.chmod(0o600)
    return (
        f'store = "vault"\naddress = "{bao.address}"\nauth_method = "token"\n'
        f'token_file = "{token}"\nmount = "secret"\npath = "{path}"\nlease = "{lease}"'
    )


def secrets_under(bao: Bao, path: str) -> dict[str, dict[str, Any]]:
    """Every secret under ``path`` (``<fleet key>/<name>`` → its current data)."""
    kv = bao.client().secrets.kv.v2
    found: dict[str, dict[str, Any]] = {}
    try:
        keys = kv.list_secrets(path=path, mount_point="secret")["data"]["keys"]
    except hvac.exceptions.InvalidPath:  # nothing written yet
        return found
    for folder in keys:
        for name in kv.list_secrets(path=f"{path}/{folder}", mount_point="secret")["data"]["keys"]:
            answer = kv.read_secret_version(
                path=f"{path}/{folder}{name}", mount_point="secret", raise_on_deleted_version=False
            )
            found[f"{folder}{name}"] = answer["data"]["data"] or {}
    return found


def assert_no_secret(found: dict[str, dict[str, Any]], *secrets: str) -> None:
    text = json.dumps(found)
    for secret in secrets:
        assert secret not in text
        assert base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode() not in text


def test_vault_cold_mass_start_mints_once_and_a_rotation_once(tmp_path: Path, bao: Bao) -> None:
    path = f"fleet-{uuid.uuid4().hex[:8]}"
    with (
        TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, rate_limit=RATE_LIMIT) as server,
        fleet_of(
            base=tmp_path,
            token_url=server.url,
            fleet_table=fleet_table(bao, tmp_path, path=path),
            secret=CLIENT_SECRET,
            n=N,
        ) as fleet,
    ):
        first = fleet.wait_converged(server.issued, timeout=90)
        assert len(server.token_requests()) == 1, "a cold mass start asks once"
        roles = [a.status()["profiles"]["dvs"]["fleet"]["role"] for a in fleet.agents]
        assert roles.count("minter") == 1 and roles.count("adopter") == N - 1
        assert all(a.metric("dvs_agent_fleet_store_up") == 1 for a in fleet.agents)
        found = secrets_under(bao, path)
        tokens = [name for name in found if name.endswith("/token")]
        assert len(tokens) == 1 and first in found[tokens[0]]["value"]
        assert_no_secret(found, CLIENT_SECRET)

        rotated = "r0tated-" + CLIENT_SECRET
        server.set_secret(CLIENT_ID, rotated)
        before = len(server.token_requests())
        fleet.rotate(rotated)
        second = fleet.wait_converged(lambda: set(server.issued()) - {first}, timeout=90)
        assert second != first
        time.sleep(2)  # late pollers would show up now
        assert len(server.token_requests()) - before == 1, "a rotation costs one request"
        assert server.client_counts(CLIENT_ID).rate_limited == 0
        found = secrets_under(bao, path)
        assert len([name for name in found if name.endswith("/token")]) == 2
        assert_no_secret(found, CLIENT_SECRET, rotated)
        assert "Traceback" not in fleet.logs()


def holder_pid(bao: Bao, path: str) -> int | None:
    for name, data in secrets_under(bao, path).items():
        if name.endswith("/lease") and isinstance(data.get("value"), str):
            holder = json.loads(data["value"])["holder"]
            return int(str(holder).rpartition(":")[2])
    return None


def test_vault_holder_killed_during_its_request_is_replaced_within_the_lease(
    tmp_path: Path, bao: Bao
) -> None:
    path = f"fleet-{uuid.uuid4().hex[:8]}"
    lease = 3.0
    n = 10
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        server.enqueue(Fault.slow(120))  # the first token request hangs
        with fleet_of(
            base=tmp_path,
            token_url=server.url,
            fleet_table=fleet_table(bao, tmp_path, path=path, lease=f"{lease:g}s"),
            secret=CLIENT_SECRET,
            n=n,
        ) as fleet:
            assert server.wait_for_requests(1, timeout=60)
            assert wait_for(lambda: holder_pid(bao, path) is not None, timeout=10)
            pid = holder_pid(bao, path)
            holder = next(a for a in fleet.agents if a.proc is not None and a.proc.pid == pid)
            time.sleep(lease + 1)  # it renewed its lease while its request ran
            assert len(server.token_requests()) == 1, "nobody asked beside the holder"
            os.kill(pid, signal.SIGKILL)
            killed = time.time()
            assert server.wait_for_requests(2, timeout=30)
            taken_over = server.token_requests()[1].received_at - killed
            others = [a for a in fleet.agents if a is not holder]
            assert wait_for(
                lambda: len({a.token() for a in others}) == 1 and others[0].token() is not None,
                timeout=30,
            )
            assert others[0].token() in server.issued()
            asked = [(round(r.received_at - killed, 2), r.status) for r in server.token_requests()]
            assert len(asked) == 2, f"one agent took over, not all: {asked}"
            # a deadline, not a speed: the lease, Vault's whole-second clock, scheduling noise
            assert taken_over <= lease + 1 + 3, f"taken over after {taken_over:.1f}s"
            assert "Traceback" not in fleet.logs()
