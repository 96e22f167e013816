"""The ``dvs-agent`` command: arguments, exit codes and signals; the work is in ``agent.app``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import secrets
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, get_args

import msgspec

from agent import __version__, kinds
from agent.config import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_PATH,
    AgentSection,
    Config,
    ProfileConfig,
    config_file_warnings,
    fleet_store_name,
    load_config,
    sink_kind_name,
)
from agent.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    AgentError,
    SinkError,
    most_severe,
)
from agent.examples import EXAMPLES
from agent.logs import LogFlags, setup_logging
from agent.process import release_sighup
from agent.registry import Registry

if TYPE_CHECKING:
    from agent.models import Credentials, Token
    from agent.state import StateStore

DESCRIPTION = """\
Keeps a valid OSIGU/DVS access token on a local path for the services next to it.
Reads the OAuth2 client id and secret from a credential source, exchanges them at the
auth server, writes the token atomically, refreshes it before it expires, and re-authenticates
at once when the credentials are rotated."""

EPILOG = f"""\
config: -c PATH, else ${CONFIG_PATH_ENV}, else {DEFAULT_CONFIG_PATH}
exit codes: 0 ok, 64 usage, 69 auth server or source unavailable, 73 a sink could not be
written, 75 refresh refused by the rate limit (try later), 77 credentials rejected (401),
78 configuration invalid or missing
signals (run): SIGHUP re-reads the config and credentials and re-authenticates now;
SIGTERM/SIGINT stop within 5 s, leaving the token files in place

try it: dvs-agent dev   (a local token issuer and an agent against it, in ./dev/)"""


def _agent_choices(key: str) -> tuple[str, ...]:
    """The values ``agent.KEY`` may take in the config: a flag that overrides it takes those."""
    types = {field.name: field.type for field in msgspec.structs.fields(AgentSection)}
    return tuple(get_args(types[key]))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dvs-agent",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dvs-agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    config_opt = _Parser(add_help=False)
    config_opt.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help=f"config file (default: ${CONFIG_PATH_ENV}, else {DEFAULT_CONFIG_PATH})",
    )
    log_opts = _Parser(add_help=False)
    log_opts.add_argument(
        "--log-level",
        choices=_agent_choices("log_level"),
        help="log this much and more severe (overrides agent.log_level, also after a SIGHUP)",
    )
    log_opts.add_argument(
        "--log-format",
        choices=_agent_choices("log_format"),
        help="one JSON object or one text line per event (overrides agent.log_format, also "
        "after a SIGHUP)",
    )

    commands.add_parser(
        "run",
        parents=[config_opt, log_opts],
        help="run the agent in the foreground (systemd Type=notify aware)",
        description="Run the agent: keep every profile's token fresh until SIGTERM/SIGINT.",
    )
    once = commands.add_parser(
        "once",
        parents=[config_opt, log_opts],
        help="write one token per profile into its sinks, then exit",
        description="Write one token per profile into its sinks, then exit. A recorded token "
        "that is still valid for the same credentials is reused (no request).",
    )
    once.add_argument("--profile", metavar="NAME", help="only this profile")
    once.add_argument(
        "--force", action="store_true", help="request a new token even if one is still valid"
    )
    refresh = commands.add_parser(
        "refresh",
        parents=[config_opt],
        help="ask the running agent to re-authenticate now",
        description="Ask the running agent (through its [health] listener) to re-authenticate "
        "now: for a consumer that got a 401 with the current token. Rate-limited per profile.",
    )
    refresh.add_argument("--profile", metavar="NAME", help="only this profile (default: all)")
    commands.add_parser(
        "status",
        parents=[config_opt],
        help="show the running agent's profiles (exit 0 when ready, 69 when not)",
        description="Ask the running agent's health listener for each profile's state: one "
        "line per profile. Exit 0 when every profile holds a valid token, 69 when not.",
    )
    check = commands.add_parser(
        "check",
        parents=[config_opt, log_opts],
        help="validate the config (and with --connect, the sources and sinks)",
        description="Validate the config file. With --connect, also read each profile's "
        "credential sources (never printing a secret), check that every sink is writable, and "
        "request one token per profile, recorded in state_dir so that the first start reuses "
        "it. With --user, the file sinks' directories and state_dir are checked as that user.",
    )
    check.add_argument(
        "--connect",
        action="store_true",
        help="also read the sources, check the sinks and request (and record) one token",
    )
    check.add_argument(
        "--user",
        metavar="NAME",
        help="with --connect: check writability (and record the token) as this user, the one "
        "the service runs as",
    )
    dev = commands.add_parser(
        "dev",
        parents=[log_opts],
        help="try it out: a local token issuer and an agent against it",
        description="Serve a token endpoint with the auth server's behaviour on loopback "
        "(demo credentials, short-lived tokens), write a ready config under --dir and run an "
        "agent against it that keeps DIR/token and DIR/token.json fresh. Ctrl-C stops both.",
    )
    dev.add_argument("--dir", default="dev", help="where to write the config and tokens (./dev)")
    dev.add_argument("--port", type=int, default=8780, help="issuer port on 127.0.0.1 (8780)")
    dev.add_argument(
        "--expires-in", type=int, default=30, metavar="SECONDS", help="token lifetime (30)"
    )
    dev.add_argument(
        "--issuer-only",
        action="store_true",
        help="serve only the token endpoint (for consumers' own integration tests)",
    )
    fleet = commands.add_parser(
        "fleet",
        help="fleet mode: clear a stuck mint lease by hand",
        description="Fleet mode ([profiles.NAME.fleet]): act on the fleet store of a profile.",
    )
    fleet_commands = fleet.add_subparsers(
        dest="fleet_command", metavar="ACTION", parser_class=_Parser
    )
    fleet_commands.required = True
    release = fleet_commands.add_parser(
        "release",
        parents=[config_opt],
        help="drop the fleet's mint lease, whoever holds it",
        description="Drop the mint lease of a profile's fleet, whoever holds it: the next "
        "agent that needs a token takes it. For a lease stuck on a host that hangs while "
        "renewing it. The profile's credentials are read from its sources (the fleet key "
        "derives from them); nothing else is changed.",
    )
    release.add_argument(
        "--profile",
        metavar="NAME",
        help="the profile (default: the only one with a [fleet] table)",
    )
    example = commands.add_parser(
        "example",
        help=f"print an example file shipped in the package: {', '.join(EXAMPLES)}",
        description="Print an example file shipped in the package, to start an install "
        "without a checkout: config (the config file, every key at its default), systemd (the "
        "hardened unit), alerts (Prometheus alert rules), kubernetes (the agent as a sidecar). "
        "For example: dvs-agent example config > agent.toml",
    )
    # a tuple, not the dict: shtab takes a dict of choices for subcommands
    example.add_argument("name", metavar="NAME", choices=tuple(EXAMPLES), help=" | ".join(EXAMPLES))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: str = args.command
    if command != "run" and not (command == "dev" and not args.issuer_only):
        release_sighup()  # only the daemon serves SIGHUP (it unblocks it with its handler)
    if command == "example":
        from agent.examples import example_text

        sys.stdout.write(example_text(args.name))
        return EX_OK
    try:
        if command == "dev":
            from agent.dev import run_dev

            return run_dev(
                Path(args.dir),
                port=args.port,
                expires_in=args.expires_in,
                issuer_only=args.issuer_only,
                log_flags=LogFlags(args.log_level, args.log_format),
            )
        path = _config_path(args.config)
        registry = Registry()
        config = load_config(path, registry=registry)
        if command == "check":
            flags = LogFlags(args.log_level, args.log_format)
            return _check(
                config,
                path,
                connect=args.connect,
                registry=registry,
                log_flags=flags,
                user=args.user,
            )
        if command == "status":
            return _status(config)
        if command == "refresh":
            return _refresh(config, args.profile)
        if command == "fleet":
            return _fleet_release(config, args.profile, registry)
        flags = LogFlags(args.log_level, args.log_format)
        redactor = setup_logging(
            flags.level or config.agent.log_level, flags.format or config.agent.log_format
        )
        for warning in config_file_warnings(
            path, config, registry=registry
        ):  # at every start (DESIGN §10)
            logging.getLogger("agent").warning("%s", warning, extra={"event": "config_trust"})
        from agent.app import Agent

        metrics = None
        if command == "run" and config.health.address is not None:
            from agent.metrics import Metrics

            metrics = Metrics()
        agent = Agent(
            config,
            config_path=path,
            redactor=redactor,
            metrics=metrics,
            registry=registry,
            log_flags=flags,
        )
        if command == "once":
            try:
                return agent.once(only=args.profile, force=args.force)
            finally:
                agent.close()
        result = agent.run()
        if not result.clean:
            # a request still in flight past the deadline: the files are complete, exit now
            logging.shutdown()
            os._exit(result.code)
        return result.code
    except AgentError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return EX_OK


def _config_path(cli_value: str | None) -> Path:
    from agent.config import resolve_config_path

    return resolve_config_path(cli_value, os.environ)


def _error(message: str) -> None:
    """The error that ends a command, printed once: a log line (in the log format) once
    logging is set up, else one plain line (not also through the logger, whose last-resort
    handler prints to stderr as well)."""
    if logging.getLogger().handlers:
        logging.getLogger("agent").error("%s", message)
    else:
        print(f"dvs-agent: error: {message}", file=sys.stderr)


def _describe_proxy(name: str, pc: ProfileConfig) -> str:
    from agent.proxy.settings import specs_of

    [spec] = specs_of({name: pc})
    cfg = spec.config
    group = cfg.socket_group or "the agent's group"
    who = f"{group}, mode 0660" if spec.listen.path is not None else "TCP: any local user"
    return (
        f"proxy {spec.listen} → {spec.upstream} ({who}; max_body {cfg.max_body} bytes, "
        f"{cfg.max_connections} connections)"
    )


def _logins(pc: ProfileConfig) -> set[str]:
    """The Vault login methods (``auth_method``) a profile's tables and sinks use."""
    tables = pc.tables()
    vault = tables.get("vault")
    found: set[str] = set()
    default = getattr(vault, "auth_method", None)
    if vault is not None and "vault" in pc.sources and default:
        found.add(default)
    for sink in pc.sinks:
        if sink_kind_name(sink) == "vault":
            method = getattr(sink, "auth_method", None) or default or "approle"
            found.add(method)
    return found


def _check(
    config: Config,
    path: Path,
    *,
    connect: bool,
    registry: Registry,
    log_flags: LogFlags,
    user: str | None = None,
) -> int:
    out = sys.stdout
    account = None
    if user is not None:
        if not connect:
            print("dvs-agent: error: --user goes with --connect", file=sys.stderr)
            return EX_USAGE
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            print(f"dvs-agent: error: --user {user}: no such user", file=sys.stderr)
            return EX_USAGE
    names = ", ".join(config.profiles)
    print(f"{path}: ok, {len(config.profiles)} profile(s): {names}", file=out)
    print(f"  state_dir {config.agent.state_dir}", file=out)
    for name, pc in config.profiles.items():
        poll = pc.rotation.poll_interval.total_seconds()
        print(
            f"profile {name}: {pc.resolved_token_url} (grant_type in {pc.grant_type_location}), "
            f"sources {' → '.join(pc.sources)}, "
            f"refresh {pc.refresh_before_expiry.total_seconds():g}s before expiry, "
            f"{'poll every ' + format(poll, 'g') + 's' if poll else 'no polling'}",
            file=out,
        )
        for source in pc.sources:
            print(f"  source {kinds.describe_source(registry, name, pc, source)}", file=out)
        for index in range(len(pc.sinks)):
            print(f"  sink {kinds.describe_sink(registry, name, pc, index)}", file=out)
        fleet = kinds.describe_fleet(registry, name, pc)
        if fleet is not None:
            print(f"  {fleet}", file=out)
        if pc.proxy is not None:
            print(f"  {_describe_proxy(name, pc)}", file=out)
    used = {("source", source) for pc in config.profiles.values() for source in pc.sources}
    used |= {("sink", sink_kind_name(sink)) for pc in config.profiles.values() for sink in pc.sinks}
    used |= {("login", method) for pc in config.profiles.values() for method in _logins(pc)}
    used |= {
        ("fleet", fleet_store_name(pc.fleet))
        for pc in config.profiles.values()
        if pc.fleet is not None
    }
    print("plug-ins in use:", file=out)
    for role, kind in sorted(used, key=lambda rk: (rk[0], registry.names(rk[0]).index(rk[1]))):  # type: ignore[arg-type]
        info = registry.info(role, kind)  # type: ignore[arg-type]
        origin = "built in" if info.builtin else info.value
        print(f"  {role} {kind}: {info.distribution} {info.version} ({origin})", file=out)
    for message in registry.shadowed():
        print(f"  warning: {message}", file=out)
    if not connect:
        return EX_OK
    state_dir = Path(config.agent.state_dir)
    # before any thread exists (the probes run in a forked child)
    probes = None if account is None else _probe_as(account, _probe_dirs(config))
    setup_logging(log_flags.level or "warning", log_flags.format or "text")
    from agent.app import Agent
    from agent.models import rfc3339
    from agent.state import StateStore

    agent = Agent(config, config_path=path, registry=registry)
    codes = []
    try:
        for name, profile in agent.profiles.items():
            try:
                credentials = profile.chain.read()
                print(
                    f"{name}: source {credentials.source} yields client_id "
                    f"{credentials.client_id!r} and a secret",
                    file=out,
                )
                profile.check_sinks()
                print(f"{name}: every sink is writable", file=out)
                token = agent.check_token(profile, credentials)
                try:
                    if account is None:
                        _record(agent.store, name, credentials, token)
                    else:
                        work = partial(_record, StateStore(state_dir), name, credentials, token)
                        _as_user(account, work)
                    recorded = f"recorded in {state_dir} for the first start"
                except AgentError as exc:
                    recorded = f"not recorded: {exc}"
                print(
                    f"{name}: token obtained (provider {token.provider_slug or '?'}), expires "
                    f"{rfc3339(token.expires_at)}; {recorded}",
                    file=out,
                )
                codes.append(EX_OK)
            except AgentError as exc:
                print(f"{name}: {exc}", file=out)
                codes.append(exc.exit_code)
    finally:
        agent.close()
    if account is not None and probes is not None:
        who = f"user {account.pw_name} (uid {account.pw_uid})"
        for what, problem in probes:
            print(f"{who}: {what}: {problem or 'writable'}", file=out)
            codes.append(EX_CANTCREAT if problem else EX_OK)
    return most_severe(codes) if codes else EX_CONFIG


def _record(store: StateStore, profile: str, credentials: Credentials, token: Token) -> None:
    """Record ``token`` for ``profile`` in ``store``, as the daemon would after a refresh."""
    store.prepare()
    store.save(profile, credentials.fingerprint(store.key), token)


#: the name of a probe file or directory (created and removed at once)
_PROBE_PREFIX = ".dvs-agent-check-"


def _probe_dirs(config: Config) -> list[tuple[str, Path, bool]]:
    """What ``--user`` checks: (what, directory, must be owned by the user): state_dir, and the
    directory of every file sink's path."""
    found = [("state_dir " + config.agent.state_dir, Path(config.agent.state_dir), True)]
    for name, pc in config.profiles.items():
        for index, sink in enumerate(pc.sinks):
            if sink_kind_name(sink) == "file":
                target = Path(os.path.abspath(sink.path))
                found.append((f"profile {name} sink {index} {target}", target.parent, False))
    return found


def _probe_dir(directory: Path, *, owned: bool) -> str | None:
    """None when this process can create and remove a file in ``directory`` (or, when it is
    missing, create it: a directory in its nearest existing ancestor), else why not. What it
    creates it removes at once."""
    existing = directory
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if owned and existing == directory and directory.stat().st_uid != os.geteuid():
        return (
            f"{directory} is owned by uid {directory.stat().st_uid}: the agent refuses a "
            f"state_dir it does not own (chown {os.geteuid()} {directory})"
        )
    probe = existing / (_PROBE_PREFIX + secrets.token_hex(8))
    try:
        if existing == directory:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            os.unlink(probe)
        else:
            os.mkdir(probe, 0o700)
            os.rmdir(probe)
    except OSError as exc:
        verb = "create a file in" if existing == directory else f"create {directory} in"
        return f"cannot {verb} {existing}: {exc.strerror or exc}"
    return None


def _probe_as(
    account: pwd.struct_passwd, dirs: list[tuple[str, Path, bool]]
) -> list[tuple[str, str | None]]:
    """Each directory's probe, run as ``account``; a switch that fails fails them all."""
    try:
        found = _as_user(
            account, lambda: [[what, _probe_dir(d, owned=owned)] for what, d, owned in dirs]
        )
    except AgentError as exc:
        return [(what, str(exc)) for what, _, _ in dirs]
    assert isinstance(found, list)
    return [(str(what), problem) for what, problem in found]


def _as_user(account: pwd.struct_passwd, work: Callable[[], object]) -> object:
    """``work()`` in a forked child running with the uid, gid and groups of ``account`` (not
    switched when they are the current ones); its result (JSON) or its AgentError."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(read_fd)
            answer: dict[str, object]
            try:
                if (account.pw_uid, account.pw_gid) != (os.geteuid(), os.getegid()):
                    os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
                    os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
                    os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
            except OSError as exc:
                answer = {
                    "error": f"cannot run as user {account.pw_name} (uid {account.pw_uid}): "
                    f"{exc.strerror or exc} (run check as root)"
                }
            else:
                try:
                    answer = {"ok": work()}
                except AgentError as exc:
                    answer = {"error": str(exc)}
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(json.dumps(answer).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    try:
        answer = json.loads(data)
    except ValueError:
        raise SinkError(f"the check as user {account.pw_name} failed") from None
    if "error" in answer:
        raise SinkError(str(answer["error"]))
    return answer.get("ok")


def _when(value: object) -> str:
    return value if isinstance(value, str) else "-"


def _status(config: Config) -> int:
    from agent.health import AgentUnreachable, fetch_status

    try:
        code, body = fetch_status(config.health.listen)
    except (AgentUnreachable, ValueError) as exc:
        print(f"dvs-agent: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    profiles = body.get("profiles", {})
    for name, p in profiles.items():
        line = (
            f"{name}: {p.get('state')}, expires {_when(p.get('expires_at'))}, "
            f"provider {p.get('provider_slug') or '-'}, source {p.get('source') or '-'}, "
            f"last refresh {_when(p.get('last_refresh'))}"
        )
        fleet = p.get("fleet")
        if isinstance(fleet, dict):
            up = {True: "up", False: "DOWN", None: "not asked yet"}.get(fleet.get("store_up"), "?")
            line += (
                f", fleet {fleet.get('store')} {up}, role {fleet.get('role') or '-'}, "
                f"lease holder {fleet.get('lease_holder') or '-'}"
            )
        if p.get("last_error"):
            line += f", last error: {p['last_error']}"
        print(line)
    return EX_OK if code == 200 else EX_UNAVAILABLE


def _fleet_release(config: Config, profile: str | None, registry: Registry) -> int:
    """``dvs-agent fleet release``: the profile's fleet lease dropped."""
    fleets = [name for name, pc in config.profiles.items() if pc.fleet is not None]
    if profile is None:
        if len(fleets) != 1:
            have = ", ".join(fleets) if fleets else "none"
            print(
                f"dvs-agent: error: name the profile with --profile (with a fleet table: {have})",
                file=sys.stderr,
            )
            return EX_USAGE
        profile = fleets[0]
    if profile not in config.profiles:
        print(f"dvs-agent: error: --profile {profile}: no such profile", file=sys.stderr)
        return EX_CONFIG
    if profile not in fleets:
        print(
            f"dvs-agent: error: profile {profile} has no [profiles.{profile}.fleet] table",
            file=sys.stderr,
        )
        return EX_CONFIG
    from agent.fleet.keys import FleetKeys
    from agent.sources.chain import SourceChain

    redactor = setup_logging("warning", "text")
    log = logging.getLogger("agent")
    pc = config.profiles[profile]
    sources = kinds.build_sources(profile, pc, environ=os.environ, logger=log, registry=registry)
    chain = SourceChain(sources, profile=profile, logger=log)
    try:
        credentials = chain.read()
    finally:
        chain.close()
    redactor.add(credentials.client_secret.reveal())
    store = kinds.build_fleet_store(profile, pc, environ=os.environ, logger=log, registry=registry)
    assert store is not None
    try:
        keys = FleetKeys.derive(credentials, pc.resolved_token_url, pc.scope)
        dropped = store.clear_lease(keys.key)
    finally:
        store.close()
    if dropped:
        print(f"{profile}: released the mint lease in {store.name}")
    else:
        print(f"{profile}: no mint lease was held in {store.name}")
    return EX_OK


def _refresh(config: Config, profile: str | None) -> int:
    from agent.health import AgentUnreachable, request_refresh

    try:
        code, body = request_refresh(config.health.listen, profile)
    except (AgentUnreachable, ValueError) as exc:
        print(f"dvs-agent: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    message = str(body.get("message") or body.get("error") or "")
    if code == 202:
        print(message or "re-authenticating")
        return EX_OK
    if code == 404:
        print(f"dvs-agent: no such profile: {profile}", file=sys.stderr)
        return EX_CONFIG
    retry = body.get("retry_after")
    suffix = f" (retry in {float(retry):.0f}s)" if isinstance(retry, int | float) else ""
    print(f"dvs-agent: not accepted: {message}{suffix}", file=sys.stderr)
    # 429: the agent's rate limit, nothing is wrong: try later (75); 503 and others: 69
    return EX_TEMPFAIL if code == 429 else EX_UNAVAILABLE
