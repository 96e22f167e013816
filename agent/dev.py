"""``dvs-agent dev``: a local token issuer with the seed's behaviour, and an agent against it."""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from agent.devserver import TokenServer
from agent.errors import EX_OK, EX_UNAVAILABLE
from agent.logs import LogFlags, setup_logging
from agent.signals import signals_to_main_thread

DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"  # noqa: S105 - the dev issuer's published demo secret

_CONFIG = """\
# Written by `dvs-agent dev`: an agent against the local dev issuer. Runs as it is:
#   export DVS_CLIENT_ID={client_id} DVS_CLIENT_SECRET_FILE={dir}/client_secret
#   dvs-agent run -c {dir}/agent.toml
[agent]
log_level = "info"
log_format = "text"
state_dir = "{dir}/state"

[health]
listen = "127.0.0.1:{health_port}"

[profiles.dvs]
token_url = "{url}"
refresh_before_expiry = "10s"

[profiles.dvs.rotation]
poll_interval = "1s"

[[profiles.dvs.sinks]]
type = "file"
path = "{dir}/token"
format = "raw"
mode = "0600"

[[profiles.dvs.sinks]]
type = "file"
path = "{dir}/token.json"
format = "json"
mode = "0600"
"""


def _say(line: str) -> None:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"{stamp} issuer  {line}", flush=True)


class _SecretFile:
    """Rotation demo: what is written to DIR/client_secret becomes the issuer's secret too.

    Checked before each token request, so the issuer always knows the secret the agent reads.
    """

    def __init__(self, path: Path, server: TokenServer) -> None:
        self._path, self._server = path, server
        self._current = DEMO_CLIENT_SECRET

    def sync(self) -> None:
        try:
            secret = self._path.read_text().rstrip("\r\n")
        except OSError:
            return
        if secret and secret != self._current:
            self._current = secret
            self._server.set_secret(DEMO_CLIENT_ID, secret)
            _say(f"client secret rotated (from {self._path}); the old one is now rejected")


def run_dev(
    directory: Path,
    *,
    port: int,
    expires_in: int,
    issuer_only: bool,
    log_flags: LogFlags | None = None,
) -> int:
    try:
        server = TokenServer(
            port=port,
            clients={DEMO_CLIENT_ID: DEMO_CLIENT_SECRET},
            expires_in=expires_in,
            on_event=_say,
        )
    except OSError as exc:
        print(
            f"dvs-agent dev: cannot listen on 127.0.0.1:{port} ({exc.strerror}); is another "
            "dev issuer running? pass --port",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    with signals_to_main_thread():  # Ctrl-C must reach the main thread's wait
        server.start()
    _say(f"token endpoint {server.url} (tokens live {expires_in}s)")
    _say(f"demo credentials: DVS_CLIENT_ID={DEMO_CLIENT_ID} DVS_CLIENT_SECRET={DEMO_CLIENT_SECRET}")
    stop = threading.Event()
    try:
        if issuer_only:
            _say("serving only the issuer; Ctrl-C stops it")
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
            stop.wait()
            return EX_OK
        return _run_agent(directory, server, log_flags or LogFlags())
    finally:
        stop.set()
        server.stop()


def _run_agent(directory: Path, server: TokenServer, log_flags: LogFlags) -> int:
    from agent.app import Agent
    from agent.config import load_config

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    secret_file = directory / "client_secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(DEMO_CLIENT_SECRET)
    config_path = directory / "agent.toml"
    config_path.write_text(
        _CONFIG.format(
            dir=directory, url=server.url, client_id=DEMO_CLIENT_ID, health_port=server.port + 1
        )
    )
    config = load_config(config_path)
    redactor = setup_logging(log_flags.level or "info", log_flags.format or "text")
    server.before_request = _SecretFile(secret_file, server).sync
    _say(f"agent config {config_path}")
    _say(f"the agent keeps {directory / 'token'} and {directory / 'token.json'} fresh")
    _say(f"try a rotation: echo new-secret > {secret_file}   (Ctrl-C stops both)")
    _say(
        f"health: http://127.0.0.1:{server.port + 1}/readyz and /metrics; "
        f"dvs-agent status -c {config_path}"
    )
    environ = dict(os.environ)
    environ.pop("DVS_CLIENT_SECRET", None)
    environ.update({"DVS_CLIENT_ID": DEMO_CLIENT_ID, "DVS_CLIENT_SECRET_FILE": str(secret_file)})
    from agent.metrics import Metrics

    agent = Agent(
        config,
        config_path=config_path,
        environ=environ,
        redactor=redactor,
        metrics=Metrics(),
        log_flags=log_flags,
    )
    result = agent.run()
    return result.code
