"""SIGHUP with a changed, valid config: every branch of the reload (a profile added, removed,
changed, a sink changed, one unchanged) against the running daemon."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from agent.devserver import RecordedRequest, TokenServer
from tests.conftest import CLIENT_ID, CLIENT_SECRET, Spawn, wait_for
from tests.servers import free_port

pytestmark = pytest.mark.timeout(120)


def _config(
    directory: Path,
    url: str,
    port: int,
    profiles: dict[str, str],
    settings: dict[str, str] | None = None,
) -> Path:
    """``profiles``: name → the token file's name (one raw file sink each); ``settings``:
    name → extra lines of that profile's table."""
    settings = settings or {}
    parts = [
        f'[agent]\nlog_level = "debug"\nstate_dir = "{directory}/state"\n',
        f'[health]\nlisten = "127.0.0.1:{port}"\n',
    ]
    for name, file in profiles.items():
        parts.append(
            f"""
[profiles.{name}]
token_url = "{url}"
{settings.get(name, "")}
[profiles.{name}.rotation]
poll_interval = "0"
[[profiles.{name}.sinks]]
type = "file"
path = "{directory}/{file}"
"""
        )
    path = directory / "agent.toml"
    path.write_text("\n".join(parts))
    return path


def _readyz(port: int) -> dict[str, object]:
    profiles: dict[str, object] = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()[
        "profiles"
    ]
    return profiles


def test_every_reload_branch(tmp_path: Path, spawn: Spawn) -> None:
    port = free_port()
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=3600) as server:
        config = _config(
            tmp_path, server.url, port, {"keep": "keep", "gone": "gone", "moved": "moved"}
        )
        agent = spawn(config)
        for name in ("keep", "gone", "moved"):
            assert wait_for(lambda n=name: (tmp_path / n).exists(), timeout=20), agent.output()
        assert wait_for(lambda: len(_readyz(port)) == 3)
        kept = (tmp_path / "keep").read_text()
        before = len(server.token_requests())
        # gone: removed; moved: its sink now writes another file; new: added; keep: unchanged
        _config(tmp_path, server.url, port, {"keep": "keep", "moved": "moved-here", "new": "new"})
        agent.signal(signal.SIGHUP)
        assert wait_for(lambda: (tmp_path / "new").exists(), timeout=20), agent.output()
        assert wait_for(lambda: (tmp_path / "moved-here").exists(), timeout=20), agent.output()
        assert wait_for(lambda: set(_readyz(port)) == {"keep", "moved", "new"}, timeout=10)
        time.sleep(1)
        # a new token for the changed profile and the added one; none for the unchanged one
        # (its token is seconds old and its credentials unchanged) nor the removed one
        assert len(server.token_requests()) - before == 2, agent.output()
        assert (tmp_path / "keep").read_text() == kept
        assert (tmp_path / "gone").exists()  # files are left in place, never deleted
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'profile="gone"' not in metrics  # the removed profile's series are dropped
        assert 'profile="new"' in metrics
        assert '"event":"reload_failed"' not in agent.output()
        # an invalid config is refused as a whole: the running one stays
        config.write_text(config.read_text() + "\n[profiles.bad]\nnot_a_key = 1\n")
        agent.signal(signal.SIGHUP)
        assert wait_for(lambda: "keeping the running one" in agent.output(), timeout=10)
        assert set(_readyz(port)) == {"keep", "moved", "new"}
        assert agent.stop() == 0


def _scope(request: RecordedRequest) -> str | None:
    values = parse_qs(request.body.decode()).get("scope") or request.query.get("scope")
    return values[0] if values else None


def test_a_changed_setting_an_unwritable_new_sink_and_a_restart_only_key(
    tmp_path: Path, spawn: Spawn
) -> None:
    port = free_port()
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=3600) as server:
        profiles = {"plain": "plain", "scoped": "scoped"}
        config = _config(tmp_path, server.url, port, profiles, {"scoped": 'scope = "read"'})
        agent = spawn(config)
        for name in profiles:
            assert wait_for(lambda n=name: (tmp_path / n).exists(), timeout=20), agent.output()
        assert wait_for(lambda: len(_readyz(port)) == 2)
        plain, scoped = (tmp_path / "plain").read_text(), (tmp_path / "scoped").read_text()
        before = len(server.token_requests())
        # scoped: a token setting changed; broken: its sink's directory is a file (cannot be
        # written, whoever runs the test); the listener's port: only a restart changes it
        (tmp_path / "a-file").write_text("")
        _config(
            tmp_path,
            server.url,
            free_port(),
            {**profiles, "broken": "a-file/token"},
            {"scoped": 'scope = "write"'},
        )
        agent.signal(signal.SIGHUP)
        assert wait_for(lambda: (tmp_path / "scoped").read_text() != scoped, timeout=20), (
            agent.output()
        )
        assert wait_for(lambda: "cannot apply the new settings" in agent.output(), timeout=10)
        time.sleep(1)
        requests = server.token_requests()[before:]
        # one new token, for the changed profile, with its new scope; none for the others
        assert [_scope(r) for r in requests] == ["write"], agent.output()
        assert (tmp_path / "plain").read_text() == plain
        assert not (tmp_path / "a-file").read_text()
        output = agent.output()
        assert "health.listen changes take effect at the next restart" in output
        assert "agent.state_dir changes" not in output
        # the listener stays where it was; the profile that could not be built never runs
        assert set(_readyz(port)) == {"plain", "scoped"}
        assert agent.stop() == 0
