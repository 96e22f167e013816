"""Config → objects: one :class:`~agent.manager.Profile` from one ``[profiles.NAME]`` table.

Nothing here starts anything: the :class:`~agent.app.Agent` decides when to build (at start,
at a reload), checks the sinks (:func:`checked`) and owns what it gets. A profile that cannot
be built or checked is closed before the error is raised: nothing built for it leaks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import timedelta

from agent.clock import Clock
from agent.config import ProfileConfig
from agent.errors import ConfigError, FleetStoreError
from agent.fleet.coordinator import DEFAULT_LEASE, LEASE_GRACE, Fleet
from agent.keypath import toml_repr
from agent.kinds import build_fleet_store, build_sinks, build_sources
from agent.logs import Redactor
from agent.manager import Profile
from agent.masking import Masker
from agent.oauth import TlsContexts, TokenClient
from agent.plugin import TokenSink
from agent.policy import Timing
from agent.recorder import NULL, Recorder
from agent.registry import Registry
from agent.sources.chain import SourceChain
from agent.state import StateStore


def build_profile(
    name: str,
    pc: ProfileConfig,
    *,
    environ: Mapping[str, str],
    store: StateStore,
    clock: Clock,
    tls: TlsContexts,
    stopping: threading.Event,
    redactor: Redactor | None,
    logger: logging.Logger,
    metrics: Recorder | None,
    registry: Registry,
) -> Profile:
    """The profile ``name``: its sources, sinks and token client (raises ConfigError or
    SinkError for settings that cannot be built; the sinks are checked by the caller)."""
    recorder = NULL if metrics is None else metrics
    sources = build_sources(
        name, pc, environ=environ, logger=logger, registry=registry, metrics=recorder
    )
    on_error = None if metrics is None else (lambda source: metrics.source_error(name, source))
    sinks: list[TokenSink] = []
    try:
        sinks.extend(
            build_sinks(
                name, pc, environ=environ, logger=logger, registry=registry, metrics=recorder
            )
        )
        client = _token_client(name, pc, clock=clock, tls=tls, stopping=stopping)
        timing = Timing(
            refresh_before_expiry=pc.refresh_before_expiry,
            reread_on_schedule=pc.rotation.poll_interval <= timedelta(0),
        )
        fleet = _fleet(
            name,
            pc,
            environ=environ,
            clock=clock,
            timing=timing,
            stopping=stopping,
            redactor=redactor,
            logger=logger,
            registry=registry,
            metrics=recorder,
        )
    except BaseException:  # what was built for it is closed: nothing of it may leak
        for source in sources:
            source.close()
        for sink in sinks:
            sink.close()
        raise
    return Profile(
        name,
        chain=SourceChain(sources, profile=name, logger=logger, on_error=on_error),
        client=client,
        sinks=sinks,
        store=store,
        timing=timing,
        clock=clock,
        redactor=redactor,
        logger=logger,
        metrics=metrics,
        fleet=fleet,
    )


def _fleet(
    name: str,
    pc: ProfileConfig,
    *,
    environ: Mapping[str, str],
    clock: Clock,
    timing: Timing,
    stopping: threading.Event,
    redactor: Redactor | None,
    logger: logging.Logger,
    registry: Registry,
    metrics: Recorder,
) -> Fleet | None:
    """The profile's part in its fleet (DESIGN §13), None without ``[profiles.NAME.fleet]``."""
    store = build_fleet_store(
        name, pc, environ=environ, logger=logger, registry=registry, metrics=metrics
    )
    if store is None:
        return None
    try:
        try:
            store.check()
        except FleetStoreError as exc:  # never the profile's failure: it mints alone
            logger.warning(
                "%s: %s; the agent asks the auth server on its own until this is fixed",
                store.name,
                redactor.shown(exc) if redactor is not None else exc,
                extra={"profile": name, "event": "fleet_store_down"},
            )
        lease = getattr(pc.fleet, "lease", DEFAULT_LEASE)
        return Fleet(
            name,
            store,
            lease=lease,
            token_url=pc.resolved_token_url,
            scope=pc.scope,
            clock=clock,
            timing=timing,
            # a holder that renews its lease but never publishes is passed over after this
            patience=lease + pc.request_timeout + LEASE_GRACE,
            stopping=stopping,
            masker=redactor if redactor is not None else Masker(),
            logger=logger,
            metrics=metrics,
        )
    except BaseException:
        store.close()
        raise


def checked(profile: Profile) -> Profile:
    """``profile`` once each of its sinks proved that it can write; when one cannot, the
    profile is closed (its sources, sinks and token client: connections, threads) and the
    error raised (SinkError, or ConfigError)."""
    try:
        profile.check_sinks()
    except BaseException:
        profile.close()
        raise
    return profile


def _token_client(
    name: str, pc: ProfileConfig, *, clock: Clock, tls: TlsContexts, stopping: threading.Event
) -> TokenClient:
    try:
        return TokenClient(
            token_url=pc.resolved_token_url,
            profile=name,
            grant_type_location=pc.grant_type_location,
            scope=pc.scope,
            timeout=pc.request_timeout,
            ca_bundle=pc.ca_bundle,
            tls=tls,
            clock=clock,
            stopping=stopping,
            logger=logging.getLogger("agent.oauth"),
        )
    except OSError as exc:  # ssl.SSLError too: a CA bundle that is readable but not PEM
        raise ConfigError(
            f"profiles.{name}.ca_bundle: {toml_repr(pc.ca_bundle or '')} cannot be loaded "
            f"({exc.strerror or exc}): give a file of PEM certificates"
        ) from None
