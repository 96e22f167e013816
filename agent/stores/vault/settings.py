"""Where Vault is and how the agent logs in to it: the frozen settings every module here reads.

Free of hvac: the config and the factories can name these settings without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.plugin import LoginKind
from agent.sources.vault import DEFAULT_TOKEN_FILE, VaultSourceConfig

__all__ = ["DEFAULT_TOKEN_FILE", "VaultAuth"]


@dataclass(frozen=True, slots=True)
class VaultAuth:
    """Where Vault is and how the agent authenticates to it: the ``[vault]`` table (or a vault
    sink's keys over it) as decoded, with what the plug-in derives once at build."""

    #: ``https://vault.internal:8200`` (the table's ``address``, else ``$VAULT_ADDR``)
    address: str
    #: the login's keys (``auth_method``, ``token_file``, ``role_id_file``, ``jwt_file``, ...)
    config: VaultSourceConfig = field(default_factory=VaultSourceConfig)
    #: seconds, for each HTTP request to Vault
    timeout: float = 10.0
    #: the config table these settings come from, named in error messages
    config_key: str = "vault"
    #: the login method ``config.auth_method`` names (None: the built-in of that name)
    login: LoginKind | None = field(default=None, compare=False)

    def method(self) -> LoginKind:
        """The login method: :attr:`login`, else the built-in named ``auth_method``."""
        if self.login is not None:
            return self.login
        from agent.registry import Registry

        return Registry().login(self.config.auth_method)
