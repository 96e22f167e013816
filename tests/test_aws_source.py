"""The aws credential source against a real moto_server (DESIGN §9): boto3 is not patched."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from agent.errors import ConfigError, SourceEmpty, SourceUnavailable
from agent.sources.aws import AwsSourceConfig
from agent.stores.aws.client import make_client
from agent.stores.aws.errors import map_error
from agent.stores.aws.source import AwsSource
from tests.conftest import clean_aws_env
from tests.servers import MOTO_ENV, Moto, free_port

CLIENT_ID = "aws-client-id"
SECRET_1 = "aws-secret-one_+/=value"
SECRET_2 = "aws-secret-two_rotated~value"
PROFILE = "dvs"


@pytest.fixture
def sm(moto: Moto) -> Any:
    """The test's own client, to arrange secrets (not the one under test)."""
    return moto.client("secretsmanager")


def _name() -> str:
    return f"dvs/test-{uuid.uuid4().hex[:10]}"


def _doc(secret: str, client_id: str = CLIENT_ID) -> str:
    return json.dumps({"client_id": client_id, "client_secret": secret})


def _settings(moto: Moto, secret_id: str, **extra: Any) -> AwsSourceConfig:
    return AwsSourceConfig(
        secret_id=secret_id, region=moto.region, endpoint_url=moto.endpoint_url, **extra
    )


def _source(config: AwsSourceConfig, **extra: Any) -> AwsSource:
    return AwsSource(config, timeout=5.0, profile=PROFILE, **extra)


@pytest.fixture
def source_for(moto: Moto, aws_env: None) -> Iterator[Any]:
    """Builds sources the way the agent does (their own client through ``make_client``)."""
    made: list[AwsSource] = []

    def build(secret_id: str, **extra: Any) -> AwsSource:
        source = _source(_settings(moto, secret_id, **extra))
        made.append(source)
        return source

    yield build
    for source in made:
        source.close()


def test_read_returns_the_credentials_and_the_version_id(sm: Any, source_for: Any) -> None:
    name = _name()
    created = sm.create_secret(Name=name, SecretString=_doc(SECRET_1))
    credentials = source_for(name).read()
    assert credentials.client_id == CLIENT_ID
    assert credentials.client_secret.reveal() == SECRET_1
    assert credentials.source == "aws"
    assert credentials.version == f"aws:{created['VersionId']}"
    assert source_for(name).version() == credentials.version


def test_put_secret_value_changes_the_version_and_the_values(sm: Any, source_for: Any) -> None:
    name = _name()
    sm.create_secret(Name=name, SecretString=_doc(SECRET_1))
    source = source_for(name)
    before = source.version()
    assert source.read().version == before
    put = sm.put_secret_value(SecretId=name, SecretString=_doc(SECRET_2))
    after = source.version()
    assert after != before
    assert after == f"aws:{put['VersionId']}"
    credentials = source.read()
    assert credentials.client_secret.reveal() == SECRET_2
    assert credentials.version == after


def test_version_calls_describe_secret_only(
    moto: Moto, sm: Any, aws_env: None, tmp_path: Path
) -> None:
    name = _name()
    sm.create_secret(Name=name, SecretString=_doc(SECRET_1))
    client = make_client(
        "secretsmanager", region=moto.region, endpoint_url=moto.endpoint_url, timeout=5
    )
    calls: list[str] = []
    # observing, not patching: botocore emits before-call for every operation of this client
    client.meta.events.register(
        "before-call.secrets-manager", lambda model, **_: calls.append(model.name)
    )
    source = _source(_settings(moto, name), client=client)
    first = source.version()
    sm.put_secret_value(SecretId=name, SecretString=_doc(SECRET_2))
    second = source.version()
    assert first != second
    assert calls == ["DescribeSecret", "DescribeSecret"]
    source.read()
    assert calls == ["DescribeSecret", "DescribeSecret", "GetSecretValue"]
    source.close()  # a client passed in belongs to the caller: still usable
    client.describe_secret(SecretId=name)
    client.close()


def test_moving_awscurrent_back_is_detected(sm: Any, source_for: Any) -> None:
    name = _name()
    first = sm.create_secret(Name=name, SecretString=_doc(SECRET_1))["VersionId"]
    second = sm.put_secret_value(SecretId=name, SecretString=_doc(SECRET_2))["VersionId"]
    source = source_for(name)
    assert source.version() == f"aws:{second}"
    sm.update_secret_version_stage(
        SecretId=name, VersionStage="AWSCURRENT", MoveToVersionId=first, RemoveFromVersionId=second
    )
    assert source.version() == f"aws:{first}"
    credentials = source.read()
    assert credentials.client_secret.reveal() == SECRET_1
    assert credentials.version == f"aws:{first}"


def test_awsprevious_stage_reads_the_previous_values(sm: Any, source_for: Any) -> None:
    name = _name()
    first = sm.create_secret(Name=name, SecretString=_doc(SECRET_1))["VersionId"]
    sm.put_secret_value(SecretId=name, SecretString=_doc(SECRET_2))
    source = source_for(name, version_stage="AWSPREVIOUS")
    credentials = source.read()
    assert credentials.client_secret.reveal() == SECRET_1
    assert credentials.version == source.version() == f"aws:{first}"


def test_secret_by_arn(sm: Any, source_for: Any) -> None:
    name = _name()
    created = sm.create_secret(Name=name, SecretString=_doc(SECRET_1))
    source = source_for(created["ARN"])
    assert source.read().client_secret.reveal() == SECRET_1
    assert source.version() == f"aws:{created['VersionId']}"


def test_custom_key_names(sm: Any, source_for: Any) -> None:
    name = _name()
    sm.create_secret(Name=name, SecretString=json.dumps({"id": "other-id", "key": SECRET_1}))
    credentials = source_for(name, client_id_key="id", client_secret_key="key").read()
    assert (credentials.client_id, credentials.client_secret.reveal()) == ("other-id", SECRET_1)


def test_missing_secret_is_empty_and_names_secret_region_and_keys(
    moto: Moto, source_for: Any
) -> None:
    name = _name()
    source = source_for(name)
    for call in (source.read, source.version):
        with pytest.raises(SourceEmpty) as caught:
            call()
        message = str(caught.value)
        assert f"no secret {name} in {moto.region}" in message
        assert moto.endpoint_url in message
        assert f"profiles.{PROFILE}.aws.secret_id/region" in message


def test_a_stage_no_version_carries_is_empty(sm: Any, source_for: Any) -> None:
    name = _name()
    sm.create_secret(Name=name, SecretString=_doc(SECRET_1))
    source = source_for(name, version_stage="AWSPREVIOUS")  # one version: no previous
    for call in (source.read, source.version):
        with pytest.raises(SourceEmpty) as caught:
            call()
        message = str(caught.value)
        assert "carries the stage AWSPREVIOUS" in message
        assert "stages present: AWSCURRENT" in message
        assert f"profiles.{PROFILE}.aws.version_stage" in message


def test_a_secret_without_a_value_is_empty(sm: Any, source_for: Any) -> None:
    name = _name()
    sm.create_secret(Name=name)
    source = source_for(name)
    for call in (source.read, source.version):
        with pytest.raises(SourceEmpty, match="has no value yet"):
            call()


SHAPE = 'must be a JSON object with the keys "client_id" and "client_secret"'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("not json at all " + SECRET_1, ["is not JSON", SHAPE]),
        (json.dumps([CLIENT_ID, SECRET_1]), ["is a JSON array, not an object", SHAPE]),
        (json.dumps(SECRET_1), ["is a JSON string, not an object", SHAPE]),
        (
            json.dumps({"client_id": CLIENT_ID, "clientSecret": SECRET_1}),
            [
                'has no key "client_secret" (keys present: "clientSecret", "client_id")',
                f"check profiles.{PROFILE}.aws.client_secret_key",
            ],
        ),
        (
            json.dumps({"client_id": 987654321, "client_secret": SECRET_1}),
            ['the key "client_id" of the SecretString', "is a JSON number, not a string"],
        ),
        (
            json.dumps({"client_id": CLIENT_ID, "client_secret": ""}),
            ['the key "client_secret" of the SecretString', "is empty"],
        ),
    ],
    ids=["non-json", "array", "string", "missing-key", "non-string", "empty"],
)
def test_a_bad_secret_string_is_empty_and_quotes_no_value(
    sm: Any, source_for: Any, value: str, expected: list[str]
) -> None:
    name = _name()
    sm.create_secret(Name=name, SecretString=value)
    with pytest.raises(SourceEmpty) as caught:
        source_for(name).read()
    message = str(caught.value)
    for part in expected:
        assert part in message
    assert name in message
    for leaked in (SECRET_1, CLIENT_ID, "987654321"):
        assert leaked not in message


def test_secret_binary_is_empty(sm: Any, source_for: Any) -> None:
    name = _name()
    sm.create_secret(Name=name, SecretBinary=_doc(SECRET_1).encode())
    with pytest.raises(SourceEmpty) as caught:
        source_for(name).read()
    message = str(caught.value)
    assert "SecretBinary, not a SecretString" in message
    assert "must be a JSON object with the keys" in message
    assert SECRET_1 not in message


def test_unreachable_endpoint_is_unavailable_and_quick(aws_env: None) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    source = AwsSource(
        AwsSourceConfig(secret_id="dvs/x", region="us-east-1", endpoint_url=endpoint),
        timeout=2,
        profile="p",
    )
    started = time.monotonic()
    for call in (source.read, source.version):
        with pytest.raises(SourceUnavailable) as caught:
            call()
        message = str(caught.value)
        assert "cannot reach Secrets Manager" in message
        assert "dvs/x" in message and endpoint in message
        assert "profiles.p.aws.endpoint_url" in message
    assert time.monotonic() - started < 10  # one retry, no more
    source.close()


def test_missing_region_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_aws_env(monkeypatch, tmp_path)
    with pytest.raises(ConfigError) as caught:
        make_client("secretsmanager", region=None, endpoint_url=None, timeout=1, profile="p")
    message = str(caught.value)
    assert "profiles.p.aws.region" in message
    assert "AWS_REGION" in message and "AWS_DEFAULT_REGION" in message
    with pytest.raises(ConfigError, match=r"profiles\.dvs\.aws\.region"):
        AwsSource(AwsSourceConfig(secret_id="x"), profile="dvs")
    # the default chain is honoured
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    client = make_client("secretsmanager", region=None, endpoint_url=None, timeout=1)
    assert client.meta.region_name == "eu-west-1"
    client.close()


def test_no_credentials_is_unavailable(
    moto: Moto, sm: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name = _name()
    sm.create_secret(Name=name, SecretString=_doc(SECRET_1))
    clean_aws_env(monkeypatch, tmp_path)  # no AWS_* keys, empty files, no IMDS
    source = _source(_settings(moto, name))
    for call in (source.read, source.version):
        with pytest.raises(SourceUnavailable) as caught:
            call()
        message = str(caught.value)
        assert "no AWS credentials found" in message
        assert "instance profile" in message and "AWS_" in message and "~/.aws" in message
    source.close()


def test_client_timeouts_and_single_retry_layer(moto: Moto, aws_env: None) -> None:
    client = make_client("sqs", region=None, endpoint_url=moto.endpoint_url, timeout=3.5)
    config = client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (3.5, 3.5)
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert client.meta.region_name == MOTO_ENV["AWS_DEFAULT_REGION"]
    client.close()


# --- Unit tests of the error mapper (no server) ----------------------------------------------
# moto_server does not enforce IAM unless started with INITIAL_NO_AUTH_ACTION_COUNT, which the
# session's server is not; AWS's denial is therefore built here as botocore would raise it, and
# passed through the source's mapping function directly.


def _client_error(code: str, message: str, operation: str = "GetSecretValue") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def test_unit_mapper_access_denied_gives_an_iam_hint() -> None:
    arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:dvs/osigu-AbCdEf"
    error = map_error(
        _client_error(
            "AccessDeniedException",
            "User: arn:aws:sts::123456789012:assumed-role/app/i-0abc is not authorized to "
            f"perform: secretsmanager:GetSecretValue on resource: {arn}",
        ),
        secret_id=arn,
        where="eu-west-1",
        profile="dvs",
    )
    assert isinstance(error, SourceUnavailable)
    message = str(error)
    assert arn in message and "eu-west-1" in message
    for needed in ("secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret", "kms:Decrypt"):
        assert needed in message


@pytest.mark.parametrize(
    "code", ["UnrecognizedClientException", "ExpiredTokenException", "InvalidSignatureException"]
)
def test_unit_mapper_rejected_aws_credentials(code: str) -> None:
    error = map_error(
        _client_error(code, "The security token included in the request is invalid."),
        secret_id="dvs/osigu",
        where="us-east-1",
        profile="dvs",
        operation="DescribeSecret",
    )
    assert isinstance(error, SourceUnavailable)
    assert code in str(error) and "dvs/osigu" in str(error)
    assert "instance profile" in str(error) and "secretsmanager:GetSecretValue" in str(error)


def test_unit_mapper_other_codes() -> None:
    kwargs: dict[str, Any] = {"secret_id": "dvs/osigu", "where": "us-east-1", "profile": "dvs"}
    decrypt = map_error(_client_error("DecryptionFailure", "KMS said no"), **kwargs)
    assert isinstance(decrypt, SourceUnavailable) and "kms:Decrypt" in str(decrypt)
    throttled = map_error(_client_error("ThrottlingException", "Rate exceeded"), **kwargs)
    assert isinstance(throttled, SourceUnavailable)
    missing = map_error(_client_error("ResourceNotFoundException", "can't find"), **kwargs)
    assert isinstance(missing, SourceEmpty)
    assert str(missing) == (
        "no secret dvs/osigu in us-east-1: check profiles.dvs.aws.secret_id/region"
    )
    deleted = map_error(_client_error("InvalidRequestException", "marked deleted"), **kwargs)
    assert isinstance(deleted, SourceEmpty) and "marked deleted" in str(deleted)


# --- No secret value in any log line, at debug level, for every logger --------------------------


def test_no_secret_value_in_debug_logs(
    sm: Any, source_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("agent", "botocore", "boto3", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    good, bad = _name(), _name()
    source = source_for(good)  # built first: it guards botocore's loggers, the test's client too
    sm.create_secret(Name=good, SecretString=_doc(SECRET_1))
    sm.create_secret(Name=bad, SecretString=json.dumps({"client_id": SECRET_2}))
    source.version()
    source.read()
    sm.put_secret_value(SecretId=good, SecretString=_doc(SECRET_2))
    source.version()
    assert source.read().client_secret.reveal() == SECRET_2
    with pytest.raises(SourceEmpty) as caught:
        source_for(bad).read()
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records) + str(caught.value)
    assert "Response body" in text and "withheld by dvs-agent" in text  # botocore did log
    assert "GetSecretValue" in text
    for value in (SECRET_1, SECRET_2):
        assert value not in text
