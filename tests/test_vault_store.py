"""The Vault store package (agent/stores/vault): the login table, the error mapping and the
poll's GET, against a real OpenBao dev server wherever the behaviour is Vault's (DESIGN §9).

The Vault source and sink tests (test_vault_source.py, test_writeback_sinks.py,
test_store_texts.py) prove the connection through its callers; these prove its parts: each login
returns the token Vault issued with its TTL, a method is one :class:`~agent.plugin.LoginKind` (a
userpass login added here gets renewal by logging in again and the 403 re-login, like AppRole),
and each
failure becomes the agent error that says what to do, with Vault's text masked (DESIGN §10).
"""

from __future__ import annotations

import gzip
import inspect
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from agent.errors import ConfigError, SourceEmpty, SourceUnavailable
from agent.logins import token as given_token
from agent.logins.approle import KIND as APPROLE
from agent.logins.common import ttl_seconds
from agent.logins.token import KIND as TOKEN
from agent.masking import MASK
from agent.models import MAX_ANSWER_BYTES
from agent.plugin import Login, LoginContext, LoginKind
from agent.registry import BUILTIN_LOGINS, Registry
from agent.sources.vault import VaultSourceConfig
from agent.stores.vault import errors
from agent.stores.vault.connection import ERROR_BODY_BYTES, VaultConnection
from agent.stores.vault.settings import DEFAULT_TOKEN_FILE, VaultAuth
from agent.stores.vault.source import VaultSource
from tests.conftest import new_approle, vault_auth
from tests.servers import Bao, free_port

POLICY = "dvs-test-store-read"
NAMESPACE = "dvs-test-ns"


def _tolerate_in_use(fn: Callable[[], Any]) -> None:
    """Enable a mount that another test module of the session may have enabled already."""
    try:
        fn()
    except hvac.exceptions.InvalidRequest as exc:
        if "already in use" not in str(exc):
            raise


@pytest.fixture(scope="module")
def root(bao: Bao) -> Iterator[Any]:
    client = bao.client()
    client.sys.create_or_update_policy(
        POLICY,
        'path "secret/data/dvs/*" { capabilities = ["read"] }\n'
        'path "secret/metadata/dvs/*" { capabilities = ["read"] }\n',
    )
    _tolerate_in_use(lambda: client.sys.enable_auth_method("approle"))
    _tolerate_in_use(lambda: client.sys.enable_auth_method("userpass"))
    yield client
    client.adapter.close()


def new_path() -> str:
    path = f"dvs/{uuid.uuid4().hex[:12]}"
    return path


def new_token(root: Any, ttl: str = "120s", renewable: bool = True) -> str:
    created = root.auth.token.create(policies=[POLICY], ttl=ttl, renewable=renewable)
    return str(created["auth"]["client_token"])


@dataclass
class Context:
    """A :class:`LoginContext` on a fresh client, recording what the login remembered."""

    client: Any
    environ: dict[str, str] = field(default_factory=dict)
    remembered: dict[str, str] = field(default_factory=dict)

    def ctx(self, auth: VaultAuth | None = None) -> LoginContext:
        return LoginContext(
            client=self.client,
            address=auth.address if auth is not None else "http://127.0.0.1:1",
            config_key=auth.config_key if auth is not None else "vault",
            environ=self.environ,
            log=logging.getLogger("agent.vault"),
            remember=self.remembered.__setitem__,
            vault_errors=lambda exc: errors.vault_errors(exc, self.remembered.values()),
        )


@pytest.fixture
def fresh(bao: Bao) -> Iterator[Context]:
    client = hvac.Client(url=bao.address, token="")
    yield Context(client)
    client.adapter.close()


def write_secret(root: Any, path: str, **data: str) -> None:
    root.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point="secret")


# -- the table ------------------------------------------------------------------------------------


def test_every_method_is_one_kind_with_one_signature() -> None:
    registry = Registry(discover=lambda group: ())
    assert list(BUILTIN_LOGINS) == ["token", "approle", "jwt", "kubernetes", "cert"]
    for name in BUILTIN_LOGINS:
        method = registry.login(name)
        assert isinstance(method, LoginKind) and method.name == name, name
        assert list(inspect.signature(method.login).parameters) == ["config", "ctx"], name
        assert method.holder and method.what(VaultSourceConfig(role="r", client_cert="c")), name
    assert TOKEN.given and not any(registry.login(n).given for n in list(BUILTIN_LOGINS)[1:])
    assert APPROLE.what(VaultSourceConfig(approle_mount="ar")) == "AppRole login at auth/ar"
    assert APPROLE.what(VaultSourceConfig(auth_mount="ar2")) == "AppRole login at auth/ar2"
    assert registry.login("jwt").mount(VaultSourceConfig()) == "jwt"


def test_a_login_never_shows_its_token() -> None:
    login = Login("hvs.very-secret-token-value", 60, True)
    assert "very-secret" not in repr(login)
    assert repr(login) == "Login(ttl_seconds=60, renewable=True, credential_expires_at=None)"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(3600, 3600), ("120", 120), (0, 0), (-5, 0), (True, 0), ("1e3", 0), ("٣", 0), (None, 0)],
)
def test_ttl_seconds_takes_whole_numbers_only(value: object, seconds: int) -> None:
    assert ttl_seconds(value) == seconds


# -- token ----------------------------------------------------------------------------------------


def test_token_login_returns_the_tokens_ttl_and_renewability(
    bao: Bao, root: Any, fresh: Context, tmp_path: Path
) -> None:
    token = new_token(root, ttl="120s")
    token_file = tmp_path / "token"
    token_file.write_text(f"  {token}\n")
    auth = vault_auth(address=bao.address, auth_method="token", token_file=str(token_file))
    login = TOKEN.login(auth.config, fresh.ctx(auth))
    assert login.token == token
    assert 110 <= login.ttl_seconds <= 120
    assert login.renewable
    assert fresh.client.token == token  # looked up with it, left in place
    assert token in fresh.remembered.values()  # masked from the first read on


def test_root_token_from_the_environment_has_no_expiry(bao: Bao, fresh: Context) -> None:
    fresh.environ["VAULT_TOKEN"] = f"{bao.root_token}\n"
    auth = vault_auth(address=bao.address, auth_method="token")
    assert given_token.read_token(auth.config, fresh.ctx(auth)) == (bao.root_token, "$VAULT_TOKEN")
    login = TOKEN.login(auth.config, fresh.ctx(auth))
    assert (login.token, login.ttl_seconds, login.renewable) == (bao.root_token, 0, False)


def test_token_file_wins_over_the_environment_and_the_default_is_named(
    bao: Bao, fresh: Context, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file")
    fresh.environ["VAULT_TOKEN"] = "from-the-environment"
    auth = vault_auth(address=bao.address, auth_method="token", token_file=str(token_file))
    assert given_token.read_token(auth.config, fresh.ctx(auth)) == (
        "from-the-file",
        str(token_file),
    )
    with pytest.raises(SourceEmpty) as caught:
        given_token.read_token(VaultSourceConfig(auth_method="token"), Context(None).ctx())
    assert str(caught.value) == (
        f"{DEFAULT_TOKEN_FILE} (vault.token_file) does not exist: write it, or set "
        "vault.token_file to the file that holds the token"
    )


def test_revoked_token_is_rejected_and_the_client_left_without_one(
    bao: Bao, root: Any, fresh: Context
) -> None:
    token = new_token(root)
    root.auth.token.revoke(token)
    fresh.environ["VAULT_TOKEN"] = token
    auth = vault_auth(address=bao.address, auth_method="token", config_key="profiles.a.vault")
    with pytest.raises(SourceUnavailable) as caught:
        TOKEN.login(auth.config, fresh.ctx(auth))
    assert str(caught.value) == (
        f"Vault at {bao.address} does not accept the token from $VAULT_TOKEN (expired or "
        "revoked, or Vault was rebuilt; its policy must also allow the default lookup-self): "
        "export a valid token"
    )
    assert fresh.client.token == ""


# -- approle --------------------------------------------------------------------------------------


@dataclass
class Role:
    auth: VaultAuth
    role_id: str
    secret_id: str


@pytest.fixture
def role(bao: Bao, root: Any, tmp_path: Path) -> Role:
    name = f"dvs-store-{uuid.uuid4().hex[:8]}"
    role_id, secret_id, role_id_file, secret_id_file = new_approle(
        root, name, tmp_path, policy=POLICY, ttl="90s"
    )
    auth = vault_auth(
        address=bao.address, role_id_file=str(role_id_file), secret_id_file=str(secret_id_file)
    )
    return Role(auth, role_id, secret_id)


def test_approle_login_returns_a_token_with_the_roles_ttl(role: Role, fresh: Context) -> None:
    login = APPROLE.login(role.auth.config, fresh.ctx(role.auth))
    assert (login.ttl_seconds, login.renewable) == (90, True)
    assert {"role_id_file": role.role_id, "secret_id_file": role.secret_id}.items() <= (
        fresh.remembered.items()
    )
    fresh.client.token = login.token
    assert fresh.client.auth.token.lookup_self()["data"]["policies"] == ["default", POLICY]


def test_approle_login_rejected_shows_vaults_reason_not_the_secret_id(
    role: Role, fresh: Context, tmp_path: Path
) -> None:
    wrong = str(uuid.uuid4())
    Path(role.auth.config.secret_id_file).write_text(wrong)
    with pytest.raises(SourceUnavailable) as caught:
        APPROLE.login(role.auth.config, fresh.ctx(role.auth))
    message = str(caught.value)
    assert message.startswith(
        f"AppRole login at auth/approle on Vault at {role.auth.address} rejected (invalid role "
        "or secret ID): check role_id/secret_id (vault.role_id_file = "
    )
    assert wrong not in message and role.role_id not in message


def test_approle_at_a_missing_mount_names_the_mount_key(role: Role, fresh: Context) -> None:
    """OpenBao answers 403 (not 404) for a login at a path where no auth method is mounted:
    the message names both causes, the credentials and the mount key."""
    auth = vault_auth(
        address=role.auth.address,
        role_id_file=role.auth.config.role_id_file,
        secret_id_file=role.auth.config.secret_id_file,
        approle_mount="nowhere",
    )
    with pytest.raises(SourceUnavailable) as caught:
        APPROLE.login(auth.config, fresh.ctx(auth))
    message = str(caught.value)
    assert message.startswith(f"AppRole login at auth/nowhere on Vault at {auth.address} rejected")
    assert message.endswith("and that AppRole is mounted at auth/nowhere (vault.approle_mount)")


def test_credential_files_missing_or_empty_name_their_key(tmp_path: Path) -> None:
    auth = vault_auth(address="http://127.0.0.1:1", config_key="profiles.p.vault")
    remembered: dict[str, str] = {}
    ctx = Context(None, remembered=remembered).ctx(auth)
    with pytest.raises(SourceEmpty, match=r"\(profiles\.p\.vault\.role_id_file\) does not exist"):
        ctx.read_file(str(tmp_path / "absent"), "role_id_file")
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(SourceEmpty) as caught:
        ctx.read_file(str(tmp_path / "empty"), "secret_id_file")
    assert str(caught.value) == f"{tmp_path / 'empty'} (profiles.p.vault.secret_id_file) is empty"
    assert remembered == {}


# -- a method of a plug-in: userpass -----------------------------------------------------------


class UserpassLogin(LoginKind):
    """What a third-party login method looks like: one class (DESIGN §11, §12)."""

    name = "userpass"
    holder = "userpass user"

    def __init__(self, username: str, password_file: Path, calls: list[str]) -> None:
        self.username, self.password_file, self.calls = username, password_file, calls

    def login(self, config: Any, ctx: LoginContext) -> Login:
        password = ctx.read_file(str(self.password_file), "password_file")
        answer = ctx.client.auth.userpass.login(self.username, password, mount_point="userpass")
        self.calls.append(answer["auth"]["client_token"])
        lease = answer["auth"]
        return Login(lease["client_token"], lease["lease_duration"], lease["renewable"])


def test_a_plugin_method_gets_renewal_and_the_403_relogin(
    bao: Bao, root: Any, tmp_path: Path
) -> None:
    username, password = f"dvs-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    root.auth.userpass.create_or_update_user(
        username, password, policies=[POLICY], token_ttl="60s", mount_point="userpass"
    )
    (tmp_path / "password").write_text(password)
    calls: list[str] = []
    path = new_path()
    write_secret(root, path, client_id="dvs", client_secret="s3cret-value")
    now = [1000.0]
    auth = VaultAuth(
        address=bao.address,
        config=VaultSourceConfig(auth_method="userpass"),
        login=UserpassLogin(username, tmp_path / "password", calls),
    )
    connection = VaultConnection(auth, environ={}, clock=lambda: now[0])
    source = VaultSource(connection, VaultSourceConfig(path=path))

    assert source.read().client_id == "dvs"
    assert len(calls) == 1
    now[0] += 39  # less than a third of the 60 s left: not yet
    source.version()
    assert len(calls) == 1
    now[0] += 2  # 41 s: log in again before the token runs out
    source.version()
    assert len(calls) == 2
    root.auth.token.revoke(calls[-1])  # a rebuilt Vault: the token is gone
    assert source.version().startswith("kv2:1@")
    assert len(calls) == 3  # one 403, one login, one retry
    with pytest.raises(SourceUnavailable) as caught:
        VaultSource(connection, VaultSourceConfig(path="elsewhere/x")).version()
    assert str(caught.value) == (
        f"permission denied by Vault at {bao.address} to read the metadata of secret/elsewhere/x: "
        "the policy of the agent's userpass user must allow read on secret/data/elsewhere/x (and "
        "secret/metadata/elsewhere/x for version polling)"
    )
    assert password not in str(caught.value)


# -- the error mapping, with the failures a real server and network produce --------------------


AUTH = vault_auth(address="http://127.0.0.1:1", timeout=0.5)


def raised(fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no exception")


def test_connection_refused_says_check_the_address() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    exc = raised(lambda: hvac.Client(url=address, timeout=2).sys.read_health_status())
    mapped = errors.store_error(
        exc, vault_auth(address=address), "read x", holder="token", secrets=()
    )
    assert isinstance(mapped, SourceUnavailable)
    assert str(mapped) == (
        f"cannot reach Vault at {address} ([Errno 111] Connection refused) to read x: check "
        "vault.address and that Vault is running"
    )


def test_a_silent_server_is_a_timeout_naming_the_seconds() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections (the kernel does), never answers
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        auth = vault_auth(address=address, auth_method="token", timeout=0.5)
        started = time.monotonic()
        connection = VaultConnection(auth, environ={"VAULT_TOKEN": "hvs.x"})
        with pytest.raises(SourceUnavailable) as caught:
            connection.call(lambda client: None, what="read x")
        assert time.monotonic() - started < 3
    assert str(caught.value) == (
        f"cannot reach Vault at {address} (no answer within 0.5s) to look up the agent's token"
    )


def test_https_to_a_plain_http_vault_is_a_tls_failure(bao: Bao) -> None:
    address = bao.address.replace("http://", "https://")
    exc = raised(lambda: hvac.Client(url=address, timeout=2).sys.read_health_status())
    mapped = errors.store_error(
        exc, vault_auth(address=address, config_key="k"), "read x", holder="token", secrets=()
    )
    message = str(mapped)
    assert message.startswith(f"TLS verification of Vault at {address} failed ([SSL")
    assert message.endswith("): set k.ca_cert to the CA file that signed its certificate")
    assert "HTTPSConnectionPool" not in message  # the root cause, not requests' wrapping


def test_an_address_without_scheme_is_a_config_error(bao: Bao) -> None:
    address = bao.address.removeprefix("http://")
    exc = raised(lambda: hvac.Client(url=address).auth.token.lookup_self())
    mapped = errors.store_error(
        exc, vault_auth(address=address), "read x", holder="token", secrets=()
    )
    assert isinstance(mapped, ConfigError)
    assert str(mapped) == f"vault.address = {address!r} is not a Vault URL: use https://HOST:8200"


def test_vaults_own_answers_map_to_what_to_do(bao: Bao, root: Any) -> None:
    namespaced = vault_auth(address=bao.address, namespace="ns", config_key="k")
    missing = raised(lambda: root.adapter.get("/v1/nomount/x"))
    assert isinstance(missing, hvac.exceptions.InvalidPath)
    mapped = errors.store_error(missing, namespaced, "read x", holder="token", secrets=())
    assert isinstance(mapped, SourceEmpty)
    assert str(mapped) == (
        f"Vault at {bao.address} answered 404 to read x: check that k.address and k.namespace "
        "name a Vault server (not a proxy or another service)"
    )
    anonymous = hvac.Client(url=bao.address, token="")
    denied = raised(lambda: anonymous.adapter.get("/v1/secret/metadata/x"))
    assert isinstance(denied, hvac.exceptions.Forbidden)
    assert str(errors.store_error(denied, AUTH, "read x", holder="AppRole role", secrets=())) == (
        f"permission denied by Vault at {AUTH.address} to read x: the policy of the agent's "
        "AppRole role must allow read x"
    )
    broken = raised(lambda: anonymous.auth.approle.login(role_id="", secret_id=""))
    assert str(errors.store_error(broken, AUTH, "log in", holder="token", secrets=())) == (
        f"Vault at {AUTH.address} failed to log in (InternalServerError: missing role_id)"
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            hvac.exceptions.VaultDown("Vault is sealed", errors=["Vault is sealed"]),
            "Vault at http://127.0.0.1:1 is sealed: unseal it (`vault operator unseal`); the "
            "agent reads again at its next attempt",
        ),
        (
            hvac.exceptions.VaultDown(errors=["local node not active but active cluster node "]),
            "Vault at http://127.0.0.1:1 is unavailable (503: local node not active but active "
            "cluster node) to read x: is this node a standby, or is Vault starting?",
        ),
        (
            hvac.exceptions.VaultNotInitialized(errors=["not initialized"]),
            "Vault at http://127.0.0.1:1 is not initialized (501)",
        ),
        (
            hvac.exceptions.RateLimitExceeded(errors=["rate limit quota exceeded"]),
            "Vault at http://127.0.0.1:1 rate-limited read x (429)",
        ),
        (
            requests.exceptions.ChunkedEncodingError("broken"),
            "cannot reach Vault at http://127.0.0.1:1 (ChunkedEncodingError) to read x",
        ),
        (
            ValueError("what"),
            "unexpected answer from Vault at http://127.0.0.1:1 to read x (ValueError)",
        ),
    ],
)
def test_statuses_a_dev_server_cannot_produce(exc: BaseException, expected: str) -> None:
    assert str(errors.store_error(exc, AUTH, "read x", holder="token", secrets=())) == expected


def test_vaults_text_is_masked_escaped_and_cut() -> None:
    secret = f"hvs.{uuid.uuid4().hex}"
    text = f"1 error occurred:\n\t* bad token {secret}\x1b[2J " + "x" * 500
    exc = hvac.exceptions.InternalServerError(errors=[text])
    message = str(errors.store_error(exc, AUTH, "read x", holder="token", secrets=[secret]))
    assert secret not in message and MASK in message
    assert "\x1b" not in message and "\\x1b[2J" in message
    assert message.startswith(
        "Vault at http://127.0.0.1:1 failed to read x (InternalServerError: bad token "
    )
    assert len(message) < 320  # Vault's part cut to 200 characters
    # without Vault's errors, its body (an HTML page) is shown the same way
    page = hvac.exceptions.VaultError(f"<html>{secret}</html>", errors=None)
    assert errors.vault_errors(page, [secret]) == f"<html>{MASK}</html>"


def test_raise_for_status_raises_hvacs_exception_with_vaults_errors(bao: Bao) -> None:
    url = f"{bao.address}/v1/secret/metadata/x"
    with requests.get(url, stream=True, timeout=5) as response:
        data = response.raw.read(ERROR_BODY_BYTES)
        exc = raised(lambda: errors.raise_for_status(url, response, data))
    assert isinstance(exc, hvac.exceptions.Forbidden)
    assert exc.errors == ["permission denied"]


# -- the poll's GET: hvac's public adapter API, bounded ------------------------------------------


def test_poll_get_sends_the_namespace(bao: Bao, root: Any) -> None:
    _tolerate_in_use(lambda: root.sys.create_namespace(NAMESPACE))
    inside = hvac.Client(url=bao.address, token=bao.root_token, namespace=NAMESPACE)
    _tolerate_in_use(
        lambda: inside.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    )
    path = new_path()
    inside.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"client_id": "a", "client_secret": "b"}, mount_point="secret"
    )
    environ = {"VAULT_TOKEN": bao.root_token}
    auth = vault_auth(address=bao.address, auth_method="token", namespace=NAMESPACE)
    polled = VaultSource(VaultConnection(auth, environ=environ), VaultSourceConfig(path=path))
    assert polled.version().startswith("kv2:1@")
    outside = vault_auth(address=bao.address, auth_method="token")
    with pytest.raises(SourceEmpty, match="no secret at"):
        VaultSource(
            VaultConnection(outside, environ=environ), VaultSourceConfig(path=path)
        ).version()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class Recorder:
    """A loopback HTTP server answering by path; it records each request's path and headers."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[], tuple[int, dict[str, str], bytes]]] = {
            "/v1/auth/token/lookup-self": lambda: (200, JSON, b'{"data": {"ttl": 0}}'),
        }
        self.seen: list[Seen] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.seen.append(Seen(self.path, dict(self.headers.items())))
                status, headers, body = recorder.routes[self.path]()
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


JSON = {"Content-Type": "application/json"}
METADATA = "/v1/secret/metadata/dvs/x"


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


def test_poll_get_follows_a_redirect_with_the_token_and_stays_bounded(
    recorder: Recorder,
) -> None:
    token = f"hvs.{uuid.uuid4().hex}"
    moved = "/v1/secret/metadata/dvs/x?standby=forwarded"
    recorder.routes[METADATA] = lambda: (307, {"Location": moved}, b"")
    answer = {"data": {"current_version": 3, "versions": {"3": {}}}}
    recorder.routes[moved] = lambda: (200, JSON, json.dumps(answer).encode())
    auth = vault_auth(address=recorder.address, auth_method="token", namespace="team-a")
    connection = VaultConnection(auth, environ={"VAULT_TOKEN": token})
    source = VaultSource(connection, VaultSourceConfig(path="dvs/x"))
    assert source.version() == "kv2:3"
    first, second = recorder.seen[-2:]
    assert (first.path, second.path) == (METADATA, moved)
    for seen in (first, second):
        assert seen.headers["X-Vault-Token"] == token
        assert seen.headers["X-Vault-Namespace"] == "team-a"
        assert seen.headers["X-Vault-Request"] == "true"
    # the bound holds after the redirect too, on what gzip decodes to
    big = b'{"data": {"current_version": 1, "pad": "' + b"x" * MAX_ANSWER_BYTES + b'"}}'
    recorder.routes[moved] = lambda: (200, {**JSON, "Content-Encoding": "gzip"}, gzip.compress(big))
    with pytest.raises(SourceUnavailable, match=r"more than 1024 KiB \(after decoding\)"):
        source.version()
