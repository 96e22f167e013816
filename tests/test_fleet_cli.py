"""The CLI of fleet mode on a real redis-server: ``check`` names the store, ``fleet release``
drops a stuck lease (whoever holds it) and says what it did, and its errors name the cause."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fleet.keys import FleetKeys
from agent.fleet.redis import RedisFleetConfig
from agent.fleet.redis_store import RedisFleetStore
from agent.models import Credentials, Secret
from tests.conftest import CLIENT_ID, CLIENT_SECRET, agent_env, run_cli
from tests.servers import RedisServer, redis_server

TOKEN_URL = "http://127.0.0.1:9/v1/oauth/token"
PREFIX = "t-cli:"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def config_with_fleet(tmp_path: Path, redis: RedisServer, *, fleet: bool = True) -> Path:
    password = tmp_path / "redis-password"
    password.write_text(redis.password + "\n")
    password.chmod(0o600)
    table = (
        f'[profiles.dvs.fleet]\nstore = "redis"\nurl = "{redis.url()}"\n'
        f'password_file = "{password}"\nkey_prefix = "{PREFIX}"\nlease = "10m"\n'
        if fleet
        else ""
    )
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path}/state"\n\n[profiles.dvs]\ntoken_url = "{TOKEN_URL}"\n'
        f'\n[[profiles.dvs.sinks]]\ntype = "file"\npath = "{tmp_path}/token"\n\n{table}'
    )
    return path


def store_of(redis: RedisServer, tmp_path: Path) -> tuple[RedisFleetStore, str]:
    password = tmp_path / "redis-password"
    config = RedisFleetConfig(url=redis.url(), password_file=str(password), key_prefix=PREFIX)
    credentials = Credentials(CLIENT_ID, Secret(CLIENT_SECRET), source="env", version="")
    return RedisFleetStore(config), FleetKeys.derive(credentials, TOKEN_URL, None).key


def test_fleet_release_drops_a_held_lease_once(tmp_path: Path, own_redis: RedisServer) -> None:
    config = config_with_fleet(tmp_path, own_redis)
    store, key = store_of(own_redis, tmp_path)
    try:
        assert store.acquire(key, b"a stuck holder", 600)
        done = run_cli("fleet", "release", "-c", str(config))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            f"dvs: released the mint lease in redis:127.0.0.1:{own_redis.port}/0"
        )
        assert store.read(key).lease is None
        again = run_cli("fleet", "release", "--profile", "dvs", "-c", str(config))
        assert again.returncode == 0, again.stderr
        assert "dvs: no mint lease was held" in again.stdout
    finally:
        store.close()
    assert CLIENT_SECRET not in done.stdout + done.stderr + again.stdout + again.stderr


def test_fleet_release_of_another_clients_fleet_leaves_it(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    config = config_with_fleet(tmp_path, own_redis)
    store, key = store_of(own_redis, tmp_path)
    try:
        assert store.acquire(key, b"holder", 600)
        env = agent_env(DVS_CLIENT_SECRET="another-secret")
        done = run_cli("fleet", "release", "-c", str(config), env=env)
        assert done.returncode == 0, done.stderr
        assert "no mint lease was held" in done.stdout
        assert store.read(key).lease is not None, "another secret is another fleet"
    finally:
        store.close()


def test_fleet_release_without_a_fleet_table_is_a_config_error(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    config = config_with_fleet(tmp_path, own_redis, fleet=False)
    done = run_cli("fleet", "release", "-c", str(config))
    assert done.returncode == 64
    assert "name the profile with --profile (with a fleet table: none)" in done.stderr
    named = run_cli("fleet", "release", "--profile", "dvs", "-c", str(config))
    assert named.returncode == 78
    assert "profile dvs has no [profiles.dvs.fleet] table" in named.stderr
    unknown = run_cli("fleet", "release", "--profile", "nope", "-c", str(config))
    assert unknown.returncode == 78 and "--profile nope: no such profile" in unknown.stderr


def test_fleet_release_with_redis_down_says_so(tmp_path: Path, own_redis: RedisServer) -> None:
    config = config_with_fleet(tmp_path, own_redis)
    own_redis.stop()
    done = run_cli("fleet", "release", "-c", str(config))
    assert done.returncode == 69, (done.stdout, done.stderr)
    assert f"cannot reach Redis at 127.0.0.1:{own_redis.port}/0" in done.stderr
    assert "check profiles.dvs.fleet.url" in done.stderr
    assert own_redis.password not in done.stderr and "Traceback" not in done.stderr


def test_check_names_the_fleet_store(tmp_path: Path, own_redis: RedisServer) -> None:
    config = config_with_fleet(tmp_path, own_redis)
    done = run_cli("check", "-c", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"fleet store redis redis://127.0.0.1:{own_redis.port}/0 (lease 600s)" in done.stdout
    plugins = done.stdout.partition("plug-ins in use:\n")[2]
    assert "  fleet redis: dvs-agent " in plugins
