"""The ``aws`` sink: the token document written back to a Secrets Manager secret (DESIGN §4, §11).

``region`` and ``endpoint_url`` default to the profile's ``[aws]`` table (:func:`merged`). The
writer, which imports boto3, is :mod:`agent.stores.aws.sink`, imported by :meth:`AwsSinkKind.build`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec

from agent.keypath import header, toml_repr
from agent.plugin import BuildContext, SinkKind, Target, Where
from agent.sources.aws import (
    AWS_REGION_RE,
    AwsSourceConfig,
    endpoint_problem,
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


def merged(sink: AwsSinkConfig, table: msgspec.Struct | None) -> AwsSinkConfig:
    """The sink with ``region`` and ``endpoint_url`` taken from the profile's ``[aws]`` table
    where it sets none."""
    base = table if isinstance(table, AwsSourceConfig) else AwsSourceConfig()
    return msgspec.structs.replace(
        sink,
        region=sink.region if sink.region is not None else base.region,
        endpoint_url=sink.endpoint_url if sink.endpoint_url is not None else base.endpoint_url,
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

    def describe(self, config: AwsSinkConfig, where: Where) -> str:
        return f"aws {config.secret_id}" + (" (created if missing)" if config.create else "")

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
            logger=context.logger,
        )


KIND = AwsSinkKind()
