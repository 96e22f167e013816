"""Where Vault is and how the agent logs in to it: the frozen settings every module here reads.

Free of hvac: the config and the factories can name these settings without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.sources.vault import DEFAULT_TOKEN_FILE

__all__ = ["DEFAULT_TOKEN_FILE", "VaultAuth"]


@dataclass(frozen=True, slots=True)
class VaultAuth:
    """Where Vault is and how the agent authenticates to it."""

    #: ``https://vault.internal:8200``
    address: str
    #: a name in :data:`agent.stores.vault.logins.LOGINS`: ``token`` (a token from a file or
    #: ``$VAULT_TOKEN``) or ``approle`` (role_id + secret_id login)
    auth_method: Literal["token", "approle"] = "approle"
    #: token auth: this file, else ``$VAULT_TOKEN``, else :data:`DEFAULT_TOKEN_FILE`
    token_file: str | None = None
    #: AppRole: files holding the role_id and the secret_id (read again at every login)
    role_id_file: str = "/etc/dvs-agent/role_id"
    secret_id_file: str = "/etc/dvs-agent/secret_id"  # noqa: S105 - a path
    #: the path the AppRole auth method is mounted at (``auth/<approle_mount>/login``)
    approle_mount: str = "approle"
    #: Vault Enterprise / OpenBao namespace
    namespace: str | None = None
    #: CA file that signed Vault's certificate (else the system store)
    ca_cert: str | None = None
    tls_skip_verify: bool = False
    #: seconds, for each HTTP request to Vault
    timeout: float = 10.0
    #: the config table these settings come from, named in error messages
    config_key: str = "vault"
