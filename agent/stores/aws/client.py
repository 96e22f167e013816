"""The boto3 client the AWS modules share; AWS's errors as agent errors are in
:mod:`agent.stores.aws.errors`, the credentials it signs with (an assumed role's sessions) in
:mod:`agent.stores.aws.credentials`.

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
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import (
    CredentialResolver,
)

from agent import __version__
from agent.clock import Clock, ElapsedClock
from agent.errors import ConfigError
from agent.masking import MASK
from agent.sources.aws import AssumedRole
from agent.stores.aws.credentials import RoleCredentials, RoleSession, _Given, _signer_credentials
from agent.stores.aws.errors import UNNAMED_PROFILE


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
