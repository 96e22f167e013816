"""The Vault credential source and connection against a real OpenBao dev server (DESIGN §9).

Nothing is patched: hvac talks HTTP to the session's ``bao`` server (KV v2 at ``secret/``,
AppRole and a KV v1 mount set up here) or, for TLS and sealing, to a private server.
Every test uses its own secret path, role and policy names, because the server is shared.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from agent.errors import SourceEmpty, SourceUnavailable
from agent.sources.vault import VaultSourceConfig
from agent.stores.vault.connection import VaultConnection
from agent.stores.vault.settings import VaultAuth
from agent.stores.vault.source import VaultSource
from tests.conftest import new_approle, vault_auth
from tests.servers import Bao, _binary, free_port

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
READ_POLICY = "dvs-agent-test-vault-read"
KV1_MOUNT = "kv1"
#: what an OpenBao / Vault service token looks like (s.… or hvs.…)
TOKEN_PATTERN = re.compile(r"\b(hv)?s\.[A-Za-z0-9]{20,}")


# -- fixtures -------------------------------------------------------------------------------


def _tolerate_in_use(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except hvac.exceptions.InvalidRequest as exc:
        if "already in use" not in str(exc):
            raise


@pytest.fixture(scope="module")
def root(bao: Bao) -> Iterator[Any]:
    """The root client, with AppRole enabled, the read policy and a KV v1 mount."""
    client = hvac.Client(url=bao.address, token=bao.root_token)
    _tolerate_in_use(lambda: client.sys.enable_auth_method("approle"))
    _tolerate_in_use(
        lambda: client.sys.enable_secrets_engine("kv", path=KV1_MOUNT, options={"version": "1"})
    )
    client.sys.create_or_update_policy(
        READ_POLICY,
        textwrap.dedent(
            f"""
            path "secret/data/dvs/*" {{ capabilities = ["read"] }}
            path "secret/metadata/dvs/*" {{ capabilities = ["read"] }}
            path "{KV1_MOUNT}/dvs/*" {{ capabilities = ["read"] }}
            """
        ),
    )
    yield client
    client.adapter.close()


@dataclass
class Values:
    """Credential values unique to one test (so that a leak test can look for them)."""

    client_id: str
    client_secret: str

    @classmethod
    def new(cls) -> Values:
        return cls(f"cid-{uuid.uuid4().hex[:12]}", f"sec-{uuid.uuid4().hex}")

    def data(self) -> dict[str, str]:
        return {"client_id": self.client_id, "client_secret": self.client_secret}


def new_path() -> str:
    return f"dvs/{uuid.uuid4().hex}"


def write_v2(root: Any, path: str, data: dict[str, Any]) -> None:
    root.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point="secret")


@dataclass
class AppRole:
    name: str
    role_id: str
    secret_id: str
    role_id_file: Path
    secret_id_file: Path

    def auth(self, address: str) -> VaultAuth:
        return vault_auth(
            address=address,
            auth_method="approle",
            role_id_file=str(self.role_id_file),
            secret_id_file=str(self.secret_id_file),
            timeout=5,
        )


@pytest.fixture
def approle(root: Any, tmp_path: Path) -> Callable[..., AppRole]:
    """Creates an AppRole role with the read policy; role_id/secret_id written to files."""

    def make(token_ttl: str = "60s") -> AppRole:  # noqa: S107 - a duration
        name = f"dvs-test-{uuid.uuid4().hex[:10]}"
        return AppRole(name, *new_approle(root, name, tmp_path, policy=READ_POLICY, ttl=token_ttl))

    return make


def new_token(root: Any, policies: list[str] | None = None, ttl: str = "60s") -> str:
    created = root.auth.token.create(policies=policies or [READ_POLICY], ttl=ttl)
    return str(created["auth"]["client_token"])


def source_for(
    auth: VaultAuth,
    path: str,
    *,
    mount: str = "secret",
    kv_version: int = 2,
    environ: dict[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    **keys: str,
) -> VaultSource:
    connection = VaultConnection(auth, environ={} if environ is None else environ, clock=clock)
    settings = VaultSourceConfig(path=path, mount=mount, kv_version=kv_version, **keys)  # type: ignore[arg-type]
    return VaultSource(connection, settings)


def audit_paths(bao: Bao) -> list[str]:
    """The request path of every request entry in the audit log."""
    paths = []
    for line in bao.audit_log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("type") == "request":
            paths.append(entry.get("request", {}).get("path", ""))
    return paths


def logins(caplog: pytest.LogCaptureFixture) -> int:
    return sum("logged in to Vault" in record.getMessage() for record in caplog.records)


# -- authentication -------------------------------------------------------------------------


def test_token_auth_from_file(bao: Bao, root: Any, tmp_path: Path) -> None:
    path, values = new_path(), Values.new()
    write_v2(root, path, values.data())
    token_file = tmp_path / "token"
    token_file.write_text(new_token(root) + "\n")
    auth = vault_auth(address=bao.address, auth_method="token", token_file=str(token_file))
    # $VAULT_TOKEN is ignored when token_file is set
    source = source_for(auth, path, environ={"VAULT_TOKEN": "not-this-one"})
    credentials = source.read()
    assert credentials.client_id == values.client_id
    assert credentials.client_secret.reveal() == values.client_secret
    assert credentials.source == "vault"
    assert credentials.version.startswith("kv2:1@")
    source.close()


def test_token_auth_from_environment(bao: Bao, root: Any) -> None:
    path, values = new_path(), Values.new()
    write_v2(root, path, values.data())
    auth = vault_auth(address=bao.address, auth_method="token")
    source = source_for(auth, path, environ={"VAULT_TOKEN": new_token(root)})
    assert source.read().client_id == values.client_id
    source.close()


def test_approle_auth_reads_and_follows_kv2_versions(
    bao: Bao, root: Any, approle: Callable[..., AppRole]
) -> None:
    path, first, second = new_path(), Values.new(), Values.new()
    write_v2(root, path, first.data())
    source = source_for(approle().auth(bao.address), path)

    credentials = source.read()
    assert credentials.client_id == first.client_id
    assert credentials.version.startswith("kv2:1@")
    assert source.version() == credentials.version  # the baseline matches the poll

    write_v2(root, path, second.data())
    assert source.version().startswith("kv2:2@")
    assert source.version() != credentials.version
    rotated = source.read()
    assert rotated.client_id == second.client_id
    assert rotated.client_secret.reveal() == second.client_secret
    assert rotated.version == source.version()

    source.close()  # the next call logs in again
    assert source.read().version == rotated.version


def test_version_reads_only_metadata(bao: Bao, root: Any, approle: Callable[..., AppRole]) -> None:
    path, values = new_path(), Values.new()
    write_v2(root, path, values.data())
    source = source_for(approle().auth(bao.address), path)
    source.read()

    before = audit_paths(bao)
    assert before, "the audit log is empty: the audit device is not writing"
    assert f"secret/data/{path}" in before  # the read above is audited
    for _ in range(3):
        source.version()
    after = audit_paths(bao)
    new = after[len(before) :]
    assert new.count(f"secret/metadata/{path}") == 3
    assert not [p for p in new if "secret/data/" in p]


def test_recreated_secret_is_a_change_though_its_version_restarts(
    bao: Bao, root: Any, approle: Callable[..., AppRole]
) -> None:
    # a rebuilt Vault seeded again: version 1 both times, other credentials
    path, first, second = new_path(), Values.new(), Values.new()
    write_v2(root, path, first.data())
    source = source_for(approle().auth(bao.address), path)
    baseline = source.read().version
    assert baseline.startswith("kv2:1@")

    root.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point="secret")
    with pytest.raises(SourceEmpty):
        source.version()
    write_v2(root, path, second.data())
    polled = source.version()
    assert polled.startswith("kv2:1@")
    assert polled != baseline
    assert source.read().client_id == second.client_id


def test_kv1_read_and_hash_version(bao: Bao, root: Any, approle: Callable[..., AppRole]) -> None:
    path, first, second = new_path(), Values.new(), Values.new()
    root.secrets.kv.v1.create_or_update_secret(
        path=path, secret=first.data(), mount_point=KV1_MOUNT
    )
    source = source_for(approle().auth(bao.address), path, mount=KV1_MOUNT, kv_version=1)
    credentials = source.read()
    assert credentials.client_id == first.client_id
    assert credentials.version.startswith("kv1:")
    assert first.client_secret not in credentials.version
    assert source.version() == credentials.version

    root.secrets.kv.v1.create_or_update_secret(
        path=path, secret=second.data(), mount_point=KV1_MOUNT
    )
    assert source.version() != credentials.version
    assert source.read().client_secret.reveal() == second.client_secret


# -- what is missing ------------------------------------------------------------------------


def test_missing_path_is_empty(bao: Bao, root: Any, approle: Callable[..., AppRole]) -> None:
    path = new_path()
    role = approle()
    source = source_for(role.auth(bao.address), path)
    for call in (source.read, source.version):
        with pytest.raises(SourceEmpty) as info:
            call()
        message = str(info.value)
        assert f"no secret at secret/{path} on Vault at {bao.address} (KV v2)" in message
        assert "vault.path, mount and kv_version" in message

    kv1 = source_for(role.auth(bao.address), path, mount=KV1_MOUNT, kv_version=1)
    with pytest.raises(SourceEmpty, match=f"no secret at {KV1_MOUNT}/{path} .*KV v1"):
        kv1.read()


def test_deleted_current_version_is_empty_and_a_change(
    bao: Bao, root: Any, approle: Callable[..., AppRole]
) -> None:
    path, values = new_path(), Values.new()
    write_v2(root, path, values.data())
    source = source_for(approle().auth(bao.address), path)
    baseline = source.read().version
    root.secrets.kv.v2.delete_latest_version_of_secret(path=path, mount_point="secret")
    assert source.version() != baseline
    with pytest.raises(SourceEmpty, match="no secret at"):
        source.read()


def test_missing_or_empty_key_names_the_keys_not_the_values(
    bao: Bao, root: Any, approle: Callable[..., AppRole]
) -> None:
    path, values = new_path(), Values.new()
    write_v2(root, path, {"id": values.client_id, "client_secret": values.client_secret})
    role = approle()
    with pytest.raises(SourceEmpty) as info:
        source_for(role.auth(bao.address), path).read()
    message = str(info.value)
    assert "has no key 'client_id'" in message
    assert "keys present: 'client_secret', 'id'" in message
    assert "vault.client_id_key" in message
    assert values.client_id not in message and values.client_secret not in message

    # the right key names make it work
    renamed = source_for(role.auth(bao.address), path, client_id_key="id")
    assert renamed.read().client_id == values.client_id

    write_v2(root, path, {"client_id": values.client_id, "client_secret": ""})
    with pytest.raises(SourceEmpty) as info:
        source_for(role.auth(bao.address), path).read()
    message = str(info.value)
    assert "empty or non-string value at 'client_secret'" in message
    assert "vault.client_secret_key" in message
    assert values.client_id not in message


def test_missing_auth_files(bao: Bao, tmp_path: Path, approle: Callable[..., AppRole]) -> None:
    missing = tmp_path / "nope"
    auth = vault_auth(address=bao.address, auth_method="token", token_file=str(missing))
    with pytest.raises(SourceEmpty, match=rf"{missing} \(vault.token_file\) does not exist"):
        source_for(auth, new_path()).read()

    role = approle()
    auth = vault_auth(
        address=bao.address, role_id_file=str(missing), secret_id_file=str(role.secret_id_file)
    )
    with pytest.raises(SourceEmpty, match=r"\(vault.role_id_file\) does not exist"):
        source_for(auth, new_path()).read()

    role.secret_id_file.write_text("\n")
    with pytest.raises(SourceEmpty, match=r"\(vault.secret_id_file\) is empty"):
        source_for(role.auth(bao.address), new_path()).read()


UNPRIVILEGED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from agent.errors import AgentError
    from agent.sources.vault import VaultSourceConfig
    from agent.stores.vault.source import VaultSource
    from agent.stores.vault.connection import VaultConnection
    from agent.stores.vault.settings import VaultAuth

    auth = VaultAuth(
        address=sys.argv[1],
        config=VaultSourceConfig(role_id_file=sys.argv[2], secret_id_file=sys.argv[3]),
    )
    source = VaultSource(VaultConnection(auth, environ={}), VaultSourceConfig(path="dvs/x"))
    try:
        source.read()
    except AgentError as exc:
        print(json.dumps({"uid": os.geteuid(), "type": type(exc).__name__, "error": str(exc)}))
    """
)


def test_unreadable_secret_id_file_is_unavailable(bao: Bao, root: Any) -> None:
    # root reads every file: run the source as an unprivileged user (DESIGN §9)
    directory = Path(tempfile.mkdtemp(prefix="dvs-vault-source-"))
    try:
        directory.chmod(0o755)
        role_id_file = directory / "role_id"
        secret_id_file = directory / "secret_id"
        role_id_file.write_text("role-id-value\n")
        role_id_file.chmod(0o644)
        secret_id_file.write_text("secret-id-value\n")
        secret_id_file.chmod(0o600)
        argv = [sys.executable, "-c", UNPRIVILEGED_SCRIPT, bao.address]
        argv += [str(role_id_file), str(secret_id_file)]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv: cannot drop privileges")
            argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
        else:
            secret_id_file.chmod(0o000)
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(directory)
    assert result["uid"] != 0
    assert result["type"] == "SourceUnavailable"
    assert f"{secret_id_file} (vault.secret_id_file) is not readable" in result["error"]
    assert "secret-id-value" not in result["error"]


def test_approle_login_rejected(bao: Bao, approle: Callable[..., AppRole]) -> None:
    role = approle()
    role.secret_id_file.write_text("00000000-1111-2222-3333-444444444444\n")
    with pytest.raises(SourceUnavailable) as info:
        source_for(role.auth(bao.address), new_path()).read()
    message = str(info.value)
    assert f"AppRole login at auth/approle on Vault at {bao.address} rejected" in message
    assert "check role_id/secret_id" in message and "may have expired" in message
    assert role.role_id not in message
    assert "00000000-1111-2222-3333-444444444444" not in message


# -- denied, unreachable, sealed, TLS -------------------------------------------------------


def test_permission_denied_names_the_policy_paths(bao: Bao, root: Any, tmp_path: Path) -> None:
    path, values = new_path(), Values.new()
    write_v2(root, path, values.data())
    token_file = tmp_path / "token"
    token_file.write_text(new_token(root, policies=["default"]))
    auth = vault_auth(address=bao.address, auth_method="token", token_file=str(token_file))
    source = source_for(auth, path)
    for call in (source.read, source.version):
        with pytest.raises(SourceUnavailable) as info:
            call()
        message = str(info.value)
        assert f"permission denied by Vault at {bao.address}" in message
        assert "the policy of the agent's token must allow read on " in message
        assert f"secret/data/{path} (and secret/metadata/{path} for version polling)" in message

    kv1 = source_for(auth, path, mount=KV1_MOUNT, kv_version=1)
    with pytest.raises(SourceUnavailable, match=f"must allow read on {KV1_MOUNT}/{path}$"):
        kv1.read()


def test_unreachable_address_fails_fast(approle: Callable[..., AppRole]) -> None:
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    source = source_for(approle().auth(address), new_path())
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as info:
        source.read()
    assert time.monotonic() - started < 2
    message = str(info.value)
    assert message.startswith(f"cannot reach Vault at {address} (")
    assert "Connection refused" in message

    token = vault_auth(address=address, auth_method="token")
    with pytest.raises(SourceUnavailable, match=f"cannot reach Vault at {address}"):
        source_for(token, new_path(), environ={"VAULT_TOKEN": "t"}).read()


@dataclass(frozen=True)
class TlsBao:
    address: str
    ca_cert: Path
    root_token: str
    unseal_key: str


@contextmanager
def tls_bao_server(workdir: Path) -> Iterator[TlsBao]:
    """A private ``bao server -dev -dev-tls`` (its own CA), which tests may seal."""
    port = free_port()
    log = workdir / "bao.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                _binary("bao"),
                "server",
                "-dev",
                "-dev-tls",
                f"-dev-tls-cert-dir={workdir}",
                "-dev-no-store-token",
                "-dev-root-token-id=tls-root",
                f"-dev-listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    try:
        address = f"https://127.0.0.1:{port}"
        ca_cert = workdir / "vault-ca.pem"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bao -dev-tls exited: {log.read_text()[-2000:]}")
            match = re.search(r"Unseal Key: (\S+)", log.read_text())
            if match and ca_cert.exists():
                try:
                    if not hvac.Client(url=address, verify=str(ca_cert)).sys.is_sealed():
                        break
                except Exception:  # noqa: S110 - not up yet
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao -dev-tls did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield TlsBao(address, ca_cert, "tls-root", match.group(1))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBao]:
    with tls_bao_server(tmp_path_factory.mktemp("bao-tls")) as server:
        client = hvac.Client(
            url=server.address, token=server.root_token, verify=str(server.ca_cert)
        )
        client.secrets.kv.v2.create_or_update_secret(
            path="dvs/tls", secret={"client_id": "tls-id", "client_secret": "tls-secret-value"}
        )
        client.adapter.close()
        yield server


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_verification_failure_names_ca_cert(tls_bao: TlsBao) -> None:
    environ = {"VAULT_TOKEN": tls_bao.root_token}
    plain = vault_auth(address=tls_bao.address, auth_method="token")
    with pytest.raises(SourceUnavailable) as info:
        source_for(plain, "dvs/tls", environ=environ).read()
    message = str(info.value)
    assert message.startswith(f"TLS verification of Vault at {tls_bao.address} failed (")
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert "set vault.ca_cert to the CA file" in message

    pinned = vault_auth(address=tls_bao.address, auth_method="token", ca_cert=str(tls_bao.ca_cert))
    assert source_for(pinned, "dvs/tls", environ=environ).read().client_id == "tls-id"
    skip = vault_auth(address=tls_bao.address, auth_method="token", tls_skip_verify=True)
    assert source_for(skip, "dvs/tls", environ=environ).read().client_id == "tls-id"


def test_sealed_vault_says_unseal_it(tls_bao: TlsBao) -> None:
    auth = vault_auth(address=tls_bao.address, auth_method="token", ca_cert=str(tls_bao.ca_cert))
    source = source_for(auth, "dvs/tls", environ={"VAULT_TOKEN": tls_bao.root_token})
    source.read()
    client = hvac.Client(url=tls_bao.address, token=tls_bao.root_token, verify=str(tls_bao.ca_cert))
    client.sys.seal()
    try:
        for call in (source.read, source.version):
            with pytest.raises(SourceUnavailable) as info:
                call()
            assert str(info.value).startswith(f"Vault at {tls_bao.address} is sealed: unseal it")
    finally:
        client.sys.submit_unseal_key(tls_bao.unseal_key)
        client.adapter.close()
    assert source.read().client_id == "tls-id"


# -- staying logged in ----------------------------------------------------------------------


def test_approle_token_expiry_logs_in_again(
    bao: Bao, root: Any, approle: Callable[..., AppRole], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    path, values = new_path(), Values.new()
    write_v2(root, path, values.data())
    role = approle(token_ttl="2s")
    # one renews ahead of expiry (a third of the TTL left), the other never sees time pass:
    # its token expires, Vault answers 403 and it logs in again on that path
    ahead = source_for(role.auth(bao.address), path)
    frozen = source_for(role.auth(bao.address), path, clock=lambda: 0.0)
    ahead.read()
    frozen.read()
    assert logins(caplog) == 2
    time.sleep(2.3)
    caplog.clear()
    assert ahead.read().client_id == values.client_id
    assert logins(caplog) == 1
    assert not [r for r in caplog.records if "denied" in r.getMessage()]
    caplog.clear()
    assert frozen.version().startswith("kv2:1@")
    assert logins(caplog) == 1
    assert [r for r in caplog.records if "denied" in r.getMessage()]


def revoke_role_tokens(root: Any, role: str) -> int:
    """Revoke every token issued to AppRole ``role`` (found by accessor: no token value needed)."""
    revoked = 0
    for accessor in root.auth.token.list_accessors()["data"]["keys"]:
        try:
            data = root.auth.token.lookup_accessor(accessor)["data"]
        except hvac.exceptions.VaultError:
            continue
        if (data.get("meta") or {}).get("role_name") == role:
            root.auth.token.revoke_accessor(accessor)
            revoked += 1
    return revoked


def approle_source(
    bao: Bao, root: Any, approle: Callable[..., AppRole], caplog: pytest.LogCaptureFixture
) -> tuple[AppRole, VaultSource, Values]:
    """A KV v2 secret, an AppRole that may read it, and a source logged in with that role."""
    caplog.set_level(logging.INFO, logger="agent")
    path, values = new_path(), Values.new()
    write_v2(root, path, values.data())
    role = approle()
    return role, source_for(role.auth(bao.address), path), values


def test_revoked_approle_token_logs_in_again(
    bao: Bao, root: Any, approle: Callable[..., AppRole], caplog: pytest.LogCaptureFixture
) -> None:
    role, source, values = approle_source(bao, root, approle, caplog)
    source.read()
    assert revoke_role_tokens(root, role.name) == 1
    caplog.clear()
    assert source.read().client_id == values.client_id
    assert logins(caplog) == 1


def test_poll_after_revoked_token_logs_in_again_and_uses_the_new_token(
    bao: Bao, root: Any, approle: Callable[..., AppRole], caplog: pytest.LogCaptureFixture
) -> None:
    """The poll's prepared request carries the token: a new login must not reuse the old one."""
    role, source, _ = approle_source(bao, root, approle, caplog)
    baseline = source.version()
    for _ in range(3):
        assert revoke_role_tokens(root, role.name) == 1
        caplog.clear()
        assert source.version() == baseline
        assert logins(caplog) == 1
        assert source.version() == baseline  # the new token, not another login
        assert logins(caplog) == 1


def test_rotated_token_file_is_read_again(bao: Bao, root: Any, tmp_path: Path) -> None:
    path, values = new_path(), Values.new()
    write_v2(root, path, values.data())
    token_file = tmp_path / "token"
    old = new_token(root)
    token_file.write_text(old)
    auth = vault_auth(address=bao.address, auth_method="token", token_file=str(token_file))
    source = source_for(auth, path)
    source.read()

    root.auth.token.revoke(old)
    new = new_token(root)
    token_file.write_text(new + "\n")
    assert source.read().client_id == values.client_id

    # revoked and not replaced: the token itself is named as the problem, not the policy
    root.auth.token.revoke(new)
    with pytest.raises(SourceUnavailable) as info:
        source.read()
    message = str(info.value)
    assert f"does not accept the token from {token_file} (vault.token_file)" in message
    assert new not in message and old not in message


def test_token_auth_renews_or_rereads_before_expiry(
    bao: Bao, root: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent")
    path, values = new_path(), Values.new()
    write_v2(root, path, values.data())
    token_file = tmp_path / "token"
    token_file.write_text(new_token(root, ttl="90s"))
    now = [0.0]
    auth = vault_auth(address=bao.address, auth_method="token", token_file=str(token_file))
    source = source_for(auth, path, clock=lambda: now[0])
    source.read()

    def messages() -> list[str]:
        found = [record.getMessage() for record in caplog.records]
        caplog.clear()
        return found

    messages()
    now[0] = 30.0  # two thirds of the TTL left: nothing to do
    source.version()
    assert not [m for m in messages() if "renewed" in m or "changed" in m]
    now[0] = 61.0  # less than a third left: renew_self
    source.version()
    assert any(m.startswith("renewed the Vault token from") for m in messages())

    # a new token in the file (e.g. written by Vault Agent) is taken before the old one expires
    token_file.write_text(
        root.auth.token.create(policies=[READ_POLICY], ttl="90s", renewable=False)["auth"][
            "client_token"
        ]
    )
    now[0] = 200.0
    assert source.read().client_id == values.client_id
    assert any("changed: using the new one" in m for m in messages())
    now[0] = 300.0  # not renewable: said once, then left to the 403 path
    source.version()
    assert any("is not renewable: replace it" in m for m in messages())
    now[0] = 400.0
    source.version()
    assert not [m for m in messages() if "renewable" in m]


# -- nothing secret in messages or logs -----------------------------------------------------


def test_no_secret_in_messages_or_debug_logs(
    bao: Bao,
    root: Any,
    approle: Callable[..., AppRole],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in ("agent", "hvac", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    path, first, second = new_path(), Values.new(), Values.new()
    write_v2(root, path, first.data())
    role = approle()
    token_file = tmp_path / "token"
    token = new_token(root)
    token_file.write_text(token)
    messages: list[str] = []

    def attempt(call: Callable[[], object]) -> None:
        try:
            call()
        except (SourceEmpty, SourceUnavailable) as exc:
            messages.append(str(exc))

    via_role = source_for(role.auth(bao.address), path)
    via_token = source_for(
        vault_auth(address=bao.address, auth_method="token", token_file=str(token_file)), path
    )
    for source in (via_role, via_token):
        attempt(source.read)
        attempt(source.version)
    write_v2(root, path, second.data())
    revoke_role_tokens(root, role.name)
    attempt(via_role.version)
    attempt(via_role.read)
    write_v2(root, path, {"client_id": second.client_id})  # a key missing
    attempt(via_role.read)
    root.auth.token.revoke(token)
    attempt(via_token.read)  # rejected token
    role.secret_id_file.write_text("wrong-" + role.secret_id)
    attempt(source_for(role.auth(bao.address), path).read)  # login rejected

    assert len(messages) >= 3
    assert any("login" in record.getMessage() for record in caplog.records)
    assert any(record.name.startswith("urllib3") for record in caplog.records)
    text = "\n".join([caplog.text, *messages])
    for value in (
        first.client_secret,
        second.client_secret,
        token,
        role.role_id,
        role.secret_id,
    ):
        assert value not in text
    assert not TOKEN_PATTERN.search(text)
    assert "x-vault-token" not in text.lower()
