"""``[profiles.NAME.proxy]`` (DESIGN §14): its keys, defaults and checks, sizes, reload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ProfileConfig, parse_config, parse_size
from agent.errors import ConfigError
from agent.proxy.settings import ProxyConfig, specs_of
from agent.reload import ChangeProfile, ChangeProxy, diff
from tests.conftest import REPO

BASE = '[profiles.dvs]\nenvironment = "{env}"\n{extra}\n[profiles.dvs.proxy]\n'


def load(proxy: str = "", *, env: str = "sandbox", extra: str = "") -> ProxyConfig:
    config = parse_config(BASE.format(env=env, extra=extra) + proxy, source="agent.toml")
    table = config.profiles["dvs"].proxy
    assert table is not None
    return table


def error_of(proxy: str, extra: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE.format(env="sandbox", extra=extra) + proxy, source="agent.toml")
    return str(info.value)


def test_a_profile_with_a_proxy_needs_no_sink_and_defaults_are_narrow() -> None:
    config = parse_config(BASE.format(env="production", extra=""), source="agent.toml")
    [spec] = specs_of(config.profiles)
    assert str(spec.listen) == "unix:/run/dvs-agent-proxy/dvs.sock"
    assert spec.upstream == "https://api.osigu.com"
    cfg = spec.config
    assert (cfg.allow_tcp, cfg.socket_group, cfg.max_body, cfg.max_connections) == (
        False,
        None,
        10 << 20,
        256,
    )
    assert cfg.request_timeout.total_seconds() == 60
    assert (
        specs_of(parse_config(BASE.format(env="sandbox", extra=""), source="x").profiles)[
            0
        ].upstream
        == "https://sandbox.osigu.com"
    )


def test_without_a_proxy_a_sink_is_still_required() -> None:
    with pytest.raises(ConfigError, match=r"at least one sink.*\[profiles\.dvs\.proxy\]"):
        parse_config("[profiles.dvs]\n", source="agent.toml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1024, 1024), ("1024", 1024), ("512KiB", 512 << 10), ("10MiB", 10 << 20), ("1GiB", 1 << 30)],
)
def test_sizes(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["10MB", "1.5MiB", "-1", -1, True, "", "ten", 1.5])
def test_bad_sizes_say_what_to_write(value: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(value)


def test_max_body_in_the_file() -> None:
    assert load('max_body = "512KiB"\n').max_body == 512 << 10
    message = error_of('max_body = "10MB"\n')
    assert "profiles.dvs.proxy.max_body" in message and '"10MiB"' in message


@pytest.mark.parametrize(
    ("proxy", "expected"),
    [
        ('listen = "127.0.0.1:8790"\n', "prefer the unix socket"),
        ('listen = "0.0.0.0:8790"\nallow_tcp = true\n', "loopback only"),
        ('listen = "10.0.0.5:8790"\nallow_tcp = true\n', "loopback only"),
        ('listen = "localhost:8790"\nallow_tcp = true\n', "loopback only"),
        ('listen = "unix:relative.sock"\n', "must be absolute"),
        ('listen = "unix:/run/x.sock"\nallow_tcp = true\n', "allow_tcp: only for a TCP"),
        ('listen = "unix:/' + "d" * 120 + '.sock"\n', "longer than 107 bytes"),
        ('listen = "127.0.0.1:8790"\nallow_tcp = true\nsocket_group = "g"\n', "socket_group"),
        ('listen = "nonsense"\n', "proxy.listen"),
        ('upstream = "http://api.osigu.com"\n', "plain http is allowed only for loopback"),
        ('upstream = "ftp://api.osigu.com"\n', "not an absolute http(s) URL"),
        ('upstream = "https://api.osigu.com?x=1"\n', "no query or fragment"),
        ("max_body = 0\n", "max_body: must be at least 1 byte"),
        ('max_header_size = "100"\n', "max_header_size: must be from 1KiB"),
        ('request_timeout = "0s"\n', "request_timeout: must be more than 0"),
        ('client_timeout = "0s"\n', "client_timeout: must be from 1s"),
        ("max_connections = 0\n", "max_connections: must be from 1"),
        ('ca_bundle = "/nonexistent/ca.pem"\n', 'ca_bundle: "/nonexistent/ca.pem": no such file'),
        ("colour = 1\n", "colour"),
        (
            'listen = "127.0.0.1:8790"\nallow_tcp = true\nupstream = "http://localhost:8790"\n',
            "the proxy's own listen address",
        ),
    ],
)
def test_bad_proxy_tables_name_the_key(proxy: str, expected: str) -> None:
    message = error_of(proxy)
    assert expected in message, message


def test_an_upstream_with_credentials_is_refused_without_echoing_them() -> None:
    message = error_of('upstream = "https://user:hunter2@api.osigu.com"\n')
    assert "user:password@" in message and "hunter2" not in message


def test_loopback_tcp_and_ipv6_with_allow_tcp() -> None:
    assert str(specs_of(_profiles('listen = "127.0.0.1:8790"\nallow_tcp = true\n'))[0].listen) == (
        "127.0.0.1:8790"
    )
    assert str(specs_of(_profiles('listen = "[::1]:8790"\nallow_tcp = true\n'))[0].listen) == (
        "[::1]:8790"
    )


def _profiles(proxy: str, extra: str = "") -> dict[str, ProfileConfig]:
    config = parse_config(BASE.format(env="sandbox", extra=extra) + proxy, source="agent.toml")
    return dict(config.profiles)


def test_the_ca_setting_a_tls_failure_names(tmp_path: object) -> None:
    ca = REPO / "tests" / "conftest.py"  # any readable file: the check reads, not parses, it
    [own] = specs_of(_profiles(f'ca_bundle = "{ca}"\n'))
    assert own.ca_bundle == str(ca) and own.ca_key == "profiles.dvs.proxy.ca_bundle"
    [inherited] = specs_of(_profiles("", extra=f'ca_bundle = "{ca}"'))
    assert inherited.ca_bundle == str(ca)
    assert inherited.ca_key.startswith("profiles.dvs.ca_bundle")
    [system] = specs_of(_profiles(""))
    assert system.ca_bundle is None and "system's CA store" in system.ca_key


def test_a_reload_that_changes_only_the_proxy_keeps_the_profile() -> None:
    old = parse_config(BASE.format(env="sandbox", extra="") + "max_connections = 10\n", source="x")
    new = parse_config(BASE.format(env="sandbox", extra="") + "max_connections = 20\n", source="x")
    assert [type(a) for a in diff(old, new)] == [ChangeProxy]
    scope = parse_config(
        BASE.format(env="sandbox", extra='scope = "read"') + "max_connections = 20\n", source="x"
    )
    [action] = diff(old, scope)
    assert isinstance(action, ChangeProfile) and set(action.changed) == {"scope", "proxy"}


def test_loading_a_config_with_a_proxy_does_not_import_the_proxy_stack() -> None:
    """The config and its checks import no proxy code and no parser; only the running proxy
    does."""
    code = (
        "import sys; from agent.config import parse_config; "
        "parse_config('[profiles.dvs]\\n[profiles.dvs.proxy]\\n', source='x'); "
        "import agent.app, agent.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('httptools', 'agent.proxy.'))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert run.stdout.strip() == "['agent.proxy.settings']"


def test_check_prints_the_proxy(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{tmp_path}/state"\n[profiles.dvs]\n[profiles.dvs.proxy]\n'
        'socket_group = "dvs-clients"\n'
    )
    done = run_cli("check", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert (
        "proxy unix:/run/dvs-agent-proxy/dvs.sock → https://sandbox.osigu.com (dvs-clients, "
        "mode 0660" in done.stdout
    ), done.stdout
