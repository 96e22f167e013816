"""SIGHUP with a changed config (DESIGN §5, §10): what differs between the running config and a
new valid one, as a list of actions for the :class:`~agent.app.Agent` to apply.

:func:`diff` is pure: it compares two :class:`~agent.config.Config` values and does nothing.
The actions come in the order they are applied: warnings for what only a restart changes, the
log level and format, the profiles removed, then every profile of the new config in its order
(added, changed, or unchanged, which re-reads its credentials as any SIGHUP does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import msgspec

from agent.config import Config, ProfileConfig

#: settings the running process cannot take over (a bound listener, an opened state store):
#: the key path as the config spells it, and how to read it
RESTART_KEYS: dict[str, Callable[[Config], object]] = {
    "agent.state_dir": lambda config: config.agent.state_dir,
    "health.listen": lambda config: config.health.listen,
}


@dataclass(frozen=True, slots=True)
class NeedsRestart:
    """A setting that takes effect at the next restart only (logged as a warning)."""

    #: its key path, e.g. ``health.listen``
    key: str


@dataclass(frozen=True, slots=True)
class SetLogLevel:
    """``agent.log_level`` changed: the new level applies at once."""

    level: str


@dataclass(frozen=True, slots=True)
class SetLogFormat:
    """``agent.log_format`` changed: the next line is written in the new format."""

    format: str


@dataclass(frozen=True, slots=True)
class RemoveProfile:
    """A profile no longer in the config: unscheduled and closed (its files stay in place)."""

    name: str


@dataclass(frozen=True, slots=True)
class AddProfile:
    """A profile new in the config: built, its sinks checked, then a token for it."""

    name: str
    config: ProfileConfig


@dataclass(frozen=True, slots=True)
class ChangeProfile:
    """A profile whose settings changed: rebuilt in place of the running one, then a new
    token (the running one stays when the new settings cannot be built)."""

    name: str
    config: ProfileConfig
    #: the keys of ``[profiles.NAME]`` that differ (``sinks``, ``scope``, ...)
    changed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ChangeProxy:
    """Only a profile's ``[proxy]`` table changed: its listener restarts with the new settings,
    the profile keeps its token (and re-reads its credentials, as at any SIGHUP)."""

    name: str
    config: ProfileConfig


@dataclass(frozen=True, slots=True)
class Retrigger:
    """A profile whose settings did not change: re-read its credentials now (coalesced)."""

    name: str


Action = (
    NeedsRestart
    | SetLogLevel
    | SetLogFormat
    | RemoveProfile
    | AddProfile
    | ChangeProfile
    | ChangeProxy
    | Retrigger
)


def changed_keys(old: ProfileConfig, new: ProfileConfig) -> tuple[str, ...]:
    """The top-level keys of a profile whose values differ between ``old`` and ``new``."""
    return tuple(
        field.name
        for field in msgspec.structs.fields(new)
        if not _same(getattr(old, field.name, None), getattr(new, field.name))
    )


def _same(a: object, b: object) -> bool:
    """Equal values, also across the profile classes of two schemas (a third-party kind
    added or removed by the new config gives another class with the same keys)."""
    if a == b:
        return True
    try:
        return bool(
            msgspec.to_builtins(a, enc_hook=_plain) == msgspec.to_builtins(b, enc_hook=_plain)
        )
    except (TypeError, NotImplementedError):
        return False


def _plain(obj: object) -> object:
    """The config's own value types (``Duration``, ``FileMode``) as plain values."""
    if isinstance(obj, timedelta):
        return obj.total_seconds()
    if isinstance(obj, int):
        return int(obj)
    raise NotImplementedError(type(obj).__name__)


def diff(running: Config, new: Config) -> list[Action]:
    """What applying ``new`` in place of ``running`` takes, in order (see the module's doc)."""
    if new == running:  # a plain SIGHUP: every profile re-reads its credentials
        return [Retrigger(name) for name in running.profiles]
    actions: list[Action] = [
        NeedsRestart(key) for key, read in RESTART_KEYS.items() if read(new) != read(running)
    ]
    if new.agent.log_level != running.agent.log_level:
        actions.append(SetLogLevel(new.agent.log_level))
    if new.agent.log_format != running.agent.log_format:
        actions.append(SetLogFormat(new.agent.log_format))
    actions.extend(RemoveProfile(name) for name in running.profiles if name not in new.profiles)
    for name, pc in new.profiles.items():
        before = running.profiles.get(name)
        if before is None:
            actions.append(AddProfile(name, pc))
        elif _same(before, pc):
            actions.append(Retrigger(name))
        else:
            changed = changed_keys(before, pc)
            if changed == ("proxy",):
                actions.append(ChangeProxy(name, pc))
            else:
                actions.append(ChangeProfile(name, pc, changed))
    return actions
