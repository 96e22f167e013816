"""Small frozen data carriers: a redacted ``Secret``, ``Credentials`` and ``Token``."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any


class Secret:
    """A string that never shows itself in ``repr``, ``str``, f-strings or logs.

    Read the value with :meth:`reveal`, only at the place where it is sent or written.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('[REDACTED]')"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:  # never pickled (state is kept as JSON, on purpose)
        raise TypeError("Secret values are not picklable")


@dataclass(frozen=True, slots=True)
class Credentials:
    """An OAuth2 client id and secret, as one credential source read them."""

    client_id: str
    client_secret: Secret
    #: name of the source that produced them ("env", "vault", "aws")
    source: str
    #: the source's version of these credentials (opaque; compared for equality only)
    version: str

    def fingerprint(self, key: bytes) -> str:
        """A keyed hash of id and secret: lets state files match credentials without the secret."""
        material = self.client_id.encode() + b"\0" + self.client_secret.reveal().encode()
        return hmac.new(key, material, hashlib.sha256).hexdigest()

    def same_as(self, other: Credentials | None) -> bool:
        """True when id and secret are equal (the source and version may differ)."""
        return (
            other is not None
            and self.client_id == other.client_id
            and self.client_secret == other.client_secret
        )


@dataclass(frozen=True, slots=True)
class Token:
    """An access token as the auth server issued it, with absolute times in UTC."""

    access_token: Secret
    token_type: str
    #: seconds, as received
    expires_in: int
    #: when the request that produced it was sent (so expiry is never later than the server's)
    obtained_at: datetime
    expires_at: datetime
    scope: str | None = None
    extensions: Mapping[str, Any] = field(default_factory=dict)

    @property
    def provider_slug(self) -> str | None:
        slug = self.extensions.get("provider_slug")
        return slug if isinstance(slug, str) else None

    @property
    def lifetime(self) -> timedelta:
        return self.expires_at - self.obtained_at

    def is_valid(self, now: datetime) -> bool:
        return now < self.expires_at

    def document(self) -> dict[str, Any]:
        """The JSON token document (file sink ``json`` format and write-back sinks)."""
        return {
            "access_token": self.access_token.reveal(),
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "expires_at": rfc3339(self.expires_at),
            "obtained_at": rfc3339(self.obtained_at),
            "scope": self.scope,
            "provider_slug": self.provider_slug,
            "extensions": dict(self.extensions),
        }


def rfc3339(moment: datetime) -> str:
    """``2026-11-28T16:27:29Z``: UTC, whole seconds, a ``Z`` suffix."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stored_is_newer(stored: Mapping[str, Any], ours: Mapping[str, Any]) -> bool:
    """True when a stored token document expires after ours (write-back sinks: newest wins)."""
    theirs, mine = _document_expiry(stored), _document_expiry(ours)
    return theirs is not None and mine is not None and theirs > mine


def _document_expiry(document: Mapping[str, Any]) -> datetime | None:
    """A document's ``expires_at`` (RFC 3339; no offset is taken as UTC), None if absent."""
    value = document.get("expires_at")
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


#: the most an access token may take, UTF-8 encoded (DESIGN §10: validated like a server answer)
MAX_TOKEN_BYTES = 64 * 1024
#: the most the agent reads of a token answer, a store answer it parses or a state file (1 MiB)
MAX_ANSWER_BYTES = 1024 * 1024

#: RFC 6750 §2.1 b64token: what an access token may consist of
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def is_access_token(value: str) -> bool:
    """True when ``value`` is an RFC 6750 b64token of at most :data:`MAX_TOKEN_BYTES` bytes.

    Such a token has no whitespace, newline, quote or control character: it is safe in a raw
    file, an ``env`` line and an ``Authorization: Bearer`` header.
    """
    # a match is ASCII, so its length in characters is its length in bytes
    return len(value) <= MAX_TOKEN_BYTES and _B64TOKEN.fullmatch(value) is not None
