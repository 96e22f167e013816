"""Store texts are never shown verbatim; store answers the agent parses are bounded (DESIGN §10).

In-process unit tests. A hostile Vault (a small ``http.server`` of this file's own) answers
errors whose bodies echo the Vault token it was sent in ``X-Vault-Token`` (or the AppRole
secret_id, or the token a sink writes), carry ESC/CR/LF/BEL control characters and 10 KB of
text, and sends a 5 MB JSON body to the poll's GET. AWS texts are built as botocore raises them
(``botocore.stub.Stubber`` on a real client, or a ``ClientError`` given to the mapping function),
and Redis texts come from a tiny fake RESP server or a redis-py exception given to the sink's
mapping.

Every message and log line must hold no secret value (nor 8 characters of one), no raw control
character, "[REDACTED]" where the secret was, each outside text cut to 200 characters, and the
agent's own hint text (address, path, key, what to check) intact.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from agent.errors import SinkError, SourceEmpty, SourceUnavailable
from agent.masking import MASK, MAX_SHOWN
from agent.models import MAX_ANSWER_BYTES, Secret, Token
from agent.sinks.aws import AwsSinkConfig
from agent.sinks.redis import RedisSinkConfig
from agent.sources.aws import AwsSourceConfig
from agent.sources.vault import VaultSourceConfig
from agent.stores.aws.credentials import held_credentials
from agent.stores.aws.errors import map_error
from agent.stores.aws.events import SqsRotationListener
from agent.stores.aws.sink import AwsSink
from agent.stores.aws.source import AwsSource
from agent.stores.redis import RedisSink
from agent.stores.vault.connection import ERROR_BODY_BYTES, VaultConnection
from agent.stores.vault.sink import VaultSink
from agent.stores.vault.source import VaultSource
from tests.conftest import vault_auth

#: any raw C0 control, DEL or C1 control
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
FILLER = 10_000
METADATA = "/v1/secret/metadata/dvs/x"
DATA = "/v1/secret/data/dvs/x"
LOOKUP = "/v1/auth/token/lookup-self"


def hostile(*secrets: str) -> str:
    """An error text that echoes ``secrets``, moves a terminal's cursor, forges a log line and
    runs 10 KB long (with the secrets once more at its end)."""
    echoed = " ".join(secrets)
    return (
        f"denied: X-Vault-Token: {echoed} is bad \x1b[2J\x1b[31m\x1b]0;owned\x07\r\n"
        f'{{"level":"error","msg":"forged {echoed}"}}\n' + "A" * FILLER + f" {echoed}"
    )


def straddling(secret: str) -> str:
    """A text with ``secret`` across the 200-character cut: masking must come first."""
    return "B" * (MAX_SHOWN - 5) + secret + "\x1b[0m" + "B" * FILLER


def assert_safe(text: str, secrets: Iterable[str], *, masked: bool = True) -> None:
    """No secret (nor any 8 characters of one), no raw control character, the mask shown."""
    for secret in secrets:
        assert secret not in text
        windows = {secret[i : i + 8] for i in range(len(secret) - 7)}
        leaked = [window for window in windows if window in text]
        assert not leaked, (leaked, text)
    assert not CONTROL.search(text), text
    if masked:
        assert MASK in text, text


def outside_part(message: str, prefix: str, suffix: str) -> str:
    """The outside text between the agent's own ``prefix`` and ``suffix``, checked to be cut to
    200 characters (escapes count as the one character they stand for; "…" marks the cut)."""
    assert message.startswith(prefix), (prefix, message)
    assert message.endswith(suffix), (suffix, message)
    middle = message[len(prefix) : len(message) - len(suffix)]
    escapes = len(re.findall(r"\\x[0-9a-f]{2}", middle))
    named = len(re.findall(r"\\[nrt]", middle))
    assert len(middle) - 3 * escapes - named <= MAX_SHOWN + 1, middle
    assert "A" * MAX_SHOWN not in middle and "B" * MAX_SHOWN not in middle
    return middle


def agent_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "agent" or r.name.startswith("agent.")]


def make_token(prefix: str = "tok-") -> Token:
    obtained = datetime.now(UTC).replace(microsecond=0)
    return Token(
        access_token=Secret(f"{prefix}{uuid.uuid4().hex}{uuid.uuid4().hex}"),
        token_type="bearer",
        expires_in=3600,
        obtained_at=obtained,
        expires_at=obtained + timedelta(seconds=3600),
        scope="read",
    )


# -- a hostile Vault ------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    token: str
    body: bytes


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    #: instead of ``body``: chunks sent one by one, under a Content-Length of ``length``
    chunks: Iterable[bytes] | None = None
    length: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


def as_json(status: int, doc: Any) -> Answer:
    return Answer(status=status, body=json.dumps(doc).encode())


def errors(status: int, *texts: str) -> Answer:
    return as_json(status, {"errors": list(texts)})


Route = Callable[[Request], Answer]


class HostileVault:
    """Answers each (method, path) from ``routes``; an unknown one gets a 404 like Vault's."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", LOOKUP): lambda r: as_json(200, {"data": {"ttl": 0, "renewable": False}}),
        }
        self.requests: list[Request] = []
        #: set by the test to let a stalled answer go on
        self.release = threading.Event()
        #: set once a streamed answer has been sent whole
        self.sent_all = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hostile = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, request: Request) -> Answer:
        self.requests.append(request)
        route = self.routes.get((request.method, request.path))
        return route(request) if route is not None else errors(404)

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Request(
            self.command, self.path.split("?")[0], self.headers.get("X-Vault-Token", ""), body
        )
        hostile: HostileVault = self.server.hostile  # type: ignore[attr-defined]
        answer = hostile.answer(request)
        chunks = [answer.body] if answer.chunks is None else answer.chunks
        size = len(answer.body) if answer.length is None else answer.length
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(size))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            for chunk in chunks:
                self.wfile.write(chunk)
            self.wfile.flush()
            if answer.chunks is not None:
                hostile.sent_all.set()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = _serve


@pytest.fixture
def vault() -> Iterator[HostileVault]:
    server = HostileVault()
    yield server
    server.close()


@pytest.fixture
def caplog_agent(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="agent")
    return caplog


def vault_token() -> str:
    return f"hvs.{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"


def token_connection(
    vault: HostileVault, token: str, *, clock: Callable[[], float] = time.monotonic
) -> VaultConnection:
    auth = vault_auth(address=vault.address, auth_method="token", timeout=5)
    return VaultConnection(auth, environ={"VAULT_TOKEN": token}, clock=clock)


def vault_source(connection: VaultConnection, **settings: Any) -> VaultSource:
    return VaultSource(connection, VaultSourceConfig(path="dvs/x", **settings))


def echo_token(status: int) -> Route:
    """An error answer echoing the token that the request carried."""
    return lambda request: errors(status, hostile(request.token))


# -- Vault: error texts ---------------------------------------------------------------------------


def test_vault_poll_error_echoing_the_token_is_masked_cut_and_escaped(
    vault: HostileVault, caplog_agent: pytest.LogCaptureFixture
) -> None:
    token = vault_token()
    vault.routes["GET", METADATA] = echo_token(500)
    source = vault_source(token_connection(vault, token))
    with pytest.raises(SourceUnavailable) as caught:
        source.version()
    message = str(caught.value)
    assert vault.requests[-1].token == token  # it was sent, and echoed back
    assert_safe(message, [token])
    middle = outside_part(
        message,
        f"Vault at {vault.address} failed to read the metadata of secret/dvs/x "
        "(InternalServerError: ",
        ")",
    )
    assert middle.startswith(f"denied: X-Vault-Token: {MASK} is bad \\x1b[2J")
    assert "\\x07" in middle and "…" in middle
    for record in agent_records(caplog_agent):
        assert_safe(record.getMessage(), [token], masked=False)


def test_vault_read_error_html_page_is_shown_cut(vault: HostileVault) -> None:
    """No JSON ``errors``: the page itself is Vault's text (once "no detail"), shown safely."""
    token = vault_token()
    page = f"<html><body><h1>Bad gateway</h1><pre>{hostile(token)}</pre></body></html>"
    vault.routes["GET", DATA] = lambda r: Answer(502, page.encode(), "text/html")
    with pytest.raises(SourceUnavailable) as caught:
        vault_source(token_connection(vault, token)).read()
    message = str(caught.value)
    assert_safe(message, [token])
    middle = outside_part(
        message,
        f"Vault at {vault.address} failed to read secret/dvs/x (KV v2) (BadGateway: ",
        ")",
    )
    assert middle.startswith("<html><body><h1>Bad gateway</h1>")


def test_vault_unavailable_503_keeps_its_hint(vault: HostileVault) -> None:
    token = vault_token()
    vault.routes["GET", DATA] = echo_token(503)
    with pytest.raises(SourceUnavailable) as caught:
        vault_source(token_connection(vault, token)).read()
    message = str(caught.value)
    assert_safe(message, [token])
    outside_part(
        message,
        f"Vault at {vault.address} is unavailable (503: ",
        ") to read secret/dvs/x (KV v2): is this node a standby, or is Vault starting?",
    )


def test_vault_secret_cut_across_the_limit_is_masked_before_the_cut(vault: HostileVault) -> None:
    token = vault_token()
    vault.routes["GET", METADATA] = lambda r: errors(400, straddling(r.token))
    with pytest.raises(SourceUnavailable) as caught:
        vault_source(token_connection(vault, token)).version()
    message = str(caught.value)
    assert_safe(message, [token], masked=False)  # the mask itself is partly cut off
    assert "[REDA" in message
    outside_part(
        message,
        f"Vault at {vault.address} failed to read the metadata of secret/dvs/x (InvalidRequest: ",
        ")",
    )


def test_vault_approle_login_rejection_masks_the_secret_id(
    vault: HostileVault, tmp_path: Path
) -> None:
    role_id, secret_id = str(uuid.uuid4()), str(uuid.uuid4())
    (tmp_path / "role_id").write_text(role_id + "\n")
    (tmp_path / "secret_id").write_text(secret_id + "\n")

    def login(request: Request) -> Answer:
        sent = json.loads(request.body)
        return errors(400, hostile(sent["secret_id"], sent["role_id"]))

    vault.routes["POST", "/v1/auth/approle/login"] = login
    auth = vault_auth(
        address=vault.address,
        role_id_file=str(tmp_path / "role_id"),
        secret_id_file=str(tmp_path / "secret_id"),
        timeout=5,
        config_key="profiles.dvs.vault",
    )
    with pytest.raises(SourceUnavailable) as caught:
        vault_source(VaultConnection(auth, environ={})).read()
    message = str(caught.value)
    assert_safe(message, [secret_id, role_id])
    outside_part(
        message,
        f"AppRole login at auth/approle on Vault at {vault.address} rejected (",
        f"): check role_id/secret_id (profiles.dvs.vault.role_id_file = {tmp_path}/role_id, "
        f"profiles.dvs.vault.secret_id_file = {tmp_path}/secret_id; the secret_id may have "
        "expired or reached its use limit) and that AppRole is mounted at auth/approle "
        "(profiles.dvs.vault.auth_mount)",
    )


def test_vault_failed_login_again_is_logged_masked(
    vault: HostileVault, tmp_path: Path, caplog_agent: pytest.LogCaptureFixture
) -> None:
    """The second AppRole login fails while the first token is valid: a warning, masked."""
    role_id, secret_id = str(uuid.uuid4()), str(uuid.uuid4())
    (tmp_path / "role_id").write_text(role_id)
    (tmp_path / "secret_id").write_text(secret_id)
    first = vault_token()
    logins: list[int] = []

    def login(request: Request) -> Answer:
        logins.append(1)
        if len(logins) == 1:
            return as_json(200, {"auth": {"client_token": first, "lease_duration": 30}})
        return errors(500, hostile(json.loads(request.body)["secret_id"], first))

    vault.routes["POST", "/v1/auth/approle/login"] = login
    vault.routes["GET", METADATA] = lambda r: as_json(
        200, {"data": {"current_version": 1, "versions": {"1": {"created_time": "t"}}}}
    )
    now = [0.0]
    auth = vault_auth(
        address=vault.address,
        role_id_file=str(tmp_path / "role_id"),
        secret_id_file=str(tmp_path / "secret_id"),
        timeout=5,
    )
    source = vault_source(VaultConnection(auth, environ={}, clock=lambda: now[0]))
    assert source.version() == "kv2:1@t"
    now[0] = 25.0  # past two thirds of the TTL: log in again, which fails
    assert source.version() == "kv2:1@t"  # the current token still serves
    assert len(logins) == 2
    warnings = [r for r in agent_records(caplog_agent) if "again failed" in r.getMessage()]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert_safe(line, [secret_id, first])
    assert f"logging in to Vault at {vault.address} again failed" in line
    for record in agent_records(caplog_agent):
        assert_safe(record.getMessage(), [secret_id, role_id, first], masked=False)


def test_vault_failed_renewal_is_logged_masked(
    vault: HostileVault, caplog_agent: pytest.LogCaptureFixture
) -> None:
    token = vault_token()
    vault.routes["GET", LOOKUP] = lambda r: as_json(200, {"data": {"ttl": 30, "renewable": True}})
    vault.routes["POST", "/v1/auth/token/renew-self"] = echo_token(500)
    vault.routes["GET", METADATA] = lambda r: as_json(
        200, {"data": {"current_version": 2, "versions": {"2": {}}}}
    )
    now = [0.0]
    source = vault_source(token_connection(vault, token, clock=lambda: now[0]))
    assert source.version() == "kv2:2"
    now[0] = 25.0
    assert source.version() == "kv2:2"
    warnings = [
        r for r in agent_records(caplog_agent) if "renewing the Vault token" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert_safe(warnings[0].getMessage(), [token])
    for record in agent_records(caplog_agent):
        assert_safe(record.getMessage(), [token], masked=False)


def test_vault_key_names_and_version_time_from_the_secret_are_shown_safely(
    vault: HostileVault, caplog_agent: pytest.LogCaptureFixture
) -> None:
    token, client_secret = vault_token(), f"cs-{uuid.uuid4().hex}"
    created = f"2026-01-01T00:00:00Z\x1b[2J{token}\r\n{client_secret}"
    secret = {"client_id": "dvs-client", "client_secret": client_secret}
    metadata = {"version": 3, "created_time": created}
    vault.routes["GET", DATA] = lambda r: as_json(
        200, {"data": {"data": secret, "metadata": metadata}}
    )
    credentials = vault_source(token_connection(vault, token)).read()
    assert credentials.client_secret.reveal() == client_secret
    lines = [
        r.getMessage() for r in agent_records(caplog_agent) if "read credentials" in r.getMessage()
    ]
    assert len(lines) == 1
    assert_safe(lines[0], [token, client_secret])

    # a key named after a value, with a terminal control: listed masked and escaped
    secret = {"id": "dvs-client", f"\x1b[2J{client_secret}{token}": client_secret}
    with pytest.raises(SourceEmpty) as caught:
        vault_source(token_connection(vault, token)).read()
    message = str(caught.value)
    assert_safe(message, [token, client_secret])
    assert "has no key 'client_id' (keys present: '" in message
    assert "vault.client_id_key" in message


def test_vault_sink_error_echoing_the_written_and_the_stored_token_is_masked(
    vault: HostileVault, caplog_agent: pytest.LogCaptureFixture
) -> None:
    token, ours, theirs = vault_token(), make_token(), make_token("old-")
    stored = theirs.document() | {"expires_at": "2000-01-01T00:00:00Z"}  # older: replaced
    sink_data = "/v1/secret/data/dvs/t"
    vault.routes["GET", sink_data] = lambda r: as_json(
        200, {"data": {"data": stored, "metadata": {"version": 4}}}
    )

    def write(request: Request) -> Answer:
        sent = json.loads(request.body)["data"]["access_token"]
        echoed = hostile(sent, theirs.access_token.reveal(), request.token)
        return errors(400, f"cannot store {request.body.decode()}", echoed)

    vault.routes["POST", sink_data] = write
    sink = VaultSink(
        token_connection(vault, token), VaultSourceConfig(path="dvs/t"), config_key="sinks[1]"
    )
    with pytest.raises(SinkError) as caught:
        sink.write(ours)
    message = str(caught.value)
    secrets = [ours.access_token.reveal(), theirs.access_token.reveal(), token]
    assert_safe(message, secrets)
    outside_part(
        message,
        f"vault sink sinks[1]: Vault at {vault.address} failed to write secret/dvs/t (KV v2) "
        "(InvalidRequest: ",
        ")",
    )
    for record in agent_records(caplog_agent):
        assert_safe(record.getMessage(), secrets, masked=False)


# -- Vault: bounded answers -----------------------------------------------------------------------


def big_metadata(size: int = 5_000_000) -> bytes:
    head, tail = b'{"data": {"current_version": 1, "pad": "', b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def stalled(body: bytes, vault: HostileVault, *, status: int = 200) -> Answer:
    """``body`` announced whole, but only its first 2 MiB sent before the test releases it."""

    def chunks() -> Iterator[bytes]:
        view = memoryview(body)
        for start in range(0, len(body), 64 * 1024):
            if start == 2 * 1024 * 1024 and not vault.release.wait(20):
                return
            yield bytes(view[start : start + 64 * 1024])

    return Answer(status=status, chunks=chunks(), length=len(body))


def test_vault_poll_answer_over_1_mib_is_refused_without_reading_it_whole(
    vault: HostileVault,
) -> None:
    token, body = vault_token(), big_metadata()
    vault.routes["GET", METADATA] = lambda r: stalled(body, vault)
    source = vault_source(token_connection(vault, token))
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as caught:
        source.version()
    # refused at once: reading it whole would have waited for the stalled rest (and timed out)
    assert time.monotonic() - started < 4
    assert not vault.sent_all.is_set()
    assert str(caught.value) == (
        f"Vault at {vault.address} answered GET /v1/secret/metadata/dvs/x with more than "
        f"{MAX_ANSWER_BYTES // 1024} KiB (after decoding): refused, connection dropped; is "
        "vault.address a Vault server (not a proxy or another service)?"
    )
    vault.release.set()
    # the connection was dropped, not returned to the pool half read: the next poll works
    vault.routes["GET", METADATA] = lambda r: as_json(
        200, {"data": {"current_version": 7, "versions": {"7": {}}}}
    )
    assert source.version() == "kv2:7"


def test_vault_poll_answer_is_bounded_after_decoding(vault: HostileVault) -> None:
    """5 MB that gzip to a few KB: the bound is on what the decoding yields."""
    token = vault_token()
    packed = gzip.compress(big_metadata())
    assert len(packed) < MAX_ANSWER_BYTES // 10
    vault.routes["GET", METADATA] = lambda r: Answer(
        200, packed, headers={"Content-Encoding": "gzip"}
    )
    with pytest.raises(SourceUnavailable, match=r"more than 1024 KiB \(after decoding\)"):
        vault_source(token_connection(vault, token)).version()


def test_vault_poll_answer_just_under_the_bound_is_read(vault: HostileVault) -> None:
    token = vault_token()
    body = big_metadata(MAX_ANSWER_BYTES)
    vault.routes["GET", METADATA] = lambda r: Answer(200, body)
    assert vault_source(token_connection(vault, token)).version() == "kv2:1"


def test_vault_poll_error_body_is_read_only_in_part(vault: HostileVault) -> None:
    token = vault_token()
    body = (f"<html>{hostile(token)}" + "C" * 5_000_000).encode()
    assert len(body) > 70 * ERROR_BODY_BYTES
    vault.routes["GET", METADATA] = lambda r: stalled(body, vault, status=500)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as caught:
        vault_source(token_connection(vault, token)).version()
    assert time.monotonic() - started < 4
    assert not vault.sent_all.is_set()
    message = str(caught.value)
    assert_safe(message, [token])
    outside_part(
        message,
        f"Vault at {vault.address} failed to read the metadata of secret/dvs/x "
        "(InternalServerError: ",
        ")",
    )


def test_vault_poll_answer_that_is_not_json(vault: HostileVault) -> None:
    token = vault_token()
    vault.routes["GET", METADATA] = lambda r: Answer(
        200, f"<html>{hostile(token)}</html>".encode(), f"text/html\x1b[2J{token}"
    )
    with pytest.raises(SourceUnavailable) as caught:
        vault_source(token_connection(vault, token)).version()
    message = str(caught.value)
    assert_safe(message, [token])  # the page is not shown; its type is, masked and cut
    assert message.startswith(
        f"Vault at {vault.address} answered GET /v1/secret/metadata/dvs/x with a body that is "
        "not JSON (text/html\\x1b[2J"
    )


# -- AWS ------------------------------------------------------------------------------------------

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + uuid.uuid4().hex[:10]
SESSION_TOKEN = "IQoJb3JpZ2luX2VjE" + uuid.uuid4().hex + uuid.uuid4().hex
AWS_SECRETS = (SECRET_KEY, SESSION_TOKEN)
ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:dvs/x-AbCdEf"


def aws_hostile(*extra: str) -> str:
    return f"aws_secret_access_key={SECRET_KEY} X-Amz-Security-Token: {SESSION_TOKEN} " + hostile(
        *extra, SESSION_TOKEN
    )


@pytest.fixture
def aws_client() -> Iterator[Any]:
    """A real Secrets Manager client with session credentials; no request leaves it (stubbed)."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key=SECRET_KEY,
        aws_session_token=SESSION_TOKEN,
        region_name="eu-west-1",
    )
    client = session.client("secretsmanager")
    yield client
    client.close()


def test_aws_held_credentials_are_the_clients_secret_parts(aws_client: Any) -> None:
    assert set(held_credentials(aws_client)) == {SECRET_KEY, SESSION_TOKEN}
    assert held_credentials(object()) == ()


def test_aws_map_error_masks_cuts_and_escapes_the_message() -> None:
    arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:dvs/osigu-AbCdEf"
    exc = ClientError(
        {"Error": {"Code": "AccessDeniedException", "Message": aws_hostile()}}, "GetSecretValue"
    )
    error = map_error(exc, secret_id=arn, where="eu-west-1", profile="dvs", secrets=AWS_SECRETS)
    message = str(error)
    assert isinstance(error, SourceUnavailable)
    assert_safe(message, AWS_SECRETS)
    middle = outside_part(
        message,
        f"AWS denied GetSecretValue on secret {arn} in eu-west-1 (",
        "): the agent's IAM identity needs secretsmanager:GetSecretValue and "
        "secretsmanager:DescribeSecret on the secret's ARN, and kms:Decrypt on its KMS key if "
        "it is a customer managed key",
    )
    assert middle.startswith(f"AccessDeniedException: aws_secret_access_key={MASK}")
    # without the values: the credential patterns still mask the labelled ones
    bare = str(map_error(exc, secret_id=arn, where="eu-west-1", profile="dvs"))
    assert SECRET_KEY not in bare and f"aws_secret_access_key={MASK}" in bare
    assert not CONTROL.search(bare)


def test_aws_map_error_botocore_exception_strings() -> None:
    from botocore.exceptions import CredentialRetrievalError, EndpointConnectionError

    url = f"http://127.0.0.1:1/{aws_hostile()}"
    unreachable = str(
        map_error(
            EndpointConnectionError(endpoint_url=url),
            secret_id="dvs/x",
            where="eu-west-1",
            secrets=AWS_SECRETS,
        )
    )
    assert_safe(unreachable, AWS_SECRETS)
    assert unreachable.startswith("cannot reach Secrets Manager for secret dvs/x in eu-west-1 (")
    assert unreachable.endswith(
        "): check the network, the region and profiles.NAME.aws.endpoint_url"
    )
    retrieval = map_error(
        CredentialRetrievalError(provider="container-role", error_msg=aws_hostile()),
        secret_id="dvs/x",
        where="eu-west-1",
        secrets=AWS_SECRETS,
    )
    assert_safe(str(retrieval), AWS_SECRETS)
    outside_part(str(retrieval), "cannot get AWS credentials for secret dvs/x in eu-west-1: ", "")


def test_aws_source_errors_mask_the_clients_credentials(aws_client: Any) -> None:
    source = AwsSource(AwsSourceConfig(secret_id="dvs/x"), profile="dvs", client=aws_client)
    with Stubber(aws_client) as stub:
        stub.add_client_error(
            "describe_secret",
            service_error_code="ThrottlingException",
            service_message=aws_hostile(),
        )
        stub.add_client_error(
            "get_secret_value",
            service_error_code="DecryptionFailure",
            service_message=straddling(SESSION_TOKEN),
        )
        with pytest.raises(SourceUnavailable) as polled:
            source.version()
        with pytest.raises(SourceUnavailable) as read:
            source.read()
    assert_safe(str(polled.value), AWS_SECRETS)
    outside_part(str(polled.value), "DescribeSecret on secret dvs/x in eu-west-1 failed (", ")")
    assert_safe(str(read.value), AWS_SECRETS, masked=False)
    outside_part(
        str(read.value),
        "AWS could not decrypt secret dvs/x in eu-west-1 (",
        "): the agent's IAM identity needs kms:Decrypt on the secret's KMS key (key policy and "
        "IAM policy)",
    )


def test_aws_source_stage_labels_and_key_names_are_shown_safely(aws_client: Any) -> None:
    client_secret = f"cs-{uuid.uuid4().hex}"
    source = AwsSource(AwsSourceConfig(secret_id="dvs/x"), profile="dvs", client=aws_client)
    arn = ARN
    with Stubber(aws_client) as stub:
        stub.add_response(
            "describe_secret",
            {"ARN": arn, "VersionIdsToStages": {"v" * 32: [f"\x1b[2J{SESSION_TOKEN}"]}},
        )
        stub.add_response(
            "get_secret_value",
            {
                "ARN": arn,
                "VersionId": "v" * 32,
                "SecretString": json.dumps(
                    {"client_id": "dvs", f"\x1b]0;{client_secret}\r\n": client_secret}
                ),
            },
        )
        with pytest.raises(SourceEmpty) as staged:
            source.version()
        with pytest.raises(SourceEmpty) as keyed:
            source.read()
    assert_safe(str(staged.value), AWS_SECRETS)
    assert "(stages present: \\x1b[2J" in str(staged.value)
    assert_safe(str(keyed.value), [client_secret])
    assert str(keyed.value).startswith(
        'the SecretString of secret dvs/x in eu-west-1 has no key "client_secret" (keys present: '
    )


def test_aws_source_secret_string_over_1_mib_is_refused(aws_client: Any) -> None:
    source = AwsSource(AwsSourceConfig(secret_id="dvs/x"), profile="dvs", client=aws_client)
    big = json.dumps({"client_id": "dvs", "client_secret": "x" * MAX_ANSWER_BYTES})
    with Stubber(aws_client) as stub:
        stub.add_response(
            "get_secret_value", {"ARN": ARN, "VersionId": "v" * 32, "SecretString": big}
        )
        with pytest.raises(SourceUnavailable) as caught:
            source.read()
    assert str(caught.value) == (
        "the SecretString of secret dvs/x in eu-west-1 is larger than 1024 KiB: refused unread "
        "(Secrets Manager holds at most 64 KiB; is profiles.dvs.aws.endpoint_url a Secrets "
        "Manager endpoint?)"
    )


def test_aws_sink_errors_mask_the_written_token(aws_client: Any) -> None:
    token = make_token()
    written = token.access_token.reveal()
    sink = AwsSink(AwsSinkConfig(secret_id="dvs/t"), config_key="sinks[2]", client=aws_client)
    with Stubber(aws_client) as stub:
        stub.add_client_error("get_secret_value", service_error_code="ResourceNotFoundException")
        stub.add_client_error(
            "put_secret_value",
            service_error_code="AccessDeniedException",
            service_message=aws_hostile(written),
        )
        with pytest.raises(SinkError) as caught:
            sink.write(token)
    message = str(caught.value)
    assert_safe(message, [written, *AWS_SECRETS])
    outside_part(
        message,
        "aws sink sinks[2]: AWS denied PutSecretValue on secret dvs/t in eu-west-1 (",
        "): the agent's IAM identity needs secretsmanager:GetSecretValue and "
        "secretsmanager:PutSecretValue on the secret's ARN, and kms:GenerateDataKey and "
        "kms:Decrypt on its KMS key if it is a customer managed key",
    )


def test_aws_sink_stored_value_over_1_mib_is_not_parsed(
    aws_client: Any, caplog_agent: pytest.LogCaptureFixture
) -> None:
    token = make_token()
    sink = AwsSink(AwsSinkConfig(secret_id="dvs/t"), client=aws_client)
    big = json.dumps({"expires_at": "2999-01-01T00:00:00Z", "pad": "x" * MAX_ANSWER_BYTES})
    with Stubber(aws_client) as stub:
        stub.add_response("get_secret_value", {"SecretString": big})
        stub.add_response("put_secret_value", {})
        sink.write(token)  # a stored value too large to be ours is replaced, never parsed
        stub.assert_no_pending_responses()
    assert any("more than 1024 KiB" in r.getMessage() for r in agent_records(caplog_agent))


# -- SQS ------------------------------------------------------------------------------------------


@pytest.fixture
def sqs_client() -> Iterator[Any]:
    import boto3

    session = boto3.session.Session(
        aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
        aws_secret_access_key=SECRET_KEY,
        aws_session_token=SESSION_TOKEN,
        region_name="eu-west-1",
    )
    client = session.client("sqs")
    yield client
    client.close()


QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/dvs-rotation"


def listener(client: Any, rotations: list[tuple[str, str]]) -> SqsRotationListener:
    return SqsRotationListener(
        queue_url=QUEUE,
        region=None,
        endpoint_url=None,
        watch={"dvs": ["dvs/x"]},
        on_rotation=lambda profile, detail: rotations.append((profile, detail)),
        wait_seconds=0,
        client=client,
    )


def event(secret: str) -> str:
    return json.dumps(
        {
            "source": "aws.secretsmanager",
            "detail-type": "AWS API Call via CloudTrail",
            "detail": {"eventName": "PutSecretValue", "requestParameters": {"secretId": secret}},
        }
    )


def test_sqs_describe_masks_cuts_and_escapes(sqs_client: Any) -> None:
    events = listener(sqs_client, [])
    exc = ClientError(
        {"Error": {"Code": "AccessDenied", "Message": aws_hostile()}}, "ReceiveMessage"
    )
    described = events._describe(exc)
    assert_safe(described, AWS_SECRETS)
    outside_part(
        described,
        "",
        ": the agent's IAM identity needs sqs:ReceiveMessage and sqs:DeleteMessage on the "
        "queue (and kms:Decrypt for an SSE-KMS queue)",
    )
    other = events._describe(ClientError({"Error": {"Code": "X", "Message": aws_hostile()}}, "op"))
    assert_safe(other, AWS_SECRETS)
    outside_part(other, "", " (in eu-west-1)")


def test_sqs_hostile_messages_and_delete_failures_are_shown_safely(
    sqs_client: Any, caplog_agent: pytest.LogCaptureFixture
) -> None:
    rotations: list[tuple[str, str]] = []
    events = listener(sqs_client, rotations)
    scope = f"arn:aws:secretsmanager:\x1b[2J{SESSION_TOKEN}\r\n" + "D" * FILLER
    messages = [
        {"MessageId": "m1", "ReceiptHandle": "r1", "Body": event(f"{scope}:secret:dvs/x")},
        {"MessageId": f"m2\x1b[2J{SESSION_TOKEN}", "ReceiptHandle": "r2", "Body": "{" * 50},
        {"MessageId": "m3", "ReceiptHandle": "r3", "Body": "x" * (MAX_ANSWER_BYTES + 1)},
    ]
    with Stubber(sqs_client) as stub:
        stub.add_response("receive_message", {"Messages": messages})
        stub.add_response(
            "delete_message_batch",
            {
                "Successful": [{"Id": "0"}, {"Id": "1"}],
                "Failed": [
                    {"Id": "2", "SenderFault": False, "Code": "X\x1b[2J", "Message": aws_hostile()}
                ],
            },
        )
        assert events.poll_once() == 1
    assert len(rotations) == 1
    profile, detail = rotations[0]
    assert profile == "dvs"
    assert_safe(detail, AWS_SECRETS)
    assert detail.startswith("PutSecretValue of arn:aws:secretsmanager:\\x1b[2J")
    assert len(detail) < 300
    lines = [r.getMessage() for r in agent_records(caplog_agent)]
    assert any("larger than 1024 KiB" in line for line in lines)
    assert any("could not delete a message" in line for line in lines)
    for line in lines:
        assert_safe(line, AWS_SECRETS, masked=False)


# -- Redis ----------------------------------------------------------------------------------------

REDIS_PASSWORD = f"pw-{uuid.uuid4().hex}"


def redis_sink(port: int, **settings: Any) -> RedisSink:
    return RedisSink(
        RedisSinkConfig(url=f"redis://127.0.0.1:{port}/0", password_env="PW", **settings),
        key="dvs:token",
        timeout=3,
        config_key="sinks[3]",
        environ={"PW": REDIS_PASSWORD},
    )


def test_redis_error_mapping_masks_the_password_and_the_token() -> None:
    token = make_token().access_token.reveal()
    sink = redis_sink(6379)
    target = sink._require_target()
    sink._ensure_client(target)  # reads the password; no connection yet
    try:
        for exc, prefix, suffix in [
            (
                redis.exceptions.AuthenticationError(hostile(REDIS_PASSWORD)),
                "Redis at 127.0.0.1:6379 (db 0, key dvs:token; sinks[3]) rejected the credentials "
                "of user default (",
                "): check username/password_file (sinks[3].username; sinks[3].password_env = PW)",
            ),
            (
                redis.exceptions.ResponseError(hostile(token, REDIS_PASSWORD)),
                "Redis at 127.0.0.1:6379 (db 0, key dvs:token; sinks[3]) refused the write "
                "(ResponseError: ",
                ")",
            ),
            (
                redis.exceptions.ConnectionError(straddling(REDIS_PASSWORD)),
                "cannot reach Redis at 127.0.0.1:6379 (db 0, key dvs:token; sinks[3]) (",
                "): check sinks[3].url and that Redis runs",
            ),
        ]:
            message = str(sink._error(exc, target, (token,)))
            assert_safe(message, [REDIS_PASSWORD, token], masked=prefix.startswith("Redis"))
            outside_part(message, prefix, suffix)
    finally:
        sink.close()


class _FakeRedis(socketserver.StreamRequestHandler):
    """Accepts AUTH/HELLO (and anything else), and answers EVAL with an error that echoes its
    arguments (the document holding the token) and the password."""

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line.startswith(b"*"):
                return
            args = []
            for _ in range(int(line[1:])):
                size = int(self.rfile.readline()[1:])
                args.append(self.rfile.read(size + 2)[:-2].decode())
            command = args[0].upper()
            if command == "EVAL":
                echoed = " ".join(args[3:])  # the key, the document (with the token), …
                reply = f"-ERR \x1b[2J{echoed} {self.server.password}\x07" + "E" * FILLER  # type: ignore[attr-defined]
                self.wfile.write(reply.encode() + b"\r\n")
            elif command == "HELLO":  # RESP3, authenticating: a map
                self.wfile.write(b"%1\r\n$5\r\nproto\r\n:3\r\n")
            else:
                self.wfile.write(b"+OK\r\n")


def test_redis_server_echoing_the_document_and_password_is_masked() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _FakeRedis)
    server.daemon_threads = True
    server.password = REDIS_PASSWORD  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = make_token()
    sink = redis_sink(server.server_address[1])
    try:
        with pytest.raises(SinkError) as caught:
            sink.write(token)
    finally:
        sink.close()
        server.shutdown()
        server.server_close()
    message = str(caught.value)
    assert_safe(message, [token.access_token.reveal(), REDIS_PASSWORD])
    outside_part(
        message,
        f"Redis at 127.0.0.1:{server.server_address[1]} (db 0, key dvs:token; sinks[3]) refused "
        "the write (ResponseError: ",
        ")",
    )
