"""Unit tests of the pure parts: the schedule formula, backoff, redaction, env source, chain."""

from __future__ import annotations

import io
import logging
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.errors import (
    ConfigError,
    SourceEmpty,
    SourceUnavailable,
    most_severe,
)
from agent.logs import REDACTED, Redactor, setup_logging
from agent.models import Credentials, Secret, Token
from agent.policy import Timing
from agent.sources.chain import SourceChain
from agent.sources.env import EnvSource, EnvSourceConfig

H = timedelta(hours=1)
S = timedelta(seconds=1)


@pytest.mark.parametrize(
    ("lifetime", "margin", "expected"),
    [
        (timedelta(seconds=86399), 60 * S, timedelta(seconds=86399) * 0.9),  # 10 % rule wins
        (24 * H, 60 * S, 21.6 * H),
        (2 * H, 60 * S, 1.8 * H),
        (10 * 60 * S, 60 * S, 9 * 60 * S),  # margin = lifetime/10
        (300 * S, 60 * S, 240 * S),  # the margin wins
        (30 * S, 10 * S, 20 * S),
        (30 * S, 60 * S, 15 * S),  # shorter than the margin: half-life, no storm
        (5 * S, 60 * S, 2.5 * S),
        (1 * S, 60 * S, 1 * S),  # never sooner than 1 s
    ],
)
def test_refresh_delay(lifetime: timedelta, margin: timedelta, expected: timedelta) -> None:
    assert Timing(refresh_before_expiry=margin).refresh_delay(lifetime) == expected


def test_secret_never_shows_itself() -> None:
    secret = Secret("hunter2-value")
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{[secret]}"):
        assert "hunter2" not in text
    assert secret.reveal() == "hunter2-value"
    assert secret == Secret("hunter2-value") and secret != Secret("other")
    creds = Credentials("id", secret, source="env", version="1")
    assert "hunter2" not in repr(creds)
    now = datetime.now(UTC)
    token = Token(Secret("tok-abc-123"), "bearer", 60, now, now + 60 * S)
    assert "tok-abc-123" not in repr(token)


def test_fingerprint_is_keyed_and_hides_the_secret() -> None:
    creds = Credentials("id", Secret("the-secret"), source="env", version="1")
    a, b = creds.fingerprint(b"k1"), creds.fingerprint(b"k2")
    assert a != b and "the-secret" not in a
    other = Credentials("id", Secret("other"), source="env", version="1")
    assert other.fingerprint(b"k1") != a


def test_redactor_patterns_and_registered_values() -> None:
    redactor = Redactor()
    redactor.add("opaque-value-42")
    samples = [
        "Authorization: Basic c3ZjOnNlY3JldA==",
        "headers={'authorization': 'Bearer abc.def-ghi'}",
        "(b'Authorization', b'Basic c3ZjOnNlY3JldA==')",
        '{"access_token": "7dd4f350-676e-4257", "token_type": "bearer"}',
        "client_secret=abc123&grant_type=client_credentials",
        "value opaque-value-42 here",
    ]
    for sample in samples:
        out = redactor.redact(sample)
        assert REDACTED in out, sample
        for leaked in ("c3ZjOnNlY3JldA", "abc.def", "7dd4f350", "abc123", "opaque-value-42"):
            assert leaked not in out, (sample, out)


def test_redaction_applies_to_every_logger_and_exceptions() -> None:
    stream = io.StringIO()
    redactor = setup_logging("debug", "json", stream=stream)
    redactor.add("tok-very-secret")
    try:
        raise RuntimeError("failed with tok-very-secret inside")
    except RuntimeError:
        logging.getLogger("httpcore.http11").exception("send headers Bearer tok-very-secret")
    text = stream.getvalue()
    assert "tok-very-secret" not in text and REDACTED in text
    logging.getLogger().handlers.clear()


def test_most_severe() -> None:
    assert most_severe([0, 69, 77, 73]) == 77
    assert most_severe([69, 78, 77]) == 78
    assert most_severe([0, 0]) == 0
    assert most_severe([69, 73]) == 73


def test_env_source(tmp_path: Path) -> None:
    source = EnvSource(environ={"DVS_CLIENT_ID": "id", "DVS_CLIENT_SECRET": "s"})
    creds = source.read()
    assert (creds.client_id, creds.client_secret.reveal(), creds.source) == ("id", "s", "env")
    assert source.version() == creds.version
    secret_file = tmp_path / "s"
    secret_file.write_text("from-file\r\n")
    env = {"DVS_CLIENT_ID": "id", "DVS_CLIENT_SECRET_FILE": str(secret_file)}
    source = EnvSource(environ=env)
    before = source.version()
    assert source.read().client_secret.reveal() == "from-file"
    secret_file.write_text("rotated\n\n")
    assert source.version() != before
    assert source.read().client_secret.reveal() == "rotated\n"  # only one newline stripped
    with pytest.raises(SourceEmpty, match="DVS_CLIENT_ID"):
        EnvSource(environ={}).read()
    with pytest.raises(SourceEmpty, match="does not exist"):
        EnvSource(environ={"DVS_CLIENT_ID": "x", "DVS_CLIENT_SECRET_FILE": "/nonexistent"}).read()
    with pytest.raises(ConfigError, match="both"):
        EnvSource(environ={**env, "DVS_CLIENT_SECRET": "x"}).read()
    with pytest.raises(SourceEmpty, match="empty"):
        EnvSource(environ={"DVS_CLIENT_ID": "", "DVS_CLIENT_SECRET": "x"}).read()
    custom = EnvSource(
        EnvSourceConfig(client_id_var="A", client_secret_var="B"), environ={"A": "1", "B": "2"}
    )
    assert custom.read().client_id == "1"


def test_env_source_can_change_only_through_files(tmp_path: Path) -> None:
    direct = {"DVS_CLIENT_ID": "id", "DVS_CLIENT_SECRET": "s"}
    assert not EnvSource(environ=direct).can_change()  # nothing to poll
    for var in ("DVS_CLIENT_ID", "DVS_CLIENT_SECRET"):
        env = {k: v for k, v in direct.items() if k != var} | {f"{var}_FILE": str(tmp_path)}
        assert EnvSource(environ=env).can_change()
    custom = {"A": "1", "B_FILE": str(tmp_path)}
    assert EnvSource(
        EnvSourceConfig(client_id_var="A", client_secret_var="B"), environ=custom
    ).can_change()
    assert not EnvSource(
        EnvSourceConfig(client_secret_var="S"), environ={"DVS_CLIENT_SECRET_FILE": "/x"}
    ).can_change()


class _Fake:
    """A scripted source (unit test of the chain's logic only)."""

    def __init__(self, name: str, outcome: object, version: str = "v1") -> None:
        self.name, self.outcome, self._version = name, outcome, version

    def read(self) -> Credentials:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return Credentials("id", Secret(str(self.outcome)), source=self.name, version=self._version)

    def version(self) -> str:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self._version

    def can_change(self) -> bool:
        return self.name != "env"

    def close(self) -> None:
        pass


def test_chain_can_change_when_any_source_can() -> None:
    log = logging.getLogger("t")
    assert not SourceChain([_Fake("env", "s")], profile="p", logger=log).can_change()
    chain = SourceChain([_Fake("vault", "s"), _Fake("env", "s")], profile="p", logger=log)
    assert chain.can_change()


def test_chain_falls_back_and_reports(caplog: pytest.LogCaptureFixture) -> None:
    down = _Fake("vault", SourceUnavailable("vault down"))
    env = _Fake("env", "secret")
    chain = SourceChain([down, env], profile="p", logger=logging.getLogger("t"))
    with caplog.at_level(logging.WARNING):
        creds = chain.read()
    assert creds.source == "env" and chain.current == "env"
    assert "vault down" in caplog.text
    assert not chain.poll().changed
    down.outcome = "recovered"
    assert chain.poll().changed  # an earlier source answers again
    assert chain.read().source == "vault"
    env._version = "v2"
    assert not chain.poll().changed  # env is not the winner any more


def test_chain_errors() -> None:
    log = logging.getLogger("t")
    empty = SourceChain([_Fake("env", SourceEmpty("unset"))], profile="p", logger=log)
    with pytest.raises(SourceEmpty):
        empty.read()
    mixed = SourceChain(
        [_Fake("a", SourceUnavailable("down")), _Fake("b", SourceEmpty("unset"))],
        profile="p",
        logger=log,
    )
    with pytest.raises(SourceUnavailable, match="down"):
        mixed.read()
    with pytest.raises(ValueError):
        SourceChain([], profile="p", logger=log)


def test_backoff_jitter_stays_in_bounds() -> None:
    from agent.oauth import RetryPolicy

    policy = RetryPolicy()
    rng = random.Random(7)
    for retry in range(6):
        ceiling = min(8.0, 0.5 * 2**retry)
        for _ in range(50):
            assert ceiling / 2 <= policy.backoff(retry, rng) <= ceiling
    assert policy.backoff(0, rng) < 1  # the seed: start under a second


def test_the_one_backoff_doubles_caps_and_jitters() -> None:
    import random as _random

    from agent.retry import Backoff

    backoff = Backoff(first=2, cap=300, jitter=0.25)
    rng = _random.Random(7)
    assert [backoff.ceiling(n) for n in range(10)] == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    for n in range(12):
        assert 0.75 * backoff.ceiling(n) <= backoff.delay(n, rng) <= backoff.ceiling(n)
    assert backoff.ceiling(10**9) == 300  # no overflow, whatever the failure count
    assert backoff.ceiling(-1) == 2


@pytest.mark.parametrize("planted", ["fifo", "huge", "directory"])
def test_a_planted_secret_file_neither_blocks_nor_floods(tmp_path: Path, planted: str) -> None:
    """A FIFO, a 1 GB file or a directory in place of DVS_CLIENT_SECRET_FILE is an error at
    once (the read is non-blocking and bounded), never a hang or a 1 GB read."""
    import os
    import threading

    from agent.errors import SourceUnavailable

    path = tmp_path / "secret"
    if planted == "fifo":
        os.mkfifo(path)
    elif planted == "huge":
        with open(path, "wb") as handle:
            handle.truncate(1 << 30)  # sparse: nothing written
    else:
        path.mkdir()
    source = EnvSource(environ={"DVS_CLIENT_ID": "id", "DVS_CLIENT_SECRET_FILE": str(path)})
    errors: list[BaseException] = []

    def read() -> None:
        try:
            source.read()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "reading the planted file blocked"
    assert len(errors) == 1 and isinstance(errors[0], SourceUnavailable), errors
    assert str(path) in str(errors[0])
