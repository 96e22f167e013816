"""Config key paths and values as the user wrote them, for messages.

``profiles."a.b".sinks[0]``, ``[[profiles.dvs.sinks]]``, ``"a string"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

#: one step of a key path: a key, an array index, or an unknown dict key (msgspec's ``[...]``)
Segment = str | int | None

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def key_path(segments: Sequence[Segment]) -> str:
    """``["profiles", "a.b", "sinks", 0]`` → ``profiles."a.b".sinks[0]`` (TOML key syntax)."""
    text = ""
    for segment in segments:
        if isinstance(segment, int):
            text += f"[{segment}]"
            continue
        name = "*" if segment is None else segment
        if segment is not None and not _BARE_KEY_RE.fullmatch(name):
            name = json.dumps(name)
        text = f"{text}.{name}" if text else name
    return text


def header(segments: Sequence[Segment]) -> str:
    """The TOML header of a table: ``[agent]``, ``[[profiles.dvs.sinks]]``."""
    if segments and isinstance(segments[-1], int):
        return f"[[{key_path(segments[:-1])}]]"
    return f"[{key_path(segments)}]"


def toml_repr(value: object) -> str:
    """A value as it would be written in TOML (for messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def listing(values: Iterable[object]) -> str:
    """``"a", "b", "c"``."""
    return ", ".join(toml_repr(value) for value in values)
