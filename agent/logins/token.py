"""``auth_method = "token"``: a Vault token given to the agent (a file, or ``$VAULT_TOKEN``).

The token is not made by a login: before it runs out, and after a 403, the connection reads it
again (a new one is used at once) and renews it (DESIGN §3).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from agent.errors import SourceUnavailable
from agent.logins.common import dict_of, ttl_seconds
from agent.plugin import Login, LoginContext, LoginKind, Where
from agent.sources.vault import DEFAULT_TOKEN_FILE, VAULT_TOKEN_ENV


class TokenLogin(LoginKind):
    name = "token"
    holder = "token"
    given = True

    def check(self, config: Any, where: Where) -> Iterator[str]:
        return iter(())

    def describe(self, config: Any) -> str:
        return "token login"

    def what(self, config: Any) -> str:
        return "look up the agent's token"

    def login(self, config: Any, ctx: LoginContext) -> Login:
        """Read the token (:func:`read_token`) and look it up (:func:`look_up`)."""
        value, _ = read_token(config, ctx)
        return look_up(config, ctx, value)


KIND = TokenLogin()


def read_token(config: Any, ctx: LoginContext) -> tuple[str, str]:
    """The token and where it came from (for messages, never the value)."""
    if config.token_file is None:
        env_token = ctx.environ.get(VAULT_TOKEN_ENV)
        if env_token:
            ctx.remember("token_file", env_token.strip())
            return env_token.strip(), f"${VAULT_TOKEN_ENV}"
    path = config.token_file or DEFAULT_TOKEN_FILE
    return ctx.read_file(path, "token_file"), path


def look_up(config: Any, ctx: LoginContext, value: str) -> Login:
    """Use ``value``: look it up (``lookup-self``) for its TTL, so that it is renewed in time.

    On failure the client is left without a token."""
    import hvac.exceptions

    ctx.remember("candidate", value)
    ctx.client.token = value
    try:
        response = ctx.client.auth.token.lookup_self()
    except hvac.exceptions.Forbidden:
        ctx.client.token = ""
        raise token_rejected(config, ctx.config_key, ctx.address, ctx.environ) from None
    except Exception:
        ctx.client.token = ""
        raise
    data = dict_of(dict_of(response).get("data"))
    ttl = ttl_seconds(data.get("ttl"))
    ctx.log.info("using a Vault token for %s (ttl %s)", ctx.address, f"{ttl}s" if ttl else "none")
    return Login(value, ttl, bool(data.get("renewable")))


def token_rejected(
    config: Any, config_key: str, address: str, environ: Mapping[str, str]
) -> SourceUnavailable:
    """Vault does not accept the token itself (its lookup-self is denied)."""
    if config.token_file is None and environ.get(VAULT_TOKEN_ENV):
        where, fix = f"${VAULT_TOKEN_ENV}", "export a valid token"
    else:
        path = config.token_file or DEFAULT_TOKEN_FILE
        where = f"{path} ({config_key}.token_file)"
        fix = "write a valid token there"
    return SourceUnavailable(
        f"Vault at {address} does not accept the token from {where} (expired or "
        f"revoked, or Vault was rebuilt; its policy must also allow the default "
        f"lookup-self): {fix}"
    )
