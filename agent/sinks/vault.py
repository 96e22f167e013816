"""The ``vault`` sink: the token document written back to a KV v2 secret (DESIGN §4, §11).

Every key but ``path`` defaults to the same key of the profile's ``[vault]`` table (and to that
table's defaults when there is none): :func:`merged` applies them once, giving the source's
Struct, from which :func:`agent.sources.vault.connection` builds the connection. The writer,
which imports hvac, is :mod:`agent.stores.vault.sink`, imported by :meth:`VaultSinkKind.build`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec

from agent.config.checks import readable_file_problem
from agent.keypath import header, toml_repr
from agent.plugin import BuildContext, SinkKind, Target, Where
from agent.sources.vault import (
    VAULT_ADDR_ENV,
    VaultSourceConfig,
    address_problem,
    connection,
    login_problems,
    mount_path_problem,
    secret_target,
)

if TYPE_CHECKING:
    from agent.stores.vault.sink import VaultSink


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


def merged(own: msgspec.Struct, table: msgspec.Struct | None) -> VaultSourceConfig:
    """``own``'s settings (a vault sink's, or the vault fleet store's table) as the ``[vault]``
    table's Struct: each key it shares with that table and leaves out (None) taken from the
    profile's table, or from its defaults when there is none."""
    base = table if isinstance(table, VaultSourceConfig) else VaultSourceConfig()
    shared = set(VaultSourceConfig.__struct_fields__)
    fields = {
        name: value
        for name in type(own).__struct_fields__
        if name in shared and (value := getattr(own, name)) is not None
    }
    return msgspec.structs.replace(base, **fields)


#: the keys a table that borrows the ``[vault]`` table's may set to its own values
OVERRIDABLE = (
    "auth_method",
    "token_file",
    "role_id_file",
    "secret_id_file",
    "role",
    "jwt_file",
    "client_cert",
    "client_key",
    "namespace",
    "ca_cert",
)


def override_problems(own: msgspec.Struct, where: Where, *, writer: str) -> Iterator[str]:
    """The problems of the Vault keys of a table that defaults them to the profile's
    ``[vault]`` table (a vault sink, the vault fleet store), ``path`` aside: an empty value, a
    bad address or mount, an unreadable CA file, a KV v1 mount taken from the table, and the
    login's own checks on the merged keys. ``writer`` names the table in messages."""
    profile_vault = where.table("vault")
    assert profile_vault is None or isinstance(profile_vault, VaultSourceConfig)
    table = header(["profiles", where.profile, "vault"])
    address = getattr(own, "address", None)
    if address == "":
        yield (
            f"{where.at('address')}: must not be empty (leave the key out to use the "
            f"address of {table}, else ${VAULT_ADDR_ENV})"
        )
    elif address is not None:
        problem = address_problem(address)
        if problem:
            yield f"{where.at('address')}: {problem}"
    own_empty = [key for key in OVERRIDABLE if getattr(own, key, None) == ""]
    for file_key in own_empty:
        yield (
            f"{where.at(file_key)}: must not be empty (leave the key out to use the "
            f"value of {table})"
        )
    mount = getattr(own, "mount", None)
    if mount is not None:
        problem = mount_path_problem(mount, "secret")
        if problem:
            yield f"{where.at('mount')}: {problem}"
    ca_cert = getattr(own, "ca_cert", None)
    if ca_cert:
        problem = readable_file_problem(ca_cert)
        if problem:
            yield f"{where.at('ca_cert')}: {toml_repr(ca_cert)}: {problem}"
    if mount is None and profile_vault is not None and profile_vault.kv_version == 1:
        yield (
            f"{where.at('mount')}: {writer} writes to a KV v2 engine, and the mount it "
            f"takes from {table} ({toml_repr(profile_vault.mount)}) is KV v1 there "
            "(kv_version = 1): set mount to a KV v2 engine's mount"
        )
    if "auth_method" not in own_empty:
        reported = tuple(f"{where.at(key)}:" for key in own_empty)
        for problem in login_problems(merged(own, profile_vault), where):
            if not problem.startswith(reported):
                yield problem


class VaultSinkKind(SinkKind[VaultSinkConfig]):
    name = "vault"
    config_type = VaultSinkConfig

    def check(self, config: VaultSinkConfig, where: Where) -> Iterator[str]:
        problem = mount_path_problem(config.path, "dvs/osigu-token")
        if problem:
            yield f"{where.at('path')}: {problem}"
        yield from override_problems(config, where, writer="a vault sink")

    def describe(self, config: VaultSinkConfig, where: Where) -> str:
        vault = merged(config, where.table("vault"))
        return f"vault {vault.mount}/{config.path} (KV v2, check-and-set)"

    def targets(self, config: VaultSinkConfig, where: Where) -> Iterator[Target]:
        target = secret_target(where.at("path"), merged(config, where.table("vault")))
        if target is not None:
            yield target

    def build(self, config: VaultSinkConfig, context: BuildContext) -> VaultSink:
        from agent.stores.vault.sink import VaultSink

        vault = merged(config, context.where.table("vault"))
        return VaultSink(
            connection(vault, context),
            vault,
            config_key=context.where.key,
            logger=context.logger,
        )


KIND = VaultSinkKind()
