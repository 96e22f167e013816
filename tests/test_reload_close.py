"""A reload that cannot apply a profile's new settings closes what it built for them.

In process: the daemon (``Agent.run``) on this thread, a SIGHUP from a helper thread, and a sink
kind of this module (registered as a built-in of a test registry) that counts its close() calls
and whose check fails on demand (DESIGN §5, §10: a reload leaks no connection or thread).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from agent.app import Agent
from agent.clock import ElapsedClock
from agent.config import load_config, parse_config
from agent.devserver import TokenServer
from agent.errors import ConfigError, SinkError
from agent.models import Token
from agent.oauth import TlsContexts
from agent.plugin import BuildContext, SinkKind, Target, Where
from agent.registry import BUILTIN_SINKS, Registry
from agent.state import StateStore
from agent.wiring import build_profile
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_for

pytestmark = pytest.mark.timeout(60)

#: close() calls by sink label
CLOSED: Counter[str] = Counter()
#: sinks built, by label
BUILT: Counter[str] = Counter()


class CountingConfig(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
    tag="counting",
    tag_field="type",
):
    label: str
    #: check() raises SinkError
    broken: bool = False


class CountingSink:
    readiness = False

    def __init__(self, config: CountingConfig) -> None:
        self.name = f"counting:{config.label}"
        self._config = config
        BUILT[config.label] += 1

    def check(self) -> None:
        if self._config.broken:
            raise SinkError(f"{self.name}: cannot be written (on purpose)")

    def write(self, token: Token) -> None:
        pass

    def settle(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        CLOSED[self._config.label] += 1


class CountingKind(SinkKind[CountingConfig]):
    name = "counting"
    config_type = CountingConfig

    def describe(self, config: CountingConfig, where: Where) -> str:
        return f"counting {config.label}"

    def targets(self, config: CountingConfig, where: Where) -> Iterator[Target]:
        yield Target(
            store="counting",
            identity=(config.label,),
            what=config.label,
            key=where.at("label"),
        )

    def build(self, config: CountingConfig, context: BuildContext) -> CountingSink:
        return CountingSink(config)


KIND = CountingKind()


def _write(directory: Path, url: str, profiles: dict[str, tuple[str, bool]]) -> Path:
    """``profiles``: name → (the counting sink's label, whether its check fails); each also
    has a file sink ``directory/<name>``."""
    parts = [f'[agent]\nstate_dir = "{directory}/state"\n', '[health]\nlisten = ""\n']
    for name, (label, broken) in profiles.items():
        parts.append(
            f"""
[profiles.{name}]
token_url = "{url}"
[profiles.{name}.rotation]
poll_interval = "0"
[[profiles.{name}.sinks]]
type = "file"
path = "{directory}/{name}"
[[profiles.{name}.sinks]]
type = "counting"
label = "{label}"
broken = {str(broken).lower()}
"""
        )
    path = directory / "agent.toml"
    path.write_text("\n".join(parts))
    return path


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(str(getattr(record, "event", "")))


def test_a_profile_rebuilt_at_reload_whose_sink_check_fails_is_closed(
    tmp_path: Path,
) -> None:
    CLOSED.clear()
    BUILT.clear()
    registry = Registry(sinks={**BUILTIN_SINKS, "counting": f"{__name__}:KIND"})
    logger = logging.getLogger("test.reload_close")
    lines = Lines()
    logger.addHandler(lines)
    env = {"DVS_CLIENT_ID": CLIENT_ID, "DVS_CLIENT_SECRET": CLIENT_SECRET}
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, expires_in=3600) as server:
        path = _write(tmp_path, server.url, {"kept": ("first", False)})
        agent = Agent(
            load_config(path, registry=registry),
            config_path=path,
            environ=env,
            logger=logger,
            registry=registry,
        )
        failures: list[str] = []

        def drive() -> None:
            try:
                if not wait_for(lambda: (tmp_path / "kept").exists(), timeout=20):
                    failures.append("no first token")
                    return
                # kept: changed, its new sink cannot be written; added: the same, new profile
                _write(
                    tmp_path,
                    server.url,
                    {"kept": ("second", True), "added": ("third", True)},
                )
                os.kill(os.getpid(), signal.SIGHUP)
                if not wait_for(lambda: lines.events.count("reload_failed") == 2, timeout=20):
                    failures.append(f"no reload_failed: {lines.events}")
                    return
                if not wait_for(lambda: CLOSED["second"] and CLOSED["third"], timeout=5):
                    failures.append(f"not closed: {dict(CLOSED)}")
            finally:
                agent.stop()

        helper = threading.Thread(target=drive, daemon=True)
        helper.start()
        try:
            result = agent.run()
        finally:
            helper.join(10)
            logger.removeHandler(lines)
    assert not failures, failures
    assert result.code == 0 and result.clean
    assert BUILT == {"first": 1, "second": 1, "third": 1}
    # the settings that could not be applied were closed at once, what ran before at the stop
    assert CLOSED == {"first": 1, "second": 1, "third": 1}
    assert set(agent.profiles) == {"kept"}


def test_a_profile_whose_token_client_cannot_be_built_closes_its_sinks(tmp_path: Path) -> None:
    """A CA bundle that can be read but holds no certificate: a config error naming the key,
    and the sinks built before it are closed (at start and at a reload alike)."""
    CLOSED.clear()
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    registry = Registry(sinks={**BUILTIN_SINKS, "counting": f"{__name__}:KIND"})
    config = parse_config(
        f"""
[agent]
state_dir = "{tmp_path}/state"
[profiles.p]
token_url = "https://auth.example/v1/oauth/token"
ca_bundle = "{bundle}"
[[profiles.p.sinks]]
type = "counting"
label = "built"
""",
        registry=registry,
    )
    with pytest.raises(ConfigError, match=r"profiles\.p\.ca_bundle"):
        build_profile(
            "p",
            config.profiles["p"],
            environ={"DVS_CLIENT_ID": CLIENT_ID, "DVS_CLIENT_SECRET": CLIENT_SECRET},
            store=StateStore(tmp_path / "state"),
            clock=ElapsedClock(),
            tls=TlsContexts(),
            stopping=threading.Event(),
            redactor=None,
            logger=logging.getLogger("test.reload_close"),
            metrics=None,
            registry=registry,
        )
    assert CLOSED == {"built": 1}
