"""Which source and sink kinds exist: the built-ins by name, others from entry points (DESIGN §11).

A kind is found by its name (``"vault"`` in ``sources``, ``type = "redis"`` of a sink). Built-ins
are one line each in :data:`BUILTIN_SOURCES` / :data:`BUILTIN_SINKS`; third-party packages add
kinds through the entry-point groups of :data:`GROUPS`. A third-party kind never replaces a
built-in one (an entry point with a built-in's name is ignored, and ``check`` says so). Entry
points are looked up only when a config names a kind that is not built in (or a message lists
the kinds available), and a plug-in is imported only when a config uses it: a broken plug-in is
an error naming it and its distribution, for the configs that use it and no others.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from agent import __version__
from agent.config.schema import CORE_PROFILE_KEYS, Schema, build_schema
from agent.errors import ConfigError
from agent.keypath import listing, toml_repr
from agent.masking import outside
from agent.plugin import (
    API_VERSION,
    FleetStoreKind,
    LoginKind,
    SinkKind,
    SourceKind,
    TriggerKind,
)

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

Role = Literal["source", "sink", "login", "fleet"]

#: the built-in credential sources, in the order ``check`` lists them: name → module:attribute
BUILTIN_SOURCES: Mapping[str, str] = MappingProxyType(
    {
        "env": "agent.sources.env:KIND",
        "vault": "agent.sources.vault:KIND",
        "aws": "agent.sources.aws:KIND",
    }
)
#: the built-in sinks: name → module:attribute
BUILTIN_SINKS: Mapping[str, str] = MappingProxyType(
    {
        "file": "agent.sinks.file:KIND",
        "vault": "agent.sinks.vault:KIND",
        "aws": "agent.sinks.aws:KIND",
        "redis": "agent.sinks.redis:KIND",
    }
)
#: the built-in Vault login methods (``auth_method``): name → module:attribute
BUILTIN_LOGINS: Mapping[str, str] = MappingProxyType(
    {
        "token": "agent.logins.token:KIND",
        "approle": "agent.logins.approle:KIND",
        "jwt": "agent.logins.jwt:KIND",
        "kubernetes": "agent.logins.kubernetes:KIND",
        "cert": "agent.logins.cert:KIND",
    }
)
#: the built-in fleet stores (``[profiles.NAME.fleet]`` ``store``): name → module:attribute
BUILTIN_FLEET_STORES: Mapping[str, str] = MappingProxyType(
    {
        "redis": "agent.fleet.redis:KIND",
        "vault": "agent.fleet.vault:KIND",
    }
)
#: the built-in rotation triggers (besides polling and SIGHUP): name → module:attribute
BUILTIN_TRIGGERS: Mapping[str, str] = MappingProxyType({"sqs": "agent.triggers.sqs:KIND"})
#: the entry-point group of each role
GROUPS: Mapping[Role, str] = MappingProxyType(
    {
        "source": "dvs_agent.sources",
        "sink": "dvs_agent.sinks",
        "login": "dvs_agent.vault_logins",
        "fleet": "dvs_agent.fleet_stores",
    }
)
_BASES: Mapping[Role, type[Any]] = MappingProxyType(
    {"source": SourceKind, "sink": SinkKind, "login": LoginKind, "fleet": FleetStoreKind}
)
#: the distribution that ships the built-ins
OWN_DISTRIBUTION = "dvs-agent"


class PluginError(ConfigError):
    """A kind that cannot be used: not provided, or its plug-in does not load."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """Where a kind comes from, for ``check`` and for messages."""

    role: Role
    name: str
    #: ``module:attribute``
    value: str
    distribution: str
    version: str
    builtin: bool

    def __str__(self) -> str:
        return f"{self.role} {self.name} ({self.distribution} {self.version})"


def _entry_points(group: str) -> Iterable[EntryPoint]:
    import importlib.metadata  # ~20 ms: only when a config names a kind that is not built in

    return importlib.metadata.entry_points(group=group)


def _load(value: str) -> Any:
    """The object ``module:attribute`` names (what an entry point's ``load()`` does)."""
    module, _, attribute = value.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attribute.split(".") if attribute else ():
        obj = getattr(obj, part)
    return obj


class Registry:
    """The kinds of one process (the CLI makes one; tests make their own). Thread-safe."""

    def __init__(
        self,
        *,
        sources: Mapping[str, str] = BUILTIN_SOURCES,
        sinks: Mapping[str, str] = BUILTIN_SINKS,
        logins: Mapping[str, str] = BUILTIN_LOGINS,
        fleets: Mapping[str, str] = BUILTIN_FLEET_STORES,
        discover: Callable[[str], Iterable[EntryPoint]] = _entry_points,
    ) -> None:
        self._builtin: Mapping[Role, Mapping[str, str]] = {
            "source": sources,
            "sink": sinks,
            "login": logins,
            "fleet": fleets,
        }
        self._discover = discover
        self._lock = threading.RLock()
        self._third: dict[Role, dict[str, PluginInfo]] | None = None
        #: third-party entry points that were ignored, with why
        self._shadowed: list[str] = []
        self._kinds: dict[tuple[Role, str], Any] = {}

    # ------------------------------------------------------------------ discovery
    def names(self, role: Role) -> list[str]:
        """Every kind of ``role`` available: the built-ins, then the third-party ones."""
        return [*self._builtin[role], *sorted(self._third_party()[role])]

    def provides(self, role: Role, name: str) -> bool:
        return name in self._builtin[role] or name in self._third_party()[role]

    def is_builtin(self, role: Role, name: str) -> bool:
        return name in self._builtin[role]

    def shadowed(self) -> list[str]:
        """Entry points that were ignored (a built-in's name, a bad name), as messages."""
        self._third_party()
        return list(self._shadowed)

    def info(self, role: Role, name: str) -> PluginInfo:
        if name in self._builtin[role]:
            return PluginInfo(
                role, name, self._builtin[role][name], OWN_DISTRIBUTION, __version__, True
            )
        found = self._third_party()[role].get(name)
        if found is None:
            raise PluginError(f"no {role} plug-in provides {toml_repr(name)}")
        return found

    def _third_party(self) -> dict[Role, dict[str, PluginInfo]]:
        with self._lock:
            if self._third is None:
                found: dict[Role, dict[str, PluginInfo]] = {role: {} for role in GROUPS}
                for role, group in GROUPS.items():
                    for entry in self._discover(group):
                        self._admit(role, entry, found[role])
                self._third = found
            return self._third

    def _admit(self, role: Role, entry: EntryPoint, found: dict[str, PluginInfo]) -> None:
        dist = entry.dist
        distribution = dist.name if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        where = f"entry point {entry.name} = {entry.value!r} of {distribution} {version}"
        if entry.name in self._builtin[role]:
            self._shadowed.append(
                f"{where} ({entry.group}) ignored: {entry.name} is a built-in {role}, and a "
                "plug-in never replaces a built-in"
            )
        elif role == "source" and entry.name in CORE_PROFILE_KEYS:
            self._shadowed.append(
                f"{where} ({entry.group}) ignored: {entry.name} is a key of every profile, "
                "not a name a source can take"
            )
        elif entry.name in found:
            self._shadowed.append(
                f"{where} ({entry.group}) ignored: {found[entry.name]} provides "
                f"{entry.name} already"
            )
        else:
            found[entry.name] = PluginInfo(
                role, entry.name, entry.value, distribution, version, False
            )

    # ------------------------------------------------------------------ loading
    def kind(self, role: Role, name: str) -> Any:
        """The kind object (a :class:`SourceKind` or :class:`SinkKind`); imports its module."""
        with self._lock:
            loaded = self._kinds.get((role, name))
            if loaded is not None:
                return loaded
            info = self.info(role, name)
            loaded = self._load(info)
            self._kinds[(role, name)] = loaded
            return loaded

    def source(self, name: str) -> SourceKind[Any]:
        kind: SourceKind[Any] = self.kind("source", name)
        return kind

    def sink(self, name: str) -> SinkKind[Any]:
        kind: SinkKind[Any] = self.kind("sink", name)
        return kind

    def fleet(self, name: str) -> FleetStoreKind[Any]:
        kind: FleetStoreKind[Any] = self.kind("fleet", name)
        return kind

    def login(self, name: str) -> LoginKind:
        """The Vault login method ``name`` (:class:`PluginError` listing the methods available
        when none provides it)."""
        if not self.provides("login", name):
            raise PluginError(
                f"invalid value {toml_repr(name)}; expected one of: {listing(self.names('login'))}"
            )
        kind: LoginKind = self.kind("login", name)
        return kind

    def _load(self, info: PluginInfo) -> Any:
        def refused(why: str) -> PluginError:
            return PluginError(
                f"the {info.role} plug-in {toml_repr(info.name)} ({info.value}, from "
                f"{info.distribution} {info.version}) cannot be used: {why}"
            )

        try:
            obj = _load(info.value)
            if isinstance(obj, type):
                obj = obj()
        except Exception as exc:  # a plug-in's own bug: say whose it is
            raise refused(f"{type(exc).__name__}: {outside(str(exc))}") from None
        base = _BASES[info.role]
        if not isinstance(obj, base):
            raise refused(f"it is a {type(obj).__name__}, not a agent.plugin.{base.__name__}")
        if getattr(obj, "api_version", None) != API_VERSION:
            raise refused(
                f"it was written for plug-in API version {getattr(obj, 'api_version', None)!r}, "
                f"this dvs-agent has version {API_VERSION}"
            )
        if getattr(obj, "name", None) != info.name:
            raise refused(f"its name is {getattr(obj, 'name', None)!r}, not {info.name!r}")
        if info.role == "login":
            return obj
        config_type = getattr(obj, "config_type", None)
        if not (isinstance(config_type, type) and issubclass(config_type, msgspec.Struct)):
            raise refused("its config_type is not a msgspec.Struct")
        struct_config = config_type.__struct_config__
        tag_field = {"sink": "type", "fleet": "store"}.get(info.role)
        if tag_field is not None and (
            struct_config.tag_field != tag_field or struct_config.tag != info.name
        ):
            raise refused(
                f"its config Struct must be declared with tag={info.name!r}, "
                f"tag_field={tag_field!r} (the table names its kind in {tag_field})"
            )
        if not struct_config.forbid_unknown_fields:
            raise refused(
                "its config Struct must be declared with forbid_unknown_fields=True "
                "(unknown keys are errors)"
            )
        return obj

    def triggers(self) -> list[TriggerKind]:
        """The rotation triggers (built in only); importing each is cheap."""
        found = []
        for name, value in BUILTIN_TRIGGERS.items():
            kind = _load(value)
            assert isinstance(kind, TriggerKind), name
            found.append(kind)
        return found

    # ------------------------------------------------------------------ schema
    def schema(
        self, sources: Iterable[str] = (), sinks: Iterable[str] = (), fleets: Iterable[str] = ()
    ) -> Schema:
        """The Structs for every built-in kind plus the named third-party ones.

        Every built-in is in every schema, so that two configs using only built-ins decode
        into the same classes (a reload compares profiles).
        """
        source_names = [*self._builtin["source"]]
        source_names += sorted({n for n in sources if n not in self._builtin["source"]})
        sink_names = [*self._builtin["sink"]]
        sink_names += sorted({n for n in sinks if n not in self._builtin["sink"]})
        fleet_names = [*self._builtin["fleet"]]
        fleet_names += sorted({n for n in fleets if n not in self._builtin["fleet"]})
        return build_schema(
            tuple(self.source(name) for name in source_names),
            tuple(self.sink(name) for name in sink_names),
            tuple(self.fleet(name) for name in fleet_names),
        )
