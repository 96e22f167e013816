"""agent.config: the TOML schema, durations, modes, key-path errors and cross-field checks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest

from agent.config import (
    DEFAULT_CONFIG_PATH,
    AgentSection,
    Config,
    HealthSection,
    RotationConfig,
    load_config,
    parse_config,
    parse_duration,
    resolve_config_path,
)
from agent.errors import ConfigError
from agent.registry import Registry
from agent.sinks.aws import AwsSinkConfig
from agent.sinks.aws import merged as aws_merged
from agent.sinks.file import FileSinkConfig
from agent.sinks.redis import DEFAULT_REDIS_URL, RedisSinkConfig
from agent.sinks.vault import VaultSinkConfig
from agent.sinks.vault import merged as vault_merged
from agent.sources.aws import AwsSourceConfig
from agent.sources.env import EnvSourceConfig
from agent.sources.vault import VaultSourceConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "agent.example.toml"
DEV = ROOT / "config" / "dev.toml"

MINIMAL = """
[[profiles.dvs.sinks]]
path = "/run/dvs-agent/token"
"""


def profile_toml(profile: str = "", sink: str = "", *, top: str = "") -> str:
    """One profile `dvs` with one file sink; extra lines go into each table."""
    return (
        f"{top}\n[profiles.dvs]\n{profile}\n"
        f'[[profiles.dvs.sinks]]\npath = "/run/dvs-agent/token"\n{sink}\n'
    )


def file_sink(config: Config, index: int = 0, profile: str = "dvs") -> FileSinkConfig:
    sink = config.profiles[profile].sinks[index]
    assert isinstance(sink, FileSinkConfig)
    return sink


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="agent.toml")
    message = str(info.value)
    assert message.startswith("agent.toml: ")
    return message


# ------------------------------------------------------------------------ shipped config files


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert list(config.profiles) == ["dvs"]
    assert file_sink(config).path == "/run/dvs-agent/token"


def test_example_config_shows_the_defaults() -> None:
    config = load_config(EXAMPLE)
    assert config.agent == AgentSection()
    assert config.health == HealthSection()
    profile = config.profiles["dvs"]
    # the [vault] and [aws] tables are there to document their keys, each at its default
    assert profile == Registry().schema().profile(
        sinks=profile.sinks, vault=VaultSourceConfig(), aws=AwsSourceConfig()
    )
    assert profile.sinks == [FileSinkConfig(path="/run/dvs-agent/token")]


def test_example_config_production_alternative_loads(tmp_path: Path) -> None:
    """Uncommenting the `sources` alternative and the two required keys gives a valid config."""
    text = EXAMPLE.read_text()
    for commented, line in (
        ('# sources = ["vault", "aws", "env"]', 'sources = ["vault", "aws", "env"]'),
        ('# path = "dvs/osigu"', 'path = "dvs/osigu"'),
        ('# secret_id = "dvs/osigu"', 'secret_id = "dvs/osigu"'),
        ('# address = "https://vault.internal:8200"', 'address = "https://vault.internal:8200"'),
        ('# region = "us-east-1"', 'region = "us-east-1"'),
    ):
        assert text.count(commented) == 1, commented
        text = text.replace(commented, line)
    text = text.replace('\nsources = ["env"]', '\n# sources = ["env"]')
    path = tmp_path / "agent.toml"
    path.write_text(text)
    profile = load_config(path).profiles["dvs"]
    assert profile.sources == ["vault", "aws", "env"]
    assert profile.vault == VaultSourceConfig(
        address="https://vault.internal:8200", path="dvs/osigu"
    )
    assert profile.aws == AwsSourceConfig(secret_id="dvs/osigu", region="us-east-1")


def _schema_keys(type_info: mi.Type) -> Iterator[str]:
    if isinstance(type_info, mi.UnionType):
        for member in type_info.types:
            yield from _schema_keys(member)
    elif isinstance(type_info, mi.ListType):
        yield from _schema_keys(type_info.item_type)
    elif isinstance(type_info, mi.DictType):
        yield from _schema_keys(type_info.value_type)
    elif isinstance(type_info, mi.StructType):
        if type_info.tag_field:
            yield type_info.tag_field
        for field in type_info.fields:
            yield field.encode_name
            yield from _schema_keys(field.type)


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    # a key line, or a table header naming the key (either may be commented out)
    documented = r"^#? ?{key} = |^#? ?\[\[?(?:[\w.]*\.)?{key}(?:\.[\w.]*)?\]\]?$"
    missing = [
        key
        # the schema the registry builds: the core's keys and every built-in kind's
        for key in sorted(set(_schema_keys(mi.type_info(Registry().schema().config))))
        if not re.search(documented.format(key=key), text, re.M)
    ]
    assert missing == [], f"not documented in the example: {missing}"


def test_dev_config_loads_as_specified() -> None:
    config = load_config(DEV)
    assert config.agent.log_format == "text"
    assert config.agent.state_dir == "./dev/state"
    assert config.health.listen == ""
    assert config.health.address is None
    assert list(config.profiles) == ["dvs"]
    profile = config.profiles["dvs"]
    assert profile.resolved_token_url == "http://127.0.0.1:8780/v1/oauth/token"
    assert profile.sources == ["env"]
    assert profile.env == EnvSourceConfig()
    assert profile.rotation.poll_interval == timedelta(seconds=2)
    assert profile.refresh_before_expiry == timedelta(seconds=10)
    sinks = [file_sink(config, index) for index in range(len(profile.sinks))]
    assert [(s.path, s.format, s.mode) for s in sinks] == [
        ("./dev/token", "raw", 0o600),
        ("./dev/token.json", "json", 0o600),
    ]


# ---------------------------------------------------------------------------------- defaults


def test_defaults_match_the_design() -> None:
    config = parse_config(MINIMAL)
    assert config.agent.log_level == "info"
    assert config.agent.log_format == "json"
    assert config.agent.state_dir == "/var/lib/dvs-agent"
    assert config.health.listen == "127.0.0.1:8787"
    assert config.health.address == ("127.0.0.1", 8787)
    profile = config.profiles["dvs"]
    assert profile.environment == "sandbox"
    assert profile.token_url is None
    assert profile.resolved_token_url == "https://sandbox.osigu.com/v1/oauth/token"
    assert profile.grant_type_location == "query"
    assert profile.scope is None
    assert profile.ca_bundle is None
    assert profile.request_timeout == timedelta(seconds=10)
    assert profile.refresh_before_expiry == timedelta(seconds=60)
    assert profile.sources == ["env"]
    assert profile.env.client_id_var == "DVS_CLIENT_ID"
    assert profile.env.client_secret_var == "DVS_CLIENT_SECRET"
    assert profile.vault is None
    assert profile.aws is None
    assert profile.rotation.poll_interval == timedelta(seconds=30)
    sink = profile.sinks[0]
    assert isinstance(sink, FileSinkConfig)
    assert sink.format == "raw"
    assert sink.mode == 0o640
    assert sink.owner is None
    assert sink.group is None
    assert sink.on_change is None
    assert sink.on_change_timeout == timedelta(seconds=30)
    assert Registry().names("sink") == ["file", "vault", "aws", "redis"]


def test_defaults_are_timedeltas_and_structs_are_frozen() -> None:
    config = parse_config(MINIMAL)
    profile = config.profiles["dvs"]
    for value in (
        profile.request_timeout,
        profile.refresh_before_expiry,
        profile.rotation.poll_interval,
        file_sink(config).on_change_timeout,
    ):
        assert isinstance(value, timedelta)
    with pytest.raises(AttributeError):
        profile.scope = "x"  # type: ignore[misc]
    assert RotationConfig().poll_interval == timedelta(seconds=30)


def test_a_sink_without_type_is_a_file_sink() -> None:
    assert isinstance(parse_config(MINIMAL).profiles["dvs"].sinks[0], FileSinkConfig)


@pytest.mark.parametrize(
    ("environment", "url"),
    [
        ("sandbox", "https://sandbox.osigu.com/v1/oauth/token"),
        ("production", "https://api.osigu.com/v1/oauth/token"),
    ],
)
def test_resolved_token_url(environment: str, url: str) -> None:
    config = parse_config(profile_toml(f'environment = "{environment}"'))
    assert config.profiles["dvs"].resolved_token_url == url
    override = parse_config(
        profile_toml(f'environment = "{environment}"\ntoken_url = "https://auth.example/t"')
    )
    assert override.profiles["dvs"].resolved_token_url == "https://auth.example/t"


def test_resolve_config_path() -> None:
    env = {"DVS_AGENT_CONFIG": "/srv/agent.toml"}
    assert resolve_config_path("/x.toml", env) == Path("/x.toml")
    assert resolve_config_path(None, env) == Path("/srv/agent.toml")
    assert resolve_config_path(None, {}) == Path(DEFAULT_CONFIG_PATH)
    assert resolve_config_path(None, {"DVS_AGENT_CONFIG": ""}) == Path(DEFAULT_CONFIG_PATH)


# --------------------------------------------------------------------------------- durations

GOOD_DURATIONS = [
    (30, timedelta(seconds=30)),
    (0, timedelta(0)),
    (1.5, timedelta(seconds=1.5)),
    ("0", timedelta(0)),
    ("30", timedelta(seconds=30)),
    ("1.5", timedelta(seconds=1.5)),
    ("500ms", timedelta(milliseconds=500)),
    ("30s", timedelta(seconds=30)),
    ("0.25s", timedelta(milliseconds=250)),
    ("5m", timedelta(minutes=5)),
    ("24h", timedelta(hours=24)),
    ("1d", timedelta(days=1)),
    ("1m30s", timedelta(seconds=90)),
    ("1h0m5s", timedelta(hours=1, seconds=5)),
    ("1.5h", timedelta(minutes=90)),
    (" 30s ", timedelta(seconds=30)),
]

BAD_DURATIONS: list[object] = [
    "5x",
    "",
    "s",
    "30 s",
    "5S",
    "1e3",
    "-5",
    "-5s",
    -1,
    -0.5,
    True,
    False,
    None,
    [30],
    float("nan"),
    float("inf"),
    "99999999999d",
]


@pytest.mark.parametrize(("value", "expected"), GOOD_DURATIONS)
def test_parse_duration_good(value: object, expected: timedelta) -> None:
    parsed = parse_duration(value)
    assert isinstance(parsed, timedelta)
    assert parsed == expected


@pytest.mark.parametrize("value", BAD_DURATIONS)
def test_parse_duration_bad(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


@pytest.mark.parametrize(("value", "expected"), GOOD_DURATIONS)
def test_durations_in_the_file_go_through_the_parser(value: object, expected: timedelta) -> None:
    literal = f'"{value}"' if isinstance(value, str) else str(value)
    config = parse_config(profile_toml(f"refresh_before_expiry = {literal}"))
    parsed = config.profiles["dvs"].refresh_before_expiry
    assert isinstance(parsed, timedelta)
    assert parsed == expected


@pytest.mark.parametrize("value", ['"30s"', "30", '"0"', '"1.5"'])
def test_poll_interval_accepts_the_documented_forms(value: str) -> None:
    config = parse_config(profile_toml(f"rotation = {{ poll_interval = {value} }}"))
    parsed = config.profiles["dvs"].rotation.poll_interval
    assert isinstance(parsed, timedelta)
    assert parsed == parse_duration(value.strip('"'))


def test_bad_duration_names_the_key_and_the_forms() -> None:
    message = error_of(profile_toml('[profiles.dvs.rotation]\npoll_interval = "5x"'))
    assert message == (
        'agent.toml: profiles.dvs.rotation.poll_interval: invalid duration "5x": use seconds (30) '
        'or a number with a unit: "500ms", "30s", "5m", "24h"'
    )


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('request_timeout = "-1s"', "request_timeout"),
        ("refresh_before_expiry = true", "refresh_before_expiry"),
    ],
)
def test_negative_or_boolean_duration_is_rejected(line: str, key: str) -> None:
    assert f"profiles.dvs.{key}: invalid duration" in error_of(profile_toml(line))


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('request_timeout = "0"', "request_timeout", "more than 0"),
        ('request_timeout = "6m"', "request_timeout", "at most 5 minutes"),
        ('rotation = { poll_interval = "500ms" }', "rotation.poll_interval", "at least 1s"),
    ],
)
def test_duration_ranges(line: str, key: str, problem: str) -> None:
    message = error_of(profile_toml(line))
    assert f"profiles.dvs.{key}: " in message
    assert problem in message


def test_poll_interval_zero_disables_polling() -> None:
    config = parse_config(profile_toml('rotation = { poll_interval = "0" }'))
    assert config.profiles["dvs"].rotation.poll_interval == timedelta(0)


def test_on_change_timeout_must_be_positive() -> None:
    message = error_of(profile_toml(sink='on_change_timeout = "0s"'))
    assert "profiles.dvs.sinks[0].on_change_timeout: must be more than 0" in message


# -------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"0640"', 0o640), ('"640"', 0o640), ('"0o600"', 0o600), ("0o600", 0o600), ('"0"', 0)],
)
def test_mode_good(value: str, expected: int) -> None:
    config = parse_config(profile_toml(sink=f"mode = {value}"))
    assert file_sink(config).mode == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"0666"', "world-writable"),
        ("0o602", "world-writable"),
        ('"rw-r-----"', "octal digits"),
        ('"0648"', "octal digits"),
        ('"01640"', "between 0o000 and 0o777"),
        ("0o1000", "between 0o000 and 0o777"),
        ("640", "decimal unless written 0o640"),
        ("-1", "between 0o000 and 0o777"),
        ("true", "invalid mode"),
        ("6.4", "invalid mode"),
    ],
)
def test_mode_bad(value: str, problem: str) -> None:
    message = error_of(profile_toml(sink=f"mode = {value}"))
    assert "profiles.dvs.sinks[0].mode: invalid mode" in message
    assert problem in message


# ----------------------------------------------------------------------- unknown keys, types


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (f"bogus = 1\n{MINIMAL}", "bogus"),
        (f'[agent]\nlog_levl = "info"\n{MINIMAL}', "agent.log_levl"),
        (f"[health]\nport = 1\n{MINIMAL}", "health.port"),
        (profile_toml("enviroment = 'sandbox'"), "profiles.dvs.enviroment"),
        (profile_toml("[profiles.dvs.env]\nclient_id = 'X'"), "profiles.dvs.env.client_id"),
        (profile_toml("[profiles.dvs.rotation]\npoll = 1"), "profiles.dvs.rotation.poll"),
        (profile_toml(sink="permissions = '0600'"), "profiles.dvs.sinks[0].permissions"),
    ],
)
def test_unknown_key_names_its_path(text: str, path: str) -> None:
    message = error_of(text)
    assert message.startswith(f"agent.toml: {path}: unknown key")
    assert "expected one of:" in message


def test_unknown_key_lists_the_allowed_keys() -> None:
    message = error_of(profile_toml("[profiles.dvs.rotation]\npoll = 1"))
    assert message.endswith("expected one of: poll_interval")


def test_key_under_the_wrong_header_says_where_it_belongs() -> None:
    text = '[profiles.dvs.rotation]\npoll_interval = "30s"\nsinks = [{ path = "/t" }]\n'
    message = error_of(text)
    assert "profiles.dvs.rotation.sinks: unknown key" in message
    assert "[profiles.dvs]" in message


@pytest.mark.parametrize(
    ("text", "path", "values"),
    [
        (
            f'[agent]\nlog_level = "loud"\n{MINIMAL}',
            "agent.log_level",
            ['"debug"', '"info"', '"warning"', '"error"'],
        ),
        (f'[agent]\nlog_format = "xml"\n{MINIMAL}', "agent.log_format", ['"json"', '"text"']),
        (profile_toml('environment = "prod"'), "profiles.dvs.environment", ['"production"']),
        (
            profile_toml('grant_type_location = "header"'),
            "profiles.dvs.grant_type_location",
            ['"query"', '"body"'],
        ),
        (
            profile_toml(sink='format = "yaml"'),
            "profiles.dvs.sinks[0].format",
            ['"raw"', '"json"', '"env"'],
        ),
        (f"[agent]\nlog_level = 3\n{MINIMAL}", "agent.log_level", ['"info"']),
    ],
)
def test_literal_violation_names_key_and_allowed_values(
    text: str, path: str, values: list[str]
) -> None:
    message = error_of(text)
    assert message.startswith(f"agent.toml: {path}: ")
    assert "expected one of:" in message
    for value in values:
        assert value in message


def test_log_level_loud_message() -> None:
    message = error_of(f'[agent]\nlog_level = "loud"\n{MINIMAL}')
    assert message.startswith('agent.toml: agent.log_level: invalid value "loud"; expected one of:')


@pytest.mark.parametrize(
    ("text", "path", "expected"),
    [
        (profile_toml("scope = 3"), "profiles.dvs.scope", "expected a string, got an integer"),
        (profile_toml("sources = 'env'"), "profiles.dvs.sources", "expected an array"),
        (
            profile_toml(sink="on_change = 'x'"),
            "profiles.dvs.sinks[0].on_change",
            "expected an array, got a string",
        ),
        (f"agent = 1\n{MINIMAL}", "agent", "expected a table, got an integer"),
    ],
)
def test_wrong_type_names_the_key(text: str, path: str, expected: str) -> None:
    message = error_of(text)
    assert message.startswith(f"agent.toml: {path}: ")
    assert expected in message


# ---------------------------------------------------------------- profiles, sources, sinks


@pytest.mark.parametrize("text", ["", "[agent]\n", "[profiles]\n"])
def test_no_profiles(text: str) -> None:
    message = error_of(text)
    assert "agent.toml: profiles: " in message
    assert "[profiles.NAME]" in message


def test_no_sinks_key() -> None:
    message = error_of('[profiles.dvs]\nenvironment = "sandbox"\n')
    assert "profiles.dvs.sinks: at least one sink is required" in message
    assert "[[profiles.dvs.sinks]]" in message
    assert "[profiles.dvs.proxy]" in message


def test_empty_sinks() -> None:
    message = error_of("[profiles.dvs]\nsinks = []\n")
    assert "profiles.dvs.sinks: at least one sink is required" in message


def test_sink_path_required() -> None:
    message = error_of('[[profiles.dvs.sinks]]\nformat = "raw"\n')
    assert "profiles.dvs.sinks[0].path: required key is missing" in message


def test_sink_path_empty_or_directory() -> None:
    assert "sinks[0].path: must not be empty" in error_of('[[profiles.dvs.sinks]]\npath = ""\n')
    assert "names a directory" in error_of('[[profiles.dvs.sinks]]\npath = "/run/x/"\n')


def test_duplicate_sink_paths_in_one_profile() -> None:
    text = (
        '[[profiles.dvs.sinks]]\npath = "/run/dvs-agent/token"\n'
        '[[profiles.dvs.sinks]]\npath = "/run/dvs-agent/../dvs-agent/token"\nformat = "json"\n'
    )
    message = error_of(text)
    assert "profiles.dvs.sinks[1].path" in message
    assert "profiles.dvs.sinks[0].path" in message
    assert "two sinks cannot write one file" in message


def test_duplicate_sink_paths_across_profiles_compare_absolute_paths() -> None:
    cwd = os.getcwd()
    text = (
        '[[profiles.a.sinks]]\npath = "./dev/token"\n'
        f'[[profiles.b.sinks]]\npath = "{cwd}/dev/token"\n'
    )
    message = error_of(text)
    assert "profiles.b.sinks[0].path" in message
    assert "profiles.a.sinks[0].path" in message


def test_distinct_sink_paths_are_fine() -> None:
    text = '[[profiles.a.sinks]]\npath = "/run/a"\n[[profiles.b.sinks]]\npath = "/run/b"\n'
    assert set(parse_config(text).profiles) == {"a", "b"}


@pytest.mark.parametrize("name", ["-dvs", "dvs tenant", "dvs/x", "_x", "ü"])
def test_bad_profile_name(name: str) -> None:
    message = error_of(f'[[profiles."{name}".sinks]]\npath = "/run/t"\n')
    assert "invalid profile name" in message
    assert message.startswith("agent.toml: profiles.")


@pytest.mark.parametrize("name", ["dvs", "tenant-1", "a.b", "A_b.9"])
def test_good_profile_name(name: str) -> None:
    config = parse_config(f'[[profiles."{name}".sinks]]\npath = "/run/t"\n')
    assert list(config.profiles) == [name]


def test_profile_name_with_a_dot_is_quoted_in_key_paths() -> None:
    message = error_of('[[profiles."a.b".sinks]]\npath = "/run/t"\nmode = "0777"\n')
    assert message.startswith('agent.toml: profiles."a.b".sinks[0].mode: ')


def test_vault_and_aws_are_supported_sources() -> None:
    assert Registry().names("source") == ["env", "vault", "aws"]
    config = parse_config(
        profile_toml(
            'sources = ["vault", "aws", "env"]\n'
            '[profiles.dvs.vault]\npath = "dvs/osigu"\n'
            '[profiles.dvs.aws]\nsecret_id = "dvs/osigu"'
        )
    )
    profile = config.profiles["dvs"]
    assert profile.sources == ["vault", "aws", "env"]
    assert profile.vault == VaultSourceConfig(path="dvs/osigu")
    assert profile.aws == AwsSourceConfig(secret_id="dvs/osigu")


@pytest.mark.parametrize("table", ["vault", "aws"])
def test_source_table_without_its_source_is_allowed(table: str) -> None:
    """A write-back sink takes its defaults from the table: no error, no warning."""
    config = parse_config(profile_toml(f"[profiles.dvs.{table}]\n"))
    profile = config.profiles["dvs"]
    assert profile.sources == ["env"]
    assert getattr(profile, table) is not None


def test_unknown_source() -> None:
    message = error_of(profile_toml('sources = ["ldap"]'))
    assert message.startswith('agent.toml: profiles.dvs.sources[0]: invalid value "ldap"; ')
    for name in ('"env"', '"vault"', '"aws"'):
        assert name in message


def test_sources_empty_or_duplicated() -> None:
    assert "profiles.dvs.sources: must name at least one source" in error_of(
        profile_toml("sources = []")
    )
    assert "profiles.dvs.sources[1]: 'env' is listed twice" in error_of(
        profile_toml('sources = ["env", "env"]')
    )


def test_unknown_sink_type_lists_the_four_types() -> None:
    message = error_of('[[profiles.dvs.sinks]]\ntype = "s3"\npath = "/run/t"\n')
    assert message == (
        'agent.toml: profiles.dvs.sinks[0].type: unknown sink type "s3"; '
        'supported: "file", "vault", "aws", "redis"'
    )


def test_sink_type_must_be_a_string() -> None:
    message = error_of('[[profiles.dvs.sinks]]\ntype = 1\npath = "/run/t"\n')
    assert message == (
        "agent.toml: profiles.dvs.sinks[0].type: expected a string; "
        'supported: "file", "vault", "aws", "redis"'
    )


def test_on_change_must_be_a_non_empty_argv() -> None:
    for value in ("[]", '[""]'):
        message = error_of(profile_toml(sink=f"on_change = {value}"))
        assert "profiles.dvs.sinks[0].on_change: must be a non-empty argv list" in message
    config = parse_config(profile_toml(sink='on_change = ["systemctl", "reload", "app"]'))
    assert file_sink(config).on_change == ["systemctl", "reload", "app"]


def test_owner_and_group_must_not_be_empty() -> None:
    assert "sinks[0].owner: must not be empty" in error_of(profile_toml(sink='owner = ""'))
    config = parse_config(profile_toml(sink='owner = "dvs"\ngroup = "dvs"'))
    assert (file_sink(config).owner, file_sink(config).group) == ("dvs", "dvs")


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('client_id_var = "1ID"', "client_id_var"),
        ('client_secret_var = "DVS-SECRET"', "client_secret_var"),
        ('client_id_var = ""', "client_id_var"),
    ],
)
def test_env_var_names_must_be_valid(line: str, key: str) -> None:
    message = error_of(profile_toml(f"[profiles.dvs.env]\n{line}"))
    assert f"profiles.dvs.env.{key}: " in message
    assert "not a valid environment variable name" in message


def test_env_vars_must_differ() -> None:
    text = profile_toml('[profiles.dvs.env]\nclient_id_var = "X"\nclient_secret_var = "X"')
    assert "profiles.dvs.env.client_secret_var: must differ" in error_of(text)


# ------------------------------------------------------------------- vault and aws sources


def vault_toml(lines: str = "", *, sources: str = '["vault"]') -> str:
    return profile_toml(f"sources = {sources}\n[profiles.dvs.vault]\n{lines}")


def aws_toml(lines: str = "", *, sources: str = '["aws"]') -> str:
    return profile_toml(f"sources = {sources}\n[profiles.dvs.aws]\n{lines}")


def test_vault_defaults_match_the_design() -> None:
    vault = parse_config(vault_toml('path = "dvs/osigu"')).profiles["dvs"].vault
    assert vault is not None
    assert msgspec.structs.asdict(vault) == {
        "address": None,
        "auth_method": "approle",
        "auth_mount": None,
        "token_file": None,
        "role_id_file": "/etc/dvs-agent/role_id",
        "secret_id_file": "/etc/dvs-agent/secret_id",
        "approle_mount": None,
        "role": None,
        "jwt_file": None,
        "client_cert": None,
        "client_key": None,
        "mount": "secret",
        "path": "dvs/osigu",
        "kv_version": 2,
        "client_id_key": "client_id",
        "client_secret_key": "client_secret",
        "namespace": None,
        "ca_cert": None,
        "tls_skip_verify": False,
    }
    assert vault == VaultSourceConfig(path="dvs/osigu")


def test_aws_defaults_match_the_design() -> None:
    aws = parse_config(aws_toml('secret_id = "dvs/osigu"')).profiles["dvs"].aws
    assert aws is not None
    assert msgspec.structs.asdict(aws) == {
        "secret_id": "dvs/osigu",
        "region": None,
        "endpoint_url": None,
        "version_stage": "AWSCURRENT",
        "client_id_key": "client_id",
        "client_secret_key": "client_secret",
        "events_queue_url": None,
        "role_arn": None,
        "role_session_name": None,
        "external_id": None,
    }
    assert aws == AwsSourceConfig(secret_id="dvs/osigu")


def test_every_vault_and_aws_key_is_read() -> None:
    text = profile_toml(
        'sources = ["aws", "vault"]\n'
        "[profiles.dvs.vault]\n"
        'address = "https://vault.internal:8200"\nauth_method = "token"\n'
        'token_file = "/run/t"\nrole_id_file = ""\nsecret_id_file = ""\n'
        'approle_mount = "ar"\nmount = "kv/team"\npath = "a/b"\nkv_version = 1\n'
        'client_id_key = "id"\nclient_secret_key = "secret"\nnamespace = "admin/dvs"\n'
        "tls_skip_verify = true\n"
        "[profiles.dvs.aws]\n"
        'secret_id = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:dvs/osigu-AbCdEf"\n'
        'region = "eu-west-1"\nendpoint_url = "http://127.0.0.1:5000"\n'
        'version_stage = "AWSPENDING"\nclient_id_key = "id"\nclient_secret_key = "secret"\n'
        'events_queue_url = "http://127.0.0.1:5000/123456789012/dvs-agent"\n'
    )
    profile = parse_config(text).profiles["dvs"]
    assert profile.vault == VaultSourceConfig(
        address="https://vault.internal:8200",
        auth_method="token",
        token_file="/run/t",
        role_id_file="",  # only approle needs the two files
        secret_id_file="",
        approle_mount="ar",
        mount="kv/team",
        path="a/b",
        kv_version=1,
        client_id_key="id",
        client_secret_key="secret",
        namespace="admin/dvs",
        tls_skip_verify=True,
    )
    assert profile.aws == AwsSourceConfig(
        secret_id="arn:aws:secretsmanager:eu-west-1:123456789012:secret:dvs/osigu-AbCdEf",
        region="eu-west-1",
        endpoint_url="http://127.0.0.1:5000",
        version_stage="AWSPENDING",
        client_id_key="id",
        client_secret_key="secret",
        events_queue_url="http://127.0.0.1:5000/123456789012/dvs-agent",
    )


@pytest.mark.parametrize("lines", ["", 'mount = "secret"'])
def test_vault_source_requires_path(lines: str) -> None:
    message = error_of(vault_toml(lines, sources='["vault", "env"]'))
    assert message.startswith(
        'agent.toml: profiles.dvs.vault.path: required when "vault" is in sources'
    )


def test_vault_source_without_its_table_names_path_and_the_table() -> None:
    message = error_of(profile_toml('sources = ["vault"]'))
    assert message.startswith(
        'agent.toml: profiles.dvs.vault.path: required when "vault" is in sources'
    )
    assert "[profiles.dvs.vault]" in message


@pytest.mark.parametrize("lines", ["", 'region = "us-east-1"'])
def test_aws_source_requires_secret_id(lines: str) -> None:
    message = error_of(aws_toml(lines))
    assert message.startswith(
        'agent.toml: profiles.dvs.aws.secret_id: required when "aws" is in sources'
    )


def test_aws_source_without_its_table_names_secret_id_and_the_table() -> None:
    message = error_of(profile_toml('sources = ["env", "aws"]'))
    assert message.startswith(
        'agent.toml: profiles.dvs.aws.secret_id: required when "aws" is in sources'
    )
    assert "[profiles.dvs.aws]" in message


def test_missing_path_and_secret_id_are_reported_together() -> None:
    lines = error_of(profile_toml('sources = ["vault", "aws"]')).splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "profiles.dvs.vault.path",
        "profiles.dvs.aws.secret_id",
    ]


def test_events_queue_url_needs_the_aws_source() -> None:
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/dvs-agent"
    message = error_of(aws_toml(f'events_queue_url = "{url}"', sources='["env"]'))
    assert message.startswith("agent.toml: profiles.dvs.aws.events_queue_url: ")
    assert 'add "aws" to sources' in message
    config = parse_config(aws_toml(f'secret_id = "s"\nevents_queue_url = "{url}"'))
    aws = config.profiles["dvs"].aws
    assert aws is not None
    assert aws.events_queue_url == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://sqs.example.com/123456789012/q", "plain http is allowed only for loopback"),
        ("sqs.us-east-1.amazonaws.com/123456789012/q", "absolute http(s) URL"),
        ("https://sqs.us-east-1.amazonaws.com/q", "not an SQS queue URL"),
        ("https://sqs.us-east-1.amazonaws.com/", "not an SQS queue URL"),
        ("https://sqs.us-east-1.amazonaws.com/1/2/3", "not an SQS queue URL"),
    ],
)
def test_events_queue_url_must_be_an_sqs_queue_url(url: str, problem: str) -> None:
    message = error_of(aws_toml(f'secret_id = "s"\nevents_queue_url = "{url}"'))
    assert message.startswith("agent.toml: profiles.dvs.aws.events_queue_url: ")
    assert problem in message


@pytest.mark.parametrize(
    "url", ["http://vault.internal:8200", "http://10.0.0.5:8200", "http://[::2]:8200"]
)
def test_vault_address_plain_http_to_a_non_loopback_host_is_refused(url: str) -> None:
    message = error_of(vault_toml(f'path = "p"\naddress = "{url}"'))
    assert message.startswith(
        "agent.toml: profiles.dvs.vault.address: plain http is allowed only for loopback hosts"
    )
    assert "the Vault token would cross the network in clear" in message


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8200", "http://localhost:8200", "https://vault.internal:8200"]
)
def test_vault_address_good(url: str) -> None:
    vault = parse_config(vault_toml(f'path = "p"\naddress = "{url}"')).profiles["dvs"].vault
    assert vault is not None
    assert vault.resolved_address({}, key="profiles.dvs.vault.address") == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("vault.internal:8200", "absolute http(s) URL"),
        ("", "must not be empty"),
        ("https://vault.internal:8200/v1", "without /v1"),
        ("https://vault.internal:8200/v1/secret/data/x", "without /v1"),
    ],
)
def test_vault_address_bad(url: str, problem: str) -> None:
    message = error_of(vault_toml(f'path = "p"\naddress = "{url}"'))
    assert message.startswith("agent.toml: profiles.dvs.vault.address: ")
    assert problem in message


def test_vault_address_with_credentials_is_refused_without_echoing_them() -> None:
    message = error_of(vault_toml('path = "p"\naddress = "https://u:hunter2@vault:8200"'))
    assert "profiles.dvs.vault.address: must not contain user:password@" in message
    assert "hunter2" not in message


def test_aws_endpoint_url() -> None:
    good = parse_config(aws_toml('secret_id = "s"\nendpoint_url = "http://127.0.0.1:5000"'))
    aws = good.profiles["dvs"].aws
    assert aws is not None
    assert aws.endpoint_url == "http://127.0.0.1:5000"
    message = error_of(aws_toml('secret_id = "s"\nendpoint_url = "http://moto.internal:5000"'))
    assert message.startswith(
        "agent.toml: profiles.dvs.aws.endpoint_url: plain http is allowed only for loopback hosts"
    )


KEY = "profiles.dvs.vault.address"


def test_resolved_address_prefers_the_file_then_vault_addr() -> None:
    from_file = VaultSourceConfig(address="https://vault.internal:8200", path="p")
    environ = {"VAULT_ADDR": "https://other:8200"}
    assert from_file.resolved_address(environ, key=KEY) == "https://vault.internal:8200"
    from_env = VaultSourceConfig(path="p")
    assert from_env.resolved_address(environ, key=KEY) == "https://other:8200"


@pytest.mark.parametrize("environ", [{}, {"VAULT_ADDR": ""}])
def test_resolved_address_without_address_or_vault_addr(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        VaultSourceConfig(path="p").resolved_address(environ, key=KEY)
    message = str(info.value)
    assert message.startswith(f"{KEY}: ")
    assert "VAULT_ADDR" in message
    assert info.value.exit_code == 78


def test_resolved_address_checks_vault_addr_like_token_url() -> None:
    vault = VaultSourceConfig(path="p")
    with pytest.raises(ConfigError) as info:
        vault.resolved_address({"VAULT_ADDR": "http://vault.internal:8200"}, key=KEY)
    message = str(info.value)
    assert message.startswith(f"{KEY}: ")
    assert "VAULT_ADDR" in message
    assert "plain http is allowed only for loopback hosts" in message
    with pytest.raises(ConfigError) as info:
        vault.resolved_address({"VAULT_ADDR": "https://u:hunter2@vault:8200"}, key=KEY)
    assert "hunter2" not in str(info.value)
    assert vault.resolved_address({"VAULT_ADDR": "http://127.0.0.1:8200"}, key=KEY) == (
        "http://127.0.0.1:8200"
    )
    other_key = 'profiles."a.b".sinks[1].address'
    with pytest.raises(ConfigError, match=re.escape(other_key)):
        vault.resolved_address({}, key=other_key)


def test_vault_ca_cert(tmp_path: Path) -> None:
    ca = tmp_path / "vault-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    vault = parse_config(vault_toml(f'path = "p"\nca_cert = "{ca}"')).profiles["dvs"].vault
    assert vault is not None
    assert vault.ca_cert == str(ca)
    missing = error_of(vault_toml(f'path = "p"\nca_cert = "{tmp_path}/nope.pem"'))
    assert missing.startswith("agent.toml: profiles.dvs.vault.ca_cert: ")
    assert "no such file" in missing
    directory = error_of(vault_toml(f'path = "p"\nca_cert = "{tmp_path}"'))
    assert "not a regular file" in directory


def test_vault_ca_cert_is_checked_without_the_vault_source(tmp_path: Path) -> None:
    message = error_of(profile_toml(f'[profiles.dvs.vault]\nca_cert = "{tmp_path}/nope.pem"'))
    assert message.startswith("agent.toml: profiles.dvs.vault.ca_cert: ")


@pytest.mark.parametrize("value", ["3", "0", '"2"', "2.0"])
def test_kv_version_lists_the_allowed_values(value: str) -> None:
    message = error_of(vault_toml(f'path = "p"\nkv_version = {value}'))
    assert message.startswith("agent.toml: profiles.dvs.vault.kv_version: ")
    assert message.endswith("expected one of: 1, 2")


def test_auth_method_lists_the_allowed_values() -> None:
    message = error_of(vault_toml('path = "p"\nauth_method = "ldap"'))
    assert message.startswith('agent.toml: profiles.dvs.vault.auth_method: invalid value "ldap"')
    assert '"approle"' in message
    assert '"token"' in message


@pytest.mark.parametrize(
    ("table", "key"),
    [("vault", "pth"), ("vault", "secret"), ("aws", "secretid"), ("aws", "profile")],
)
def test_unknown_key_in_a_source_table_names_its_path(table: str, key: str) -> None:
    message = error_of(profile_toml(f'[profiles.dvs.{table}]\n{key} = "x"'))
    assert message.startswith(f"agent.toml: profiles.dvs.{table}.{key}: unknown key (a typo?)")
    assert "expected one of: " in message


def test_unknown_key_in_a_source_table_of_a_quoted_profile() -> None:
    message = error_of('[profiles."a.b".vault]\npth = "x"\n[[profiles."a.b".sinks]]\npath = "/t"\n')
    assert message.startswith('agent.toml: profiles."a.b".vault.pth: unknown key')


def test_source_key_under_the_source_table_header_says_where_it_belongs() -> None:
    message = error_of(profile_toml('[profiles.dvs.vault]\npath = "p"\nsources = ["vault"]'))
    assert "profiles.dvs.vault.sources: unknown key" in message
    assert "[profiles.dvs]" in message


@pytest.mark.parametrize("table", ["vault", "aws"])
def test_source_table_must_be_a_table(table: str) -> None:
    message = error_of(profile_toml(f'{table} = "x"'))
    assert message.startswith(f"agent.toml: profiles.dvs.{table}: expected a table, got a string")


@pytest.mark.parametrize("table", ["vault", "aws"])
def test_identical_key_names_are_refused(table: str) -> None:
    required = 'path = "p"' if table == "vault" else 'secret_id = "s"'
    text = profile_toml(
        f'sources = ["{table}"]\n[profiles.dvs.{table}]\n{required}\n'
        'client_id_key = "k"\nclient_secret_key = "k"'
    )
    message = error_of(text)
    assert message == (
        f"agent.toml: profiles.dvs.{table}.client_secret_key: must differ from client_id_key"
    )


@pytest.mark.parametrize("table", ["vault", "aws"])
@pytest.mark.parametrize("key", ["client_id_key", "client_secret_key"])
def test_empty_key_names_are_refused(table: str, key: str) -> None:
    message = error_of(profile_toml(f'[profiles.dvs.{table}]\n{key} = ""'))
    assert message == f"agent.toml: profiles.dvs.{table}.{key}: must not be empty"


@pytest.mark.parametrize("key", ["path", "mount", "approle_mount"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("/dvs/osigu/", "without a leading or trailing '/': \"dvs/osigu\""),
        ("/dvs/osigu", "without a leading or trailing '/': \"dvs/osigu\""),
        ("dvs/osigu/", "without a leading or trailing '/': \"dvs/osigu\""),
        ("dvs//osigu", "empty, '.' or '..' segment"),
        ("dvs/../osigu", "empty, '.' or '..' segment"),
        ("", "must not be empty"),
        ("/", "must not be empty"),
    ],
)
def test_vault_paths_and_mounts(key: str, value: str, problem: str) -> None:
    path = "" if key == "path" else 'path = "dvs/osigu"\n'
    message = error_of(vault_toml(f'{path}{key} = "{value}"'))
    assert message.startswith(f"agent.toml: profiles.dvs.vault.{key}: ")
    assert problem in message


@pytest.mark.parametrize("value", ["dvs/osigu", "osigu", "team-a/dvs.osigu/client_1"])
def test_vault_good_paths(value: str) -> None:
    vault = parse_config(vault_toml(f'path = "{value}"\nmount = "kv/{value}"')).profiles["dvs"]
    assert vault.vault is not None
    assert vault.vault.path == value


@pytest.mark.parametrize("key", ["role_id_file", "secret_id_file"])
def test_approle_needs_its_files(key: str) -> None:
    message = error_of(vault_toml(f'path = "p"\n{key} = ""'))
    assert message == (
        f'agent.toml: profiles.dvs.vault.{key}: must not be empty with auth_method = "approle"'
    )
    config = parse_config(vault_toml(f'path = "p"\nauth_method = "token"\n{key} = ""'))
    vault = config.profiles["dvs"].vault
    assert vault is not None
    assert vault.auth_method == "token"


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('token_file = ""', "token_file"),
        ('namespace = ""', "namespace"),
    ],
)
def test_vault_optional_keys_must_not_be_empty(line: str, key: str) -> None:
    message = error_of(vault_toml(f'path = "p"\n{line}'))
    assert message.startswith(f"agent.toml: profiles.dvs.vault.{key}: must not be empty")


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('secret_id = ""', "secret_id", "must not be empty"),
        ('secret_id = "arn:aws:s3:::bucket"', "secret_id", "not a Secrets Manager ARN"),
        ('secret_id = "s"\nregion = ""', "region", "invalid region"),
        ('secret_id = "s"\nregion = "us east 1"', "region", "invalid region"),
        ('secret_id = "s"\nversion_stage = ""', "version_stage", "must not be empty"),
    ],
)
def test_aws_per_key_checks(line: str, key: str, problem: str) -> None:
    message = error_of(aws_toml(line))
    assert message.startswith(f"agent.toml: profiles.dvs.aws.{key}: ")
    assert problem in message


def test_source_table_errors_are_reported_together(tmp_path: Path) -> None:
    text = profile_toml(
        'sources = ["vault", "aws"]\n'
        "[profiles.dvs.vault]\n"
        'address = "http://vault.internal:8200"\npath = "/dvs/osigu/"\n'
        f'ca_cert = "{tmp_path}/nope.pem"\n'
        "[profiles.dvs.aws]\n"
        'client_id_key = "k"\nclient_secret_key = "k"\n'
    )
    keys = [line.split(": ")[1] for line in error_of(text).splitlines()]
    assert keys == [
        "profiles.dvs.vault.address",
        "profiles.dvs.vault.path",
        "profiles.dvs.vault.ca_cert",
        "profiles.dvs.aws.secret_id",
        "profiles.dvs.aws.client_secret_key",
    ]


# ---------------------------------------------------------------------------------- token_url


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/v1/oauth/token",
        "http://10.0.0.1:8780/token",
        "http://localhost.example.com/token",
        "http://[::2]/token",
    ],
)
def test_plain_http_to_a_non_loopback_host_is_refused(url: str) -> None:
    message = error_of(profile_toml(f'token_url = "{url}"'))
    assert "profiles.dvs.token_url: plain http is allowed only for loopback hosts" in message
    assert "the client secret would cross the network in clear" in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8780/v1/oauth/token",
        "http://127.8.9.10/token",
        "http://[::1]:8780/token",
        "http://localhost:8780/token",
        "https://auth.example.com/oauth/token",
        "HTTPS://auth.example.com/oauth/token",
    ],
)
def test_good_token_urls(url: str) -> None:
    assert parse_config(profile_toml(f'token_url = "{url}"')).profiles["dvs"].token_url == url


@pytest.mark.parametrize(
    "url", ["auth.example.com/token", "/v1/oauth/token", "ftp://example.com/t", "https://"]
)
def test_token_url_must_be_absolute_http(url: str) -> None:
    message = error_of(profile_toml(f'token_url = "{url}"'))
    assert "profiles.dvs.token_url: " in message
    assert "absolute http(s) URL" in message


def test_token_url_with_credentials_is_refused_without_echoing_them() -> None:
    message = error_of(profile_toml('token_url = "https://client:hunter2@auth.example.com/t"'))
    assert "profiles.dvs.token_url: must not contain user:password@" in message
    assert "hunter2" not in message


def test_token_url_bad_port() -> None:
    message = error_of(profile_toml('token_url = "https://auth.example.com:99999/t"'))
    assert "profiles.dvs.token_url: " in message


# ------------------------------------------------------------------ other per-key checks


def test_scope() -> None:
    config = parse_config(profile_toml('scope = "read write"'))
    assert config.profiles["dvs"].scope == "read write"
    for bad in ('""', '"read  write"', '"a\\"b"'):
        assert "profiles.dvs.scope: invalid scope" in error_of(profile_toml(f"scope = {bad}"))


def test_ca_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    config = parse_config(profile_toml(f'ca_bundle = "{bundle}"'))
    assert config.profiles["dvs"].ca_bundle == str(bundle)
    missing = error_of(profile_toml(f'ca_bundle = "{tmp_path}/nope.pem"'))
    assert "profiles.dvs.ca_bundle: " in missing
    assert "no such file" in missing
    directory = error_of(profile_toml(f'ca_bundle = "{tmp_path}"'))
    assert "profiles.dvs.ca_bundle: " in directory
    assert "not a regular file" in directory


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:8787", ("127.0.0.1", 8787)),
        ("[::1]:9000", ("::1", 9000)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("", None),
    ],
)
def test_health_listen_good(listen: str, address: tuple[str, int] | None) -> None:
    config = parse_config(f'[health]\nlisten = "{listen}"\n{MINIMAL}')
    assert config.health.address == address


@pytest.mark.parametrize(
    "listen",
    [
        "8787",
        ":8787",
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "127.0.0.1:http",
        "::1:8787",
        "[::g]:8787",
        "999.1.1.1:80",
        "a b:80",
    ],
)
def test_health_listen_bad(listen: str) -> None:
    message = error_of(f'[health]\nlisten = "{listen}"\n{MINIMAL}')
    assert message.startswith(f'agent.toml: health.listen: "{listen}": ')


@pytest.mark.parametrize("state_dir", ["/var/lib/dvs-agent", "./dev/state", "../state", "."])
def test_state_dir_absolute_or_explicitly_relative(state_dir: str) -> None:
    config = parse_config(f'[agent]\nstate_dir = "{state_dir}"\n{MINIMAL}')
    assert config.agent.state_dir == state_dir


@pytest.mark.parametrize("state_dir", ["dev/state", "state", ""])
def test_state_dir_implicitly_relative_is_refused(state_dir: str) -> None:
    message = error_of(f'[agent]\nstate_dir = "{state_dir}"\n{MINIMAL}')
    assert "agent.toml: agent.state_dir: " in message


def test_several_check_errors_are_reported_together() -> None:
    text = (
        '[agent]\nstate_dir = "state"\n[health]\nlisten = "x"\n'
        '[[profiles."bad name".sinks]]\npath = "/run/t"\n'
    )
    lines = error_of(text).splitlines()
    assert len(lines) == 3
    assert all(line.startswith("agent.toml: ") for line in lines)


# ---------------------------------------------------------------------------- files, syntax


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such file; pass -c PATH or set DVS_AGENT_CONFIG"
    assert info.value.exit_code == 78


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[agent]\nlog_level = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.fixture
def unreadable_config() -> Iterator[Path]:
    """A config file that an unprivileged user cannot read, in a directory it can enter."""
    directory = Path(tempfile.mkdtemp(prefix="dvs-agent-config-"))
    try:
        directory.chmod(0o711)
        path = directory / "agent.toml"
        path.write_text(MINIMAL)
        path.chmod(0o000)
        yield path
    finally:
        shutil.rmtree(directory)


def test_unreadable_file(unreadable_config: Path) -> None:
    if os.geteuid() != 0:
        with pytest.raises(ConfigError) as info:
            load_config(unreadable_config)
        message = str(info.value)
    else:
        # root reads every file: run the loader as an unprivileged user (DESIGN §9)
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop privileges")
        code = (
            "import sys\nfrom pathlib import Path\nfrom agent.config import load_config\n"
            "from agent.errors import ConfigError\n"
            "try:\n    load_config(Path(sys.argv[1]))\nexcept ConfigError as exc:\n"
            "    print(exc)\nelse:\n    print('loaded')\n"
        )
        result = subprocess.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                code,
                str(unreadable_config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd="/",
        )
        assert result.returncode == 0, result.stderr
        message = result.stdout.strip()
    assert message.startswith(f"{unreadable_config}: permission denied")
    assert "owner and mode" in message


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nlog_level = "info"\n[profiles.dvs\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:3:14: TOML syntax error: ")


def test_toml_syntax_error_at_end_of_document() -> None:
    message = error_of("[agent]\nlog_level = ")
    assert message.startswith("agent.toml: TOML syntax error: ")


def test_load_config_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(profile_toml(sink='mode = "0777"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: profiles.dvs.sinks[0].mode: ")


def test_parse_config_is_pure_msgspec_structs() -> None:
    config = parse_config(MINIMAL)
    assert isinstance(config, msgspec.Struct)
    assert msgspec.structs.asdict(config.agent) == {
        "log_level": "info",
        "log_format": "json",
        "state_dir": "/var/lib/dvs-agent",
    }


# ------------------------------------------------------------------------- write-back sinks


def sinks_toml(*sinks: str, profile: str = "", name: str = "dvs") -> str:
    """Profile `name` with a file sink first, then one sink table per argument."""
    tables = "".join(f"[[profiles.{name}.sinks]]\n{sink}\n" for sink in sinks)
    return (
        f"[profiles.{name}]\n{profile}\n"
        f'[[profiles.{name}.sinks]]\npath = "/run/dvs-agent/{name}-token"\n{tables}'
    )


def sinks_of(text: str, name: str = "dvs") -> list[object]:
    return list(parse_config(text).profiles[name].sinks[1:])


def sink_error(*sinks: str, profile: str = "") -> str:
    return error_of(sinks_toml(*sinks, profile=profile))


def test_each_write_back_sink_type_decodes_with_defaults() -> None:
    vault, aws, redis = sinks_of(
        sinks_toml(
            'type = "vault"\npath = "dvs/t"', 'type = "aws"\nsecret_id = "dvs/t"', 'type = "redis"'
        )
    )
    assert vault == VaultSinkConfig(path="dvs/t")
    assert isinstance(vault, VaultSinkConfig)
    assert msgspec.structs.asdict(vault) == {
        "path": "dvs/t",
        "address": None,
        "auth_method": None,
        "auth_mount": None,
        "token_file": None,
        "role_id_file": None,
        "secret_id_file": None,
        "approle_mount": None,
        "role": None,
        "jwt_file": None,
        "client_cert": None,
        "client_key": None,
        "namespace": None,
        "ca_cert": None,
        "tls_skip_verify": None,
        "mount": None,
    }
    assert isinstance(aws, AwsSinkConfig)
    assert msgspec.structs.asdict(aws) == {
        "secret_id": "dvs/t",
        "region": None,
        "endpoint_url": None,
        "create": False,
        "role_arn": None,
        "role_session_name": None,
        "external_id": None,
    }
    assert isinstance(redis, RedisSinkConfig)
    assert msgspec.structs.asdict(redis) == {
        "url": "redis://127.0.0.1:6379/0",
        "key": None,
        "username": None,
        "password_file": None,
        "password_env": None,
        "ca_cert": None,
    }
    assert redis == RedisSinkConfig()
    assert DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"


def test_file_sink_with_an_explicit_type() -> None:
    config = parse_config('[[profiles.dvs.sinks]]\ntype = "file"\npath = "/run/t"\n')
    assert config.profiles["dvs"].sinks == [FileSinkConfig(path="/run/t")]


def test_sinks_as_an_inline_array_default_to_file() -> None:
    text = '[profiles.dvs]\nsinks = [{ path = "/run/a" }, { type = "redis" }]\n'
    assert parse_config(text).profiles["dvs"].sinks == [
        FileSinkConfig(path="/run/a"),
        RedisSinkConfig(),
    ]


def test_every_write_back_sink_key_is_read(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    vault, aws, redis = sinks_of(
        sinks_toml(
            'type = "vault"\npath = "dvs/t"\naddress = "https://vault-b.internal:8200"\n'
            'auth_method = "token"\ntoken_file = "/run/t"\nrole_id_file = "/r"\n'
            'secret_id_file = "/s"\napprole_mount = "ar"\nnamespace = "admin/dvs"\n'
            f'ca_cert = "{ca}"\ntls_skip_verify = true\nmount = "kv"',
            'type = "aws"\nsecret_id = "dvs/t"\nregion = "eu-west-1"\n'
            'endpoint_url = "http://127.0.0.1:5000"\ncreate = true',
            'type = "redis"\nurl = "rediss://redis.internal:6380/2"\nkey = "app:token"\n'
            'username = "agent"\npassword_env = "REDIS_PASSWORD"',
        )
    )
    assert vault == VaultSinkConfig(
        path="dvs/t",
        address="https://vault-b.internal:8200",
        auth_method="token",
        token_file="/run/t",
        role_id_file="/r",
        secret_id_file="/s",
        approle_mount="ar",
        namespace="admin/dvs",
        ca_cert=str(ca),
        tls_skip_verify=True,
        mount="kv",
    )
    assert aws == AwsSinkConfig(
        secret_id="dvs/t", region="eu-west-1", endpoint_url="http://127.0.0.1:5000", create=True
    )
    assert redis == RedisSinkConfig(
        url="rediss://redis.internal:6380/2",
        key="app:token",
        username="agent",
        password_env="REDIS_PASSWORD",
    )


@pytest.mark.parametrize(("kind", "key"), [("vault", "path"), ("aws", "secret_id")])
def test_write_back_sink_required_key_names_its_path(kind: str, key: str) -> None:
    message = sink_error(f'type = "{kind}"')
    assert message == f"agent.toml: profiles.dvs.sinks[1].{key}: required key is missing"


@pytest.mark.parametrize(
    ("kind", "required", "typo", "listed"),
    [
        ("vault", 'path = "p"', "adress", "type, path, address, auth_method"),
        ("aws", 'secret_id = "s"', "secret", "type, secret_id, region, endpoint_url, create"),
        ("redis", "", "password", "type, url, key, username, password_file, password_env"),
    ],
)
def test_unknown_key_of_a_write_back_sink_lists_its_own_keys(
    kind: str, required: str, typo: str, listed: str
) -> None:
    message = sink_error(f'type = "{kind}"\n{required}\n{typo} = "x"')
    assert message.startswith(
        f"agent.toml: profiles.dvs.sinks[1].{typo}: unknown key (a typo?); expected one of: "
        f"{listed}"
    )


def test_file_keys_in_a_redis_sink_are_unknown() -> None:
    message = sink_error('type = "redis"\nformat = "json"')
    assert message.startswith("agent.toml: profiles.dvs.sinks[1].format: unknown key")
    assert "url" in message


def test_vault_sink_auth_method_lists_the_allowed_values() -> None:
    message = sink_error('type = "vault"\npath = "p"\nauth_method = "ldap"')
    assert message == (
        'agent.toml: profiles.dvs.sinks[1].auth_method: invalid value "ldap"; '
        'expected one of: "token", "approle", "jwt", "kubernetes", "cert"'
    )


def test_wrong_value_type_in_a_write_back_sink_names_the_key() -> None:
    message = sink_error('type = "aws"\nsecret_id = "s"\ncreate = "yes"')
    assert message.startswith("agent.toml: profiles.dvs.sinks[1].create: expected a boolean")


# redis


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1",
        "redis://127.0.0.1:6380",
        "redis://127.0.0.1:6380/",
        "rediss://redis.internal:6380/3",
        "redis://[::1]:6379/0",
        "redis://localhost/15",
        "REDISS://Redis.Internal/1",
        "rediss://my_redis:6379/0",
    ],
)
def test_redis_good_urls(url: str) -> None:
    (sink,) = sinks_of(sinks_toml(f'type = "redis"\nurl = "{url}"'))
    assert isinstance(sink, RedisSinkConfig)
    assert sink.url == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://redis.internal:6379/0", "not a redis:// or rediss://"),
        ("unix:///run/redis.sock", "not a redis:// or rediss://"),
        ("redis.internal:6379", "not a redis:// or rediss://"),
        ("redis://", "not a redis:// or rediss://"),
        ("redis://:6379/0", "has no host"),
        ("redis://h:0", "from 1 to 65535"),
        ("redis://h:99999", "not a valid URL"),
        ("redis://h:port", "not a valid URL"),
        ("redis://h/x", "the database number, an integer"),
        ("redis://h/1/2", "the database number, an integer"),
        ("redis://h/-1", "the database number, an integer"),
        ("redis://h?db=1", "options after '?' or '#' are not supported"),
        ("redis://h/0#x", "options after '?' or '#' are not supported"),
        ("redis://a b/0", "is not a host name or address"),
        ("redis://redis.internal:6379/0", "use rediss:// (TLS)"),
        ("redis://10.0.0.5/0", "in clear"),
    ],
)
def test_redis_bad_urls(url: str, problem: str) -> None:
    message = sink_error(f'type = "redis"\nurl = "{url}"')
    assert message.startswith("agent.toml: profiles.dvs.sinks[1].url: ")
    assert problem in message


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@redis.internal:6379/0", "rediss://agent:hunter2@h/0", "redis://u@h"]
)
def test_redis_url_with_a_password_is_refused_without_echoing_it(url: str) -> None:
    message = sink_error(f'type = "redis"\nurl = "{url}"')
    assert message.startswith(
        "agent.toml: profiles.dvs.sinks[1].url: must not contain user:password@"
    )
    assert "password_file or password_env" in message
    assert "hunter2" not in message


def test_redis_password_file_and_password_env_are_exclusive() -> None:
    message = sink_error('type = "redis"\npassword_file = "/etc/p"\npassword_env = "P"')
    assert message == (
        "agent.toml: profiles.dvs.sinks[1].password_env: set password_file or password_env, "
        "not both"
    )


def test_redis_username_needs_a_password() -> None:
    message = sink_error('type = "redis"\nusername = "agent"')
    assert message.startswith("agent.toml: profiles.dvs.sinks[1].username: ")
    assert "password_file" in message and "password_env" in message
    for line in ('password_file = "/etc/p"', 'password_env = "P"'):
        (sink,) = sinks_of(sinks_toml(f'type = "redis"\nusername = "agent"\n{line}'))
        assert isinstance(sink, RedisSinkConfig)
        assert sink.username == "agent"


def test_redis_password_without_username_is_fine() -> None:
    (sink,) = sinks_of(sinks_toml('type = "redis"\npassword_file = "/etc/dvs-agent/redis"'))
    assert isinstance(sink, RedisSinkConfig)
    assert sink.password_file == "/etc/dvs-agent/redis"


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('key = ""', "key", 'must not be empty (leave the key out for "dvs-agent:dvs:token")'),
        ('username = ""', "username", "must not be empty"),
        ('password_file = ""', "password_file", "must not be empty"),
        ('password_env = "REDIS-PASSWORD"', "password_env", "not a valid environment variable"),
        ('password_env = ""', "password_env", "not a valid environment variable"),
    ],
)
def test_redis_per_key_checks(line: str, key: str, problem: str) -> None:
    message = sink_error(f'type = "redis"\n{line}')
    assert message.startswith(f"agent.toml: profiles.dvs.sinks[1].{key}: ")
    assert problem in message


def test_redis_resolved_key() -> None:
    assert RedisSinkConfig().resolved_key("dvs") == "dvs-agent:dvs:token"
    assert RedisSinkConfig().resolved_key("tenant-1") == "dvs-agent:tenant-1:token"
    assert RedisSinkConfig(key="app:token").resolved_key("dvs") == "app:token"


# vault


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://vault.internal:8200", "plain http is allowed only for loopback hosts"),
        ("http://10.0.0.5:8200", "plain http is allowed only for loopback hosts"),
        ("vault.internal:8200", "absolute http(s) URL"),
        ("https://vault.internal:8200/v1", "without /v1"),
        ("", "must not be empty"),
    ],
)
def test_vault_sink_address_like_the_source(url: str, problem: str) -> None:
    message = sink_error(f'type = "vault"\npath = "p"\naddress = "{url}"')
    assert message.startswith("agent.toml: profiles.dvs.sinks[1].address: ")
    assert problem in message


def test_vault_sink_address_with_credentials_is_refused_without_echoing_them() -> None:
    message = sink_error('type = "vault"\npath = "p"\naddress = "https://u:hunter2@vault:8200"')
    assert "profiles.dvs.sinks[1].address: must not contain user:password@" in message
    assert "hunter2" not in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8200", "https://vault.internal:8200"])
def test_vault_sink_good_addresses(url: str) -> None:
    (sink,) = sinks_of(sinks_toml(f'type = "vault"\npath = "p"\naddress = "{url}"'))
    assert isinstance(sink, VaultSinkConfig)
    assert sink.address == url


@pytest.mark.parametrize("key", ["path", "mount", "approle_mount"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("/dvs/t/", "without a leading or trailing '/': \"dvs/t\""),
        ("dvs//t", "empty, '.' or '..' segment"),
        ("dvs/../t", "empty, '.' or '..' segment"),
        ("", "must not be empty"),
    ],
)
def test_vault_sink_paths_and_mounts(key: str, value: str, problem: str) -> None:
    path = "" if key == "path" else 'path = "dvs/t"\n'
    message = sink_error(f'type = "vault"\n{path}{key} = "{value}"')
    assert message.startswith(f"agent.toml: profiles.dvs.sinks[1].{key}: ")
    assert problem in message


@pytest.mark.parametrize(
    "key", ["token_file", "role_id_file", "secret_id_file", "namespace", "ca_cert"]
)
def test_vault_sink_optional_keys_must_not_be_empty(key: str) -> None:
    message = sink_error(f'type = "vault"\npath = "p"\n{key} = ""')
    assert message == (
        f"agent.toml: profiles.dvs.sinks[1].{key}: must not be empty (leave the key out to use "
        "the value of [profiles.dvs.vault])"
    )


def test_vault_sink_ca_cert_must_be_readable(tmp_path: Path) -> None:
    message = sink_error(f'type = "vault"\npath = "p"\nca_cert = "{tmp_path}/nope.pem"')
    assert message.startswith("agent.toml: profiles.dvs.sinks[1].ca_cert: ")
    assert "no such file" in message


def test_vault_sink_approle_needs_files_the_profile_table_leaves_empty() -> None:
    table = '[profiles.dvs.vault]\nauth_method = "token"\nrole_id_file = ""\nsecret_id_file = ""'
    message = sink_error(
        'type = "vault"\npath = "p"\nauth_method = "approle"\nrole_id_file = "/r"',
        profile=table,
    )
    assert message.startswith("agent.toml: profiles.dvs.sinks[1].secret_id_file: required with ")
    assert "[profiles.dvs.vault]" in message
    # token auth, inherited from the table, needs neither
    (sink,) = sinks_of(sinks_toml('type = "vault"\npath = "p"', profile=table))
    assert isinstance(sink, VaultSinkConfig)


def test_vault_sink_cannot_inherit_a_kv_v1_mount() -> None:
    table = '[profiles.dvs.vault]\nmount = "kv1"\nkv_version = 1'
    message = sink_error('type = "vault"\npath = "p"', profile=table)
    assert message.startswith("agent.toml: profiles.dvs.sinks[1].mount: a vault sink writes to")
    assert '"kv1"' in message and "kv_version = 1" in message
    (sink,) = sinks_of(sinks_toml('type = "vault"\npath = "p"\nmount = "kv2"', profile=table))
    assert isinstance(sink, VaultSinkConfig)


def test_vault_sink_merged_without_a_vault_table_takes_the_source_defaults() -> None:
    merged = vault_merged(VaultSinkConfig(path="dvs/t"), None)
    assert merged == VaultSourceConfig(
        address=None,
        auth_method="approle",
        token_file=None,
        role_id_file="/etc/dvs-agent/role_id",
        secret_id_file="/etc/dvs-agent/secret_id",
        approle_mount=None,
        namespace=None,
        ca_cert=None,
        tls_skip_verify=False,
        mount="secret",
        path="dvs/t",
    )


def test_vault_sink_merged_takes_unset_keys_from_the_profile_vault_table() -> None:
    text = sinks_toml(
        'type = "vault"\npath = "dvs/t"',
        'type = "vault"\npath = "dvs/u"\naddress = "https://vault-b:8200"\nmount = "kv"\n'
        'auth_method = "approle"\nnamespace = "b"\ntls_skip_verify = false',
        profile=(
            '[profiles.dvs.vault]\naddress = "https://vault-a:8200"\nauth_method = "token"\n'
            'token_file = "/run/vt"\nmount = "team"\nnamespace = "a"\napprole_mount = "ar"\n'
            'role_id_file = "/a/role"\nsecret_id_file = "/a/secret"\ntls_skip_verify = true'
        ),
    )
    profile = parse_config(text).profiles["dvs"]
    inherit, override = profile.sinks[1:]
    assert isinstance(inherit, VaultSinkConfig) and isinstance(override, VaultSinkConfig)
    assert vault_merged(inherit, profile.vault) == VaultSourceConfig(
        address="https://vault-a:8200",
        auth_method="token",
        token_file="/run/vt",
        role_id_file="/a/role",
        secret_id_file="/a/secret",
        approle_mount="ar",
        namespace="a",
        ca_cert=None,
        tls_skip_verify=True,
        mount="team",
        path="dvs/t",
    )
    merged = vault_merged(override, profile.vault)
    assert (merged.address, merged.mount, merged.auth_method, merged.namespace) == (
        "https://vault-b:8200",
        "kv",
        "approle",
        "b",
    )
    assert merged.tls_skip_verify is False  # an explicit false beats the table's true
    assert (merged.token_file, merged.role_id_file, merged.path) == ("/run/vt", "/a/role", "dvs/u")


def test_vault_sink_resolved_address_falls_back_to_vault_addr() -> None:
    key = "profiles.dvs.sinks[1].address"
    merged = vault_merged(VaultSinkConfig(path="p"), None)
    assert merged.resolved_address({"VAULT_ADDR": "https://v:8200"}, key=key) == "https://v:8200"
    with pytest.raises(ConfigError) as info:
        merged.resolved_address({}, key=key)
    assert str(info.value).startswith(f"{key}: no Vault address")
    with pytest.raises(ConfigError, match="plain http is allowed only for loopback"):
        merged.resolved_address({"VAULT_ADDR": "http://vault.internal:8200"}, key=key)
    table = VaultSourceConfig(address="https://vault-a:8200")
    assert vault_merged(VaultSinkConfig(path="p"), table).resolved_address({}, key=key) == (
        "https://vault-a:8200"
    )


# aws


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('secret_id = ""', "secret_id", "must not be empty"),
        ('secret_id = "arn:aws:s3:::bucket"', "secret_id", "not a Secrets Manager ARN"),
        ('secret_id = "s"\nregion = "us east 1"', "region", "invalid region"),
        (
            'secret_id = "s"\nendpoint_url = "http://moto.internal:5000"',
            "endpoint_url",
            "plain http is allowed only for loopback hosts",
        ),
        ('secret_id = "s"\nendpoint_url = "moto:5000"', "endpoint_url", "absolute http(s) URL"),
        (
            'secret_id = "arn:aws:secretsmanager:us-east-1:123456789012:secret:t-AbCdEf"\n'
            "create = true",
            "create",
            "give secret_id as the secret's name",
        ),
    ],
)
def test_aws_sink_per_key_checks(line: str, key: str, problem: str) -> None:
    message = sink_error(f'type = "aws"\n{line}')
    assert message.startswith(f"agent.toml: profiles.dvs.sinks[1].{key}: ")
    assert problem in message


def test_aws_sink_endpoint_url_with_credentials_is_refused_without_echoing_them() -> None:
    message = sink_error('type = "aws"\nsecret_id = "s"\nendpoint_url = "https://a:hunter2@h"')
    assert "profiles.dvs.sinks[1].endpoint_url: must not contain user:password@" in message
    assert "hunter2" not in message


def test_aws_sink_merged_takes_region_and_endpoint_from_the_aws_table() -> None:
    table = AwsSourceConfig(region="us-east-1", endpoint_url="http://127.0.0.1:5000")
    assert aws_merged(AwsSinkConfig(secret_id="t"), table) == AwsSinkConfig(
        secret_id="t", region="us-east-1", endpoint_url="http://127.0.0.1:5000", create=False
    )
    own = AwsSinkConfig(secret_id="t", region="eu-west-1", endpoint_url="https://e", create=True)
    assert aws_merged(own, table) == AwsSinkConfig(
        secret_id="t", region="eu-west-1", endpoint_url="https://e", create=True
    )
    assert aws_merged(AwsSinkConfig(secret_id="t"), None) == AwsSinkConfig(
        secret_id="t", region=None, endpoint_url=None, create=False
    )
    text = sinks_toml(
        'type = "aws"\nsecret_id = "t"', profile='[profiles.dvs.aws]\nregion = "ap-south-1"'
    )
    profile = parse_config(text).profiles["dvs"]
    sink = profile.sinks[1]
    assert isinstance(sink, AwsSinkConfig)
    assert aws_merged(sink, profile.aws).region == "ap-south-1"


# duplicate targets

ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:dvs/token-AbCdEf"


@pytest.mark.parametrize(
    ("first", "second", "key"),
    [
        ('type = "vault"\npath = "dvs/t"', 'type = "vault"\npath = "dvs/t"', "path"),
        (
            'type = "vault"\npath = "dvs/t"\naddress = "https://Vault.internal:8200/"',
            'type = "vault"\npath = "dvs/t"\naddress = "https://vault.internal:8200"\n'
            'mount = "secret"',
            "path",
        ),
        (
            'type = "aws"\nsecret_id = "dvs/token"',
            'type = "aws"\nsecret_id = "dvs/token"',
            "secret_id",
        ),
        (
            'type = "aws"\nsecret_id = "dvs/token"',
            f'type = "aws"\nsecret_id = "{ARN}"',
            "secret_id",
        ),
        (
            f'type = "aws"\nsecret_id = "{ARN}"',
            'type = "aws"\nsecret_id = "dvs/token"\nregion = "us-east-1"',
            "secret_id",
        ),
        (
            f'type = "aws"\nsecret_id = "{ARN.removesuffix("-AbCdEf")}"',
            f'type = "aws"\nsecret_id = "{ARN}"',
            "secret_id",
        ),
        ('type = "redis"', 'type = "redis"\nurl = "redis://127.0.0.1"', "url"),
        (
            'type = "redis"\nurl = "rediss://r.internal:6380/2"\nkey = "k"',
            'type = "redis"\nurl = "rediss://R.internal:6380/2"\nkey = "k"',
            "key",
        ),
    ],
)
def test_two_write_back_sinks_on_one_target(first: str, second: str, key: str) -> None:
    message = sink_error(first, second)
    assert message.startswith(f"agent.toml: profiles.dvs.sinks[2].{key}: ")
    assert "profiles.dvs.sinks[1]." in message
    assert "two sinks cannot write one" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ('type = "vault"\npath = "dvs/t"', 'type = "vault"\npath = "dvs/u"'),
        ('type = "vault"\npath = "dvs/t"', 'type = "vault"\npath = "dvs/t"\nmount = "kv"'),
        ('type = "vault"\npath = "dvs/t"', 'type = "vault"\npath = "dvs/t"\nnamespace = "b"'),
        (
            'type = "vault"\npath = "dvs/t"\naddress = "https://vault-a:8200"',
            'type = "vault"\npath = "dvs/t"\naddress = "https://vault-b:8200"',
        ),
        ('type = "aws"\nsecret_id = "dvs/token"', 'type = "aws"\nsecret_id = "dvs/token2"'),
        (
            'type = "aws"\nsecret_id = "dvs/token"\nregion = "eu-west-1"',
            'type = "aws"\nsecret_id = "dvs/token"\nregion = "us-east-1"',
        ),
        (
            'type = "aws"\nsecret_id = "dvs/token"\nregion = "eu-west-1"',
            f'type = "aws"\nsecret_id = "{ARN}"',
        ),
        (
            f'type = "aws"\nsecret_id = "{ARN}"',
            f'type = "aws"\nsecret_id = "{ARN.replace("123456789012", "210987654321")}"',
        ),
        (
            'type = "aws"\nsecret_id = "dvs/token"\nendpoint_url = "http://127.0.0.1:5000"',
            'type = "aws"\nsecret_id = "dvs/token"\nendpoint_url = "http://127.0.0.1:5001"',
        ),
        ('type = "redis"', 'type = "redis"\nurl = "redis://127.0.0.1:6379/1"'),
        ('type = "redis"', 'type = "redis"\nkey = "other"'),
        ('type = "vault"\npath = "run/dvs-agent/t"', 'path = "/run/dvs-agent/t"'),
    ],
)
def test_distinct_write_back_targets_are_fine(first: str, second: str) -> None:
    assert len(parse_config(sinks_toml(first, second)).profiles["dvs"].sinks) == 3


def test_duplicate_write_back_targets_across_profiles() -> None:
    text = sinks_toml('type = "aws"\nsecret_id = "dvs/token"', name="a") + sinks_toml(
        f'type = "aws"\nsecret_id = "{ARN}"', name="b"
    )
    message = error_of(text)
    assert message == (
        f'agent.toml: profiles.b.sinks[1].secret_id: the secret "{ARN}" is also written by '
        'profiles.a.sinks[1].secret_id (the secret "dvs/token"); two sinks cannot write one secret'
    )


def test_redis_default_keys_of_two_profiles_differ() -> None:
    text = sinks_toml('type = "redis"', name="a") + sinks_toml('type = "redis"', name="b")
    assert set(parse_config(text).profiles) == {"a", "b"}
    shared = sinks_toml('type = "redis"\nkey = "k"', name="a") + sinks_toml(
        'type = "redis"\nkey = "k"', name="b"
    )
    message = error_of(shared)
    assert message == (
        'agent.toml: profiles.b.sinks[1].key: the Redis key "k" on 127.0.0.1:6379/0 is also '
        "written by profiles.a.sinks[1].key; two sinks cannot write one key"
    )


# a write-back sink on a credential source


def test_vault_sink_on_the_profile_vault_source_is_refused() -> None:
    profile = 'sources = ["vault"]\n[profiles.dvs.vault]\npath = "dvs/osigu"'
    message = sink_error('type = "vault"\npath = "dvs/osigu"', profile=profile)
    assert message.startswith(
        'agent.toml: profiles.dvs.sinks[1].path: the Vault secret "secret/dvs/osigu" at '
        "$VAULT_ADDR is the profile's own credential source (profiles.dvs.vault.path): "
        "it would trigger rotations forever"
    )
    same_address = (
        'sources = ["vault"]\n[profiles.dvs.vault]\npath = "dvs/osigu"\n'
        'address = "https://vault:8200"'
    )
    message = sink_error(
        'type = "vault"\npath = "dvs/osigu"\naddress = "https://vault:8200/"',
        profile=same_address,
    )
    assert "it would trigger rotations forever" in message


@pytest.mark.parametrize(
    ("profile", "sink"),
    [
        # the table is there, but vault is not a source
        ('[profiles.dvs.vault]\npath = "dvs/osigu"', 'path = "dvs/osigu"'),
        ('sources = ["vault"]\n[profiles.dvs.vault]\npath = "dvs/osigu"', 'path = "dvs/t"'),
        (
            'sources = ["vault"]\n[profiles.dvs.vault]\npath = "dvs/osigu"',
            'path = "dvs/osigu"\nmount = "kv"',
        ),
        (
            'sources = ["vault"]\n[profiles.dvs.vault]\npath = "dvs/osigu"',
            'path = "dvs/osigu"\naddress = "https://other:8200"',
        ),
    ],
)
def test_vault_sink_beside_the_vault_source_is_fine(profile: str, sink: str) -> None:
    (parsed,) = sinks_of(sinks_toml(f'type = "vault"\n{sink}', profile=profile))
    assert isinstance(parsed, VaultSinkConfig)


@pytest.mark.parametrize("secret_id", ["dvs/token", ARN])
def test_aws_sink_on_the_profile_aws_source_is_refused(secret_id: str) -> None:
    profile = 'sources = ["aws"]\n[profiles.dvs.aws]\nsecret_id = "dvs/token"'
    message = sink_error(f'type = "aws"\nsecret_id = "{secret_id}"', profile=profile)
    assert message.startswith(
        f'agent.toml: profiles.dvs.sinks[1].secret_id: the secret "{secret_id}" is the '
        "profile's own credential source (profiles.dvs.aws.secret_id): it would trigger "
        "rotations forever"
    )
    without_source = '[profiles.dvs.aws]\nsecret_id = "dvs/token"'
    (sink,) = sinks_of(
        sinks_toml(f'type = "aws"\nsecret_id = "{secret_id}"', profile=without_source)
    )
    assert isinstance(sink, AwsSinkConfig)


def test_sink_on_another_profile_credential_source_is_refused() -> None:
    text = sinks_toml(
        profile='sources = ["vault"]\n[profiles.a.vault]\npath = "dvs/a"', name="a"
    ) + sinks_toml('type = "vault"\npath = "dvs/a"', name="b")
    message = error_of(text)
    assert message.startswith(
        'agent.toml: profiles.b.sinks[1].path: the Vault secret "secret/dvs/a" at $VAULT_ADDR '
        'is the credential source of profile "a" (profiles.a.vault.path): the token would '
        "overwrite that profile's credentials"
    )


def test_write_back_sink_errors_are_reported_together() -> None:
    text = sinks_toml(
        'type = "vault"\npath = "/p/"\naddress = "http://vault.internal"',
        'type = "aws"\nsecret_id = ""',
        'type = "redis"\nurl = "redis://:pw@h"\nusername = "u"',
        'type = "redis"',
        'type = "redis"',
    )
    keys = [line.split(": ")[1] for line in error_of(text).splitlines()]
    assert keys == [
        "profiles.dvs.sinks[1].path",
        "profiles.dvs.sinks[1].address",
        "profiles.dvs.sinks[2].secret_id",
        "profiles.dvs.sinks[3].url",
        "profiles.dvs.sinks[3].username",
        "profiles.dvs.sinks[5].url",
    ]


def test_example_config_write_back_sinks_load_when_uncommented(tmp_path: Path) -> None:
    """Uncommenting the three write-back sink blocks gives a valid config (no store contacted)."""
    text = EXAMPLE.read_text()
    head, marker, tail = text.partition("# Write-back sinks")
    assert marker
    tail = tail.partition("# Fleet mode")[0]  # its own test: tests/test_fleet_config.py
    # ca_cert must name an existing file; password_env is the alternative to password_file
    tail = re.sub(r"^# (\[\[|(?!ca_cert |password_env )\w+ = )", r"\1", tail, flags=re.M)
    path = tmp_path / "agent.toml"
    path.write_text(head + marker + tail)
    profile = load_config(path).profiles["dvs"]
    assert [type(sink) for sink in profile.sinks] == [
        FileSinkConfig,
        VaultSinkConfig,
        AwsSinkConfig,
        RedisSinkConfig,
    ]
    vault, aws, redis = profile.sinks[1:]
    assert isinstance(vault, VaultSinkConfig) and vault.path == "dvs/osigu-token"
    assert isinstance(aws, AwsSinkConfig) and aws.secret_id == "dvs/osigu-token"
    assert not aws.create
    assert isinstance(redis, RedisSinkConfig) and redis.url == DEFAULT_REDIS_URL
    assert redis.resolved_key("dvs") == redis.key
