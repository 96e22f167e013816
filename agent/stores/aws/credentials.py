"""The AWS credentials a client signs with: its own, or an assumed role's sessions
(``role_arn``, DESIGN §12), and their secret parts to mask (:func:`held_credentials`).

:class:`RoleCredentials` is botocore's ``DeferredRefreshableCredentials`` (the shape of
botocore's own ``AssumeRoleProvider``) whose refresh calls ``sts:AssumeRole``
(:class:`RoleSession`) with the agent's own credentials as the base; see
:mod:`agent.stores.aws.client` for the margins and the clocks.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import botocore.exceptions as bx
from botocore.credentials import CredentialProvider, DeferredRefreshableCredentials

from agent.clock import Clock, utc_now
from agent.masking import outside
from agent.sources.aws import AssumedRole
from agent.stores.aws.errors import (
    DENIED_CODES,
    REJECTED_CREDENTIAL_CODES,
    RoleUnavailable,
    _error_field,
    describe_location,
    error_code,
)

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
