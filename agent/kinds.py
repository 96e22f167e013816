"""A profile's sources, sinks and fleet store, from its config through the registry (§11, §13).

The core knows kinds only through :class:`~agent.registry.Registry`: this module asks each
kind named by the profile to build itself, with a :class:`~agent.plugin.BuildContext` saying
where its table is. A third-party kind's own failure is reported naming it and its
distribution; the built-ins' errors are their own (:class:`~agent.errors.AgentError`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import msgspec

from agent.config.load import fleet_store_name, sink_kind_name
from agent.config.schema import ProfileConfig
from agent.errors import AgentError, ConfigError
from agent.keypath import Segment
from agent.masking import outside
from agent.plugin import BuildContext, CredentialSource, FleetStore, TokenSink, Where
from agent.recorder import NULL, Recorder
from agent.registry import Registry, Role

T = TypeVar("T")


def build_sources(
    profile: str,
    pc: ProfileConfig,
    *,
    environ: Mapping[str, str],
    logger: logging.Logger,
    registry: Registry,
    metrics: Recorder = NULL,
) -> list[CredentialSource]:
    """The sources of ``pc.sources``, in order. Raises ConfigError for what the config lacks."""
    tables = pc.tables()

    def build(name: str) -> CredentialSource:
        context = _context(profile, [name], pc, tables, environ, logger, registry, metrics)
        kind = registry.source(name)
        return _guarded(registry, "source", name, context, kind.build, tables.get(name))

    return _all_or_none(build, pc.sources)


def build_sinks(
    profile: str,
    pc: ProfileConfig,
    *,
    environ: Mapping[str, str],
    logger: logging.Logger,
    registry: Registry,
    metrics: Recorder = NULL,
) -> list[TokenSink]:
    """The sinks of ``pc.sinks``, in order. Raises ConfigError for what the config lacks."""
    tables = pc.tables()

    def build(index: int) -> TokenSink:
        sink = pc.sinks[index]
        name = sink_kind_name(sink)
        context = _context(
            profile, ["sinks", index], pc, tables, environ, logger, registry, metrics
        )
        return _guarded(registry, "sink", name, context, registry.sink(name).build, sink)

    return _all_or_none(build, range(len(pc.sinks)))


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)
K = TypeVar("K")


def _all_or_none(build: Callable[[K], C], keys: Iterable[K]) -> list[C]:
    """``build(key)`` for each key, in order; when one fails, those built are closed."""
    built: list[C] = []
    try:
        for key in keys:
            built.append(build(key))
    except BaseException:
        for each in built:
            each.close()
        raise
    return built


def describe_source(registry: Registry, profile: str, pc: ProfileConfig, name: str) -> str:
    """``check``'s line about source ``name`` of a profile."""
    tables = pc.tables()
    table = tables.get(name)
    kind = registry.source(name)
    if table is None:
        return name
    return kind.describe(table, Where.of(profile, [name], tables=tables, plugins=registry))


def build_fleet_store(
    profile: str,
    pc: ProfileConfig,
    *,
    environ: Mapping[str, str],
    logger: logging.Logger,
    registry: Registry,
    metrics: Recorder = NULL,
) -> FleetStore | None:
    """The store of ``[profiles.NAME.fleet]`` (None: no fleet mode). Raises ConfigError."""
    if pc.fleet is None:
        return None
    name = fleet_store_name(pc.fleet)
    context = _context(profile, ["fleet"], pc, pc.tables(), environ, logger, registry, metrics)
    return _guarded(registry, "fleet", name, context, registry.fleet(name).build, pc.fleet)


def describe_fleet(registry: Registry, profile: str, pc: ProfileConfig) -> str | None:
    """``check``'s line about the profile's fleet store (None: no fleet mode)."""
    if pc.fleet is None:
        return None
    where = Where.of(profile, ["fleet"], tables=pc.tables(), plugins=registry)
    return registry.fleet(fleet_store_name(pc.fleet)).describe(pc.fleet, where)


def describe_sink(registry: Registry, profile: str, pc: ProfileConfig, index: int) -> str:
    """``check``'s line about sink ``index`` of a profile."""
    sink = pc.sinks[index]
    where = Where.of(profile, ["sinks", index], tables=pc.tables(), plugins=registry)
    return registry.sink(sink_kind_name(sink)).describe(sink, where)


def _context(
    profile: str,
    rest: list[Segment],
    pc: ProfileConfig,
    tables: Mapping[str, msgspec.Struct],
    environ: Mapping[str, str],
    logger: logging.Logger,
    registry: Registry,
    metrics: Recorder,
) -> BuildContext:
    return BuildContext(
        where=Where.of(profile, rest, tables=tables, plugins=registry),
        environ=environ,
        logger=logger,
        timeout=pc.request_timeout.total_seconds(),
        report_expiry=lambda method, at: metrics.login_credential_expiry(profile, method, at),
    )


def _guarded(
    registry: Registry,
    role: Role,
    name: str,
    context: BuildContext,
    build: Callable[[Any, BuildContext], T],
    config: Any,
) -> T:
    """``build(config, context)``; a third-party kind's unexpected exception becomes a
    ConfigError naming it and its distribution."""
    if registry.is_builtin(role, name):
        return build(config, context)
    try:
        return build(config, context)
    except AgentError:
        raise
    except Exception as exc:
        info = registry.info(role, name)
        raise ConfigError(
            f"{context.where.key}: the {role} plug-in {name!r} ({info.distribution} "
            f"{info.version}) failed to start: {type(exc).__name__}: {outside(str(exc))}"
        ) from None
