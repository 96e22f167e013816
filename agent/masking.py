"""Showing text safely: one mask string, one helper for text that comes from outside (DESIGN §10).

Server and store texts (an ``error_description``, an HTML page, a store's message) reach logs,
``/readyz``, ``status``, metrics and exception messages only through :func:`outside`: secrets
masked first, then cut to :data:`MAX_SHOWN` characters, then control characters escaped, so a
hostile server can neither echo a secret back into a status page nor move a terminal's cursor.
:class:`Masker` remembers the secret values of a process (client secrets, Basic header values,
tokens held, store credentials) and masks them wherever they appear.

Masking applies to values, never to the agent's own hint text.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

#: the one mask string
MASK = "[REDACTED]"
#: how many characters of an outside text are shown
MAX_SHOWN = 200
#: how many registered secret values a :class:`Masker` keeps (the newest win)
MAX_REMEMBERED = 256
#: values shorter than this are not masked (they would mask common words)
MIN_SECRET_LENGTH = 4

_PATTERNS = (
    # Authorization: Basic xxx / Bearer xxx, in headers, reprs and tuples
    re.compile(r"(?i)\b(basic|bearer)(\s+|'\s*,\s*b?')[A-Za-z0-9\-._~+/]+=*"),
    # "access_token": "…", access_token=…, client_secret=…
    re.compile(
        r"(?i)(access_token|client_secret|secret_id|password|x-vault-token|"
        r"aws_secret_access_key|aws_session_token)"
        r"(\"?\s*[:=]\s*\"?|'\s*:\s*'|=)[^\s\"'&,}]+"
    ),
)

# C0 and C1 controls, DEL, and the Unicode bidi overrides and isolates that reorder text
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``…)."""
    if not _CONTROL.search(text):
        return text

    def escaped(match: re.Match[str]) -> str:
        char = match[0]
        named = _NAMED.get(char)
        if named is not None:
            return named
        code = ord(char)
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _CONTROL.sub(escaped, text)


def variants(value: str) -> tuple[str, ...]:
    """The forms a secret travels in: as it is and URL-encoded (form bodies, query strings)."""
    forms = {value, quote(value, safe=""), quote_plus(value)}
    return tuple(form for form in forms if len(form) >= MIN_SECRET_LENGTH)


def mask_values(text: str, values: Iterable[str]) -> str:
    """``text`` with each of ``values`` (longest first) and credential patterns masked."""
    for value in sorted(values, key=len, reverse=True):
        if len(value) >= MIN_SECRET_LENGTH and value in text:
            text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    return text


def cut(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def outside(text: object, secrets: Iterable[str] = (), *, limit: int = MAX_SHOWN) -> str:
    """Text from outside made safe to show: ``secrets`` and credential patterns masked, cut to
    ``limit`` characters, control characters escaped."""
    return escape_controls(cut(mask_values(str(text), secrets), limit))


def basic_value(client_id: str, secret: str) -> str:
    """The base64 part of ``Authorization: Basic`` for these credentials (to mask it)."""
    return base64.b64encode(f"{client_id}:{secret}".encode()).decode("ascii")


class Masker:
    """A thread-safe, bounded registry of secret values; :meth:`mask` hides each of them and
    the credential patterns in a text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # insertion-ordered, bounded: the newest secrets and tokens of every profile
        self._values: dict[str, None] = {}
        # longest first (a token containing a secret is replaced whole); rebuilt on change
        # only, since every log record reads it
        self._ordered: tuple[str, ...] = ()

    def add(self, value: str) -> None:
        for form in variants(value):
            self._add(form)

    def _add(self, value: str) -> None:
        with self._lock:
            known = value in self._values
            self._values.pop(value, None)
            self._values[value] = None  # most recently used: evicted last
            if known:
                return  # the same set of values: the order by length stands
            while len(self._values) > MAX_REMEMBERED:
                del self._values[next(iter(self._values))]
            self._ordered = tuple(sorted(self._values, key=len, reverse=True))

    def mask(self, text: str) -> str:
        for value in self._ordered:
            if value in text:
                text = text.replace(value, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
        return text

    def shown(self, text: object, *, limit: int | None = None) -> str:
        """``text`` masked and control characters escaped (cut when ``limit`` is given)."""
        masked = self.mask(str(text))
        return escape_controls(masked if limit is None else cut(masked, limit))
