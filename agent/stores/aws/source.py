"""The ``aws`` source's reader: a Secrets Manager secret's ``SecretString`` (DESIGN §3, §5).

``version()`` is the cheap level (``DescribeSecret``: which version id carries the stage);
``read()`` fetches the value (``GetSecretValue``). The value is never cached here: the chain
reads only when the version changed, and a re-read after a 401 must reach the store. The
``SecretString``, which the agent parses itself, is refused above
:data:`~agent.models.MAX_ANSWER_BYTES`; AWS's texts are masked (:mod:`agent.stores.aws.client`).
With ``role_arn`` the client signs as the assumed role (DESIGN §12, :func:`make_client`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from agent.clock import Clock
from agent.errors import AgentError, ConfigError, SourceEmpty, SourceUnavailable
from agent.masking import outside
from agent.models import MAX_ANSWER_BYTES, Credentials, Secret
from agent.sources.aws import AssumedRole, AwsSourceConfig
from agent.stores.aws.client import close_client, guard_botocore_logs, make_client
from agent.stores.aws.credentials import held_credentials
from agent.stores.aws.errors import UNNAMED_PROFILE, describe_location, error_code, map_error

#: how many key names of the secret's JSON object a message lists at most
_MAX_KEYS_SHOWN = 20


class AwsSource:
    """Reads the client id and secret from a Secrets Manager secret's ``SecretString``.

    The ``SecretString`` is a JSON object holding the two keys; the version is ``aws:`` followed
    by the id of the version that carries ``version_stage``.
    """

    name = "aws"

    def __init__(
        self,
        settings: AwsSourceConfig,
        *,
        timeout: float = 10.0,
        profile: str = UNNAMED_PROFILE,
        role: AssumedRole | None = None,
        client: Any | None = None,
        clock: Clock | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        """``role``: the role to read as (the kind's build() makes it from ``role_arn``);
        ``client``: a client to use instead (the caller's: not closed here); ``clock``: the
        time line of the role's sessions."""
        if settings.secret_id is None:
            raise ConfigError(f"profiles.{profile}.aws.secret_id: required: name the secret")
        self._settings = settings
        self._role = role
        self._secret_id: str = settings.secret_id
        self._profile = profile
        #: the source's table, named in messages
        self._key = f"profiles.{profile}.aws"
        self._log = logger or logging.getLogger("agent.sources.aws")
        self._owns_client = client is None
        if client is None:
            client = make_client(
                "secretsmanager",
                region=settings.region,
                endpoint_url=settings.endpoint_url,
                timeout=timeout,
                profile=profile,
                role=role,
                clock=clock,
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
            close_client(self._client)

    def _map(self, exc: BaseException, operation: str) -> AgentError:
        return map_error(
            exc,
            secret_id=self._secret_id,
            where=self._where,
            profile=self._profile,
            operation=operation,
            secrets=held_credentials(self._client),
            role=self._role,
        )

    def _read_error(self, exc: BaseException) -> AgentError:
        """GetSecretValue's NotFound is either "no such secret" or "no version has the stage"."""
        if error_code(exc) != "ResourceNotFoundException":
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
            f"(RestoreSecret) or check {self._key}.secret_id"
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
            f"{self._key}.version_stage"
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
                f"{self._key}.endpoint_url a Secrets Manager endpoint?)"
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
            _string_key(doc, s.client_id_key, where, f"{self._key}.client_id_key"),
            _string_key(doc, s.client_secret_key, where, f"{self._key}.client_secret_key"),
        )


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
