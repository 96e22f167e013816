"""``[profiles.NAME.proxy]``: the local bearer proxy's config and its checks (DESIGN §14).

This module imports no HTTP code: the config loads and is checked without the proxy's parser
(httptools), which :mod:`agent.proxy.service` imports only when a profile has a proxy.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Protocol
from urllib.parse import urlsplit

import msgspec

from agent.config.checks import is_loopback, readable_file_problem, url_problem
from agent.config.values import Duration, Size, parse_listen
from agent.keypath import toml_repr

#: the upstream of each ``environment`` (DESIGN §14); ``upstream`` overrides it
ENVIRONMENT_UPSTREAMS: Mapping[str, str] = MappingProxyType(
    {"sandbox": "https://sandbox.osigu.com", "production": "https://api.osigu.com"}
)
#: where the default socket lives: its own directory (the unit's RuntimeDirectory)
SOCKET_DIR = "/run/dvs-agent-proxy"
#: a request body up to this size is held, so that a 401 can be answered by a replay
REPLAY_BODY_LIMIT = 1 << 20
UNIX_PREFIX = "unix:"


class ProxyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME.proxy]``: a local listener that adds the profile's token."""

    #: ``unix:/path.sock`` (default ``unix:/run/dvs-agent-proxy/NAME.sock``) or a loopback
    #: ``HOST:PORT`` with ``allow_tcp = true``
    listen: str = ""
    #: TCP on loopback is opt-in: any local user and process can reach a port
    allow_tcp: bool = False
    #: the socket's group (mode 0660): its members may use the proxy; None: the agent's group
    socket_group: str | None = None
    #: https (plain http only for loopback); default from the profile's ``environment``
    upstream: str | None = None
    #: a CA file (PEM) for the upstream; default: the profile's ``ca_bundle``, else the system's
    ca_bundle: str | None = None
    #: the largest request body forwarded (413 beyond it)
    max_body: Size = Size(10 << 20)
    #: the largest request head (request line and headers; 431 beyond it)
    max_header_size: Size = Size(16 << 10)
    #: the upstream's time to answer, and the longest pause in its answer's body (502/504)
    request_timeout: Duration = Duration(seconds=60)
    #: a client's time to send the request head and the longest pause in its body, and how
    #: long an idle kept-alive connection stays open
    client_timeout: Duration = Duration(seconds=15)
    #: connections served at once; more are answered 503 and closed
    max_connections: int = 256
    #: one line per request: method, path without query, status, duration (never a header);
    #: off by default: at a few hundred requests a second journald's rate limit would drop
    #: the agent's own lines with them (dvs_agent_proxy_requests_total counts every answer)
    access_log: bool = False


class ProfileLike(Protocol):
    """What :func:`specs_of` reads of a profile's config (a ProfileConfig)."""

    @property
    def proxy(self) -> ProxyConfig | None: ...
    @property
    def ca_bundle(self) -> str | None: ...
    @property
    def environment(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Listen:
    """Where a proxy listens: a unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return UNIX_PREFIX + self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """One proxy as the service runs it: the table and what was resolved from the profile."""

    profile: str
    config: ProxyConfig
    listen: Listen
    #: the upstream's base URL (no trailing '/')
    upstream: str
    #: the CA file for the upstream (None: the system's)
    ca_bundle: str | None
    #: the config key a TLS failure names
    ca_key: str


def specs_of(profiles: Mapping[str, ProfileLike]) -> list[ProxySpec]:
    """The proxies of a checked config's profiles, with what each resolves from its profile."""
    specs = []
    for name, profile in profiles.items():
        proxy = profile.proxy
        if proxy is None:
            continue
        ca_bundle = proxy.ca_bundle or profile.ca_bundle
        if proxy.ca_bundle:
            ca_key = f"profiles.{name}.proxy.ca_bundle"
        elif profile.ca_bundle:
            ca_key = f"profiles.{name}.ca_bundle (or profiles.{name}.proxy.ca_bundle)"
        else:
            ca_key = f"profiles.{name}.proxy.ca_bundle (the system's CA store is in use)"
        specs.append(
            ProxySpec(
                profile=name,
                config=proxy,
                listen=listen_of(name, proxy),
                upstream=upstream_of(proxy, profile.environment),
                ca_bundle=ca_bundle,
                ca_key=ca_key,
            )
        )
    return specs


def default_listen(profile: str) -> str:
    return f"{UNIX_PREFIX}{SOCKET_DIR}/{profile}.sock"


def listen_of(profile: str, proxy: ProxyConfig) -> Listen:
    """The parsed ``listen`` (its default for ``profile``); raises ValueError."""
    text = proxy.listen or default_listen(profile)
    if text.startswith(UNIX_PREFIX):
        return Listen(path=text[len(UNIX_PREFIX) :])
    host, port = parse_listen(text)
    return Listen(host=host, port=port)


def upstream_of(proxy: ProxyConfig, environment: str) -> str:
    """The upstream's base URL without a trailing '/'."""
    return (proxy.upstream or ENVIRONMENT_UPSTREAMS[environment]).rstrip("/")


def proxy_problems(profile: str, proxy: ProxyConfig, where: str) -> Iterator[str]:
    """Every problem of a proxy table, as ``key.path: what is wrong`` (``where`` is its path)."""
    listen: Listen | None = None
    try:
        listen = listen_of(profile, proxy)
    except ValueError as exc:
        yield (
            f'{where}.listen: {exc}; or "unix:/run/dvs-agent-proxy/{profile}.sock" for a unix '
            "socket (the default)"
        )
    else:
        yield from _listen_problems(listen, proxy, where)
    if proxy.upstream is not None:
        yield from _upstream_problems(proxy.upstream, where)
        if listen is not None and _is_itself(listen, proxy.upstream):
            yield (
                f"{where}.upstream: {toml_repr(proxy.upstream)} is the proxy's own listen "
                "address: every request would loop through it"
            )
    if proxy.ca_bundle is not None:
        problem = readable_file_problem(proxy.ca_bundle)
        if problem:
            yield f"{where}.ca_bundle: {toml_repr(proxy.ca_bundle)}: {problem}"
    if proxy.max_body < 1:
        yield f"{where}.max_body: must be at least 1 byte"
    if not 1 << 10 <= proxy.max_header_size <= 1 << 20:
        yield f"{where}.max_header_size: must be from 1KiB to 1MiB"
    if not timedelta(0) < proxy.request_timeout <= timedelta(hours=1):
        yield f"{where}.request_timeout: must be more than 0 and at most 1 hour"
    if not timedelta(seconds=1) <= proxy.client_timeout <= timedelta(minutes=10):
        yield f"{where}.client_timeout: must be from 1s to 10 minutes"
    if not 1 <= proxy.max_connections <= 65536:
        yield f"{where}.max_connections: must be from 1 to 65536"


def _listen_problems(listen: Listen, proxy: ProxyConfig, where: str) -> Iterator[str]:
    if listen.path is not None:
        if not os.path.isabs(listen.path):
            yield f"{where}.listen: {toml_repr(proxy.listen)}: the socket path must be absolute"
        elif len(os.fsencode(listen.path)) > 107:
            yield f"{where}.listen: the socket path is longer than 107 bytes (sun_path)"
        if proxy.allow_tcp:
            yield f"{where}.allow_tcp: only for a TCP listen address; remove it"
        return
    if proxy.socket_group is not None:
        yield f"{where}.socket_group: only for a unix socket; a TCP port has no group"
    if not proxy.allow_tcp:
        yield (
            f"{where}.listen: {toml_repr(proxy.listen)} is a TCP address: any local user and "
            "process could use the profile's token through it; prefer the unix socket "
            "(its mode and group decide who may), or set allow_tcp = true"
        )
    if not _is_loopback_address(listen.host):
        yield (
            f"{where}.listen: {toml_repr(proxy.listen)}: the proxy listens on loopback only "
            "(127.0.0.1 or [::1]): anyone who reaches it acts with the profile's token"
        )


def _is_itself(listen: Listen, upstream: str) -> bool:
    try:
        parts = urlsplit(upstream)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return False
    host = parts.hostname or ""
    return listen.path is None and port == listen.port and is_loopback(host)


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (even localhost) may resolve elsewhere


def _upstream_problems(upstream: str, where: str) -> Iterator[str]:
    problem = url_problem(upstream, example='"https://api.osigu.com"', exposed="the token")
    if problem:
        yield f"{where}.upstream: {problem}"
    elif (parts := urlsplit(upstream)).query or parts.fragment:
        yield f"{where}.upstream: {toml_repr(upstream)}: no query or fragment (a base URL)"
