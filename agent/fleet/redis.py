"""The ``redis`` fleet store (DESIGN §13): ``[profiles.NAME.fleet]`` with ``store = "redis"``.

This module is the plug-in: the table's keys and their checks, and :meth:`RedisFleetKind.build`,
which imports the store (:mod:`agent.fleet.redis_store`, on redis-py) only for a config that
has one. Redis standalone (``url``), Sentinel (``sentinels`` + ``service_name``) or Cluster
(``url`` + ``cluster = true``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

import msgspec

from agent.config.checks import is_loopback
from agent.config.values import Duration
from agent.keypath import toml_repr
from agent.plugin import BuildContext, FleetStoreKind, Where
from agent.sinks.redis import MAX_TIMEOUT, ca_cert_problems, parse_url

if TYPE_CHECKING:
    from agent.fleet.redis_store import RedisFleetStore

#: the prefix of the fleet's keys when the table sets none
DEFAULT_KEY_PREFIX = "dvs-agent:fleet:"
#: the mint lease when the table sets none
DEFAULT_LEASE = Duration(seconds=30)
MIN_LEASE = timedelta(seconds=1)
MAX_LEASE = timedelta(minutes=10)
DEFAULT_SENTINEL_PORT = 26379


class RedisFleetConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="redis",
    tag_field="store",
):
    """``[profiles.NAME.fleet]`` with ``store = "redis"``."""

    #: how long a minting agent may hold the mint lease (renewed while its request runs)
    lease: Duration = DEFAULT_LEASE
    #: ``redis://`` (loopback only) or ``rediss://`` ``HOST[:PORT][/DB]``; with ``cluster``,
    #: one node of the cluster
    url: str | None = None
    #: Sentinel: ``HOST[:PORT]`` of each sentinel (port 26379 when none), with service_name
    sentinels: list[str] = msgspec.field(default_factory=list)
    #: Sentinel: the monitored master's name
    service_name: str | None = None
    #: Sentinel: connect to the sentinels and the master with TLS
    tls: bool = False
    #: with TLS: a PEM bundle of the CA(s) that sign the servers' certificates; None: the
    #: system store
    ca_cert: str | None = None
    #: Redis Cluster: ``url`` names one node, the others are discovered
    cluster: bool = False
    #: an ACL user (needs password_file); None: the default user
    username: str | None = None
    #: a file holding the Redis password (read at start and after Redis rejected it)
    password_file: str | None = None
    #: Sentinel: the sentinels' own ACL user and password file, when they require one
    sentinel_username: str | None = None
    sentinel_password_file: str | None = None
    #: every key is ``<key_prefix>{<fleet key>}:token`` (``:lease``, ``:marker``,
    #: ``:generation``); the braces keep them in one Cluster slot
    key_prefix: str = DEFAULT_KEY_PREFIX


def sentinel_address(entry: str) -> tuple[str, int] | str:
    """``(host, port)`` of a ``sentinels`` entry (``HOST``, ``HOST:PORT``, ``[V6]:PORT``), or
    what is wrong with it."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") or not rest else "?"
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:  # a name, or a bare IPv6 address
        host, port_text = entry, ""
    if not host or any(ch.isspace() or ch in "/@?#" for ch in host):
        return f"{toml_repr(entry)}: expected HOST or HOST:PORT"
    if port_text == "":
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return f"{toml_repr(entry)}: the port must be a number from 1 to 65535"
    return host, int(port_text)


class RedisFleetKind(FleetStoreKind[RedisFleetConfig]):
    name = "redis"
    config_type = RedisFleetConfig

    def check(self, config: RedisFleetConfig, where: Where) -> Iterator[str]:
        c = config
        if not MIN_LEASE <= c.lease <= MAX_LEASE:
            yield f"{where.at('lease')}: must be at least 1s and at most 10m"
        if c.url is None and not c.sentinels:
            yield (
                f'{where.key}: name the Redis server: url = "rediss://HOST:6379/0" (or with '
                'cluster = true, one node of the cluster), or sentinels = ["HOST:26379", ...] '
                "with service_name"
            )
        if c.url is not None and c.sentinels:
            yield f"{where.at('sentinels')}: set url or sentinels, not both"
        url_tls = False
        if c.url is not None:
            endpoint = parse_url(c.url)
            url_tls = not isinstance(endpoint, str) and endpoint.tls
            if isinstance(endpoint, str):
                yield f"{where.at('url')}: {endpoint}"
            elif c.cluster and endpoint.db:
                yield f"{where.at('url')}: Redis Cluster has database 0 only"
        if c.cluster and c.sentinels:
            yield f"{where.at('cluster')}: a Redis Cluster is not reached through sentinels"
        for index, entry in enumerate(c.sentinels):
            address = sentinel_address(entry)
            if isinstance(address, str):
                yield f"{where.at('sentinels', index)}: {address}"
            elif not c.tls and not is_loopback(address[0]):
                yield (
                    f"{where.at('sentinels', index)}: {address[0]} is not loopback: Redis "
                    "traffic (the token, the password) would cross the network in clear; set "
                    "tls = true"
                )
        if c.sentinels and not c.service_name:
            yield f"{where.at('service_name')}: required with sentinels: the master's name"
        if c.service_name is not None and not c.sentinels:
            yield f"{where.at('service_name')}: only with sentinels"
        if c.tls and not c.sentinels:
            yield f"{where.at('tls')}: only with sentinels (for url, write rediss://)"
        for user, password in (
            ("username", "password_file"),
            ("sentinel_username", "sentinel_password_file"),
        ):
            if getattr(c, user) == "":
                yield f"{where.at(user)}: must not be empty (leave it out for the default user)"
            if getattr(c, password) == "":
                yield f"{where.at(password)}: must not be empty (a file holding the password)"
            if getattr(c, user) and getattr(c, password) is None:
                yield f"{where.at(user)}: a Redis user logs in with a password: set {password}"
        if (c.sentinel_username or c.sentinel_password_file) and not c.sentinels:
            yield f"{where.at('sentinel_password_file')}: only with sentinels"
        yield from ca_cert_problems(
            c.ca_cert,
            url_tls or (c.tls and bool(c.sentinels)),
            where,
            "rediss://, or tls = true with sentinels",
        )
        if not c.key_prefix or any(ch in c.key_prefix for ch in "{}"):
            yield (
                f"{where.at('key_prefix')}: must not be empty nor hold '{{' or '}}' (the fleet "
                "key is the keys' Cluster hash tag)"
            )

    def describe(self, config: RedisFleetConfig, where: Where) -> str:
        if config.sentinels:
            where_to = f"sentinel {config.service_name} via {', '.join(config.sentinels)}"
        else:
            where_to = ("cluster " if config.cluster else "") + str(config.url)
        return f"fleet store redis {where_to} (lease {config.lease.total_seconds():g}s)"

    def build(self, config: RedisFleetConfig, context: BuildContext) -> RedisFleetStore:
        from agent.fleet.redis_store import RedisFleetStore

        return RedisFleetStore(
            config,
            timeout=min(context.timeout, MAX_TIMEOUT),
            config_key=context.where.key,
            logger=context.logger,
        )


KIND = RedisFleetKind()
