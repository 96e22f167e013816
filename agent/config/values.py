"""The config's own value types: durations, sizes, file modes, ``HOST:PORT`` (DESIGN §3).

Every duration field of the schema is a :class:`Duration` and every mode a :class:`FileMode`, so
that msgspec hands their values to :func:`dec_hook` (msgspec's own ``timedelta`` accepts
ISO 8601 only) and a duration in the file is never parsed any other way.
"""

from __future__ import annotations

import ipaddress
import math
import re
import stat
from datetime import timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from agent.keypath import toml_repr as _toml_repr

_HOSTNAME_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_HOSTNAME_LABEL}(?:\.{_HOSTNAME_LABEL})*\.?")
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_MICROSECONDS = MappingProxyType(
    {"ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
)
_DURATION_HINT = 'use seconds (30) or a number with a unit: "500ms", "30s", "5m", "24h"'

_OCTAL_RE = re.compile(r"(?:0o)?[0-7]+")

_SIZE_RE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB)?")
_SIZE_UNITS = MappingProxyType({"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30})
_SIZE_HINT = 'use a number of bytes (1048576) or one with a unit: "512KiB", "10MiB", "1GiB"'


class Duration(timedelta):
    """A ``timedelta`` read from the config with :func:`parse_duration`.

    Every duration field of the schema has this type so that msgspec hands its value to our
    decoder instead of its own (which accepts ISO 8601 only). It is an ordinary ``timedelta``
    otherwise; arithmetic on it returns plain ``timedelta`` values.
    """

    __slots__ = ()


class FileMode(int):
    """A permission mode (``0o640``) read from an octal string or a TOML integer."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"0o{int(self):03o}"


class Size(int):
    """A number of bytes read from the config with :func:`parse_size`."""

    __slots__ = ()


def parse_size(value: object) -> int:
    """Bytes from an integer (``1048576``) or a string with a binary unit (``"10MiB"``).

    Units: ``B``, ``KiB``, ``MiB``, ``GiB`` (powers of 1024; ``"10MB"`` is refused rather than
    guessed). Negative values, fractions and booleans raise :class:`ValueError`.
    """
    shown = _toml_repr(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {shown}: must not be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match:
            return int(match[1]) * _SIZE_UNITS[match[2] or "B"]
    raise ValueError(f"invalid size {shown}: {_SIZE_HINT}")


def parse_duration(value: object) -> timedelta:
    """A duration from seconds (``30``, ``1.5``, ``"0"``) or with units (``"500ms"``, ``"1m30s"``).

    Units: ``ms``, ``s``, ``m``, ``h``, ``d``; parts may be combined, largest first or not.
    Negative values, booleans and anything else raise :class:`ValueError` with a message that
    shows the accepted forms.
    """
    return timedelta(microseconds=_duration_microseconds(value))


def _duration_microseconds(value: object) -> int:
    shown = _toml_repr(value)
    amount: Decimal
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {shown}: {_DURATION_HINT}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"invalid duration {shown}: {_DURATION_HINT}")
        if value < 0:
            raise ValueError(f"invalid duration {shown}: must not be negative")
        amount = Decimal(str(value)) * _MICROSECONDS["s"]
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"invalid duration {shown}: must not be negative")
        if _NUMBER_RE.fullmatch(text):
            amount = Decimal(text) * _MICROSECONDS["s"]
        elif _DURATION_RE.fullmatch(text):
            amount = sum(
                (
                    Decimal(number) * _MICROSECONDS[unit]
                    for number, unit in _DURATION_PART_RE.findall(text)
                ),
                Decimal(0),
            )
        else:
            raise ValueError(f"invalid duration {shown}: {_DURATION_HINT}")
    else:
        raise ValueError(f"invalid duration {shown}: {_DURATION_HINT}")
    try:
        microseconds = int(amount.to_integral_value(rounding=ROUND_HALF_EVEN))
        timedelta(microseconds=microseconds)
    except (OverflowError, InvalidOperation):
        raise ValueError(f"invalid duration {shown}: too large") from None
    return microseconds


def _parse_mode(value: object) -> int:
    if isinstance(value, str):
        if not _OCTAL_RE.fullmatch(value):
            raise ValueError(
                f'invalid mode {_toml_repr(value)}: use octal digits, e.g. "0640" or "0600"'
            )
        mode = int(value.removeprefix("0o"), 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ValueError(
            f'invalid mode {_toml_repr(value)}: use an octal string ("0640") or integer (0o640)'
        )
    if not 0 <= mode <= 0o777:
        hint = ""
        if isinstance(value, int) and value > 0 and set(str(value)) <= set("01234567"):
            hint = f' (a TOML integer is decimal unless written 0o{value}; or write "0{value}")'
        raise ValueError(f"invalid mode {_toml_repr(value)}: must be between 0o000 and 0o777{hint}")
    if mode & stat.S_IWOTH:
        raise ValueError(
            f"invalid mode {_toml_repr(value)} (0o{mode:03o}): a token file must not be "
            "world-writable"
        )
    return mode


def dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return Duration(microseconds=_duration_microseconds(obj))
    if type_ is FileMode:
        return FileMode(_parse_mode(obj))
    if type_ is Size:
        return Size(parse_size(obj))
    raise NotImplementedError(f"no decoder for {type_!r}")


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; raises ValueError with what to write instead."""
    form = 'expected "HOST:PORT", e.g. "127.0.0.1:8787" or "[::1]:8787" ("" disables)'
    host, colon, port_text = value.rpartition(":")
    if not colon:
        raise ValueError(f"{_toml_repr(value)}: {form}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_toml_repr(value)}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f'{_toml_repr(value)}: write an IPv6 host in brackets, e.g. "[::1]:8787"')
    elif not host:
        raise ValueError(
            f'{_toml_repr(value)}: the host is missing: "127.0.0.1:PORT" for loopback, '
            '"0.0.0.0:PORT" for every interface'
        )
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{_toml_repr(value)}: {host!r} is not a host name or address")
    elif re.fullmatch(r"[\d.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{_toml_repr(value)}: {host!r} is not an IPv4 address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{_toml_repr(value)}: the port must be a number from 1 to 65535")
    return host, int(port_text)
