"""``role_arn``: the aws source and the aws sink through an assumed IAM role (DESIGN §12).

The integration tests run against a moto_server of this module's own that enforces IAM
(``/moto-api/reset-auth``): signatures are checked, every action needs an IAM policy, and
``sts:AssumeRole`` checks the role's trust policy, ``sts:ExternalId`` condition included. The
agent's own identity (the base) is an IAM user allowed nothing but ``sts:AssumeRole``: a secret it
reads or writes was read or written as the role. moto's state (``/moto-api/data.json``) lists
the sessions STS handed out, so the tests know the temporary credentials and can look for them
in the agent's output. moto's STS never expires a session: renewal is tested with an injected
clock (the agent's real-elapsed time line), still against moto's STS.

The few unit tests at the end pass a stand-in STS object to :class:`RoleSession` to build the
answers moto cannot give (a skewed ``Date``, an incomplete answer, a connection failure).
"""

from __future__ import annotations

import json
import logging
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bx
import msgspec
import pytest

from agent.config import parse_config
from agent.devserver import TokenServer
from agent.errors import ConfigError, SinkError, SourceUnavailable
from agent.masking import MASK
from agent.models import Secret, Token
from agent.plugin import Where
from agent.sinks.aws import KIND as SINK_KIND
from agent.sinks.aws import AwsSinkConfig, merged, sink_role
from agent.sources.aws import KIND as SOURCE_KIND
from agent.sources.aws import AssumedRole, AwsSourceConfig, assumed_role, default_session_name
from agent.stores.aws.client import close_client, make_client, role_session
from agent.stores.aws.credentials import (
    ROLE_RENEW_BEFORE,
    ROLE_RENEW_BY,
    ROLE_SESSION_SECONDS,
    RoleSession,
    held_credentials,
)
from agent.stores.aws.errors import RoleUnavailable, map_error
from agent.stores.aws.sink import AwsSink
from agent.stores.aws.source import AwsSource
from tests.conftest import CLIENT_ID, CLIENT_SECRET, agent_env, clean_aws_env, run_cli
from tests.servers import moto_server

PROFILE = "dvs"
ACCOUNT = "123456789012"
EXTERNAL_ID = "dvs-ext-7f3a"
READ = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
WRITE = ["secretsmanager:PutSecretValue", "secretsmanager:CreateSecret"]


# --- the IAM-enforcing moto_server ------------------------------------------------------------


@dataclass(frozen=True)
class IamMoto:
    """A moto_server that enforces IAM, an admin user (to arrange) and the agent's base user."""

    endpoint_url: str
    region: str
    admin_keys: tuple[str, str]
    agent_keys: tuple[str, str]
    agent_arn: str

    def admin(self, service: str) -> Any:
        """A client as the admin user (allowed everything), to arrange and to look."""
        return boto3.client(
            service,
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.admin_keys[0],
            aws_secret_access_key=self.admin_keys[1],
        )

    def base_env(self) -> dict[str, str]:
        """The agent's own credentials (the base of every role) and STS's endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.agent_keys[0],
            "AWS_SECRET_ACCESS_KEY": self.agent_keys[1],
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_STS": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def sessions(self, role_arn: str) -> list[dict[str, Any]]:
        """The sessions moto's STS handed out for ``role_arn``, oldest first."""
        with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json") as answer:
            data = json.load(answer)
        return [s for s in data["sts"]["AssumedRole"] if s["role_arn"] == role_arn]

    def role(
        self,
        actions: list[str],
        *,
        principal: str | None = None,
        external_id: str | None = EXTERNAL_ID,
    ) -> str:
        """A new role that ``principal`` (default: the agent's user) may assume, with an
        inline policy allowing ``actions``; its ARN.

        moto's Secrets Manager checks actions against the resource ``*`` (it names no secret
        ARN in its checks): the permission policy's Resource is ``*`` here, the README shows
        the secret's ARN.
        """
        statement: dict[str, Any] = {
            "Effect": "Allow",
            "Principal": {"AWS": principal or self.agent_arn},
            "Action": "sts:AssumeRole",
        }
        if external_id is not None:
            statement["Condition"] = {"StringEquals": {"sts:ExternalId": external_id}}
        name = f"dvs-reader-{uuid.uuid4().hex[:8]}"
        iam = self.admin("iam")
        arn = iam.create_role(
            RoleName=name,
            AssumeRolePolicyDocument=json.dumps(_policy(statement)),
        )["Role"]["Arn"]
        iam.put_role_policy(
            RoleName=name,
            PolicyName="secret",
            PolicyDocument=json.dumps(
                _policy({"Effect": "Allow", "Action": actions, "Resource": "*"})
            ),
        )
        return str(arn)

    def trust(self, role_arn: str, principal: str) -> None:
        """Replace the role's trust policy: only ``principal`` may assume it (with the id)."""
        self.admin("iam").update_assume_role_policy(
            RoleName=role_arn.rsplit("/", 1)[1],
            PolicyDocument=json.dumps(
                _policy(
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": principal},
                        "Action": "sts:AssumeRole",
                        "Condition": {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}},
                    }
                )
            ),
        )


def _policy(statement: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": [statement]}


@pytest.fixture(scope="module")
def iam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamMoto]:
    with moto_server(tmp_path_factory.mktemp("moto-iam")) as server:

        def client(service: str) -> Any:
            return boto3.client(
                service,
                region_name=server.region,
                endpoint_url=server.endpoint_url,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )

        users = client("iam")
        users.create_user(UserName="admin")
        users.put_user_policy(
            UserName="admin",
            PolicyName="all",
            PolicyDocument=json.dumps(_policy({"Effect": "Allow", "Action": "*", "Resource": "*"})),
        )
        admin = users.create_access_key(UserName="admin")["AccessKey"]
        agent_arn = users.create_user(UserName="dvs-agent")["User"]["Arn"]
        users.put_user_policy(
            UserName="dvs-agent",
            PolicyName="assume",
            PolicyDocument=json.dumps(
                _policy({"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"})
            ),
        )
        agent = users.create_access_key(UserName="dvs-agent")["AccessKey"]
        enforce = urllib.request.Request(  # from now on every request is checked
            f"{server.endpoint_url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(enforce).close()
        yield IamMoto(
            endpoint_url=server.endpoint_url,
            region=server.region,
            admin_keys=(admin["AccessKeyId"], admin["SecretAccessKey"]),
            agent_keys=(agent["AccessKeyId"], agent["SecretAccessKey"]),
            agent_arn=agent_arn,
        )


@pytest.fixture
def base(iam: IamMoto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The test process runs as the agent: the base user's keys, nothing of the developer's."""
    clean_aws_env(monkeypatch, tmp_path)
    for key, value in iam.base_env().items():
        monkeypatch.setenv(key, value)


class FakeClock:
    """The agent's time line, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2031, 5, 4, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _secret(iam: IamMoto, value: str = CLIENT_SECRET) -> str:
    name = f"dvs/role-{uuid.uuid4().hex[:10]}"
    iam.admin("secretsmanager").create_secret(
        Name=name, SecretString=json.dumps({"client_id": CLIENT_ID, "client_secret": value})
    )
    return name


def _role(arn: str, external_id: str | None = EXTERNAL_ID) -> AssumedRole:
    return AssumedRole(
        arn=arn,
        session_name=default_session_name(PROFILE),
        external_id=external_id,
        key=f"profiles.{PROFILE}.aws.role_arn",
        external_id_key=f"profiles.{PROFILE}.aws.external_id",
    )


def _source(iam: IamMoto, name: str, role: AssumedRole | None, **extra: Any) -> AwsSource:
    settings = AwsSourceConfig(secret_id=name, region=iam.region, endpoint_url=iam.endpoint_url)
    return AwsSource(settings, timeout=5.0, profile=PROFILE, role=role, **extra)


def _token(value: str) -> Token:
    now = datetime.now(UTC)
    return Token(
        access_token=Secret(value),
        token_type="bearer",
        expires_in=3600,
        obtained_at=now,
        expires_at=now + timedelta(hours=1),
        scope=None,
        extensions={},
    )


def _credential_parts(sessions: list[dict[str, Any]]) -> list[str]:
    return [
        s[field]
        for s in sessions
        for field in ("access_key_id", "secret_access_key", "session_token")
    ]


# --- reading and writing as the role (moto enforcing IAM) -------------------------------------


def test_the_base_identity_alone_cannot_read_the_secret(iam: IamMoto, base: None) -> None:
    """The premise of the tests below: what the agent reads, it reads as the role."""
    name = _secret(iam)
    source = _source(iam, name, None)
    with pytest.raises(SourceUnavailable) as caught:
        source.read()
    assert name in str(caught.value)
    assert CLIENT_SECRET not in str(caught.value)
    source.close()


def test_the_secret_is_read_as_the_assumed_role(iam: IamMoto, base: None) -> None:
    name = _secret(iam)
    arn = iam.role(READ)
    source = _source(iam, name, _role(arn))
    assert iam.sessions(arn) == []  # building the client sends nothing
    credentials = source.read()
    assert credentials.client_id == CLIENT_ID
    assert credentials.client_secret.reveal() == CLIENT_SECRET
    assert source.version() == credentials.version
    sessions = iam.sessions(arn)
    assert len(sessions) == 1  # one session for both requests
    assert sessions[0]["session_name"] == f"dvs-agent-{PROFILE}"
    assert sessions[0]["external_id"] == EXTERNAL_ID
    assert sessions[0]["arn"].endswith(f":assumed-role/{arn.rsplit('/', 1)[1]}/dvs-agent-dvs")
    source.close()


def test_the_token_is_written_as_the_assumed_role(iam: IamMoto, base: None) -> None:
    name = f"dvs/role-token-{uuid.uuid4().hex[:8]}"
    settings = AwsSinkConfig(
        secret_id=name, region=iam.region, endpoint_url=iam.endpoint_url, create=True
    )
    own = AwsSink(settings, profile=PROFILE, config_key="profiles.dvs.sinks[1]")
    with pytest.raises(SinkError) as caught:  # the base identity may not write
        own.write(_token("tok-as-the-agent-0001"))
    assert name in str(caught.value)
    assert "tok-as-the-agent-0001" not in str(caught.value)
    own.close()
    arn = iam.role(READ + WRITE)
    sink = AwsSink(settings, profile=PROFILE, config_key="profiles.dvs.sinks[1]", role=_role(arn))
    sink.write(_token("tok-as-the-role-0001"))  # CreateSecret
    sink.write(_token("tok-as-the-role-0002"))  # PutSecretValue
    stored = json.loads(iam.admin("secretsmanager").get_secret_value(SecretId=name)["SecretString"])
    assert stored["access_token"] == "tok-as-the-role-0002"
    assert len(iam.sessions(arn)) == 1
    sink.close()


@pytest.mark.parametrize("case", ["wrong-external-id", "no-external-id-asked", "other-principal"])
def test_a_denied_assume_role_names_the_key_the_role_and_the_cause(
    iam: IamMoto, base: None, case: str
) -> None:
    name = _secret(iam)
    if case == "other-principal":
        arn = iam.role(READ, principal=f"arn:aws:iam::{ACCOUNT}:user/someone-else")
        role = _role(arn)
    elif case == "wrong-external-id":
        arn = iam.role(READ)
        role = _role(arn, external_id="not-the-right-id")
    else:  # the trust policy allows another principal; no external id configured
        arn = iam.role(READ, principal=f"arn:aws:iam::{ACCOUNT}:root")
        role = _role(arn, external_id=None)
    source = _source(iam, name, role)
    for call in (source.read, source.version):
        with pytest.raises(SourceUnavailable) as caught:
            call()
        message = str(caught.value)
        assert f"AWS denied sts:AssumeRole of the role {arn} (profiles.dvs.aws.role_arn)" in message
        assert "AccessDenied" in message and iam.agent_arn in message  # AWS's own words
        assert "trust policy must allow the agent's own AWS identity" in message
        assert name in message  # what was being read
        if role.external_id:
            assert "the external id is wrong: profiles.dvs.aws.external_id" in message
            assert role.external_id not in message
        else:
            assert "set profiles.dvs.aws.external_id" in message
        for value in (CLIENT_SECRET, iam.agent_keys[1]):
            assert value not in message
    assert iam.sessions(arn) == []
    source.close()


def test_no_base_credentials_says_so(
    iam: IamMoto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", iam.endpoint_url)
    arn = iam.role(READ)
    source = _source(iam, _secret(iam), _role(arn))
    with pytest.raises(SourceUnavailable) as caught:
        source.read()
    message = str(caught.value)
    assert f"no AWS credentials to assume the role {arn} (profiles.dvs.aws.role_arn)" in message
    assert "instance profile" in message and "AWS_ACCESS_KEY_ID" in message
    source.close()


def test_a_role_without_the_permission_is_an_error_naming_the_role(
    iam: IamMoto, base: None
) -> None:
    arn = iam.role(["secretsmanager:DescribeSecret"])  # no PutSecretValue
    name = f"dvs/role-token-{uuid.uuid4().hex[:8]}"
    settings = AwsSinkConfig(
        secret_id=name, region=iam.region, endpoint_url=iam.endpoint_url, create=True
    )
    sink = AwsSink(settings, profile=PROFILE, config_key="profiles.dvs.sinks[1]", role=_role(arn))
    with pytest.raises(SinkError) as caught:
        sink.write(_token("tok-denied-000001"))
    message = str(caught.value)
    assert message.startswith("aws sink profiles.dvs.sinks[1]: ")
    assert name in message
    assert "tok-denied-000001" not in message
    for part in _credential_parts(iam.sessions(arn)):
        assert part not in message
    assert len(iam.sessions(arn)) == 1  # the role was assumed; the write itself was denied
    sink.close()


def test_held_credentials_cover_the_sessions_and_the_base(iam: IamMoto, base: None) -> None:
    arn = iam.role(READ)
    client = make_client(
        "secretsmanager",
        region=iam.region,
        endpoint_url=iam.endpoint_url,
        timeout=5,
        role=_role(arn),
    )
    assert set(held_credentials(client)) == {iam.agent_keys[1]}  # no session yet: the base
    _source(iam, _secret(iam), None, client=client).read()
    (session,) = iam.sessions(arn)
    held = set(held_credentials(client))
    assert {
        session["access_key_id"],
        session["secret_access_key"],
        session["session_token"],
    } <= held
    assert iam.agent_keys[1] in held
    close_client(client)


def test_debug_logs_carry_no_credential(
    iam: IamMoto, base: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for logger in ("agent", "botocore", "boto3", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=logger)
    arn = iam.role(READ)
    name = _secret(iam)
    source = _source(iam, name, _role(arn))
    source.version()
    source.read()
    source.close()
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    # botocore did log the signed requests and the answers: masked and withheld
    assert "x-amz-security-token" in text.lower() and MASK in text
    assert "withheld by dvs-agent" in text
    assert f"assumed role {arn} (session dvs-agent-dvs)" in text
    for value in (*_credential_parts(iam.sessions(arn)), iam.agent_keys[1], CLIENT_SECRET):
        assert value not in text


# --- renewal: an injected clock, moto's real STS -----------------------------------------------


def test_the_session_is_renewed_when_it_nears_its_end_not_before(
    iam: IamMoto, base: None, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    arn = iam.role(READ)
    role = _role(arn)
    client = make_client(
        "secretsmanager",
        region=iam.region,
        endpoint_url=iam.endpoint_url,
        timeout=5,
        role=role,
        clock=clock,
    )
    session = role_session(client)
    assert session is not None and session.role == role
    calls: list[str] = []
    session.sts.meta.events.register(
        "before-call.sts.AssumeRole", lambda model, **_: calls.append(model.name)
    )
    source = _source(iam, _secret(iam), role, client=client)
    renew_at = ROLE_SESSION_SECONDS - ROLE_RENEW_BEFORE  # 45 minutes into a 1 h session

    source.version()
    assert len(calls) == 1
    clock.advance(renew_at - 1)
    source.read()
    source.version()
    assert len(calls) == 1, "renewed before the session neared its end"
    clock.advance(2)
    source.read()
    assert len(calls) == 2, "not renewed once the session neared its end"
    first, second = iam.sessions(arn)
    assert first["access_key_id"] != second["access_key_id"]
    clock.advance(renew_at - 1)  # the new session is as long: the same margin again
    source.version()
    assert len(calls) == 2

    # STS refuses while the session still has more than ROLE_RENEW_BY left: the session is kept
    iam.trust(arn, f"arn:aws:iam::{ACCOUNT}:user/someone-else")
    caplog.set_level(logging.WARNING, logger="botocore.credentials")
    clock.advance(2)
    assert source.read().client_secret.reveal() == CLIENT_SECRET
    assert len(calls) == 3
    assert "Refreshing temporary credentials failed during advisory refresh period" in caplog.text
    # ... and once less than ROLE_RENEW_BY is left, the renewal must succeed: the read fails
    clock.advance(ROLE_RENEW_BEFORE - ROLE_RENEW_BY)
    with pytest.raises(SourceUnavailable) as caught:
        source.read()
    assert len(calls) == 4
    message = str(caught.value)
    assert f"AWS denied sts:AssumeRole of the role {arn} (profiles.dvs.aws.role_arn)" in message
    text = caplog.text + message
    for value in (*_credential_parts(iam.sessions(arn)), iam.agent_keys[1], CLIENT_SECRET):
        assert value not in text
    # the trust policy mended: the next read assumes the role again
    iam.trust(arn, iam.agent_arn)
    assert source.read().client_secret.reveal() == CLIENT_SECRET
    assert len(calls) == 5 and len(iam.sessions(arn)) == 3
    source.close()
    close_client(client)


# --- the agent as a process -------------------------------------------------------------------


def _agent_config(tmp_path: Path, url: str, body: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[agent]
log_level = "debug"
state_dir = "{tmp_path}/state"

[profiles.dvs]
token_url = "{url}"
{body}

[[profiles.dvs.sinks]]
type = "file"
path = "{tmp_path}/token"
"""
    )
    return path


def _process_env(iam: IamMoto, tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    env = {k: v for k, v in agent_env().items() if not k.startswith("AWS_")}
    env.update(iam.base_env())
    env.update({"AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)})
    return env


def test_once_reads_and_writes_back_through_the_role(
    iam: IamMoto, server: TokenServer, tmp_path: Path
) -> None:
    name = _secret(iam)
    written = f"dvs/role-token-{uuid.uuid4().hex[:8]}"
    arn = iam.role(READ + WRITE)
    config = _agent_config(
        tmp_path,
        server.url,
        f"""
sources = ["aws"]

[profiles.dvs.aws]
secret_id = "{name}"
region = "{iam.region}"
endpoint_url = "{iam.endpoint_url}"
role_arn = "{arn}"
external_id = "{EXTERNAL_ID}"

[[profiles.dvs.sinks]]
type = "aws"
secret_id = "{written}"
create = true
""",
    )
    env = _process_env(iam, tmp_path)
    checked = run_cli("check", "-c", str(config), env=env)
    assert checked.returncode == 0, checked.stderr
    assert f"as role {arn}" in checked.stdout + checked.stderr

    result = run_cli("once", "-c", str(config), env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    token = (tmp_path / "token").read_text().strip()
    assert server.issued()[token].client_secret == CLIENT_SECRET
    stored = iam.admin("secretsmanager").get_secret_value(SecretId=written)["SecretString"]
    assert json.loads(stored)["access_token"] == token  # the sink took the table's role
    sessions = iam.sessions(arn)
    assert len(sessions) == 2  # the source's client and the sink's each hold a session
    assert {s["external_id"] for s in sessions} == {EXTERNAL_ID}
    assert {s["session_name"] for s in sessions} == {"dvs-agent-dvs"}
    # debug level: botocore logged the signed requests, and nothing secret shows
    assert "x-amz-security-token" in output.lower()
    for value in (*_credential_parts(sessions), iam.agent_keys[1], CLIENT_SECRET, token):
        assert value not in output


def test_once_with_a_wrong_external_id_fails_naming_the_key(
    iam: IamMoto, server: TokenServer, tmp_path: Path
) -> None:
    name = _secret(iam)
    arn = iam.role(READ)
    config = _agent_config(
        tmp_path,
        server.url,
        f"""
sources = ["aws"]

[profiles.dvs.aws]
secret_id = "{name}"
region = "{iam.region}"
endpoint_url = "{iam.endpoint_url}"
role_arn = "{arn}"
external_id = "wrong-{EXTERNAL_ID}"
""",
    )
    result = run_cli("once", "-c", str(config), env=_process_env(iam, tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"AWS denied sts:AssumeRole of the role {arn} (profiles.dvs.aws.role_arn)" in output
    assert "the external id is wrong: profiles.dvs.aws.external_id" in output
    assert CLIENT_SECRET not in output and iam.agent_keys[1] not in output
    assert not (tmp_path / "token").exists()


# --- configuration -----------------------------------------------------------------------------

ARN = f"arn:aws:iam::{ACCOUNT}:role/dvs-agent-reader"


def _aws_toml(lines: str, *, sinks: str = "", sources: str = '["aws"]') -> str:
    return (
        f"[profiles.dvs]\nsources = {sources}\n"
        '[[profiles.dvs.sinks]]\npath = "/run/dvs-agent/token"\n'
        f"{sinks}\n"
        f'[profiles.dvs.aws]\nsecret_id = "dvs/osigu"\n{lines}\n'
    )


def _sink_toml(lines: str) -> str:
    return f'[[profiles.dvs.sinks]]\ntype = "aws"\nsecret_id = "dvs/osigu-token"\n{lines}\n'


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="agent.toml")
    return str(caught.value)


def test_role_keys_are_read_and_default_to_none() -> None:
    aws = parse_config(_aws_toml("")).profiles["dvs"].aws
    assert aws is not None
    assert (aws.role_arn, aws.role_session_name, aws.external_id) == (None, None, None)
    lines = f'role_arn = "{ARN}"\nrole_session_name = "host-1@dvs"\nexternal_id = "{EXTERNAL_ID}"'
    config = parse_config(_aws_toml(lines, sinks=_sink_toml(f'role_arn = "{ARN}"')))
    aws = config.profiles["dvs"].aws
    assert aws is not None
    assert (aws.role_arn, aws.role_session_name, aws.external_id) == (
        ARN,
        "host-1@dvs",
        EXTERNAL_ID,
    )
    sink = config.profiles["dvs"].sinks[1]
    assert isinstance(sink, AwsSinkConfig)
    assert msgspec.structs.asdict(sink) == {
        "secret_id": "dvs/osigu-token",
        "region": None,
        "endpoint_url": None,
        "create": False,
        "role_arn": ARN,
        "role_session_name": None,
        "external_id": None,
    }


@pytest.mark.parametrize(
    "arn",
    [
        ARN,
        f"arn:aws:iam::{ACCOUNT}:role/service-role/team/dvs+reader=1,2.x@y_z-",
        f"arn:aws-cn:iam::{ACCOUNT}:role/reader",
        f"arn:aws-us-gov:iam::{ACCOUNT}:role/reader",
        f"arn:aws-iso-b:iam::{ACCOUNT}:role/reader",
    ],
)
def test_valid_role_arns(arn: str) -> None:
    aws = parse_config(_aws_toml(f'role_arn = "{arn}"')).profiles["dvs"].aws
    assert aws is not None and aws.role_arn == arn


@pytest.mark.parametrize(
    ("arn", "said"),
    [
        ("dvs-agent-reader", "is not an ARN: give the role's ARN"),
        (
            f"arn:aws:sts::{ACCOUNT}:assumed-role/dvs-agent-reader/i-0abc",
            "is a role session's ARN (what GetCallerIdentity shows), not the role's",
        ),
        (f"arn:aws:iam::{ACCOUNT}:instance-profile/web", "is an instance profile's ARN"),
        ("arn:aws:iam::12345:role/reader", "is not an IAM role's ARN"),
        (f"arn:aws:iam::{ACCOUNT}:user/dvs-agent", "is not an IAM role's ARN"),
        (f"arn:aws:iam::{ACCOUNT}:role/", "is not an IAM role's ARN"),
        (f"arn:aws:iam::{ACCOUNT}:role/{'x' * 65}", "is not an IAM role's ARN"),
        (f"arn:azure:iam::{ACCOUNT}:role/reader", "is not an IAM role's ARN"),
        (f"arn:aws:iam:us-east-1:{ACCOUNT}:role/reader", "is not an IAM role's ARN"),
    ],
)
def test_invalid_role_arns_name_the_key(arn: str, said: str) -> None:
    message = _error(_aws_toml(f'role_arn = "{arn}"'))
    assert message.startswith(f'agent.toml: profiles.dvs.aws.role_arn: "{arn}" {said}')
    assert "arn:aws:iam::123456789012:role/dvs-agent-reader" in message  # the example
    sink = _error(_aws_toml("", sinks=_sink_toml(f'role_arn = "{arn}"')))
    assert sink.startswith(f'agent.toml: profiles.dvs.sinks[1].role_arn: "{arn}" {said}')


def test_an_empty_role_arn_in_the_table_is_an_error() -> None:
    message = _error(_aws_toml('role_arn = ""'))
    assert message.startswith("agent.toml: profiles.dvs.aws.role_arn: must not be empty")
    assert "leave the key out to use the agent's own AWS credentials" in message


@pytest.mark.parametrize("name", ["a", "x" * 65, "has space", "semi;colon", "é-accent"])
def test_invalid_session_names(name: str) -> None:
    message = _error(_aws_toml(f'role_arn = "{ARN}"\nrole_session_name = "{name}"'))
    assert message.startswith("agent.toml: profiles.dvs.aws.role_session_name: ")
    assert "2 to 64 characters of letters, digits and + = , . @ _ -" in message
    assert '"dvs-agent-dvs"' in message  # the default, to leave the key out for


@pytest.mark.parametrize("value", ["Q", "x" * 1225, "semi;colon", "with space"])
def test_invalid_external_ids_are_not_quoted(value: str) -> None:
    message = _error(_aws_toml(f'role_arn = "{ARN}"\nexternal_id = "{value}"'))
    assert message.startswith("agent.toml: profiles.dvs.aws.external_id: must be 2 to 1224")
    assert value not in message


def test_valid_session_name_and_external_id_bounds() -> None:
    lines = f'role_arn = "{ARN}"\nrole_session_name = "{"s" * 64}"\nexternal_id = "{"e" * 1224}"'
    parse_config(_aws_toml(lines))
    parse_config(_aws_toml(f'role_arn = "{ARN}"\nexternal_id = "urn:x/y=z,a.b@c-d_e+f"'))


@pytest.mark.parametrize("field", ["role_session_name", "external_id"])
def test_session_name_and_external_id_only_with_role_arn(field: str) -> None:
    message = _error(_aws_toml(f'{field} = "value-1"'))
    assert message.startswith(f"agent.toml: profiles.dvs.aws.{field}: only with role_arn")
    assert "set profiles.dvs.aws.role_arn" in message
    # a sink's own, with no role in the sink nor in the table
    message = _error(_aws_toml("", sinks=_sink_toml(f'{field} = "value-1"')))
    assert message.startswith(f"agent.toml: profiles.dvs.sinks[1].{field}: only with role_arn")
    # with the table's role it applies to the sink's session
    parse_config(_aws_toml(f'role_arn = "{ARN}"', sinks=_sink_toml(f'{field} = "value-1"')))
    # role_arn = "" in the sink: no role, whatever the table says
    text = _aws_toml(f'role_arn = "{ARN}"', sinks=_sink_toml(f'role_arn = ""\n{field} = "v-1"'))
    assert _error(text).startswith(f"agent.toml: profiles.dvs.sinks[1].{field}: only with")


def test_the_sink_takes_the_role_keys_of_the_table() -> None:
    table = AwsSourceConfig(
        secret_id="dvs/osigu", role_arn=ARN, role_session_name="tbl-1", external_id="ext-1"
    )
    sink = AwsSinkConfig(secret_id="dvs/osigu-token")
    assert (merged(sink, table).role_arn, merged(sink, table).external_id) == (ARN, "ext-1")
    assert merged(sink, table).role_session_name == "tbl-1"
    other = f"arn:aws:iam::{ACCOUNT}:role/writer"
    own = merged(AwsSinkConfig(secret_id="t", role_arn=other, external_id="ext-2"), table)
    assert (own.role_arn, own.role_session_name, own.external_id) == (other, "tbl-1", "ext-2")
    none = merged(AwsSinkConfig(secret_id="t", role_arn=""), table)
    assert (none.role_arn, none.role_session_name, none.external_id) == (None, None, None)
    assert merged(sink, None).role_arn is None


def test_the_sinks_role_names_the_keys_where_they_were_set() -> None:
    table = AwsSourceConfig(secret_id="dvs/osigu", role_arn=ARN, external_id="ext-1")
    where = Where.of("dvs", ["sinks", 2], tables={"aws": table})
    inherited = sink_role(AwsSinkConfig(secret_id="t"), where)
    assert inherited == AssumedRole(
        arn=ARN,
        session_name="dvs-agent-dvs",
        external_id="ext-1",
        key="profiles.dvs.aws.role_arn",
        external_id_key="profiles.dvs.aws.external_id",
    )
    writer = f"arn:aws:iam::{ACCOUNT}:role/writer"
    own = sink_role(AwsSinkConfig(secret_id="t", role_arn=writer), where)
    assert own is not None
    assert (own.key, own.external_id, own.external_id_key) == (
        "profiles.dvs.sinks[2].role_arn",
        "ext-1",
        "profiles.dvs.aws.external_id",
    )
    bare = Where.of("dvs", ["sinks", 2], tables={"aws": AwsSourceConfig(secret_id="s")})
    own_only = sink_role(AwsSinkConfig(secret_id="t", role_arn=writer), bare)
    assert own_only is not None
    assert own_only.external_id_key == "profiles.dvs.sinks[2].external_id"
    assert sink_role(AwsSinkConfig(secret_id="t", role_arn=""), where) is None
    assert sink_role(AwsSinkConfig(secret_id="t"), bare) is None


def test_default_session_name() -> None:
    assert default_session_name("dvs") == "dvs-agent-dvs"
    assert default_session_name("a.b_c-d") == "dvs-agent-a.b_c-d"
    assert default_session_name("x y/é") == "dvs-agent-x-y--"
    long = default_session_name("p" * 64)
    assert len(long) == 64 and long.startswith("dvs-agent-ppp")
    source = Where.of("dvs", ["aws"])
    role = assumed_role(AwsSourceConfig(secret_id="s", role_arn=ARN), source)
    assert role is not None and role.session_name == "dvs-agent-dvs"
    assert role.key == "profiles.dvs.aws.role_arn"
    assert assumed_role(AwsSourceConfig(secret_id="s"), source) is None


def test_describe_mentions_the_role() -> None:
    table = AwsSourceConfig(secret_id="dvs/osigu", region="eu-west-1", role_arn=ARN)
    source = Where.of("dvs", ["aws"], tables={"aws": table})
    assert SOURCE_KIND.describe(table, source) == (
        f"aws secret dvs/osigu (AWSCURRENT, eu-west-1) as role {ARN}"
    )
    plain = AwsSourceConfig(secret_id="dvs/osigu")
    assert "role" not in SOURCE_KIND.describe(plain, source)
    where = Where.of("dvs", ["sinks", 1], tables={"aws": table})
    sink = AwsSinkConfig(secret_id="dvs/t", create=True)
    assert SINK_KIND.describe(sink, where) == f"aws dvs/t (created if missing) as role {ARN}"
    assert SINK_KIND.describe(AwsSinkConfig(secret_id="dvs/t", role_arn=""), where) == "aws dvs/t"


def test_one_secret_through_two_roles_is_one_target() -> None:
    """A sink writing the source's own secret is refused, whichever roles each goes through."""
    other = f"arn:aws:iam::{ACCOUNT}:role/writer"
    message = _error(
        _aws_toml(f'role_arn = "{ARN}"', sinks=_sink_toml(f'role_arn = "{other}"')).replace(
            '"dvs/osigu-token"', '"dvs/osigu"'
        )
    )
    assert "profiles.dvs.sinks[1].secret_id" in message
    assert "the profile's own credential source" in message


# --- RoleSession with a stand-in STS (answers moto cannot give) --------------------------------


class _Meta:
    region_name = "eu-west-1"
    endpoint_url = "https://sts.eu-west-1.amazonaws.com"


class StandInSts:
    """Answers ``assume_role`` with what the test sets; records the parameters."""

    meta = _Meta()

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[dict[str, Any]] = []

    def assume_role(self, **params: Any) -> Any:
        self.calls.append(params)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        pass


def _answer(issued: datetime, lifetime: timedelta, n: int = 1) -> dict[str, Any]:
    return {
        "Credentials": {
            "AccessKeyId": f"ASIASTANDIN{n:09d}",
            "SecretAccessKey": f"stand-in-secret-key-{n}-abcdefghijklmnop",
            "SessionToken": f"stand-in-session-token-{n}-" + "t" * 40,
            "Expiration": issued + lifetime,
        },
        "ResponseMetadata": {"HTTPHeaders": {"date": format_datetime(issued, usegmt=True)}},
    }


def _denied(message: str) -> bx.ClientError:
    return bx.ClientError({"Error": {"Code": "AccessDenied", "Message": message}}, "AssumeRole")


def test_unit_the_session_lifetime_is_measured_on_stss_clock() -> None:
    """A host whose wall clock is 3 h ahead of AWS still gets a 1 h session on its time line."""
    clock = FakeClock()
    aws_now = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    sts = StandInSts(_answer(aws_now, timedelta(hours=1)))
    fetched = RoleSession(sts, _role(ARN), clock=clock).fetch()
    assert datetime.fromisoformat(fetched["expiry_time"]) == clock.now + timedelta(hours=1)
    assert sts.calls == [
        {
            "RoleArn": ARN,
            "RoleSessionName": "dvs-agent-dvs",
            "DurationSeconds": ROLE_SESSION_SECONDS,
            "ExternalId": EXTERNAL_ID,
        }
    ]
    # without a Date, the host's wall clock; never longer than asked; no ExternalId unless set
    now = datetime.now(UTC)
    answer = _answer(now, timedelta(hours=5))
    del answer["ResponseMetadata"]
    sts = StandInSts(answer)
    fetched = RoleSession(sts, _role(ARN, external_id=None), clock=clock).fetch()
    expiry = datetime.fromisoformat(fetched["expiry_time"])
    assert expiry == clock.now + timedelta(seconds=ROLE_SESSION_SECONDS)
    assert "ExternalId" not in sts.calls[0]


def test_unit_an_ended_or_incomplete_session_is_refused() -> None:
    clock = FakeClock()
    now = datetime.now(UTC)
    ended = StandInSts(_answer(now, timedelta(seconds=-5)))
    with pytest.raises(RoleUnavailable, match="gave a session that has already ended"):
        RoleSession(ended, _role(ARN), clock=clock).fetch()
    answer = _answer(now, timedelta(hours=1))
    del answer["Credentials"]["SessionToken"]
    with pytest.raises(RoleUnavailable) as caught:
        RoleSession(StandInSts(answer), _role(ARN), clock=clock).fetch()
    assert "answered without a complete set of credentials" in str(caught.value)
    assert "stand-in-secret-key" not in str(caught.value)


def test_unit_errors_mask_the_sessions_credentials() -> None:
    now = datetime.now(UTC)
    first = _answer(now, timedelta(hours=1))
    creds = first["Credentials"]
    echo = f"User {creds['AccessKeyId']} with {creds['SecretAccessKey']} {creds['SessionToken']}"
    session = RoleSession(StandInSts(first, _denied(echo)), _role(ARN), clock=FakeClock())
    session.fetch()
    with pytest.raises(RoleUnavailable) as caught:
        session.fetch()
    message = str(caught.value)
    assert MASK in message
    for value in (creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]):
        assert value not in message
    assert caught.value.__cause__ is None and caught.value.__context__ is None


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (
            bx.ClientError(
                {"Error": {"Code": "InvalidClientTokenId", "Message": "invalid"}}, "AssumeRole"
            ),
            "AWS rejected the agent's own credentials calling sts:AssumeRole of the role",
        ),
        (
            bx.ClientError(
                {"Error": {"Code": "RegionDisabledException", "Message": "off"}}, "AssumeRole"
            ),
            "STS is not activated in eu-west-1 for the role",
        ),
        (
            bx.EndpointConnectionError(endpoint_url="https://sts.eu-west-1.amazonaws.com"),
            "cannot reach STS at eu-west-1 to assume the role",
        ),
        (bx.ReadTimeoutError(endpoint_url="https://sts"), "STS timed out at eu-west-1"),
        (bx.NoCredentialsError(), "no AWS credentials to assume the role"),
    ],
    ids=["rejected", "region-disabled", "unreachable", "timeout", "no-credentials"],
)
def test_unit_sts_failures_are_explained(failure: BaseException, said: str) -> None:
    session = RoleSession(StandInSts(failure), _role(ARN), clock=FakeClock())
    with pytest.raises(RoleUnavailable) as caught:
        session.fetch()
    message = str(caught.value)
    assert said in message
    assert f"{ARN} (profiles.dvs.aws.role_arn)" in message


def test_unit_the_renewal_margins() -> None:
    """botocore's AssumeRole margins: renew in the last 15 min, must renew in the last 10."""
    assert (ROLE_SESSION_SECONDS, ROLE_RENEW_BEFORE, ROLE_RENEW_BY) == (3600, 900, 600)
    assert ROLE_RENEW_BY < ROLE_RENEW_BEFORE < ROLE_SESSION_SECONDS


def test_unit_a_denied_read_as_the_role_names_the_role() -> None:
    denied = bx.ClientError(
        {"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}},
        "GetSecretValue",
    )
    error = map_error(denied, secret_id="dvs/osigu", where="eu-west-1", role=_role(ARN))
    assert isinstance(error, SourceUnavailable)
    assert f"the role {ARN} (profiles.dvs.aws.role_arn) needs secretsmanager:GetSecretValue" in (
        str(error)
    )
    plain = map_error(denied, secret_id="dvs/osigu", where="eu-west-1")
    assert "the agent's IAM identity needs secretsmanager:GetSecretValue" in str(plain)


def test_rotation_events_are_read_from_sqs_as_the_assumed_role(
    iam: IamMoto, base: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The SQS trigger reads the events queue as the profile's role: the base identity may
    only assume roles, so a receive as itself is refused."""
    from agent.stores.aws.events import SqsRotationListener
    from agent.triggers.sqs import KIND as SQS_KIND

    sm, sqs = iam.admin("secretsmanager"), iam.admin("sqs")
    secret = sm.create_secret(
        Name=f"dvs/ev-{uuid.uuid4().hex[:8]}",
        SecretString=json.dumps({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}),
    )["ARN"]
    queue_url = sqs.create_queue(QueueName=f"rot-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    # AWS authorizes DeleteMessageBatch by sqs:DeleteMessage; moto wants the batch action
    role = iam.role(["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:DeleteMessageBatch"])
    event = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "AWS Service Event via CloudTrail",
        "source": "aws.secretsmanager",
        "detail": {"eventName": "RotationSucceeded", "additionalEventData": {"SecretId": secret}},
    }
    base_only = SqsRotationListener(
        queue_url=queue_url,
        region=iam.region,
        endpoint_url=iam.endpoint_url,
        watch={PROFILE: [secret]},
        on_rotation=lambda profile, detail: None,
        wait_seconds=0,
    )
    with pytest.raises(bx.ClientError):
        base_only.poll_once()  # the base identity may only assume roles
    base_only.stop()

    def profiles(arn_line: str) -> Any:
        text = f"""
[profiles.{PROFILE}]
sources = ["aws"]
[profiles.{PROFILE}.aws]
secret_id = "{secret}"
region = "{iam.region}"
events_queue_url = "{queue_url}"
{arn_line}
[[profiles.{PROFILE}.sinks]]
path = "/nonexistent/token"
"""
        return parse_config(text, source="test").profiles

    woken: list[str] = []
    [listener] = SQS_KIND.listeners(
        profiles(f'role_arn = "{role}"\nexternal_id = "{EXTERNAL_ID}"'),
        lambda profile, detail: woken.append(profile),
        logging.getLogger("test"),
    )
    assert isinstance(listener, SqsRotationListener)
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(event))
    deadline = 0
    while not woken and deadline < 10:
        listener.poll_once()
        deadline += 1
    listener.stop()
    assert woken == [PROFILE]
    assert iam.sessions(role), "the queue was read through an assumed session"


def test_profiles_reading_one_queue_as_different_identities_share_one_listener_and_are_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each message is taken once, so one queue has one listener, as the first role."""
    from agent.triggers.sqs import KIND as SQS_KIND

    queue = "https://sqs.us-east-1.amazonaws.com/123456789012/rotations"
    tables = "".join(
        f"""
[profiles.{name}]
sources = ["aws"]
[profiles.{name}.aws]
secret_id = "dvs/{name}"
region = "us-east-1"
events_queue_url = "{queue}"
{f'role_arn = "arn:aws:iam::123456789012:role/{role}"' if role else ""}
[[profiles.{name}.sinks]]
path = "/nonexistent/{name}"
"""
        for name, role in (("a", "reader-a"), ("b", "reader-b"), ("c", "reader-a"), ("d", ""))
    )
    profiles = parse_config(tables, source="test").profiles
    with caplog.at_level(logging.WARNING, logger="test"):
        listeners = SQS_KIND.listeners(profiles, lambda p, d: None, logging.getLogger("test"))
    assert len(listeners) == 1
    warnings = [r.getMessage() for r in caplog.records if "different identities" in r.getMessage()]
    assert len(warnings) == 2  # b (another role) and d (no role); not c (the same role)
    assert "profiles a and b" in warnings[0] and "the role arn:aws:iam::" in warnings[0]
    assert "role/reader-a" in warnings[0] and "profiles a and d" in warnings[1]
    for listener in listeners:
        listener.stop()
