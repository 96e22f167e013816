"""One profile's forwarding: a client's request to the upstream with the profile's token.

:class:`Forwarder` is the request handler of one proxy listener (DESIGN §14). Per request:

1. refuse what a deputy must not do: a target that is not origin-form (``/path?query``),
   CONNECT, and on TCP a ``Host`` other than the listen address or any ``Origin`` (DNS
   rebinding, browser form posts); a declared body over ``max_body`` (413);
2. take the profile's current token (503 naming the profile's state when it holds none);
3. read the body: up to :data:`~agent.proxy.settings.REPLAY_BODY_LIMIT` is held (a 401 can
   then be replayed), a longer one is streamed (and cut with 413 beyond ``max_body``);
4. send method, target, headers (hop-by-hop ones, ``Host`` and the client's
   ``Authorization`` removed; ``Authorization: Bearer`` added) and body upstream on a pooled
   kept-alive connection (a held body with its ``Content-Length``, a streamed one as it came:
   with its length, else chunked), redirects not followed; a pooled connection that the
   upstream closed as it was reused carries an idempotent request once more on a new one;
5. a 401 with a held body: a fresh token from the profile (single-flight: one renewal for any
   number of concurrent 401s, sharing ``refresh``'s rate limit; a token newer than the one
   used is taken at once) and one replay, only when the token changed; else the 401 goes back;
6. stream the answer back (hop-by-hop headers removed; a body without a length re-chunked
   for HTTP/1.1 clients), chunk by chunk, reading the upstream only as fast as the client
   reads: memory stays flat.

Failures before the answer begins become JSON answers naming the cause (502 upstream
unreachable or TLS, 504 upstream too slow, 408 client too slow); after it began, the
connection is cut. The access log line holds method, path without query, status and
duration; never a header value, the token or the body.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
import time
from http import HTTPStatus
from typing import Protocol

from agent.models import Token
from agent.proxy.edge import (
    Body,
    BodyError,
    ClientConnection,
    ClientGone,
    Request,
    error_body,
    simple_answer,
)
from agent.proxy.settings import REPLAY_BODY_LIMIT, Listen, ProxySpec
from agent.proxy.upstream import (
    CONNECT_SECONDS,
    BadAnswer,
    ForwardProxyError,
    Head,
    Upstream,
    UpstreamClosed,
    UpstreamPool,
    succeeded,
)
from agent.recorder import Recorder

#: RFC 9110 §7.6.1 and the old proxy headers: never forwarded in either direction
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: request headers the proxy sets itself (the framing too: bodies are framed anew)
_REPLACED = frozenset({b"host", b"authorization", b"expect", b"content-length"})
#: response headers re-framed by the proxy
_REFRAMED = frozenset({b"content-length"})
#: the most a request waits for the profile's renewal after a 401
RENEW_WAIT_SECONDS = 30.0
#: after a replay that still got 401: no renewal for this long, doubling up to the maximum
FUTILE_PAUSE_FIRST = 10.0
FUTILE_PAUSE_MAX = 300.0
#: the most request-body bytes one profile's proxy holds at once for replays; bodies beyond
#: it are streamed (their 401 goes back)
HELD_BUDGET = 32 << 20
#: methods a request on a reused connection that the upstream closed unanswered is sent again
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_NO_BODY = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Tokens(Protocol):
    """What a proxy needs of the agent's profiles (thread-safe; read from the proxy's loop)."""

    def current(self, profile: str) -> Token | None:
        """The profile's token while it is valid, else None."""

    def standing(self, profile: str) -> tuple[str, str | None]:
        """The profile's state (``starting``, ``expired``, ...) and its last error (masked)."""

    def renew(self, profile: str) -> bool:
        """Ask for a new token now, within ``refresh``'s rate limit (False: refused)."""


class UpstreamTimeout(TimeoutError):
    """The upstream did not answer within request_timeout."""


def _upstream_slow(conn: ClientConnection) -> BaseException:
    return UpstreamTimeout()


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }


_REQUEST_DROP = HOP_BY_HOP | _REPLACED
#: Connection values that name no header to drop
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b""})
_RESPONSE_DROP = HOP_BY_HOP | _REFRAMED


def _dropped(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes], connection: bool
) -> frozenset[bytes]:
    """``drop`` and the names listed in the headers' Connection values (``connection``: the
    headers hold one, as noted while parsing)."""
    if not connection:
        return drop
    named = _connection_tokens(headers)
    # most name only keep-alive or close: no new set per message then
    return drop if named <= _PLAIN_CONNECTION else drop | named


def forwarded_request_headers(
    headers: list[tuple[bytes, bytes]], bearer: bytes, *, connection: bool = True
) -> list[tuple[bytes, bytes]]:
    """The client's headers as the upstream gets them (framing aside), with the bearer token
    (``connection``: a Connection header may name more to drop)."""
    drop = _dropped(headers, _REQUEST_DROP, connection)
    out = [(n, v) for n, v in headers if n.lower() not in drop]
    out.append((b"Authorization", b"Bearer " + bearer))
    return out


def _reason(status: int, text: bytes) -> bytes:
    if text and len(text) <= 64 and text.isascii() and text.decode("ascii").isprintable():
        return text
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def _chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (never empty: that would end the body)."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


class _Relay:
    """Where the upstream's body chunks go: the client, re-framed (chunked or as they are)."""

    __slots__ = ("chunked", "conn")

    def __init__(self, conn: ClientConnection, chunked: bool) -> None:
        self.conn, self.chunked = conn, chunked

    def body(self, chunk: bytes) -> None:
        self.conn.send(_chunk(chunk) if self.chunked else chunk)

    def writable(self) -> bool:
        return self.conn.writable()


class Forwarder:
    """The exchange of one profile's proxy (see the module's doc). Runs on the proxy
    service's event loop only."""

    def __init__(
        self,
        spec: ProxySpec,
        *,
        tokens: Tokens,
        pool: UpstreamPool,
        metrics: Recorder,
        log: logging.Logger,
        access: logging.Logger,
    ) -> None:
        self.spec = spec
        self._cfg = spec.config
        self._profile = spec.profile
        self._tokens = tokens
        self._pool = pool
        self._route = pool.route
        self._metrics = metrics
        self._log = log
        self._access = access
        self._access_log = self._cfg.access_log
        self._max_body = int(self._cfg.max_body)
        self._too_large = f"the body is larger than max_body ({self._max_body} bytes)"
        self._hosts = self._allowed_hosts(spec.listen)
        self._client_timeout = self._cfg.client_timeout.total_seconds()
        self._request_timeout = self._cfg.request_timeout.total_seconds()
        #: the renewal under way after a 401 (single-flight), and who waits for its outcome
        self._renewal: asyncio.Future[None] | None = None
        self._outcome_waiters: list[asyncio.Future[None]] = []
        self.in_flight = 0
        #: bytes of request bodies held (for a replay) by the requests in flight
        self._held = 0
        #: replays with a renewed token that still got 401, in a row: the upstream refuses
        #: the profile's tokens for another reason, so 401s stop renewing until _calm_until
        self._futile = 0
        self._futile_token: str | None = None
        self._calm_until = 0.0
        #: status lines sent, by (status, reason)
        self._status_lines: dict[tuple[int, bytes], bytes] = {}
        #: the token last used, and its header bytes (revealed once per token)
        self._bearer_of: Token | None = None
        self._bearer = b""

    @staticmethod
    def _allowed_hosts(listen: Listen) -> frozenset[bytes] | None:
        """The ``Host`` values accepted on TCP (None: a unix socket, any Host)."""
        if listen.path is not None:
            return None
        shown = f"[{listen.host}]" if ":" in listen.host else listen.host
        return frozenset({f"{shown}:{listen.port}".encode(), f"localhost:{listen.port}".encode()})

    # ------------------------------------------------------------------------- outcomes
    def refreshed(self) -> None:
        """A refresh of the profile ended (called on the loop): wake the renewal's waiters."""
        waiters, self._outcome_waiters = self._outcome_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def refused(self, status: int) -> None:
        """The edge answered a request (or a connection) itself: 431, 400, 408, 503."""
        self._metrics.proxy_request(self._profile, status)

    # ------------------------------------------------------------------------- exchange
    async def __call__(self, conn: ClientConnection, request: Request) -> None:
        status = 0
        self.in_flight += 1
        try:
            status = await self._handle(conn, request)
        except (ClientGone, asyncio.CancelledError):
            status = 499  # nginx's code for it: the client went away, no answer was sent
        except Exception as exc:
            status = 500
            self._internal(conn, exc)
        finally:
            self.in_flight -= 1
            self._record(request, status)

    def _record(self, request: Request, status: int) -> None:
        self._metrics.proxy_request(self._profile, status)
        if self._access_log and self._access.isEnabledFor(logging.INFO):
            path = request.path
            method = request.method.decode("latin-1")
            seconds = time.monotonic() - request.started
            self._access.info(
                "%s %s %d %.1fms",
                method,
                path,
                status,
                seconds * 1000,
                extra={
                    "profile": self._profile,
                    "event": "proxy_request",
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                },
            )

    def _internal(self, conn: ClientConnection, exc: BaseException) -> None:
        where = ""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        self._log.error(
            "internal error in the proxy: %s%s",
            type(exc).__name__,
            where,
            extra={"profile": self._profile, "event": "proxy_internal"},
        )
        if conn.answer_began:
            conn.abort()
        else:
            conn.send(
                simple_answer(500, error_body(500, "internal error in the proxy"), close=True)
            )
            conn.close()

    async def _handle(self, conn: ClientConnection, request: Request) -> int:
        refusal = self._admit(request)
        if refusal is not None:
            return self._answer(conn, request, *refusal)
        token = self._tokens.current(self._profile)
        if token is None:
            return self._no_token(conn, request)
        body = request.body
        held: bytes | None = b""
        first = b""
        counted = 0
        try:
            if body.exists:
                if request.version == "1.1" and (request.header(b"expect") or b"").lower() == (
                    b"100-continue"
                ):
                    conn.send(_CONTINUE)
                held, first, counted = await self._read_body(body)
            return await self._exchange(conn, request, token, held, first)
        except BodyError as refused:
            conn.close_after()
            if conn.answer_began:
                conn.abort()
                return refused.status
            return self._answer(conn, request, refused.status, refused.error)
        finally:
            self._held -= counted

    def _admit(self, request: Request) -> tuple[int, str] | None:
        if request.method == b"CONNECT":
            return 405, "CONNECT is not supported: the proxy forwards to its upstream"
        if not request.target.startswith(b"/"):
            return (
                400,
                "only origin-form targets (/path?query): the proxy forwards to its upstream, "
                "never to a URL the client names",
            )
        if self._hosts is not None:
            host = (request.header(b"host") or b"").lower()
            if host not in self._hosts:
                shown = sorted(self._hosts)[0].decode()
                return (
                    421,
                    f"the Host header must be {shown} (the proxy's listen address): another "
                    "name may be a DNS-rebinding page",
                )
            if request.header(b"origin") is not None:
                return 403, "requests with an Origin header (from a browser) are refused"
        length = request.body.length
        if length is not None and length > self._max_body:
            return 413, self._too_large
        return None

    def _no_token(self, conn: ClientConnection, request: Request) -> int:
        state, last_error = self._tokens.standing(self._profile)
        return self._answer(
            conn,
            request,
            503,
            f"profile {self._profile} holds no valid token (state: {state}); see dvs-agent status",
            extra=(("Retry-After", "5"),),
            state=state,
            last_error=last_error,
        )

    def _answer(
        self,
        conn: ClientConnection,
        request: Request,
        status: int,
        error: str,
        *,
        extra: tuple[tuple[str, str], ...] = (),
        **fields: object,
    ) -> int:
        """An answer of the proxy's own; the connection closes if the body was not read."""
        close = not request.body.ended or not request.keep_alive
        if close:
            conn.close_after()
        body = error_body(status, error, profile=self._profile, **fields)
        conn.send(simple_answer(status, body, close=close, extra=extra))
        conn.answer_began = True
        return status

    # ----------------------------------------------------------------------------- body
    async def _read_body(self, body: Body) -> tuple[bytes | None, bytes, int]:
        """(held, first, counted): the body held whole when it fits the replay limit and the
        profile's budget for held bodies (:data:`HELD_BUDGET`: many concurrent uploads must
        not grow the agent by a MiB each), else None and what was read of it so far (the
        rest is streamed)."""
        limit = min(REPLAY_BODY_LIMIT, max(0, HELD_BUDGET - self._held))
        if body.length is not None and body.length > limit:
            return None, b"", 0
        held = bytearray()
        try:
            while len(held) <= limit:
                chunk = await body.read()
                if not chunk:
                    return bytes(held), b"", len(held)  # counted until the request ends
                held += chunk
                self._held += len(chunk)
                if len(held) > self._max_body:
                    raise BodyError(413, self._too_large)
        except BaseException:
            self._held -= len(held)
            raise
        self._held -= len(held)  # streamed from here: no longer held for a replay
        return None, bytes(held), 0

    async def _send_body(self, up: Upstream, body: Body, first: bytes, chunked: bool) -> None:
        total = len(first)
        chunk = first
        while True:
            if chunk:
                up.write(_chunk(chunk) if chunked else chunk)
                await up.drain()
            chunk = await body.read()
            if not chunk:
                break
            total += len(chunk)
            if total > self._max_body:
                raise BodyError(413, self._too_large)
        if chunked:
            up.write(b"0\r\n\r\n")

    # ------------------------------------------------------------------------- upstream
    def _bearer_for(self, token: Token) -> bytes:
        if token is not self._bearer_of:
            self._bearer = token.access_token.reveal().encode("latin-1")
            self._bearer_of = token
        return self._bearer

    def _request_head(
        self, request: Request, token: Token, held: bytes | None, chunked: bool
    ) -> bytes:
        route = self._route
        parts = [
            request.method,
            b" ",
            route.prefix,
            request.target,
            b" HTTP/1.1\r\nHost: ",
            route.authority,
            b"\r\n",
        ]
        for name, value in forwarded_request_headers(
            request.headers, self._bearer_for(token), connection=b"connection" in request.noted
        ):
            parts += (name, b": ", value, b"\r\n")
        if route.via_auth is not None and route.tls is None:
            parts += (b"Proxy-Authorization: ", route.via_auth, b"\r\n")
        if held is not None:
            if held or request.body.exists or request.body.length == 0:
                parts.append(b"Content-Length: %d\r\n" % len(held))
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n" % (request.body.length or 0))
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _connect(self) -> Upstream:
        async with asyncio.timeout(min(CONNECT_SECONDS, self._request_timeout)):
            return await self._pool.connect()

    async def _ask(
        self,
        conn: ClientConnection,
        request: Request,
        token: Token,
        held: bytes | None,
        first: bytes,
    ) -> tuple[Upstream, Head, asyncio.Task[None] | None] | int:
        """Send the request: the connection, the answer's head and the body's sender; or the
        status the proxy answered with when the upstream could not be asked (502, 504)."""
        try:
            return await self._send(conn, request, token, held, first)
        except (BodyError, ClientGone):
            raise
        except Exception as exc:
            return self._failed(conn, request, exc)

    async def _send(
        self,
        conn: ClientConnection,
        request: Request,
        token: Token,
        held: bytes | None,
        first: bytes,
    ) -> tuple[Upstream, Head, asyncio.Task[None] | None]:
        body = request.body
        chunked = held is None and (body.chunked or body.length is None)
        head_only = request.method == b"HEAD"
        retried = False
        while True:
            up = self._pool.take()
            reused = up is not None
            if up is None:
                up = await self._connect()
            data = self._request_head(request, token, held, chunked)
            up.begin(data + held if held else data, head_only=head_only)
            sender: asyncio.Task[None] | None = None
            if held is None:
                sender = asyncio.ensure_future(self._send_body(up, body, first, chunked))
                sender.add_done_callback(functools.partial(_sender_ended, up))
            conn.waiting(up.head, self._request_timeout, _upstream_slow)
            try:
                head = await up.head
            except UpstreamClosed as exc:
                up.abort()
                if sender is not None:
                    sender.cancel()
                if (
                    reused
                    and not retried
                    and not exc.began
                    and held is not None
                    and request.method in _IDEMPOTENT
                ):
                    retried = True  # the upstream closed an idle connection as it was reused
                    continue
                raise
            except BaseException:
                up.abort()
                if sender is not None:
                    sender.cancel()
                raise
            finally:
                conn.waiting(None)
            return up, head, sender

    async def _exchange(
        self,
        conn: ClientConnection,
        request: Request,
        token: Token,
        held: bytes | None,
        first: bytes,
    ) -> int:
        asked = await self._ask(conn, request, token, held, first)
        if isinstance(asked, int):
            return asked
        up, head, sender = asked
        if head.status == 401 and held is not None:
            replay = await self._replay_token(token)
            if replay is not None:
                self._discard(up)
                self._metrics.proxy_replay(self._profile)
                self._log.info(
                    "the upstream answered 401: replayed once with the renewed token",
                    extra={"profile": self._profile, "event": "proxy_replay"},
                )
                asked = await self._ask(conn, request, replay, held, first)
                if isinstance(asked, int):
                    return asked
                up, head, sender = asked
                self._judge_replay(replay, head.status)
        try:
            await self._relay(conn, request, up, head)
        finally:
            if sender is not None and not succeeded(sender):
                # the upstream answered before it took the whole body (or the body broke
                # off after its answer began): neither connection can carry another request
                sender.cancel()
                up.abort()
                conn.close_after()
            self._discard(up)
        return head.status

    def _discard(self, up: Upstream) -> None:
        if succeeded(up.done):
            self._pool.give_back(up)
        else:
            up.abort()

    async def _relay(
        self, conn: ClientConnection, request: Request, up: Upstream, head: Head
    ) -> None:
        status = head.status
        line = self._status_lines.get((status, head.reason))
        if line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status, head.reason))
            if len(self._status_lines) < 64:
                self._status_lines[(status, head.reason)] = line
        parts = [line]
        drop = _dropped(head.headers, _RESPONSE_DROP, head.connection)
        for name, value in head.headers:
            if name.lower() not in drop:
                parts += (name, b": ", value, b"\r\n")
        length = head.length
        bodiless = request.method == b"HEAD" or status in _NO_BODY
        chunked = False
        close = not request.keep_alive or conn.closing_after
        if not bodiless and (length is None or head.encoded):
            length = None
            if request.version == "1.1":
                chunked = True
            else:
                close = True  # an HTTP/1.0 client: the body ends with the connection
        if length is not None:
            parts += (b"Content-Length: ", length, b"\r\n")
        elif chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if close:
            parts.append(b"Connection: close\r\n")
            conn.close_after()
        parts.append(b"\r\n")
        self._metrics.proxy_added(
            self._profile, max(0.0, time.monotonic() - request.started - up.waited)
        )
        if bodiless:
            conn.send(b"".join(parts))
            conn.answer_began = True
            return
        sink = _Relay(conn, chunked)
        held_chunks = up.relay(sink)
        if held_chunks:  # the head and the body received so far in one write
            parts.append(_chunk(held_chunks) if chunked else held_chunks)
        ended = succeeded(up.done)
        if chunked and ended:
            parts.append(b"0\r\n\r\n")
        conn.send(b"".join(parts))
        conn.answer_began = True
        if up.done.done():
            if not ended:
                conn.abort()  # it broke off before the answer was sent
            return
        cut: list[str] = []

        def watch(now: float) -> None:
            if conn.write_paused_at and now - conn.write_paused_at > self._client_timeout:
                cut.append(
                    f"the client read nothing for client_timeout ({self._client_timeout:g}s)"
                )
                up.abort()
            elif not conn.write_paused_at and now - up.last_read > self._request_timeout:
                cut.append(
                    f"the upstream sent nothing for request_timeout ({self._request_timeout:g}s)"
                )
                up.abort()

        conn.relay_watch = watch
        conn.on_writable = up.resume
        if not conn.writable():
            up.pause()
        try:
            await up.done
        except (UpstreamClosed, BadAnswer) as exc:
            # the answer had begun: cut the connection, so that the client sees it incomplete
            cause = cut[0] if cut else f"the upstream's answer broke off ({type(exc).__name__})"
            self._log.warning(
                "the answer to %s %s was cut: %s",
                request.method.decode("latin-1"),
                request.path,
                cause,
                extra={"profile": self._profile, "event": "proxy_cut"},
            )
            conn.abort()
            return
        finally:
            conn.relay_watch = conn.on_writable = None
        if chunked:
            conn.send(b"0\r\n\r\n")

    # ---------------------------------------------------------------------------- 401
    async def _replay_token(self, used: Token) -> Token | None:
        """A token to replay a request that got 401 with ``used``: a newer one held already,
        or the one the single-flight renewal brought; None: no other token (a same-token
        server may hand back the one just rejected), or the rate limit refused a renewal."""
        current = self._tokens.current(self.spec.profile)
        if current is not None and current.access_token != used.access_token:
            return current
        if time.monotonic() < self._calm_until:
            return None  # renewing did not help the last time(s): the 401 goes back
        if self._renewal is None:
            self._renewal = asyncio.ensure_future(self._renew())
        try:
            async with asyncio.timeout(min(RENEW_WAIT_SECONDS, self._request_timeout)):
                await asyncio.shield(self._renewal)
        except TimeoutError:
            return None
        current = self._tokens.current(self.spec.profile)
        if current is not None and current.access_token != used.access_token:
            return current
        return None

    def _judge_replay(self, token: Token, status: int) -> None:
        """After a replay: a 401 again with a renewed token means fresher tokens do not help
        (a scope or permission the upstream wants, the wrong upstream): 401s go back without
        a renewal for 10 s, doubling to 5 minutes while it lasts, so that a refusing API
        cannot make the agent ask the auth server for a token every few seconds."""
        if status != 401:
            self._futile, self._futile_token = 0, None
            return
        value = token.access_token.reveal()
        if value == self._futile_token:
            return  # the concurrent replays of one renewal count once
        self._futile_token = value
        self._futile += 1
        pause = min(FUTILE_PAUSE_MAX, FUTILE_PAUSE_FIRST * 2 ** (self._futile - 1))
        self._calm_until = time.monotonic() + pause
        self._log.warning(
            "the upstream answered 401 again to a replay with a renewed token: it refuses the "
            "profile's tokens for another reason (their scope or permissions, or upstream is "
            "the wrong API); 401s go back to the clients without a renewal for %ds",
            pause,
            extra={"profile": self.spec.profile, "event": "proxy_401_futile"},
        )

    async def _renew(self) -> None:
        try:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._outcome_waiters.append(waiter)
            if not self._tokens.renew(self.spec.profile):
                self._log.info(
                    "the upstream answered 401, but the profile was refreshed moments ago "
                    "(refresh's rate limit): the 401 goes back",
                    extra={"profile": self.spec.profile, "event": "proxy_401"},
                )
                return
            self._log.info(
                "the upstream answered 401: renewing the profile's token",
                extra={"profile": self.spec.profile, "event": "proxy_401"},
            )
            async with asyncio.timeout(RENEW_WAIT_SECONDS):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._renewal = None

    # ------------------------------------------------------------------------- failures
    def _failed(self, conn: ClientConnection, request: Request, exc: BaseException) -> int:
        status, error = upstream_failure(exc, self.spec, self._request_timeout)
        self._log.warning(
            "%s", error, extra={"profile": self._profile, "event": "proxy_upstream_error"}
        )
        return self._answer(conn, request, status, error)


def _sender_ended(up: Upstream, task: asyncio.Task[None]) -> None:
    """A body that could not be sent ends the wait for the answer (413, 400, 408, gone)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not up.head.done():
        up.head.set_exception(exc)
        up.abort()


def _os_cause(error: OSError) -> str:
    """``Connection refused`` (asyncio's message says only "Connect call failed")."""
    return os.strerror(error.errno) if error.errno else type(error).__name__


def upstream_failure(exc: BaseException, spec: ProxySpec, timeout: float) -> tuple[int, str]:
    """The status and the message for an upstream that could not be asked or did not answer."""
    where = spec.upstream
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or type(exc).__name__
        return 502, (
            f"the upstream {where} presented a certificate that is not trusted ({reason}): "
            f"set {spec.ca_key} to the CA file (PEM) that signs it"
        )
    if isinstance(exc, ssl.SSLError):
        return 502, (
            f"TLS with the upstream {where} failed ({type(exc).__name__}); check {spec.ca_key} "
            "and that the upstream speaks https"
        )
    if isinstance(exc, socket.gaierror):
        return 502, f"cannot resolve the upstream's host ({where}): check upstream and DNS"
    if isinstance(exc, ForwardProxyError):
        return 502, (
            f"cannot connect to the forward proxy {exc.host}:{exc.port} (HTTPS_PROXY, "
            f"HTTP_PROXY or ALL_PROXY in the agent's environment) for {where}: {exc.cause}; "
            "fix it, or name the upstream's host in NO_PROXY"
        )
    if isinstance(exc, TimeoutError):
        return 504, f"the upstream {where} did not answer within request_timeout ({timeout:g}s)"
    if isinstance(exc, UpstreamClosed):
        return 502, f"the upstream {where} closed the connection without an answer"
    if isinstance(exc, BadAnswer):
        return 502, (
            f"the upstream {where} sent an answer that is not valid HTTP, or with a head "
            "over 64 KiB"
        )
    if isinstance(exc, OSError):
        return 502, f"cannot connect to the upstream {where}: {_os_cause(exc)}"
    raise exc
