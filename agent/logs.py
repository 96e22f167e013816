"""Logging: one line per event, JSON or text, with a redaction filter as a last line of defence.

The agent never passes a secret to a logger; the filter is there for third-party libraries
(httpx, httpcore, botocore, hvac/urllib3) that log requests and bodies at debug level.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from agent.masking import MASK, Masker, escape_controls

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

REDACTED = MASK


class Redactor(Masker, logging.Filter):
    """Masks known secret values and credential-looking patterns in every record.

    ``add`` registers a value (a client secret, a token) so that it is masked even where no
    pattern would recognise it.
    """

    def __init__(self) -> None:
        Masker.__init__(self)
        logging.Filter.__init__(self)

    def redact(self, text: str) -> str:
        return self.mask(text)

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
        # JSON escapes control characters itself; a text line must not carry raw ESC/CR/LF
        line = head + escape_controls(record.getMessage())
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
