"""Build a profile's sinks from its config (vault, aws and redis imported only if used)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from agent.config import (
    AwsSinkConfig,
    FileSinkConfig,
    ProfileConfig,
    RedisSinkConfig,
    SinkConfig,
    VaultSinkConfig,
)
from agent.sinks.base import TokenSink
from agent.sinks.file import FileSink


def build_sinks(
    profile: str,
    pc: ProfileConfig,
    *,
    environ: Mapping[str, str],
    logger: logging.Logger,
) -> list[TokenSink]:
    """The sinks of ``pc.sinks``, in order. Raises ConfigError for what the config lacks."""
    timeout = pc.request_timeout.total_seconds()
    return [
        _build(profile, pc, sink, f"profiles.{profile}.sinks[{index}]", environ, timeout, logger)
        for index, sink in enumerate(pc.sinks)
    ]


def _build(
    profile: str,
    pc: ProfileConfig,
    sink: SinkConfig,
    key: str,
    environ: Mapping[str, str],
    timeout: float,
    logger: logging.Logger,
) -> TokenSink:
    if isinstance(sink, FileSinkConfig):
        return FileSink(
            Path(sink.path),
            fmt=sink.format,
            mode=int(sink.mode),
            owner=sink.owner,
            group=sink.group,
            on_change=sink.on_change,
            on_change_timeout=sink.on_change_timeout.total_seconds(),
            profile=profile,
            logger=logging.getLogger("agent.sink"),
        )
    if isinstance(sink, VaultSinkConfig):
        from agent.sinks.vault import VaultSink, VaultSinkSettings
        from agent.sources.factory import vault_connection

        vault = sink.merged(pc.vault)
        return VaultSink(
            vault_connection(vault, environ=environ, key=key, timeout=timeout, logger=logger),
            VaultSinkSettings(path=vault.path, mount=vault.mount, config_key=key),
            logger=logger,
        )
    if isinstance(sink, AwsSinkConfig):
        from agent.sinks.aws import AwsSink, AwsSinkSettings

        aws = sink.merged(pc.aws)
        return AwsSink(
            AwsSinkSettings(
                secret_id=aws.secret_id,
                region=aws.region,
                endpoint_url=aws.endpoint_url,
                create=aws.create,
                timeout=timeout,
                profile=profile,
                config_key=key,
            ),
            logger=logger,
        )
    assert isinstance(sink, RedisSinkConfig)
    from agent.sinks.redis import RedisSink, RedisSinkSettings

    return RedisSink(
        RedisSinkSettings(
            url=sink.url,
            key=sink.resolved_key(profile),
            username=sink.username,
            password_file=sink.password_file,
            password_env=sink.password_env,
            timeout=min(timeout, 5.0),
            config_key=key,
        ),
        environ=environ,
        logger=logger,
    )
