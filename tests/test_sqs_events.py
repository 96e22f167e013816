"""Secrets Manager rotation events through SQS (DESIGN §5), against a real moto_server.

moto does not emit EventBridge events: the tests send them, built from the shapes AWS documents
for CloudTrail entries of Secrets Manager ("AWS API Call via CloudTrail" for API calls, "AWS
Service Event via CloudTrail" for RotationSucceeded), delivered directly or in an SNS envelope.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent.stores.aws.events import (
    MalformedMessage,
    SecretRef,
    SqsRotationListener,
    parse_message,
    region_of_queue,
)
from tests.conftest import wait_for
from tests.servers import Moto

ACCOUNT = "123456789012"
REGION = "us-east-1"


def _arn(name: str, region: str = REGION, account: str = ACCOUNT, suffix: str = "AbC12f") -> str:
    return f"arn:aws:secretsmanager:{region}:{account}:secret:{name}-{suffix}"


def _eventbridge(detail_type: str, detail: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": "aws.secretsmanager",
        "account": ACCOUNT,
        "time": "2026-11-28T16:00:00Z",
        "region": REGION,
        "resources": [],
        "detail": detail,
    }


def _api_call(
    event_name: str,
    request_parameters: dict[str, Any] | None,
    response_elements: dict[str, Any] | None,
    **extra: Any,
) -> dict[str, Any]:
    """An EventBridge event for a CloudTrail-recorded Secrets Manager API call."""
    return _eventbridge(
        "AWS API Call via CloudTrail",
        {
            "eventVersion": "1.09",
            "userIdentity": {
                "type": "AssumedRole",
                "principalId": "AROAEXAMPLE:ops",
                "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/ops/someone",
                "accountId": ACCOUNT,
            },
            "eventTime": "2026-11-28T16:00:00Z",
            "eventSource": "secretsmanager.amazonaws.com",
            "eventName": event_name,
            "awsRegion": REGION,
            "sourceIPAddress": "203.0.113.10",
            "userAgent": "aws-cli/2.15.0",
            "requestParameters": request_parameters,
            "responseElements": response_elements,
            "requestID": str(uuid.uuid4()),
            "eventID": str(uuid.uuid4()),
            "readOnly": False,
            "eventType": "AwsApiCall",
            "managementEvent": True,
            "recipientAccountId": ACCOUNT,
            "eventCategory": "Management",
            **extra,
        },
    )


def _put_secret_value(secret_id: str, arn: str) -> dict[str, Any]:
    return _api_call(
        "PutSecretValue",
        {"secretId": secret_id, "clientRequestToken": str(uuid.uuid4())},
        {"arn": arn, "versionId": str(uuid.uuid4()), "versionStages": ["AWSCURRENT"]},
    )


def _update_secret_version_stage(arn: str, name: str) -> dict[str, Any]:
    return _api_call(
        "UpdateSecretVersionStage",
        {
            "secretId": arn,
            "versionStage": "AWSCURRENT",
            "moveToVersionId": str(uuid.uuid4()),
            "removeFromVersionId": str(uuid.uuid4()),
        },
        {"arn": arn, "name": name},
    )


def _rotation_succeeded(arn: str) -> dict[str, Any]:
    return _eventbridge(
        "AWS Service Event via CloudTrail",
        {
            "eventVersion": "1.05",
            "userIdentity": {"accountId": ACCOUNT, "invokedBy": "secretsmanager.amazonaws.com"},
            "eventTime": "2026-11-28T16:00:00Z",
            "eventSource": "secretsmanager.amazonaws.com",
            "eventName": "RotationSucceeded",
            "awsRegion": REGION,
            "sourceIPAddress": "secretsmanager.amazonaws.com",
            "userAgent": "secretsmanager.amazonaws.com",
            "requestParameters": None,
            "responseElements": None,
            "additionalEventData": {"SecretId": arn},
            "requestID": str(uuid.uuid4()),
            "eventID": str(uuid.uuid4()),
            "readOnly": False,
            "eventType": "AwsServiceEvent",
            "managementEvent": True,
            "recipientAccountId": ACCOUNT,
            "eventCategory": "Management",
        },
    )


def _sns(event: dict[str, Any]) -> dict[str, Any]:
    """SNS's envelope (raw message delivery off): the event is a JSON string in Message."""
    return {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": f"arn:aws:sns:{REGION}:{ACCOUNT}:secret-rotations",
        "Message": json.dumps(event),
        "Timestamp": "2026-11-28T16:00:01.000Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/cert.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }


@pytest.fixture
def sqs(moto: Moto) -> Any:
    return moto.client("sqs")


@pytest.fixture
def queue(sqs: Any) -> Iterator[str]:
    url: str = sqs.create_queue(
        QueueName=f"dvs-events-{uuid.uuid4().hex[:10]}",
        Attributes={"VisibilityTimeout": "30"},
    )["QueueUrl"]
    yield url
    sqs.delete_queue(QueueUrl=url)


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, profile: str, detail: str) -> None:
        with self._lock:
            self.calls.append((profile, detail))
        if self.fail:
            raise RuntimeError("the scheduler is gone")

    def profiles(self) -> set[str]:
        with self._lock:
            return {profile for profile, _ in self.calls}


def _send(sqs: Any, queue: str, body: dict[str, Any] | str) -> None:
    sqs.send_message(
        QueueUrl=queue, MessageBody=body if isinstance(body, str) else json.dumps(body)
    )


def _queue_is_empty(sqs: Any, queue: str) -> bool:
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    counts = (
        attributes["ApproximateNumberOfMessages"],
        attributes["ApproximateNumberOfMessagesNotVisible"],
    )
    return counts == ("0", "0")


def test_poll_once_wakes_exactly_the_matching_profiles_and_empties_the_queue(
    moto: Moto, sqs: Any, queue: str, aws_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    names = {p: f"dvs/{p}-{uuid.uuid4().hex[:6]}" for p in ("alpha", "beta", "gamma", "delta")}
    quiet = f"dvs/quiet-{uuid.uuid4().hex[:6]}"
    watch = {
        "alpha": [names["alpha"]],  # by name; the event names it by name too
        "beta": [_arn(names["beta"])],  # by ARN; the event names it by ARN too
        "gamma": [names["gamma"]],  # by name; the event names it by ARN only
        "delta": [_arn(names["delta"], suffix="XyZ987")],  # by ARN; the event by name only
        "quiet": [quiet],  # nothing happens to it
    }
    marker = "MALFORMED-BODY-MARKER"
    bodies: list[dict[str, Any] | str] = [
        _put_secret_value(names["alpha"], _arn(names["alpha"])),
        _update_secret_version_stage(_arn(names["beta"]), names["beta"]),
        _rotation_succeeded(_arn(names["gamma"])),
        _sns(_api_call("UpdateSecret", {"secretId": names["delta"]}, None)),
        _put_secret_value("dvs/unrelated", _arn("dvs/unrelated")),
        _api_call("GetSecretValue", {"secretId": quiet}, None),  # a read: no rotation
        _api_call(  # a failed call: nothing changed
            "PutSecretValue", {"secretId": quiet}, None, errorCode="AccessDenied"
        ),
        f"{{not json {marker}",
    ]
    recorder = Recorder()
    listener = SqsRotationListener(
        queue_url=queue,
        region=moto.region,
        endpoint_url=moto.endpoint_url,
        watch=watch,
        on_rotation=recorder,
        wait_seconds=1,
    )
    for body in bodies:
        _send(sqs, queue, body)
    matched = 0
    for _ in range(5):
        matched += listener.poll_once()
        if _queue_is_empty(sqs, queue):
            break
    listener.stop()
    assert matched == 4
    assert sorted(p for p, _ in recorder.calls) == ["alpha", "beta", "delta", "gamma"]
    details = dict(recorder.calls)
    assert details["alpha"] == f"PutSecretValue of {names['alpha']}"
    assert details["beta"].startswith("UpdateSecretVersionStage of arn:aws:secretsmanager:")
    assert details["gamma"] == f"RotationSucceeded of {_arn(names['gamma'])}"
    assert details["delta"] == f"UpdateSecret of {names['delta']}"
    assert _queue_is_empty(sqs, queue)
    assert sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0).get("Messages") is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("malformed message" in r.getMessage() for r in warnings)
    assert marker not in caplog.text


def test_start_stop_and_a_failing_callback_does_not_stop_the_loop(
    moto: Moto, sqs: Any, queue: str, aws_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"dvs/live-{uuid.uuid4().hex[:6]}"
    recorder = Recorder(fail=True)
    listener = SqsRotationListener(
        queue_url=queue,
        region=None,  # from AWS_DEFAULT_REGION
        endpoint_url=None,  # a queue URL that is not AWS's is its own endpoint
        watch={"live": [name]},
        on_rotation=recorder,
        wait_seconds=1,
    )
    listener.start()
    try:
        _send(sqs, queue, _rotation_succeeded(_arn(name)))
        assert wait_for(lambda: len(recorder.calls) == 1, timeout=20)
        _send(sqs, queue, _put_secret_value(name, _arn(name)))
        assert wait_for(lambda: len(recorder.calls) == 2, timeout=20)
    finally:
        started = time.monotonic()
        listener.stop(timeout=5)
        stopped_in = time.monotonic() - started
    assert stopped_in < 3
    assert recorder.profiles() == {"live"}
    assert wait_for(lambda: _queue_is_empty(sqs, queue), timeout=5)
    failures = [r for r in caplog.records if "handling the rotation event" in r.getMessage()]
    assert len(failures) == 2 and all(r.levelno == logging.ERROR for r in failures)
    # after stop() nothing is handled any more
    _send(sqs, queue, _put_secret_value(name, _arn(name)))
    time.sleep(1.5)
    assert len(recorder.calls) == 2


def test_a_failing_poll_is_logged_and_retried_and_stop_interrupts_the_backoff(
    moto: Moto, aws_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    missing = f"{moto.endpoint_url}/{ACCOUNT}/no-such-queue-{uuid.uuid4().hex[:6]}"
    listener = SqsRotationListener(
        queue_url=missing,
        region=moto.region,
        endpoint_url=moto.endpoint_url,
        watch={"dvs": ["dvs/osigu"]},
        on_rotation=Recorder(),
        wait_seconds=1,
    )
    listener.start()
    assert wait_for(lambda: "cannot read rotation events" in caplog.text, timeout=15)
    started = time.monotonic()
    listener.stop(timeout=5)
    assert time.monotonic() - started < 2
    record = next(r for r in caplog.records if "cannot read rotation events" in r.getMessage())
    assert record.levelno == logging.WARNING
    assert "profiles.dvs.aws.events_queue_url" in record.getMessage()
    assert "retrying in 1 s" in record.getMessage()


# --- pure functions: event parsing and secret matching ---------------------------------------


@pytest.mark.parametrize(
    ("configured", "named", "expected"),
    [
        ("dvs/osigu", "dvs/osigu", True),
        ("dvs/osigu", _arn("dvs/osigu"), True),
        (_arn("dvs/osigu"), "dvs/osigu", True),
        (_arn("dvs/osigu"), _arn("dvs/osigu"), True),
        (_arn("dvs/osigu", suffix="AAAAAA"), _arn("dvs/osigu", suffix="BBBBBB"), True),
        (f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:dvs/osigu", _arn("dvs/osigu"), True),
        ("dvs/osigu", "dvs/osigu-token", False),
        ("dvs/osigu", _arn("dvs/osigu-token"), False),
        ("db", _arn("db-master"), False),  # only the 6-character suffix is stripped
        (_arn("dvs/osigu", region="eu-west-1"), _arn("dvs/osigu"), False),
        (_arn("dvs/osigu", account="210987654321"), _arn("dvs/osigu"), False),
    ],
)
def test_secret_matching(configured: str, named: str, expected: bool) -> None:
    assert SecretRef.parse(configured).matches(SecretRef.parse(named)) is expected
    assert SecretRef.parse(named).matches(SecretRef.parse(configured)) is expected


def test_parse_message_shapes() -> None:
    arn = _arn("dvs/osigu")
    event = parse_message(json.dumps(_update_secret_version_stage(arn, "dvs/osigu")))
    assert event is not None and event.name == "UpdateSecretVersionStage"
    assert event.secrets == (arn, "dvs/osigu")
    # before February 2024 some events spelt the key "aRN"
    legacy = parse_message(json.dumps(_api_call("UpdateSecret", None, {"aRN": arn})))
    assert legacy is not None and legacy.secrets == (arn,)
    wrapped = parse_message(json.dumps(_sns(_rotation_succeeded(arn))))
    assert wrapped is not None and wrapped.name == "RotationSucceeded" and wrapped.secrets == (arn,)
    other_source = _put_secret_value("x", _arn("x")) | {"source": "aws.ssm"}
    assert parse_message(json.dumps(other_source)) is None
    # RotationSucceeded as an API-call detail-type is not a rotation event
    mislabelled = _api_call("RotationSucceeded", None, None)
    assert parse_message(json.dumps(mislabelled)) is None
    for body in ("[]", '{"Type": "Notification", "Message": "nope"}', '{"detail": {}}', None):
        with pytest.raises(MalformedMessage):
            parse_message(body)


def test_region_of_queue_url() -> None:
    assert region_of_queue("https://sqs.eu-west-1.amazonaws.com/123456789012/q") == "eu-west-1"
    assert region_of_queue("https://us-west-2.queue.amazonaws.com/123456789012/q") == "us-west-2"
    assert region_of_queue("http://127.0.0.1:5000/123456789012/q") is None
