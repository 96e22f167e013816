"""The proxies of every profile on one event loop, in one thread of their own (DESIGN §14).

The agent's refresh path is threaded (the scheduler gives each profile a thread); the proxy
serves many connections at once, so it runs on asyncio: :class:`ProxyService` starts a loop in
a daemon thread and one listener per profile with a ``[proxy]`` table on it. The agent calls
it from its main thread (thread-safe): :meth:`start` binds every listener (a failure is raised,
the agent exits as for the health listener), :meth:`apply` takes a reload's changes (a changed
table restarts only its own listener), :meth:`refreshed` passes a refresh's end to the waiting
401 replays, :meth:`stop` drains the requests in flight within its deadline.

A unix socket is bound in its directory (the default one, ``/run/dvs-agent-proxy``, is made
0755 when missing), given its group and mode 0660 before it listens, so no client can connect
while its mode is wrong; an old path is replaced only when it is a socket no process listens
on. At stop the socket is removed if it is still the one bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import grp
import logging
import os
import resource
import socket
import stat
import threading
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent.oauth import TlsContexts
from agent.process import fds_in_use, raise_descriptor_limit
from agent.proxy.edge import TICK_SECONDS, Listener
from agent.proxy.forward import Forwarder, Tokens
from agent.proxy.settings import SOCKET_DIR, ProxySpec
from agent.proxy.upstream import UpstreamPool, route_of
from agent.recorder import NULL, Recorder

SOCKET_MODE = 0o660
#: the most a listener's start or stop may take on the loop before the caller gives up
_CALL_TIMEOUT = 30.0


def environment_proxy(upstream: str, environ: Mapping[str, str]) -> str | None:
    """The forward proxy for ``upstream`` from ``HTTPS_PROXY``/``HTTP_PROXY`` (either case),
    unless ``NO_PROXY`` names its host: the variables the token requests honour (httpx)."""
    parts = urlsplit(upstream)
    host = (parts.hostname or "").lower()
    scheme = parts.scheme.lower()

    def variable(name: str) -> str:
        return environ.get(name.lower()) or environ.get(name.upper()) or ""

    for entry in variable("no_proxy").split(","):
        entry = entry.strip().lower().lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    found = variable(f"{scheme}_proxy") or variable("all_proxy")
    return found if found.lower().startswith(("http://", "https://")) else None


#: each proxied connection may hold three descriptors: the client's, the upstream's it uses,
#: and an idle upstream connection kept for later
FDS_PER_CONNECTION = 3
#: the proxies together take at most this share of the descriptors free when they start; the
#: rest stays for token and state files, HTTP clients, hooks and the health listener
FD_SHARE = 2


def descriptor_caps(wanted: Mapping[str, int], *, soft_limit: int, in_use: int) -> dict[str, int]:
    """Each listener's ``max_connections``, lowered in proportion when together they could
    take more than 1/FD_SHARE of the descriptors free (``soft_limit`` less ``in_use``)."""
    if soft_limit == resource.RLIM_INFINITY or soft_limit < 0:
        return dict(wanted)
    budget = max(0, soft_limit - in_use) // FD_SHARE // FDS_PER_CONNECTION
    total = sum(wanted.values())
    if total <= budget:
        return dict(wanted)
    return {name: max(1, count * budget // total) for name, count in wanted.items()}


class ProxyListenError(OSError):
    """A proxy could not listen: the message names the key, the address and the cause."""


@dataclass(slots=True)
class _Running:
    spec: ProxySpec
    forwarder: Forwarder
    listener: Listener
    pool: UpstreamPool
    server: asyncio.Server | None = None
    ticker: asyncio.TimerHandle | None = None
    #: the socket file bound (device, inode), removed at stop if still in place
    socket_id: tuple[int, int] | None = None


class ProxyService:
    """See the module's doc."""

    def __init__(
        self,
        tokens: Tokens,
        *,
        tls: TlsContexts,
        metrics: Recorder | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._tokens = tokens
        self._tls = tls
        self._metrics: Recorder = metrics if metrics is not None else NULL
        self._log = logger or logging.getLogger("agent.proxy")
        self._access = self._log.getChild("access")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running: dict[str, _Running] = {}

    # ---------------------------------------------------------------- from other threads
    def start(self, specs: Sequence[ProxySpec]) -> None:
        """Start the loop and every listener; raises :class:`ProxyListenError` (nothing is
        left listening then)."""
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_error)
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="dvs-proxy", daemon=True)
        self._thread.start()
        try:
            caps = self._caps(specs)
            for spec in specs:
                self._call(self._start_one(spec, caps[spec.profile]))
        except BaseException:
            self.stop(timeout=1.0)
            raise

    def apply(self, specs: Sequence[ProxySpec]) -> None:
        """A reload: listeners whose spec changed restart, removed ones stop, new ones start;
        a listener that cannot start is logged (the others keep serving)."""
        wanted = {spec.profile: spec for spec in specs}
        for name, running in list(self._running.items()):
            if wanted.get(name) != running.spec:
                self._call(self._stop_one(name, timeout=5.0))
                self._log.info("proxy stopped", extra={"profile": name, "event": "reload"})
        starting = [spec for name, spec in wanted.items() if name not in self._running]
        caps = self._caps(starting)
        for spec in starting:
            name = spec.profile
            try:
                self._call(self._start_one(spec, caps[name]))
            except ProxyListenError as exc:
                self._log.error("%s", exc, extra={"profile": name, "event": "reload_failed"})

    def refreshed(self, profile: str) -> None:
        """A refresh of ``profile`` ended (any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                loop.call_soon_threadsafe(self._refreshed, profile)

    def in_flight(self) -> int:
        return sum(running.forwarder.in_flight for running in list(self._running.values()))

    def stop(self, timeout: float) -> bool:
        """Stop listening, let the requests in flight finish within ``timeout`` seconds (then
        cut them), close the clients; True when every one finished in time."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return True
        clean = True
        try:
            names = list(self._running)
            future = asyncio.run_coroutine_threadsafe(self._stop_all(names, timeout), loop)
            clean = future.result(timeout + 2.0)
        except (concurrent.futures.TimeoutError, RuntimeError):
            clean = False
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(2.0)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None
        return clean

    def _caps(self, specs: Sequence[ProxySpec]) -> dict[str, int]:
        """The connections each listener may serve, within the descriptors free once the
        soft limit is raised to the hard one."""
        wanted = {spec.profile: spec.config.max_connections for spec in specs}
        if not wanted:
            return {}
        soft = raise_descriptor_limit()
        caps = descriptor_caps(wanted, soft_limit=soft, in_use=fds_in_use())
        for name, cap in caps.items():
            if cap < wanted[name]:
                self._log.warning(
                    "profiles.%s.proxy.max_connections lowered from %d to %d: the agent may "
                    "open %d files (RLIMIT_NOFILE), and the proxies take at most half of those "
                    "free, %d per connection; raise LimitNOFILE= in the unit to serve more",
                    name,
                    wanted[name],
                    cap,
                    soft,
                    FDS_PER_CONNECTION,
                    extra={"profile": name, "event": "proxy_capped"},
                )
        return caps

    def _call(self, coro: Coroutine[object, object, object]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT)

    # -------------------------------------------------------------------- on the loop
    def _refreshed(self, profile: str) -> None:
        running = self._running.get(profile)
        if running is not None:
            running.forwarder.refreshed()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        self._log.debug(
            "proxy event loop: %s%s",
            context.get("message", "error"),
            f" ({type(exc).__name__})" if isinstance(exc, BaseException) else "",
            extra={"event": "proxy_internal"},
        )

    async def _start_one(self, spec: ProxySpec, max_connections: int) -> None:
        cfg = spec.config
        loop = asyncio.get_running_loop()
        tls = self._tls.get(spec.ca_bundle) if spec.upstream.startswith("https:") else None
        route = route_of(spec.upstream, tls, environment_proxy(spec.upstream, os.environ))
        pool = UpstreamPool(loop, route, idle_max=max_connections)
        forwarder = Forwarder(
            spec,
            tokens=self._tokens,
            pool=pool,
            metrics=self._metrics,
            log=self._log,
            access=self._access,
        )
        listener = Listener(
            loop,
            exchange=forwarder,
            refused=forwarder.refused,
            log=self._log,
            max_connections=max_connections,
            max_header_size=int(cfg.max_header_size),
            client_timeout=cfg.client_timeout.total_seconds(),
        )
        running = _Running(spec, forwarder, listener, pool)
        try:
            sock = self._bind(spec, running)
            running.server = await loop.create_server(listener, sock=sock, backlog=1024)
        except BaseException:
            self._unlink(running)
            pool.close()
            raise
        self._running[spec.profile] = running
        self._tick(running)
        self._log.info(
            "proxy listening on %s, forwarding to %s",
            spec.listen,
            spec.upstream,
            extra={"profile": spec.profile, "event": "proxy_started"},
        )

    def _tick(self, running: _Running) -> None:
        running.listener.tick()
        loop = asyncio.get_running_loop()
        running.ticker = loop.call_later(TICK_SECONDS, self._tick_soon, running)

    def _tick_soon(self, running: _Running) -> None:
        if self._running.get(running.spec.profile) is running or running.listener.connections:
            running.listener.tick()
            assert self._loop is not None
            running.ticker = self._loop.call_later(TICK_SECONDS, self._tick_soon, running)

    def _bind(self, spec: ProxySpec, running: _Running) -> socket.socket:
        listen = spec.listen
        key = f"profiles.{spec.profile}.proxy.listen"
        if listen.path is None:
            try:
                return socket.create_server((listen.host, listen.port), reuse_port=False)
            except OSError as exc:
                raise ProxyListenError(
                    exc.errno,
                    f"{key} {listen}: {exc.strerror or exc}; is another dvs-agent running? "
                    "choose another port",
                ) from None
        sock = bind_unix(listen.path, spec.config.socket_group, key)
        info = os.stat(listen.path)
        running.socket_id = (info.st_dev, info.st_ino)
        return sock

    async def _stop_one(self, name: str, timeout: float) -> bool:
        running = self._running.pop(name, None)
        if running is None:
            return True
        # no new connections (the socket file goes too), idle ones closed, busy ones closed
        # after their answer; then the requests in flight get until the deadline
        self._unlink(running)
        if running.server is not None:
            running.server.close()
        running.listener.close_idle()
        clean = True
        try:
            async with asyncio.timeout(timeout):
                while running.forwarder.in_flight:
                    await asyncio.sleep(0.02)
        except TimeoutError:
            clean = False
            self._log.warning(
                "%d proxied request(s) still running at stop: cut",
                running.forwarder.in_flight,
                extra={"profile": name, "event": "proxy_drain"},
            )
        for conn in list(running.listener.connections):
            conn.abort()
        if running.ticker is not None:
            running.ticker.cancel()
        running.pool.close()
        await asyncio.sleep(0)  # the cancelled exchanges end
        return clean

    async def _stop_all(self, names: list[str], timeout: float) -> bool:
        results = await asyncio.gather(*(self._stop_one(name, timeout) for name in names))
        return all(results)

    def _unlink(self, running: _Running) -> None:
        path = running.spec.listen.path
        if path is None or running.socket_id is None:
            return
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            if (info.st_dev, info.st_ino) == running.socket_id:
                os.unlink(path)
        running.socket_id = None


def bind_unix(path: str, group: str | None, key: str) -> socket.socket:
    """A unix socket bound at ``path`` with ``group`` and mode 0660, not yet listening (so
    no client connects before its mode is set); raises :class:`ProxyListenError`."""
    directory = os.path.dirname(path) or "."
    if directory == SOCKET_DIR and not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ProxyListenError(
                exc.errno,
                f"{key}: cannot create {directory}: {exc.strerror or exc}; create it (the unit "
                "does: RuntimeDirectory=dvs-agent-proxy) or choose another path",
            ) from None
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ProxyListenError(
                errno.EINVAL,
                f"{key.removesuffix('.listen')}.socket_group: no such group {group!r}: create "
                "it (groupadd) or choose another",
            ) from None
    _replace_stale(path, key)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        try:
            os.chown(path, -1, gid)
            os.chmod(path, SOCKET_MODE)
        except PermissionError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise ProxyListenError(
                errno.EPERM,
                f"{key.removesuffix('.listen')}.socket_group: the agent (uid {os.getuid()}) "
                f"cannot give {path} the group {group!r}: it must be a member of it (the "
                "unit's SupplementaryGroups=)",
            ) from None
        sock.setblocking(False)
        return sock
    except ProxyListenError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ProxyListenError(
            exc.errno, f"{key} unix:{path}: {exc.strerror or exc}; check the directory"
        ) from None


def _replace_stale(path: str, key: str) -> None:
    """Remove an old socket at ``path`` that no process listens on; refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ProxyListenError(exc.errno, f"{key} unix:{path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ProxyListenError(
            errno.EEXIST,
            f"{key} unix:{path}: the path exists and is not a socket: refusing to replace "
            "it; remove it or choose another path",
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: left by a process that is gone
    except OSError:
        pass
    else:
        raise ProxyListenError(
            errno.EADDRINUSE,
            f"{key} unix:{path}: another process listens on it; is another dvs-agent "
            "running? stop it or choose another path",
        )
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
