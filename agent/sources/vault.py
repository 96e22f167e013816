"""The ``vault`` source: a KV v2 (or v1) secret holding the client id and secret (§3, §11).

``[profiles.NAME.vault]`` is this plug-in's table; it also says how the agent reaches and logs
in to Vault, for the source and for the profile's vault write-back sinks (whose keys default to
it). The table is checked whenever it is present; ``path`` is required only when ``"vault"`` is
listed in ``sources``. The reader, which imports hvac, is :mod:`agent.stores.vault.source`,
imported by :meth:`VaultKind.build`; :func:`connection` builds the Vault connection for it and
for the sink.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import msgspec

from agent.config.checks import (
    key_names_problems,
    normalised_url,
    readable_file_problem,
    url_problem,
)
from agent.errors import ConfigError
from agent.keypath import header, toml_repr
from agent.plugin import BuildContext, SourceKind, Target, Where

if TYPE_CHECKING:
    from agent.stores.vault.connection import VaultConnection
    from agent.stores.vault.source import VaultSource

#: the variable that gives the Vault address when the table has no ``address``
VAULT_ADDR_ENV = "VAULT_ADDR"
#: token auth without ``token_file``: ``$VAULT_TOKEN``, else this file
VAULT_TOKEN_ENV = "VAULT_TOKEN"  # noqa: S105 - a variable name
#: the token file of token auth when neither ``token_file`` nor ``$VAULT_TOKEN`` is set
DEFAULT_TOKEN_FILE = "/run/vault/token"  # noqa: S105 - a path


class VaultSourceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME.vault]``: the ``vault`` source, a KV secret with the two credentials.

    ``path`` is required when ``"vault"`` is in the profile's ``sources``; the table may also be
    present without it (a vault write-back sink takes its defaults from it).
    """

    #: ``https://vault.internal:8200``; None: ``$VAULT_ADDR`` (see :meth:`resolved_address`)
    address: str | None = None
    #: token | approle | jwt | kubernetes | cert, or a login plug-in's name (DESIGN §12)
    auth_method: str = "approle"
    #: where the auth method is mounted (``auth/<auth_mount>/login``); None: the method's name
    auth_mount: str | None = None
    #: token auth: this file, else ``$VAULT_TOKEN``, else ``/run/vault/token``
    token_file: str | None = None
    #: approle auth: files holding the role id and the secret id (never the values here)
    role_id_file: str = "/etc/dvs-agent/role_id"
    secret_id_file: str = "/etc/dvs-agent/secret_id"  # noqa: S105 - a path
    #: the old name of ``auth_mount``, for AppRole only
    approle_mount: str | None = None
    #: jwt, kubernetes: the Vault role to log in to (optional for cert: the cert role)
    role: str | None = None
    #: jwt: the file holding the JWT; kubernetes: the service-account token (default
    #: ``/var/run/secrets/kubernetes.io/serviceaccount/token``); read at every login
    jwt_file: str | None = None
    #: cert: the client certificate and its key (PEM files), presented in the TLS handshake
    client_cert: str | None = None
    client_key: str | None = None
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
        return resolve_address(self.address, environ, key=key)


class VaultKind(SourceKind[VaultSourceConfig]):
    name = "vault"
    config_type = VaultSourceConfig

    def check_table(self, config: VaultSourceConfig | None, where: Where) -> Iterator[str]:
        if where.listed and (config is None or config.path is None):
            add = f"add a {header(where.segments)} table with " if config is None else "e.g. "
            yield (
                f'{where.at("path")}: required when "vault" is in sources: {add}path = '
                '"dvs/osigu" (the secret\'s path inside mount)'
            )
        if config is not None:
            yield from self.check(config, where)

    def check(self, config: VaultSourceConfig, where: Where) -> Iterator[str]:
        vault = config
        key = where.at
        if vault.address == "":
            yield (
                f"{key('address')}: must not be empty (leave the key out to use ${VAULT_ADDR_ENV})"
            )
        elif vault.address is not None:
            problem = address_problem(vault.address)
            if problem:
                yield f"{key('address')}: {problem}"
        if vault.token_file == "":
            yield (
                f"{key('token_file')}: must not be empty (leave the key out to use "
                f"${VAULT_TOKEN_ENV}, else {DEFAULT_TOKEN_FILE})"
            )
        yield from login_problems(vault, where)
        problem = mount_path_problem(vault.mount, "secret")
        if problem:
            yield f"{key('mount')}: {problem}"
        if vault.path is not None:
            problem = mount_path_problem(vault.path, "dvs/osigu")
            if problem:
                yield f"{key('path')}: {problem}"
        yield from key_names_problems(where.key, vault.client_id_key, vault.client_secret_key)
        if vault.namespace == "":
            yield f"{key('namespace')}: must not be empty (leave the key out for no namespace)"
        if vault.ca_cert is not None:
            problem = readable_file_problem(vault.ca_cert)
            if problem:
                yield f"{key('ca_cert')}: {toml_repr(vault.ca_cert)}: {problem}"

    def describe(self, config: VaultSourceConfig, where: Where) -> str:
        server = config.address or f"${VAULT_ADDR_ENV}"
        return (
            f"vault {config.mount}/{config.path} (KV v{config.kv_version}) at {server}, "
            f"{login_description(config, where)}"
        )

    def targets(self, config: VaultSourceConfig, where: Where) -> Iterator[Target]:
        if config.path is not None:
            target = secret_target(where.at("path"), config)
            if target is not None:
                yield target

    def build(self, config: VaultSourceConfig | None, context: BuildContext) -> VaultSource:
        from agent.stores.vault.source import VaultSource

        assert config is not None and config.path is not None  # check_table says so
        return VaultSource(
            connection(config, context), config, config_key=context.where.key, logger=context.logger
        )


KIND = VaultKind()


def connection(config: VaultSourceConfig, context: BuildContext) -> VaultConnection:
    """An authenticated-on-demand Vault connection for the source or a vault sink (``config``
    with the sink's own keys applied); ``context.where`` names the keys in messages."""
    from agent.stores.vault.connection import VaultConnection
    from agent.stores.vault.settings import VaultAuth

    key = context.where.key
    auth = VaultAuth(
        address=config.resolved_address(context.environ, key=f"{key}.address"),
        config=config,
        timeout=context.timeout,
        config_key=key,
        login=context.where.login(config.auth_method),
    )
    return VaultConnection(
        auth, environ=context.environ, logger=context.logger, report_expiry=context.report_expiry
    )


def login_problems(config: VaultSourceConfig, where: Where) -> Iterator[str]:
    """The problems of the login keys: ``auth_method`` names a login method (built in or a
    plug-in), whose own check runs on the keys."""
    try:
        login = where.login(config.auth_method)
    except ConfigError as exc:
        yield f"{where.at('auth_method')}: {exc}"
        return
    yield from login.check(config, where)


def login_description(config: VaultSourceConfig, where: Where) -> str:
    try:
        return where.login(config.auth_method).describe(config)
    except ConfigError:
        return f"{config.auth_method} login"


def secret_target(key: str, config: VaultSourceConfig) -> Target | None:
    """The KV secret at ``config.path`` (None when a key it depends on is invalid)."""
    mount, path, address = config.mount, config.path, config.address
    if path is None or mount_path_problem(mount, "secret") or mount_path_problem(path, "dvs/osigu"):
        return None
    if address is not None and (not address or address_problem(address)):
        return None
    server = f"${VAULT_ADDR_ENV}" if address is None else normalised_url(address)
    space = (config.namespace or "").strip("/")
    in_space = f" in namespace {toml_repr(space)}" if space else ""
    what = f"the Vault secret {toml_repr(f'{mount}/{path}')}{in_space} at {server}"
    return Target(
        store="vault", identity=(server, space, mount, path), what=what, key=key, noun="secret"
    )


def mount_path_problem(value: str, example: str) -> str | None:
    """A Vault mount or secret path: ``a/b``, no empty, ``.`` or ``..`` segments."""
    if not value.strip("/"):
        return f"must not be empty, e.g. {toml_repr(example)}"
    if value != value.strip("/"):
        return (
            f"{toml_repr(value)}: write it without a leading or trailing '/': "
            f"{toml_repr(value.strip('/'))}"
        )
    if any(segment in ("", ".", "..") for segment in value.split("/")):
        return f"{toml_repr(value)}: has an empty, '.' or '..' segment, e.g. {toml_repr(example)}"
    return None


def resolve_address(address: str | None, environ: Mapping[str, str], *, key: str) -> str:
    if address:
        problem = address_problem(address)
        if problem:
            raise ConfigError(f"{key}: {problem}")
        return address
    from_env = environ.get(VAULT_ADDR_ENV, "")
    if not from_env:
        raise ConfigError(
            f"{key}: no Vault address: set it in the config file "
            f'(e.g. "https://vault.internal:8200") or export ${VAULT_ADDR_ENV}'
        )
    problem = address_problem(from_env)
    if problem:
        raise ConfigError(f"{key}: not set, and ${VAULT_ADDR_ENV} is invalid: {problem}")
    return from_env


def address_problem(url: str) -> str | None:
    problem = url_problem(url, example='"https://vault.internal:8200"', exposed="the Vault token")
    if problem is None and re.fullmatch(r"/+v1(?:/.*)?", urlsplit(url).path):
        problem = (
            f"{toml_repr(url)}: give the server's base URL, without /v1, "
            'e.g. "https://vault.internal:8200"'
        )
    return problem
