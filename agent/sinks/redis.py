"""The ``redis`` sink: the token document in a Redis key whose TTL is the token's life (§4, §11).

This module is the plug-in: the entry's keys, their checks, the key it writes (:class:`Endpoint`
and :func:`parse_url`, the one parser of a redis URL) and :meth:`RedisKind.build`, which imports
the writer (:mod:`agent.stores.redis`, on redis-py) only for a config that has a redis sink.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from agent.config.checks import env_var_problem, is_loopback, readable_file_problem, split_url
from agent.keypath import toml_repr
from agent.plugin import BuildContext, SinkKind, Target, Where

if TYPE_CHECKING:
    from agent.stores.redis import RedisSink

#: a redis sink's ``url`` when it has none
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: a redis sink's key when it has no ``key`` (``str.format`` with ``profile``)
DEFAULT_REDIS_KEY = "dvs-agent:{profile}:token"
#: the port and database of a redis ``url`` that names none
DEFAULT_REDIS_PORT = 6379
DEFAULT_REDIS_DB = 0
#: how long one Redis command may take, at most (the profile's request_timeout if shorter)
MAX_TIMEOUT = 5.0
#: a redis sink's host: a DNS name (container names may have '_') or an address
_REDIS_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
_EXAMPLE = '"rediss://redis.internal:6379/0"'


class RedisSinkConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="redis",
    tag_field="type",
):
    """``[[profiles.NAME.sinks]]`` with ``type = "redis"``: ``SET key value PX ttl`` (DESIGN §4)."""

    #: ``redis://`` or ``rediss://`` (TLS) ``HOST[:PORT][/DB]``; never a password
    url: str = DEFAULT_REDIS_URL
    #: the full key name; None: ``dvs-agent:<profile>:token`` (:meth:`resolved_key`)
    key: str | None = None
    #: an ACL user name (needs a password); None: the default user
    username: str | None = None
    #: a file holding the password (read by the sink, never here); or ``password_env``
    password_file: str | None = None
    #: a variable holding the password; or ``password_file``, not both
    password_env: str | None = None
    #: rediss:// only: a PEM bundle of the CA(s) that sign the server's certificate; None:
    #: the system store
    ca_cert: str | None = None

    def resolved_key(self, profile: str) -> str:
        """``key``, else ``dvs-agent:<profile>:token``."""
        return self.key if self.key is not None else DEFAULT_REDIS_KEY.format(profile=profile)


#: Every sink type, tagged by ``type``; the supported ``type`` values and the error messages


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a redis ``url`` points."""

    host: str
    port: int
    db: int
    tls: bool

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(url: str) -> Endpoint | str:
    """``redis://`` or ``rediss://`` ``HOST[:PORT][/DB]`` without ``user:password@``: its
    :class:`Endpoint`, or what is wrong with it (a message without the key path)."""
    split = split_url(
        url,
        schemes=("redis", "rediss"),
        kind="a redis:// or rediss:// (TLS) URL",
        example=_EXAMPLE,
        userinfo=": a password never sits in this file; set username, and password_file or "
        "password_env",
    )
    if isinstance(split, str):
        return split
    parts, host = split
    port = parts.port
    if not _REDIS_HOST_RE.fullmatch(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"{toml_repr(url)}: {host!r} is not a host name or address"
    if port == 0:
        return f"{toml_repr(url)}: the port must be a number from 1 to 65535"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return (
            f"{toml_repr(url)}: options after '?' or '#' are not supported; write "
            f"redis[s]://HOST[:PORT][/DB], e.g. {_EXAMPLE}"
        )
    if not re.fullmatch(r"/?|/\d+", parts.path):
        return (
            f"{toml_repr(url)}: the path is the database number, an integer "
            f"(redis[s]://HOST[:PORT][/DB]), e.g. {_EXAMPLE}"
        )
    if parts.scheme.lower() == "redis" and not is_loopback(host):
        return (
            f"plain redis:// to {host} would send every token (and the Redis password) across "
            f"the network in clear: use rediss:// (TLS), e.g. {_EXAMPLE}; redis:// is for "
            "loopback hosts only"
        )
    path = parts.path.strip("/")
    return Endpoint(
        host=host,
        port=port if port is not None else DEFAULT_REDIS_PORT,
        db=int(path) if path else DEFAULT_REDIS_DB,
        tls=parts.scheme.lower() == "rediss",
    )


def ca_cert_problems(ca_cert: str | None, tls: bool, where: Where, how: str) -> Iterator[str]:
    """What is wrong with a Redis ``ca_cert``: empty, unreadable, or set without TLS (``how``
    names what turns TLS on)."""
    if ca_cert is None:
        return
    if ca_cert == "":
        yield f"{where.at('ca_cert')}: must not be empty (leave it out for the system CA store)"
    elif not tls:
        yield f"{where.at('ca_cert')}: only with TLS ({how})"
    elif problem := readable_file_problem(ca_cert):
        yield f"{where.at('ca_cert')}: {toml_repr(ca_cert)}: {problem}"


class RedisKind(SinkKind[RedisSinkConfig]):
    name = "redis"
    config_type = RedisSinkConfig

    def check(self, config: RedisSinkConfig, where: Where) -> Iterator[str]:
        sink = config
        endpoint = parse_url(sink.url)
        if isinstance(endpoint, str):
            yield f"{where.at('url')}: {endpoint}"
        if sink.key == "":
            yield (
                f"{where.at('key')}: must not be empty (leave the key out for "
                f"{toml_repr(DEFAULT_REDIS_KEY.format(profile=where.profile))})"
            )
        if sink.username == "":
            yield (
                f"{where.at('username')}: must not be empty (leave the key out for Redis's "
                "default user)"
            )
        if sink.password_file == "":
            yield (
                f"{where.at('password_file')}: must not be empty (the path of a file holding "
                "the password)"
            )
        if sink.password_env is not None:
            problem = env_var_problem(sink.password_env)
            if problem:
                yield f"{where.at('password_env')}: {problem}"
        if sink.password_file is not None and sink.password_env is not None:
            yield f"{where.at('password_env')}: set password_file or password_env, not both"
        if sink.username and sink.password_file is None and sink.password_env is None:
            yield (
                f"{where.at('username')}: a Redis user logs in with a password: set "
                "password_file (a file holding it) or password_env (a variable holding it)"
            )
        yield from ca_cert_problems(
            sink.ca_cert, not isinstance(endpoint, str) and endpoint.tls, where, "rediss://"
        )

    def describe(self, config: RedisSinkConfig, where: Where) -> str:
        return f"redis {config.url} key {config.resolved_key(where.profile)}"

    def targets(self, config: RedisSinkConfig, where: Where) -> Iterator[Target]:
        endpoint = parse_url(config.url)
        if isinstance(endpoint, str):
            return
        host = endpoint.host.lower().rstrip(".")
        key = config.resolved_key(where.profile)
        yield Target(
            store="redis",
            identity=(host, str(endpoint.port), str(endpoint.db), key),
            what=f"the Redis key {toml_repr(key)} on {host}:{endpoint.port}/{endpoint.db}",
            key=where.at("url" if config.key is None else "key"),
            noun="key",
        )

    def build(self, config: RedisSinkConfig, context: BuildContext) -> RedisSink:
        from agent.stores.redis import RedisSink

        return RedisSink(
            config,
            key=config.resolved_key(context.where.profile),
            timeout=min(context.timeout, MAX_TIMEOUT),
            config_key=context.where.key,
            environ=context.environ,
            logger=context.logger,
        )


KIND = RedisKind()
