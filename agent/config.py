"""The configuration file: TOML → typed, validated, frozen Structs (DESIGN §3).

The TOML text is parsed with :mod:`tomllib` and converted with :func:`msgspec.convert`, so that
every error carries a path; that path is rewritten as the TOML key the user typed
(``profiles.dvs.sinks[0].mode``). Checks that span several keys (URLs, paths, duplicate sinks)
run after the conversion and name their keys the same way.

Durations and file modes are custom types (:class:`Duration`, :class:`FileMode`) that msgspec
hands to :func:`_dec_hook`; every ``timedelta`` field of the schema is a ``Duration``, so a
duration in this file is never parsed any other way.

Secrets never sit in this file: there is no key for one, and a URL (``token_url``, a Vault
``address``, an AWS ``endpoint_url`` or ``events_queue_url``) with a ``user:password@`` part is
refused.

The credential sources ``vault`` and ``aws`` have their own tables (``[profiles.NAME.vault]``,
``[profiles.NAME.aws]``). A table is checked whenever it is present; its required keys (``path``,
``secret_id``) only when its source is listed in ``sources``: a table without its source is
allowed, since a write-back sink of a later release takes its defaults from it.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect as mi

from agent import __version__
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

#: sink types planned for a later release (the supported ones come from ``SinkConfig``)
PLANNED_SINK_TYPES = ("vault", "aws", "redis")

#: the variable that gives the Vault address when ``[profiles.NAME.vault]`` has no ``address``
VAULT_ADDR_ENV = "VAULT_ADDR"
#: token auth without ``token_file``: ``$VAULT_TOKEN``, else this file (resolved by the source)
VAULT_TOKEN_ENV = "VAULT_TOKEN"  # noqa: S105 - a variable name
DEFAULT_VAULT_TOKEN_FILE = "/run/vault/token"  # noqa: S105 - a path

_PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ENV_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_HOSTNAME_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_HOSTNAME_LABEL}(?:\.{_HOSTNAME_LABEL})*\.?")
#: what botocore accepts as a region name (a host label: it becomes part of the endpoint's host)
_AWS_REGION_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: an SQS queue URL's path: /ACCOUNT_ID/QUEUE_NAME
_SQS_QUEUE_PATH_RE = re.compile(r"/[^/]+/[^/]+/?")
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
    present without it (a later write-back sink takes its defaults from it).
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
        if self.address:
            problem = _vault_address_problem(self.address)
            if problem:
                raise ConfigError(f"{key}: {problem}")
            return self.address
        address = environ.get(VAULT_ADDR_ENV, "")
        if not address:
            raise ConfigError(
                f"{key}: no Vault address: set it in the config file "
                f'(e.g. "https://vault.internal:8200") or export ${VAULT_ADDR_ENV}'
            )
        problem = _vault_address_problem(address)
        if problem:
            raise ConfigError(f"{key}: not set, and ${VAULT_ADDR_ENV} is invalid: {problem}")
        return address


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


#: Every sink type of this release. To add one (vault, aws, redis): define its Struct with its
#: own ``tag="..."`` and ``tag_field="type"`` and make this a union, e.g.
#: ``SinkConfig = FileSinkConfig | VaultSinkConfig``; the supported ``type`` values and the
#: error messages follow from it (:func:`sink_types`). A sink without ``type`` must stay a file
#: sink: msgspec requires the tag in a union, so insert ``"file"`` before converting then.
SinkConfig = FileSinkConfig

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
    field_type = _type_at(segments)
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", message):
        key = m[1]
        where = _key_path([*segments, key])
        allowed = _struct_keys(field_type)
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        owner = _owning_table(segments, key)
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


def _owning_table(segments: list[_Segment], key: str) -> list[_Segment] | None:
    """The enclosing table that has ``key``, when it is not the table at ``segments``."""
    for end in range(len(segments) - 1, -1, -1):
        if key in _struct_keys(_type_at(segments[:end])):
            return segments[:end]
    return None


def _type_at(segments: list[_Segment]) -> mi.Type | None:
    """The schema's type at a key path (None when the path leaves the schema)."""
    current: mi.Type = mi.type_info(Config)
    for segment in segments:
        current = _without_none(current)
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
    return _without_none(current)


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


def _check_sink_types(data: Mapping[str, Any]) -> Iterator[str]:
    """Unknown and planned sink ``type`` values, reported before msgspec looks at the sink."""
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
            elif kind in PLANNED_SINK_TYPES and kind not in supported:
                yield (
                    f"{where}: {_not_supported(f'sink type {kind!r}')}; "
                    f"supported: {_listing(supported)}"
                )
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
    sink_paths: dict[str, str] = {}
    for name, profile in config.profiles.items():
        if not _PROFILE_NAME_RE.fullmatch(name):
            yield (
                f"{_key_path(['profiles', name])}: invalid profile name {_toml_repr(name)}: "
                "use letters, digits, '_', '.' and '-', starting with a letter or digit "
                "(it names files and metric labels)"
            )
        yield from _check_profile(name, profile)
        for index, sink in enumerate(profile.sinks):
            if not sink.path:
                continue
            key = _key_path(["profiles", name, "sinks", index, "path"])
            absolute = _normalised(sink.path)
            if absolute in sink_paths:
                yield (
                    f"{key}: {_toml_repr(sink.path)} is also the path of {sink_paths[absolute]}; "
                    "two sinks cannot write one file"
                )
            else:
                sink_paths[absolute] = key


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
        yield from _check_file_sink(key("sinks", index), sink)


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
        if not aws.secret_id:
            yield f"{key('secret_id')}: must not be empty"
        elif aws.secret_id.startswith("arn:") and ":secretsmanager:" not in aws.secret_id:
            yield (
                f"{key('secret_id')}: {_toml_repr(aws.secret_id)} is not a Secrets Manager ARN "
                "(arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME); or give the secret's name"
            )
    if aws.region is not None and not _AWS_REGION_RE.fullmatch(aws.region):
        yield (
            f'{key("region")}: invalid region {_toml_repr(aws.region)}, e.g. "us-east-1" '
            "(leave the key out to use boto3's default chain)"
        )
    if aws.endpoint_url is not None:
        problem = _url_problem(
            aws.endpoint_url,
            example='"https://secretsmanager.us-east-1.amazonaws.com"',
            exposed="the client secret",
        )
        if problem:
            yield f"{key('endpoint_url')}: {problem}"
    if not aws.version_stage:
        yield f'{key("version_stage")}: must not be empty (the default is "AWSCURRENT")'
    yield from _check_key_names(table, aws.client_id_key, aws.client_secret_key)
    if aws.events_queue_url is not None:
        yield from _check_events_queue_url(key("events_queue_url"), aws.events_queue_url, listed)


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


def _token_url_problem(url: str) -> str | None:
    return _url_problem(
        url, example='"https://api.osigu.com/v1/oauth/token"', exposed="the client secret"
    )


def _vault_address_problem(url: str) -> str | None:
    problem = _url_problem(url, example='"https://vault.internal:8200"', exposed="the Vault token")
    if problem is None and re.fullmatch(r"/+v1(?:/.*)?", urlsplit(url).path):
        problem = (
            f"{_toml_repr(url)}: give the server's base URL, without /v1, "
            'e.g. "https://vault.internal:8200"'
        )
    return problem


def _url_problem(url: str, *, example: str, exposed: str) -> str | None:
    """An absolute http(s) URL, plain http only for loopback hosts, no ``user:password@``."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # never echo it: the part before '@' may be a password
        return (
            "must not contain user:password@; credentials come from the profile's sources, "
            "never from this file"
        )
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return f"{_toml_repr(url)} is not an absolute http(s) URL, e.g. {example}"
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"{_toml_repr(url)} is not a valid URL: {exc}"
    if not host:
        return f"{_toml_repr(url)} has no host, e.g. {example}"
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


# ------------------------------------------------------------------------------------ helpers


def _normalised(path: str) -> str:
    """An absolute, normalised path, for comparing two paths (``//a`` and ``/a`` are one)."""
    return re.sub(r"^/+", "/", os.path.abspath(path))


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


def _not_supported(what: str) -> str:
    release = ".".join(__version__.split(".")[:2])
    return f"{what} is not supported by this version of dvs-agent ({release})"
