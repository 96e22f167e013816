"""The proxy service in-process, with a scripted profile (:class:`Tokens`) in place of the
agent's: the renewal's single flight and rate limit, the pause after futile replays, drains,
reloads, and what a listener that cannot start does."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from agent.config.values import dec_hook
from agent.models import Token
from agent.oauth import TlsContexts
from agent.proxy.service import ProxyListenError, ProxyService, environment_proxy
from agent.proxy.settings import Listen, ProxyConfig, ProxySpec
from tests.api_server import ApiServer
from tests.conftest import hour_token
from tests.servers import free_port


class Scripted:
    """A profile whose renewals mint ``t1``, ``t2``, ... (each accepted by the upstream)."""

    def __init__(self, api: ApiServer, *, mint: bool = True, allow: bool = True) -> None:
        self.api = api
        self.mint = mint
        self.allow = allow
        self.renewals = 0
        self.held: Token | None = self._new()
        self.service: ProxyService | None = None

    def _new(self) -> Token:
        value = f"t{self.renewals}"
        self.api.accept(value)
        return hour_token(value)

    def current(self, profile: str) -> Token | None:
        return self.held

    def standing(self, profile: str) -> tuple[str, str | None]:
        return ("ok", None) if self.held else ("starting", None)

    def renew(self, profile: str) -> bool:
        if not self.allow:
            return False
        self.renewals += 1

        def later() -> None:  # the refresh runs on another thread, its end is reported
            time.sleep(0.2)
            if self.mint:
                self.held = self._new()
            assert self.service is not None
            self.service.refreshed(profile)

        threading.Thread(target=later, daemon=True).start()
        return True


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer() as upstream:
        yield upstream


def _spec(api: ApiServer, **keys: object) -> tuple[ProxySpec, str]:
    port = free_port()
    config = msgspec.convert(
        {"listen": f"127.0.0.1:{port}", "allow_tcp": True, **keys},
        ProxyConfig,
        dec_hook=dec_hook,
    )
    spec = ProxySpec(
        profile="dvs",
        config=config,
        listen=Listen(host="127.0.0.1", port=port),
        upstream=api.url,
        ca_bundle=None,
        ca_key="profiles.dvs.proxy.ca_bundle",
    )
    return spec, f"http://127.0.0.1:{port}"


def _serve(tokens: Scripted, *specs: ProxySpec) -> ProxyService:
    service = ProxyService(tokens, tls=TlsContexts(), metrics=None)
    tokens.service = service
    service.start(specs)
    return service


def test_a_futile_replay_pauses_renewals(api: ApiServer) -> None:
    """The upstream refuses fresh tokens too: one renewal and one replay, then 401s go back
    with no renewal (no token request every 10 s for a refusing API)."""
    tokens = Scripted(api)
    spec, url = _spec(api)
    service = _serve(tokens, spec)
    try:
        api.fail_next_with_401(2)
        assert httpx.get(url + "/echo", timeout=10).status_code == 401
        assert tokens.renewals == 1
        for _ in range(3):
            api.fail_next_with_401(1)
            assert httpx.get(url + "/echo", timeout=10).status_code == 401
        assert tokens.renewals == 1, "paused after the futile replay"
        assert httpx.get(url + "/echo", timeout=10, trust_env=False).status_code == 200
    finally:
        service.stop(2.0)


def test_concurrent_401s_share_one_renewal(api: ApiServer) -> None:
    tokens = Scripted(api)
    spec, url = _spec(api)
    service = _serve(tokens, spec)
    try:
        api.revoke("t0")
        results: list[int] = []

        def one() -> None:
            results.append(httpx.get(url + "/echo", timeout=10).status_code)

        threads = [threading.Thread(target=one) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [200] * 16
        assert tokens.renewals == 1
    finally:
        service.stop(2.0)


def test_a_refused_renewal_or_an_unchanged_token_passes_the_401_back(api: ApiServer) -> None:
    refused = Scripted(api, allow=False)
    spec, url = _spec(api)
    service = _serve(refused, spec)
    try:
        api.fail_next_with_401(1)
        assert httpx.get(url + "/echo", timeout=10).status_code == 401
        assert len(api.requests()) == 1
    finally:
        service.stop(2.0)
    same = Scripted(api, mint=False)  # a same-token server: the renewal brings the same token
    spec, url = _spec(api)
    service = _serve(same, spec)
    try:
        api.clear()
        api.fail_next_with_401(1)
        assert httpx.get(url + "/echo", timeout=10).status_code == 401
        assert len(api.requests()) == 1 and same.renewals == 1
    finally:
        service.stop(2.0)


def test_a_listener_that_cannot_start_leaves_nothing_listening(api: ApiServer) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        good, good_url = _spec(api)
        port = taken.getsockname()[1]
        bad = dataclasses.replace(good, listen=Listen(host="127.0.0.1", port=port))
        service = ProxyService(Scripted(api), tls=TlsContexts(), metrics=None)
        with pytest.raises(ProxyListenError, match=r"profiles\.dvs\.proxy\.listen .*another"):
            service.start([good, bad])
        with pytest.raises(httpx.ConnectError):
            httpx.get(good_url + "/echo", timeout=5)
    finally:
        taken.close()


def test_apply_restarts_a_changed_listener_and_keeps_the_others(
    api: ApiServer, tmp_path: Path
) -> None:
    tokens = Scripted(api)
    one, one_url = _spec(api)
    two, two_url = _spec(api)
    two = dataclasses.replace(two, profile="other")
    service = _serve(tokens, one, two)
    try:
        assert httpx.get(two_url + "/echo", timeout=5).status_code == 200
        moved, moved_url = _spec(api)
        service.apply([moved, two])
        with pytest.raises(httpx.ConnectError):
            httpx.get(one_url + "/echo", timeout=5)
        assert httpx.get(moved_url + "/echo", timeout=5).status_code == 200
        assert httpx.get(two_url + "/echo", timeout=5).status_code == 200
        service.apply([moved])  # "other" removed from the config
        with pytest.raises(httpx.ConnectError):
            httpx.get(two_url + "/echo", timeout=5)
    finally:
        service.stop(2.0)


def test_stop_cuts_a_request_that_outlives_the_deadline(api: ApiServer) -> None:
    tokens = Scripted(api)
    spec, url = _spec(api)
    service = _serve(tokens, spec)
    outcome: list[object] = []

    def slow() -> None:
        try:
            outcome.append(httpx.get(url + "/slow?seconds=30", timeout=40).status_code)
        except httpx.HTTPError as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    began = time.monotonic()
    assert service.stop(1.0) is False  # not every request finished in time
    assert time.monotonic() - began < 5
    thread.join(10)
    assert outcome and outcome[0] != 200


def test_bodies_beyond_the_held_budget_stream_and_are_not_replayed(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many concurrent uploads must not each hold a MiB: past the profile's budget a body is
    streamed (intact), and its 401 goes back."""
    monkeypatch.setattr("agent.proxy.forward.HELD_BUDGET", 100)
    tokens = Scripted(api)
    spec, url = _spec(api)
    service = _serve(tokens, spec)
    try:
        assert httpx.post(url + "/upload", content=b"s" * 50, timeout=10).status_code == 200
        api.fail_next_with_401(1)
        small = httpx.post(url + "/upload", content=b"s" * 50, timeout=10)
        assert small.status_code == 200 and tokens.renewals == 1  # held: replayed
        api.fail_next_with_401(1)
        big = httpx.post(url + "/upload", content=b"b" * 500, timeout=10)
        assert big.status_code == 401  # streamed: not replayed
        assert httpx.post(url + "/upload", content=b"b" * 500, timeout=10).json()["body_len"] == 500
    finally:
        service.stop(2.0)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"HTTPS_PROXY": "http://egress:3128"}, "http://egress:3128"),
        ({"https_proxy": "http://lower:3128"}, "http://lower:3128"),
        ({"HTTP_PROXY": "http://plain:3128"}, None),  # the upstream is https
        ({"ALL_PROXY": "http://all:3128"}, "http://all:3128"),
        ({"ALL_PROXY": "socks5://s:1080"}, None),  # not an HTTP proxy
        ({"HTTPS_PROXY": "http://e:3128", "NO_PROXY": "osigu.com"}, None),
        ({"HTTPS_PROXY": "http://e:3128", "no_proxy": ".osigu.com,other"}, None),
        ({"HTTPS_PROXY": "http://e:3128", "NO_PROXY": "*"}, None),
        ({"HTTPS_PROXY": "http://e:3128", "NO_PROXY": "gu.com"}, "http://e:3128"),
    ],
)
def test_the_environment_proxy_is_resolved_once_as_httpx_would(
    environ: dict[str, str], expected: str | None
) -> None:
    assert environment_proxy("https://api.osigu.com", environ) == expected


def test_the_upstream_requests_go_through_https_proxy_unless_no_proxy(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = free_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    spec, url = _spec(api)
    service = _serve(Scripted(api), spec)
    try:
        answer = httpx.get(url + "/echo", timeout=10, trust_env=False)
        assert answer.status_code == 502  # the proxy was used
        assert f"forward proxy 127.0.0.1:{dead}" in answer.json()["error"]
    finally:
        service.stop(2.0)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    spec, url = _spec(api)
    service = _serve(Scripted(api), spec)
    try:
        assert httpx.get(url + "/echo", timeout=10, trust_env=False).status_code == 200
    finally:
        service.stop(2.0)


def test_an_upstream_that_trickles_its_body_is_cut_after_request_timeout(
    api: ApiServer,
) -> None:
    """The answer began, then the upstream stalls: the client's connection is cut after
    request_timeout (it sees the body incomplete), and the proxy keeps serving."""
    upstream = socket.create_server(("127.0.0.1", 0))
    port = upstream.getsockname()[1]

    def serve() -> None:
        conn, _ = upstream.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nab")
        time.sleep(6)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    spec, url = _spec(api, request_timeout="1s")
    spec = dataclasses.replace(spec, upstream=f"http://127.0.0.1:{port}")
    service = _serve(Scripted(api), spec)
    try:
        began = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url + "/x", timeout=10)
        assert time.monotonic() - began < 5
    finally:
        service.stop(2.0)
        upstream.close()


def test_descriptor_caps_share_what_is_free_in_proportion() -> None:
    import resource

    from agent.proxy.service import descriptor_caps

    wanted = {"a": 256, "b": 64}
    assert descriptor_caps(wanted, soft_limit=65536, in_use=40) == wanted
    assert descriptor_caps(wanted, soft_limit=resource.RLIM_INFINITY, in_use=40) == wanted
    # 1024 - 24 free, half of it for the proxies, 3 descriptors a connection: 166 in all
    assert descriptor_caps(wanted, soft_limit=1024, in_use=24) == {"a": 132, "b": 33}
    assert descriptor_caps(wanted, soft_limit=30, in_use=29) == {"a": 1, "b": 1}
