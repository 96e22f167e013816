"""How the agent gets its Vault token: one function per login method, in the table :data:`LOGINS`.

A login takes the frozen :class:`~agent.stores.vault.settings.VaultAuth` and a
:class:`LoginContext` (the hvac client, the environment, a logger, and the connection's masking)
and returns a :class:`Login`: the token, its TTL, whether it is renewable. It reads its
credential files at every call (they rotate), remembers each value it reads so that no text
from Vault ever shows it, raises an :class:`~agent.errors.AgentError` for the failures it can
explain (a rejected secret_id, a missing mount) and lets other hvac and requests errors
through: the connection maps those (:mod:`agent.stores.vault.errors`), naming
:attr:`LoginMethod.what`.

Adding a method (DESIGN §12: jwt, kubernetes, cert) is one function and one entry of
:data:`LOGINS` (plus its keys in the settings). Every method but ``token`` makes its token by
logging in, so the connection logs in again before the token runs out and after a 403.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import hvac.exceptions

from agent.errors import SourceEmpty, SourceUnavailable
from agent.fsutil import read_secret_file
from agent.stores.vault.settings import DEFAULT_TOKEN_FILE, VaultAuth


@dataclass(frozen=True, slots=True)
class Login:
    """A Vault token and how long it lives, as a login (or a token look-up) answered."""

    token: str = field(repr=False)
    #: seconds the token lives from now; 0: no expiry (a root token) or none known
    ttl_seconds: int
    #: whether ``renew-self`` can extend it
    renewable: bool


@dataclass(frozen=True, slots=True)
class LoginContext:
    """What a login gets from its connection besides the settings."""

    #: the connection's ``hvac.Client`` (its TLS settings, namespace and timeout)
    client: Any
    #: where ``$VAULT_TOKEN`` is looked up
    environ: Mapping[str, str]
    log: logging.Logger
    #: ``remember(slot, value)``: mask ``value`` in every text from Vault from now on (a newer
    #: value in the same slot replaces it)
    remember: Callable[[str, str], None]
    #: Vault's error text of an hvac exception, with every remembered value and the token in
    #: use masked (:func:`agent.stores.vault.errors.vault_errors`)
    vault_errors: Callable[[BaseException], str]


@dataclass(frozen=True, slots=True)
class LoginMethod:
    """One ``auth_method``: its login and what the connection's messages say about it."""

    login: Callable[[VaultAuth, LoginContext], Login]
    #: who holds the policy, in permission-denied hints ("the policy of the agent's HOLDER")
    holder: str
    #: the operation a failure of the login names when the login does not explain it
    what: Callable[[VaultAuth], str]
    #: True: the token is handed to the agent, not made by a login (``token``): before it runs
    #: out, and after a 403, the connection reads it again and renews it instead of logging in
    given: bool = False


# -- token: a token from a file or $VAULT_TOKEN ---------------------------------------------------


def token(auth: VaultAuth, ctx: LoginContext) -> Login:
    """Read the token (:func:`read_token`) and look it up (:func:`look_up`)."""
    value, _ = read_token(auth, ctx)
    return look_up(auth, ctx, value)


def read_token(auth: VaultAuth, ctx: LoginContext) -> tuple[str, str]:
    """The token for token auth and where it came from (for messages, never the value)."""
    if auth.config.token_file is None:
        env_token = ctx.environ.get("VAULT_TOKEN")
        if env_token:
            ctx.remember("token_file", env_token.strip())
            return env_token.strip(), "$VAULT_TOKEN"
    path = auth.config.token_file or DEFAULT_TOKEN_FILE
    return read_credential(auth, ctx, path, "token_file"), path


def look_up(auth: VaultAuth, ctx: LoginContext, value: str) -> Login:
    """Use ``value``: look it up (``lookup-self``) for its TTL, so that it is renewed in time.

    On failure the client is left without a token."""
    ctx.remember("candidate", value)
    ctx.client.token = value
    try:
        response = ctx.client.auth.token.lookup_self()
    except hvac.exceptions.Forbidden:
        ctx.client.token = ""
        raise token_rejected(auth, ctx.environ) from None
    except Exception:
        ctx.client.token = ""
        raise
    data = _dict(_dict(response).get("data"))
    ttl = ttl_seconds(data.get("ttl"))
    ctx.log.info("using a Vault token for %s (ttl %s)", auth.address, f"{ttl}s" if ttl else "none")
    return Login(value, ttl, bool(data.get("renewable")))


def token_rejected(auth: VaultAuth, environ: Mapping[str, str]) -> SourceUnavailable:
    """Vault does not accept the token itself (its lookup-self is denied)."""
    if auth.config.token_file is None and environ.get("VAULT_TOKEN"):
        where, fix = "$VAULT_TOKEN", "export a valid token"
    else:
        path = auth.config.token_file or DEFAULT_TOKEN_FILE
        where = f"{path} ({auth.config_key}.token_file)"
        fix = "write a valid token there"
    return SourceUnavailable(
        f"Vault at {auth.address} does not accept the token from {where} (expired or "
        f"revoked, or Vault was rebuilt; its policy must also allow the default "
        f"lookup-self): {fix}"
    )


# -- approle: role_id + secret_id ----------------------------------------------------------------


def approle(auth: VaultAuth, ctx: LoginContext) -> Login:
    """Log in at ``auth/<approle_mount>/login`` with the role_id and secret_id files."""
    role_id = read_credential(auth, ctx, auth.config.role_id_file, "role_id_file")
    secret_id = read_credential(auth, ctx, auth.config.secret_id_file, "secret_id_file")
    where = _approle_where(auth)
    try:
        response = ctx.client.auth.approle.login(
            role_id=role_id, secret_id=secret_id, mount_point=auth.config.approle_mount
        )
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
        raise SourceUnavailable(
            f"AppRole login at {where} on Vault at {auth.address} rejected "
            f"({ctx.vault_errors(exc)}): check role_id/secret_id ({auth.config_key}.role_id_file "
            f"= {auth.config.role_id_file}, {auth.config_key}.secret_id_file = "
            f"{auth.config.secret_id_file}; the secret_id may have expired or reached its use "
            f"limit) and that AppRole is mounted at {where} ({auth.config_key}.approle_mount)"
        ) from None
    except hvac.exceptions.InvalidPath:
        raise SourceUnavailable(
            f"no AppRole auth method at {where} on Vault at {auth.address}: enable it "
            f"(`vault auth enable approle`) or set {auth.config_key}.approle_mount"
        ) from None
    login = _dict(response).get("auth")
    value = login.get("client_token") if isinstance(login, dict) else None
    if not isinstance(login, dict) or not isinstance(value, str) or not value:
        raise SourceUnavailable(
            f"AppRole login at {where} on Vault at {auth.address} returned no token"
        )
    ttl = ttl_seconds(login.get("lease_duration"))
    ctx.log.info(
        "logged in to Vault at %s with AppRole (%s, token ttl %ds)", auth.address, where, ttl
    )
    return Login(value, ttl, bool(login.get("renewable")))


def _approle_where(auth: VaultAuth) -> str:
    return f"auth/{auth.config.approle_mount}"


#: ``auth_method`` → how the agent gets its token
LOGINS: Mapping[str, LoginMethod] = {
    "token": LoginMethod(
        login=token,
        holder="token",
        what=lambda auth: "look up the agent's token",
        given=True,
    ),
    "approle": LoginMethod(
        login=approle,
        holder="AppRole role",
        what=lambda auth: f"AppRole login at {_approle_where(auth)}",
    ),
}


# -- what every method shares ----------------------------------------------------------------


def read_credential(auth: VaultAuth, ctx: LoginContext, path: str, key: str) -> str:
    """The stripped content of the credential file ``path`` that the setting ``key`` names,
    remembered (masked from now on); errors name the key and what to do."""
    name = f"{auth.config_key}.{key}"
    try:
        text = read_secret_file(path).strip()
    except FileNotFoundError:
        raise SourceEmpty(
            f"{path} ({name}) does not exist: write it, or set {name} to the file that "
            f"holds the {key.removesuffix('_file')}"
        ) from None
    except PermissionError:
        raise SourceUnavailable(
            f"{path} ({name}) is not readable by the agent (uid {os.geteuid()}): "
            "fix its owner or mode"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceUnavailable(f"cannot read {path} ({name}): {exc}") from None
    if not text:
        raise SourceEmpty(f"{path} ({name}) is empty")
    ctx.remember(key, text)
    return text


def ttl_seconds(value: object) -> int:
    """A TTL from Vault's answer; 0 (no expiry known) for anything but a whole number."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value)
    return 0


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
