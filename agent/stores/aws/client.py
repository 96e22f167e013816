"""The boto3 client the AWS modules share, and AWS's errors said as agent errors.

AWS's texts (a ``ClientError``'s code and message, botocore's exception strings) reach a message
or a log line only through :func:`agent.masking.outside`: the AWS credentials the client holds
(:func:`held_credentials`) and the credential patterns masked, cut to 200 characters, control
characters escaped (DESIGN §10). botocore logs request and response bodies at DEBUG:
:func:`guard_botocore_logs` withholds them.

This package imports boto3: only the kinds that use AWS import it, in their ``build()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from agent import __version__
from agent.errors import AgentError, ConfigError, SourceEmpty, SourceUnavailable
from agent.masking import outside

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


def error_code(exc: BaseException) -> str | None:
    if isinstance(exc, bx.ClientError) and isinstance(exc.response, dict):
        error = exc.response.get("Error")
        code = error.get("Code") if isinstance(error, dict) else None
        return str(code) if code is not None else None
    return None


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
