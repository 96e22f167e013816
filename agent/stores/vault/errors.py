"""hvac and requests failures, and HTTP statuses, turned into agent errors that say what to do.

Every text that comes from Vault or from the network (Vault's ``errors``, an HTML page, a
requests error, a Content-Type) reaches a message only through :func:`agent.masking.outside`,
with the ``secrets`` the caller passes masked: the connection's token and login credentials,
and the values its caller holds (DESIGN §10). The hint text is the agent's own, never masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, NoReturn

import hvac.exceptions
import hvac.utils
import requests
import requests.exceptions

from agent.errors import AgentError, ConfigError, SourceEmpty, SourceUnavailable
from agent.masking import outside
from agent.models import MAX_ANSWER_BYTES
from agent.stores.vault.settings import VaultAuth

_OBJECT_PREFIX = re.compile(r"<[^>]*>:\s*")
_ROOT_CAUSE = re.compile(r"\[Errno -?\d+\][^'\")]*|\[SSL[^\]]*\][^'\")(]*")


def store_error(
    exc: BaseException, auth: VaultAuth, what: str, *, holder: str, secrets: Iterable[str]
) -> AgentError:
    """The AgentError for an hvac or requests failure during ``what`` ("read secret/dvs/x
    (KV v2)"). ``holder`` names who holds the policy ("token", "AppRole role")."""
    address, key = auth.address, auth.config_key
    secrets = tuple(secrets)
    if isinstance(exc, requests.exceptions.SSLError):
        return SourceUnavailable(
            f"TLS verification of Vault at {address} failed ({reason(exc, secrets)}): set "
            f"{key}.ca_cert to the CA file that signed its certificate"
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return SourceUnavailable(
            f"cannot reach Vault at {address} (no answer within {auth.timeout:g}s) to {what}"
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return SourceUnavailable(
            f"cannot reach Vault at {address} ({reason(exc, secrets)}) to {what}: check "
            f"{key}.address and that Vault is running"
        )
    if isinstance(
        exc,
        requests.exceptions.MissingSchema
        | requests.exceptions.InvalidSchema
        | requests.exceptions.InvalidURL,
    ):
        return ConfigError(f"{key}.address = {address!r} is not a Vault URL: use https://HOST:8200")
    if isinstance(exc, requests.exceptions.RequestException):
        return SourceUnavailable(
            f"cannot reach Vault at {address} ({type(exc).__name__}) to {what}"
        )
    if isinstance(exc, hvac.exceptions.VaultDown):
        errors = vault_errors(exc, secrets)
        if "sealed" in errors.lower():
            return SourceUnavailable(
                f"Vault at {address} is sealed: unseal it (`vault operator unseal`); the "
                "agent reads again at its next attempt"
            )
        return SourceUnavailable(
            f"Vault at {address} is unavailable (503: {errors}) to {what}: is this node a "
            "standby, or is Vault starting?"
        )
    if isinstance(exc, hvac.exceptions.VaultNotInitialized):
        return SourceUnavailable(f"Vault at {address} is not initialized (501)")
    if isinstance(exc, hvac.exceptions.RateLimitExceeded):
        return SourceUnavailable(f"Vault at {address} rate-limited {what} (429)")
    if isinstance(exc, hvac.exceptions.InvalidPath):
        namespace = f" and {key}.namespace" if auth.config.namespace else ""
        return SourceEmpty(
            f"Vault at {address} answered 404 to {what}: check that {key}.address{namespace} "
            "name a Vault server (not a proxy or another service)"
        )
    if isinstance(exc, hvac.exceptions.Forbidden):
        return denied(auth, what, None, holder=holder)
    if isinstance(exc, hvac.exceptions.VaultError):
        return SourceUnavailable(
            f"Vault at {address} failed to {what} ({type(exc).__name__}: "
            f"{vault_errors(exc, secrets)})"
        )
    return SourceUnavailable(
        f"unexpected answer from Vault at {address} to {what} ({type(exc).__name__})"
    )


def denied(auth: VaultAuth, what: str, needs: str | None, *, holder: str) -> SourceUnavailable:
    """Vault's 403 to ``what`` with a token it accepts: the policy lacks ``needs``."""
    return SourceUnavailable(
        f"permission denied by Vault at {auth.address} to {what}: the policy of the "
        f"agent's {holder} must allow {needs or what}"
    )


def too_large(auth: VaultAuth, path: str) -> SourceUnavailable:
    """A 200 answer to ``GET /v1/{path}`` over :data:`MAX_ANSWER_BYTES` after decoding."""
    return SourceUnavailable(
        f"Vault at {auth.address} answered GET /v1/{path} with more than "
        f"{MAX_ANSWER_BYTES // 1024} KiB (after decoding): refused, connection dropped; "
        f"is {auth.config_key}.address a Vault server (not a proxy or another service)?"
    )


def not_json(
    auth: VaultAuth, path: str, content_type: str | None, secrets: Iterable[str]
) -> SourceUnavailable:
    """A 200 answer to ``GET /v1/{path}`` that does not parse; its type is shown, masked."""
    ctype = outside(content_type or "no Content-Type", secrets, limit=60)
    return SourceUnavailable(
        f"Vault at {auth.address} answered GET /v1/{path} with a body that is not JSON "
        f"({ctype}): is {auth.config_key}.address a Vault server (not a proxy or another "
        "service)?"
    )


def raise_for_status(url: str | None, response: requests.Response, data: bytes) -> NoReturn:
    """Raise hvac's exception for a failed answer (``data``: the start of its body), carrying
    Vault's ``errors`` as hvac's own adapters do, so that callers handle one set of errors."""
    payload: Any = None
    text = data.decode("utf-8", errors="replace")  # Vault answers JSON, UTF-8
    if response.headers.get("Content-Type") == "application/json":
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError):
            payload = None
    errors = payload.get("errors") if isinstance(payload, dict) else None
    hvac.utils.raise_for_error(
        "get", url, response.status_code, None if errors else text, errors=errors, text=text
    )
    raise hvac.exceptions.VaultError(f"HTTP {response.status_code}", url=url)  # not reached


def vault_errors(exc: object, secrets: Iterable[str]) -> str:
    """Vault's own error strings (or, without any, the body it answered: an HTML page), one
    line, through :func:`outside`: ``secrets`` masked, cut to 200 characters, control
    characters escaped."""
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list | tuple) and errors:
        text = "; ".join(str(error) for error in errors)
    elif errors:
        text = str(errors)
    else:
        message = exc.args[0] if isinstance(exc, BaseException) and exc.args else None
        text = str(message) if message else "no detail"
    text = " ".join(text.replace("1 error occurred:", "").replace("*", " ").split())
    return outside(text or "no detail", secrets)


def reason(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """The root cause of a requests error, without its URL or object reprs, through
    :func:`outside` (``secrets`` masked, cut, control characters escaped)."""
    cause: Any = exc.args[0] if exc.args else exc
    why = getattr(cause, "reason", None)
    text = str(why if why is not None else cause)
    text = _OBJECT_PREFIX.sub("", text)
    match = _ROOT_CAUSE.search(text)
    if match:
        text = match.group(0)
    return outside(" ".join(text.split()) or type(exc).__name__, secrets)
