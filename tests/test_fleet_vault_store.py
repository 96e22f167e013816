"""The Vault fleet store on a real OpenBao (DESIGN §13): KV v2 check-and-set semantics.

The coordinator's rules rest on these: a lease is taken by one agent only, renewed and released
only by its holder, and expires by Vault's clock; a generation is published once (newest wins);
markers are set and cleared; expired entries read as absent; errors are FleetStoreErrors that
name the store and what to check, with no token in them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import FleetStoreError
from agent.fleet.vault_store import VaultFleetStore
from agent.stores.vault.connection import VaultConnection
from tests.conftest import vault_auth
from tests.servers import Bao


@pytest.fixture
def token_file(tmp_path: Path, bao: Bao) -> Path:
    path = tmp_path / "token"
    path.write_text(bao.root_token + "\n")
    path.chmod(0o600)
    return path


def store_for(bao: Bao, token_file: Path, path: str = "dvs-agent/fleet") -> VaultFleetStore:
    auth = vault_auth(
        bao.address, auth_method="token", token_file=str(token_file), config_key="fleet"
    )
    return VaultFleetStore(VaultConnection(auth), mount="secret", path=path, config_key="fleet")


@pytest.fixture
def store(bao: Bao, token_file: Path) -> Iterator[VaultFleetStore]:
    made = store_for(bao, token_file)
    yield made
    made.close()


def fleet_key() -> str:
    return uuid.uuid4().hex * 2


def test_an_empty_key_reads_as_absent(store: VaultFleetStore) -> None:
    snap = store.read(fleet_key())
    assert (snap.token, snap.lease, snap.marker, snap.generation) == (None, None, None, 0)
    assert abs(snap.now - time.time()) < 5  # Vault's clock (the same host here)


def test_publish_takes_each_generation_once(store: VaultFleetStore) -> None:
    key = fleet_key()
    assert store.publish(key, b'{"doc":1}', 1, 60)
    assert not store.publish(key, b'{"doc":"stale"}', 1, 60), "generation 1 is taken"
    assert not store.publish(key, b'{"doc":"skip"}', 3, 60), "only the next generation"
    snap = store.read(key)
    assert snap.generation == 1
    assert snap.token is not None and snap.token.value == b'{"doc":1}'
    assert snap.token.remaining is not None and 58 < snap.token.remaining <= 61
    assert store.publish(key, b'{"doc":2}', 2, 60)
    snap = store.read(key)
    assert (snap.generation, snap.token and snap.token.value) == (2, b'{"doc":2}')


def test_concurrent_publishes_of_one_generation_have_one_winner(store: VaultFleetStore) -> None:
    key = fleet_key()
    results: list[bool] = []
    start = threading.Barrier(6)

    def one(n: int) -> None:
        start.wait()
        results.append(store.publish(key, f'{{"n":{n}}}'.encode(), 1, 60))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False] * 5 + [True]


def test_the_lease_has_one_holder_and_only_it_renews_and_releases(
    store: VaultFleetStore,
) -> None:
    key = fleet_key()
    assert store.acquire(key, b"holder-a", 30)
    assert not store.acquire(key, b"holder-b", 30), "a live lease is not taken"
    snap = store.read(key)
    assert snap.lease is not None and snap.lease.value == b"holder-a"
    assert not store.renew(key, b"holder-b", 30)
    assert store.renew(key, b"holder-a", 30)
    assert not store.release(key, b"holder-b")
    assert store.read(key).lease is not None
    assert store.release(key, b"holder-a")
    assert store.read(key).lease is None
    assert not store.release(key, b"holder-a"), "released once"
    assert store.acquire(key, b"holder-b", 30), "a released lease is free"


def test_a_lease_expires_by_vaults_clock_and_may_then_be_taken(store: VaultFleetStore) -> None:
    key = fleet_key()
    assert store.acquire(key, b"holder-a", 2)
    deadline = time.monotonic() + 10
    while store.read(key).lease is not None:
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.2)
    assert not store.renew(key, b"holder-a", 2), "an expired lease is not renewed"
    assert store.acquire(key, b"holder-b", 30)


def test_concurrent_acquires_have_one_winner(bao: Bao, token_file: Path) -> None:
    key = fleet_key()
    stores = [store_for(bao, token_file) for _ in range(6)]
    results: list[bool] = []
    start = threading.Barrier(len(stores))

    def one(n: int) -> None:
        start.wait()
        results.append(stores[n].acquire(key, f"holder-{n}".encode(), 30))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for made in stores:
        made.close()
    assert sorted(results) == [False] * 5 + [True]


def test_clear_lease_drops_any_live_lease(store: VaultFleetStore) -> None:
    key = fleet_key()
    assert not store.clear_lease(key)
    assert store.acquire(key, b"stuck", 300)
    assert store.clear_lease(key)
    assert store.read(key).lease is None
    assert not store.release(key, b"stuck")


def test_markers_are_set_expire_and_clear(store: VaultFleetStore) -> None:
    key = fleet_key()
    store.mark(key, b'{"not_before":1}', 60)
    marker = store.read(key).marker
    assert marker is not None and marker.value == b'{"not_before":1}'
    store.mark(key, None, 0)
    assert store.read(key).marker is None
    store.mark(key, b'{"short":1}', 1)
    deadline = time.monotonic() + 10
    while store.read(key).marker is not None:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_an_expired_token_reads_as_absent_but_keeps_its_generation(
    store: VaultFleetStore,
) -> None:
    key = fleet_key()
    assert store.publish(key, b'{"doc":1}', 1, 1)
    deadline = time.monotonic() + 10
    while store.read(key).token is not None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert store.read(key).generation == 1
    assert store.publish(key, b'{"doc":2}', 2, 60)


def test_a_deleted_token_version_reads_as_absent(bao: Bao, store: VaultFleetStore) -> None:
    key = fleet_key()
    assert store.publish(key, b'{"doc":1}', 1, 60)
    bao.client().secrets.kv.v2.delete_latest_version_of_secret(
        path=store.secret(key, "token"), mount_point="secret"
    )
    snap = store.read(key)
    assert snap.token is None and snap.generation == 1
    assert store.publish(key, b'{"doc":2}', 2, 60)


def test_a_foreign_secret_under_the_path_is_named(bao: Bao, store: VaultFleetStore) -> None:
    key = fleet_key()
    bao.client().secrets.kv.v2.create_or_update_secret(
        path=store.secret(key, "token"), secret={"something": "else"}, mount_point="secret"
    )
    with pytest.raises(FleetStoreError, match=r"is not what the agent writes.*fleet\.path"):
        store.read(key)


def test_an_unknown_mount_is_named(bao: Bao, token_file: Path) -> None:
    auth = vault_auth(bao.address, auth_method="token", token_file=str(token_file))
    store = VaultFleetStore(VaultConnection(auth), mount="no-such-kv", path="f", config_key="fleet")
    with pytest.raises(FleetStoreError) as caught:
        store.publish(fleet_key(), b"{}", 1, 60)
    assert "no-such-kv" in str(caught.value)
    assert bao.root_token not in str(caught.value)


def test_a_denied_token_names_the_policy_and_never_the_token(bao: Bao, tmp_path: Path) -> None:
    client = bao.client()
    client.sys.create_or_update_policy(
        name="fleet-elsewhere", policy='path "secret/data/elsewhere/*" { capabilities = ["read"] }'
    )
    token = client.auth.token.create(policies=["fleet-elsewhere"], ttl="1h")["auth"]["client_token"]
    path = tmp_path / "limited-token"
    path.write_text(token)
    store = store_for(bao, path)
    with pytest.raises(FleetStoreError) as caught:
        store.read(fleet_key())
    text = str(caught.value)
    assert "create, update and read on secret/data/dvs-agent/fleet/*" in text
    assert token not in text and bao.root_token not in text


def test_vault_down_is_a_fleet_store_error(tmp_path: Path, token_file: Path) -> None:
    from tests.servers import free_port

    auth = vault_auth(
        f"http://127.0.0.1:{free_port()}",
        auth_method="token",
        token_file=str(token_file),
        timeout=2,
    )
    store = VaultFleetStore(VaultConnection(auth), mount="secret", path="f", config_key="fleet")
    with pytest.raises(FleetStoreError, match="cannot reach Vault"):
        store.read(fleet_key())
