"""The ``aws`` source: a Secrets Manager secret holding the client id and secret (DESIGN §3, §11).

``[profiles.NAME.aws]`` is this plug-in's table. The table is checked whenever it is present;
``secret_id`` is required only when ``"aws"`` is listed in ``sources`` (an aws write-back sink
takes its region, endpoint and role from the table). ``events_queue_url`` feeds the SQS rotation
trigger (:mod:`agent.triggers.sqs`). The reader itself, which imports boto3, is
:mod:`agent.stores.aws.source`, imported by :meth:`AwsKind.build`.

``role_arn`` (DESIGN §12): the secret is read as an IAM role, assumed through STS
(``sts:AssumeRole``) with the agent's own AWS credentials (boto3's default chain) as the base;
the session is renewed before it expires (:mod:`agent.stores.aws.client`). The target identity
stays the secret: the same secret read or written through two roles is one secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
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
#: an IAM role's ARN: arn:PARTITION:iam::ACCOUNT_ID:role/[PATH/]NAME (aws, aws-cn, aws-us-gov…)
ROLE_ARN_RE = re.compile(
    r"arn:(?P<partition>aws(?:-[a-z]+)*):iam::(?P<account>[0-9]{12}):role/"
    r"(?P<path>(?:[!-.0-~]+/){0,64})(?P<name>[\w+=,.@-]{1,64})",
    re.ASCII,
)
#: what STS accepts as a RoleSessionName and as an ExternalId
ROLE_SESSION_NAME_RE = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)
EXTERNAL_ID_RE = re.compile(r"[\w+=,.@:/-]{2,1224}", re.ASCII)
_NOT_IN_SESSION_NAME_RE = re.compile(r"[^\w+=,.@-]", re.ASCII)
_ROLE_EXAMPLE = '"arn:aws:iam::123456789012:role/dvs-agent-reader"'


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
    #: an IAM role to read the secret as (``sts:AssumeRole``, with the agent's own AWS
    #: credentials as the base); None: the agent's own credentials read it
    role_arn: str | None = None
    #: the role session's name (CloudTrail shows it); None: ``dvs-agent-<profile>``
    #: (:func:`default_session_name`); only with ``role_arn``
    role_session_name: str | None = None
    #: the ``sts:ExternalId`` the role's trust policy asks for; only with ``role_arn``
    external_id: str | None = None
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
        if aws.role_arn == "":
            yield (
                f"{where.at('role_arn')}: must not be empty: give the role's ARN, e.g. "
                f"{_ROLE_EXAMPLE}, or leave the key out to use the agent's own AWS credentials"
            )
        yield from role_problems(where, aws.role_arn, aws.role_session_name, aws.external_id)
        if not aws.version_stage:
            yield f'{where.at("version_stage")}: must not be empty (the default is "AWSCURRENT")'
        yield from key_names_problems(where.key, aws.client_id_key, aws.client_secret_key)
        if aws.events_queue_url is not None:
            yield from _check_events_queue_url(
                where.at("events_queue_url"), aws.events_queue_url, where.listed
            )

    def describe(self, config: AwsSourceConfig, where: Where) -> str:
        region = config.region or "default region"
        return f"aws secret {config.secret_id} ({config.version_stage}, {region})" + as_role(
            config.role_arn
        )

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
            config,
            timeout=context.timeout,
            profile=context.where.profile,
            role=assumed_role(config, context.where),
            logger=context.logger,
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


@dataclass(frozen=True, slots=True)
class AssumedRole:
    """The role a store client signs its requests as, and the keys that said so (for messages)."""

    #: the role's ARN (``role_arn``)
    arn: str
    #: the session's name (``role_session_name``, else :func:`default_session_name`)
    session_name: str
    #: ``external_id``, None when not set
    external_id: str | None
    #: the key path of ``role_arn`` (``profiles.dvs.aws.role_arn``, or a sink's own)
    key: str
    #: the key path of ``external_id``, set or to set
    external_id_key: str


def assumed_role(config: AwsSourceConfig, where: Where) -> AssumedRole | None:
    """The role of the ``[aws]`` table at ``where``; None without ``role_arn``."""
    if not config.role_arn:
        return None
    return AssumedRole(
        arn=config.role_arn,
        session_name=config.role_session_name or default_session_name(where.profile),
        external_id=config.external_id,
        key=where.at("role_arn"),
        external_id_key=where.at("external_id"),
    )


def default_session_name(profile: str) -> str:
    """``dvs-agent-<profile>``: characters STS refuses become ``-``, cut to 64 characters."""
    return _NOT_IN_SESSION_NAME_RE.sub("-", f"dvs-agent-{profile}")[:64]


def as_role(role_arn: str | None) -> str:
    """`` as role ARN`` for a ``describe()`` line; "" without a role."""
    return f" as role {role_arn}" if role_arn else ""


def role_arn_problem(role_arn: str) -> str | None:
    """What is wrong with a ``role_arn`` (None: an IAM role's ARN)."""
    if ROLE_ARN_RE.fullmatch(role_arn):
        return None
    shown = toml_repr(role_arn)
    if ":sts::" in role_arn and ":assumed-role/" in role_arn:
        return (
            f"{shown} is a role session's ARN (what GetCallerIdentity shows), not the role's: "
            f"give arn:PARTITION:iam::ACCOUNT_ID:role/NAME, e.g. {_ROLE_EXAMPLE}"
        )
    if ":instance-profile/" in role_arn:
        return (
            f"{shown} is an instance profile's ARN: give the ARN of the role to assume, e.g. "
            f"{_ROLE_EXAMPLE} (the instance profile's own role is used without role_arn)"
        )
    if not role_arn.startswith("arn:"):
        return (
            f"{shown} is not an ARN: give the role's ARN, e.g. {_ROLE_EXAMPLE} (a role name "
            "alone does not say the account)"
        )
    return (
        f"{shown} is not an IAM role's ARN (arn:PARTITION:iam::ACCOUNT_ID:role/[PATH/]NAME, "
        f"the partition aws, aws-cn, aws-us-gov…), e.g. {_ROLE_EXAMPLE}"
    )


def role_problems(
    where: Where,
    role_arn: str | None,
    session_name: str | None,
    external_id: str | None,
    *,
    role_from: str | None = None,
) -> Iterator[str]:
    """The checks of ``role_arn``, ``role_session_name`` and ``external_id`` at ``where``.

    ``role_from``: the ``role_arn`` that applies when ``role_arn`` is None (a sink's default,
    the ``[aws]`` table's); "" or None: no role.
    """
    if role_arn:
        problem = role_arn_problem(role_arn)
        if problem:
            yield f"{where.at('role_arn')}: {problem}"
    if session_name is not None and not ROLE_SESSION_NAME_RE.fullmatch(session_name):
        yield (
            f"{where.at('role_session_name')}: {toml_repr(session_name)} is not a role "
            "session name: 2 to 64 characters of letters, digits and + = , . @ _ - (leave the "
            f'key out for "{default_session_name(where.profile)}")'
        )
    if external_id is not None and not EXTERNAL_ID_RE.fullmatch(external_id):
        yield (
            f"{where.at('external_id')}: must be 2 to 1224 characters of letters, digits and "
            "+ = , . @ : / _ - (the sts:ExternalId of the role's trust policy)"
        )
    effective = role_arn if role_arn is not None else role_from
    if not effective:
        for field, value in (("role_session_name", session_name), ("external_id", external_id)):
            if value is not None:
                yield (
                    f"{where.at(field)}: only with role_arn (the role to assume): set "
                    f"{where.at('role_arn')}, or leave {field} out"
                )


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
