"""The ``aws`` sink: the token document written back to a Secrets Manager secret (DESIGN §4, §11).

``region``, ``endpoint_url`` and the role keys (``role_arn``, ``role_session_name``,
``external_id``, DESIGN §12) default to the profile's ``[aws]`` table (:func:`merged`);
``role_arn = ""`` writes with the agent's own AWS credentials whatever the table says. The
writer, which imports boto3, is :mod:`agent.stores.aws.sink`, imported by :meth:`AwsSinkKind.build`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec

from agent.keypath import header, key_path, toml_repr
from agent.plugin import BuildContext, SinkKind, Target, Where
from agent.sources.aws import (
    AWS_REGION_RE,
    AssumedRole,
    AwsSourceConfig,
    as_role,
    default_session_name,
    endpoint_problem,
    role_problems,
    secret_id_problem,
    secret_target,
)

if TYPE_CHECKING:
    from agent.stores.aws.sink import AwsSink


class AwsSinkConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="aws",
    tag_field="type",
):
    """``[[profiles.NAME.sinks]]`` with ``type = "aws"``: ``PutSecretValue`` (DESIGN §4)."""

    #: the secret's name or ARN (required)
    secret_id: str
    #: None: the ``[aws]`` table's, else boto3's default chain
    region: str | None = None
    #: None: the ``[aws]`` table's, else AWS's own endpoint
    endpoint_url: str | None = None
    #: create the secret (``CreateSecret``, by name) when it does not exist yet
    create: bool = False
    #: None: the ``[aws]`` table's, else none (the agent's own AWS credentials write); "": none
    #: whatever the table says
    role_arn: str | None = None
    #: None: the ``[aws]`` table's, else ``dvs-agent-<profile>``
    role_session_name: str | None = None
    #: None: the ``[aws]`` table's, else none
    external_id: str | None = None


def merged(sink: AwsSinkConfig, table: msgspec.Struct | None) -> AwsSinkConfig:
    """The sink with ``region``, ``endpoint_url`` and the role keys taken from the profile's
    ``[aws]`` table where it sets none; ``role_arn = ""`` leaves all three role keys unset."""
    base = table if isinstance(table, AwsSourceConfig) else AwsSourceConfig()
    if sink.role_arn == "":
        role: tuple[str | None, str | None, str | None] = (None, None, None)
    else:
        role = (
            sink.role_arn if sink.role_arn is not None else base.role_arn,
            _either(sink.role_session_name, base.role_session_name),
            _either(sink.external_id, base.external_id),
        )
    return msgspec.structs.replace(
        sink,
        region=_either(sink.region, base.region),
        endpoint_url=_either(sink.endpoint_url, base.endpoint_url),
        role_arn=role[0],
        role_session_name=role[1],
        external_id=role[2],
    )


def _either(own: str | None, default: str | None) -> str | None:
    return own if own is not None else default


def sink_role(sink: AwsSinkConfig, where: Where) -> AssumedRole | None:
    """The role the sink at ``where`` writes as (None: the agent's own credentials); each key
    path named in messages is where the value was set (the sink entry, else ``[aws]``)."""
    aws = merged(sink, where.table("aws"))
    if not aws.role_arn:
        return None

    def key(field: str, in_sink: bool) -> str:
        return where.at(field) if in_sink else key_path(["profiles", where.profile, "aws", field])

    arn_in_sink = sink.role_arn is not None
    # external_id: where it was set; when set nowhere, beside the role_arn that applies
    id_in_sink = sink.external_id is not None or (aws.external_id is None and arn_in_sink)
    return AssumedRole(
        arn=aws.role_arn,
        session_name=aws.role_session_name or default_session_name(where.profile),
        external_id=aws.external_id,
        key=key("role_arn", arn_in_sink),
        external_id_key=key("external_id", id_in_sink),
    )


class AwsSinkKind(SinkKind[AwsSinkConfig]):
    name = "aws"
    config_type = AwsSinkConfig

    def check(self, config: AwsSinkConfig, where: Where) -> Iterator[str]:
        sink = config
        table = header(["profiles", where.profile, "aws"])
        problem = secret_id_problem(sink.secret_id)
        if problem:
            yield f"{where.at('secret_id')}: {problem}"
        elif sink.create and sink.secret_id.startswith("arn:"):
            yield (
                f"{where.at('create')}: a secret is created by name, and an ARN is known only "
                "once it exists: give secret_id as the secret's name, or leave create out"
            )
        if sink.region is not None and not AWS_REGION_RE.fullmatch(sink.region):
            yield (
                f"{where.at('region')}: invalid region {toml_repr(sink.region)}, e.g. "
                f'"us-east-1" (leave the key out to use the region of {table}, else boto3\'s '
                "default chain)"
            )
        if sink.endpoint_url is not None:
            problem = endpoint_problem(sink.endpoint_url, exposed="the token")
            if problem:
                yield f"{where.at('endpoint_url')}: {problem}"
        base = where.table("aws")
        yield from role_problems(
            where,
            sink.role_arn,
            sink.role_session_name,
            sink.external_id,
            role_from=base.role_arn if isinstance(base, AwsSourceConfig) else None,
        )

    def describe(self, config: AwsSinkConfig, where: Where) -> str:
        created = " (created if missing)" if config.create else ""
        return f"aws {config.secret_id}{created}" + as_role(
            merged(config, where.table("aws")).role_arn
        )

    def targets(self, config: AwsSinkConfig, where: Where) -> Iterator[Target]:
        aws = merged(config, where.table("aws"))
        target = secret_target(where.at("secret_id"), aws.secret_id, aws.region, aws.endpoint_url)
        if target is not None:
            yield target

    def build(self, config: AwsSinkConfig, context: BuildContext) -> AwsSink:
        from agent.stores.aws.sink import AwsSink

        return AwsSink(
            merged(config, context.where.table("aws")),
            timeout=context.timeout,
            profile=context.where.profile,
            config_key=context.where.key,
            role=sink_role(config, context.where),
            logger=context.logger,
        )


KIND = AwsSinkKind()
