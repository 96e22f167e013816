"""Build a profile's credential sources from its config (vault and aws imported only if used)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from agent.config import ProfileConfig, VaultSinkResolved, VaultSourceConfig
from agent.sources.base import CredentialSource
from agent.sources.env import EnvSource

if TYPE_CHECKING:
    from agent.vault_client import VaultConnection


def build_sources(
    profile: str,
    pc: ProfileConfig,
    *,
    environ: Mapping[str, str],
    logger: logging.Logger,
) -> list[CredentialSource]:
    """The sources of ``pc.sources``, in order. Raises ConfigError for what the config lacks."""
    timeout = pc.request_timeout.total_seconds()
    sources: list[CredentialSource] = []
    for name in pc.sources:
        if name == "env":
            sources.append(
                EnvSource(
                    client_id_var=pc.env.client_id_var,
                    client_secret_var=pc.env.client_secret_var,
                    environ=environ,
                )
            )
        elif name == "vault":
            sources.append(_vault(profile, pc, environ=environ, timeout=timeout, logger=logger))
        elif name == "aws":
            sources.append(_aws(profile, pc, timeout=timeout, logger=logger))
    return sources


def _vault(
    profile: str,
    pc: ProfileConfig,
    *,
    environ: Mapping[str, str],
    timeout: float,
    logger: logging.Logger,
) -> CredentialSource:
    from agent.sources.vault import VaultSource, VaultSourceSettings

    vc = pc.vault
    assert vc is not None and vc.path is not None  # the config checks guarantee both
    key = f"profiles.{profile}.vault"
    settings = VaultSourceSettings(
        path=vc.path,
        mount=vc.mount,
        kv_version=vc.kv_version,
        client_id_key=vc.client_id_key,
        client_secret_key=vc.client_secret_key,
        config_key=key,
    )
    connection = vault_connection(vc, environ=environ, key=key, timeout=timeout, logger=logger)
    return VaultSource(connection, settings, logger=logger)


def vault_connection(
    vc: VaultSourceConfig | VaultSinkResolved,
    *,
    environ: Mapping[str, str],
    key: str,
    timeout: float,
    logger: logging.Logger,
) -> VaultConnection:
    """An authenticated Vault connection for a source or a write-back sink (``key`` names it)."""
    from agent.vault_client import VaultAuth, VaultConnection

    auth = VaultAuth(
        address=vc.resolved_address(environ, key=f"{key}.address"),
        auth_method=vc.auth_method,
        token_file=vc.token_file,
        role_id_file=vc.role_id_file,
        secret_id_file=vc.secret_id_file,
        approle_mount=vc.approle_mount,
        namespace=vc.namespace,
        ca_cert=vc.ca_cert,
        tls_skip_verify=vc.tls_skip_verify,
        timeout=timeout,
        config_key=key,
    )
    return VaultConnection(auth, environ=environ, logger=logger)


def _aws(
    profile: str, pc: ProfileConfig, *, timeout: float, logger: logging.Logger
) -> CredentialSource:
    from agent.sources.aws import AwsSource, AwsSourceSettings

    ac = pc.aws
    assert ac is not None and ac.secret_id is not None  # the config checks guarantee both
    settings = AwsSourceSettings(
        secret_id=ac.secret_id,
        region=ac.region,
        endpoint_url=ac.endpoint_url,
        version_stage=ac.version_stage,
        client_id_key=ac.client_id_key,
        client_secret_key=ac.client_secret_key,
        timeout=timeout,
        profile=profile,
    )
    return AwsSource(settings, logger=logger)
