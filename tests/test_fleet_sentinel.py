"""Fleet mode on Redis Sentinel and Redis Cluster, with agents as processes (DESIGN §13).

Sentinel: eight agents share one token through a master watched by three sentinels; the master
is SIGKILLed just before the fleet's next refresh; the sentinels promote the replica, and the
fleet, which kept valid tokens in every file all along, follows the new master and converges on
one token again without a 429. Cluster: five agents that name one node of a three-master
cluster mint once at a cold start, and the fleet's keys share one slot.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.devserver import TokenServer
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_for
from tests.fleet_agents import Fleet, fleet_of
from tests.redis_topologies import ClusterTopology, SentinelTopology, redis_cluster, redis_sentinel

pytestmark = pytest.mark.timeout(300)

#: token requests per second per client the test token server admits (cluster test): below the
#: fleet's size, so that a fleet asking at once (uncoordinated) would see 429s
RATE_LIMIT = 5
#: token lifetime (s) and the margin: every token is replaced 4 s after it was minted
LIFETIME = 8
REFRESH_BEFORE = 4
REFRESH_EVERY = LIFETIME - REFRESH_BEFORE


def password_file(base: Path, password: str) -> Path:
    """A 0600 file holding ``password`` (with a newline, as editors leave it)."""
    base.mkdir(parents=True, exist_ok=True)
    path = base / "redis-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def sentinel_table(topology: SentinelTopology, base: Path, *, prefix: str, lease: str) -> str:
    sentinels = ", ".join(f'"{entry}"' for entry in topology.sentinel_entries)
    return (
        f'store = "redis"\nsentinels = [{sentinels}]\n'
        f'service_name = "{topology.service_name}"\n'
        f'password_file = "{password_file(base, topology.password)}"\n'
        f'lease = "{lease}"\nkey_prefix = "{prefix}"'
    )


def cluster_table(topology: ClusterTopology, base: Path, *, prefix: str) -> str:
    return (
        f'store = "redis"\nurl = "{topology.url(0)}"\ncluster = true\n'
        f'password_file = "{password_file(base, topology.password)}"\n'
        f'lease = "5s"\nkey_prefix = "{prefix}"'
    )


@dataclass
class Sampler:
    """Reads every agent's token file every ``step`` s in a thread and notes each moment one
    is missing, empty, not a token the server minted, or expired."""

    fleet: Fleet
    server: TokenServer
    step: float = 0.1
    samples: int = 0
    bad: list[tuple[float, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            now = time.time()  # before the reads: a token that expires meanwhile is not blamed
            issued = self.server.issued()
            for agent in self.fleet.agents:
                token = agent.token()
                entry = issued.get(token or "")
                if not token:
                    self.bad.append((now, agent.index, "no token"))
                elif entry is None:
                    self.bad.append((now, agent.index, f"unknown token {token[:8]}"))
                elif entry.expires_at <= now:
                    late = now - entry.expires_at
                    self.bad.append((now, agent.index, f"{token[:8]} expired {late:.2f}s ago"))
            self.samples += 1
            self._stop.wait(self.step)

    @contextmanager
    def running(self) -> Iterator[Sampler]:
        """Sampling while the context runs."""
        thread = threading.Thread(target=self.run, name="token-sampler", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(10)


def shared_document(topology: SentinelTopology, prefix: str) -> tuple[dict[str, object], float]:
    """The fleet's token document on the current master and the master's clock (s)."""
    client = topology.client()
    try:
        keys = list(client.scan_iter(match=f"{prefix}*:token"))
        assert len(keys) == 1, keys
        document = json.loads(client.get(keys[0]))
        seconds, micros = client.time()
        return document, seconds + micros / 1e6
    finally:
        client.close()


@pytest.mark.parametrize(
    ("kill", "rate_limit"),
    [
        # the failover (~2.4 s) falls between two refreshes (4 s apart): the agents' pooled
        # connections to the dead master fail at their next read, which is retried at once on a
        # new connection to the master the sentinels name; nobody sees the store down, and a
        # limit below the fleet's size stays clear
        pytest.param("between-refreshes", 5, id="between-refreshes"),
        # the failover covers the fleet's refresh: the agents find the store down, each mints
        # on its own at a moment drawn within half the token's remaining life (2 s for 8 s
        # tokens), then rejoin. Eight requests drawn over 2 s reach 6 in one second in most
        # runs and 8 in some (simulated: 70% >= 6, 6% >= 8 with every agent alone), so the
        # limit a correct fleet never exceeds here is the fleet's size: a 429 would mean an
        # agent asked twice in one second (a retry loop after the failover)
        pytest.param("at-refresh", 8, id="at-refresh"),
    ],
)
def test_sentinel_failover_keeps_every_token_valid_and_the_fleet_follows(
    tmp_path: Path, kill: str, rate_limit: int
) -> None:
    n = 8
    prefix = "t-sentinel:"
    with (
        redis_sentinel(tmp_path / "sentinel") as topology,
        TokenServer(
            clients={CLIENT_ID: CLIENT_SECRET}, expires_in=LIFETIME, rate_limit=rate_limit
        ) as server,
    ):
        started = time.monotonic()
        with (
            fleet_of(
                base=tmp_path / "fleet",
                token_url=server.url,
                fleet_table=sentinel_table(topology, tmp_path / "fleet", prefix=prefix, lease="5s"),
                secret=CLIENT_SECRET,
                n=n,
                refresh_before_expiry=f"{REFRESH_BEFORE}s",
                poll="30s",
            ) as fleet,
            ExitStack() as stack,
        ):
            first = fleet.wait_converged(server.issued)
            assert len(server.token_requests()) == 1, "a cold start asks once"
            # from now on every file must hold a valid token at every moment
            sampler = stack.enter_context(Sampler(fleet, server).running())
            # two lifetimes of the fleet on a healthy master: one token at a time
            time.sleep(2 * REFRESH_EVERY)
            held = fleet.wait_converged(server.issued, timeout=10)
            assert held != first, "the fleet replaced its first token"

            # the next token, just published: its refresh is REFRESH_EVERY away
            held = fleet.wait_converged(lambda: set(server.issued()) - {held})
            document, redis_now = shared_document(topology, prefix)
            due = float(document["refresh_at"]) - redis_now  # type: ignore[arg-type]
            assert due > REFRESH_EVERY - 1.5, f"the fleet's refresh is due in {due:.1f}s"
            if kill == "at-refresh":
                # the sentinels deem the master down ~1 s after the kill, then elect and promote:
                # the agents' reads (refresh_at + up to 1 s) fall into the failover
                time.sleep(due - 0.3)
            old = topology.kill_master()
            killed = time.time()
            new = topology.wait_failover(old, timeout=60)
            failed_over = time.time()
            assert new != old

            # the fleet finds the new master and converges on a token minted after the failover
            after = fleet.wait_converged(
                lambda: {t for t, e in server.issued().items() if e.issued_at > failed_over},
                timeout=60,
            )
            # and stays on one token per lifetime on the new master
            time.sleep(2 * REFRESH_EVERY)
            settled = fleet.wait_converged(server.issued, timeout=10)
            assert settled != after
            assert wait_for(
                lambda: all(a.metric("dvs_agent_fleet_store_up") == 1 for a in fleet.agents),
                timeout=3 * REFRESH_EVERY,
            ), [a.metric("dvs_agent_fleet_store_up") for a in fleet.agents]
            assert all(a.alive() for a in fleet.agents)
            elapsed = time.monotonic() - started

        logs = fleet.logs()
        requests = server.token_requests()
        down = [a.index for a in fleet.agents if '"event":"fleet_store_down"' in a.log()]
        alone = [r for r in requests if killed <= r.received_at <= failed_over]
        print(
            f"\n{kill}: failover {failed_over - killed:.1f}s; {len(requests)} token requests in "
            f"{elapsed:.0f}s, {len(alone)} during the failover; agents {down} saw the store "
            f"down; {sampler.samples} samples of every file"
        )
        assert sampler.samples > 100
        assert not sampler.bad, f"token files not valid at some moment: {sampler.bad[:20]}"
        # Unshared, n agents would ask n times per refresh interval: n * lifetimes (~70 here).
        # The fleet asks once per interval (+1 for the boundaries), and when the failover
        # covers a refresh each agent at most once more, on its own (DESIGN §13: the store
        # down, it mints alone, jittered, and rejoins at its next refresh)
        lifetimes = elapsed / REFRESH_EVERY
        bound = int(lifetimes) + 1 + (n if kill == "at-refresh" else 0)
        assert len(requests) <= bound, f"{len(requests)} requests > {bound} in {elapsed:.0f}s"
        assert len(requests) < n * lifetimes / 3
        if kill == "between-refreshes":
            assert not down, f"agents {down} saw the store down"
        assert all(r.status == 200 for r in requests), {r.status for r in requests}
        assert server.client_counts(CLIENT_ID).rate_limited == 0
        assert "Traceback" not in logs


def test_cluster_cold_start_mints_once_and_keeps_the_keys_in_one_slot(tmp_path: Path) -> None:
    n = 5
    prefix = "t-cluster:"
    with (
        redis_cluster(tmp_path / "cluster") as topology,
        TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, rate_limit=RATE_LIMIT) as server,
        fleet_of(
            base=tmp_path / "fleet",
            token_url=server.url,
            fleet_table=cluster_table(topology, tmp_path / "fleet", prefix=prefix),
            secret=CLIENT_SECRET,
            n=n,
        ) as fleet,
    ):
        token = fleet.wait_converged(server.issued)
        time.sleep(1)  # late askers would show up now
        assert len(server.token_requests()) == 1, "a cold start asks once"
        assert fleet.converged(server.issued) == token
        assert all(a.metric("dvs_agent_fleet_store_up") == 1 for a in fleet.agents)
        assert server.client_counts(CLIENT_ID).rate_limited == 0

        client = topology.client()
        try:
            found = [
                key
                for node in client.get_primaries()
                for key in client.scan_iter(match=f"{prefix}*", target_nodes=node)
            ]
            tokens = [k for k in found if k.endswith(b":token")]
            assert len(tokens) == 1, found
            tag = tokens[0][len(prefix) : -len(b":token")]
            assert tag.startswith(b"{") and tag.endswith(b"}"), tokens[0]
            assert client.exists(tokens[0]) == 1
            assert token.encode() in client.get(tokens[0])
            names = [tokens[0][: -len(b"token")] + s for s in (b"token", b"lease", b"generation")]
            assert len({client.keyslot(name) for name in names}) == 1
            # what was stored, on one node: the token and the generation (the lease released)
            assert set(found) <= set(names) | {tokens[0][: -len(b"token")] + b"marker"}
            assert len({client.keyslot(k) for k in found}) == 1
        finally:
            client.close()
        assert "Traceback" not in fleet.logs()
