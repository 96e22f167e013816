"""The aws sink: the token document written back to a Secrets Manager secret (DESIGN §4).

Other hosts read the same JSON document as the file sink's ``json`` format from the secret's
``SecretString``. The newest token wins (STYLE, Vault Agent): the current value is read first,
and a stored document whose ``expires_at`` is later than ours is left alone. Secrets Manager has
no check-and-set, so two agents writing at the same instant may still race; the loser's token is
the older one only if both read before either wrote, and the next refresh settles it.

botocore logs request and response bodies at DEBUG; the client comes from
:func:`agent.stores.aws.client.make_client`, which installs the filter that withholds them (the
``PutSecretValue`` request and the ``GetSecretValue`` answer both hold a token).

AWS's texts (a ``ClientError``'s message, botocore's exception strings) reach a message only
through :func:`agent.masking.outside`, with the token being written, the token read back and the
AWS credentials the client holds masked (DESIGN §10). The stored ``SecretString``, which the
agent parses itself, is read only up to :data:`~agent.models.MAX_ANSWER_BYTES`.

With ``role_arn`` (the sink's or the profile's ``[aws]`` table's) the client signs as the
assumed role (DESIGN §12, :func:`agent.stores.aws.client.make_client`).

This module imports boto3: the aws sink kind imports it in its build().
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import botocore.exceptions as bx
from botocore import xform_name

from agent.clock import Clock
from agent.errors import ConfigError, SinkError
from agent.masking import outside
from agent.models import MAX_ANSWER_BYTES, Token
from agent.sinks.aws import AwsSinkConfig
from agent.sinks.base import keep_stored
from agent.sources.aws import AssumedRole
from agent.stores.aws.client import close_client, guard_botocore_logs, make_client
from agent.stores.aws.credentials import held_credentials
from agent.stores.aws.errors import (
    DENIED_CODES,
    REJECTED_CREDENTIAL_CODES,
    UNNAMED_PROFILE,
    RoleUnavailable,
    describe_location,
    error_code,
    error_message,
)

#: how many times a write reads again after another writer created the secret meanwhile
_ATTEMPTS = 2


class AwsSink:
    """Puts each new token's document into a secret; a :class:`TokenSink`."""

    readiness = False

    def __init__(
        self,
        settings: AwsSinkConfig,
        *,
        timeout: float = 10.0,
        profile: str = UNNAMED_PROFILE,
        config_key: str = "sinks[0]",
        role: AssumedRole | None = None,
        client: Any | None = None,
        clock: Clock | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        """``settings`` with the profile's ``[aws]`` defaults applied (the kind's build()
        does that); ``config_key`` is the sink's key path, named in messages; ``role``: the
        role to write as; ``client``: a client to use instead (the caller's: not closed
        here); ``clock``: the time line of the role's sessions."""
        self._settings = settings
        self._role = role
        self._clock = clock
        self._timeout = timeout
        self._profile = profile
        self._key = config_key
        self._log = logger if logger is not None else logging.getLogger("agent.sinks.aws")
        self._owns_client = client is None
        self._client = client
        if client is not None:
            guard_botocore_logs()
        self.name = f"aws:{settings.secret_id}"

    def check(self) -> None:
        """Build the client (a missing region fails here, at start); no request is sent."""
        key = self._key
        if not self._settings.secret_id:
            raise SinkError(f"{key}.secret_id is empty: name the secret (or give its ARN)")
        self._ensure_client()

    def write(self, token: Token) -> None:
        """``PutSecretValue`` of ``token.document()`` unless a later-expiring one is stored.

        A missing secret is created when ``create`` is set. Raises :class:`SinkError` naming
        the secret, the region (and endpoint) and what to do.
        """
        client = self._ensure_client()
        document = token.document()
        text = json.dumps(document, separators=(",", ":"))
        # values AWS could echo in an error: the token we write and the one stored
        secrets = [token.access_token.reveal()]
        for _ in range(_ATTEMPTS):
            stored = self._read_current(client, secrets)
            if stored is not None and isinstance(stored.get("access_token"), str):
                secrets.append(stored["access_token"])
            if keep_stored(stored, document, sink=self.name, log=self._log):
                return
            if self._put(client, text, secrets) or self._create(client, text, secrets):
                break
            # created by someone else between our read and our CreateSecret: decide again
        else:
            raise SinkError(
                f"aws sink {self._key}: secret {self._settings.secret_id} in "
                f"{self._where()} kept changing while writing; the next attempt will try again"
            )
        self._log.debug(
            "wrote %s in %s (expires %s)", self.name, self._where(), document["expires_at"]
        )

    def settle(self, timeout: float | None = None) -> bool:
        return True  # nothing runs in the background

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            close_client(self._client)
            self._client = None

    # -- requests -------------------------------------------------------------------------------

    def _read_current(self, client: Any, secrets: Iterable[str]) -> dict[str, Any] | None:
        """The secret's current document; None when it has none (or does not exist)."""
        # NotFound: no secret, or a secret without a value yet: PutSecretValue tells which
        response = self._request(
            client,
            "GetSecretValue",
            secrets,
            unless="ResourceNotFoundException",
            SecretId=self._settings.secret_id,
        )
        if response is None:
            return None
        text = response.get("SecretString")
        if not isinstance(text, str):
            return None
        if (
            len(text) > MAX_ANSWER_BYTES // 4
            and len(text.encode("utf-8", "replace")) > MAX_ANSWER_BYTES
        ):
            # never a document of ours (they are small): not parsed, replaced
            self._log.debug(
                "%s holds more than %d KiB: not parsed, it will be replaced",
                self.name,
                MAX_ANSWER_BYTES // 1024,
            )
            return None
        try:
            stored = json.loads(text)
        except ValueError:
            self._log.debug("%s holds no JSON document: it will be replaced", self.name)
            return None
        return stored if isinstance(stored, dict) else None

    def _put(self, client: Any, text: str, secrets: Iterable[str]) -> bool:
        """True once written; False when the secret does not exist (create it)."""
        written = self._request(
            client,
            "PutSecretValue",
            secrets,
            unless="ResourceNotFoundException",
            SecretId=self._settings.secret_id,
            SecretString=text,
        )
        return written is not None

    def _create(self, client: Any, text: str, secrets: Iterable[str]) -> bool:
        """True once created; False when it was created meanwhile by someone else."""
        s = self._settings
        if not s.create:
            raise SinkError(
                f"aws sink {self._key}: secret {s.secret_id} in {self._where()} does not "
                f"exist; create it or set create = true ({self._key}.create)"
            )
        created = self._request(
            client,
            "CreateSecret",
            secrets,
            unless="ResourceExistsException",
            Name=s.secret_id,
            SecretString=text,
            Description="dvs-agent token document (written by dvs-agent)",
        )
        if created is None:
            return False
        self._log.info("created secret %s in %s", s.secret_id, self._where())
        return True

    def _request(
        self, client: Any, operation: str, secrets: Iterable[str], *, unless: str, **params: Any
    ) -> dict[str, Any] | None:
        """AWS's answer to ``operation``; None when AWS answers with the error code ``unless``
        (the one the caller handles); any other failure is the :class:`SinkError` of
        :meth:`_error`."""
        try:
            response = getattr(client, xform_name(operation))(**params)
        except Exception as exc:
            if error_code(exc) == unless:
                return None
            raise self._error(exc, operation, secrets) from None
        return response if isinstance(response, dict) else {}

    # -- helpers --------------------------------------------------------------------------------

    def _ensure_client(self) -> Any:
        if self._client is None:
            s = self._settings
            try:
                self._client = make_client(
                    "secretsmanager",
                    region=s.region,
                    endpoint_url=s.endpoint_url,
                    timeout=self._timeout,
                    profile=self._profile,
                    role=self._role,
                    clock=self._clock,
                )
            except ConfigError:
                raise SinkError(
                    f"aws sink {self._key}: no AWS region for secret {s.secret_id}: set "
                    f"{self._key}.region (or the profile's aws.region), or AWS_REGION / "
                    "AWS_DEFAULT_REGION in the agent's environment"
                ) from None
            except ValueError as exc:  # botocore: "Invalid endpoint: …"
                raise SinkError(
                    f"aws sink {self._key}: {outside(exc)}: check {self._key}.endpoint_url"
                ) from None
        return self._client

    def _where(self) -> str:
        return describe_location(self._client) if self._client is not None else "?"

    def _error(self, exc: BaseException, operation: str, secrets: Iterable[str] = ()) -> SinkError:
        """The SinkError for a boto3/botocore failure. AWS's texts go through :func:`outside`
        with ``secrets`` (tokens this write holds) and the AWS credentials held masked."""
        s = self._settings
        held = (*secrets, *held_credentials(self._client))

        def shown(text: object) -> str:
            return outside(text, held)

        prefix = f"aws sink {self._key}: "
        what = f"secret {s.secret_id} in {self._where()}"
        needs = "secretsmanager:GetSecretValue and secretsmanager:PutSecretValue" + (
            " and secretsmanager:CreateSecret" if s.create else ""
        )
        identity = "the agent's IAM identity"
        if self._role is not None:
            identity = f"the role {self._role.arn} ({self._role.key})"
        if isinstance(exc, RoleUnavailable):
            return SinkError(f"{prefix}{operation} on {what}: {exc}")
        if isinstance(exc, bx.ClientError):
            code = error_code(exc) or "Unknown"
            message = error_message(exc)
            said = shown(f"{code}: {message}" if message else code)
            if code in DENIED_CODES:
                return SinkError(
                    f"{prefix}AWS denied {operation} on {what} ({said}): {identity} needs "
                    f"{needs} on the secret's ARN, and kms:GenerateDataKey and kms:Decrypt on "
                    "its KMS key if it is a customer managed key"
                )
            if code in REJECTED_CREDENTIAL_CODES:
                return SinkError(
                    f"{prefix}AWS rejected the agent's credentials calling {operation} on "
                    f"{what} ({said}): check the instance profile or the AWS_* variables"
                )
            if code == "InvalidRequestException":
                return SinkError(
                    f"{prefix}AWS refused {operation} on {what} ({said}): is the secret "
                    "scheduled for deletion? restore it (RestoreSecret) or choose another "
                    f"{self._key}.secret_id"
                )
            return SinkError(f"{prefix}{operation} on {what} failed ({said})")
        if isinstance(exc, bx.NoCredentialsError):
            return SinkError(
                f"{prefix}no AWS credentials found for {what}: attach an instance profile (IAM "
                "role), set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
                "configure ~/.aws"
            )
        if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError):
            return SinkError(f"{prefix}Secrets Manager timed out for {what} ({operation})")
        if isinstance(exc, bx.EndpointConnectionError | bx.HTTPClientError | bx.ConnectionError):
            return SinkError(
                f"{prefix}cannot reach Secrets Manager for {what} ({operation}): check the "
                f"network, the region and {self._key}.endpoint_url"
            )
        if isinstance(exc, bx.ParamValidationError):
            # its text may quote a parameter's value: keep only the lines about SecretId
            lines = [line for line in str(exc).splitlines()[1:] if "SecretString" not in line]
            detail = f": {shown(' '.join(lines))}" if lines else ""
            return SinkError(
                f"{prefix}invalid {operation} request for {what}{detail}: check "
                f"{self._key}.secret_id"
            )
        if isinstance(exc, bx.BotoCoreError):
            return SinkError(f"{prefix}{operation} on {what} failed: {shown(exc)}")
        return SinkError(f"{prefix}{operation} on {what} failed: {type(exc).__name__}")
