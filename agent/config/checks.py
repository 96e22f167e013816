"""Checks that several kinds share: URLs, files, variable names, paths (DESIGN §3).

Each returns what is wrong (a message without the key path, which the caller puts first) or
None. Plug-ins may use them; they never echo the part of a URL before ``@``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Iterator
from urllib.parse import SplitResult, urlsplit

from agent.keypath import toml_repr as _toml_repr

_ENV_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_var_problem(name: str) -> str | None:
    """What makes ``name`` not an environment variable name."""
    if _ENV_VAR_RE.fullmatch(name):
        return None
    return (
        f"{_toml_repr(name)} is not a valid environment variable name (letters, digits and "
        "'_', not starting with a digit)"
    )


def key_names_problems(where: str, id_key: str, secret_key: str) -> Iterator[str]:
    """``client_id_key`` / ``client_secret_key`` of a store table at key path ``where``."""
    for field, value in (("client_id_key", id_key), ("client_secret_key", secret_key)):
        if not value:
            yield f"{where}.{field}: must not be empty"
    if id_key and id_key == secret_key:
        yield f"{where}.client_secret_key: must differ from client_id_key"


def split_url(
    url: str, *, schemes: tuple[str, ...], kind: str, example: str, userinfo: str
) -> tuple[SplitResult, str] | str:
    """``(parts, host)`` of a URL of one of ``schemes``, or what is wrong with it."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # never echo it: the part before '@' may be a password
        return f"must not contain user:password@{userinfo}"
    if parts.scheme.lower() not in schemes or not parts.netloc:
        return f"{_toml_repr(url)} is not {kind}, e.g. {example}"
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"{_toml_repr(url)} is not a valid URL: {exc}"
    if not host:
        return f"{_toml_repr(url)} has no host, e.g. {example}"
    return parts, host


def url_problem(url: str, *, example: str, exposed: str) -> str | None:
    """An absolute http(s) URL, plain http only for loopback hosts, no ``user:password@``."""
    split = split_url(
        url,
        schemes=("http", "https"),
        kind="an absolute http(s) URL",
        example=example,
        userinfo="; credentials come from the profile's sources, never from this file",
    )
    if isinstance(split, str):
        return split
    parts, host = split
    if parts.scheme.lower() == "http" and not is_loopback(host):
        return (
            f"plain http is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost): "
            f"{exposed} would cross the network in clear; use https://{parts.netloc}"
            f"{parts.path}"
        )
    return None


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def readable_file_problem(path: str) -> str | None:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file"
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return "no such file"
    except PermissionError:
        return f"permission denied: the agent (uid {os.getuid()}) cannot read it"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return None


def normalised_path(path: str) -> str:
    """An absolute, normalised path, for comparing two paths (``//a`` and ``/a`` are one)."""
    return re.sub(r"^/+", "/", os.path.abspath(path))


def normalised_url(url: str) -> str:
    """A URL for comparing two: scheme and host lowercased, no trailing '/'."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def is_explicit_path(path: str) -> bool:
    """Absolute, or relative on purpose (``./x``, ``../x``, ``.``)."""
    return os.path.isabs(path) or path in (".", "..") or path.startswith(("./", "../"))
