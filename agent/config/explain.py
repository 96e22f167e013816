"""msgspec's and tomllib's errors, said as ``key.path: what is wrong`` in the user's words.

msgspec names a path as ``$.profiles[...].sinks[0]``; the schema (:class:`~agent.config.schema.
Schema`) tells which table a path is in, which keys it has, and which values a key allows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import msgspec
import msgspec.inspect as mi

from agent.config.schema import Schema
from agent.config.values import dec_hook
from agent.keypath import Segment as _Segment
from agent.keypath import header as _header
from agent.keypath import key_path as _key_path
from agent.keypath import listing as _listing
from agent.keypath import toml_repr as _toml_repr

#: msgspec's error text: "<message> - at `$.path`" (no suffix at the root)
_MSGSPEC_ERROR_RE = re.compile(
    r"(?P<message>.*?)(?: - at `(?:key` in `)?\$(?P<path>[^`]*)`)?", re.S
)
_MSGSPEC_PATH_RE = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_TOML_ERROR_RE = re.compile(
    r"(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)", re.S
)
_TYPE_NAMES = MappingProxyType(
    {
        "str": "a string",
        "int": "an integer",
        "float": "a number",
        "bool": "a boolean (true or false)",
        "object": "a table",
        "array": "an array",
        "datetime": "a date-time",
        "date": "a date",
        "time": "a time",
    }
)


def explain(exc: msgspec.ValidationError, data: Mapping[str, Any], schema: Schema) -> str:
    """msgspec's message as ``key.path: what is wrong``."""
    message, segments = _split_msgspec_error(str(exc))
    if None in segments:
        # msgspec writes a dict key as `[...]`; the only dict is `profiles`: find which one.
        profiles = data.get("profiles")
        if isinstance(profiles, Mapping):
            for name, raw in profiles.items():
                try:
                    msgspec.convert(raw, schema.profile, dec_hook=dec_hook)
                except msgspec.ValidationError as inner:
                    message, rest = _split_msgspec_error(str(inner))
                    segments = ["profiles", name, *rest]
                    break
    return _describe(message, segments, data, schema)


def _split_msgspec_error(text: str) -> tuple[str, list[_Segment]]:
    match = _MSGSPEC_ERROR_RE.fullmatch(text)
    if match is None:  # pragma: no cover - the pattern matches any text
        return text, []
    segments: list[_Segment] = []
    for key, index in _MSGSPEC_PATH_RE.findall(match["path"] or ""):
        if key:
            segments.append(key)
        else:
            segments.append(None if index == "..." else int(index))
    return match["message"], segments


def _describe(
    message: str, segments: list[_Segment], data: Mapping[str, Any], schema: Schema
) -> str:
    field_type = _type_at(segments, data, schema)
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", message):
        key = m[1]
        where = _key_path([*segments, key])
        allowed = _struct_keys(field_type)
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        owner = _owning_table(segments, key, data, schema)
        if owner is not None:
            table = f"the {_header(owner)} table" if owner else "the top level"
            return (
                f"{where}: unknown key; {key} belongs to {table}: move it above the "
                f"{_header(segments)} header (a TOML key belongs to the last header above it)"
            )
        return f"{where}: unknown key (a typo?){hint}"
    if m := re.fullmatch(r"Object missing required field `(.*)`", message):
        key = m[1]
        where = _key_path([*segments, key])
        if key == "profiles":
            return f"{where}: required: add at least one [profiles.NAME] table"
        if key == "sinks":
            table = _key_path([*segments, "sinks"])
            return f"{where}: required: add at least one [[{table}]] table"
        return f"{where}: required key is missing"
    where = _key_path(segments) or "(top level)"
    if m := re.fullmatch(r"Invalid enum value (.*)", message):
        value = _value_at(data, segments)
        return f"{where}: invalid value {_toml_repr(value)}{_allowed(field_type)}"
    if m := re.fullmatch(r"Expected `(.*)`, got `(.*)`", message):
        expected = " or ".join(
            _TYPE_NAMES.get(name, name) for name in m[1].split(" | ") if name != "null"
        )
        got = _TYPE_NAMES.get(m[2], m[2])
        return f"{where}: expected {expected}, got {got}{_allowed(field_type)}"
    return f"{where}: {message}"


def _owning_table(
    segments: list[_Segment], key: str, data: Mapping[str, Any], schema: Schema
) -> list[_Segment] | None:
    """The enclosing table that has ``key``, when it is not the table at ``segments``."""
    for end in range(len(segments) - 1, -1, -1):
        if key in _struct_keys(_type_at(segments[:end], data, schema)):
            return segments[:end]
    return None


def _type_at(segments: list[_Segment], data: Mapping[str, Any], schema: Schema) -> mi.Type | None:
    """The schema's type at a key path (None when the path leaves the schema).

    A tagged union (the sinks) resolves to the member that the table's ``type`` in ``data``
    names, so that a sink's keys are those of its type.
    """
    current: mi.Type = mi.type_info(schema.config)
    for depth, segment in enumerate(segments):
        current = _tagged_member(_without_none(current), _value_at(data, segments[:depth]))
        if isinstance(current, mi.StructType) and isinstance(segment, str):
            found = [field for field in current.fields if field.encode_name == segment]
            if not found:
                return None
            current = found[0].type
        elif isinstance(current, mi.ListType) and isinstance(segment, int):
            current = current.item_type
        elif isinstance(current, mi.DictType) and not isinstance(segment, int):
            current = current.value_type
        else:
            return None
    return _tagged_member(_without_none(current), _value_at(data, segments))


def _tagged_member(type_info: mi.Type, value: Any) -> mi.Type:
    """The member of a tagged union of Structs that ``value`` (a table) names by its tag."""
    if isinstance(type_info, mi.UnionType) and isinstance(value, Mapping):
        for member in type_info.types:
            if (
                isinstance(member, mi.StructType)
                and member.tag_field is not None
                and value.get(member.tag_field) == member.tag
            ):
                return member
    return type_info


def _without_none(type_info: mi.Type) -> mi.Type:
    if isinstance(type_info, mi.UnionType):
        members = [t for t in type_info.types if not isinstance(t, mi.NoneType)]
        if len(members) == 1:
            return members[0]
    return type_info


def _struct_keys(type_info: mi.Type | None) -> list[str]:
    if not isinstance(type_info, mi.StructType):
        return []
    keys = [field.encode_name for field in type_info.fields]
    if type_info.tag_field:
        keys.insert(0, type_info.tag_field)
    return keys


def _allowed(type_info: mi.Type | None) -> str:
    if isinstance(type_info, mi.LiteralType):
        return f"; expected one of: {_listing(type_info.values)}"
    return ""


def _value_at(data: Mapping[str, Any], segments: list[_Segment]) -> Any:
    value: Any = data
    for segment in segments:
        try:
            value = value[segment]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def toml_syntax_error(exc: Exception, source: str) -> str:
    """tomllib's error as ``FILE:LINE:COLUMN: TOML syntax error: what``."""
    match = _TOML_ERROR_RE.fullmatch(str(exc))
    if match:
        return f"{source}:{match['line']}:{match['column']}: TOML syntax error: {match['message']}"
    return f"{source}: TOML syntax error: {exc}"
