"""The write-back sinks (vault, aws, redis) against real servers (DESIGN §4, §9).

Nothing is patched: hvac talks to the session's OpenBao (``bao``), boto3 to ``moto_server``
(``moto``), redis-py to a real ``redis-server`` (``redis``). The servers are shared, so every
test uses its own paths, secrets and keys.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import pytest
from botocore.exceptions import ClientError

from agent.errors import SinkError
from agent.models import Secret, Token
from agent.sinks.aws import AwsSinkConfig
from agent.sinks.redis import RedisSinkConfig
from agent.sources.vault import VaultSourceConfig
from agent.stores.aws.sink import AwsSink
from agent.stores.redis import RedisSink
from agent.stores.vault.connection import VaultConnection
from agent.stores.vault.sink import VaultSink
from tests.conftest import clean_aws_env, vault_auth
from tests.servers import (
    REDIS_ACL_PASSWORD,
    REDIS_ACL_USER,
    REDIS_PASSWORD,
    Bao,
    Moto,
    RedisServer,
    bao_server,
    free_port,
)

PASSWORD_VAR = "DVS_TEST_REDIS_PASSWORD"
READ_ONLY_POLICY = "dvs-agent-test-sink-read-only"


# -- tokens ---------------------------------------------------------------------------------------


def make_token(expires_in: int = 3600, *, obtained_ago: int = 0) -> Token:
    """A token with a unique value, obtained ``obtained_ago`` seconds ago."""
    obtained = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=obtained_ago)
    return Token(
        access_token=Secret(f"tok-{uuid.uuid4().hex}{uuid.uuid4().hex}"),
        token_type="bearer",
        expires_in=expires_in,
        obtained_at=obtained,
        expires_at=obtained + timedelta(seconds=expires_in),
        scope="read write",
        extensions={"provider_slug": "osigu-test"},
    )


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


# -- vault ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(bao: Bao) -> Iterator[Any]:
    client = hvac.Client(url=bao.address, token=bao.root_token)
    client.sys.create_or_update_policy(
        READ_ONLY_POLICY, 'path "secret/data/dvs-sink/*" { capabilities = ["read"] }'
    )
    yield client
    client.adapter.close()


def vault_sink(address: str, token: str, path: str, tmp_path: Path, **extra: Any) -> VaultSink:
    token_file = tmp_path / unique("vault-token-")
    token_file.write_text(token + "\n")
    auth = vault_auth(address=address, auth_method="token", token_file=str(token_file), timeout=3)
    connection = VaultConnection(auth, environ={})
    return VaultSink(
        connection, VaultSourceConfig(path=path, **extra), config_key="profiles.dvs.sinks[1]"
    )


def stored_v2(root: Any, path: str) -> tuple[dict[str, Any], int]:
    response = root.secrets.kv.v2.read_secret_version(
        path=path, mount_point="secret", raise_on_deleted_version=True
    )
    return response["data"]["data"], response["data"]["metadata"]["version"]


def test_vault_writes_the_document_and_each_write_is_a_new_version(
    bao: Bao, root: Any, tmp_path: Path
) -> None:
    path = unique("dvs-sink/")
    sink = vault_sink(bao.address, bao.root_token, path, tmp_path)
    assert sink.name == f"vault:secret/{path}"
    sink.check()
    first, second = make_token(600), make_token(1200)
    sink.write(first)
    assert stored_v2(root, path) == (first.document(), 1)
    sink.write(second)
    assert stored_v2(root, path) == (second.document(), 2)
    sink.write(second)  # the same document again: no new version
    assert stored_v2(root, path) == (second.document(), 2)
    sink.close()


def test_vault_newer_stored_document_is_not_overwritten(
    bao: Bao, root: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent")
    path = unique("dvs-sink/")
    sink = vault_sink(bao.address, bao.root_token, path, tmp_path)
    newer, older = make_token(7200), make_token(3600)
    sink.write(newer)
    sink.write(older)
    assert stored_v2(root, path) == (newer.document(), 1)
    assert "newer token already stored" in caplog.text


def test_vault_writes_over_a_deleted_or_destroyed_current_version(
    bao: Bao, root: Any, tmp_path: Path
) -> None:
    path = unique("dvs-sink/")
    sink = vault_sink(bao.address, bao.root_token, path, tmp_path)
    sink.write(make_token(600))
    root.secrets.kv.v2.delete_latest_version_of_secret(path=path, mount_point="secret")
    token = make_token(500)  # older than the deleted one: a deleted document does not count
    sink.write(token)
    assert stored_v2(root, path) == (token.document(), 2)
    root.secrets.kv.v2.destroy_secret_versions(path=path, versions=[2], mount_point="secret")
    token = make_token(400)
    sink.write(token)
    assert stored_v2(root, path) == (token.document(), 3)


class InterleavedSink(VaultSink):
    """A VaultSink after whose first read another writer stores ``interloper``."""

    def __init__(self, other: VaultSink, interloper: Token, *args: Any) -> None:
        super().__init__(*args)
        self.other, self.interloper, self.reads = other, interloper, 0

    def _read_current(self, client: Any) -> tuple[int, dict[str, Any] | None]:
        current = super()._read_current(client)
        self.reads += 1
        if self.reads == 1:
            self.other.write(self.interloper)
        return current


@pytest.mark.parametrize("interloper_is_newer", [True, False])
def test_vault_write_between_our_read_and_our_write_keeps_the_newest(
    bao: Bao, root: Any, tmp_path: Path, interloper_is_newer: bool
) -> None:
    path = unique("dvs-sink/")
    other = vault_sink(bao.address, bao.root_token, path, tmp_path)
    ours, theirs = (make_token(600), make_token(900))
    if not interloper_is_newer:
        ours, theirs = theirs, ours
    base = vault_sink(bao.address, bao.root_token, path, tmp_path)
    sink = InterleavedSink(other, theirs, base._conn, base._settings)
    sink.write(ours)
    assert sink.reads == 2  # our check-and-set failed, we read again and decided again
    newest = theirs if interloper_is_newer else ours
    document, version = stored_v2(root, path)
    assert document == newest.document()
    assert version == (1 if interloper_is_newer else 2)


def test_vault_two_concurrent_writers_never_lose_the_newest_token(
    bao: Bao, root: Any, tmp_path: Path
) -> None:
    path = unique("dvs-sink/")
    sinks = [vault_sink(bao.address, bao.root_token, path, tmp_path) for _ in range(2)]
    # interleaved lifetimes: writer 0 has 100, 300, …; writer 1 has 200, 400, …
    tokens = [[make_token(100 * (2 * i + w + 1)) for i in range(8)] for w in range(2)]
    conflicts: list[str] = []
    start = threading.Barrier(2)

    def run(writer: int) -> None:
        start.wait()
        for token in tokens[writer]:
            for _ in range(5):  # the agent retries a failed write; so does this loop
                try:
                    sinks[writer].write(token)
                    break
                except SinkError as exc:
                    conflicts.append(str(exc))
            else:
                raise AssertionError(f"gave up: {conflicts[-1]}")

    threads = [threading.Thread(target=run, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    newest = max((t for ts in tokens for t in ts), key=lambda t: t.expires_at)
    assert stored_v2(root, path)[0] == newest.document()
    assert all("check-and-set" in message for message in conflicts)


def test_vault_permission_denied_names_the_policy_it_needs(
    bao: Bao, root: Any, tmp_path: Path
) -> None:
    path = unique("dvs-sink/")
    token = root.auth.token.create(policies=[READ_ONLY_POLICY], ttl="60s")["auth"]["client_token"]
    sink = vault_sink(bao.address, token, path, tmp_path)
    with pytest.raises(SinkError) as caught:
        sink.write(make_token())
    message = str(caught.value)
    assert message.startswith("vault sink profiles.dvs.sinks[1]: permission denied by Vault at ")
    assert bao.address in message
    assert f"create and update on secret/data/{path}, and read on it" in message
    assert token not in message


def test_vault_missing_mount_and_check(bao: Bao, tmp_path: Path) -> None:
    sink = vault_sink(bao.address, bao.root_token, "dvs/x", tmp_path, mount="no-such-mount")
    with pytest.raises(SinkError, match=r"is a KV v2 secrets engine mounted at no-such-mount/"):
        sink.write(make_token())
    # check() sends nothing: a Vault that is down at start does not fail it
    down = vault_sink(f"http://127.0.0.1:{free_port()}", "t", "dvs/x", tmp_path)
    down.check()
    with pytest.raises(SinkError, match=r"sinks\[1\]\.path is empty"):
        vault_sink(bao.address, "t", "/", tmp_path).check()


# -- aws ------------------------------------------------------------------------------------------


@pytest.fixture
def sm(moto: Moto) -> Any:
    """The test's own client, to arrange and inspect secrets."""
    return moto.client("secretsmanager")


@pytest.fixture
def aws_sink(moto: Moto, aws_env: None) -> Iterator[Callable[..., AwsSink]]:
    made: list[AwsSink] = []

    def build(secret_id: str, **extra: Any) -> AwsSink:
        extra.setdefault("endpoint_url", moto.endpoint_url)
        sink = AwsSink(
            AwsSinkConfig(secret_id=secret_id, region=moto.region, **extra),
            timeout=3,
            profile="dvs",
            config_key="profiles.dvs.sinks[2]",
        )
        sink.check()
        made.append(sink)
        return sink

    yield build
    for sink in made:
        sink.close()


def stored_sm(sm: Any, secret_id: str) -> tuple[dict[str, Any], str]:
    response = sm.get_secret_value(SecretId=secret_id)
    return json.loads(response["SecretString"]), response["VersionId"]


def test_aws_create_then_put_new_versions(sm: Any, aws_sink: Callable[..., AwsSink]) -> None:
    name = unique("dvs/sink-")
    sink = aws_sink(name, create=True)
    assert sink.name == f"aws:{name}"
    first, second = make_token(600), make_token(1200)
    sink.write(first)
    document, version_1 = stored_sm(sm, name)
    assert document == first.document()
    sink.write(second)
    document, version_2 = stored_sm(sm, name)
    assert document == second.document() and version_2 != version_1
    sink.write(second)  # the same document again: no new version
    assert stored_sm(sm, name)[1] == version_2


def test_aws_missing_secret_without_create_is_an_error(
    sm: Any, aws_sink: Callable[..., AwsSink]
) -> None:
    name = unique("dvs/sink-")
    with pytest.raises(SinkError) as caught:
        aws_sink(name).write(make_token())
    message = str(caught.value)
    assert message.startswith("aws sink profiles.dvs.sinks[2]: secret ")
    assert "does not exist; create it or set create = true" in message
    assert name in message and "us-east-1" in message
    with pytest.raises(ClientError):
        sm.describe_secret(SecretId=name)


def test_aws_existing_secret_without_a_value_is_put(
    sm: Any, aws_sink: Callable[..., AwsSink]
) -> None:
    name = unique("dvs/sink-")
    sm.create_secret(Name=name)
    token = make_token()
    aws_sink(name).write(token)
    assert stored_sm(sm, name)[0] == token.document()


def test_aws_newer_stored_document_is_not_overwritten(
    sm: Any, aws_sink: Callable[..., AwsSink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent")
    name = unique("dvs/sink-")
    newer, older = make_token(7200), make_token(3600)
    sm.create_secret(Name=name, SecretString=json.dumps(newer.document()))
    version = stored_sm(sm, name)[1]
    aws_sink(name).write(older)
    assert stored_sm(sm, name) == (newer.document(), version)
    assert "newer token already stored" in caplog.text
    # a value that is not a token document is replaced
    sm.put_secret_value(SecretId=name, SecretString="not json")
    aws_sink(name).write(older)
    assert stored_sm(sm, name)[0] == older.document()


def test_aws_missing_region_fails_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_aws_env(monkeypatch, tmp_path)
    sink = AwsSink(AwsSinkConfig(secret_id="dvs/x"), config_key="profiles.dvs.sinks[2]")
    with pytest.raises(SinkError, match=r"set profiles\.dvs\.sinks\[2\]\.region"):
        sink.check()
    bad = AwsSink(AwsSinkConfig(secret_id="dvs/x", region="us-east-1", endpoint_url="nope"))
    with pytest.raises(SinkError, match=r"Invalid endpoint: nope: check sinks\[0\]\.endpoint_url"):
        bad.check()


def test_aws_access_denied_gives_the_iam_hint(aws_sink: Callable[..., AwsSink]) -> None:
    # moto_server does not enforce IAM: the denial is built as botocore raises it
    sink = aws_sink(unique("dvs/sink-"), create=True)
    denied = ClientError(
        {"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}},
        "PutSecretValue",
    )
    message = str(sink._error(denied, "PutSecretValue"))
    assert "AWS denied PutSecretValue on secret dvs/sink-" in message
    assert "secretsmanager:GetSecretValue and secretsmanager:PutSecretValue" in message
    assert "secretsmanager:CreateSecret" in message


# -- redis ----------------------------------------------------------------------------------------


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "redis-password"
    path.write_text(REDIS_ACL_PASSWORD + "\n")
    return path


def redis_sink(server: RedisServer, key: str, **extra: Any) -> RedisSink:
    environ = extra.pop("environ", {PASSWORD_VAR: server.password})
    if "password_file" not in extra and "password_env" not in extra:
        extra["password_env"] = PASSWORD_VAR
    extra.setdefault("url", server.url(3))
    return RedisSink(
        RedisSinkConfig(**extra),
        key=key,
        timeout=2,
        config_key="profiles.dvs.sinks[3]",
        environ=environ,
    )


def test_redis_value_and_ttl(redis: RedisServer) -> None:
    key = unique("dvs-agent:test:")
    sink = redis_sink(redis, key)
    assert sink.name == f"redis:127.0.0.1:{redis.port}/3/{key}"
    sink.check()
    token = make_token(600, obtained_ago=100)  # 500 s left
    sink.write(token)
    client = redis.client(3)
    assert json.loads(client.get(key)) == token.document()
    assert 490_000 < client.pttl(key) <= 500_000
    sink.close()


def test_redis_expired_token_is_not_written(redis: RedisServer) -> None:
    key = unique("dvs-agent:test:")
    redis_sink(redis, key).write(make_token(60, obtained_ago=61))
    assert redis.client(3).exists(key) == 0


def test_redis_newer_stored_document_is_not_overwritten(redis: RedisServer) -> None:
    key = unique("dvs-agent:test:")
    sink = redis_sink(redis, key)
    newer, older = make_token(7200), make_token(3600)
    sink.write(newer)
    sink.write(older)
    client = redis.client(3)
    assert json.loads(client.get(key)) == newer.document()
    assert client.pttl(key) > 3_600_000
    # anything that is not a token document is replaced
    client.set(key, "junk")
    sink.write(older)
    assert json.loads(client.get(key)) == older.document()


def test_redis_acl_user_with_password_file(redis: RedisServer, password_file: Path) -> None:
    key = unique("dvs-agent:test:")
    sink = redis_sink(redis, key, username=REDIS_ACL_USER, password_file=str(password_file))
    sink.check()
    token = make_token()
    sink.write(token)
    assert json.loads(redis.client(3).get(key)) == token.document()
    # the ACL user may not write outside dvs-agent:*
    outside = redis_sink(
        redis, unique("other:"), username=REDIS_ACL_USER, password_file=str(password_file)
    )
    with pytest.raises(SinkError, match=r"denied the write .*needs \+eval and \+get \+set"):
        outside.write(token)


def test_redis_wrong_password_and_rotation(redis: RedisServer, tmp_path: Path) -> None:
    key = unique("dvs-agent:test:")
    wrong = "wrong-" + uuid.uuid4().hex
    path = tmp_path / "pw"
    path.write_text(wrong)
    sink = redis_sink(redis, key, username=REDIS_ACL_USER, password_file=str(path))
    with pytest.raises(SinkError) as caught:
        sink.write(make_token())
    message = str(caught.value)
    assert "rejected the credentials of user dvs-writer" in message
    assert "check username/password_file" in message and str(path) in message
    assert wrong not in message
    path.write_text(REDIS_ACL_PASSWORD + "\n")  # fixed: the next attempt reads it again
    token = make_token()
    sink.write(token)
    assert json.loads(redis.client(3).get(key)) == token.document()


def test_redis_no_password_when_one_is_required(redis: RedisServer) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis.url()), key=unique("dvs-agent:test:"))
    with pytest.raises(SinkError, match="rejected the credentials of user default"):
        sink.write(make_token())


def test_redis_server_down_fails_quickly() -> None:
    port = free_port()
    sink = RedisSink(RedisSinkConfig(url=f"redis://127.0.0.1:{port}/0"), key="k", timeout=2)
    started = time.monotonic()
    with pytest.raises(SinkError) as caught:
        sink.write(make_token())
    assert time.monotonic() - started < 1.5  # refused at once, no hidden retries
    message = str(caught.value)
    assert message.startswith(f"cannot reach Redis at 127.0.0.1:{port} (db 0, key k; sinks[0])")
    assert "Connection refused" in message


def test_redis_silent_server_times_out_after_one_attempt() -> None:
    """A server that accepts and never answers: one connection, one timeout, no retries."""
    accepted: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                try:
                    accepted.append(listener.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept)
        thread.start()
        try:
            sink = RedisSink(RedisSinkConfig(url=f"redis://127.0.0.1:{port}"), key="k", timeout=0.5)
            started = time.monotonic()
            with pytest.raises(SinkError, match=r"did not answer within 0\.5s"):
                sink.write(make_token())
            assert time.monotonic() - started < 1.5
            time.sleep(0.3)  # a hidden retry would connect again meanwhile
            assert len(accepted) == 1
            sink.close()
        finally:
            stop.set()
            thread.join()
            for conn in accepted:
                conn.close()


def test_redis_check_settings(redis: RedisServer, tmp_path: Path) -> None:
    def check(**settings: Any) -> str:
        settings.setdefault("url", "redis://127.0.0.1:6379")
        sink = RedisSink(RedisSinkConfig(**settings), key="k", config_key="sinks[3]", environ={})
        with pytest.raises(SinkError) as caught:
            sink.check()
        return str(caught.value)

    assert "PW_VAR (sinks[3].password_env) is not set" in check(password_env="PW_VAR")
    missing = tmp_path / "missing"
    assert f"{missing} (sinks[3].password_file) does not exist" in check(password_file=str(missing))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "is empty" in check(password_file=str(empty))
    assert "not both" in check(password_file=str(empty), password_env="X")
    leaked = check(url="redis://:hunter2@127.0.0.1:6379/0")
    # the one redis URL parser (agent.sinks.redis.parse_url): the config's messages
    assert "sinks[3].url: must not contain user:password@" in leaked and "hunter2" not in leaked
    assert "redis:// or rediss://" in check(url="http://127.0.0.1")
    assert "the path is the database number" in check(url="redis://127.0.0.1/x")
    assert "options after '?' or '#' are not supported" in check(
        url="rediss://h/0?ssl_cert_reqs=none"
    )
    assert "plain redis:// to cache.internal" in check(url="redis://cache.internal/0")
    sink = RedisSink(RedisSinkConfig(url="rediss://cache.internal/2"), key="a:b")
    assert sink.name == "redis:cache.internal:6379/2/a:b"
    sink.check()  # no password, no network


# -- one sink down, the others written ------------------------------------------------------------


def test_one_sink_down_leaves_the_others_written(
    tmp_path: Path,
    redis: RedisServer,
    sm: Any,
    aws_sink: Callable[..., AwsSink],
) -> None:
    with bao_server(tmp_path / "private-bao") as private:
        vault = vault_sink(private.address, private.root_token, "dvs-sink/down", tmp_path)
        vault.write(make_token())  # logged in and written while it was up
        private.stop()
        key, name = unique("dvs-agent:test:"), unique("dvs/sink-")
        sinks: list[Any] = [vault, redis_sink(redis, key), aws_sink(name, create=True)]
        token = make_token(1800)
        errors: dict[str, SinkError] = {}
        for sink in sinks:  # the Profile's loop: try each, collect the failures
            try:
                sink.write(token)
            except SinkError as exc:
                errors[sink.name] = exc
    assert list(errors) == [vault.name]
    assert f"cannot reach Vault at {private.address}" in str(errors[vault.name])
    assert json.loads(redis.client(3).get(key)) == token.document()
    assert stored_sm(sm, name)[0] == token.document()


def test_aws_endpoint_down_is_a_sink_error(aws_sink: Callable[..., AwsSink]) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    sink = aws_sink("dvs/x", endpoint_url=endpoint)
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"cannot reach Secrets Manager for secret dvs/x"):
        sink.write(make_token())
    assert time.monotonic() - started < 10


# -- no secret anywhere ---------------------------------------------------------------------------


def test_no_secret_in_messages_or_debug_logs(
    bao: Bao,
    root: Any,
    redis: RedisServer,
    sm: Any,
    aws_sink: Callable[..., AwsSink],
    tmp_path: Path,
    password_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("agent", "hvac", "urllib3", "botocore", "boto3", "redis"):
        caplog.set_level(logging.DEBUG, logger=name)
    token = make_token()
    messages: list[str] = []

    def attempt(write: Callable[[Token], None]) -> None:
        try:
            write(token)
        except SinkError as exc:
            messages.append(str(exc))

    path = unique("dvs-sink/")
    denied_token = root.auth.token.create(policies=[READ_ONLY_POLICY], ttl="60s")["auth"][
        "client_token"
    ]
    attempt(vault_sink(bao.address, bao.root_token, path, tmp_path).write)
    attempt(vault_sink(bao.address, denied_token, unique("dvs-sink/"), tmp_path).write)
    name = unique("dvs/sink-")
    attempt(aws_sink(name, create=True).write)
    attempt(aws_sink(name).write)
    attempt(aws_sink(unique("dvs/sink-")).write)
    key = unique("dvs-agent:test:")
    attempt(redis_sink(redis, key).write)
    attempt(redis_sink(redis, key, username=REDIS_ACL_USER, password_file=str(password_file)).write)
    attempt(redis_sink(redis, key, environ={PASSWORD_VAR: "wrong-pw-value"}).write)

    assert len(messages) == 3  # vault denied, aws missing, redis wrong password
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records) + "\n".join(messages)
    assert "withheld by dvs-agent" in text  # botocore did log its bodies, withheld
    assert "PutSecretValue" in text or "CreateSecret" in text
    for secret in (
        token.access_token.reveal(),
        bao.root_token,
        denied_token,
        REDIS_PASSWORD,
        REDIS_ACL_PASSWORD,
        "wrong-pw-value",
    ):
        assert secret not in text
    # every write really happened
    assert stored_v2(root, path)[0] == token.document()
    assert stored_sm(sm, name)[0] == token.document()
    assert json.loads(redis.client(3).get(key)) == token.document()
