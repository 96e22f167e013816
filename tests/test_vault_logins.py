"""Vault logins beyond AppRole and token (DESIGN §12): jwt, kubernetes and cert.

Config checks and the local parts (a JWT's expiry, a certificate's validity) in-process; each
method against a real OpenBao with the auth method configured by the test (tests/vault_logins.py):
it logs in, logs in again before its token runs out, logs in again after a 403, reads a rotated
JWT or certificate, and says what is wrong, naming the address, mount, role and file, without
ever showing the JWT.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import parse_config
from agent.devserver import TokenServer
from agent.errors import ConfigError, SourceUnavailable
from agent.logins.common import jwt_expiry
from agent.logins.kubernetes import SERVICE_ACCOUNT_TOKEN
from agent.plugin import Login, LoginContext, LoginKind
from agent.registry import Registry
from agent.sources.vault import VaultSourceConfig
from agent.stores.vault.connection import VaultConnection
from agent.stores.vault.settings import VaultAuth
from agent.stores.vault.source import VaultSource
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Spawn,
    agent_env,
    metric_samples,
    metric_value,
    run_cli,
    wait_for,
)
from tests.servers import free_port
from tests.vault_logins import (
    BaoTLS,
    CertAuthority,
    JwtIssuer,
    TokenReviewServer,
    configure_cert,
    configure_jwt,
    configure_kubernetes,
    make_client_cert,
    write_kv_read_policy,
)
from tests.vault_logins import bao_tls_fixture as bao_tls_fixture
from tests.vault_logins import jwt_issuer_fixture as jwt_issuer_fixture
from tests.vault_logins import login_ca_fixture as login_ca_fixture
from tests.vault_logins import token_review_fixture as token_review_fixture


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


# -- against a real OpenBao ---------------------------------------------------------------------

POLICY = "dvs-logins-read"


@pytest.fixture(scope="module")
def root(bao_tls: BaoTLS) -> Iterator[Any]:
    client = bao_tls.client()
    write_kv_read_policy(client, POLICY, path="dvs")
    client.sys.create_or_update_policy(
        POLICY,
        'path "secret/data/dvs/*" { capabilities = ["read"] }\n'
        'path "secret/metadata/dvs/*" { capabilities = ["read"] }\n',
    )
    yield client
    client.adapter.close()


def new_secret(root: Any) -> str:
    path = f"dvs/{uuid.uuid4().hex[:12]}"
    root.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    )
    return path


@dataclass
class Counting(LoginKind):
    """A built-in method, counting its logins and keeping the tokens it got."""

    inner: LoginKind
    tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.inner.name  # type: ignore[misc]
        self.holder = self.inner.holder  # type: ignore[misc]

    def mount(self, config: Any) -> str:
        return self.inner.mount(config)

    def what(self, config: Any) -> str:
        return self.inner.what(config)

    def client_cert(self, config: Any) -> tuple[str, str] | None:
        return self.inner.client_cert(config)

    def login(self, config: Any, ctx: LoginContext) -> Login:
        login = self.inner.login(config, ctx)
        self.tokens.append(login.token)
        return login


@dataclass
class Rig:
    """A Vault source on one connection with an injected clock, its logins counted."""

    source: VaultSource
    method: Counting
    now: list[float]
    expiries: list[tuple[str, float]]

    def read_id(self) -> str:
        return self.source.read().client_id


def rig(address: str, path: str, **keys: Any) -> Rig:
    config = VaultSourceConfig(address=address, path=path, **keys)
    method = Counting(Registry().login(config.auth_method))
    now = [1000.0]
    expiries: list[tuple[str, float]] = []
    auth = VaultAuth(address=address, config=config, config_key="profiles.dvs.vault", login=method)
    connection = VaultConnection(
        auth,
        environ={},
        clock=lambda: now[0],
        report_expiry=lambda m, at: expiries.append((m, at)),
    )
    return Rig(
        VaultSource(connection, config, config_key="profiles.dvs.vault"), method, now, expiries
    )


def renews_and_relogs_in(r: Rig, root: Any, ttl: int) -> None:
    """The token is replaced by a login before it runs out, and after a 403."""
    assert r.read_id() == CLIENT_ID
    assert len(r.method.tokens) == 1
    r.now[0] += ttl * 0.6  # more than a third left: no login
    r.source.version()
    assert len(r.method.tokens) == 1
    r.now[0] += ttl * 0.1  # less than a third left: log in again before it runs out
    r.source.version()
    assert len(r.method.tokens) == 2
    root.auth.token.revoke(r.method.tokens[-1])  # a rebuilt Vault: the token is gone
    assert r.read_id() == CLIENT_ID
    assert len(r.method.tokens) == 3  # the 403, one login, the retry


def once_config(tmp_path: Path, server: TokenServer, vault: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[agent]
state_dir = "{tmp_path}/state"
log_level = "debug"
log_format = "text"

[health]
listen = ""

[profiles.dvs]
token_url = "{server.url}"
sources = ["vault"]

[profiles.dvs.vault]
{vault}

[[profiles.dvs.sinks]]
path = "{tmp_path}/token"
"""
    )
    return path


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        yield server


# -- jwt --


@pytest.fixture(scope="module")
def jwt_mount(root: Any, jwt_issuer: JwtIssuer) -> str:
    configure_jwt(
        root,
        pubkey_pem=jwt_issuer.public_key_pem,
        mount="jwt-logins",
        role="dvs",
        policies=(POLICY,),
        ttl=dt.timedelta(seconds=60),
    )
    return "jwt-logins"


def test_jwt_login_renews_relogs_in_and_reads_the_rotated_jwt(
    bao_tls: BaoTLS, root: Any, jwt_issuer: JwtIssuer, jwt_mount: str, tmp_path: Path
) -> None:
    jwt_file = tmp_path / "vault.jwt"
    first = jwt_issuer.mint(ttl=dt.timedelta(minutes=10))
    jwt_file.write_text(first + "\n")
    r = rig(
        bao_tls.address,
        new_secret(root),
        auth_method="jwt",
        auth_mount=jwt_mount,
        role="dvs",
        jwt_file=str(jwt_file),
    )
    renews_and_relogs_in(r, root, 60)
    (method, at) = r.expiries[-1]
    assert method == "jwt" and abs(at - jwt_issuer_exp(first)) < 1
    # the identity provider rotates the file: the next login reads the new JWT
    second = jwt_issuer.mint(ttl=dt.timedelta(minutes=20))
    jwt_file.write_text(second)
    root.auth.token.revoke(r.method.tokens[-1])
    assert r.read_id() == CLIENT_ID
    assert abs(r.expiries[-1][1] - jwt_issuer_exp(second)) < 1
    # a JWT nobody renewed: the error names the file; the token in hand stays in use until then
    jwt_file.write_text(jwt_issuer.expired())
    root.auth.token.revoke(r.method.tokens[-1])
    with pytest.raises(SourceUnavailable) as caught:
        r.read_id()
    message = str(caught.value)
    assert f"the JWT in {jwt_file} (profiles.dvs.vault.jwt_file) expired at " in message
    assert first not in message and second not in message


def jwt_issuer_exp(token: str) -> float:
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


def test_jwt_rejected_names_address_mount_role_file_and_vaults_reason(
    bao_tls: BaoTLS, root: Any, jwt_issuer: JwtIssuer, jwt_mount: str, tmp_path: Path
) -> None:
    jwt_file = tmp_path / "vault.jwt"
    wrong = jwt_issuer.mint(aud="someone-else")
    jwt_file.write_text(wrong)
    r = rig(
        bao_tls.address,
        new_secret(root),
        auth_method="jwt",
        auth_mount=jwt_mount,
        role="dvs",
        jwt_file=str(jwt_file),
    )
    with pytest.raises(SourceUnavailable) as caught:
        r.read_id()
    message = str(caught.value)
    assert message.startswith(
        f"JWT login at auth/{jwt_mount} (role dvs) on Vault at {bao_tls.address} rejected "
        "(error validating token: invalid audience (aud) claim: audience claim does not match "
        "any expected audience"
    )
    assert f"check the JWT in {jwt_file} (profiles.dvs.vault.jwt_file)" in message
    assert "(profiles.dvs.vault.role)" in message and "(profiles.dvs.vault.auth_mount)" in message
    assert wrong not in message
    r2 = rig(
        bao_tls.address,
        new_secret(root),
        auth_method="jwt",
        auth_mount="no-such-jwt",
        role="dvs",
        jwt_file=str(jwt_file),
    )
    jwt_file.write_text(jwt_issuer.mint())
    with pytest.raises(SourceUnavailable) as caught:
        r2.read_id()
    # OpenBao answers 403 for a path with no auth method: the message names both causes
    assert "auth/no-such-jwt" in str(caught.value)


def test_jwt_end_to_end_once_and_no_jwt_in_the_output(
    bao_tls: BaoTLS,
    root: Any,
    jwt_issuer: JwtIssuer,
    jwt_mount: str,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    jwt = jwt_issuer.mint()
    (tmp_path / "vault.jwt").write_text(jwt)
    config = once_config(
        tmp_path,
        token_server,
        f'address = "{bao_tls.address}"\npath = "{new_secret(root)}"\nauth_method = "jwt"\n'
        f'auth_mount = "{jwt_mount}"\nrole = "dvs"\njwt_file = "{tmp_path}/vault.jwt"',
    )
    check = run_cli("check", "-c", str(config), env=agent_env())
    assert check.returncode == 0, check.stderr
    assert f"jwt login (role dvs, auth/{jwt_mount})" in check.stdout
    result = run_cli("once", "-c", str(config), env=agent_env())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "token").read_text() in token_server.issued()
    assert jwt not in result.stdout + result.stderr + check.stdout + check.stderr
    assert jwt.split(".")[1] not in result.stderr


def test_run_exports_the_jwts_expiry(
    bao_tls: BaoTLS,
    root: Any,
    jwt_issuer: JwtIssuer,
    jwt_mount: str,
    token_server: TokenServer,
    tmp_path: Path,
    spawn: Spawn,
) -> None:
    jwt = jwt_issuer.mint(ttl=dt.timedelta(minutes=30))
    (tmp_path / "vault.jwt").write_text(jwt)
    config = once_config(
        tmp_path,
        token_server,
        f'address = "{bao_tls.address}"\npath = "{new_secret(root)}"\nauth_method = "jwt"\n'
        f'auth_mount = "{jwt_mount}"\nrole = "dvs"\njwt_file = "{tmp_path}/vault.jwt"',
    )
    listen = f"127.0.0.1:{free_port()}"
    config.write_text(config.read_text().replace('listen = ""', f'listen = "{listen}"'))
    agent = spawn(config)
    name = "dvs_agent_login_credential_expiry_timestamp_seconds"

    def exported() -> float | None:
        try:
            text = httpx.get(f"http://{listen}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        found = metric_samples(text)
        return (
            metric_value(found, name, profile="dvs", method="jwt")
            if any(key[0] == name for key in found)
            else None
        )

    assert wait_for(lambda: exported() is not None), agent.output()
    assert exported() == jwt_issuer_exp(jwt)
    agent.stop()
    assert jwt not in agent.output()


# -- kubernetes --


@pytest.fixture(scope="module")
def k8s_mount(root: Any, token_review: TokenReviewServer) -> str:
    configure_kubernetes(
        root,
        host=token_review.host,
        ca_pem=token_review.ca_pem,
        mount="k8s-logins",
        role="dvs",
        bound_service_account_names=("dvs-agent",),
        bound_service_account_namespaces=("payments",),
        policies=(POLICY,),
        ttl=dt.timedelta(seconds=60),
    )
    return "k8s-logins"


def test_kubernetes_login_renews_relogs_in_and_reads_the_rotated_token(
    bao_tls: BaoTLS, root: Any, token_review: TokenReviewServer, k8s_mount: str, tmp_path: Path
) -> None:
    account = token_review.service_account("payments", "dvs-agent")
    token_review.grant_review(account)
    token_file = tmp_path / "token"
    first = token_review.mint(account)
    token_file.write_text(first)
    r = rig(
        bao_tls.address,
        new_secret(root),
        auth_method="kubernetes",
        auth_mount=k8s_mount,
        role="dvs",
        jwt_file=str(token_file),
    )
    reviews = token_review.review_count
    renews_and_relogs_in(r, root, 60)
    assert token_review.review_count - reviews == 3  # Vault asked the API server at each login
    assert r.expiries[-1][0] == "kubernetes"
    # the kubelet rotates the projected token; the old one is revoked
    second = token_review.mint(account)
    token_file.write_text(second)
    token_review.revoke(first)
    root.auth.token.revoke(r.method.tokens[-1])
    assert r.read_id() == CLIENT_ID
    assert abs(r.expiries[-1][1] - jwt_issuer_exp(second)) < 1
    # a revoked token (the pod's service account deleted): a rejection naming the file
    token_review.revoke(second)
    root.auth.token.revoke(r.method.tokens[-1])
    with pytest.raises(SourceUnavailable) as caught:
        r.read_id()
    message = str(caught.value)
    assert message.startswith(
        f"Kubernetes login at auth/{k8s_mount} (role dvs) on Vault at {bao_tls.address} "
        "rejected (permission denied): check that the service account of the token in "
        f"{token_file} (profiles.dvs.vault.jwt_file)"
    )
    assert second not in message


def test_kubernetes_wrong_namespace_is_named(
    bao_tls: BaoTLS, root: Any, token_review: TokenReviewServer, k8s_mount: str, tmp_path: Path
) -> None:
    account = token_review.service_account("elsewhere", "dvs-agent")
    token_review.grant_review(account)
    (tmp_path / "token").write_text(token_review.mint(account))
    r = rig(
        bao_tls.address,
        new_secret(root),
        auth_method="kubernetes",
        auth_mount=k8s_mount,
        role="dvs",
        jwt_file=str(tmp_path / "token"),
    )
    with pytest.raises(SourceUnavailable, match=r"rejected \(namespace not authorized\)"):
        r.read_id()


# -- cert --


@pytest.fixture(scope="module")
def cert_mount(root: Any, login_ca: CertAuthority) -> str:
    configure_cert(
        root,
        ca_pem=login_ca.cert_pem,
        mount="cert-logins",
        name="dvs",
        policies=(POLICY,),
        ttl=dt.timedelta(seconds=60),
    )
    return "cert-logins"


def cert_keys(bao_tls: BaoTLS, cert_mount: str, files: Any) -> dict[str, Any]:
    return {
        "auth_method": "cert",
        "auth_mount": cert_mount,
        "role": "dvs",
        "client_cert": str(files.cert),
        "client_key": str(files.key),
        "ca_cert": str(bao_tls.ca_file),
    }


def test_cert_login_renews_relogs_in_and_uses_the_renewed_certificate(
    bao_tls: BaoTLS, root: Any, login_ca: CertAuthority, cert_mount: str, tmp_path: Path
) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    files = make_client_cert(login_ca, "host42.internal", tmp_path, not_after=soon, stem="client")
    r = rig(bao_tls.tls_address, new_secret(root), **cert_keys(bao_tls, cert_mount, files))
    renews_and_relogs_in(r, root, 60)
    assert r.expiries[-1] == ("cert", float(int(soon.timestamp())))
    # renewed in place (same paths): the next login presents the new certificate
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    first = root.auth.token.lookup(r.method.tokens[-1])["data"]
    assert first["meta"]["common_name"] == "host42.internal"
    make_client_cert(login_ca, "host42-renewed.internal", tmp_path, not_after=later, stem="client")
    root.auth.token.revoke(r.method.tokens[-1])
    assert r.read_id() == CLIENT_ID
    assert r.expiries[-1] == ("cert", float(int(later.timestamp())))
    # Vault saw the renewed certificate in the handshake, not a kept-alive old connection's
    renewed = root.auth.token.lookup(r.method.tokens[-1])["data"]
    assert renewed["meta"]["common_name"] == "host42-renewed.internal"


def test_cert_expired_or_untrusted_or_mismatched_names_the_file(
    bao_tls: BaoTLS, root: Any, login_ca: CertAuthority, cert_mount: str, tmp_path: Path
) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    expired = make_client_cert(login_ca, "host42.internal", tmp_path, not_after=past, stem="old")
    r = rig(bao_tls.tls_address, new_secret(root), **cert_keys(bao_tls, cert_mount, expired))
    with pytest.raises(SourceUnavailable) as caught:
        r.read_id()
    assert str(caught.value).startswith(
        f"the client certificate {expired.cert} (profiles.dvs.vault.client_cert) expired at "
    )
    assert r.method.tokens == []
    stranger = make_client_cert(CertAuthority.create("not trusted"), "h", tmp_path, stem="odd")
    r = rig(bao_tls.tls_address, new_secret(root), **cert_keys(bao_tls, cert_mount, stranger))
    with pytest.raises(SourceUnavailable) as caught:
        r.read_id()
    message = str(caught.value)
    assert message.startswith(
        f"certificate login at auth/{cert_mount} (role dvs) on Vault at {bao_tls.tls_address} "
        "rejected (invalid certificate or no client certificate supplied): check that "
        f"{stranger.cert} (profiles.dvs.vault.client_cert) is issued by a CA that the cert role"
    )
    good = make_client_cert(login_ca, "h", tmp_path, stem="good")
    mixed = {**cert_keys(bao_tls, cert_mount, good), "client_key": str(stranger.key)}
    r = rig(bao_tls.tls_address, new_secret(root), **mixed)
    with pytest.raises(SourceUnavailable) as caught:
        r.read_id()
    assert str(caught.value).startswith(
        f"cannot use the client certificate {good.cert} (profiles.dvs.vault.client_cert) with "
        f"the key {stranger.key} (profiles.dvs.vault.client_key): KEY_VALUES_MISMATCH"
    )
    assert "PRIVATE KEY" not in str(caught.value)


def test_cert_end_to_end_once_with_a_vault_sink_taking_the_tables_login(
    bao_tls: BaoTLS,
    root: Any,
    login_ca: CertAuthority,
    cert_mount: str,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    files = make_client_cert(login_ca, "host42.internal", tmp_path, stem="client")
    root.sys.create_or_update_policy(
        "dvs-logins-write",
        'path "secret/data/dvs-out/*" { capabilities = ["create", "update", "read"] }\n',
    )
    configure_cert(
        root,
        ca_pem=login_ca.cert_pem,
        mount=cert_mount,
        name="dvs",
        policies=(POLICY, "dvs-logins-write"),
        ttl=dt.timedelta(seconds=60),
    )
    keys = cert_keys(bao_tls, cert_mount, files)
    vault = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    config = once_config(
        tmp_path,
        token_server,
        f'address = "{bao_tls.tls_address}"\npath = "{new_secret(root)}"\n{vault}\n'
        '\n[[profiles.dvs.sinks]]\ntype = "vault"\npath = "dvs-out/token"',
    )
    result = run_cli("once", "-c", str(config), env=agent_env())
    assert result.returncode == 0, result.stderr
    stored = root.secrets.kv.v2.read_secret_version(
        path="dvs-out/token", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["access_token"] == (tmp_path / "token").read_text()


def test_a_fifo_as_client_certificate_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A FIFO planted at client_cert (or client_key) would block OpenSSL's read for ever."""
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    config = VaultSourceConfig(
        auth_method="cert", client_cert=str(fifo), client_key=str(fifo), address="https://v"
    )
    with pytest.raises(SourceUnavailable) as caught:
        Registry().login("cert").login(config, context(tmp_path, {}, 0.0))
    assert str(caught.value) == (
        f"{fifo} (profiles.dvs.vault.client_cert) is not a regular file (a FIFO, a device or a "
        "directory?)"
    )
