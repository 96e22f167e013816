"""AWS Secrets Manager rotation events, from EventBridge through an SQS queue (DESIGN §5).

An EventBridge rule sends Secrets Manager's CloudTrail events to a queue (directly, or through
an SNS topic); this listener long-polls the queue and wakes every profile whose secret an event
names. Every message is deleted once handled, those that name none of our secrets and the
malformed ones too: a queue is this host's alone, and a message left behind would come back
forever. Polling the source's version stays on as the backstop, so a lost event costs at most
one poll interval.

Texts from SQS and from the messages (error codes and messages, botocore's exception strings,
message ids, the secrets an event names) reach a log line or a rotation's reason only through
:func:`agent.masking.outside`, with the AWS credentials the client holds masked (DESIGN §10). A
message body, which the agent parses itself, is refused above
:data:`~agent.models.MAX_ANSWER_BYTES`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions as bx

from agent.masking import outside
from agent.models import MAX_ANSWER_BYTES
from agent.retry import Backoff
from agent.sources.aws import AssumedRole
from agent.stores.aws.client import guard_botocore_logs, make_client
from agent.stores.aws.credentials import held_credentials
from agent.stores.aws.errors import describe_location

#: the events that mean "the secret's value (or which version is current) changed", by detail-type
ROTATION_EVENTS: Mapping[str, frozenset[str]] = {
    "AWS API Call via CloudTrail": frozenset(
        {"PutSecretValue", "UpdateSecret", "UpdateSecretVersionStage"}
    ),
    "AWS Service Event via CloudTrail": frozenset({"RotationSucceeded"}),
}
EVENT_SOURCE = "aws.secretsmanager"
#: seconds: the first wait after a failed poll, and the longest (it doubles in between)
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0

#: the random suffix Secrets Manager appends to a secret's name in its ARN
_ARN_SUFFIX_RE = re.compile(r"-[A-Za-z0-9]{6}$")
_QUEUE_HOST_RES = (
    re.compile(r"^sqs\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$"),
    re.compile(r"^([a-z0-9-]+)\.queue\.amazonaws\.com(?:\.cn)?$"),
)


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A secret as a config or an event names it: a name, or a (full or partial) ARN."""

    text: str
    #: ``arn:PARTITION:secretsmanager:REGION:ACCOUNT`` for an ARN, else None
    scope: str | None
    #: the names it may stand for: a name itself; for an ARN its tail with and without the suffix
    names: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        head, sep, tail = text.partition(":secret:")
        if text.startswith("arn:") and sep and tail:
            names = {tail}
            stripped = _ARN_SUFFIX_RE.sub("", tail)
            if stripped:
                names.add(stripped)
            return cls(text=text, scope=head, names=frozenset(names))
        return cls(text=text, scope=None, names=frozenset({text}))

    def matches(self, other: SecretRef) -> bool:
        """Exact text; else, unless both are ARNs of different regions or accounts, a common
        name (``arn:…:secret:NAME-AbCdEf`` stands for ``NAME``; a partial ARN for its tail)."""
        if self.text == other.text:
            return True
        if self.scope is not None and other.scope is not None and self.scope != other.scope:
            return False
        return not self.names.isdisjoint(other.names)


class MalformedMessage(ValueError):
    """A message body that is not an EventBridge event (the reason never quotes the body)."""


@dataclass(frozen=True, slots=True)
class RotationEvent:
    """What a message says: which operation, on which secrets (as the event names them)."""

    #: ``detail.eventName``
    name: str
    secrets: tuple[str, ...]
    #: the EventBridge event's id, for logs
    event_id: str | None = None


def parse_message(body: object) -> RotationEvent | None:
    """The rotation event in an SQS message body, None for any other event.

    The body is an EventBridge event, or an SNS notification whose ``Message`` is one. Raises
    :class:`MalformedMessage` for a body that is neither.
    """
    doc = _json_object(body, "the body")
    if doc.get("Type") == "Notification" and "Message" in doc:
        doc = _json_object(doc["Message"], "the SNS notification's Message")
    detail_type = doc.get("detail-type")
    detail = doc.get("detail")
    if not isinstance(detail_type, str) or not isinstance(detail, dict):
        raise MalformedMessage("not an EventBridge event (no detail-type and detail object)")
    source = doc.get("source")
    if source is not None and source != EVENT_SOURCE:
        return None
    name = detail.get("eventName")
    if not isinstance(name, str) or name not in ROTATION_EVENTS.get(detail_type, ()):
        return None
    if detail.get("errorCode"):  # CloudTrail records failed calls too: nothing changed
        return None
    event_id = doc.get("id")
    return RotationEvent(
        name=name,
        secrets=_secrets_named(detail),
        event_id=event_id if isinstance(event_id, str) else None,
    )


def _json_object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, str):
        raise MalformedMessage(f"{what} is not a string")
    if len(value) > MAX_ANSWER_BYTES // 4 and len(value.encode("utf-8", "replace")) > (
        MAX_ANSWER_BYTES
    ):
        raise MalformedMessage(f"{what} is larger than {MAX_ANSWER_BYTES // 1024} KiB")
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):
        raise MalformedMessage(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise MalformedMessage(f"{what} is JSON but not an object")
    return doc


def _secrets_named(detail: Mapping[str, Any]) -> tuple[str, ...]:
    """Every secret id or ARN the event names, in requestParameters, responseElements (``arn``,
    ``aRN`` before 2024, ``name``) and additionalEventData."""
    found: list[str] = []
    for section, keys in (
        ("requestParameters", ("secretid",)),
        ("responseElements", ("arn", "name")),
        ("additionalEventData", ("secretid",)),
    ):
        part = detail.get(section)
        if not isinstance(part, dict):
            continue
        for key, value in part.items():
            if key.lower() in keys and isinstance(value, str) and value and value not in found:
                found.append(value)
    return tuple(found)


class SqsRotationListener:
    """Long-polls one SQS queue for Secrets Manager rotation events.

    ``watch`` maps each profile to the secret ids (names or ARNs) it reads; ``on_rotation``
    is called with ``(profile, detail)`` once per poll for every profile that an event of that
    poll names. A failing ``on_rotation`` is logged and does not stop anything. ``role``: the
    queue is read as that assumed role (its sessions renewed as the source's are).
    """

    def __init__(
        self,
        *,
        queue_url: str,
        region: str | None,
        endpoint_url: str | None,
        watch: Mapping[str, Sequence[str]],
        on_rotation: Callable[[str, str], None],
        wait_seconds: int = 20,
        client: Any | None = None,
        role: AssumedRole | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not 0 <= wait_seconds <= 20:
            raise ValueError("wait_seconds must be between 0 and 20 (SQS long polling)")
        self._queue_url = queue_url
        self._watch = {
            profile: [SecretRef.parse(secret) for secret in secrets]
            for profile, secrets in watch.items()
        }
        self._on_rotation = on_rotation
        self._wait = wait_seconds
        self._log = logger or logging.getLogger("agent.triggers.sqs")
        self._owns_client = client is None
        if client is None:
            client = make_client(
                "sqs",
                region=region or region_of_queue(queue_url),
                endpoint_url=endpoint_url or _endpoint_of_queue(queue_url),
                # a long poll holds the connection for wait_seconds before it answers
                timeout=float(wait_seconds + 10),
                profile=next(iter(watch), "NAME"),
                role=role,
            )
        else:
            guard_botocore_logs()
        self._client = client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> int:
        """One long poll: handle and delete every message received; how many matched a profile."""
        return self._handle(self._receive())

    def start(self) -> None:
        """Poll in a daemon thread until :meth:`stop`; failures are logged, then retried later."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="sqs-rotation-events", daemon=True
        )
        self._thread.start()
        self._log.info(
            "listening for rotation events on %s (profiles: %s)",
            self._queue_url,
            ", ".join(self._watch) or "none",
            extra={"event": "events_listening"},
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop; waits up to ``timeout`` s for a long poll in flight to end.

        Messages received after the stop was asked are left in the queue (they come back after
        the queue's visibility timeout, for the next run).
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._log.debug(
                    "the SQS long poll on %s is still in flight; it ends on its own",
                    self._queue_url,
                )
                return
        if self._owns_client:
            self._client.close()
            self._owns_client = False

    def _run(self, stop: threading.Event) -> None:
        backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX, jitter=0.25)
        rng = random.Random()  # noqa: S311 - jitter
        failures = 0
        while not stop.is_set():
            try:
                messages = self._receive()
                if stop.is_set():
                    break
                self._handle(messages)
            except Exception as exc:
                delay = backoff.delay(failures, rng)
                failures += 1
                self._log.warning(
                    "cannot read rotation events from %s: %s; retrying in %.0f s",
                    self._queue_url,
                    self._describe(exc),
                    delay,
                    extra={"event": "events_error", "retry_in": delay},
                )
                if stop.wait(delay):
                    break
            else:
                failures = 0

    def _receive(self) -> list[dict[str, Any]]:
        response = self._client.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=self._wait,
        )
        messages = response.get("Messages") or []
        return [m for m in messages if isinstance(m, dict)]

    def _handle(self, messages: list[dict[str, Any]]) -> int:
        matched = 0
        details: dict[str, list[str]] = {}
        for message in messages:
            profiles = self._match(message)
            if profiles:
                matched += 1
            for profile, detail in profiles.items():
                if detail not in details.setdefault(profile, []):
                    details[profile].append(detail)
        for profile, found in details.items():
            detail = "; ".join(found)
            self._log.debug(
                "rotation event for profile %s: %s",
                profile,
                detail,
                extra={"profile": profile, "event": "rotation_event", "reason": "sqs"},
            )
            try:
                self._on_rotation(profile, detail)
            except Exception:
                self._log.error(
                    "handling the rotation event for profile %s failed",
                    profile,
                    exc_info=True,
                    extra={"profile": profile, "event": "rotation_event_failed"},
                )
        self._delete(messages)
        return matched

    def _match(self, message: Mapping[str, Any]) -> dict[str, str]:
        """profile → detail, for every watched profile that the message's event names."""
        message_id = outside(message.get("MessageId", "?"), self._held(), limit=80)
        try:
            event = parse_message(message.get("Body"))
        except MalformedMessage as exc:
            self._log.warning(
                "deleting a malformed message %s from %s: %s",
                message_id,
                self._queue_url,
                exc,
                extra={"event": "events_malformed"},
            )
            return {}
        if event is None:
            self._log.debug("message %s is not a rotation event; deleting it", message_id)
            return {}
        refs = [SecretRef.parse(secret) for secret in event.secrets]
        hits: dict[str, str] = {}
        for profile, watched in self._watch.items():
            for ref in refs:
                if any(ref.matches(mine) for mine in watched):
                    hits[profile] = f"{event.name} of {outside(ref.text, self._held())}"
                    break
        if not hits:
            self._log.debug(
                "%s event (message %s) names none of the watched secrets (%s); deleting it",
                event.name,
                message_id,
                outside(", ".join(event.secrets), self._held()) or "no secret named",
            )
        return hits

    def _delete(self, messages: list[dict[str, Any]]) -> None:
        entries = [
            {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
            for index, message in enumerate(messages)
            if isinstance(message.get("ReceiptHandle"), str)
        ]
        if not entries:
            return
        response = self._client.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)
        for failure in response.get("Failed") or []:
            if not isinstance(failure, dict):
                continue
            self._log.warning(
                "could not delete a message from %s (%s: %s); it will come back",
                self._queue_url,
                outside(failure.get("Code", "?"), self._held(), limit=80),
                outside(failure.get("Message", ""), self._held()),
            )

    def _describe(self, exc: BaseException) -> str:
        """A failed receive or delete, with what to check next."""
        profiles = ", ".join(f"profiles.{p}.aws.events_queue_url" for p in self._watch)
        where = describe_location(self._client)
        held = self._held()
        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
            error = error if isinstance(error, dict) else {}
            code = str(error.get("Code", "") or "Unknown")
            said = outside(f"{code}: {error.get('Message', '') or ''}".rstrip(": "), held)
            if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
                return f"no such queue in {where} ({said}): check {profiles}"
            if "AccessDenied" in code or "KMS" in code:
                return (
                    f"{said}: the agent's IAM identity needs sqs:ReceiveMessage and "
                    "sqs:DeleteMessage on the queue (and kms:Decrypt for an SSE-KMS queue)"
                )
            return f"{said} (in {where})"
        if isinstance(exc, bx.NoCredentialsError):
            return (
                "no AWS credentials found: attach an instance profile (IAM role), set the AWS_* "
                "variables, or configure ~/.aws"
            )
        if isinstance(exc, bx.BotoCoreError):
            return f"{outside(exc, held)} (in {where})"
        return f"{type(exc).__name__}: {outside(exc, held)}"

    def _held(self) -> tuple[str, ...]:
        """The AWS credentials the client signs with, never to be shown."""
        return held_credentials(self._client)


def region_of_queue(queue_url: str) -> str | None:
    """The region in an AWS queue URL (``https://sqs.REGION.amazonaws.com/ACCOUNT/NAME``)."""
    host = (urlsplit(queue_url).hostname or "").lower()
    for pattern in _QUEUE_HOST_RES:
        found = pattern.match(host)
        if found:
            return found.group(1)
    return None


def _endpoint_of_queue(queue_url: str) -> str | None:
    """A queue URL that is not AWS's (a test server) is also the endpoint to send requests to."""
    parts = urlsplit(queue_url)
    host = (parts.hostname or "").lower()
    if not parts.scheme or not host or ".amazonaws.com" in host:
        return None
    return f"{parts.scheme}://{parts.netloc}"
