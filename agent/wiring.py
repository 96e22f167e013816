"""Config → objects: one :class:`~agent.manager.Profile` from one ``[profiles.NAME]`` table.

Nothing here starts anything: the :class:`~agent.app.Agent` decides when to build (at start,
at a reload), checks the sinks and owns what it gets."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import timedelta

from agent.clock import Clock
from agent.config import ProfileConfig
from agent.kinds import build_sinks, build_sources
from agent.logs import Redactor
from agent.manager import Profile
from agent.oauth import TlsContexts, TokenClient
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
    try:
        sinks = build_sinks(
            name, pc, environ=environ, logger=logger, registry=registry, metrics=recorder
        )
    except BaseException:
        for source in sources:
            source.close()
        raise
    client = TokenClient(
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
    timing = Timing(
        refresh_before_expiry=pc.refresh_before_expiry,
        reread_on_schedule=pc.rotation.poll_interval <= timedelta(0),
    )
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
    )
