"""One profile's forwarding: a client's request to the upstream with the profile's token.

:class:`Forwarder` is the request handler of one proxy listener (DESIGN §14). Per request:

1. refuse what a deputy must not do: a target that is not origin-form (``/path?query``),
   CONNECT, and on TCP a ``Host`` other than the listen address or any ``Origin`` (DNS
   rebinding, browser form posts); a declared body over ``max_body`` (413);
2. take the profile's current token (503 naming the profile's state when it holds none);
3. read the body: up to :data:`~agent.proxy.settings.REPLAY_BODY_LIMIT` is held (a 401 can
   then be replayed), a longer one is streamed (and cut with 413 beyond ``max_body``);
4. send method, target, headers (hop-by-hop ones, ``Host`` and the client's
   ``Authorization`` removed; ``Authorization: Bearer`` added) and body upstream, redirects
   not followed;
5. a 401 with a held body: a fresh token from the profile (single-flight: one renewal for any
   number of concurrent 401s, sharing ``refresh``'s rate limit; a token newer than the one
   used is taken at once) and one replay, only when the token changed; else the 401 goes back;
6. stream the answer back (hop-by-hop headers removed), chunk by chunk: memory stays flat.

Failures before the answer begins become JSON answers naming the cause (502 upstream
unreachable or TLS, 504 upstream too slow, 408 client too slow); after it began, the
connection is cut. The access log line holds method, path without query, status and
duration; never a header value, the token or the body.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import yarl
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from agent.models import Token
from agent.proxy.edge import error_body
from agent.proxy.settings import REPLAY_BODY_LIMIT, Listen, ProxySpec
from agent.recorder import Recorder

#: RFC 9110 §7.6.1 and the old proxy headers: never forwarded in either direction
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: request headers the proxy sets itself (or, for Expect, answers itself)
_REPLACED = frozenset({"host", "authorization", "expect"})
#: a 401's body is held up to this size to be passed back after a refused replay
_HELD_401_LIMIT = 64 * 1024
#: the most a request waits for the profile's renewal after a 401
RENEW_WAIT_SECONDS = 30.0
#: after a replay that still got 401: no renewal for this long, doubling up to the maximum
FUTILE_PAUSE_FIRST = 10.0
FUTILE_PAUSE_MAX = 300.0
_CHUNK = 64 * 1024
#: the most request-body bytes one profile's proxy holds at once for replays; bodies beyond
#: it are streamed (their 401 goes back)
HELD_BUDGET = 32 << 20


class Tokens(Protocol):
    """What a proxy needs of the agent's profiles (thread-safe; read from the proxy's loop)."""

    def current(self, profile: str) -> Token | None:
        """The profile's token while it is valid, else None."""

    def standing(self, profile: str) -> tuple[str, str | None]:
        """The profile's state (``starting``, ``expired``, ...) and its last error (masked)."""

    def renew(self, profile: str) -> bool:
        """Ask for a new token now, within ``refresh``'s rate limit (False: refused)."""


class _Refused(Exception):
    """An answer the proxy gives itself (status, error)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class _ClientGone(ConnectionResetError):
    """The client closed its connection while sending the body."""


@dataclass(slots=True)
class _Body:
    """A request body: ``held`` when it was read whole (replayable), else streamed."""

    held: bytes | None
    stream: AsyncIterator[bytes] | None = None
    #: bytes of ``held`` counted in the profile's budget until the request ends
    counted: int = 0


def _pairs(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]


def _connection_tokens(pairs: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }


def forwarded_request_headers(pairs: list[tuple[str, str]], token: Token) -> list[tuple[str, str]]:
    """The client's headers as the upstream gets them, with the profile's bearer token."""
    drop = HOP_BY_HOP | _REPLACED | _connection_tokens(pairs)
    out = [(n, v) for n, v in pairs if n.lower() not in drop]
    out.append(("Authorization", "Bearer " + token.access_token.reveal()))
    return out


def forwarded_response_headers(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    drop = HOP_BY_HOP | _connection_tokens(pairs)
    return [(n, v) for n, v in pairs if n.lower() not in drop]


def _reason(text: str | None) -> str | None:
    if text and text.isprintable() and text.isascii() and len(text) <= 64:
        return text
    return None


class Forwarder:
    """The request handler of one profile's proxy (see the module's doc). Runs on the proxy
    service's event loop only."""

    def __init__(
        self,
        spec: ProxySpec,
        *,
        tokens: Tokens,
        session: aiohttp.ClientSession,
        metrics: Recorder,
        log: logging.Logger,
        access: logging.Logger,
    ) -> None:
        self.spec = spec
        self._cfg = spec.config
        self._tokens = tokens
        self._session = session
        self._metrics = metrics
        self._log = log
        self._access = access
        self._base = spec.upstream
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

    @staticmethod
    def _allowed_hosts(listen: Listen) -> frozenset[str] | None:
        """The ``Host`` values accepted on TCP (None: a unix socket, any Host)."""
        if listen.path is not None:
            return None
        shown = f"[{listen.host}]" if ":" in listen.host else listen.host
        return frozenset({f"{shown}:{listen.port}", f"localhost:{listen.port}"})

    # ------------------------------------------------------------------------- outcomes
    def refreshed(self) -> None:
        """A refresh of the profile ended (called on the loop): wake the renewal's waiters."""
        waiters, self._outcome_waiters = self._outcome_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def refused(self, status: int) -> None:
        """The edge answered a request (or a connection) itself: 431, 400, 503 (metrics)."""
        self._metrics.proxy_request(self.spec.profile, status)

    # -------------------------------------------------------------------------- handler
    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        status = 0
        self.in_flight += 1
        try:
            response = await self._handle(request, started)
            status = response.status
            return response
        except (ConnectionError, asyncio.CancelledError):
            status = 499  # nginx's code for it: the client went away, no answer was sent
            raise
        except Exception:
            status = 500  # the edge answers it and logs the exception's type
            raise
        finally:
            self.in_flight -= 1
            self._record(request, status, started)

    def _record(self, request: web.BaseRequest, status: int, started: float) -> None:
        self._metrics.proxy_request(self.spec.profile, status)
        if self._cfg.access_log and self._access.isEnabledFor(logging.INFO):
            path = request.raw_path.split("?", 1)[0]
            seconds = time.monotonic() - started
            self._access.info(
                "%s %s %d %.1fms",
                request.method,
                path,
                status,
                seconds * 1000,
                extra={
                    "profile": self.spec.profile,
                    "event": "proxy_request",
                    "method": request.method,
                    "path": path,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                },
            )

    async def _handle(self, request: web.BaseRequest, started: float) -> web.StreamResponse:
        try:
            self._admit(request)
            token = self._tokens.current(self.spec.profile)
            if token is None:
                return self._no_token()
            body = await self._read_body(request)
            try:
                return await self._exchange(request, token, body, started)
            finally:
                self._held -= body.counted
        except _Refused as refused:
            return self._answer(refused.status, refused.error)

    def _admit(self, request: web.BaseRequest) -> None:
        if request.method == "CONNECT":
            raise _Refused(405, "CONNECT is not supported: the proxy forwards to its upstream")
        target = request.raw_path
        if not target.startswith("/"):
            raise _Refused(
                400,
                "only origin-form targets (/path?query): the proxy forwards to its upstream, "
                "never to a URL the client names",
            )
        if self._hosts is not None:
            host = request.headers.get("Host", "")
            if host.lower() not in self._hosts:
                raise _Refused(
                    421,
                    f"the Host header must be {sorted(self._hosts)[0]} (the proxy's listen "
                    "address): another name may be a DNS-rebinding page",
                )
            if "Origin" in request.headers:
                raise _Refused(403, "requests with an Origin header (from a browser) are refused")
        length = request.content_length
        if length is not None and length > self._cfg.max_body:
            raise _Refused(413, f"the body is larger than max_body ({self._cfg.max_body} bytes)")

    def _no_token(self) -> web.Response:
        state, last_error = self._tokens.standing(self.spec.profile)
        response = self._answer(
            503,
            f"profile {self.spec.profile} holds no valid token (state: {state}); see "
            "dvs-agent status",
            state=state,
            last_error=last_error,
        )
        response.headers["Retry-After"] = "5"
        return response

    def _answer(self, status: int, error: str, **fields: object) -> web.Response:
        response = web.Response(
            status=status, body=error_body(status, error, profile=self.spec.profile, **fields)
        )
        response.content_type = "application/json"
        return response

    # ----------------------------------------------------------------------------- body
    async def _read_body(self, request: web.BaseRequest) -> _Body:
        """The body, held when it fits the replay limit and the profile's budget for held
        bodies (:data:`HELD_BUDGET`: many concurrent uploads must not grow the agent by a MiB
        each), else streamed from what was read so far."""
        if not request.body_exists:
            return _Body(held=b"")
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == (
            "100-continue"
        ):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        held = bytearray()
        content = request.content
        limit = min(REPLAY_BODY_LIMIT, max(0, HELD_BUDGET - self._held))
        try:
            while len(held) <= limit:
                chunk = await self._client_read(content)
                if not chunk:
                    return _Body(held=bytes(held), counted=len(held))
                held += chunk
                self._held += len(chunk)
                if len(held) > self._cfg.max_body:
                    raise _Refused(
                        413, f"the body is larger than max_body ({self._cfg.max_body} bytes)"
                    )
        except BaseException:
            self._held -= len(held)
            raise
        self._held -= len(held)  # streamed from here: no longer held for a replay
        return _Body(held=None, stream=self._rest(bytes(held), content))

    async def _client_read(self, content: aiohttp.StreamReader) -> bytes:
        try:
            async with asyncio.timeout(self._client_timeout):
                return await content.readany()
        except TimeoutError:
            raise _Refused(
                408, f"the client sent no body data for client_timeout ({self._client_timeout:g}s)"
            ) from None
        except RequestPayloadError:
            raise _Refused(400, "malformed request body (its chunked framing)") from None
        except (aiohttp.ClientPayloadError, ConnectionError) as exc:
            raise _ClientGone(type(exc).__name__) from None

    async def _rest(self, first: bytes, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        total = len(first)
        yield first
        while True:
            chunk = await self._client_read(content)
            if not chunk:
                return
            total += len(chunk)
            if total > self._cfg.max_body:
                raise _Refused(
                    413, f"the body is larger than max_body ({self._cfg.max_body} bytes)"
                )
            yield chunk

    # ------------------------------------------------------------------------- upstream
    async def _send(
        self,
        request: web.BaseRequest,
        token: Token,
        data: bytes | AsyncIterator[bytes],
    ) -> aiohttp.ClientResponse:
        url = yarl.URL(self._base + request.raw_path, encoded=True)
        headers = forwarded_request_headers(_pairs(request.raw_headers), token)
        return await self._session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        )

    async def _exchange(
        self, request: web.BaseRequest, token: Token, body: _Body, started: float
    ) -> web.StreamResponse:
        data: bytes | AsyncIterator[bytes]
        if body.held is not None:
            data = body.held
        else:
            assert body.stream is not None
            data = body.stream
        upstream_started = time.monotonic()
        try:
            answer = await self._send(request, token, data)
        except Exception as exc:
            return self._failed(exc)
        upstream_wait = time.monotonic() - upstream_started
        try:
            if answer.status == 401 and body.held is not None:
                replay = await self._replay_token(token)
                if replay is not None:
                    answer.release()
                    self._metrics.proxy_replay(self.spec.profile)
                    self._log.info(
                        "the upstream answered 401: replayed once with the renewed token",
                        extra={"profile": self.spec.profile, "event": "proxy_replay"},
                    )
                    upstream_started = time.monotonic()
                    try:
                        answer = await self._send(request, replay, body.held)
                    except Exception as exc:
                        return self._failed(exc)
                    upstream_wait += time.monotonic() - upstream_started
                    self._judge_replay(replay, answer.status)
            return await self._relay(request, answer, started, upstream_wait)
        finally:
            answer.release()

    async def _relay(
        self,
        request: web.BaseRequest,
        answer: aiohttp.ClientResponse,
        started: float,
        upstream_wait: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=answer.status, reason=_reason(answer.reason))
        for name, value in forwarded_response_headers(_pairs(answer.raw_headers)):
            response.headers.add(name, value)
        self._metrics.proxy_added(
            self.spec.profile, max(0.0, time.monotonic() - started - upstream_wait)
        )
        try:
            await self._client_write(response.prepare(request))
            async for chunk in answer.content.iter_chunked(_CHUNK):
                await self._client_write(response.write(chunk))
            await self._client_write(response.write_eof())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # the answer had begun: cut the connection, so that the client sees it incomplete
            self._log.warning(
                "the answer to %s %s was cut: %s",
                request.method,
                request.raw_path.split("?", 1)[0],
                _cut_cause(exc, self._client_timeout),
                extra={"profile": self.spec.profile, "event": "proxy_cut"},
            )
            if request.transport is not None:
                request.transport.abort()
        return response

    async def _client_write(self, pending: Awaitable[object]) -> None:
        async with asyncio.timeout(self._client_timeout):
            await pending

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
    def _failed(self, exc: BaseException) -> web.StreamResponse:
        refused = _find(exc, _Refused)
        if isinstance(refused, _Refused):
            return self._answer(refused.status, refused.error)
        if _find(exc, _ClientGone) is not None:
            raise ConnectionResetError("the client went away")
        status, error = upstream_failure(exc, self.spec, self._request_timeout)
        self._log.warning(
            "%s", error, extra={"profile": self.spec.profile, "event": "proxy_upstream_error"}
        )
        return self._answer(status, error)


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _cut_cause(exc: BaseException, client_timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"the client read nothing for client_timeout ({client_timeout:g}s)"
    if isinstance(exc, aiohttp.ClientError):
        return f"the upstream's answer broke off ({type(exc).__name__})"
    return f"the client went away ({type(exc).__name__})"


def _os_cause(error: OSError) -> str:
    """``Connection refused`` (asyncio's message says only "Connect call failed")."""
    return os.strerror(error.errno) if error.errno else type(error).__name__


def upstream_failure(exc: BaseException, spec: ProxySpec, timeout: float) -> tuple[int, str]:
    """The status and the message for an upstream that could not be asked or did not answer."""
    where = spec.upstream
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        reason = getattr(cert, "verify_message", None) or getattr(cert, "reason", None) or cert
        return 502, (
            f"the upstream {where} presented a certificate that is not trusted ({reason}): "
            f"set {spec.ca_key} to the CA file (PEM) that signs it"
        )
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return 502, (
            f"TLS with the upstream {where} failed ({type(exc).__name__}); check {spec.ca_key} "
            "and that the upstream speaks https"
        )
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return 502, f"cannot resolve the upstream's host ({where}): check upstream and DNS"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        cause = _os_cause(exc.os_error)
        return 502, (
            f"cannot connect to the forward proxy {exc.host}:{exc.port} (HTTPS_PROXY, "
            f"HTTP_PROXY or ALL_PROXY in the agent's environment) for {where}: {cause}; "
            "fix it, or name the upstream's host in NO_PROXY"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = _os_cause(exc.os_error)
        return 502, f"cannot connect to the upstream {where}: {cause}"
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return 504, f"the upstream {where} did not answer within request_timeout ({timeout:g}s)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return 502, f"the upstream {where} closed the connection without an answer"
    if isinstance(exc, aiohttp.ClientResponseError):
        return 502, (
            f"the upstream {where} sent an answer that is not valid HTTP, or with a header "
            "line over 64 KiB"
        )
    if isinstance(exc, aiohttp.ClientError | OSError):
        return 502, f"the upstream {where} could not be asked ({type(exc).__name__})"
    raise exc
