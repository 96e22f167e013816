"""The health listener (DESIGN §8): ``/healthz``, ``/readyz``, ``/metrics`` and ``POST /refresh``.

:class:`HealthServer` answers from callbacks the agent passes in (a snapshot of every profile,
the metrics, a refresh request); it holds no state of its own beyond a burst limit. The client
helpers at the end are what ``dvs-agent status`` and ``dvs-agent refresh`` use.

The listener is bounded (DESIGN §10), so that no client can take what token writes need:

* at most :data:`MAX_CONNECTIONS` connections are served at once, one thread each (the thread
  ends with its connection); one beyond the cap is accepted and closed at once by the serving
  thread, without a thread or a queue. The cap is lowered further to a quarter of the file
  descriptors the process has free when the listener is built (:func:`connection_cap`), so the
  listener never holds more than that share (plus the listening socket and, for an instant, the
  one being refused) and the rest of the process always finds descriptors;
* a client has :data:`REQUEST_TIMEOUT_SECONDS` in all (not per read) to send its request line,
  headers and the small body that is drained, at most :data:`MAX_REQUEST_HEAD` bytes of head
  (besides http.server's own limits: 64 KiB a line, 100 headers), and
  :data:`RESPONSE_TIMEOUT_SECONDS` in all to take the answer;
* the listen backlog is :data:`LISTEN_BACKLOG`, so a burst of probes waits in the kernel rather
  than being dropped.

When the cap starts refusing connections a warning names the address, once; another says when it
has refused none for :data:`REFUSAL_QUIET_SECONDS` (never a line per connection).

No answer ever carries a token or a secret: a profile is described by its state, expiry,
provider_slug, last refresh, last error and source name only.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import resource
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import httpx

from agent import __version__
from agent.clock import Clock, utc_now
from agent.config.values import parse_listen
from agent.metrics import Metrics
from agent.models import rfc3339
from agent.process import fds_in_use

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer


#: ``POST /refresh`` burst limit of the listener itself, over all profiles (requests per second)
REFRESH_RATE = 10.0
#: request bodies are ignored; up to this many bytes are read and dropped so the client sees
#: the answer rather than a connection reset
MAX_DRAINED_BODY = 64 * 1024
#: a client has this long in all, from when its connection is taken up, to send its request
#: (line, headers and the drained body), however it spreads the bytes: a stuck or trickling
#: client is cut off (one request per connection: the handler speaks HTTP/1.0)
REQUEST_TIMEOUT_SECONDS = 5.0
#: and this long in all to take the answer (a client that never reads is cut off)
RESPONSE_TIMEOUT_SECONDS = 5.0
#: the request line and headers together, in bytes (a probe sends a few hundred); more is 431
MAX_REQUEST_HEAD = 32 * 1024
#: connections served at once, a thread each; one more is accepted and closed at once
MAX_CONNECTIONS = 64
#: the listener takes at most 1/FD_SHARE of the file descriptors free when it is built
FD_SHARE = 4
#: when full, how long the serving thread waits for a connection shut down to make room (s)
EVICTION_WAIT = 0.05
#: the listen backlog (``request_queue_size``): connections the kernel holds until accepted
LISTEN_BACKLOG = 128
#: after the cap refused a connection, this long without a refusal counts as recovered
REFUSAL_QUIET_SECONDS = 5.0
#: the pause of the serving thread when accept fails for want of descriptors or memory (the
#: listening socket stays readable: without it the loop would spin)
ACCEPT_BACKOFF_SECONDS = 0.1

_JSON = "application/json"


def connection_cap(
    wanted: int = MAX_CONNECTIONS, *, soft_limit: int | None = None, in_use: int | None = None
) -> int:
    """How many connections the listener may serve at once: ``wanted``, lowered to a quarter
    of the descriptors free now (``RLIMIT_NOFILE``'s soft limit less those open), at least 1.

    A served connection holds one descriptor; so the listener holds at most this many, plus
    its listening socket and the one it is refusing, and three quarters of what was free stay
    for token and state files, HTTP clients and hooks. With the usual limit of 1024 or more
    the cap is ``wanted``; at 64, with some 15 open, it is 12.
    """
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY or soft_limit < 0:
        return max(1, wanted)
    if in_use is None:
        in_use = fds_in_use()
    return max(1, min(wanted, (soft_limit - in_use) // FD_SHARE))


@dataclass(frozen=True, slots=True)
class ProfileStatus:
    """What the health listener shows of one profile (never a token or a secret)."""

    #: the profile's name (``[profiles.NAME]``)
    name: str
    #: starting | ok | degraded | expired | misconfigured
    state: str
    #: when the held token expires (timezone-aware); None while no token is held
    expires_at: datetime | None
    #: ``extensions.provider_slug`` of the held token's response
    provider_slug: str | None
    #: when the last successful refresh ended (timezone-aware)
    last_refresh: datetime | None
    #: why the last refresh failed, as logged (None after a success)
    last_error: str | None
    #: the credential source whose credentials are in use (``vault``, ``aws``, ``env``)
    source: str | None
    #: fleet mode (DESIGN §13): the store, whether it answers, this agent's role (minter,
    #: adopter, alone) and the lease holder; None without ``[profiles.NAME.fleet]``
    fleet: dict[str, Any] | None = None

    def ready(self, now: datetime) -> bool:
        """Whether the profile holds an unexpired token (a degraded profile may well be ready).

        Not while ``starting``: the first token is held a moment before its files are written,
        and ready must mean that a consumer finds the file."""
        return self.state != "starting" and self.expires_at is not None and now < self.expires_at

    def describe(self, now: datetime) -> dict[str, Any]:
        """The JSON object of ``/readyz`` for this profile."""
        expires_in = None
        if self.expires_at is not None:
            expires_in = max(0, math.floor((self.expires_at - now).total_seconds()))
        return {
            "state": self.state,
            "ready": self.ready(now),
            "expires_at": _time(self.expires_at),
            "expires_in": expires_in,
            "provider_slug": self.provider_slug,
            "last_refresh": _time(self.last_refresh),
            "last_error": self.last_error,
            "source": self.source,
            **({} if self.fleet is None else {"fleet": self.fleet}),
        }


@dataclass(frozen=True, slots=True)
class RefreshAnswer:
    """The agent's answer to ``POST /refresh``."""

    #: the refresh was scheduled (202); otherwise 429 with ``retry_after``, or 503 without
    accepted: bool
    #: seconds until a refresh of this profile is accepted again (its own rate limit)
    retry_after: float | None = None
    #: a line for the person who asked, e.g. "refresh of dvs scheduled"
    message: str = ""


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else rfc3339(moment)


def _json(status: int, document: dict[str, Any], *headers: tuple[str, str]) -> _Response:
    return _Response(status, json.dumps(document).encode() + b"\n", _JSON, headers)


def _retry_after(seconds: float) -> tuple[str, str]:
    """``Retry-After`` takes whole seconds: round up, at least 1."""
    return ("Retry-After", str(max(1, math.ceil(seconds))))


class _TokenBucket:
    """``rate`` requests per second on average, bursts of up to ``rate``; thread-safe."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 when a request may pass (and counts it), else the seconds until one may."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self._rate


class HealthServer:
    """The listener, bound at construction (an address in use fails at start) and served on a
    daemon thread between :meth:`start` and :meth:`stop`.

    ``snapshot`` describes every profile; ``refresh(name)`` (None: every profile) asks for a
    refresh now and raises KeyError for an unknown profile. Both are called on request threads.
    ``max_connections`` lowers the cap of connections served at once (:data:`MAX_CONNECTIONS`);
    the descriptor share of :func:`connection_cap` may lower it further, never raise it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        snapshot: Callable[[], list[ProfileStatus]],
        metrics: Metrics,
        refresh: Callable[[str | None], RefreshAnswer],
        clock: Clock = utc_now,
        logger: logging.Logger | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._snapshot = snapshot
        self._metrics = metrics
        self._refresh = refresh
        self._clock = clock
        self._log = logger or logging.getLogger("agent.health")
        self._bucket = _TokenBucket(REFRESH_RATE)
        #: (route, exception type) already logged with a traceback
        self._failures: set[tuple[str, str]] = set()
        self._failures_lock = threading.Lock()
        self._httpd = _HTTPServer(host, port, self)
        # after the bind, so that the listening socket counts as in use
        self._httpd.max_connections = connection_cap(max_connections)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the real port when 0 was asked for)."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def max_connections(self) -> int:
        """Connections served at once; more are closed as soon as they are accepted."""
        return self._httpd.max_connections

    @property
    def open_connections(self) -> int:
        """Connections being served now."""
        return self._httpd.open_connections()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="dvs-agent-health",
            daemon=True,
        )
        self._thread.start()
        host, port = self.address
        self._log.info(
            "health listener on %s (at most %d connections at once)",
            _authority(host, port),
            self.max_connections,
            extra={"event": "health_listening"},
        )

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice or without :meth:`start`."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        # the request threads are daemons that nothing joins: end their connections so that
        # they end now (a callback running finishes first), not at their deadlines
        self._httpd.close_connections()

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------- routes

    def _handle(self, method: str, target: str) -> _Response:
        """The answer to ``method target`` (HEAD is answered as GET, without the body)."""
        parts = urlsplit(target)
        path = parts.path.rstrip("/") or "/"
        if path == "/healthz":
            route, allowed, action = "healthz", "GET", self._healthz
        elif path == "/readyz":
            route, allowed, action = "readyz", "GET", lambda: self._readyz(None)
        elif path.startswith("/readyz/"):
            name = unquote(path.removeprefix("/readyz/"))
            route, allowed, action = "readyz", "GET", lambda: self._readyz(name)
        elif path == "/metrics":
            route, allowed, action = "metrics", "GET", self._render_metrics
        elif path == "/refresh":
            route, allowed, action = "refresh", "POST", lambda: self._refresh_now(parts.query)
        else:
            return _json(404, {"error": "not found"})
        if (method == "HEAD" and allowed == "GET") or method == allowed:
            try:
                return action()
            except Exception as exc:
                return self._failed(route, exc)
        allow = "GET, HEAD" if allowed == "GET" else allowed
        return _json(405, {"error": f"method not allowed; use {allowed}"}, ("Allow", allow))

    def _healthz(self) -> _Response:
        return _Response(200, b"ok\n", "text/plain; charset=utf-8")

    def _readyz(self, name: str | None) -> _Response:
        statuses = self._snapshot()
        now = self._clock()
        if name is not None:
            statuses = [status for status in statuses if status.name == name]
            if not statuses:
                return _json(404, {"error": "unknown profile", "profile": name})
        profiles = {status.name: status.describe(now) for status in statuses}
        ready = bool(profiles) and all(profile["ready"] for profile in profiles.values())
        return _json(200 if ready else 503, {"ready": ready, "profiles": profiles})

    def _render_metrics(self) -> _Response:
        body, content_type = self._metrics.render()
        return _Response(200, body, content_type)

    def _refresh_now(self, query: str) -> _Response:
        names = parse_qs(query, keep_blank_values=True).get("profile", [])
        if len(names) > 1 or (names and not names[0]):
            return _json(400, {"accepted": False, "message": "give at most one ?profile=NAME"})
        name = names[0] if names else None
        wait = self._bucket.take()
        if wait:
            return _json(
                429,
                {
                    "accepted": False,
                    "profile": name,
                    "retry_after": wait,
                    "message": "too many refresh requests; try again in a second",
                },
                _retry_after(wait),
            )
        try:
            answer = self._refresh(name)
        except KeyError:
            return _json(
                404, {"accepted": False, "profile": name, "message": f"unknown profile {name!r}"}
            )
        document = {
            "accepted": answer.accepted,
            "profile": name,
            "retry_after": answer.retry_after,
            "message": answer.message,
        }
        if answer.accepted:
            return _json(202, document)
        if answer.retry_after is not None:
            return _json(429, document, _retry_after(answer.retry_after))
        return _json(503, document)

    def _failed(self, route: str, exc: Exception) -> _Response:
        """A callback raised: a generic 500; the traceback is logged once per route and type."""
        key = (route, type(exc).__name__)
        with self._failures_lock:
            first = key not in self._failures
            self._failures.add(key)
        if first:
            self._log.error(
                "health endpoint /%s failed (%s); answering 500 (repeats are logged at debug)",
                route,
                type(exc).__name__,
                exc_info=exc,
                extra={"event": "health_error"},
            )
        else:
            self._log.debug(
                "health endpoint /%s failed again (%s)",
                route,
                type(exc).__name__,
                extra={"event": "health_error"},
            )
        return _json(500, {"error": "internal error; see the agent's log"})


class _RequestTooLarge(Exception):
    """The request head (or the drained body) is more than the listener reads."""


class _DeadlineReader(io.RawIOBase):
    """The read side of a connection: every read waits at most until one deadline for the whole
    request, so a client trickling a byte now and then is cut off at it as one that sends
    nothing is; and at most ``budget`` bytes are read in all (:meth:`allow` raises it)."""

    def __init__(self, sock: socket.socket, deadline: float, budget: int) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._budget = budget

    def readable(self) -> bool:
        return True

    def allow(self, more: int) -> None:
        self._budget += more

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self._budget <= 0:
            raise _RequestTooLarge
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"request not received within {REQUEST_TIMEOUT_SECONDS:g} s")
        self._sock.settimeout(remaining)
        with memoryview(buffer) as view, view.cast("B") as octets:
            received = self._sock.recv_into(octets[: self._budget])
        self._budget -= received
        return received


class _DeadlineWriter(io.BufferedIOBase):
    """The write side of a connection, unbuffered: the whole answer must be taken within
    ``seconds`` of its first write (``sendall``'s timeout is per call; this is per answer)."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        super().__init__()
        self._sock = sock
        self._seconds = seconds
        self._deadline: float | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._seconds
        remaining = self._deadline - now
        if remaining <= 0:
            raise TimeoutError(f"answer not taken within {self._seconds:g} s")
        self._sock.settimeout(remaining)
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server of the host's address family, without reverse DNS at bind, that
    serves at most ``max_connections`` connections at once.

    socketserver calls :meth:`process_request` on the serving thread for each accepted
    connection: it is admitted into ``_open`` (and gets a thread) while there is room, or closed
    at once; :meth:`shutdown_request`, called exactly once per connection when it ends (or when
    its thread cannot start), takes it out. So the threads and descriptors of the listener are
    bounded by the cap whatever clients do, and a flood costs the serving thread one
    accept-and-close per connection.
    """

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, host: str, port: int, health: HealthServer) -> None:
        self.health = health
        self.max_connections = MAX_CONNECTIONS
        self._open: set[socket.socket] = set()
        #: admitted connections still sending their request head, by when they were admitted
        self._waiting: dict[socket.socket, float] = {}
        #: the thread serving each connection
        self._serving: dict[socket.socket, threading.Thread] = {}
        #: every serving thread started and not yet seen ended (a connection leaves ``_open``
        #: a moment before its thread is gone: the cap counts threads too)
        self._live: set[threading.Thread] = set()
        self._open_lock = threading.Lock()
        self._open_changed = threading.Condition(self._open_lock)
        # the refusal episode; only the serving thread reads or writes these
        self._refusing_since: float | None = None
        self._last_refusal = 0.0
        self._refused = 0
        # the family of what the host resolves to: "::1" and IPv6-only names need AF_INET6
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        self.address_family = infos[0][0]
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a DNS query that can hang start-up
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # the connection waits in the backlog; socketserver drops this error
                time.sleep(ACCEPT_BACKOFF_SECONDS)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit ``request`` while there is room. When full, the connection that has waited
        longest without sending its whole request head (a slowloris) is shut down to make
        room, so that a probe, which sends its request at once, is still answered during a
        flood. Otherwise (every connection is past its head, or the one shut down did not let
        go within EVICTION_WAIT) the new one is closed at once."""
        now = time.monotonic()
        victim: socket.socket | None = None
        ending: threading.Thread | None = None
        with self._open_lock:
            admitted = self._room()
            if not admitted and self._waiting:
                victim = min(self._waiting, key=self._waiting.__getitem__)
                del self._waiting[victim]
                ending = self._serving.get(victim)
                with contextlib.suppress(OSError):
                    victim.shutdown(socket.SHUT_RDWR)  # its thread wakes from its read and ends
        if ending is not None:
            ending.join(EVICTION_WAIT)  # so that the threads never exceed the cap
        with self._open_lock:
            admitted = self._room()
            if admitted:
                self._open.add(request)
                self._waiting[request] = now
        if victim is not None:
            self._refuse()
        if admitted:
            # ThreadingMixIn's, with the thread known before it starts (so that an eviction
            # can wait for it); on failure (no thread to be had) socketserver calls
            # shutdown_request
            thread = threading.Thread(
                target=self.process_request_thread, args=(request, client_address), daemon=True
            )
            with self._open_lock:
                self._serving[request] = thread
                self._live.add(thread)
            thread.start()
            return
        self._refuse()
        self.shutdown_request(request)

    def _room(self) -> bool:
        """A connection and a thread are free (call with ``_open_lock`` held)."""
        self._live = {thread for thread in self._live if thread.is_alive()}
        return len(self._open) < self.max_connections and len(self._live) < self.max_connections

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._serving.pop(request, None)

    def head_received(self, request: socket.socket) -> None:
        """The request head of ``request`` is in: it is no longer a candidate to make room."""
        with self._open_lock:
            self._waiting.pop(request, None)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            # before the close, under the lock close_connections takes: it never shuts down a
            # descriptor number that a close here has freed for reuse
            self._open.discard(request)
            self._waiting.pop(request, None)
            self._serving.pop(request, None)  # also when its thread could not start
            self._open_changed.notify_all()
        super().shutdown_request(request)

    def open_connections(self) -> int:
        with self._open_lock:
            return len(self._open)

    def close_connections(self, timeout: float = 1.0) -> None:
        """Shut down every connection being served and wait (up to ``timeout``) until their
        threads have let go of them."""
        with self._open_changed:
            for request in self._open:
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)
            self._open_changed.wait_for(lambda: not self._open, timeout)

    def _refuse(self) -> None:
        now = time.monotonic()
        self._refused += 1
        self._last_refusal = now
        if self._refusing_since is not None:
            return
        self._refusing_since = now
        self.health._log.warning(
            "health listener on %s is serving its maximum of %d connections (a flood?); the "
            "oldest still sending its request makes room for a new one, else it is closed",
            _authority(*self.health.address),
            self.max_connections,
            extra={"event": "health_saturated"},
        )

    def service_actions(self) -> None:
        """Called by ``serve_forever`` at every turn (at least every poll interval)."""
        super().service_actions()
        since = self._refusing_since
        if since is None:
            return
        now = time.monotonic()
        if now - self._last_refusal < REFUSAL_QUIET_SECONDS:
            return
        if self.open_connections() >= self.max_connections:
            return
        self.health._log.warning(
            "health listener on %s accepts connections again (%d refused in %.0f s)",
            _authority(*self.health.address),
            self._refused,
            self._last_refusal - since,
            extra={"event": "health_recovered"},
        )
        self._refusing_since = None
        self._refused = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that went away mid-answer; never a traceback on stderr
        self.health._log.debug("health request from %s broke off", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = f"dvs-agent/{__version__}"
    sys_version = ""

    def setup(self) -> None:
        # StreamRequestHandler.setup with deadlines instead of a timeout per read or write
        self.connection = self.request
        self._reader = _DeadlineReader(
            self.connection, time.monotonic() + REQUEST_TIMEOUT_SECONDS, MAX_REQUEST_HEAD
        )
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = _DeadlineWriter(self.connection, RESPONSE_TIMEOUT_SECONDS)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        cast(_HTTPServer, self.server).head_received(self.connection)
        return parsed

    def handle_one_request(self) -> None:
        """One request (HTTP/1.0: one per connection); a head over MAX_REQUEST_HEAD is 414
        (while in the request line) or 431. A timeout closes the connection without an answer
        (http.server catches TimeoutError)."""
        self.raw_requestline = b""
        try:
            super().handle_one_request()
        except _RequestTooLarge:
            self.close_connection = True
            if not self.raw_requestline:  # still reading it
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            else:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Request too large")

    def _answer(self) -> None:
        self._drain()
        health = cast(_HTTPServer, self.server).health
        response = health._handle(self.command, self.path)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _drain(self) -> None:
        """Read a (small) body and drop it, so closing the connection does not reset it."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if 0 < length <= MAX_DRAINED_BODY:
            self._reader.allow(length)
            self.rfile.read(length)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: a probe every few seconds is not worth a log line."""


# ------------------------------------------------------------------------------------ client


class AgentUnreachable(ConnectionError):
    """The health listener of a running agent did not answer; the message says what to check."""


def _authority(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _base_url(listen: str) -> str:
    """``http://HOST:PORT`` for the config's ``listen``; a wildcard host becomes loopback."""
    if not listen:
        raise AgentUnreachable(
            '[health] listen is disabled (listen = ""): status and refresh talk to the agent '
            'through it; set it, e.g. listen = "127.0.0.1:8787", and restart the agent'
        )
    try:
        host, port = parse_listen(listen)  # the config's own parser: one for both
    except ValueError as exc:
        raise ValueError(f"[health] listen: {exc}") from None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{_authority(host, str(port))}"


def _call(
    method: str, listen: str, path: str, params: dict[str, str], timeout: float
) -> tuple[int, dict[str, Any]]:
    url = _base_url(listen) + path
    try:
        # trust_env off: a loopback call must not go through $HTTP_PROXY
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            response = client.request(method, url, params=params)
    except httpx.ConnectError as exc:
        raise AgentUnreachable(
            f"the agent is not running or [health] listen is disabled ({listen})"
        ) from exc
    except httpx.TimeoutException as exc:
        raise AgentUnreachable(
            f"the agent's health listener ({listen}) did not answer within {timeout:g} s"
        ) from exc
    except httpx.HTTPError as exc:
        raise AgentUnreachable(
            f"the agent's health listener ({listen}) broke off the connection "
            f"({type(exc).__name__})"
        ) from exc
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise AgentUnreachable(
            f"{listen} answered HTTP {response.status_code} without a dvs-agent JSON body: "
            "is [health] listen the address of this agent?"
        )
    return response.status_code, document


def fetch_status(listen: str, *, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """``GET /readyz`` of the agent listening on ``listen``: (200 or 503, the JSON body).

    Raises :class:`AgentUnreachable` when nothing answers there.
    """
    return _call("GET", listen, "/readyz", {}, timeout)


def request_refresh(
    listen: str, profile: str | None, *, timeout: float = 5.0
) -> tuple[int, dict[str, Any]]:
    """``POST /refresh[?profile=NAME]``: (202 accepted, 429 too soon, 404 unknown profile, …).

    Raises :class:`AgentUnreachable` when nothing answers there.
    """
    params = {} if profile is None else {"profile": profile}
    return _call("POST", listen, "/refresh", params, timeout)
