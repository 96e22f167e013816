"""The boto3 client the AWS modules share, and AWS's errors said as agent errors.

AWS's texts (a ``ClientError``'s code and message, botocore's exception strings) reach a message
or a log line only through :func:`agent.masking.outside`: the AWS credentials the client holds
(:func:`held_credentials`) and the credential patterns masked, cut to 200 characters, control
characters escaped (DESIGN §10). botocore logs request and response bodies, and the signed
headers, at DEBUG: :func:`guard_botocore_logs` withholds the bodies and masks the session tokens
and access key ids.

An assumed role (``role_arn``, DESIGN §12): :func:`make_client` gives a client that signs with
:class:`RoleCredentials`, botocore's ``DeferredRefreshableCredentials`` (the shape of botocore's
own ``AssumeRoleProvider``) whose refresh calls ``sts:AssumeRole`` (:class:`RoleSession`) with
the agent's own credentials (boto3's default chain) as the base. The first request assumes the
role; a request made less than :data:`ROLE_RENEW_BEFORE` before the session ends renews it
(a failure then keeps the current session), and one made less than :data:`ROLE_RENEW_BY` before
must renew it (a failure is that request's error, :class:`RoleUnavailable`). Session times run
on the agent's real-elapsed clock (:class:`agent.clock.ElapsedClock`): the session's lifetime is
STS's ``Expiration`` minus the ``Date`` of STS's answer, so neither a wall-clock step nor a skew
between this host and AWS moves the renewal. STS is reached as botocore resolves it for the
region: ``sts.REGION.amazonaws.com``, or ``$AWS_ENDPOINT_URL_STS`` (an STS VPC endpoint, a test
server); never the secret's ``endpoint_url``, which names a Secrets Manager endpoint.

This package imports boto3: only the kinds that use AWS import it, in their ``build()``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Iterable
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
import botocore.exceptions as bx
import botocore.session
from botocore.config import Config
from botocore.credentials import (
    CredentialProvider,
    CredentialResolver,
    DeferredRefreshableCredentials,
)

from agent import __version__
from agent.clock import Clock, ElapsedClock, utc_now
from agent.errors import AgentError, ConfigError, SourceEmpty, SourceUnavailable
from agent.masking import MASK, outside
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

#: seconds: the session asked of sts:AssumeRole (its default; every role allows at least this)
ROLE_SESSION_SECONDS = 3600
#: seconds before a role session ends from which a request renews it; if STS fails then, the
#: current session is kept (botocore's advisory refresh, its AssumeRole provider's margin)
ROLE_RENEW_BEFORE = 15 * 60
#: seconds before a role session ends from which a request must renew it: if STS fails then,
#: the request fails (botocore's mandatory refresh)
ROLE_RENEW_BY = 10 * 60
#: how many sessions' credentials a role keeps to mask (an error may arrive mid-renewal)
_SESSIONS_MASKED = 2


def make_client(
    service: str,
    *,
    region: str | None,
    endpoint_url: str | None,
    timeout: float,
    profile: str = UNNAMED_PROFILE,
    role: AssumedRole | None = None,
    clock: Clock | None = None,
) -> Any:
    """A boto3 client on the default credential chain (instance profile on VMs), or, with
    ``role``, on that role's sessions assumed from it (see the module's docstring).

    botocore retries once (``total_max_attempts=2``, standard mode) and no more: the agent's
    scheduler owns the longer timescale. A region that neither the config nor boto3's chain
    gives is a :class:`ConfigError`, raised here (at start) rather than at the first request.
    No request is sent here: the role is assumed at the first one. ``clock``: the time line of
    the role's sessions (default: a new :class:`~agent.clock.ElapsedClock`). Close the client
    with :func:`close_client`.
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
    if role is not None:
        # the base: the same default chain; STS where botocore resolves it for the region
        sts = session.client("sts", region_name=resolved, config=config)
        credentials = RoleCredentials(RoleSession(sts, role, clock=clock or ElapsedClock()))
        core = botocore.session.Session()
        core.register_component("credential_provider", CredentialResolver([_Given(credentials)]))
        session = boto3.session.Session(botocore_session=core, region_name=resolved)
    return session.client(
        service, region_name=resolved, endpoint_url=endpoint_url or None, config=config
    )


def close_client(client: Any) -> None:
    """Close a client of :func:`make_client`, and its role's STS client if it has one."""
    session = role_session(client)
    client.close()
    if session is not None:
        session.close()


def role_session(client: Any) -> RoleSession | None:
    """The :class:`RoleSession` a client signs with; None when it signs as the agent itself."""
    credentials = _signer_credentials(client)
    return credentials.session if isinstance(credentials, RoleCredentials) else None


class RoleUnavailable(Exception):
    """sts:AssumeRole failed; the message names the role, its key path and what to do, with
    AWS's texts masked (it is safe to show)."""


class RoleSession:
    """Assumes one role through STS: the refresh function of :class:`RoleCredentials`.

    ``sts`` signs as the agent's own identity (the base). :meth:`fetch` returns the metadata
    botocore's refreshable credentials take, with ``expiry_time`` on ``clock``'s time line.
    """

    def __init__(self, sts: Any, role: AssumedRole, *, clock: Clock) -> None:
        self.sts = sts
        self.role = role
        self.clock = clock
        self._lock = threading.Lock()
        self._held: deque[tuple[str, ...]] = deque(maxlen=_SESSIONS_MASKED)
        self._log = logging.getLogger("agent.stores.aws.role")

    def fetch(self) -> dict[str, str]:
        """One ``sts:AssumeRole``; :class:`RoleUnavailable` when it fails."""
        role = self.role
        params: dict[str, Any] = {
            "RoleArn": role.arn,
            "RoleSessionName": role.session_name,
            "DurationSeconds": ROLE_SESSION_SECONDS,
        }
        if role.external_id:
            params["ExternalId"] = role.external_id
        started, wall = self.clock(), utc_now()
        failure: str | None = None
        try:
            response = self.sts.assume_role(**params)
        except Exception as exc:
            failure = self._explain(exc)
        if failure is not None:
            raise RoleUnavailable(failure)  # outside the except: no AWS text in a traceback
        found = response.get("Credentials") if isinstance(response, dict) else None
        found = found if isinstance(found, dict) else {}
        parts = [found.get(k) for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")]
        expiration = found.get("Expiration")
        if not all(isinstance(part, str) and part for part in parts) or not isinstance(
            expiration, datetime
        ):
            raise RoleUnavailable(
                f"sts:AssumeRole of {role.arn} ({role.key}) at {describe_location(self.sts)} "
                "answered without a complete set of credentials"
            )
        access_key, secret_key, token = (str(part) for part in parts)
        with self._lock:
            self._held.append((access_key, secret_key, token))
        lifetime = min(
            expiration - _issued(response, wall), timedelta(seconds=ROLE_SESSION_SECONDS)
        )
        if lifetime <= timedelta(0):
            raise RoleUnavailable(
                f"sts:AssumeRole of {role.arn} ({role.key}) gave a session that has already "
                "ended: the next attempt will try again"
            )
        expires = started + lifetime
        self._log.debug(
            "assumed role %s (session %s) until %s",
            role.arn,
            role.session_name,
            expires.isoformat(timespec="seconds"),
        )
        return {
            "access_key": access_key,
            "secret_key": secret_key,
            "token": token,
            "expiry_time": expires.isoformat(),
        }

    def held(self) -> tuple[str, ...]:
        """Every credential part to mask: the sessions' (access key id, secret access key,
        session token) and the secret parts of the base credentials."""
        with self._lock:
            sessions = [part for held in self._held for part in held]
        return (*sessions, *held_credentials(self.sts))

    def close(self) -> None:
        self.sts.close()

    def _explain(self, exc: BaseException) -> str:
        """What an sts:AssumeRole failure means and what to do; AWS's texts masked."""
        role = self.role
        where = describe_location(self.sts)
        of = f"{role.arn} ({role.key})"

        def shown(text: object) -> str:
            return outside(text, self.held())

        if isinstance(exc, bx.ClientError):
            code = error_code(exc) or "Unknown"
            message = str(_error_field(exc, "Message") or "").strip()
            said = shown(f"{code}: {message}" if message else code)
            if code in DENIED_CODES:
                if role.external_id:
                    external = (
                        f"; or the external id is wrong: {role.external_id_key} must be the "
                        "trust policy's sts:ExternalId"
                    )
                else:
                    external = (
                        "; if the trust policy asks for an external id (sts:ExternalId), set "
                        f"{role.external_id_key}"
                    )
                return (
                    f"AWS denied sts:AssumeRole of the role {of} ({said}): the role's trust "
                    "policy must allow the agent's own AWS identity (the principal AWS names) to "
                    "assume it, and that identity needs sts:AssumeRole on the role's ARN"
                    f"{external}"
                )
            if code in REJECTED_CREDENTIAL_CODES:
                return (
                    f"AWS rejected the agent's own credentials calling sts:AssumeRole of the "
                    f"role {of} ({said}): they are the base the role is assumed with: check the "
                    "instance profile or the AWS_* variables (an expired session token? a wrong "
                    "clock?)"
                )
            if code == "RegionDisabledException":
                return (
                    f"STS is not activated in {where} for the role {of} ({said}): activate the "
                    "region's STS endpoint in the account's IAM settings, or set the region"
                )
            if code in ("ValidationError", "MalformedPolicyDocument"):
                return (
                    f"STS refused sts:AssumeRole of the role {of} ({said}): check {role.key}, "
                    "role_session_name and external_id"
                )
            return f"sts:AssumeRole of the role {of} at {where} failed ({said})"
        if isinstance(exc, bx.NoCredentialsError):
            return (
                f"no AWS credentials to assume the role {of} with: the role is assumed with the "
                "agent's own credentials: attach an instance profile (IAM role), set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or configure ~/.aws"
            )
        if isinstance(exc, bx.PartialCredentialsError | bx.CredentialRetrievalError):
            return (
                f"cannot get the agent's own AWS credentials to assume the role {of}: {shown(exc)}"
            )
        if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError):
            return f"STS timed out at {where} assuming the role {of}"
        if isinstance(exc, bx.EndpointConnectionError | bx.HTTPClientError | bx.ConnectionError):
            return (
                f"cannot reach STS at {where} to assume the role {of} ({shown(exc)}): check the "
                "network and the region (AWS_ENDPOINT_URL_STS names an STS VPC endpoint)"
            )
        if isinstance(exc, bx.BotoCoreError):
            return f"sts:AssumeRole of the role {of} failed: {shown(exc)}"
        return f"sts:AssumeRole of the role {of} failed: {type(exc).__name__}: {shown(exc)}"


class RoleCredentials(DeferredRefreshableCredentials):  # type: ignore[misc]  # botocore: untyped
    """A role's sessions: the first use assumes the role, renewals follow the margins
    :data:`ROLE_RENEW_BEFORE` and :data:`ROLE_RENEW_BY` on the session's clock."""

    _advisory_refresh_timeout = ROLE_RENEW_BEFORE
    _mandatory_refresh_timeout = ROLE_RENEW_BY

    def __init__(self, session: RoleSession) -> None:
        super().__init__(
            refresh_using=session.fetch, method="assume-role", time_fetcher=session.clock
        )
        self.session = session


class _Given(CredentialProvider):  # type: ignore[misc]  # botocore: untyped
    """The only provider of a role client's botocore session: its :class:`RoleCredentials`."""

    METHOD = "assume-role"
    CANONICAL_NAME = "dvs-agent-assume-role"

    def __init__(self, credentials: RoleCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> RoleCredentials:
        return self._credentials


def _issued(response: Any, fallback: datetime) -> datetime:
    """When STS issued the session, on STS's clock (its answer's ``Date``); else ``fallback``."""
    metadata = response.get("ResponseMetadata") if isinstance(response, dict) else None
    headers = metadata.get("HTTPHeaders") if isinstance(metadata, dict) else None
    date = headers.get("date") if isinstance(headers, dict) else None
    try:
        issued = parsedate_to_datetime(date) if isinstance(date, str) else None
    except (TypeError, ValueError):
        issued = None
    if issued is None or issued.tzinfo is None:
        return fallback
    return issued


def _signer_credentials(client: Any) -> Any:
    try:
        return client._request_signer._credentials  # botocore's own
    except AttributeError:
        return None


def held_credentials(client: Any) -> tuple[str, ...]:
    """The secret parts (secret access key, session token) of the AWS credentials a boto3
    client signs with, to mask them in AWS's texts; () when it has none yet.

    Read from the signer's credentials object without calling its properties (which may
    refresh them over the network); anything unexpected gives (). A client on an assumed role
    also gives its sessions' access key ids and the base credentials' secret parts
    (:meth:`RoleSession.held`).
    """
    credentials = _signer_credentials(client)
    try:
        fields = vars(credentials)
    except TypeError:
        return ()
    values = [fields.get(name) for name in ("secret_key", "token", "_secret_key", "_token")]
    frozen = fields.get("_frozen_credentials")
    values += [getattr(frozen, "secret_key", None), getattr(frozen, "token", None)]
    if isinstance(credentials, RoleCredentials):
        values += credentials.session.held()
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


#: botocore's loggers whose lines may carry a session token or an access key id
_MASKED_LOGGERS = ("botocore.endpoint", "botocore.auth")


class _Withheld:
    """Stands in for a request or response body in botocore's debug lines."""

    __slots__ = ("_size",)

    def __init__(self, body: object) -> None:
        self._size = len(body) if isinstance(body, bytes | str) else None

    def __repr__(self) -> str:
        size = f"{self._size} bytes, " if self._size is not None else ""
        return f"<body: {size}withheld by dvs-agent>"

    __str__ = __repr__


#: a session token in botocore's debug lines: a header (``'X-Amz-Security-Token': b'…'``), a
#: canonical request's line (``x-amz-security-token:…``) or a presigned URL's query
_SESSION_TOKEN_RE = re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,}&]+")
#: an access key id in a signature's scope (``Credential=AKIA…/20240101/…``)
_CREDENTIAL_SCOPE_RE = re.compile(r"(?i)(credential=)[A-Z0-9]+(?=/|%2F)")


class _WithholdBodies(logging.Filter):
    """Keeps HTTP bodies out of botocore's debug lines: a ``GetSecretValue`` answer holds the
    client secret, a ``PutSecretValue`` request a token, an ``AssumeRole`` answer a role's
    credentials. Session tokens and access key ids in the headers and the signing lines
    (``botocore.endpoint``, ``botocore.auth``) are masked. Headers, URLs and operation names
    still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        self._withhold_bodies(record)
        if record.name in _MASKED_LOGGERS:
            message = record.getMessage()
            masked = _CREDENTIAL_SCOPE_RE.sub(
                rf"\g<1>{MASK}", _SESSION_TOKEN_RE.sub(rf"\g<1>{MASK}", message)
            )
            if masked != message:
                record.msg, record.args = masked, None
        return True

    @staticmethod
    def _withhold_bodies(record: logging.LogRecord) -> None:
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


def guard_botocore_logs() -> None:
    """Install :class:`_WithholdBodies` on botocore's loggers (once; idempotent).

    A logger-level filter runs before any handler, pytest's caplog and the agent's own alike.
    """
    for name in ("botocore.parsers", *_MASKED_LOGGERS):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithholdBodies) for f in logger.filters):
            logger.addFilter(_WithholdBodies())
