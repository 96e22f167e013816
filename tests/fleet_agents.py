"""A fleet of ``dvs-agent run`` processes sharing one client and one fleet store, for the fleet
mode tests and ``bench/fleet`` (DESIGN §13).

Each agent has its own directory (config, state, token file, log) and health port; all read
the client secret from one shared file (``DVS_CLIENT_SECRET_FILE``), so that a rotation is one
write that every agent notices at its next poll.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import CLIENT_ID, REPO, agent_env, metric_samples

#: health ports are taken below the ephemeral range (where the agents' own client sockets
#: and free_port() live), so that two agents never race for one
_PORTS = range(20000, 32000)
#: every health port handed out in this test process: two fleets of one test (each with its own
#: ``taken`` set) never get the same port before either agent has bound it
_HANDED_OUT: set[int] = set()


def health_port(taken: set[int]) -> int:
    """A port below the ephemeral range that binds now and is not in ``taken`` (added)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.choice(_PORTS)
        if port in taken or port in _HANDED_OUT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass
class FleetAgent:
    index: int
    directory: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def token_path(self) -> Path:
        return self.directory / "token"

    def token(self) -> str | None:
        try:
            return self.token_path.read_text() or None
        except FileNotFoundError:
            return None

    def log(self) -> str:
        path = self.directory / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=timeout
            ) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, default: float | None = None, **labels: str) -> float | None:
        try:
            _, text = self.get("/metrics")
        except OSError:
            return default
        for sample, found in metric_samples_with_values(text):
            if sample == name and all(found.get(k) == v for k, v in labels.items()):
                return found["__value__"]  # type: ignore[return-value]
        return default

    def status(self) -> dict[str, object]:
        _, text = self.get("/readyz")
        body: dict[str, object] = json.loads(text)
        return body


def metric_samples_with_values(text: str) -> Iterator[tuple[str, dict[str, object]]]:
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels: dict[str, object] = {}
        for part in rest.rstrip("}").split(","):
            if "=" in part:
                key, _, raw = part.partition("=")
                labels[key] = raw.strip('"')
        labels["__value__"] = float(value)
        yield name, labels


@dataclass
class Fleet:
    """N agents; :meth:`start` spawns them, :meth:`stop` ends them (SIGTERM, then SIGKILL)."""

    base: Path
    token_url: str
    fleet_table: str
    secret: str
    n: int
    client_id: str = CLIENT_ID
    poll: str = "1s"
    refresh_before_expiry: str = "60s"
    extra_profile: str = ""
    log_level: str = "info"
    agents: list[FleetAgent] = field(default_factory=list)
    ports: set[int] = field(default_factory=set)

    @property
    def secret_file(self) -> Path:
        return self.base / "client-secret"

    def rotate(self, secret: str) -> None:
        """Write a new client secret where every agent reads it (atomically)."""
        self.secret = secret
        tmp = self.secret_file.with_suffix(".new")
        tmp.write_text(secret)
        tmp.replace(self.secret_file)

    def config(self, agent: FleetAgent) -> Path:
        d = agent.directory
        fleet = f"[profiles.dvs.fleet]\n{self.fleet_table}\n" if self.fleet_table else ""
        path = d / "agent.toml"
        path.write_text(
            f"""
[agent]
log_level = "{self.log_level}"
log_format = "json"
state_dir = "{d}/state"

[health]
listen = "127.0.0.1:{agent.port}"

[profiles.dvs]
token_url = "{self.token_url}"
refresh_before_expiry = "{self.refresh_before_expiry}"
{self.extra_profile}

{fleet}
[profiles.dvs.rotation]
poll_interval = "{self.poll}"

[[profiles.dvs.sinks]]
type = "file"
path = "{d}/token"
mode = "0600"
"""
        )
        return path

    def spawn(self, index: int) -> FleetAgent:
        directory = self.base / f"agent-{index:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        agent = FleetAgent(index=index, directory=directory, port=health_port(self.ports))
        config = self.config(agent)
        env = agent_env()
        env.pop("DVS_CLIENT_SECRET", None)
        env["DVS_CLIENT_ID"] = self.client_id
        env["DVS_CLIENT_SECRET_FILE"] = str(self.secret_file)
        with open(directory / "agent.log", "ab") as log:
            agent.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        return agent

    def start(self) -> Fleet:
        self.base.mkdir(parents=True, exist_ok=True)
        if not self.secret_file.exists():
            self.rotate(self.secret)
        self.agents = [self.spawn(i) for i in range(self.n)]
        return self

    def restart(self, agent: FleetAgent) -> FleetAgent:
        replacement = self.spawn(agent.index)
        self.agents[agent.index] = replacement
        return replacement

    def tokens(self) -> list[str | None]:
        return [agent.token() for agent in self.agents]

    def converged(self, valid: Callable[[], Collection[str]] | None = None) -> str | None:
        """The one token every agent's file holds (and, with ``valid``, one of those), else
        None."""
        tokens = set(self.tokens())
        if len(tokens) != 1:
            return None
        (token,) = tokens
        if token is None or (valid is not None and token not in valid()):
            return None
        return token

    def wait_converged(
        self, valid: Callable[[], Collection[str]] | None = None, timeout: float = 60.0
    ) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            token = self.converged(valid)
            if token is not None:
                return token
            dead = [a.index for a in self.agents if not a.alive()]
            assert not dead, f"agents {dead} exited:\n{self.agents[dead[0]].log()[-3000:]}"
            time.sleep(0.1)
        held = sorted({(t or "-")[:8] for t in self.tokens()})
        raise AssertionError(f"the fleet did not converge within {timeout}s: {held}")

    def logs(self) -> str:
        return "\n".join(agent.log() for agent in self.agents)

    def stop(self) -> None:
        for agent in self.agents:
            if agent.alive():
                assert agent.proc is not None
                agent.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for agent in self.agents:
            if agent.proc is None:
                continue
            try:
                agent.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait()


@contextmanager
def fleet_of(**kwargs: object) -> Iterator[Fleet]:
    fleet = Fleet(**kwargs)  # type: ignore[arg-type]
    try:
        yield fleet.start()
    finally:
        fleet.stop()


__all__ = ["Fleet", "FleetAgent", "fleet_of", "metric_samples"]
