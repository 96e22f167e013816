"""``[profiles.NAME.fleet]``: the example's tables load when uncommented, and each store's
checks name the key and what to do (DESIGN §13)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.errors import ConfigError
from agent.fleet.redis import DEFAULT_KEY_PREFIX, RedisFleetConfig
from agent.fleet.vault import DEFAULT_PATH, VaultFleetConfig
from agent.sources.vault import VaultSourceConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "agent.example.toml"


def fleet_block(store: str) -> str:
    """The example's commented ``[profiles.dvs.fleet]`` table of ``store``."""
    text = EXAMPLE.read_text()
    tail = text.partition("# Fleet mode")[2]
    blocks = re.split(r"^# \[profiles\.dvs\.fleet\]\n", tail, flags=re.M)[1:]
    found = [b for b in blocks if f'# store = "{store}"' in b.splitlines()[0]]
    assert len(found) == 1, f"the example has one commented {store} fleet table"
    return re.split(r"\n#?\n", found[0])[0]  # it ends at a "#" line or a blank one


def uncomment(block: str, *, without: tuple[str, ...] = ()) -> str:
    keys = "|".join(re.escape(k) for k in without)
    skip = rf"(?!(?:{keys}) )" if keys else ""
    lines = re.findall(rf"^# ({skip}\w+ = .*?)(?:\s+#.*)?$", block, flags=re.M)
    return "[profiles.dvs.fleet]\n" + "\n".join(lines) + "\n"


def with_fleet(table: str, profile: str = "") -> str:
    return (
        f'[profiles.dvs]\n{profile}\n[[profiles.dvs.sinks]]\npath = "/run/dvs-agent/token"\n\n'
        f"{table}"
    )


def errors_of(table: str, profile: str = "") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(with_fleet(table, profile), source="agent.toml")
    return str(info.value).splitlines()


def test_the_example_redis_table_loads_when_uncommented(tmp_path: Path) -> None:
    sentinel_keys = ("sentinels", "service_name", "tls", "sentinel_username")
    table = uncomment(  # ca_cert must exist
        fleet_block("redis"), without=(*sentinel_keys, "sentinel_password_file", "ca_cert")
    )
    path = tmp_path / "agent.toml"
    path.write_text(with_fleet(table))
    fleet = load_config(path).profiles["dvs"].fleet
    assert isinstance(fleet, RedisFleetConfig)
    assert fleet.url == "rediss://redis.internal:6379/0"
    assert fleet.lease.total_seconds() == 30 and fleet.key_prefix == DEFAULT_KEY_PREFIX
    assert fleet.username == "dvs-agent" and not fleet.cluster


def test_the_example_sentinel_keys_load_instead_of_url(tmp_path: Path) -> None:
    table = uncomment(fleet_block("redis"), without=("url", "cluster", "ca_cert"))
    table = table.replace("tls = false", "tls = true")  # the example's sentinels are not local
    path = tmp_path / "agent.toml"
    path.write_text(with_fleet(table))
    fleet = load_config(path).profiles["dvs"].fleet
    assert isinstance(fleet, RedisFleetConfig)
    assert fleet.sentinels == ["10.0.0.11:26379", "10.0.0.12:26379", "10.0.0.13:26379"]
    assert fleet.service_name == "mymaster" and fleet.sentinel_username == "sentinel"


def test_the_example_vault_table_loads_when_uncommented(tmp_path: Path) -> None:
    table = uncomment(fleet_block("vault"), without=("ca_cert",))  # ca_cert must exist
    path = tmp_path / "agent.toml"
    path.write_text(with_fleet(table))
    fleet = load_config(path).profiles["dvs"].fleet
    assert isinstance(fleet, VaultFleetConfig)
    assert fleet.path == DEFAULT_PATH and fleet.mount == "secret"
    assert fleet.auth_method == "approle"


def test_no_fleet_table_no_fleet() -> None:
    assert parse_config(with_fleet("")).profiles["dvs"].fleet is None


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            'store = "redis"',
            "profiles.dvs.fleet: name the Redis server",
        ),
        (
            'store = "redis"\nurl = "redis://127.0.0.1"\nsentinels = ["127.0.0.1"]\n'
            'service_name = "m"',
            "profiles.dvs.fleet.sentinels: set url or sentinels, not both",
        ),
        (
            'store = "redis"\nurl = "redis://127.0.0.1"\nlease = "500ms"',
            "profiles.dvs.fleet.lease: must be at least 1s and at most 10m",
        ),
        (
            'store = "redis"\nurl = "redis://127.0.0.1"\nlease = "11m"',
            "profiles.dvs.fleet.lease: must be at least 1s and at most 10m",
        ),
        (
            'store = "redis"\nurl = "redis://redis.internal:6379/0"',
            "profiles.dvs.fleet.url: plain redis:// to redis.internal would send",
        ),
        (
            'store = "redis"\nsentinels = ["10.0.0.1:26379"]\nservice_name = "m"',
            "profiles.dvs.fleet.sentinels[0]: 10.0.0.1 is not loopback",
        ),
        (
            'store = "redis"\nsentinels = ["127.0.0.1:99999"]\nservice_name = "m"',
            'profiles.dvs.fleet.sentinels[0]: "127.0.0.1:99999": the port must be',
        ),
        (
            'store = "redis"\nsentinels = ["127.0.0.1"]',
            "profiles.dvs.fleet.service_name: required with sentinels",
        ),
        (
            'store = "redis"\nurl = "redis://127.0.0.1"\nservice_name = "m"',
            "profiles.dvs.fleet.service_name: only with sentinels",
        ),
        (
            'store = "redis"\nurl = "redis://127.0.0.1"\nusername = "u"',
            "profiles.dvs.fleet.username: a Redis user logs in with a password",
        ),
        (
            'store = "redis"\nurl = "redis://127.0.0.1"\nkey_prefix = "a{b}:"',
            "profiles.dvs.fleet.key_prefix: must not be empty nor hold",
        ),
        (
            'store = "redis"\nurl = "redis://127.0.0.1/2"\ncluster = true',
            "profiles.dvs.fleet.url: Redis Cluster has database 0 only",
        ),
        (
            'store = "redis"\nurl = "redis://127.0.0.1"\nshards = 3',
            "profiles.dvs.fleet.shards: unknown key",
        ),
        (
            'store = "memcached"',
            'profiles.dvs.fleet.store: invalid value "memcached"; expected one of: "redis", '
            '"vault"',
        ),
        (
            'store = "vault"\nlease = "2s"',
            "profiles.dvs.fleet.lease: must be at least 3s",
        ),
        (
            'store = "vault"\npath = "/dvs/fleet/"',
            "profiles.dvs.fleet.path: ",
        ),
        (
            'store = "vault"\naddress = ""',
            "profiles.dvs.fleet.address: must not be empty",
        ),
        (
            'store = "vault"\nrole_id_file = ""',
            "profiles.dvs.fleet.role_id_file: must not be empty",
        ),
        (
            'store = "vault"\nauth_method = "kerberos"',
            'profiles.dvs.fleet.auth_method: invalid value "kerberos"',
        ),
    ],
)
def test_each_check_names_the_key(table: str, expected: str) -> None:
    text = "\n".join(errors_of(f"[profiles.dvs.fleet]\n{table}\n"))
    assert expected in text


def test_the_vault_store_takes_the_profiles_vault_table() -> None:
    profile = (
        '[profiles.dvs.vault]\naddress = "https://vault.internal:8200"\nmount = "kv"\n'
        'auth_method = "token"\ntoken_file = "/run/vault/token"\n'
    )
    config = parse_config(with_fleet('[profiles.dvs.fleet]\nstore = "vault"\n', profile))
    fleet = config.profiles["dvs"].fleet
    assert isinstance(fleet, VaultFleetConfig) and fleet.mount is None
    from agent.sinks.vault import merged

    vault = merged(fleet, config.profiles["dvs"].vault)
    assert isinstance(vault, VaultSourceConfig)
    assert (vault.address, vault.mount, vault.auth_method) == (
        "https://vault.internal:8200",
        "kv",
        "token",
    )
    assert vault.path == DEFAULT_PATH


def test_the_vault_store_refuses_a_kv_v1_mount_it_would_take() -> None:
    profile = '[profiles.dvs.vault]\naddress = "https://v:8200"\nkv_version = 1\n'
    text = "\n".join(errors_of('[profiles.dvs.fleet]\nstore = "vault"\n', profile))
    assert "profiles.dvs.fleet.mount: the vault fleet store writes to a KV v2 engine" in text
