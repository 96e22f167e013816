"""The AWS Secrets Manager credential source, and the boto3 client factory the AWS modules share.

``version()`` is the cheap level (``DescribeSecret``: which version id carries the stage);
``read()`` fetches the value (``GetSecretValue``). The value is never cached here: the chain
reads only when the version changed, and a re-read after a 401 must reach the store.

AWS's texts (a ``ClientError``'s code and message, botocore's exception strings, the stage
labels and key names of a secret) reach a message or a log line only through
:func:`agent.masking.outside`: the AWS credentials the client holds (:func:`held_credentials`)
and the credential patterns masked, cut to 200 characters, control characters escaped (DESIGN
§10). The ``SecretString``, which the agent parses itself, is refused above
:data:`~agent.models.MAX_ANSWER_BYTES`.

boto3 and botocore are imported only by the modules that use AWS, so a profile without AWS
never loads them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from agent import __version__
from agent.errors import AgentError, ConfigError, SourceEmpty, SourceUnavailable
from agent.masking import outside
from agent.models import MAX_ANSWER_BYTES, Credentials, Secret

#: what ``profiles.NAME`` says in a message when the caller did not name the profile
UNNAMED_PROFILE = "NAME"

#: ClientError codes meaning "these AWS credentials are not accepted" (not a missing permission)
REJECTED_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "UnrecognizedClient",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)
DENIED_CODES = frozenset({"AccessDeniedException", "AccessDenied"})
#: how many key names of the secret's JSON object a message lists at most
_MAX_KEYS_SHOWN = 20


@dataclass(frozen=True, slots=True)
class AwsSourceSettings:
    """What the ``aws`` source reads (``[profiles.NAME.aws]``)."""

    #: the secret's name or ARN
    secret_id: str
    #: None: the default boto3 chain (``$AWS_REGION``, ``$AWS_DEFAULT_REGION``, the config file)
    region: str | None = None
    #: a VPC endpoint or a test server
    endpoint_url: str | None = None
    #: the staging label of the version read
    version_stage: str = "AWSCURRENT"
    #: the keys of the JSON object in ``SecretString``
    client_id_key: str = "client_id"
    client_secret_key: str = "client_secret"  # noqa: S105 - a key name
    #: seconds, for connecting and for each read
    timeout: float = 10.0
    #: the profile's name, for the config keys that messages point at
    profile: str = UNNAMED_PROFILE


def make_client(
    service: str,
    *,
    region: str | None,
    endpoint_url: str | None,
    timeout: float,
    profile: str = UNNAMED_PROFILE,
) -> Any:
    """A boto3 client on the default credential chain (instance profile on VMs).

    botocore retries once (``total_max_attempts=2``, standard mode) and no more: the agent's
    scheduler owns the longer timescale. A region that neither the config nor boto3's chain
    gives is a :class:`ConfigError`, raised here (at start) rather than at the first request.
    """
    guard_botocore_logs()
    session = boto3.session.Session()
    resolved = region or session.region_name
    if not resolved:
        raise ConfigError(
            f"no AWS region for {service}: set profiles.{profile}.aws.region, or AWS_REGION / "
            "AWS_DEFAULT_REGION in the agent's environment, or region in ~/.aws/config"
        )
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"mode": "standard", "total_max_attempts": 2},
        user_agent_extra=f"dvs-agent/{__version__}",
    )
    return session.client(
        service, region_name=resolved, endpoint_url=endpoint_url or None, config=config
    )


def held_credentials(client: Any) -> tuple[str, ...]:
    """The secret parts (secret access key, session token) of the AWS credentials a boto3
    client signs with, to mask them in AWS's texts; () when it has none yet.

    Read from the signer's credentials object without calling its properties (which may
    refresh them over the network); anything unexpected gives ().
    """
    try:
        credentials = client._request_signer._credentials  # botocore's own
        fields = vars(credentials)
    except (AttributeError, TypeError):
        return ()
    values = [fields.get(name) for name in ("secret_key", "token", "_secret_key", "_token")]
    frozen = fields.get("_frozen_credentials")
    values += [getattr(frozen, "secret_key", None), getattr(frozen, "token", None)]
    return tuple({value for value in values if isinstance(value, str) and value})


def describe_location(client: Any) -> str:
    """``us-east-1``, or ``us-east-1 via http://127.0.0.1:5000`` when an endpoint is set."""
    region = getattr(client.meta, "region_name", None) or "?"
    endpoint = getattr(client.meta, "endpoint_url", None)
    if endpoint and "amazonaws.com" not in endpoint:
        return f"{region} via {endpoint}"
    return str(region)


class AwsSource:
    """Reads the client id and secret from a Secrets Manager secret's ``SecretString``.

    The ``SecretString`` is a JSON object holding the two keys; the version is ``aws:`` followed
    by the id of the version that carries ``version_stage``.
    """

    name = "aws"

    def __init__(
        self,
        settings: AwsSourceSettings,
        *,
        client: Any | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._settings = settings
        self._log = logger or logging.getLogger("agent.sources.aws")
        self._owns_client = client is None
        if client is None:
            client = make_client(
                "secretsmanager",
                region=settings.region,
                endpoint_url=settings.endpoint_url,
                timeout=settings.timeout,
                profile=settings.profile,
            )
        else:
            guard_botocore_logs()
        self._client = client
        self._where = describe_location(client)

    def read(self) -> Credentials:
        s = self._settings
        try:
            response = self._client.get_secret_value(
                SecretId=s.secret_id, VersionStage=s.version_stage
            )
        except Exception as exc:
            raise self._read_error(exc) from exc
        version_id = response.get("VersionId")
        if not isinstance(version_id, str) or not version_id:
            raise SourceUnavailable(
                f"GetSecretValue for secret {s.secret_id} in {self._where} returned no VersionId"
            )
        client_id, secret = self._parse(response)
        self._log.debug(
            "read secret %s (stage %s, version %s) in %s",
            s.secret_id,
            s.version_stage,
            outside(version_id, (client_id, secret, *held_credentials(self._client))),
            self._where,
            extra={"source": self.name},
        )
        return Credentials(
            client_id=client_id,
            client_secret=Secret(secret),
            source=self.name,
            version=f"aws:{version_id}",
        )

    def can_change(self) -> bool:
        return True

    def version(self) -> str:
        """``DescribeSecret`` only: the id of the version carrying ``version_stage``."""
        s = self._settings
        try:
            response = self._client.describe_secret(SecretId=s.secret_id)
        except Exception as exc:
            raise self._map(exc, "DescribeSecret") from exc
        if response.get("DeletedDate") is not None:
            raise self._deleted()
        version_id = _version_with_stage(response, s.version_stage)
        if version_id is None:
            raise self._no_stage(response)
        return f"aws:{version_id}"

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _map(self, exc: BaseException, operation: str) -> AgentError:
        s = self._settings
        return map_error(
            exc,
            secret_id=s.secret_id,
            where=self._where,
            profile=s.profile,
            operation=operation,
            secrets=held_credentials(self._client),
        )

    def _read_error(self, exc: BaseException) -> AgentError:
        """GetSecretValue's NotFound is either "no such secret" or "no version has the stage"."""
        if _error_code(exc) != "ResourceNotFoundException":
            return self._map(exc, "GetSecretValue")
        try:
            described = self._client.describe_secret(SecretId=self._settings.secret_id)
        except Exception:
            return self._map(exc, "GetSecretValue")
        if described.get("DeletedDate") is not None:
            return self._deleted()
        if _version_with_stage(described, self._settings.version_stage) is not None:
            return SourceUnavailable(  # the stage moved between the two calls: try again
                f"GetSecretValue found no version of secret {self._settings.secret_id} in "
                f"{self._where} with the stage {self._settings.version_stage}, which "
                "DescribeSecret lists: the stage moved meanwhile, the next attempt will tell"
            )
        return self._no_stage(described)

    def _deleted(self) -> SourceEmpty:
        s = self._settings
        return SourceEmpty(
            f"secret {s.secret_id} in {self._where} is scheduled for deletion: restore it "
            f"(RestoreSecret) or check profiles.{s.profile}.aws.secret_id"
        )

    def _no_stage(self, described: Any) -> SourceEmpty:
        s = self._settings
        stages = sorted(
            {
                str(label)
                for labels in (described.get("VersionIdsToStages") or {}).values()
                for label in labels
            }
        )
        present = (
            outside(", ".join(stages), held_credentials(self._client))
            if stages
            else "none: the secret has no value yet"
        )
        return SourceEmpty(
            f"no version of secret {s.secret_id} in {self._where} carries the stage "
            f"{s.version_stage} (stages present: {present}): put a value in the secret or check "
            f"profiles.{s.profile}.aws.version_stage"
        )

    def _parse(self, response: Any) -> tuple[str, str]:
        s = self._settings
        shape = (
            f"the SecretString must be a JSON object with the keys "
            f'"{s.client_id_key}" and "{s.client_secret_key}"'
        )
        where = f"secret {s.secret_id} in {self._where}"
        text = response.get("SecretString")
        if text is None:
            held = "SecretBinary" if response.get("SecretBinary") is not None else "no value"
            raise SourceEmpty(f"{where} holds {held}, not a SecretString: {shape}")
        if not isinstance(text, str):
            raise SourceUnavailable(
                f"GetSecretValue for {where} returned a SecretString that is not a string"
            )
        if (
            len(text) > MAX_ANSWER_BYTES // 4
            and len(text.encode("utf-8", "replace")) > MAX_ANSWER_BYTES
        ):
            raise SourceUnavailable(
                f"the SecretString of {where} is larger than {MAX_ANSWER_BYTES // 1024} KiB: "
                f"refused unread (Secrets Manager holds at most 64 KiB; is "
                f"profiles.{s.profile}.aws.endpoint_url a Secrets Manager endpoint?)"
            )
        try:
            doc = json.loads(text)
        except ValueError as exc:
            # only the position: the decoder's message never quotes the text, ours neither
            position = ""
            if isinstance(exc, json.JSONDecodeError):
                position = f" ({exc.msg} at line {exc.lineno} column {exc.colno})"
            raise SourceEmpty(
                f"the SecretString of {where} is not JSON{position}: {shape}"
            ) from None
        if not isinstance(doc, dict):
            raise SourceEmpty(
                f"the SecretString of {where} is a JSON {_json_type(doc)}, not an object: {shape}"
            )
        return (
            _string_key(doc, s.client_id_key, where, f"profiles.{s.profile}.aws.client_id_key"),
            _string_key(
                doc, s.client_secret_key, where, f"profiles.{s.profile}.aws.client_secret_key"
            ),
        )


def map_error(
    exc: BaseException,
    *,
    secret_id: str,
    where: str,
    profile: str = UNNAMED_PROFILE,
    operation: str = "GetSecretValue",
    secrets: Iterable[str] = (),
) -> AgentError:
    """The agent's error for a boto3/botocore failure on a Secrets Manager secret.

    Messages name the secret and the region (and endpoint), and what to check; they quote AWS's
    own error message and botocore's text through :func:`outside`, with ``secrets`` (the AWS
    credentials held, see :func:`held_credentials`) and the credential patterns masked.
    """
    secrets = tuple(secrets)
    what = f"secret {secret_id} in {where}"

    def shown(text: object) -> str:
        return outside(text, secrets)

    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
        error = error if isinstance(error, dict) else {}
        code = str(error.get("Code", "") or "Unknown")
        message = str(error.get("Message", "") or "").strip()
        said = shown(f"{code}: {message}" if message else code)
        if code == "ResourceNotFoundException":
            return SourceEmpty(
                f"no secret {secret_id} in {where}: check profiles.{profile}.aws.secret_id/region"
            )
        if code in DENIED_CODES:
            return SourceUnavailable(
                f"AWS denied {operation} on {what} ({said}): the agent's IAM identity needs "
                "secretsmanager:GetSecretValue and secretsmanager:DescribeSecret on the secret's "
                "ARN, and kms:Decrypt on its KMS key if it is a customer managed key"
            )
        if code in REJECTED_CREDENTIAL_CODES:
            return SourceUnavailable(
                f"AWS rejected the agent's credentials calling {operation} on {what} ({said}): "
                "check the instance profile or the AWS_* variables (an expired session token? a "
                "wrong clock?); the identity needs secretsmanager:GetSecretValue and "
                "secretsmanager:DescribeSecret on the secret's ARN"
            )
        if code == "DecryptionFailure":
            return SourceUnavailable(
                f"AWS could not decrypt {what} ({said}): the agent's IAM identity needs "
                "kms:Decrypt on the secret's KMS key (key policy and IAM policy)"
            )
        if code in ("InvalidRequestException", "InvalidParameterException"):
            return SourceEmpty(
                f"AWS refused {operation} on {what} ({said}): check the secret's state and "
                f"profiles.{profile}.aws.secret_id/version_stage"
            )
        return SourceUnavailable(f"{operation} on {what} failed ({said})")
    if isinstance(exc, bx.NoCredentialsError):
        return SourceUnavailable(
            f"no AWS credentials found for {what}: attach an instance profile (IAM role), set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or configure ~/.aws"
        )
    if isinstance(exc, bx.PartialCredentialsError | bx.CredentialRetrievalError):
        return SourceUnavailable(f"cannot get AWS credentials for {what}: {shown(exc)}")
    if isinstance(exc, bx.NoRegionError):
        return ConfigError(
            f"no AWS region for {what}: set profiles.{profile}.aws.region, or AWS_REGION / "
            "AWS_DEFAULT_REGION"
        )
    if isinstance(exc, bx.ParamValidationError):
        return ConfigError(
            f"invalid request for {what}: {shown(exc)}: check profiles.{profile}.aws.secret_id/"
            "version_stage"
        )
    if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return SourceUnavailable(
            f"Secrets Manager timed out for {what} ({operation}): {shown(exc)}"
        )
    if isinstance(exc, bx.EndpointConnectionError | bx.HTTPClientError | bx.ConnectionError):
        return SourceUnavailable(
            f"cannot reach Secrets Manager for {what} ({shown(exc)}): check the network, the "
            f"region and profiles.{profile}.aws.endpoint_url"
        )
    if isinstance(exc, bx.BotoCoreError):
        return SourceUnavailable(f"{operation} on {what} failed: {shown(exc)}")
    return SourceUnavailable(f"{operation} on {what} failed: {type(exc).__name__}: {shown(exc)}")


def _error_code(exc: BaseException) -> str | None:
    if isinstance(exc, bx.ClientError) and isinstance(exc.response, dict):
        error = exc.response.get("Error")
        code = error.get("Code") if isinstance(error, dict) else None
        return str(code) if code is not None else None
    return None


def _version_with_stage(described: Any, stage: str) -> str | None:
    for version_id, labels in (described.get("VersionIdsToStages") or {}).items():
        if stage in labels:
            return str(version_id)
    return None


def _string_key(doc: dict[str, Any], key: str, where: str, config_key: str) -> str:
    names = sorted(str(name) for name in doc)
    # key names come from the store: shown masked (a value pasted as a key), cut and escaped
    held = [value for value in doc.values() if isinstance(value, str)]
    listed = ", ".join(f'"{n}"' for n in names[:_MAX_KEYS_SHOWN])
    shown = outside(listed, held) if listed else "none"
    if len(names) > _MAX_KEYS_SHOWN:
        shown += f", … ({len(names)} keys)"
    if key not in doc:
        raise SourceEmpty(
            f'the SecretString of {where} has no key "{key}" (keys present: {shown}): '
            f"check {config_key}"
        )
    value = doc[key]
    if not isinstance(value, str):
        raise SourceEmpty(
            f'the key "{key}" of the SecretString of {where} is a JSON {_json_type(value)}, '
            "not a string"
        )
    if not value:
        raise SourceEmpty(f'the key "{key}" of the SecretString of {where} is empty')
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class _Withheld:
    """Stands in for a request or response body in botocore's debug lines."""

    __slots__ = ("_size",)

    def __init__(self, body: object) -> None:
        self._size = len(body) if isinstance(body, bytes | str) else None

    def __repr__(self) -> str:
        size = f"{self._size} bytes, " if self._size is not None else ""
        return f"<body: {size}withheld by dvs-agent>"

    __str__ = __repr__


class _WithholdBodies(logging.Filter):
    """Keeps HTTP bodies out of botocore's debug lines: a ``GetSecretValue`` answer holds the
    client secret and a ``PutSecretValue`` request a token. Headers, URLs and operation names
    still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        args = record.args if isinstance(record.args, tuple) else ()
        if record.name == "botocore.parsers" and msg.startswith("Response body") and args:
            # ("Response body:\n%r", body)
            record.args = (_Withheld(args[0]), *args[1:])
        elif (
            record.name == "botocore.endpoint"
            and msg.startswith("Making request")
            and len(args) >= 2
            and isinstance(args[1], dict)
        ):
            # ("Making request for %s with params: %s", operation_model, request_dict)
            params = dict(args[1])
            if "body" in params:
                params["body"] = _Withheld(params["body"])
            record.args = (args[0], params, *args[2:])
        return True


def guard_botocore_logs() -> None:
    """Install :class:`_WithholdBodies` on botocore's loggers (once; idempotent).

    A logger-level filter runs before any handler, pytest's caplog and the agent's own alike.
    """
    for name in ("botocore.parsers", "botocore.endpoint"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithholdBodies) for f in logger.filters):
            logger.addFilter(_WithholdBodies())
