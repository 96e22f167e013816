"""Loading the config file: TOML → the kinds it uses → typed, validated, frozen Structs.

The TOML text is parsed with :mod:`tomllib`; the registry (:mod:`agent.registry`) finds the kind
of every source name and sink ``type``; :func:`msgspec.convert` decodes the file into the schema
of those kinds, so every error carries a path that is said as the TOML key the user typed
(``profiles.dvs.sinks[0].mode``). Checks that span several keys run after the conversion: the
core's here, each kind's in its own module, and the target checks (two sinks on one target, a
sink on a credential source) in :mod:`agent.config.targets`.

Secrets never sit in this file: there is no key for one, and a URL with a ``user:password@``
part is refused.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from agent.config.checks import is_explicit_path, readable_file_problem, url_problem
from agent.config.explain import explain, toml_syntax_error
from agent.config.schema import CORE_PROFILE_KEYS, Config, ProfileConfig, Schema
from agent.config.targets import target_problems
from agent.config.values import dec_hook, parse_listen
from agent.errors import ConfigError
from agent.keypath import Segment, key_path, listing, toml_repr
from agent.plugin import Target, Where
from agent.proxy.settings import proxy_problems

if TYPE_CHECKING:
    from agent.registry import Registry, Role

DEFAULT_CONFIG_PATH = "/etc/dvs-agent/agent.toml"
#: the variable that names the config file when ``-c`` is not given
CONFIG_PATH_ENV = "DVS_AGENT_CONFIG"

_PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: a profile name names state files (``NAME.json``), metric labels and Redis keys (DESIGN §10)
MAX_PROFILE_NAME = 64
#: RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), separated by single spaces
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+( [\x21\x23-\x5b\x5d-\x7e]+)*")


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str]) -> Path:
    """``-c PATH`` when given, else ``$DVS_AGENT_CONFIG`` when set, else the default path."""
    if cli_value:
        return Path(cli_value)
    from_env = environ.get(CONFIG_PATH_ENV)
    if from_env:
        return Path(from_env)
    return Path(DEFAULT_CONFIG_PATH)


def load_config(path: Path, *, registry: Registry | None = None) -> Config:
    """Read and validate the config file; every problem is a :class:`ConfigError`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass -c PATH or set {CONFIG_PATH_ENV}") from None
    except PermissionError:
        raise ConfigError(
            f"{path}: permission denied: the agent (uid {os.getuid()}) cannot read it; "
            "check the file's owner and mode"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; pass the path of the TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); TOML files are UTF-8"
        ) from None
    return parse_config(text, source=str(path), registry=registry)


def parse_config(
    text: str, *, source: str = "<string>", registry: Registry | None = None
) -> Config:
    """Validate TOML text; ``source`` starts every error message (the file's path).

    ``registry`` finds the kinds (a new :class:`~agent.registry.Registry` when None).
    """
    from agent.registry import PluginError, Registry  # the registry imports this package

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(toml_syntax_error(exc, source)) from None
    if registry is None:
        registry = Registry()
    data = _with_default_sink_type(data)
    sources, sinks, fleets, errors = _kinds_named(data, registry)
    if errors:
        raise _config_error(source, errors)
    try:
        schema = registry.schema(sources, sinks, fleets)
    except PluginError as exc:  # a built-in cannot fail to load; a third-party one named here
        raise _config_error(source, [str(exc)]) from None
    try:
        config = msgspec.convert(data, schema.config, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        raise _config_error(source, [explain(exc, data, schema)]) from None
    errors = list(_check(config, schema, registry))
    if errors:
        raise _config_error(source, errors)
    return config


def fleet_store_name(fleet: msgspec.Struct) -> str:
    """The ``store`` of a decoded ``[profiles.NAME.fleet]`` table (its Struct's tag)."""
    return str(type(fleet).__struct_config__.tag)


def sink_kind_name(sink: msgspec.Struct) -> str:
    """The ``type`` of a decoded sink entry (its Struct's tag)."""
    return str(type(sink).__struct_config__.tag)


def config_file_warnings(
    path: Path, config: Config, *, registry: Registry | None = None
) -> list[str]:
    """What makes the config file at ``path`` editable by others than root and the agent.

    DESIGN §10: the file (and the directory it is in, which lets its writer replace it) being
    writable by group or others, or owned by a uid other than root and the agent's (effective)
    one, is a warning at every start, not an error. Each message names the path, its mode and
    owner, what to do, and every command of ``config`` (a file sink's ``on_change``), which
    run as the agent.
    Empty when nothing is wrong or the path cannot be examined (loading it reports that).
    """
    euid = os.geteuid()
    if registry is None:
        from agent.registry import Registry  # the registry imports this package

        registry = Registry()
    hooks = [
        f"{where} = [{listing(argv)}]"
        for name, profile in config.profiles.items()
        for index, sink in enumerate(profile.sinks)
        for where, argv in registry.sink(sink_kind_name(sink)).commands(
            sink, Where.of(name, ["sinks", index], plugins=registry)
        )
    ]
    if hooks:
        stake = (
            f"whoever can change it chooses the commands the agent runs as uid {euid}: "
            + "; ".join(hooks)
        )
    else:
        stake = (
            "whoever can change it decides where tokens are written, and could add an on_change "
            f"command that the agent would run as uid {euid}"
        )
    warnings = []
    file_problem = _foreign_write_problem(path, euid, directory=False)
    if file_problem is not None:
        problem, mode, fix = file_problem
        warnings.append(f"{path}: the config file ({mode}) {problem}: {stake}; {fix}")
    directories = [path.parent]
    try:
        resolved = path.resolve().parent
    except (OSError, RuntimeError):  # a symlink loop: loading the file reports it
        resolved = path.parent
    if resolved != path.parent:
        directories.append(resolved)
    for directory in directories:
        dir_problem = _foreign_write_problem(directory, euid, directory=True)
        if dir_problem is not None:
            problem, mode, fix = dir_problem
            warnings.append(
                f"{path}: the config file's directory {directory} ({mode}) {problem}: whoever "
                f"can write it can replace the file, and {stake}; {fix}"
            )
    return warnings


def _foreign_write_problem(
    path: Path, euid: int, *, directory: bool
) -> tuple[str, str, str] | None:
    """(what is wrong, its mode and owner, the fix) when users other than root and ``euid`` can
    write ``path``; None when they cannot, or ``path`` cannot be examined."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    writers = [who for bit, who in ((0o020, "group"), (0o002, "others")) if mode & bit]
    if directory and mode & stat.S_ISVTX:
        writers = []  # sticky (/tmp): others cannot replace a file they do not own
    problems = []
    if writers:
        problems.append(f"is writable by {' and '.join(writers)}")
    if info.st_uid not in (0, euid):
        problems.append(f"is owned by uid {info.st_uid}, not by root or the agent (uid {euid})")
    if not problems:
        return None
    described = (
        f"mode {mode:04o}, owner uid {info.st_uid}{_user_name(info.st_uid)}, gid {info.st_gid}"
    )
    fixes = []
    if info.st_uid not in (0, euid):
        fixes.append(f"chown root {path}")
    if writers:
        fixes.append(f"chmod go-w {path}")
    kind = "directory" if directory else "file"
    commands = " && ".join(fixes)
    fix = f"make the {kind} root's (or the agent's) and not writable by others: {commands}"
    return " and ".join(problems), described, fix


def _user_name(uid: int) -> str:
    """`` (name)`` of a uid, or nothing when it has no passwd entry."""
    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""


def _config_error(source: str, errors: list[str]) -> ConfigError:
    return ConfigError("\n".join(f"{source}: {error}" for error in errors))


# ------------------------------------------------------------------------- kinds named
def _with_default_sink_type(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``type = "file"`` added to each sink table without a ``type`` (a copy):
    msgspec requires the tag in a tagged union."""
    profiles = data.get("profiles")
    if not isinstance(profiles, Mapping):
        return data
    copied: dict[str, Any] = {}
    for name, profile in profiles.items():
        sinks = profile.get("sinks") if isinstance(profile, Mapping) else None
        if isinstance(sinks, list):
            profile = {
                **profile,
                "sinks": [
                    {"type": "file", **sink}
                    if isinstance(sink, Mapping) and "type" not in sink
                    else sink
                    for sink in sinks
                ],
            }
        copied[name] = profile
    return {**data, "profiles": copied}


def _kinds_named(
    data: Mapping[str, Any], registry: Registry
) -> tuple[set[str], set[str], set[str], list[str]]:
    """The source, sink and fleet store kinds the file names, and the names no plug-in
    provides (or whose plug-in does not load), as messages. Shapes msgspec will refuse are
    left to it."""
    sources: set[str] = set()
    sinks: set[str] = set()
    fleets: set[str] = set()
    errors: list[str] = []
    profiles = data.get("profiles")
    if not isinstance(profiles, Mapping):
        return sources, sinks, fleets, errors

    from agent.registry import PluginError

    def use(role: Role, name: str, where: str) -> bool:
        try:
            registry.kind(role, name)
        except PluginError as exc:
            errors.append(f"{where}: {exc}")
            return False
        return True

    for name, profile in profiles.items():
        if not isinstance(profile, Mapping):
            continue
        listed = profile.get("sources", ["env"])
        for index, source in enumerate(listed if isinstance(listed, list) else []):
            if not isinstance(source, str) or source in sources:
                continue
            where = key_path(["profiles", name, "sources", index])
            if not registry.provides("source", source):
                errors.append(
                    f"{where}: invalid value {toml_repr(source)}; expected one of: "
                    f"{listing(registry.names('source'))}"
                )
            elif use("source", source, where):
                sources.add(source)
        for table in profile:
            if (
                table not in CORE_PROFILE_KEYS
                and table not in sources
                and not registry.is_builtin("source", table)
                and registry.provides("source", table)
                and use("source", table, key_path(["profiles", name, table]))
            ):
                sources.add(table)
        entries = profile.get("sinks")
        for index, sink in enumerate(entries if isinstance(entries, list) else []):
            if not isinstance(sink, Mapping) or "type" not in sink:
                continue
            kind = sink["type"]
            where = key_path(["profiles", name, "sinks", index, "type"])
            if not isinstance(kind, str):
                errors.append(
                    f"{where}: expected a string; supported: {listing(registry.names('sink'))}"
                )
            elif kind in sinks:
                continue
            elif not registry.provides("sink", kind):
                errors.append(
                    f"{where}: unknown sink type {toml_repr(kind)}; "
                    f"supported: {listing(registry.names('sink'))}"
                )
            elif use("sink", kind, where):
                sinks.add(kind)
        fleet = profile.get("fleet")
        store = fleet.get("store") if isinstance(fleet, Mapping) else None
        if isinstance(fleet, Mapping) and store is None:
            errors.append(
                f"{key_path(['profiles', name, 'fleet', 'store'])}: required: name the fleet "
                f"store, one of: {listing(registry.names('fleet'))}"
            )
        elif isinstance(store, str) and store not in fleets:
            where = key_path(["profiles", name, "fleet", "store"])
            if not registry.provides("fleet", store):
                errors.append(
                    f"{where}: invalid value {toml_repr(store)}; expected one of: "
                    f"{listing(registry.names('fleet'))}"
                )
            elif use("fleet", store, where):
                fleets.add(store)
    return sources, sinks, fleets, errors


# ------------------------------------------------------------------------ cross-field checks
def _check(config: Config, schema: Schema, registry: Registry) -> Iterator[str]:
    """Every problem that msgspec's types cannot express, as ``key.path: what is wrong``."""
    state_dir = config.agent.state_dir
    if not state_dir:
        yield "agent.state_dir: must not be empty"
    elif not is_explicit_path(state_dir):
        yield (
            f"agent.state_dir: {toml_repr(state_dir)} is relative: write an absolute path, or "
            "start it with ./ to resolve it against the working directory"
        )
    if config.health.listen:
        try:
            parse_listen(config.health.listen)
        except ValueError as exc:
            yield f"health.listen: {exc}"
    if not config.profiles:
        yield "profiles: at least one profile is required: add a [profiles.NAME] table"
    read: list[tuple[str, Target]] = []
    written: list[tuple[str, Target]] = []
    for name, profile in config.profiles.items():
        if not _PROFILE_NAME_RE.fullmatch(name):
            yield (
                f"{key_path(['profiles', name])}: invalid profile name {toml_repr(name)}: "
                "use letters, digits, '_', '.' and '-', starting with a letter or digit "
                "(it names files and metric labels)"
            )
        elif len(name) > MAX_PROFILE_NAME:
            yield (
                f"{key_path(['profiles', name])}: the profile name is {len(name)} characters "
                f"long, at most {MAX_PROFILE_NAME} are allowed (it names the state file "
                "NAME.json, metric labels and keys): choose a shorter name"
            )
        yield from _check_profile(name, profile, listing(schema.sources))
        tables = profile.tables()
        for kind_name, kind in schema.sources.items():
            listed = kind_name in profile.sources
            where = Where.of(name, [kind_name], tables=tables, listed=listed, plugins=registry)
            table = tables.get(kind_name)
            yield from kind.check_table(table, where)
            if listed and table is not None:
                read += [(name, target) for target in kind.targets(table, where)]
        for index, sink in enumerate(profile.sinks):
            sink_kind = schema.sinks[sink_kind_name(sink)]
            where = Where.of(name, ["sinks", index], tables=tables, plugins=registry)
            yield from sink_kind.check(sink, where)
            written += [(name, target) for target in sink_kind.targets(sink, where)]
        if profile.fleet is not None:
            fleet_kind = schema.fleets[fleet_store_name(profile.fleet)]
            where = Where.of(name, ["fleet"], tables=tables, plugins=registry)
            yield from fleet_kind.check(profile.fleet, where)
    yield from target_problems(read, written)


def _check_profile(name: str, profile: ProfileConfig, supported: str) -> Iterator[str]:
    def key(*segments: Segment) -> str:
        return key_path(["profiles", name, *segments])

    if profile.token_url is not None:
        problem = url_problem(
            profile.token_url,
            example='"https://api.osigu.com/v1/oauth/token"',
            exposed="the client secret",
        )
        if problem:
            yield f"{key('token_url')}: {problem}"
    if profile.scope is not None and not _SCOPE_RE.fullmatch(profile.scope):
        yield (
            f"{key('scope')}: invalid scope {toml_repr(profile.scope)}: space-separated tokens "
            "of printable ASCII without '\"' or '\\' (RFC 6749 §3.3)"
        )
    if profile.ca_bundle is not None:
        problem = readable_file_problem(profile.ca_bundle)
        if problem:
            yield f"{key('ca_bundle')}: {toml_repr(profile.ca_bundle)}: {problem}"
    if not timedelta(0) < profile.request_timeout <= timedelta(minutes=5):
        yield f"{key('request_timeout')}: must be more than 0 and at most 5 minutes"
    if not profile.sources:
        yield f"{key('sources')}: must name at least one source; supported: {supported}"
    seen: set[str] = set()
    for index, source in enumerate(profile.sources):
        if source in seen:
            yield f"{key('sources', index)}: {source!r} is listed twice"
        seen.add(source)
    poll = profile.rotation.poll_interval
    if timedelta(0) < poll < timedelta(seconds=1):
        yield f"{key('rotation', 'poll_interval')}: must be 0 (no polling) or at least 1s"
    if not profile.sinks and profile.proxy is None:
        yield (
            f"{key('sinks')}: at least one sink is required: add a [[{key('sinks')}]] table "
            f"(or a [{key('proxy')}] for consumers that use the local proxy)"
        )
    if profile.proxy is not None:
        yield from proxy_problems(name, profile.proxy, key("proxy"))
