"""The config's schema: the core tables, and the profile table built from the kinds in use.

The core (``[agent]``, ``[health]``, a profile's own keys, ``[profiles.NAME.rotation]``) is
fixed. A profile's source tables (``[profiles.NAME.vault]``, ...) and the members of its
``sinks`` union are the config Structs of the registered kinds (DESIGN §11): :func:`build_schema`
makes the profile and file Structs from them, so that one :func:`msgspec.convert` checks every
key and every error carries its path. Every table is frozen, keyword-only and refuses unknown
keys (typos must not pass silently).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Union, cast

import msgspec

from agent.config.values import Duration, parse_listen
from agent.proxy.settings import ProxyConfig

if TYPE_CHECKING:
    from agent.plugin import FleetStoreKind, SinkKind, SourceKind

#: the token endpoint of each ``environment`` (DESIGN §2); ``token_url`` overrides it
ENVIRONMENT_TOKEN_URLS: Mapping[str, str] = MappingProxyType(
    {
        "sandbox": "https://sandbox.osigu.com/v1/oauth/token",
        "production": "https://api.osigu.com/v1/oauth/token",
    }
)


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
        return parse_listen(self.listen)


class RotationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME.rotation]``: rotation triggers (DESIGN §5)."""

    #: how often the source's version is checked; 0 disables polling, else at least 1 s
    poll_interval: Duration = Duration(seconds=30)


class ProfileConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME]``: one credential-source chain, one token endpoint, its sinks.

    The profile Struct of a loaded config is a subclass made by :func:`build_schema`: it adds
    one field per source kind (its table) and types ``sinks`` as the union of the sink kinds'
    Structs. Read a source table with :meth:`table`.
    """

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
    #: fallback order: the first source that yields credentials wins (names of source kinds)
    sources: list[str] = msgspec.field(default_factory=lambda: ["env"])
    rotation: RotationConfig = msgspec.field(default_factory=RotationConfig)
    #: at least one unless the profile has a proxy; each a sink kind's Struct
    sinks: list[Any] = msgspec.field(default_factory=list)
    #: ``[profiles.NAME.fleet]``: a fleet store kind's Struct (DESIGN §13); None: no fleet mode
    fleet: Any = None
    #: ``[profiles.NAME.proxy]``: the local bearer proxy (DESIGN §14); None: no proxy
    proxy: ProxyConfig | None = None

    @property
    def resolved_token_url(self) -> str:
        """``token_url`` when set, else the URL of ``environment``."""
        return self.token_url or ENVIRONMENT_TOKEN_URLS[self.environment]

    def tables(self) -> dict[str, msgspec.Struct]:
        """The source tables present (or defaulted), by kind name."""
        found: dict[str, msgspec.Struct] = {}
        for name in self.__struct_fields__:
            if name not in CORE_PROFILE_KEYS:
                value = getattr(self, name)
                if value is not None:
                    found[name] = value
        return found

    def table(self, kind: str) -> msgspec.Struct | None:
        """The ``[profiles.NAME.<kind>]`` table, or None when the profile has none."""
        if kind in CORE_PROFILE_KEYS:
            return None
        value: msgspec.Struct | None = getattr(self, kind, None)
        return value


#: the keys of a profile table that are not source tables (no kind may take these names)
CORE_PROFILE_KEYS = frozenset(ProfileConfig.__struct_fields__)


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole file (its ``profiles`` typed by :func:`build_schema`)."""

    agent: AgentSection = msgspec.field(default_factory=AgentSection)
    health: HealthSection = msgspec.field(default_factory=HealthSection)
    #: profile name → profile; at least one
    profiles: dict[str, ProfileConfig]


@dataclass(frozen=True, slots=True)
class Schema:
    """The Structs a config file decodes into, for one set of kinds."""

    config: type[Config]
    profile: type[ProfileConfig]
    #: the kinds, by name, in the order of registration
    sources: Mapping[str, SourceKind[Any]]
    sinks: Mapping[str, SinkKind[Any]]
    fleets: Mapping[str, FleetStoreKind[Any]] = field(default_factory=lambda: MappingProxyType({}))


@functools.cache
def build_schema(
    sources: tuple[SourceKind[Any], ...],
    sinks: tuple[SinkKind[Any], ...],
    fleets: tuple[FleetStoreKind[Any], ...] = (),
) -> Schema:
    """The file's Structs: the profile table gains a field per source kind, ``sinks`` is the
    tagged union (on ``type``) of the sink kinds' Structs, and ``fleet`` that (on ``store``)
    of the fleet store kinds'.

    Memoized: the same kinds give the same classes, so configs compare equal across loads.
    """
    options: dict[str, Any] = {"frozen": True, "forbid_unknown_fields": True, "kw_only": True}
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for kind in sources:
        if kind.default_table:
            fields.append(
                (kind.name, kind.config_type, msgspec.field(default_factory=kind.config_type))
            )
        else:
            fields.append((kind.name, kind.config_type | None, None))
    members = tuple(kind.config_type for kind in sinks)
    sink_list: Any = list[Union[members]]  # type: ignore[valid-type]  # noqa: UP007
    fields.append(("sinks", sink_list, msgspec.field(default_factory=list)))
    if fleets:
        stores = tuple(kind.config_type for kind in fleets)
        fleet_type: Any = Union[stores]  # noqa: UP007
        fields.append(("fleet", fleet_type | None, None))
    profile = cast(
        "type[ProfileConfig]",
        msgspec.defstruct(
            "ProfileConfig", fields, bases=(ProfileConfig,), module=__name__, **options
        ),
    )
    profiles: Any = dict[str, profile]  # type: ignore[valid-type]
    config = cast(
        "type[Config]",
        msgspec.defstruct(
            "Config", [("profiles", profiles)], bases=(Config,), module=__name__, **options
        ),
    )
    return Schema(
        config=config,
        profile=profile,
        sources=MappingProxyType({kind.name: kind for kind in sources}),
        sinks=MappingProxyType({kind.name: kind for kind in sinks}),
        fleets=MappingProxyType({kind.name: kind for kind in fleets}),
    )
