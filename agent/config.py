"""The configuration file: TOML → typed, validated, frozen Structs (DESIGN §3).

The TOML text is parsed with :mod:`tomllib` and converted with :func:`msgspec.convert`, so that
every error carries a path; that path is rewritten as the TOML key the user typed
(``profiles.dvs.sinks[0].mode``). Checks that span several keys (URLs, paths, duplicate sinks)
run after the conversion and name their keys the same way.

Durations and file modes are custom types (:class:`Duration`, :class:`FileMode`) that msgspec
hands to :func:`_dec_hook`; every ``timedelta`` field of the schema is a ``Duration``, so a
duration in this file is never parsed any other way.

Secrets never sit in this file: there is no key for one, and a URL (``token_url``, a Vault
``address``, an AWS ``endpoint_url`` or ``events_queue_url``, a redis sink's ``url``) with a
``user:password@`` part is refused.

The credential sources ``vault`` and ``aws`` have their own tables (``[profiles.NAME.vault]``,
``[profiles.NAME.aws]``). A table is checked whenever it is present; its required keys (``path``,
``secret_id``) only when its source is listed in ``sources``: a table without its source is
allowed, since the profile's vault and aws write-back sinks take their defaults from it
(:meth:`VaultSinkConfig.merged`, :meth:`AwsSinkConfig.merged`).

Sinks are a tagged union on ``type`` (:data:`SinkConfig`): ``file`` (the default when ``type`` is
left out), ``vault``, ``aws`` and ``redis``. No two sinks, in any profile, may write one target
(a file, a Vault secret, an AWS secret, a Redis key), and no sink may write a secret that a
profile reads its credentials from.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeAlias, TypeVar, get_args
from urllib.parse import SplitResult, urlsplit

import msgspec
import msgspec.inspect as mi

from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/dvs-agent/agent.toml"
#: the variable that names the config file when ``-c`` is not given
CONFIG_PATH_ENV = "DVS_AGENT_CONFIG"

#: the token endpoint of each ``environment`` (DESIGN §2); ``token_url`` overrides it
ENVIRONMENT_TOKEN_URLS: Mapping[str, str] = MappingProxyType(
    {
        "sandbox": "https://sandbox.osigu.com/v1/oauth/token",
        "production": "https://api.osigu.com/v1/oauth/token",
    }
)

#: a redis sink's ``url`` when it has none
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: a redis sink's key when it has no ``key`` (``str.format`` with ``profile``)
DEFAULT_REDIS_KEY = "dvs-agent:{profile}:token"
#: the port and database of a redis ``url`` that names none
DEFAULT_REDIS_PORT = 6379
DEFAULT_REDIS_DB = 0

#: the variable that gives the Vault address when ``[profiles.NAME.vault]`` has no ``address``
VAULT_ADDR_ENV = "VAULT_ADDR"
#: token auth without ``token_file``: ``$VAULT_TOKEN``, else this file (resolved by the source)
VAULT_TOKEN_ENV = "VAULT_TOKEN"  # noqa: S105 - a variable name
DEFAULT_VAULT_TOKEN_FILE = "/run/vault/token"  # noqa: S105 - a path

_PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: a profile name names state files (``NAME.json``), metric labels and Redis keys (DESIGN §10)
MAX_PROFILE_NAME = 64
#: the longest an ``on_change`` command may run before it is killed (DESIGN §10)
MAX_ON_CHANGE_TIMEOUT = timedelta(minutes=5)
_ENV_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_HOSTNAME_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_HOSTNAME_LABEL}(?:\.{_HOSTNAME_LABEL})*\.?")
#: what botocore accepts as a region name (a host label: it becomes part of the endpoint's host)
_AWS_REGION_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: an SQS queue URL's path: /ACCOUNT_ID/QUEUE_NAME
_SQS_QUEUE_PATH_RE = re.compile(r"/[^/]+/[^/]+/?")
#: a redis sink's host: a DNS name (container names may have '_') or an address
_REDIS_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
#: a Secrets Manager ARN; a full one ends in the name, '-' and 6 random characters
_SECRET_ARN_RE = re.compile(
    r"arn:(?P<partition>[^:]+):secretsmanager:(?P<region>[^:]*):(?P<account>[^:]*)"
    r":secret:(?P<name>[^:]+)"
)
#: RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), separated by single spaces
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+( [\x21\x23-\x5b\x5d-\x7e]+)*")

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_MICROSECONDS = MappingProxyType(
    {"ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
)
_DURATION_HINT = 'use seconds (30) or a number with a unit: "500ms", "30s", "5m", "24h"'

_OCTAL_RE = re.compile(r"(?:0o)?[0-7]+")

#: msgspec's error text: "<message> - at `$.path`" (no suffix at the root)
_MSGSPEC_ERROR_RE = re.compile(
    r"(?P<message>.*?)(?: - at `(?:key` in `)?\$(?P<path>[^`]*)`)?", re.S
)
_MSGSPEC_PATH_RE = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_TOML_ERROR_RE = re.compile(
    r"(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)", re.S
)
_TYPE_NAMES = MappingProxyType(
    {
        "str": "a string",
        "int": "an integer",
        "float": "a number",
        "bool": "a boolean (true or false)",
        "object": "a table",
        "array": "an array",
        "datetime": "a date-time",
        "date": "a date",
        "time": "a time",
    }
)

#: one step of a key path: a key, an array index, or an unknown dict key (msgspec's ``[...]``)
_Segment = str | int | None

_T = TypeVar("_T")


# --------------------------------------------------------------------------- custom value types


class Duration(timedelta):
    """A ``timedelta`` read from the config with :func:`parse_duration`.

    Every duration field of the schema has this type so that msgspec hands its value to our
    decoder instead of its own (which accepts ISO 8601 only). It is an ordinary ``timedelta``
    otherwise; arithmetic on it returns plain ``timedelta`` values.
    """

    __slots__ = ()


class FileMode(int):
    """A permission mode (``0o640``) read from an octal string or a TOML integer."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"0o{int(self):03o}"


def parse_duration(value: object) -> timedelta:
    """A duration from seconds (``30``, ``1.5``, ``"0"``) or with units (``"500ms"``, ``"1m30s"``).

    Units: ``ms``, ``s``, ``m``, ``h``, ``d``; parts may be combined, largest first or not.
    Negative values, booleans and anything else raise :class:`ValueError` with a message that
    shows the accepted forms.
    """
    return timedelta(microseconds=_duration_microseconds(value))


def _duration_microseconds(value: object) -> int:
    shown = _toml_repr(value)
    amount: Decimal
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {shown}: {_DURATION_HINT}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"invalid duration {shown}: {_DURATION_HINT}")
        if value < 0:
            raise ValueError(f"invalid duration {shown}: must not be negative")
        amount = Decimal(str(value)) * _MICROSECONDS["s"]
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"invalid duration {shown}: must not be negative")
        if _NUMBER_RE.fullmatch(text):
            amount = Decimal(text) * _MICROSECONDS["s"]
        elif _DURATION_RE.fullmatch(text):
            amount = sum(
                (
                    Decimal(number) * _MICROSECONDS[unit]
                    for number, unit in _DURATION_PART_RE.findall(text)
                ),
                Decimal(0),
            )
        else:
            raise ValueError(f"invalid duration {shown}: {_DURATION_HINT}")
    else:
        raise ValueError(f"invalid duration {shown}: {_DURATION_HINT}")
    try:
        microseconds = int(amount.to_integral_value(rounding=ROUND_HALF_EVEN))
        timedelta(microseconds=microseconds)
    except (OverflowError, InvalidOperation):
        raise ValueError(f"invalid duration {shown}: too large") from None
    return microseconds


def _parse_mode(value: object) -> int:
    if isinstance(value, str):
        if not _OCTAL_RE.fullmatch(value):
            raise ValueError(
                f'invalid mode {_toml_repr(value)}: use octal digits, e.g. "0640" or "0600"'
            )
        mode = int(value.removeprefix("0o"), 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ValueError(
            f'invalid mode {_toml_repr(value)}: use an octal string ("0640") or integer (0o640)'
        )
    if not 0 <= mode <= 0o777:
        hint = ""
        if isinstance(value, int) and value > 0 and set(str(value)) <= set("01234567"):
            hint = f' (a TOML integer is decimal unless written 0o{value}; or write "0{value}")'
        raise ValueError(f"invalid mode {_toml_repr(value)}: must be between 0o000 and 0o777{hint}")
    if mode & stat.S_IWOTH:
        raise ValueError(
            f"invalid mode {_toml_repr(value)} (0o{mode:03o}): a token file must not be "
            "world-writable"
        )
    return mode


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return Duration(microseconds=_duration_microseconds(obj))
    if type_ is FileMode:
        return FileMode(_parse_mode(obj))
    raise NotImplementedError(f"no decoder for {type_!r}")


# --------------------------------------------------------------------------------- the schema
# Every table is frozen, keyword-only and refuses unknown keys (typos must not pass silently).
# The options are repeated on each class: type checkers do not see them inherited.


class AgentSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[agent]``: process-wide settings."""

    #: debug | info | warning | error
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: json | text
    log_format: Literal["json", "text"] = "json"
    #: token metadata kept across restarts; absolute, or starting with ``./`` (against the CWD)
    state_dir: str = "/var/lib/dvs-agent"


class HealthSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[health]``: the listener of ``/healthz``, ``/readyz``, ``/metrics`` (DESIGN §8)."""

    #: ``HOST:PORT`` (``[::1]:8787`` for IPv6); ``""`` disables the listener
    listen: str = "127.0.0.1:8787"

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind (IPv6 hosts without brackets), or None when disabled."""
        if not self.listen:
            return None
        return _parse_listen(self.listen)


class EnvSourceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME.env]``: the variables the ``env`` source reads (each also ``NAME_FILE``)."""

    client_id_var: str = "DVS_CLIENT_ID"
    client_secret_var: str = "DVS_CLIENT_SECRET"  # noqa: S105 - a variable name


class VaultSourceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME.vault]``: the ``vault`` source, a KV secret with the two credentials.

    ``path`` is required when ``"vault"`` is in the profile's ``sources``; the table may also be
    present without it (a vault write-back sink takes its defaults from it).
    """

    #: ``https://vault.internal:8200``; None: ``$VAULT_ADDR`` (see :meth:`resolved_address`)
    address: str | None = None
    #: token | approle
    auth_method: Literal["token", "approle"] = "approle"
    #: token auth: this file, else ``$VAULT_TOKEN``, else ``/run/vault/token``
    token_file: str | None = None
    #: approle auth: files holding the role id and the secret id (never the values here)
    role_id_file: str = "/etc/dvs-agent/role_id"
    secret_id_file: str = "/etc/dvs-agent/secret_id"  # noqa: S105 - a path
    #: where the AppRole auth method is mounted (``auth/<approle_mount>/login``)
    approle_mount: str = "approle"
    #: the KV secrets engine's mount
    mount: str = "secret"
    #: the secret's path inside ``mount``, without slashes at either end (``dvs/osigu``)
    path: str | None = None
    #: 1 | 2
    kv_version: Literal[1, 2] = 2
    #: the keys of the secret's data that hold the client id and the client secret
    client_id_key: str = "client_id"
    client_secret_key: str = "client_secret"  # noqa: S105 - a key name
    #: Vault Enterprise / OpenBao namespace
    namespace: str | None = None
    #: a CA file (PEM) for the Vault server; must exist and be readable
    ca_cert: str | None = None
    #: do not verify the server's certificate (tests only)
    tls_skip_verify: bool = False

    def resolved_address(self, environ: Mapping[str, str], *, key: str) -> str:
        """``address``, else ``$VAULT_ADDR``, checked like ``token_url``.

        ``key`` is the key path the errors name (``profiles.dvs.vault.address``). Raises
        :class:`ConfigError` when neither is set, or when the URL is not absolute http(s), uses
        plain http to a host that is not loopback, or carries ``user:password@``.
        """
        return _resolve_vault_address(self.address, environ, key=key)


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


class RotationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME.rotation]``: rotation triggers (DESIGN §5)."""

    #: how often the source's version is checked; 0 disables polling, else at least 1 s
    poll_interval: Duration = Duration(seconds=30)


class FileSinkConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="file",
    tag_field="type",
):
    """``[[profiles.NAME.sinks]]`` with ``type = "file"`` (DESIGN §4)."""

    path: str
    #: raw | json | env
    format: Literal["raw", "json", "env"] = "raw"
    #: applied at every write; never world-writable
    mode: FileMode = FileMode(0o640)
    #: user and group names (or numeric ids) applied at every write; None leaves them as created
    owner: str | None = None
    group: str | None = None
    #: argv run after each new token (no shell); None runs nothing
    on_change: list[str] | None = None
    #: how long ``on_change`` may run before it is killed
    on_change_timeout: Duration = Duration(seconds=30)


class VaultSinkConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="vault",
    tag_field="type",
):
    """``[[profiles.NAME.sinks]]`` with ``type = "vault"``: a KV v2 write (DESIGN §4).

    Every key but ``path`` defaults to the same key of the profile's ``[vault]`` table (and to
    that table's defaults when there is none): :meth:`merged` applies them.
    """

    #: the secret's path inside ``mount``, without slashes at either end (required)
    path: str
    #: None: the ``[vault]`` table's, else ``$VAULT_ADDR``
    address: str | None = None
    auth_method: Literal["token", "approle"] | None = None
    token_file: str | None = None
    role_id_file: str | None = None
    secret_id_file: str | None = None
    approle_mount: str | None = None
    namespace: str | None = None
    ca_cert: str | None = None
    tls_skip_verify: bool | None = None
    #: the KV v2 secrets engine's mount
    mount: str | None = None

    def merged(self, profile_vault: VaultSourceConfig | None) -> VaultSinkResolved:
        """This sink's settings, each unset key taken from the profile's ``[vault]`` table."""
        base = profile_vault if profile_vault is not None else VaultSourceConfig()

        def pick(mine: _T | None, theirs: _T) -> _T:
            return theirs if mine is None else mine

        return VaultSinkResolved(
            address=pick(self.address, base.address),
            auth_method=pick(self.auth_method, base.auth_method),
            token_file=pick(self.token_file, base.token_file),
            role_id_file=pick(self.role_id_file, base.role_id_file),
            secret_id_file=pick(self.secret_id_file, base.secret_id_file),
            approle_mount=pick(self.approle_mount, base.approle_mount),
            namespace=pick(self.namespace, base.namespace),
            ca_cert=pick(self.ca_cert, base.ca_cert),
            tls_skip_verify=pick(self.tls_skip_verify, base.tls_skip_verify),
            mount=pick(self.mount, base.mount),
            path=self.path,
        )


class VaultSinkResolved(msgspec.Struct, frozen=True, kw_only=True):
    """A vault sink's settings with the profile's ``[vault]`` defaults applied (:meth:`merged`).

    The fields mean what they mean in :class:`VaultSourceConfig`; None is still a value here:
    ``address`` None is ``$VAULT_ADDR`` (:meth:`resolved_address`), ``token_file`` None is
    ``$VAULT_TOKEN`` else ``/run/vault/token``, ``namespace``/``ca_cert`` None are none.
    """

    address: str | None
    auth_method: Literal["token", "approle"]
    token_file: str | None
    role_id_file: str
    secret_id_file: str
    approle_mount: str
    namespace: str | None
    ca_cert: str | None
    tls_skip_verify: bool
    mount: str
    path: str

    def resolved_address(self, environ: Mapping[str, str], *, key: str) -> str:
        """``address``, else ``$VAULT_ADDR``; as :meth:`VaultSourceConfig.resolved_address`."""
        return _resolve_vault_address(self.address, environ, key=key)


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

    def merged(self, profile_aws: AwsSourceConfig | None) -> AwsSinkResolved:
        """This sink's settings, ``region`` and ``endpoint_url`` defaulting to the ``[aws]``'s."""
        base = profile_aws if profile_aws is not None else AwsSourceConfig()
        return AwsSinkResolved(
            secret_id=self.secret_id,
            region=self.region if self.region is not None else base.region,
            endpoint_url=self.endpoint_url if self.endpoint_url is not None else base.endpoint_url,
            create=self.create,
        )


class AwsSinkResolved(msgspec.Struct, frozen=True, kw_only=True):
    """An aws sink's settings with the profile's ``[aws]`` defaults applied.

    ``region`` None: boto3's default chain; ``endpoint_url`` None: AWS's own endpoint.
    """

    secret_id: str
    region: str | None
    endpoint_url: str | None
    create: bool


class RedisSinkConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="redis",
    tag_field="type",
):
    """``[[profiles.NAME.sinks]]`` with ``type = "redis"``: ``SET key value PX ttl`` (DESIGN §4)."""

    #: ``redis://`` or ``rediss://`` (TLS) ``HOST[:PORT][/DB]``; never a password
    url: str = DEFAULT_REDIS_URL
    #: the full key name; None: ``dvs-agent:<profile>:token`` (:meth:`resolved_key`)
    key: str | None = None
    #: an ACL user name (needs a password); None: the default user
    username: str | None = None
    #: a file holding the password (read by the sink, never here); or ``password_env``
    password_file: str | None = None
    #: a variable holding the password; or ``password_file``, not both
    password_env: str | None = None

    def resolved_key(self, profile: str) -> str:
        """``key``, else ``dvs-agent:<profile>:token``."""
        return self.key if self.key is not None else DEFAULT_REDIS_KEY.format(profile=profile)


#: Every sink type, tagged by ``type``; the supported ``type`` values and the error messages
#: follow from it (:func:`sink_types`). A sink without ``type`` is a file sink: msgspec requires
#: the tag in a union, so :func:`parse_config` inserts ``"file"`` before converting.
SinkConfig: TypeAlias = FileSinkConfig | VaultSinkConfig | AwsSinkConfig | RedisSinkConfig

#: a credential source's name in ``sources``
SourceName = Literal["env", "vault", "aws"]
#: the credential sources this release reads (the values of ``SourceName``)
SUPPORTED_SOURCES: tuple[str, ...] = get_args(SourceName)


class ProfileConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME]``: one credential-source chain, one token endpoint, its sinks."""

    #: sandbox | production: picks the token endpoint unless ``token_url`` is set
    environment: Literal["sandbox", "production"] = "sandbox"
    #: overrides ``environment``; plain http only for loopback hosts
    token_url: str | None = None
    #: query (OSIGU's shape) | body (RFC 6749 §4.4 form body)
    grant_type_location: Literal["query", "body"] = "query"
    #: sent as ``scope`` beside ``grant_type`` when set
    scope: str | None = None
    #: a CA file (PEM) for the token endpoint; must exist and be readable
    ca_bundle: str | None = None
    #: one HTTP request to the token endpoint; more than 0, at most 5 minutes
    request_timeout: Duration = Duration(seconds=10)
    #: refresh when this much of the token's life remains (DESIGN §6)
    refresh_before_expiry: Duration = Duration(seconds=60)
    #: fallback order: the first source that yields credentials wins
    sources: list[SourceName] = msgspec.field(default_factory=lambda: ["env"])
    env: EnvSourceConfig = msgspec.field(default_factory=EnvSourceConfig)
    #: the ``vault`` source; required (with ``path``) when ``"vault"`` is in ``sources``
    vault: VaultSourceConfig | None = None
    #: the ``aws`` source; required (with ``secret_id``) when ``"aws"`` is in ``sources``
    aws: AwsSourceConfig | None = None
    rotation: RotationConfig = msgspec.field(default_factory=RotationConfig)
    #: at least one
    sinks: list[SinkConfig]

    @property
    def resolved_token_url(self) -> str:
        """``token_url`` when set, else the URL of ``environment``."""
        return self.token_url or ENVIRONMENT_TOKEN_URLS[self.environment]


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole file."""

    agent: AgentSection = msgspec.field(default_factory=AgentSection)
    health: HealthSection = msgspec.field(default_factory=HealthSection)
    #: profile name → profile; at least one
    profiles: dict[str, ProfileConfig]


def sink_types() -> tuple[str, ...]:
    """The ``type`` values of the sinks this release supports (the tags of ``SinkConfig``)."""
    members: tuple[Any, ...] = getattr(SinkConfig, "__args__", (SinkConfig,))
    return tuple(str(member.__struct_config__.tag) for member in members)


# ----------------------------------------------------------------------------- public loaders


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str]) -> Path:
    """``-c PATH`` when given, else ``$DVS_AGENT_CONFIG`` when set, else the default path."""
    if cli_value:
        return Path(cli_value)
    from_env = environ.get(CONFIG_PATH_ENV)
    if from_env:
        return Path(from_env)
    return Path(DEFAULT_CONFIG_PATH)


def load_config(path: Path) -> Config:
    """Read and validate the config file; every problem is a :class:`ConfigError`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass -c PATH or set {CONFIG_PATH_ENV}") from None
    except PermissionError:
        raise ConfigError(
            f"{path}: permission denied: the agent (uid {os.getuid()}) cannot read it; "
            "check the file's owner and mode"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; pass the path of the TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); TOML files are UTF-8"
        ) from None
    return parse_config(text, source=str(path))


def parse_config(text: str, *, source: str = "<string>") -> Config:
    """Validate TOML text; ``source`` starts every error message (the file's path)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_ERROR_RE.fullmatch(str(exc))
        if match:
            raise ConfigError(
                f"{source}:{match['line']}:{match['column']}: TOML syntax error: {match['message']}"
            ) from None
        raise ConfigError(f"{source}: TOML syntax error: {exc}") from None
    data = _with_default_sink_type(data)
    errors = list(_check_sink_types(data))
    if errors:
        raise _config_error(source, errors)
    try:
        config = msgspec.convert(data, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise _config_error(source, [_explain(exc, data)]) from None
    errors = list(_check(config))
    if errors:
        raise _config_error(source, errors)
    return config


def config_file_warnings(path: Path, config: Config) -> list[str]:
    """What makes the config file at ``path`` editable by others than root and the agent.

    DESIGN §10: the file (and the directory it is in, which lets its writer replace it) being
    writable by group or others, or owned by a uid other than root and the agent's (effective)
    one, is a warning at every start, not an error. Each message names the path, its mode and
    owner, what to do, and every ``on_change`` argv of ``config``, which run as the agent.
    Empty when nothing is wrong or the path cannot be examined (loading it reports that).
    """
    euid = os.geteuid()
    hooks = [
        f"{_key_path(['profiles', name, 'sinks', index, 'on_change'])} = "
        f"[{_listing(sink.on_change)}]"
        for name, profile in config.profiles.items()
        for index, sink in enumerate(profile.sinks)
        if isinstance(sink, FileSinkConfig) and sink.on_change
    ]
    if hooks:
        stake = (
            f"whoever can change it chooses the commands the agent runs as uid {euid}: "
            + "; ".join(hooks)
        )
    else:
        stake = (
            "whoever can change it decides where tokens are written, and could add an on_change "
            f"command that the agent would run as uid {euid}"
        )
    warnings = []
    file_problem = _foreign_write_problem(path, euid, directory=False)
    if file_problem is not None:
        problem, mode, fix = file_problem
        warnings.append(f"{path}: the config file ({mode}) {problem}: {stake}; {fix}")
    directories = [path.parent]
    try:
        resolved = path.resolve().parent
    except (OSError, RuntimeError):  # a symlink loop: loading the file reports it
        resolved = path.parent
    if resolved != path.parent:
        directories.append(resolved)
    for directory in directories:
        dir_problem = _foreign_write_problem(directory, euid, directory=True)
        if dir_problem is not None:
            problem, mode, fix = dir_problem
            warnings.append(
                f"{path}: the config file's directory {directory} ({mode}) {problem}: whoever "
                f"can write it can replace the file, and {stake}; {fix}"
            )
    return warnings


def _foreign_write_problem(
    path: Path, euid: int, *, directory: bool
) -> tuple[str, str, str] | None:
    """(what is wrong, its mode and owner, the fix) when users other than root and ``euid`` can
    write ``path``; None when they cannot, or ``path`` cannot be examined."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    writers = [who for bit, who in ((0o020, "group"), (0o002, "others")) if mode & bit]
    if directory and mode & stat.S_ISVTX:
        writers = []  # sticky (/tmp): others cannot replace a file they do not own
    problems = []
    if writers:
        problems.append(f"is writable by {' and '.join(writers)}")
    if info.st_uid not in (0, euid):
        problems.append(f"is owned by uid {info.st_uid}, not by root or the agent (uid {euid})")
    if not problems:
        return None
    described = (
        f"mode {mode:04o}, owner uid {info.st_uid}{_user_name(info.st_uid)}, gid {info.st_gid}"
    )
    fixes = []
    if info.st_uid not in (0, euid):
        fixes.append(f"chown root {path}")
    if writers:
        fixes.append(f"chmod go-w {path}")
    kind = "directory" if directory else "file"
    commands = " && ".join(fixes)
    fix = f"make the {kind} root's (or the agent's) and not writable by others: {commands}"
    return " and ".join(problems), described, fix


def _user_name(uid: int) -> str:
    """`` (name)`` of a uid, or nothing when it has no passwd entry."""
    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""


def _config_error(source: str, errors: list[str]) -> ConfigError:
    return ConfigError("\n".join(f"{source}: {error}" for error in errors))


# ---------------------------------------------------------------------- msgspec errors → keys


def _explain(exc: msgspec.ValidationError, data: Mapping[str, Any]) -> str:
    """msgspec's message as ``key.path: what is wrong``."""
    message, segments = _split_msgspec_error(str(exc))
    if None in segments:
        # msgspec writes a dict key as `[...]`; the only dict is `profiles`: find which one.
        profiles = data.get("profiles")
        if isinstance(profiles, Mapping):
            for name, raw in profiles.items():
                try:
                    msgspec.convert(raw, ProfileConfig, dec_hook=_dec_hook)
                except msgspec.ValidationError as inner:
                    message, rest = _split_msgspec_error(str(inner))
                    segments = ["profiles", name, *rest]
                    break
    return _describe(message, segments, data)


def _split_msgspec_error(text: str) -> tuple[str, list[_Segment]]:
    match = _MSGSPEC_ERROR_RE.fullmatch(text)
    if match is None:  # pragma: no cover - the pattern matches any text
        return text, []
    segments: list[_Segment] = []
    for key, index in _MSGSPEC_PATH_RE.findall(match["path"] or ""):
        if key:
            segments.append(key)
        else:
            segments.append(None if index == "..." else int(index))
    return match["message"], segments


def _describe(message: str, segments: list[_Segment], data: Mapping[str, Any]) -> str:
    field_type = _type_at(segments, data)
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", message):
        key = m[1]
        where = _key_path([*segments, key])
        allowed = _struct_keys(field_type)
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        owner = _owning_table(segments, key, data)
        if owner is not None:
            table = f"the {_header(owner)} table" if owner else "the top level"
            return (
                f"{where}: unknown key; {key} belongs to {table}: move it above the "
                f"{_header(segments)} header (a TOML key belongs to the last header above it)"
            )
        return f"{where}: unknown key (a typo?){hint}"
    if m := re.fullmatch(r"Object missing required field `(.*)`", message):
        key = m[1]
        where = _key_path([*segments, key])
        if key == "profiles":
            return f"{where}: required: add at least one [profiles.NAME] table"
        if key == "sinks":
            table = _key_path([*segments, "sinks"])
            return f"{where}: required: add at least one [[{table}]] table"
        return f"{where}: required key is missing"
    where = _key_path(segments) or "(top level)"
    if m := re.fullmatch(r"Invalid enum value (.*)", message):
        value = _value_at(data, segments)
        return f"{where}: invalid value {_toml_repr(value)}{_allowed(field_type)}"
    if m := re.fullmatch(r"Expected `(.*)`, got `(.*)`", message):
        expected = " or ".join(
            _TYPE_NAMES.get(name, name) for name in m[1].split(" | ") if name != "null"
        )
        got = _TYPE_NAMES.get(m[2], m[2])
        return f"{where}: expected {expected}, got {got}{_allowed(field_type)}"
    return f"{where}: {message}"


def _owning_table(
    segments: list[_Segment], key: str, data: Mapping[str, Any]
) -> list[_Segment] | None:
    """The enclosing table that has ``key``, when it is not the table at ``segments``."""
    for end in range(len(segments) - 1, -1, -1):
        if key in _struct_keys(_type_at(segments[:end], data)):
            return segments[:end]
    return None


def _type_at(segments: list[_Segment], data: Mapping[str, Any]) -> mi.Type | None:
    """The schema's type at a key path (None when the path leaves the schema).

    A tagged union (the sinks) resolves to the member that the table's ``type`` in ``data``
    names, so that a sink's keys are those of its type.
    """
    current: mi.Type = mi.type_info(Config)
    for depth, segment in enumerate(segments):
        current = _tagged_member(_without_none(current), _value_at(data, segments[:depth]))
        if isinstance(current, mi.StructType) and isinstance(segment, str):
            found = [field for field in current.fields if field.encode_name == segment]
            if not found:
                return None
            current = found[0].type
        elif isinstance(current, mi.ListType) and isinstance(segment, int):
            current = current.item_type
        elif isinstance(current, mi.DictType) and not isinstance(segment, int):
            current = current.value_type
        else:
            return None
    return _tagged_member(_without_none(current), _value_at(data, segments))


def _tagged_member(type_info: mi.Type, value: Any) -> mi.Type:
    """The member of a tagged union of Structs that ``value`` (a table) names by its tag."""
    if isinstance(type_info, mi.UnionType) and isinstance(value, Mapping):
        for member in type_info.types:
            if (
                isinstance(member, mi.StructType)
                and member.tag_field is not None
                and value.get(member.tag_field) == member.tag
            ):
                return member
    return type_info


def _without_none(type_info: mi.Type) -> mi.Type:
    if isinstance(type_info, mi.UnionType):
        members = [t for t in type_info.types if not isinstance(t, mi.NoneType)]
        if len(members) == 1:
            return members[0]
    return type_info


def _struct_keys(type_info: mi.Type | None) -> list[str]:
    if not isinstance(type_info, mi.StructType):
        return []
    keys = [field.encode_name for field in type_info.fields]
    if type_info.tag_field:
        keys.insert(0, type_info.tag_field)
    return keys


def _allowed(type_info: mi.Type | None) -> str:
    if isinstance(type_info, mi.LiteralType):
        return f"; expected one of: {_listing(type_info.values)}"
    return ""


def _value_at(data: Mapping[str, Any], segments: list[_Segment]) -> Any:
    value: Any = data
    for segment in segments:
        try:
            value = value[segment]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _with_default_sink_type(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``type = "file"`` added to each sink table without a ``type`` (a copy)."""
    profiles = data.get("profiles")
    if not isinstance(profiles, Mapping):
        return data
    copied: dict[str, Any] = {}
    for name, profile in profiles.items():
        sinks = profile.get("sinks") if isinstance(profile, Mapping) else None
        if isinstance(sinks, list):
            profile = {
                **profile,
                "sinks": [
                    {"type": "file", **sink}
                    if isinstance(sink, Mapping) and "type" not in sink
                    else sink
                    for sink in sinks
                ],
            }
        copied[name] = profile
    return {**data, "profiles": copied}


def _check_sink_types(data: Mapping[str, Any]) -> Iterator[str]:
    """Unknown sink ``type`` values, reported before msgspec looks at the sink."""
    supported = sink_types()
    profiles = data.get("profiles")
    if not isinstance(profiles, Mapping):
        return
    for name, profile in profiles.items():
        sinks = profile.get("sinks") if isinstance(profile, Mapping) else None
        if not isinstance(sinks, list):
            continue
        for index, sink in enumerate(sinks):
            if not isinstance(sink, Mapping) or "type" not in sink:
                continue
            kind = sink["type"]
            where = _key_path(["profiles", name, "sinks", index, "type"])
            if not isinstance(kind, str):
                yield f"{where}: expected a string; supported: {_listing(supported)}"
            elif kind not in supported:
                yield (
                    f"{where}: unknown sink type {_toml_repr(kind)}; "
                    f"supported: {_listing(supported)}"
                )


# ------------------------------------------------------------------------ cross-field checks


def _check(config: Config) -> Iterator[str]:
    """Every problem that msgspec's types cannot express, as ``key.path: what is wrong``."""
    state_dir = config.agent.state_dir
    if not state_dir:
        yield "agent.state_dir: must not be empty"
    elif not _is_explicit_path(state_dir):
        yield (
            f"agent.state_dir: {_toml_repr(state_dir)} is relative: write an absolute path, or "
            "start it with ./ to resolve it against the working directory"
        )
    if config.health.listen:
        try:
            _parse_listen(config.health.listen)
        except ValueError as exc:
            yield f"health.listen: {exc}"
    if not config.profiles:
        yield "profiles: at least one profile is required: add a [profiles.NAME] table"
    sources = [
        target
        for name, profile in config.profiles.items()
        for target in _source_targets(name, profile)
    ]
    written: list[_Target] = []
    for name, profile in config.profiles.items():
        if not _PROFILE_NAME_RE.fullmatch(name):
            yield (
                f"{_key_path(['profiles', name])}: invalid profile name {_toml_repr(name)}: "
                "use letters, digits, '_', '.' and '-', starting with a letter or digit "
                "(it names files and metric labels)"
            )
        elif len(name) > MAX_PROFILE_NAME:
            yield (
                f"{_key_path(['profiles', name])}: the profile name is {len(name)} characters "
                f"long, at most {MAX_PROFILE_NAME} are allowed (it names the state file "
                "NAME.json, metric labels and keys): choose a shorter name"
            )
        yield from _check_profile(name, profile)
        for index, sink in enumerate(profile.sinks):
            target = _sink_target(name, index, profile, sink)
            if target is None:
                continue
            source = next((s for s in sources if _same_target(target, s)), None)
            if source is not None:
                yield _source_targeted(target, source)
            other = next((t for t in written if _same_target(target, t)), None)
            if other is not None:
                yield _duplicate_target(target, other)
            else:
                written.append(target)


def _check_profile(name: str, profile: ProfileConfig) -> Iterator[str]:
    def key(*segments: _Segment) -> str:
        return _key_path(["profiles", name, *segments])

    if profile.token_url is not None:
        problem = _token_url_problem(profile.token_url)
        if problem:
            yield f"{key('token_url')}: {problem}"
    if profile.scope is not None and not _SCOPE_RE.fullmatch(profile.scope):
        yield (
            f"{key('scope')}: invalid scope {_toml_repr(profile.scope)}: space-separated tokens "
            "of printable ASCII without '\"' or '\\' (RFC 6749 §3.3)"
        )
    if profile.ca_bundle is not None:
        problem = _readable_file_problem(profile.ca_bundle)
        if problem:
            yield f"{key('ca_bundle')}: {_toml_repr(profile.ca_bundle)}: {problem}"
    if not timedelta(0) < profile.request_timeout <= timedelta(minutes=5):
        yield f"{key('request_timeout')}: must be more than 0 and at most 5 minutes"
    if not profile.sources:
        yield (
            f"{key('sources')}: must name at least one source; "
            f"supported: {_listing(SUPPORTED_SOURCES)}"
        )
    seen: set[str] = set()
    for index, source in enumerate(profile.sources):
        if source in seen:
            yield f"{key('sources', index)}: {source!r} is listed twice"
        seen.add(source)
    for var_key in ("client_id_var", "client_secret_var"):
        var = getattr(profile.env, var_key)
        if not _ENV_VAR_RE.fullmatch(var):
            yield (
                f"{key('env', var_key)}: {_toml_repr(var)} is not a valid environment variable "
                "name (letters, digits and '_', not starting with a digit)"
            )
    if profile.env.client_id_var == profile.env.client_secret_var:
        yield f"{key('env', 'client_secret_var')}: must differ from client_id_var"
    yield from _check_vault(name, profile)
    yield from _check_aws(name, profile)
    poll = profile.rotation.poll_interval
    if timedelta(0) < poll < timedelta(seconds=1):
        yield f"{key('rotation', 'poll_interval')}: must be 0 (no polling) or at least 1s"
    if not profile.sinks:
        yield f"{key('sinks')}: at least one sink is required: add a [[{key('sinks')}]] table"
    for index, sink in enumerate(profile.sinks):
        where = key("sinks", index)
        if isinstance(sink, FileSinkConfig):
            yield from _check_file_sink(where, sink)
        elif isinstance(sink, VaultSinkConfig):
            yield from _check_vault_sink(where, sink, name, profile.vault)
        elif isinstance(sink, AwsSinkConfig):
            yield from _check_aws_sink(where, sink, name)
        else:
            yield from _check_redis_sink(where, sink, name)


def _check_vault(name: str, profile: ProfileConfig) -> Iterator[str]:
    table: list[_Segment] = ["profiles", name, "vault"]

    def key(field: str) -> str:
        return _key_path([*table, field])

    vault = profile.vault
    if "vault" in profile.sources and (vault is None or vault.path is None):
        add = f"add a {_header(table)} table with " if vault is None else "e.g. "
        yield (
            f'{key("path")}: required when "vault" is in sources: {add}path = "dvs/osigu" '
            "(the secret's path inside mount)"
        )
    if vault is None:
        return
    if vault.address == "":
        yield f"{key('address')}: must not be empty (leave the key out to use ${VAULT_ADDR_ENV})"
    elif vault.address is not None:
        problem = _vault_address_problem(vault.address)
        if problem:
            yield f"{key('address')}: {problem}"
    if vault.token_file == "":
        yield (
            f"{key('token_file')}: must not be empty (leave the key out to use "
            f"${VAULT_TOKEN_ENV}, else {DEFAULT_VAULT_TOKEN_FILE})"
        )
    if vault.auth_method == "approle":
        for file_key in ("role_id_file", "secret_id_file"):
            if not getattr(vault, file_key):
                yield f'{key(file_key)}: must not be empty with auth_method = "approle"'
        problem = _mount_path_problem(vault.approle_mount, "approle")
        if problem:
            yield f"{key('approle_mount')}: {problem}"
    problem = _mount_path_problem(vault.mount, "secret")
    if problem:
        yield f"{key('mount')}: {problem}"
    if vault.path is not None:
        problem = _mount_path_problem(vault.path, "dvs/osigu")
        if problem:
            yield f"{key('path')}: {problem}"
    yield from _check_key_names(table, vault.client_id_key, vault.client_secret_key)
    if vault.namespace == "":
        yield f"{key('namespace')}: must not be empty (leave the key out for no namespace)"
    if vault.ca_cert is not None:
        problem = _readable_file_problem(vault.ca_cert)
        if problem:
            yield f"{key('ca_cert')}: {_toml_repr(vault.ca_cert)}: {problem}"


def _check_aws(name: str, profile: ProfileConfig) -> Iterator[str]:
    table: list[_Segment] = ["profiles", name, "aws"]

    def key(field: str) -> str:
        return _key_path([*table, field])

    aws = profile.aws
    listed = "aws" in profile.sources
    if listed and (aws is None or aws.secret_id is None):
        add = f"add a {_header(table)} table with " if aws is None else "e.g. "
        yield (
            f'{key("secret_id")}: required when "aws" is in sources: {add}secret_id = '
            '"dvs/osigu" (the secret\'s name or ARN)'
        )
    if aws is None:
        return
    if aws.secret_id is not None:
        problem = _secret_id_problem(aws.secret_id)
        if problem:
            yield f"{key('secret_id')}: {problem}"
    if aws.region is not None and not _AWS_REGION_RE.fullmatch(aws.region):
        yield (
            f'{key("region")}: invalid region {_toml_repr(aws.region)}, e.g. "us-east-1" '
            "(leave the key out to use boto3's default chain)"
        )
    if aws.endpoint_url is not None:
        problem = _aws_endpoint_problem(aws.endpoint_url, exposed="the client secret")
        if problem:
            yield f"{key('endpoint_url')}: {problem}"
    if not aws.version_stage:
        yield f'{key("version_stage")}: must not be empty (the default is "AWSCURRENT")'
    yield from _check_key_names(table, aws.client_id_key, aws.client_secret_key)
    if aws.events_queue_url is not None:
        yield from _check_events_queue_url(key("events_queue_url"), aws.events_queue_url, listed)


def _secret_id_problem(secret_id: str) -> str | None:
    if not secret_id:
        return "must not be empty"
    if secret_id.startswith("arn:") and ":secretsmanager:" not in secret_id:
        return (
            f"{_toml_repr(secret_id)} is not a Secrets Manager ARN "
            "(arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME); or give the secret's name"
        )
    return None


def _aws_endpoint_problem(url: str, *, exposed: str) -> str | None:
    return _url_problem(
        url, example='"https://secretsmanager.us-east-1.amazonaws.com"', exposed=exposed
    )


def _check_events_queue_url(where: str, url: str, listed: bool) -> Iterator[str]:
    example = '"https://sqs.us-east-1.amazonaws.com/123456789012/dvs-agent-host1"'
    if not listed:
        yield (
            f'{where}: rotation events are read only for the aws source: add "aws" to sources, '
            "or leave the key out"
        )
    problem = _url_problem(url, example=example, exposed="the rotation events")
    if problem is None and not _SQS_QUEUE_PATH_RE.fullmatch(urlsplit(url).path):
        problem = (
            f"{_toml_repr(url)} is not an SQS queue URL (/ACCOUNT_ID/QUEUE_NAME), e.g. {example}"
        )
    if problem:
        yield f"{where}: {problem}"


def _check_key_names(table: list[_Segment], id_key: str, secret_key: str) -> Iterator[str]:
    for field, value in (("client_id_key", id_key), ("client_secret_key", secret_key)):
        if not value:
            yield f"{_key_path([*table, field])}: must not be empty"
    if id_key and id_key == secret_key:
        yield f"{_key_path([*table, 'client_secret_key'])}: must differ from client_id_key"


def _mount_path_problem(value: str, example: str) -> str | None:
    """A Vault mount or secret path: ``a/b``, no empty, ``.`` or ``..`` segments."""
    if not value.strip("/"):
        return f"must not be empty, e.g. {_toml_repr(example)}"
    if value != value.strip("/"):
        return (
            f"{_toml_repr(value)}: write it without a leading or trailing '/': "
            f"{_toml_repr(value.strip('/'))}"
        )
    if any(segment in ("", ".", "..") for segment in value.split("/")):
        return f"{_toml_repr(value)}: has an empty, '.' or '..' segment, e.g. {_toml_repr(example)}"
    return None


def _check_file_sink(where: str, sink: FileSinkConfig) -> Iterator[str]:
    if not sink.path:
        yield f"{where}.path: must not be empty"
    elif sink.path.endswith(os.sep):
        yield f"{where}.path: {_toml_repr(sink.path)} names a directory; give the file's path"
    for id_key in ("owner", "group"):
        if getattr(sink, id_key) == "":
            yield f"{where}.{id_key}: must not be empty (leave the key out to keep the default)"
    if sink.on_change is not None and (not sink.on_change or not sink.on_change[0]):
        yield (
            f"{where}.on_change: must be a non-empty argv list, e.g. "
            '["systemctl", "reload", "my-app"] (leave the key out to run nothing)'
        )
    if sink.on_change_timeout <= timedelta(0):
        yield f"{where}.on_change_timeout: must be more than 0"
    elif sink.on_change_timeout > MAX_ON_CHANGE_TIMEOUT:
        yield (
            f"{where}.on_change_timeout: must be at most 5 minutes (the command is killed "
            "then; a longer job should be started by it, not run in it)"
        )


def _check_vault_sink(
    where: str, sink: VaultSinkConfig, profile: str, profile_vault: VaultSourceConfig | None
) -> Iterator[str]:
    table = _header(["profiles", profile, "vault"])
    problem = _mount_path_problem(sink.path, "dvs/osigu-token")
    if problem:
        yield f"{where}.path: {problem}"
    if sink.address == "":
        yield (
            f"{where}.address: must not be empty (leave the key out to use the address of "
            f"{table}, else ${VAULT_ADDR_ENV})"
        )
    elif sink.address is not None:
        problem = _vault_address_problem(sink.address)
        if problem:
            yield f"{where}.address: {problem}"
    for file_key in ("token_file", "role_id_file", "secret_id_file", "namespace", "ca_cert"):
        if getattr(sink, file_key) == "":
            yield (
                f"{where}.{file_key}: must not be empty (leave the key out to use the value of "
                f"{table})"
            )
    for mount_key, example in (("approle_mount", "approle"), ("mount", "secret")):
        value = getattr(sink, mount_key)
        if value is not None:
            problem = _mount_path_problem(value, example)
            if problem:
                yield f"{where}.{mount_key}: {problem}"
    if sink.ca_cert:
        problem = _readable_file_problem(sink.ca_cert)
        if problem:
            yield f"{where}.ca_cert: {_toml_repr(sink.ca_cert)}: {problem}"
    if sink.mount is None and profile_vault is not None and profile_vault.kv_version == 1:
        yield (
            f"{where}.mount: a vault sink writes to a KV v2 engine, and the mount it takes from "
            f"{table} ({_toml_repr(profile_vault.mount)}) is KV v1 there (kv_version = 1): set "
            "mount to a KV v2 engine's mount"
        )
    merged = sink.merged(profile_vault)
    if merged.auth_method == "approle":
        for file_key in ("role_id_file", "secret_id_file"):
            if getattr(sink, file_key) is None and not getattr(merged, file_key):
                yield (
                    f'{where}.{file_key}: required with auth_method = "approle": {table} '
                    "leaves it empty, so set it here"
                )


def _check_aws_sink(where: str, sink: AwsSinkConfig, profile: str) -> Iterator[str]:
    table = _header(["profiles", profile, "aws"])
    problem = _secret_id_problem(sink.secret_id)
    if problem:
        yield f"{where}.secret_id: {problem}"
    elif sink.create and sink.secret_id.startswith("arn:"):
        yield (
            f"{where}.create: a secret is created by name, and an ARN is known only once it "
            "exists: give secret_id as the secret's name, or leave create out"
        )
    if sink.region is not None and not _AWS_REGION_RE.fullmatch(sink.region):
        yield (
            f'{where}.region: invalid region {_toml_repr(sink.region)}, e.g. "us-east-1" '
            f"(leave the key out to use the region of {table}, else boto3's default chain)"
        )
    if sink.endpoint_url is not None:
        problem = _aws_endpoint_problem(sink.endpoint_url, exposed="the token")
        if problem:
            yield f"{where}.endpoint_url: {problem}"


def _check_redis_sink(where: str, sink: RedisSinkConfig, profile: str) -> Iterator[str]:
    problem = _redis_url_problem(sink.url)
    if problem:
        yield f"{where}.url: {problem}"
    if sink.key == "":
        yield (
            f"{where}.key: must not be empty (leave the key out for "
            f"{_toml_repr(DEFAULT_REDIS_KEY.format(profile=profile))})"
        )
    if sink.username == "":
        yield f"{where}.username: must not be empty (leave the key out for Redis's default user)"
    if sink.password_file == "":
        yield f"{where}.password_file: must not be empty (the path of a file holding the password)"
    if sink.password_env is not None and not _ENV_VAR_RE.fullmatch(sink.password_env):
        yield (
            f"{where}.password_env: {_toml_repr(sink.password_env)} is not a valid environment "
            "variable name (letters, digits and '_', not starting with a digit)"
        )
    if sink.password_file is not None and sink.password_env is not None:
        yield f"{where}.password_env: set password_file or password_env, not both"
    if sink.username and sink.password_file is None and sink.password_env is None:
        yield (
            f"{where}.username: a Redis user logs in with a password: set password_file "
            "(a file holding it) or password_env (a variable holding it)"
        )


def _redis_url_problem(url: str) -> str | None:
    """``redis://`` or ``rediss://`` ``HOST[:PORT][/DB]``, without ``user:password@``."""
    example = '"rediss://redis.internal:6379/0"'
    split = _split_url(
        url,
        schemes=("redis", "rediss"),
        kind="a redis:// or rediss:// (TLS) URL",
        example=example,
        userinfo=": a password never sits in this file; set username, and password_file or "
        "password_env",
    )
    if isinstance(split, str):
        return split
    parts, host = split
    port = parts.port
    if not _REDIS_HOST_RE.fullmatch(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"{_toml_repr(url)}: {host!r} is not a host name or address"
    if port == 0:
        return f"{_toml_repr(url)}: the port must be a number from 1 to 65535"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return (
            f"{_toml_repr(url)}: options after '?' or '#' are not supported; write "
            f"redis[s]://HOST[:PORT][/DB], e.g. {example}"
        )
    if not re.fullmatch(r"/?|/\d+", parts.path):
        return (
            f"{_toml_repr(url)}: the path is the database number, an integer "
            f"(redis[s]://HOST[:PORT][/DB]), e.g. {example}"
        )
    if parts.scheme.lower() == "redis" and not _is_loopback(host):
        return (
            f"plain redis:// to {host} would send every token (and the Redis password) across "
            f"the network in clear: use rediss:// (TLS), e.g. {example}; redis:// is for "
            "loopback hosts only"
        )
    return None


def _token_url_problem(url: str) -> str | None:
    return _url_problem(
        url, example='"https://api.osigu.com/v1/oauth/token"', exposed="the client secret"
    )


def _resolve_vault_address(address: str | None, environ: Mapping[str, str], *, key: str) -> str:
    if address:
        problem = _vault_address_problem(address)
        if problem:
            raise ConfigError(f"{key}: {problem}")
        return address
    from_env = environ.get(VAULT_ADDR_ENV, "")
    if not from_env:
        raise ConfigError(
            f"{key}: no Vault address: set it in the config file "
            f'(e.g. "https://vault.internal:8200") or export ${VAULT_ADDR_ENV}'
        )
    problem = _vault_address_problem(from_env)
    if problem:
        raise ConfigError(f"{key}: not set, and ${VAULT_ADDR_ENV} is invalid: {problem}")
    return from_env


def _vault_address_problem(url: str) -> str | None:
    problem = _url_problem(url, example='"https://vault.internal:8200"', exposed="the Vault token")
    if problem is None and re.fullmatch(r"/+v1(?:/.*)?", urlsplit(url).path):
        problem = (
            f"{_toml_repr(url)}: give the server's base URL, without /v1, "
            'e.g. "https://vault.internal:8200"'
        )
    return problem


def _split_url(
    url: str, *, schemes: tuple[str, ...], kind: str, example: str, userinfo: str
) -> tuple[SplitResult, str] | str:
    """``(parts, host)`` of a URL of one of ``schemes``, or what is wrong with it."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # never echo it: the part before '@' may be a password
        return f"must not contain user:password@{userinfo}"
    if parts.scheme.lower() not in schemes or not parts.netloc:
        return f"{_toml_repr(url)} is not {kind}, e.g. {example}"
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"{_toml_repr(url)} is not a valid URL: {exc}"
    if not host:
        return f"{_toml_repr(url)} has no host, e.g. {example}"
    return parts, host


def _url_problem(url: str, *, example: str, exposed: str) -> str | None:
    """An absolute http(s) URL, plain http only for loopback hosts, no ``user:password@``."""
    split = _split_url(
        url,
        schemes=("http", "https"),
        kind="an absolute http(s) URL",
        example=example,
        userinfo="; credentials come from the profile's sources, never from this file",
    )
    if isinstance(split, str):
        return split
    parts, host = split
    if parts.scheme.lower() == "http" and not _is_loopback(host):
        return (
            f"plain http is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost): "
            f"{exposed} would cross the network in clear; use https://{parts.netloc}"
            f"{parts.path}"
        )
    return None


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _readable_file_problem(path: str) -> str | None:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file"
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return "no such file"
    except PermissionError:
        return f"permission denied: the agent (uid {os.getuid()}) cannot read it"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return None


def _parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; raises ValueError with what to write instead."""
    form = 'expected "HOST:PORT", e.g. "127.0.0.1:8787" or "[::1]:8787" ("" disables)'
    host, colon, port_text = value.rpartition(":")
    if not colon:
        raise ValueError(f"{_toml_repr(value)}: {form}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_toml_repr(value)}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f'{_toml_repr(value)}: write an IPv6 host in brackets, e.g. "[::1]:8787"')
    elif not host:
        raise ValueError(
            f'{_toml_repr(value)}: the host is missing: "127.0.0.1:PORT" for loopback, '
            '"0.0.0.0:PORT" for every interface'
        )
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{_toml_repr(value)}: {host!r} is not a host name or address")
    elif re.fullmatch(r"[\d.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{_toml_repr(value)}: {host!r} is not an IPv4 address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{_toml_repr(value)}: the port must be a number from 1 to 65535")
    return host, int(port_text)


# ------------------------------------------------------------- what sinks write, sources read


@dataclass(frozen=True)
class _Target:
    """What a sink writes (or a source reads): two sinks on one target are an error."""

    #: the sink type (a source's target has the type of the sink that could write it)
    kind: str
    #: the profile it belongs to
    profile: str
    #: the key path that messages name
    key: str
    #: how messages describe it
    what: str
    #: equal identities of one kind are one target (aws: see :func:`_same_aws_secret`)
    identity: tuple[str, ...]
    #: file | secret | key
    noun: str


def _sink_target(name: str, index: int, profile: ProfileConfig, sink: SinkConfig) -> _Target | None:
    """What ``sink`` writes; None when a key it depends on is invalid (reported already)."""

    def key(field: str) -> str:
        return _key_path(["profiles", name, "sinks", index, field])

    if isinstance(sink, FileSinkConfig):
        if not sink.path:
            return None
        return _Target(
            "file", name, key("path"), _toml_repr(sink.path), (_normalised(sink.path),), "file"
        )
    if isinstance(sink, VaultSinkConfig):
        vault = sink.merged(profile.vault)
        return _vault_target(
            name, key("path"), vault.address, vault.namespace, vault.mount, vault.path
        )
    if isinstance(sink, AwsSinkConfig):
        aws = sink.merged(profile.aws)
        return _aws_target(name, key("secret_id"), aws.secret_id, aws.region, aws.endpoint_url)
    endpoint = _redis_endpoint(sink.url)
    if endpoint is None:
        return None
    host, port, db = endpoint
    redis_key = sink.resolved_key(name)
    return _Target(
        "redis",
        name,
        key("url" if sink.key is None else "key"),
        f"the Redis key {_toml_repr(redis_key)} on {host}:{port}/{db}",
        (host, port, db, redis_key),
        "key",
    )


def _source_targets(name: str, profile: ProfileConfig) -> Iterator[_Target]:
    """The secrets that the profile's listed ``vault`` and ``aws`` sources read."""
    vault = profile.vault
    if "vault" in profile.sources and vault is not None and vault.path is not None:
        target = _vault_target(
            name,
            _key_path(["profiles", name, "vault", "path"]),
            vault.address,
            vault.namespace,
            vault.mount,
            vault.path,
        )
        if target is not None:
            yield target
    aws = profile.aws
    if "aws" in profile.sources and aws is not None and aws.secret_id is not None:
        target = _aws_target(
            name,
            _key_path(["profiles", name, "aws", "secret_id"]),
            aws.secret_id,
            aws.region,
            aws.endpoint_url,
        )
        if target is not None:
            yield target


def _vault_target(
    profile: str, key: str, address: str | None, namespace: str | None, mount: str, path: str
) -> _Target | None:
    if _mount_path_problem(mount, "secret") or _mount_path_problem(path, "dvs/osigu"):
        return None
    if address is not None and (not address or _vault_address_problem(address)):
        return None
    server = f"${VAULT_ADDR_ENV}" if address is None else _normalised_url(address)
    space = (namespace or "").strip("/")
    in_space = f" in namespace {_toml_repr(space)}" if space else ""
    what = f"the Vault secret {_toml_repr(f'{mount}/{path}')}{in_space} at {server}"
    return _Target("vault", profile, key, what, (server, space, mount, path), "secret")


def _aws_target(
    profile: str, key: str, secret_id: str, region: str | None, endpoint_url: str | None
) -> _Target | None:
    if _secret_id_problem(secret_id):
        return None
    endpoint = "" if endpoint_url is None else _normalised_url(endpoint_url)
    identity = (secret_id, region or "", endpoint)
    return _Target("aws", profile, key, f"the secret {_toml_repr(secret_id)}", identity, "secret")


def _redis_endpoint(url: str) -> tuple[str, str, str] | None:
    """``(host, port, db)`` of a valid redis ``url``, defaults filled in; else None."""
    if _redis_url_problem(url):
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_REDIS_PORT
    db = int(parts.path.strip("/") or DEFAULT_REDIS_DB)
    return host.lower().rstrip("."), str(port), str(db)


def _same_target(a: _Target, b: _Target) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "aws":
        return _same_aws_secret(a.identity, b.identity)
    return a.identity == b.identity


def _same_aws_secret(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two ``(secret_id, region, endpoint)`` name one secret, as far as one can tell.

    A name and an ARN ending in ``:secret:NAME`` or ``:secret:NAME-XXXXXX`` are one secret;
    two regions (given or in an ARN) or two endpoints that both are known and differ are not.
    """
    a_id, a_region, a_endpoint = a
    b_id, b_region, b_endpoint = b
    a_arn = _SECRET_ARN_RE.fullmatch(a_id)
    b_arn = _SECRET_ARN_RE.fullmatch(b_id)
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


def _duplicate_target(target: _Target, other: _Target) -> str:
    if target.kind == "file":
        return (
            f"{target.key}: {target.what} is also the path of {other.key}; "
            "two sinks cannot write one file"
        )
    also = "" if target.what == other.what else f" ({other.what})"
    return (
        f"{target.key}: {target.what} is also written by {other.key}{also}; "
        f"two sinks cannot write one {target.noun}"
    )


def _source_targeted(target: _Target, source: _Target) -> str:
    if source.profile == target.profile:
        return (
            f"{target.key}: {target.what} is the profile's own credential source "
            f"({source.key}): it would trigger rotations forever (every token written there "
            "changes the source's version); write the token to another secret"
        )
    return (
        f"{target.key}: {target.what} is the credential source of profile "
        f"{_toml_repr(source.profile)} ({source.key}): the token would overwrite that "
        "profile's credentials; write it to another secret"
    )


# ------------------------------------------------------------------------------------ helpers


def _normalised(path: str) -> str:
    """An absolute, normalised path, for comparing two paths (``//a`` and ``/a`` are one)."""
    return re.sub(r"^/+", "/", os.path.abspath(path))


def _normalised_url(url: str) -> str:
    """A URL for comparing two: scheme and host lowercased, no trailing '/'."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def _is_explicit_path(path: str) -> bool:
    """Absolute, or relative on purpose (``./x``, ``../x``, ``.``)."""
    return os.path.isabs(path) or path in (".", "..") or path.startswith(("./", "../"))


def _key_path(segments: list[_Segment]) -> str:
    """``["profiles", "a.b", "sinks", 0]`` → ``profiles."a.b".sinks[0]`` (TOML key syntax)."""
    text = ""
    for segment in segments:
        if isinstance(segment, int):
            text += f"[{segment}]"
            continue
        name = "*" if segment is None else segment
        if segment is not None and not _BARE_KEY_RE.fullmatch(name):
            name = json.dumps(name)
        text = f"{text}.{name}" if text else name
    return text


def _header(segments: list[_Segment]) -> str:
    """The TOML header of a table: ``[agent]``, ``[[profiles.dvs.sinks]]``."""
    if segments and isinstance(segments[-1], int):
        return f"[[{_key_path(segments[:-1])}]]"
    return f"[{_key_path(segments)}]"


def _toml_repr(value: object) -> str:
    """A value as it would be written in TOML (for messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _listing(values: Iterable[object]) -> str:
    return ", ".join(_toml_repr(value) for value in values)
