"""The Redis fleet store on a real redis-server (DESIGN §13): the semantics the coordinator
rests on, with the README's least-privilege ACL user, and errors that say what to grant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import FleetStoreError
from agent.fleet.redis import DEFAULT_KEY_PREFIX, RedisFleetConfig
from agent.fleet.redis_store import RedisFleetStore
from tests.servers import RedisServer, redis_server

#: the README's ACL line for the fleet's user, word for word after "ACL SETUSER dvs-agent"
README_ACL = (
    "on >fleet-pw ~dvs-agent:fleet:* resetchannels -@all +eval +evalsha +get +set +del "
    "+pexpire +pttl +time"
)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def store_as(redis: RedisServer, tmp_path: Path, user: str, password: str) -> RedisFleetStore:
    path = tmp_path / f"{user}-password"
    path.write_text(password + "\n")
    config = RedisFleetConfig(url=redis.url(), username=user, password_file=str(path))
    return RedisFleetStore(config, config_key="profiles.dvs.fleet")


def key() -> str:
    return uuid.uuid4().hex * 2


def test_the_readme_acl_user_can_do_everything_the_fleet_does(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    admin = own_redis.client()
    admin.execute_command("ACL", "SETUSER", "dvs-agent", *README_ACL.split())
    admin.close()
    store = store_as(own_redis, tmp_path, "dvs-agent", "fleet-pw")
    k = key()
    try:
        assert store.read(k).generation == 0
        assert store.acquire(k, b"holder", 30)
        assert not store.acquire(k, b"other", 30)
        assert store.renew(k, b"holder", 30)
        assert not store.renew(k, b"other", 30)
        assert store.publish(k, b'{"doc":1}', 1, 60)
        assert not store.publish(k, b'{"doc":"stale"}', 1, 60), "newest wins"
        store.mark(k, b'{"not_before":1}', 10)
        snap = store.read(k)
        assert snap.generation == 1 and snap.token is not None and snap.marker is not None
        assert snap.token.remaining is not None and 55 < snap.token.remaining <= 60
        store.mark(k, None, 0)
        assert not store.release(k, b"other")
        assert store.release(k, b"holder")
        assert store.acquire(k, b"stuck", 600)
        assert store.clear_lease(k)
        assert store.read(k).lease is None and store.read(k).marker is None
    finally:
        store.close()


def test_a_user_without_the_grants_is_told_what_to_grant(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    admin = own_redis.client()
    admin.execute_command(
        "ACL", "SETUSER", "narrow", "on", ">narrow-pw", "~dvs-agent:fleet:*", "-@all", "+get"
    )
    admin.close()
    store = store_as(own_redis, tmp_path, "narrow", "narrow-pw")
    try:
        with pytest.raises(FleetStoreError) as caught:
            store.read(key())
    finally:
        store.close()
    text = str(caught.value)
    assert "the ACL user narrow needs +eval +evalsha +get +set +del +pexpire +pttl +time" in text
    assert f"~{DEFAULT_KEY_PREFIX}*" in text and "narrow-pw" not in text


def test_a_wrong_password_names_the_keys_and_never_the_password(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    store = store_as(own_redis, tmp_path, "default", "not-the-password")
    try:
        with pytest.raises(FleetStoreError) as caught:
            store.read(key())
    finally:
        store.close()
    text = str(caught.value)
    assert "rejected the credentials of user default" in text
    assert "profiles.dvs.fleet.username and profiles.dvs.fleet.password_file" in text
    assert "not-the-password" not in text


def test_a_generation_survives_the_token_s_expiry(tmp_path: Path, redis: RedisServer) -> None:
    path = tmp_path / "pw"
    path.write_text(redis.password)
    store = RedisFleetStore(RedisFleetConfig(url=redis.url(), password_file=str(path)))
    k = key()
    try:
        assert store.publish(k, b'{"doc":1}', 1, 0.05)
        client = redis.client()
        client.delete(store.keys(k)[0])  # as if it expired
        client.close()
        snap = store.read(k)
        assert snap.token is None and snap.generation == 1
        assert not store.publish(k, b'{"doc":"old"}', 1, 60), "generation 1 was taken"
        assert store.publish(k, b'{"doc":2}', 2, 60)
    finally:
        store.close()
