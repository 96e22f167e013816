"""AWS's errors said as agent errors: a ``ClientError``'s code and message, botocore's
exceptions, mapped to :class:`~agent.errors.AgentError` naming the secret, the region and what
to check. AWS's texts reach a message only through :func:`agent.masking.outside` with the
credentials held masked (DESIGN §10).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import botocore.exceptions as bx

from agent.errors import AgentError, ConfigError, SourceEmpty, SourceUnavailable
from agent.masking import outside
from agent.sources.aws import AssumedRole

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


class RoleUnavailable(Exception):
    """sts:AssumeRole failed; the message names the role, its key path and what to do, with
    AWS's texts masked (it is safe to show)."""


def map_error(
    exc: BaseException,
    *,
    secret_id: str,
    where: str,
    profile: str = UNNAMED_PROFILE,
    operation: str = "GetSecretValue",
    secrets: Iterable[str] = (),
    role: AssumedRole | None = None,
) -> AgentError:
    """The agent's error for a boto3/botocore failure on a Secrets Manager secret.

    Messages name the secret and the region (and endpoint), and what to check; they quote AWS's
    own error message and botocore's text through :func:`outside`, with ``secrets`` (the AWS
    credentials held, see :func:`held_credentials`) and the credential patterns masked.
    ``role``: the role the client signs as, named as the identity that lacks a permission.
    """
    secrets = tuple(secrets)
    what = f"secret {secret_id} in {where}"

    def shown(text: object) -> str:
        return outside(text, secrets)

    identity = "the agent's IAM identity"
    if role is not None:
        identity = f"the role {role.arn} ({role.key})"
    if isinstance(exc, RoleUnavailable):
        return SourceUnavailable(f"{operation} on {what}: {exc}")
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
                f"AWS denied {operation} on {what} ({said}): {identity} needs "
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
                f"AWS could not decrypt {what} ({said}): {identity} needs "
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
    """A ``ClientError``'s code (None for anything else)."""
    if isinstance(exc, bx.ClientError):
        code = _error_field(exc, "Code")
        return str(code) if code is not None else None
    return None


def error_message(exc: BaseException) -> str:
    """A ``ClientError``'s message, stripped ("" for anything else); unmasked: show it only
    through :func:`outside`."""
    if isinstance(exc, bx.ClientError):
        return str(_error_field(exc, "Message") or "").strip()
    return ""


def _error_field(exc: bx.ClientError, name: str) -> object:
    response = exc.response if isinstance(exc.response, dict) else {}
    error = response.get("Error")
    return error.get(name) if isinstance(error, dict) else None


def describe_location(client: Any) -> str:
    """``us-east-1``, or ``us-east-1 via http://127.0.0.1:5000`` when an endpoint is set."""
    region = getattr(client.meta, "region_name", None) or "?"
    endpoint = getattr(client.meta, "endpoint_url", None)
    if endpoint and "amazonaws.com" not in endpoint:
        return f"{region} via {endpoint}"
    return str(region)
