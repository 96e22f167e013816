"""The ``vault`` fleet store (DESIGN §13): ``[profiles.NAME.fleet]`` with ``store = "vault"``.

The fleet's entries are KV v2 secrets under ``path`` (``<mount>/data/<path>/<fleet key>/token``,
``…/lease``, ``…/marker``), written with check-and-set. Every Vault key but ``path`` and
``lease`` defaults to the same key of the profile's ``[vault]`` table (and to that table's
defaults when there is none), as for a vault sink (:func:`agent.sinks.vault.merged`).

This module is the plug-in: the table's keys and their checks, and :meth:`VaultFleetKind.build`,
which imports the store (:mod:`agent.fleet.vault_store`, on hvac) only for a config that has one.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

import msgspec

from agent.config.values import Duration
from agent.plugin import BuildContext, FleetStoreKind, Where
from agent.sinks.vault import merged, override_problems
from agent.sources.vault import connection, mount_path_problem

if TYPE_CHECKING:
    from agent.fleet.vault_store import VaultFleetStore

#: where the fleet's secrets live inside the mount when the table names no path
DEFAULT_PATH = "dvs-agent/fleet"
#: the mint lease when the table sets none
DEFAULT_LEASE = Duration(seconds=30)
#: Vault's ``Date`` has whole seconds: a lease shorter than this would be judged too coarsely
MIN_LEASE = timedelta(seconds=3)
MAX_LEASE = timedelta(minutes=10)


class VaultFleetConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="vault",
    tag_field="store",
):
    """``[profiles.NAME.fleet]`` with ``store = "vault"``."""

    #: how long a minting agent may hold the mint lease (renewed while its request runs)
    lease: Duration = DEFAULT_LEASE
    #: the fleet's secrets sit under this path inside ``mount`` (one folder per fleet key)
    path: str = DEFAULT_PATH
    #: the other keys: None takes the ``[vault]`` table's value (as for a vault sink)
    address: str | None = None
    auth_method: str | None = None
    auth_mount: str | None = None
    token_file: str | None = None
    role_id_file: str | None = None
    secret_id_file: str | None = None
    approle_mount: str | None = None
    role: str | None = None
    jwt_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    namespace: str | None = None
    ca_cert: str | None = None
    tls_skip_verify: bool | None = None
    #: the KV v2 secrets engine's mount
    mount: str | None = None


class VaultFleetKind(FleetStoreKind[VaultFleetConfig]):
    name = "vault"
    config_type = VaultFleetConfig

    def check(self, config: VaultFleetConfig, where: Where) -> Iterator[str]:
        if not MIN_LEASE <= config.lease <= MAX_LEASE:
            yield (
                f"{where.at('lease')}: must be at least 3s (Vault's clock has whole seconds) "
                "and at most 10m"
            )
        problem = mount_path_problem(config.path, DEFAULT_PATH)
        if problem:
            yield f"{where.at('path')}: {problem}"
        yield from override_problems(config, where, writer="the vault fleet store")

    def describe(self, config: VaultFleetConfig, where: Where) -> str:
        vault = merged(config, where.table("vault"))
        return (
            f"fleet store vault {vault.mount}/{config.path} at {vault.address or '$VAULT_ADDR'} "
            f"(KV v2, check-and-set; lease {config.lease.total_seconds():g}s)"
        )

    def build(self, config: VaultFleetConfig, context: BuildContext) -> VaultFleetStore:
        from agent.fleet.vault_store import VaultFleetStore

        vault = merged(config, context.where.table("vault"))
        return VaultFleetStore(
            connection(vault, context),
            mount=vault.mount,
            path=config.path,
            config_key=context.where.key,
        )


KIND = VaultFleetKind()
