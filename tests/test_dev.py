"""`dvs-agent dev`: the local issuer and an agent against it, as a newcomer runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO, agent_env, run_cli, threads_taking_signals, wait_for
from tests.servers import free_port


def _free_pair() -> int:
    """A port whose successor is free too (the dev health listener takes port + 1)."""
    for _ in range(50):
        port = free_port()
        try:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def test_dev_keeps_a_token_fresh_and_follows_a_rotation(tmp_path: Path) -> None:
    port = _free_pair()
    directory = tmp_path / "dev"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "dev",
            "--dir",
            str(directory),
            "--port",
            str(port),
            "--expires-in",
            "4",
        ],
        cwd=REPO,
        env=agent_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        token = directory / "token"
        assert wait_for(lambda: token.exists(), timeout=20)
        first = token.read_text()
        assert wait_for(lambda: token.read_text() != first, timeout=15)  # refreshed
        assert (directory / "token.json").exists()
        status = run_cli("status", "-c", str(directory / "agent.toml"))
        assert status.returncode == 0, status.stderr
        assert "dvs: ok" in status.stdout
        # the rotation demo: a new secret in the file becomes the issuer's and the agent's
        before = token.read_text()
        (directory / "client_secret").write_text("rotated-in-dev")
        assert wait_for(lambda: token.read_text() != before, timeout=15)
        time.sleep(0.5)
        # the issuer's threads too leave Ctrl-C to the main thread (it was lost at times)
        assert threads_taking_signals(proc.pid) == [proc.pid]
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, output
    assert "issued token" in output and "new token for provider br-gamma" in output
    assert "client secret rotated" in output and "rotation detected" in output
    assert "demo-secret" in output  # the published demo credentials are printed on purpose
    assert "rotated-in-dev" not in output


def test_dev_issuer_only(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "dev", "--issuer-only", "--port", str(port)],
        cwd=REPO,
        env=agent_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/oauth/token?grant_type=client_credentials"

        def answer() -> httpx.Response | None:
            try:
                return httpx.post(url, auth=("demo-client", "demo-secret"), timeout=2)
            except httpx.HTTPError:
                return None

        assert wait_for(lambda: answer() is not None, timeout=15)
        response = answer()
        assert response is not None and response.status_code == 200
        assert response.json()["token_type"] == "bearer"
        assert httpx.get(url, timeout=2).status_code == 405
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert not (tmp_path / "dev").exists()
