"""What the Vault login methods share: reading Vault's answer, the JWT's expiry, the messages.

Light: no hvac import (a login method imports hvac's exceptions inside ``login()``).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterator
from typing import Any

from agent.config.checks import readable_file_problem
from agent.errors import SourceUnavailable
from agent.keypath import header, toml_repr
from agent.plugin import Login, LoginContext, LoginKind, Where
from agent.sources.vault import mount_path_problem


def ttl_seconds(value: object) -> int:
    """A TTL from Vault's answer; 0 (no expiry known) for anything but a whole number."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value)
    return 0


def dict_of(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def logged_in(
    response: object, what: str, ctx: LoginContext, expires_at: float | None = None
) -> Login:
    """The :class:`Login` of a login's answer (``auth.client_token``, ``lease_duration``,
    ``renewable``); SourceUnavailable when it holds no token."""
    auth = dict_of(response).get("auth")
    value = auth.get("client_token") if isinstance(auth, dict) else None
    if not isinstance(auth, dict) or not isinstance(value, str) or not value:
        raise SourceUnavailable(f"{what} on Vault at {ctx.address} returned no token")
    ttl = ttl_seconds(auth.get("lease_duration"))
    ctx.log.info("logged in to Vault at %s: %s (token ttl %ds)", ctx.address, what, ttl)
    return Login(value, ttl, bool(auth.get("renewable")), credential_expires_at=expires_at)


def mount_key(config: Any) -> str:
    """The key that names the login's mount in messages."""
    return "approle_mount" if not config.auth_mount and config.approle_mount else "auth_mount"


def check_mount(kind: LoginKind, config: Any, where: Where) -> Iterator[str]:
    if config.auth_mount is not None:
        problem = mount_path_problem(config.auth_mount, kind.name)
        if problem:
            yield f"{where.at('auth_mount')}: {problem}"


def required(method: str, config: Any, where: Where, key: str, fix: str = "") -> Iterator[str]:
    """``key`` must be set (and not empty) with ``auth_method = method``."""
    value = getattr(config, key)
    if value:
        return
    if where.segments[-2:-1] == ("sinks",):
        table = header(["profiles", where.profile, "vault"])
        yield (
            f'{where.at(key)}: required with auth_method = "{method}": {table} leaves it '
            f"empty, so set it here{fix}"
        )
    elif value is None:
        yield f'{where.at(key)}: required with auth_method = "{method}"{fix}'
    else:
        yield f'{where.at(key)}: must not be empty with auth_method = "{method}"{fix}'


def check_readable(config: Any, where: Where, key: str) -> Iterator[str]:
    """A file the login reads that is not a secret (a client certificate), checked now."""
    path = getattr(config, key)
    if path:
        problem = readable_file_problem(path)
        if problem:
            yield f"{where.at(key)}: {toml_repr(path)}: {problem}"


def jwt_expiry(text: str, path: str, name: str) -> float | None:
    """The ``exp`` claim of the JWT ``text`` (Unix time), read without verifying it (Vault
    does). SourceUnavailable naming the file when it is not a JWT."""
    parts = text.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise SourceUnavailable(
            f"{path} ({name}) does not hold a JWT (three base64url parts separated by '.'): "
            "point it at the token file your identity provider writes"
        )
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise SourceUnavailable(
            f"{path} ({name}) does not hold a JWT (its payload is not base64url JSON)"
        ) from None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def read_jwt(ctx: LoginContext, path: str) -> tuple[str, float | None]:
    """The JWT in ``path`` (``jwt_file``) and its expiry; an expired one is an error naming
    the file and who should have rewritten it."""
    name = f"{ctx.config_key}.jwt_file"
    value = ctx.read_file(path, "jwt_file")
    expires_at = jwt_expiry(value, path, name)
    now = ctx.wall()
    if expires_at is not None and expires_at <= now:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
        ago = now - expires_at
        raise SourceUnavailable(
            f"the JWT in {path} ({name}) expired at {stamp} ({ago:.0f}s ago): whatever writes "
            "that file (a projected service-account token, a workload-identity agent) has "
            "stopped renewing it; the agent reads it again at the next login"
        )
    return value, expires_at


def rejected(what: str, ctx: LoginContext, exc: BaseException, fix: str) -> SourceUnavailable:
    """Vault refused the login (400 or 403): its reason, masked, and what to check."""
    return SourceUnavailable(
        f"{what} on Vault at {ctx.address} rejected ({ctx.vault_errors(exc)}): {fix}"
    )


def not_mounted(
    kind: LoginKind, config: Any, ctx: LoginContext, label: str, enable: str
) -> SourceUnavailable:
    mount = kind.mount(config)
    return SourceUnavailable(
        f"no {label} auth method at auth/{mount} on Vault at {ctx.address}: enable it "
        f"(`{enable}`) or set {ctx.config_key}.{mount_key(config)}"
    )
