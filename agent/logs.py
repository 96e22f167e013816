"""Logging: one line per event, JSON or text, with a redaction filter as a last line of defence.

The agent never passes a secret to a logger; the filter is there for third-party libraries
(httpx, httpcore, botocore, hvac/urllib3) that log requests and bodies at debug level.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

#: fields a record may carry through ``extra=`` and that formatters print
FIELDS = (
    "event",
    "profile",
    "provider_slug",
    "expires_at",
    "source",
    "sink",
    "status",
    "attempt",
    "reason",
    "retry_in",
    "path",
)

REDACTED = "[REDACTED]"
#: how many registered secret values the redactor keeps (the newest win)
MAX_REMEMBERED = 256

_PATTERNS = (
    # Authorization: Basic xxx / Bearer xxx, in headers, reprs and tuples
    re.compile(r"(?i)\b(basic|bearer)(\s+|'\s*,\s*b?')[A-Za-z0-9\-._~+/]+=*"),
    # "access_token": "…", access_token=…, client_secret=…
    re.compile(
        r"(?i)(access_token|client_secret|secret_id|password|x-vault-token)"
        r"(\"?\s*[:=]\s*\"?|'\s*:\s*'|=)[^\s\"'&,}]+"
    ),
)


class Redactor(logging.Filter):
    """Replaces known secret values and credential-looking patterns in every record.

    ``add`` registers a value (a client secret, a token) so that it is redacted even where no
    pattern would recognise it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        # insertion-ordered, bounded: the newest secrets and tokens of every profile
        self._values: dict[str, None] = {}
        # longest first (a token containing a secret is replaced whole); rebuilt on change
        # only, since every log record reads it
        self._ordered: tuple[str, ...] = ()

    def add(self, value: str) -> None:
        if len(value) < 4:
            return
        with self._lock:
            known = value in self._values
            self._values.pop(value, None)
            self._values[value] = None  # most recently used: evicted last
            if known:
                return  # the same set of values: the order by length stands
            while len(self._values) > MAX_REMEMBERED:
                del self._values[next(iter(self._values))]
            self._ordered = tuple(sorted(self._values, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for value in self._ordered:
            if value in text:
                text = text.replace(value, REDACTED)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for name in FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, self.redact(value))
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_text:
            doc["exception"] = record.exc_text
        return msgspec.json.encode(doc).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        profile = getattr(record, "profile", None)
        head = f"{_timestamp(record)} {record.levelname:<7} "
        head += f"[{profile}] " if profile else ""
        line = head + record.getMessage()
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def setup_logging(
    level: str = "info", fmt: str = "json", *, stream: TextIO | None = None
) -> Redactor:
    """Route every logger to one stderr handler with the redaction filter; returns the filter."""
    redactor = Redactor()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(redactor)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(numeric)
    # APScheduler's own INFO lines ("Added job", "Running job") are noise for ops.
    logging.getLogger("apscheduler").setLevel(max(numeric, logging.WARNING))
    if numeric > logging.DEBUG:
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return redactor


def set_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))
