"""Fleet mode on a real redis-server, with agents as processes (DESIGN §13, issue 13).

Twenty ``dvs-agent run`` processes of one client share one Redis: one token request at a cold
mass start, one per token lifetime, one after a rotation; the lease holder SIGKILLed while its
request hangs is replaced; Redis stopped, each agent keeps its token and asks on its own, Redis
back, the fleet converges; rejected credentials cost the fleet one request per backoff period;
agents of other credentials or endpoints never adopt each other's token; the store never holds
the client secret.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.devserver import Fault, TokenServer
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_for
from tests.fleet_agents import Fleet, fleet_of
from tests.servers import RedisServer, redis_binary, redis_server

pytestmark = pytest.mark.timeout(300)

N = 20
#: token requests per second per client the test token server admits (the seed's 429)
RATE_LIMIT = 5


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (it may be stopped and started again)."""
    with redis_server(tmp_path / "redis") as server:
        yield server


def fleet_table(redis: RedisServer, base: Path, *, lease: str = "5s", prefix: str) -> str:
    password = base / "redis-password"
    base.mkdir(parents=True, exist_ok=True)
    password.write_text(redis.password + "\n")
    password.chmod(0o600)
    return (
        f'store = "redis"\nurl = "{redis.url()}"\npassword_file = "{password}"\n'
        f'lease = "{lease}"\nkey_prefix = "{prefix}"'
    )


def successful(server: TokenServer) -> list[float]:
    """Arrival times of the token requests answered 200."""
    return [r.received_at for r in server.token_requests() if r.status == 200]


def store_values(redis: RedisServer, prefix: str) -> dict[bytes, bytes]:
    client = redis.client()
    try:
        found: dict[bytes, bytes] = {}
        for key in client.scan_iter(match=f"{prefix}*"):
            value = client.get(key)
            if value is not None:
                found[key] = value
        return found
    finally:
        client.close()


def assert_no_secret(values: dict[bytes, bytes], *secrets: str) -> None:
    for secret in secrets:
        basic = base64.b64encode(f"{CLIENT_ID}:{secret}".encode())
        for key, value in values.items():
            assert secret.encode() not in value and secret.encode() not in key, key
            assert basic not in value, key


def test_cold_mass_start_mints_once_and_a_rotation_once(tmp_path: Path, redis: RedisServer) -> None:
    prefix = "t-cold:"
    with (
        # the rate limit a fleet of 20 on its own would run into at once
        TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, rate_limit=RATE_LIMIT) as server,
        fleet_of(
            base=tmp_path,
            token_url=server.url,
            fleet_table=fleet_table(redis, tmp_path, prefix=prefix),
            secret=CLIENT_SECRET,
            n=N,
        ) as fleet,
    ):
        first = fleet.wait_converged(server.issued)
        assert len(server.token_requests()) == 1, "a cold mass start asks once"
        # every agent is ready and knows its role; exactly one minted
        roles = [a.status()["profiles"]["dvs"]["fleet"]["role"] for a in fleet.agents]
        assert sorted(roles).count("minter") == 1 and roles.count("adopter") == N - 1
        adoptions = sum(a.metric("dvs_agent_fleet_adoptions_total", 0.0) or 0 for a in fleet.agents)
        assert adoptions == N - 1
        asked = sum(
            a.metric("dvs_agent_token_requests_total", 0.0, outcome="ok") or 0 for a in fleet.agents
        )
        assert asked == 1, "adoption is never counted as a token request"
        # the JSON log lines carry the generation and the minter, for ops to follow
        adopted = [
            json.loads(line)
            for line in fleet.logs().splitlines()
            if '"event":"fleet_adopted"' in line
        ]
        assert len(adopted) == N - 1
        assert {(a["generation"], a["holder"].count(":")) for a in adopted} == {(1, 1)}
        # the document holds the token (documented), never the client secret
        values = store_values(redis, prefix)
        assert any(first.encode() in v for v in values.values())
        assert_no_secret(values, CLIENT_SECRET)

        # a rotation: every agent notices it at its next poll; the new credentials' fleet
        # asks once, and every file holds its token
        rotated = "r0tated-" + CLIENT_SECRET
        server.set_secret(CLIENT_ID, rotated)
        before = len(server.token_requests())
        fleet.rotate(rotated)
        second = fleet.wait_converged(lambda: set(server.issued()) - {first})
        assert second != first
        time.sleep(2)  # late pollers would show up now
        assert len(server.token_requests()) - before == 1, "a rotation costs one request"
        assert all(r.status == 200 for r in server.token_requests())
        assert server.client_counts(CLIENT_ID).rate_limited == 0
        values = store_values(redis, prefix)
        tokens = [k for k in values if k.endswith(b":token")]
        assert len(tokens) == 2, "the rotated credentials have a fleet key of their own"
        assert_no_secret(values, CLIENT_SECRET, rotated)
        assert "Traceback" not in fleet.logs()


def test_one_mint_per_token_lifetime(tmp_path: Path, redis: RedisServer) -> None:
    """6 s tokens replaced 3 s after issue: over 12 s, about 4 requests for the fleet (20
    agents on their own would make about 80)."""
    prefix = "t-life:"
    with (
        TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=6) as server,
        fleet_of(
            base=tmp_path,
            token_url=server.url,
            fleet_table=fleet_table(redis, tmp_path, prefix=prefix, lease="2s"),
            secret=CLIENT_SECRET,
            n=N,
            refresh_before_expiry="3s",
            poll="30s",
        ) as fleet,
    ):
        fleet.wait_converged(server.issued)
        start = time.monotonic()
        begun = len(successful(server))
        expired: list[int] = []
        while time.monotonic() - start < 12:
            now = time.time()
            issued = server.issued()
            for agent in fleet.agents:  # every file holds a token that is still valid
                token = agent.token()
                entry = issued.get(token or "")
                if entry is None or entry.expires_at <= now:
                    expired.append(agent.index)
            time.sleep(0.2)
        minted = len(successful(server)) - begun
        assert not expired, f"agents {sorted(set(expired))} held an expired token"
        # 12 s / 3 s = 4 lifetimes; one more for a boundary
        assert 3 <= minted <= 5, f"{minted} requests in 12 s (one per 3 s expected)"
        fleet.wait_converged(server.issued, timeout=10)


def holder_pid(redis: RedisServer, prefix: str) -> int | None:
    for key, value in store_values(redis, prefix).items():
        if key.endswith(b":lease"):
            holder = json.loads(value)["holder"]
            return int(str(holder).rpartition(":")[2])
    return None


def test_holder_killed_during_its_request_is_replaced_within_the_lease(
    tmp_path: Path, redis: RedisServer
) -> None:
    prefix = "t-kill:"
    lease = 2.0
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        server.enqueue(Fault.slow(120))  # the first token request hangs
        with fleet_of(
            base=tmp_path,
            token_url=server.url,
            fleet_table=fleet_table(redis, tmp_path, prefix=prefix, lease=f"{lease:g}s"),
            secret=CLIENT_SECRET,
            n=N,
        ) as fleet:
            assert server.wait_for_requests(1, timeout=60)
            assert wait_for(lambda: holder_pid(redis, prefix) is not None, timeout=10)
            pid = holder_pid(redis, prefix)
            holder = next(a for a in fleet.agents if a.proc is not None and a.proc.pid == pid)
            time.sleep(lease)  # it renewed its lease while its request ran
            assert len(server.token_requests()) == 1, "nobody asked beside the holder"
            os.kill(pid, signal.SIGKILL)
            killed = time.time()
            assert server.wait_for_requests(2, timeout=30)
            taken_over = server.token_requests()[1].received_at - killed
            others = [a for a in fleet.agents if a is not holder]
            token = None
            deadline = time.monotonic() + 30
            while token is None and time.monotonic() < deadline:
                held = {a.token() for a in others}
                token = held.pop() if len(held) == 1 and None not in held else None
                time.sleep(0.1)
            assert token is not None and token in server.issued()
            assert len(server.token_requests()) == 2, "one agent took over, not all"
            # a deadline, not a speed: the lease, its last renewal's third and scheduling noise
            assert taken_over <= lease + 1 + 3, f"taken over after {taken_over:.1f}s"
            assert any('"event":"fleet_lease_expired"' in a.log() for a in others)


def test_redis_down_each_agent_keeps_its_token_and_asks_alone_then_converges(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    prefix = "t-down:"
    n = 10
    # 40 s tokens replaced 20 s before expiry: with the store down each agent asks at a moment
    # of its own within the next 10 s (half the time left), under a limit of 6 requests/s
    with (
        TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=40, rate_limit=6) as server,
        fleet_of(
            base=tmp_path,
            token_url=server.url,
            fleet_table=fleet_table(own_redis, tmp_path, prefix=prefix, lease="2s"),
            secret=CLIENT_SECRET,
            n=n,
            refresh_before_expiry="20s",
            poll="60s",
        ) as fleet,
    ):
        fleet.wait_converged(server.issued)
        assert len(successful(server)) == 1
        own_redis.stop()

        # each agent notices at its next refresh, keeps its token and asks alone (spread)
        def all_down() -> bool:
            return all(a.metric("dvs_agent_fleet_store_up") == 0 for a in fleet.agents)

        assert wait_for(all_down, timeout=45)
        assert wait_for(lambda: len(set(fleet.tokens())) == n, timeout=30), "each asks alone"
        now = time.time()
        issued = server.issued()
        for agent in fleet.agents:
            entry = issued[agent.token() or ""]
            assert entry.expires_at > now
            assert agent.status()["profiles"]["dvs"]["state"] == "ok"
        alone = sorted(r.received_at for r in server.token_requests()[1:])
        assert alone[-1] - alone[0] > 0.3, "the fleet's lone requests are spread, not at once"
        assert server.client_counts(CLIENT_ID).rate_limited == 0, "no 429 at the rate limit"

        # Redis back (same port): the next refreshes find the store and converge on one token
        config = own_redis.process.args[1] if own_redis.process is not None else None
        assert config is not None
        log = open(tmp_path / "redis" / "redis-again.log", "wb")  # noqa: SIM115
        again = subprocess.Popen([redis_binary(), str(config)], stdout=log, stderr=log)
        try:
            fleet.wait_converged(server.issued, timeout=90)
            assert wait_for(
                lambda: all(a.metric("dvs_agent_fleet_store_up") == 1 for a in fleet.agents),
                timeout=20,
            )
        finally:
            again.terminate()
            again.wait(10)
            log.close()


def test_rejected_credentials_cost_the_fleet_one_request_per_backoff(
    tmp_path: Path, redis: RedisServer
) -> None:
    prefix = "t-rej:"
    n = 10
    with (
        TokenServer(clients={CLIENT_ID: "not-the-secret-the-agents-hold"}) as server,
        fleet_of(
            base=tmp_path,
            token_url=server.url,
            fleet_table=fleet_table(redis, tmp_path, prefix=prefix, lease="2s"),
            secret=CLIENT_SECRET,
            n=n,
        ) as fleet,
    ):
        assert server.wait_for_requests(1, timeout=60)
        # every agent starts, finds the fleet's marker (rejected_until, ~1 min) and waits
        assert wait_for(
            lambda: sum('"event":"refresh_failed"' in a.log() for a in fleet.agents) == n,
            timeout=60,
        )
        time.sleep(3)
        statuses = {r.status for r in server.token_requests()}
        assert statuses == {401}
        # one agent's attempt: the request and the client's one re-read retry at most
        assert len(server.token_requests()) <= 2, len(server.token_requests())
        text = fleet.logs()
        assert "no agent of the fleet asks again before" in text
        assert_no_secret(store_values(redis, prefix), CLIENT_SECRET)


def test_other_credentials_or_endpoints_never_share(tmp_path: Path, redis: RedisServer) -> None:
    other_id, other_secret = "other-client", "an0ther-Secret"
    prefix = "t-mix:"
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET, other_id: other_secret}) as server:
        common = {"token_url": server.url, "n": 3}
        table = fleet_table(redis, tmp_path, prefix=prefix)
        other_url = server.url.replace("127.0.0.1", "localhost")
        fleets = [
            Fleet(base=tmp_path / "a", fleet_table=table, secret=CLIENT_SECRET, **common),  # type: ignore[arg-type]
            Fleet(
                base=tmp_path / "b",
                fleet_table=table,
                secret=other_secret,
                client_id=other_id,
                **common,  # type: ignore[arg-type]
            ),
            Fleet(
                base=tmp_path / "c",
                fleet_table=table,
                secret=CLIENT_SECRET,
                n=3,
                token_url=other_url,
            ),
        ]
        try:
            for fleet in fleets:
                fleet.start()
            tokens = [fleet.wait_converged(server.issued) for fleet in fleets]
        finally:
            for fleet in fleets:
                fleet.stop()
        assert len(set(tokens)) == 3, "each credential/endpoint pair has its own token"
        assert len(server.token_requests()) == 3
        by_client = {r.client_id for r in server.token_requests()}
        assert by_client == {CLIENT_ID, other_id}
