"""Vault logins beyond AppRole and token (DESIGN §12): jwt, kubernetes and cert.

Config checks and the local parts (a JWT's expiry, a certificate's validity) in-process; each
method against a real OpenBao with the auth method configured by the test (tests/vault_logins.py):
it logs in, logs in again before its token runs out, logs in again after a 403, reads a rotated
JWT or certificate, and says what is wrong, naming the address, mount, role and file, without
ever showing the JWT.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.errors import ConfigError, SourceUnavailable
from agent.logins.common import jwt_expiry
from agent.logins.kubernetes import SERVICE_ACCOUNT_TOKEN
from agent.plugin import LoginContext
from agent.registry import Registry
from agent.sources.vault import VaultSourceConfig


def vault_toml(lines: str, *, sink: str = "") -> str:
    return (
        '[profiles.dvs]\nsources = ["vault"]\n[profiles.dvs.vault]\n'
        f'address = "https://vault.internal:8200"\npath = "dvs/osigu"\n{lines}\n'
        '[[profiles.dvs.sinks]]\npath = "/run/dvs-agent/token"\n'
        f"{sink}"
    )


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="agent.toml")
    return [line.removeprefix("agent.toml: ") for line in str(info.value).splitlines()]


# -- config ----------------------------------------------------------------------------------------


def test_jwt_needs_a_role_and_a_jwt_file() -> None:
    problems = errors_of(vault_toml('auth_method = "jwt"'))
    assert 'profiles.dvs.vault.role: required with auth_method = "jwt"' in problems
    assert 'profiles.dvs.vault.jwt_file: required with auth_method = "jwt"' in problems


def test_kubernetes_defaults_to_the_service_account_token() -> None:
    config = parse_config(vault_toml('auth_method = "kubernetes"\nrole = "dvs"'))
    vault = config.profiles["dvs"].vault
    assert vault is not None and vault.jwt_file is None
    kind = Registry().login("kubernetes")
    assert kind.mount(vault) == "kubernetes"
    assert kind.describe(vault) == "kubernetes login (role dvs, auth/kubernetes)"
    assert SERVICE_ACCOUNT_TOKEN == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    problems = errors_of(vault_toml('auth_method = "kubernetes"\njwt_file = ""'))
    assert 'profiles.dvs.vault.role: required with auth_method = "kubernetes"' in problems
    assert 'profiles.dvs.vault.jwt_file: must not be empty with auth_method = "kubernetes"' in (
        problems
    )


def test_cert_needs_both_files_and_tls(tmp_path: Path) -> None:
    problems = errors_of(vault_toml('auth_method = "cert"'))
    assert 'profiles.dvs.vault.client_cert: required with auth_method = "cert"' in problems
    assert 'profiles.dvs.vault.client_key: required with auth_method = "cert"' in problems
    missing = tmp_path / "absent.pem"
    problems = errors_of(
        vault_toml(f'auth_method = "cert"\nclient_cert = "{missing}"\nclient_key = "/k"\n')
    )
    assert any(p.startswith(f'profiles.dvs.vault.client_cert: "{missing}": ') for p in problems)
    text = vault_toml(f'auth_method = "cert"\nclient_cert = "{missing}"\nclient_key = "/k"\n')
    plain = text.replace("https://vault.internal:8200", "http://127.0.0.1:8200")
    assert (
        'profiles.dvs.vault.auth_method: "cert" needs TLS: a client certificate is sent only '
        "over https, and profiles.dvs.vault.address is 'http://127.0.0.1:8200'"
    ) in errors_of(plain)


def test_auth_mount_is_checked_and_approle_mount_is_its_old_name() -> None:
    problems = errors_of(
        vault_toml('auth_method = "jwt"\nrole = "r"\njwt_file = "/j"\nauth_mount = "/jwt/"')
    )
    assert problems == [
        "profiles.dvs.vault.auth_mount: \"/jwt/\": write it without a leading or trailing '/': "
        '"jwt"'
    ]
    problems = errors_of(vault_toml('auth_mount = "a"\napprole_mount = "b"'))
    assert problems == [
        "profiles.dvs.vault.approle_mount: the old name of auth_mount, set to another mount "
        "('b' against 'a'): keep auth_mount only"
    ]
    vault = parse_config(vault_toml('approle_mount = "ar"')).profiles["dvs"].vault
    assert Registry().login("approle").mount(vault) == "ar"


def test_an_unknown_method_lists_the_methods() -> None:
    (problem,) = errors_of(vault_toml('auth_method = "gcp"'))
    assert problem == (
        'profiles.dvs.vault.auth_method: invalid value "gcp"; expected one of: "token", '
        '"approle", "jwt", "kubernetes", "cert"'
    )


def test_a_vault_sink_takes_the_login_keys_of_the_vault_table() -> None:
    sink = '[[profiles.dvs.sinks]]\ntype = "vault"\npath = "dvs/token"\n'
    config = parse_config(
        vault_toml('auth_method = "jwt"\nrole = "r"\njwt_file = "/run/jwt"', sink=sink)
    )
    assert config.profiles["dvs"].sinks[1].path == "dvs/token"  # type: ignore[union-attr]
    problems = errors_of(vault_toml("", sink=sink + 'auth_method = "jwt"\nrole = ""\n'))
    assert (
        "profiles.dvs.sinks[1].role: must not be empty (leave the key out to use the value of "
        "[profiles.dvs.vault])" in problems
    )
    assert (
        'profiles.dvs.sinks[1].jwt_file: required with auth_method = "jwt": [profiles.dvs.vault] '
        "leaves it empty, so set it here"
    ) in problems
    assert not any(p.startswith("profiles.dvs.sinks[1].role: required") for p in problems)


# -- the JWT, read locally ---------------------------------------------------------------------


def unsigned_jwt(**claims: object) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(dict(claims))}.c2lnbmF0dXJl"


def test_jwt_expiry_is_read_without_verifying() -> None:
    assert jwt_expiry(unsigned_jwt(exp=1_900_000_000), "/j", "k") == 1_900_000_000.0
    assert jwt_expiry(unsigned_jwt(sub="x"), "/j", "k") is None
    assert jwt_expiry(unsigned_jwt(exp=True), "/j", "k") is None
    for text in ("not a jwt", "a.b", "..", "a.!!!.c", f"a.{base64.b64encode(b'[1').decode()}.c"):
        with pytest.raises(SourceUnavailable) as caught:
            jwt_expiry(text, "/run/jwt", "profiles.dvs.vault.jwt_file")
        assert str(caught.value).startswith(
            "/run/jwt (profiles.dvs.vault.jwt_file) does not hold a JWT"
        )


def context(tmp_path: Path, remembered: dict[str, str], now: float) -> LoginContext:
    return LoginContext(
        client=None,
        address="https://vault.internal:8200",
        config_key="profiles.dvs.vault",
        environ={},
        log=logging.getLogger("test"),
        remember=remembered.__setitem__,
        vault_errors=str,
        wall=lambda: now,
    )


def test_an_expired_jwt_is_an_error_naming_the_file_before_any_request(tmp_path: Path) -> None:
    jwt = unsigned_jwt(exp=1_000_000_000, sub="system:serviceaccount:dvs:agent")
    (tmp_path / "jwt").write_text(jwt + "\n")
    remembered: dict[str, str] = {}
    config = VaultSourceConfig(auth_method="jwt", role="r", jwt_file=str(tmp_path / "jwt"))
    with pytest.raises(SourceUnavailable) as caught:
        # client=None: any request would fail with AttributeError, not this error
        Registry().login("jwt").login(config, context(tmp_path, remembered, 1_000_000_060.0))
    assert str(caught.value) == (
        f"the JWT in {tmp_path / 'jwt'} (profiles.dvs.vault.jwt_file) expired at "
        "2001-09-09T01:46:40Z (60s ago): whatever writes that file (a projected service-account "
        "token, a workload-identity agent) has stopped renewing it; the agent reads it again at "
        "the next login"
    )
    assert remembered == {"jwt_file": jwt}  # masked from the moment it was read
    assert jwt not in str(caught.value)

