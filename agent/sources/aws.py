"""The ``aws`` source: a Secrets Manager secret holding the client id and secret (DESIGN §3, §11).

``[profiles.NAME.aws]`` is this plug-in's table. The table is checked whenever it is present;
``secret_id`` is required only when ``"aws"`` is listed in ``sources`` (an aws write-back sink
takes its region and endpoint from the table). ``events_queue_url`` feeds the SQS rotation
trigger (:mod:`agent.triggers.sqs`). The reader itself, which imports boto3, is
:mod:`agent.stores.aws.source`, imported by :meth:`AwsKind.build`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgspec

from agent.config.checks import key_names_problems, normalised_url, url_problem
from agent.keypath import header, toml_repr
from agent.plugin import BuildContext, SourceKind, Target, Where

if TYPE_CHECKING:
    from agent.stores.aws.source import AwsSource

#: what botocore accepts as a region name (a host label: it becomes part of the endpoint's host)
AWS_REGION_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: an SQS queue URL's path: /ACCOUNT_ID/QUEUE_NAME
_SQS_QUEUE_PATH_RE = re.compile(r"/[^/]+/[^/]+/?")
#: a Secrets Manager ARN; a full one ends in the name, '-' and 6 random characters
SECRET_ARN_RE = re.compile(
    r"arn:(?P<partition>[^:]+):secretsmanager:(?P<region>[^:]*):(?P<account>[^:]*)"
    r":secret:(?P<name>[^:]+)"
)


class AwsSourceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME.aws]``: the ``aws`` source, a Secrets Manager secret.

    The secret's ``SecretString`` is a JSON object with the two keys. ``secret_id`` is required
    when ``"aws"`` is in the profile's ``sources``.
    """

    #: the secret's name or ARN
    secret_id: str | None = None
    #: None: boto3's default chain (``$AWS_REGION``, ``$AWS_DEFAULT_REGION``, ``~/.aws/config``)
    region: str | None = None
    #: a VPC endpoint or a test server; absolute http(s), plain http only for loopback hosts
    endpoint_url: str | None = None
    #: the staging label of the version read
    version_stage: str = "AWSCURRENT"
    #: the keys of the secret's JSON object that hold the client id and the client secret
    client_id_key: str = "client_id"
    client_secret_key: str = "client_secret"  # noqa: S105 - a key name
    #: an SQS queue receiving EventBridge's Secrets Manager events (DESIGN §5); https, or http
    #: for loopback hosts; only with ``"aws"`` in ``sources``
    events_queue_url: str | None = None


class AwsKind(SourceKind[AwsSourceConfig]):
    name = "aws"
    config_type = AwsSourceConfig

    def check_table(self, config: AwsSourceConfig | None, where: Where) -> Iterator[str]:
        if where.listed and (config is None or config.secret_id is None):
            add = f"add a {header(where.segments)} table with " if config is None else "e.g. "
            yield (
                f'{where.at("secret_id")}: required when "aws" is in sources: {add}secret_id = '
                '"dvs/osigu" (the secret\'s name or ARN)'
            )
        if config is not None:
            yield from self.check(config, where)

    def check(self, config: AwsSourceConfig, where: Where) -> Iterator[str]:
        aws = config
        if aws.secret_id is not None:
            problem = secret_id_problem(aws.secret_id)
            if problem:
                yield f"{where.at('secret_id')}: {problem}"
        if aws.region is not None and not AWS_REGION_RE.fullmatch(aws.region):
            yield (
                f'{where.at("region")}: invalid region {toml_repr(aws.region)}, e.g. "us-east-1" '
                "(leave the key out to use boto3's default chain)"
            )
        if aws.endpoint_url is not None:
            problem = endpoint_problem(aws.endpoint_url, exposed="the client secret")
            if problem:
                yield f"{where.at('endpoint_url')}: {problem}"
        if not aws.version_stage:
            yield f'{where.at("version_stage")}: must not be empty (the default is "AWSCURRENT")'
        yield from key_names_problems(where.key, aws.client_id_key, aws.client_secret_key)
        if aws.events_queue_url is not None:
            yield from _check_events_queue_url(
                where.at("events_queue_url"), aws.events_queue_url, where.listed
            )

    def describe(self, config: AwsSourceConfig, where: Where) -> str:
        region = config.region or "default region"
        return f"aws secret {config.secret_id} ({config.version_stage}, {region})"

    def targets(self, config: AwsSourceConfig, where: Where) -> Iterator[Target]:
        if config.secret_id is not None:
            target = secret_target(
                where.at("secret_id"), config.secret_id, config.region, config.endpoint_url
            )
            if target is not None:
                yield target

    def build(self, config: AwsSourceConfig | None, context: BuildContext) -> AwsSource:
        from agent.stores.aws.source import AwsSource

        assert config is not None and config.secret_id is not None  # check_table says so
        return AwsSource(
            config, timeout=context.timeout, profile=context.where.profile, logger=context.logger
        )


KIND = AwsKind()


def secret_id_problem(secret_id: str) -> str | None:
    """What is wrong with a secret's name or ARN."""
    if not secret_id:
        return "must not be empty"
    if secret_id.startswith("arn:") and ":secretsmanager:" not in secret_id:
        return (
            f"{toml_repr(secret_id)} is not a Secrets Manager ARN "
            "(arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME); or give the secret's name"
        )
    return None


def endpoint_problem(url: str, *, exposed: str) -> str | None:
    """What is wrong with an ``endpoint_url`` (``exposed``: what would cross in clear)."""
    return url_problem(
        url, example='"https://secretsmanager.us-east-1.amazonaws.com"', exposed=exposed
    )


def _check_events_queue_url(where: str, url: str, listed: bool) -> Iterator[str]:
    example = '"https://sqs.us-east-1.amazonaws.com/123456789012/dvs-agent-host1"'
    if not listed:
        yield (
            f'{where}: rotation events are read only for the aws source: add "aws" to sources, '
            "or leave the key out"
        )
    problem = url_problem(url, example=example, exposed="the rotation events")
    if problem is None and not _SQS_QUEUE_PATH_RE.fullmatch(urlsplit(url).path):
        problem = (
            f"{toml_repr(url)} is not an SQS queue URL (/ACCOUNT_ID/QUEUE_NAME), e.g. {example}"
        )
    if problem:
        yield f"{where}: {problem}"


def secret_target(
    key: str, secret_id: str, region: str | None, endpoint_url: str | None
) -> Target | None:
    """The secret a source reads or a sink writes (None when ``secret_id`` is invalid)."""
    if secret_id_problem(secret_id):
        return None
    endpoint = "" if endpoint_url is None else normalised_url(endpoint_url)
    return Target(
        store="aws",
        identity=(secret_id, region or "", endpoint),
        what=f"the secret {toml_repr(secret_id)}",
        key=key,
        noun="secret",
        same=same_secret,
    )


def same_secret(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two ``(secret_id, region, endpoint)`` name one secret, as far as one can tell.

    A name and an ARN ending in ``:secret:NAME`` or ``:secret:NAME-XXXXXX`` are one secret;
    two regions (given or in an ARN) or two endpoints that both are known and differ are not.
    """
    a_id, a_region, a_endpoint = a
    b_id, b_region, b_endpoint = b
    a_arn = SECRET_ARN_RE.fullmatch(a_id)
    b_arn = SECRET_ARN_RE.fullmatch(b_id)
    if a_arn is not None:
        a_region = a_arn["region"] or a_region
    if b_arn is not None:
        b_region = b_arn["region"] or b_region
    if a_region and b_region and a_region != b_region:
        return False
    if a_endpoint and b_endpoint and a_endpoint != b_endpoint:
        return False
    if a_arn is not None and b_arn is not None:
        if (a_arn["partition"], a_arn["account"]) != (b_arn["partition"], b_arn["account"]):
            return False
        return _arn_names(a_arn["name"], b_arn["name"]) or _arn_names(b_arn["name"], a_arn["name"])
    if a_arn is not None:
        return _arn_names(a_arn["name"], b_id)
    if b_arn is not None:
        return _arn_names(b_arn["name"], a_id)
    return a_id == b_id


def _arn_names(arn_name: str, name: str) -> bool:
    """Whether an ARN's last part (``NAME`` or ``NAME-XXXXXX``) is the secret ``name``."""
    return (
        arn_name == name
        or re.fullmatch(rf"{re.escape(name)}-[A-Za-z0-9]{{6}}", arn_name) is not None
    )
