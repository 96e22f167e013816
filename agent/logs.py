"""Logging: one line per event, JSON or text, with a redaction filter as a last line of defence.

The agent never passes a secret to a logger; the filter is there for third-party libraries
(httpx, httpcore, botocore, hvac/urllib3) that log requests and bodies at debug level.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
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
    # fleet mode (DESIGN §13): the generation adopted or published, the lease holder (host:pid)
    "generation",
    "holder",
    # the local proxy's access log (DESIGN §14): never a header value, the query or a body
    "method",
    "duration_ms",
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


@dataclass(frozen=True, slots=True)
class LogFlags:
    """``--log-level`` and ``--log-format``: they win over ``[agent]`` at start and at every
    SIGHUP reload (DESIGN §7)."""

    #: debug | info | warning | error; None: the config's ``agent.log_level``
    level: str | None = None
    #: json | text; None: the config's ``agent.log_format``
    format: str | None = None


def setup_logging(
    level: str = "info", fmt: str = "json", *, stream: TextIO | None = None
) -> Redactor:
    """Route every logger to one stderr handler with the redaction filter; returns the filter."""
    redactor = Redactor()
    handler = _AgentHandler(stream or sys.stderr)
    handler.addFilter(redactor)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    return redactor


class _AgentHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`setup_logging` installs (the one :func:`set_format` switches)."""


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def set_level(level: str) -> None:
    """The level of every logger from now on (at start, and when a reload changes it)."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.getLogger().setLevel(numeric)
    # APScheduler's own INFO lines ("Added job", "Running job") are noise for ops.
    logging.getLogger("apscheduler").setLevel(max(numeric, logging.WARNING))
    quiet = logging.WARNING if numeric > logging.DEBUG else logging.NOTSET
    for noisy in ("httpx", "httpcore"):  # their request lines only at debug
        logging.getLogger(noisy).setLevel(quiet)


def set_format(fmt: str) -> None:
    """Switch the handlers :func:`setup_logging` installed to ``fmt`` (json | text) in place:
    the same stream and redaction filter, the next line in the new format (a SIGHUP reload)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _AgentHandler):  # not a test's capture handler
            handler.setFormatter(_formatter(fmt))
