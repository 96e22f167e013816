"""The file sink on real files, with real processes (DESIGN §4, §9).

Permission tests run the sink as an unprivileged user (``setpriv`` to uid/gid 65534 when the
tests run as root, as CI does), because root passes every permission check.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from agent.errors import SinkError
from agent.masking import MASK
from agent.models import Secret, Token
from agent.plugin import TokenSink
from agent.sinks.file import FileSink, render
from tests.conftest import file_sink, hour_token

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
TMP_NAME = re.compile(r"\..+\.dvs-agent\.[0-9a-f]{16}\.tmp")
TOKEN_VALUE = "tok-1"


def make_token(value: str = TOKEN_VALUE) -> Token:
    return hour_token(value, scope="read write", extensions={"provider_slug": "br-gamma"})


def subprocess_env() -> dict[str, str]:
    """This environment, with the checkout first on the import path."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if TMP_NAME.fullmatch(name))


def file_mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def token() -> Token:
    return make_token()


# -- render ---------------------------------------------------------------------------------


def test_raw_is_the_token_alone_without_newline(token: Token) -> None:
    assert render(token, "raw") == b"tok-1"


def test_json_is_the_token_document_and_round_trips(token: Token) -> None:
    data = render(token, "json")
    assert data == msgspec.json.encode(token.document()) + b"\n"
    doc = msgspec.json.decode(data)
    assert doc == token.document()
    assert set(doc) == {
        "access_token", "token_type", "expires_in", "expires_at", "obtained_at", "scope",
        "provider_slug", "extensions",
    }  # fmt: skip
    assert doc["access_token"] == "tok-1"
    assert doc["provider_slug"] == "br-gamma"
    for key, moment in (("expires_at", token.expires_at), ("obtained_at", token.obtained_at)):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc[key])
        assert datetime.fromisoformat(doc[key]) == moment.replace(microsecond=0)


def test_env_exact_bytes_and_lowercased_token_type() -> None:
    at = datetime(2026, 11, 28, 16, 27, 29, 123456, tzinfo=UTC)
    token = Token(
        access_token=Secret("tok-1"),
        token_type="Bearer",
        expires_in=86399,
        obtained_at=at - timedelta(seconds=86399),
        expires_at=at,
    )
    assert render(token, "env") == (
        b"DVS_ACCESS_TOKEN=tok-1\n"
        b"DVS_TOKEN_TYPE=bearer\n"
        b"DVS_TOKEN_EXPIRES_AT=2026-11-28T16:27:29Z\n"
    )


def test_env_parses_as_key_value_lines(token: Token) -> None:
    lines = render(token, "env").decode().splitlines()
    pairs = dict(line.split("=", 1) for line in lines)
    assert len(lines) == 3
    assert all(re.fullmatch(r"[A-Z_]+=\S+", line) for line in lines)
    assert pairs["DVS_ACCESS_TOKEN"] == "tok-1"
    assert pairs["DVS_TOKEN_TYPE"] == "bearer"
    assert datetime.fromisoformat(pairs["DVS_TOKEN_EXPIRES_AT"]) == token.expires_at.replace(
        microsecond=0
    )


def test_env_refuses_a_token_that_would_break_the_file() -> None:
    with pytest.raises(SinkError) as info:
        render(make_token("abc\nEVIL=1"), "env")
    assert "abc" not in str(info.value)


# -- writing --------------------------------------------------------------------------------


def test_satisfies_the_protocol_and_names_itself(tmp_path: Path) -> None:
    sink: TokenSink = file_sink(tmp_path / "token")
    assert sink.name == f"file:{tmp_path / 'token'}"


@pytest.mark.parametrize("fmt", ["raw", "json", "env"])
def test_write_puts_each_format_on_disk(tmp_path: Path, token: Token, fmt: str) -> None:
    path = tmp_path / "token"
    sink = file_sink(path, fmt=fmt)  # type: ignore[arg-type]
    sink.check()
    sink.write(token)
    assert path.read_bytes() == render(token, fmt)  # type: ignore[arg-type]
    assert temp_files(tmp_path) == []
    sink.close()
    assert path.exists()  # files stay in place on exit


def test_mode_applied_on_create_regardless_of_umask(tmp_path: Path, token: Token) -> None:
    path = tmp_path / "token"
    old = os.umask(0o077)
    try:
        sink = file_sink(path, mode=0o644)
        sink.check()
        sink.write(token)
    finally:
        os.umask(old)
    assert file_mode(path) == 0o644


def test_mode_reapplied_when_the_file_exists_with_another_mode(
    tmp_path: Path, token: Token
) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"old")
    os.chmod(path, 0o666)  # noqa: S103 (a mode the sink must correct)
    sink = file_sink(path)
    sink.check()
    sink.write(token)
    assert file_mode(path) == 0o640
    assert path.read_bytes() == b"tok-1"
    os.chmod(path, 0o604)
    sink.write(make_token("tok-2"))
    assert file_mode(path) == 0o640
    assert path.read_bytes() == b"tok-2"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
@pytest.mark.parametrize("by_name", [False, True], ids=["numeric", "name"])
def test_owner_and_group_applied_at_every_write(
    tmp_path: Path, token: Token, by_name: bool
) -> None:
    owner = pwd.getpwuid(NOBODY).pw_name if by_name else str(NOBODY)
    group = grp.getgrgid(NOBODY).gr_name if by_name else str(NOBODY)
    path = tmp_path / "new" / "token"
    sink = file_sink(path, owner=owner, group=group)
    sink.check()
    sink.write(token)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert file_mode(path) == 0o640
    # a created directory carries the group, so its members can reach the file
    assert os.stat(path.parent).st_gid == NOBODY
    os.chown(path, 0, 0)
    sink.write(token)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


@pytest.mark.parametrize("key", ["owner", "group"])
def test_unknown_owner_or_group_name_is_refused_at_check(tmp_path: Path, key: str) -> None:
    sink = file_sink(tmp_path / "token", **{key: "no-such-dvs-name"})  # type: ignore[arg-type]
    with pytest.raises(SinkError, match=rf"\b{key}\b"):
        sink.check()
    assert not (tmp_path / "token").exists()


def test_missing_parent_directories_are_created_0750(tmp_path: Path, token: Token) -> None:
    path = tmp_path / "a" / "b" / "token"
    old = os.umask(0o077)
    try:
        file_sink(path).check()
    finally:
        os.umask(old)
    assert file_mode(tmp_path / "a") == 0o750
    assert file_mode(tmp_path / "a" / "b") == 0o750
    assert not path.exists()  # check writes nothing
    file_sink(path).write(token)
    assert path.read_bytes() == b"tok-1"


def test_write_recreates_a_directory_removed_after_check(tmp_path: Path, token: Token) -> None:
    path = tmp_path / "run" / "token"
    sink = file_sink(path)
    sink.check()
    shutil.rmtree(tmp_path / "run")
    sink.write(token)
    assert path.read_bytes() == b"tok-1"


def test_symlink_at_the_path_is_refused_at_check_and_write(tmp_path: Path, token: Token) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    path = tmp_path / "token"
    path.symlink_to(target)
    sink = file_sink(path)
    with pytest.raises(SinkError, match="symlink") as info:
        sink.check()
    assert str(path) in str(info.value)
    with pytest.raises(SinkError, match="symlink"):
        sink.write(token)
    assert path.is_symlink()
    assert target.read_bytes() == b"untouched"
    assert temp_files(tmp_path) == []


def test_symlink_appearing_after_check_is_refused_at_write(tmp_path: Path, token: Token) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    path = tmp_path / "token"
    sink = file_sink(path)
    sink.check()
    sink.write(token)
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(SinkError, match="symlink"):
        sink.write(make_token("tok-2"))
    assert target.read_bytes() == b"untouched"
    assert path.is_symlink()


def test_a_directory_at_the_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir()
    with pytest.raises(SinkError, match="not a regular file"):
        file_sink(tmp_path / "token").check()


def test_stale_temp_files_removed_at_check_and_unrelated_kept(tmp_path: Path) -> None:
    stale = [".token.dvs-agent.0123456789abcdef.tmp", ".token.dvs-agent.fedcba9876543210.tmp"]
    kept = [
        ".token.dvs-agent.xyz.tmp",  # not our random part
        ".token.env.dvs-agent.0123456789abcdef.tmp",  # another sink's (token.env)
        ".other.dvs-agent.0123456789abcdef.tmp",
        "token.dvs-agent.0123456789abcdef.tmp",  # no leading dot
        ".token.dvs-agent.0123456789abcdef.tmp.bak",
        ".token.swp",
        "token.bak",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    file_sink(tmp_path / "token").check()
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_failed_write_removes_temp_and_keeps_old_file(
    tmp_path: Path, token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    sink = file_sink(path)
    sink.write(make_token("old-token"))

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(SinkError) as info:
        sink.write(token)
    message = str(info.value)
    assert str(path) in message
    assert os.strerror(errno.EIO) in message
    assert TOKEN_VALUE not in message
    assert path.read_bytes() == b"old-token"
    assert temp_files(tmp_path) == []


# -- as an unprivileged user --------------------------------------------------------------

UNPRIVILEGED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from datetime import UTC, datetime, timedelta
    from pathlib import Path
    from agent.errors import SinkError
    from agent.models import Secret, Token
    from agent.sinks.file import FileSink, FileSinkConfig

    path, action, owner = Path(sys.argv[1]), sys.argv[2], sys.argv[3] or None
    now = datetime.now(UTC)
    token = Token(access_token=Secret("tok-1"), token_type="bearer", expires_in=3600,
                  obtained_at=now, expires_at=now + timedelta(seconds=3600))
    sink = FileSink(FileSinkConfig(path=str(path), owner=owner))
    try:
        sink.check() if action == "check" else sink.write(token)
    except SinkError as exc:
        print(json.dumps({"uid": os.geteuid(), "error": str(exc)}))
    else:
        print(json.dumps({"uid": os.geteuid(), "error": None}))
    """
)


def run_unprivileged(path: Path, action: str, owner: str = "") -> tuple[int, str | None]:
    """Run check() or write() on ``path`` as an unprivileged user: (its uid, SinkError text)."""
    argv = [sys.executable, "-c", UNPRIVILEGED_SCRIPT, str(path), action, owner]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux): cannot drop privileges")
        argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    env = subprocess_env()
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd="/", env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    result = msgspec.json.decode(done.stdout.strip().splitlines()[-1])
    assert result["uid"] != 0
    return result["uid"], result["error"]


def unprivileged_dir(base: Path, name: str) -> Path:
    """A directory the unprivileged user owns (and can write)."""
    directory = base / name
    directory.mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(directory, NOBODY, NOBODY)
    return directory


def test_unprivileged_user_can_use_a_writable_directory(shared_dir: Path) -> None:
    # the control for the tests below: the harness works and the sink succeeds
    path = unprivileged_dir(shared_dir, "rw") / "token"
    _, error = run_unprivileged(path, "check")
    assert error is None
    _, error = run_unprivileged(path, "write")
    assert error is None
    assert path.read_bytes() == b"tok-1"


def test_unwritable_directory_fails_at_check(shared_dir: Path) -> None:
    directory = shared_dir / "ro"
    directory.mkdir()
    os.chmod(directory, 0o555)  # noqa: S103 (read-only on purpose)
    path = directory / "token"
    uid, error = run_unprivileged(path, "check")
    assert error is not None
    assert str(path) in error
    assert "permission denied" in error.lower()
    assert f"uid {uid}" in error
    assert "sinks.path" in error
    assert os.listdir(directory) == []


def test_uncreatable_parent_directory_fails_at_check(shared_dir: Path) -> None:
    directory = shared_dir / "ro"
    directory.mkdir()
    os.chmod(directory, 0o555)  # noqa: S103 (read-only on purpose)
    path = directory / "sub" / "token"
    _, error = run_unprivileged(path, "check")
    assert error is not None
    assert str(path) in error
    assert "permission denied" in error.lower()
    assert not (directory / "sub").exists()


def test_unpermitted_owner_fails_at_check_and_write_leaves_nothing(shared_dir: Path) -> None:
    directory = unprivileged_dir(shared_dir, "rw")
    path = directory / "token"
    _, error = run_unprivileged(path, "check", owner="0")
    assert error is not None
    assert "owner" in error
    assert str(path) in error
    assert "not permitted" in error
    _, error = run_unprivileged(path, "write", owner="0")
    assert error is not None
    assert TOKEN_VALUE not in error
    assert os.listdir(directory) == []


# -- atomicity under kill -9 --------------------------------------------------------------

WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime, timedelta
    from pathlib import Path
    from agent.models import Secret, Token
    from agent.sinks.file import FileSink, FileSinkConfig

    now = datetime.now(UTC)
    tokens = [
        Token(access_token=Secret(value), token_type="bearer", expires_in=3600,
              obtained_at=now, expires_at=now + timedelta(seconds=3600))
        for value in sys.argv[2:]
    ]
    sink = FileSink(FileSinkConfig(path=sys.argv[1]))
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    i = 0
    while True:
        sink.write(tokens[i % 2])
        i += 1
    """
)


def test_readers_never_see_a_partial_file_when_the_writer_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    contents = ("A" * 3000, "b" * 7000)
    expected = {value.encode() for value in contents}
    sink = file_sink(path)
    sink.check()
    sink.write(make_token(contents[0]))

    stop = threading.Event()
    bad: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                data = path.read_bytes()
            except OSError as exc:
                bad.append(repr(exc))
                continue
            reads += 1
            if data not in expected:
                bad.append(f"{len(data)} bytes")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    env = subprocess_env()
    left_behind = 0
    try:
        for _ in range(30):
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER_SCRIPT, str(path), *contents],
                stdout=subprocess.PIPE,
                env=env,
            )
            assert writer.stdout is not None
            assert writer.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.03))
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            writer.stdout.close()
            assert writer.returncode == -signal.SIGKILL
            left_behind += len(temp_files(tmp_path))
            file_sink(path).check()
            assert temp_files(tmp_path) == []
    finally:
        stop.set()
        thread.join(timeout=5)
    assert bad == [], f"seed {seed}: bad reads {bad[:5]}"
    assert reads > 0
    assert path.read_bytes() in expected
    print(f"seed {seed}: {reads} reads, {left_behind} temp files left by kills and removed")


# -- on_change ------------------------------------------------------------------------------


def py_hook(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def write_and_wait(sink: FileSink, token: Token) -> None:
    """on_change runs beside write(): wait for its run to be reported."""
    sink.write(token)
    assert sink.settle(30)


def test_on_change_runs_after_write_with_token_file_set(
    tmp_path: Path, token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "token"
    marker = tmp_path / "marker"
    hook = py_hook(
        """
        import os, sys
        name = os.environ["DVS_TOKEN_FILE"]
        with open(name) as f:
            seen = f.read()
        with open(sys.argv[1], "w") as f:
            f.write(name + "|" + seen + "|" + str(sys.stdin.read() == ""))
        """,
        str(marker),
    )
    sink = file_sink(path, fmt="json", on_change=hook)
    sink.check()
    write_and_wait(sink, token)
    name, seen, stdin_empty = marker.read_text().split("|")
    assert name == str(path)
    assert seen.encode() == render(token, "json")  # it ran after the file was in place
    assert stdin_empty == "True"
    assert warnings_of(caplog) == []
    assert TOKEN_VALUE not in caplog.text


def test_on_change_not_run_when_write_fails(tmp_path: Path, token: Token) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "token"
    path.symlink_to(tmp_path / "target")
    sink = file_sink(path, on_change=["touch", str(marker)])
    with pytest.raises(SinkError):
        sink.write(token)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("argv", "exit_code", "last_line"),
    [
        (["sh", "-c", "echo first >&2; echo 'reload: unit not found' >&2; exit 3"], 3,
         "reload: unit not found"),
        (["false"], 1, "(no stderr)"),
    ],
    ids=["exit-3", "false"],
)  # fmt: skip
def test_on_change_failure_is_logged_not_raised(
    tmp_path: Path,
    token: Token,
    caplog: pytest.LogCaptureFixture,
    argv: list[str],
    exit_code: int,
    last_line: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "token"
    write_and_wait(file_sink(path, on_change=argv), token)
    assert path.read_bytes() == b"tok-1"
    [message] = warnings_of(caplog)
    assert argv[0] in message
    assert f"exit code {exit_code}" in message
    assert message.endswith(last_line)
    assert "first" not in message
    assert TOKEN_VALUE not in caplog.text


def test_on_change_missing_executable_is_logged_not_raised(
    tmp_path: Path, token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "token"
    write_and_wait(file_sink(path, on_change=["/nonexistent/dvs-reload", "now"]), token)
    assert path.read_bytes() == b"tok-1"
    [message] = warnings_of(caplog)
    assert "/nonexistent/dvs-reload" in message
    assert "not found" in message


def test_on_change_timeout_kills_it_and_returns_quickly(
    tmp_path: Path, token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "token"
    sink = file_sink(path, on_change=["sleep", "10"], on_change_timeout=0.5)
    started = time.monotonic()
    write_and_wait(sink, token)
    assert time.monotonic() - started < 3
    [message] = warnings_of(caplog)
    assert "sleep" in message
    assert "timed out" in message
    assert f"exit code {-signal.SIGKILL}" in message


def test_on_change_timeout_kills_its_children_too(
    tmp_path: Path, token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    # a background child keeps stderr open: without killing the group, write() would hang
    pid_file = tmp_path / "pid"
    hook = ["sh", "-c", f"sleep 10 & echo $! > {pid_file}; wait"]
    sink = file_sink(tmp_path / "token", on_change=hook, on_change_timeout=0.5)
    started = time.monotonic()
    write_and_wait(sink, token)
    assert time.monotonic() - started < 3
    assert "timed out" in warnings_of(caplog)[0]
    stat_file = Path(f"/proc/{int(pid_file.read_text())}/stat")
    deadline = time.monotonic() + 2
    while stat_file.exists() and time.monotonic() < deadline:
        # the orphan is killed; it may linger as a zombie until its new parent reaps it
        if stat_file.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        assert not stat_file.exists()


def test_on_change_stderr_is_truncated_and_never_shows_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-" + "x" * 40
    hook = ["sh", "-c", 'printf "bad token %s %0300d\\n" "$(cat "$DVS_TOKEN_FILE")" 0 >&2; exit 2']
    path = tmp_path / "token"
    write_and_wait(file_sink(path, on_change=hook), make_token(secret))
    assert path.read_text() == secret
    [message] = warnings_of(caplog)
    assert "exit code 2" in message
    assert f"bad token {MASK}" in message
    tail = message.split(": ", 2)[-1]
    assert len(tail) == 201
    assert tail.endswith("…")
    assert secret not in caplog.text


def test_on_change_uses_the_given_logger(tmp_path: Path, token: Token) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.file_sink.custom")
    logger.addHandler(Keep())
    logger.setLevel(logging.DEBUG)
    write_and_wait(file_sink(tmp_path / "token", on_change=["false"], logger=logger), token)
    assert any(r.levelno == logging.WARNING and "false" in r.getMessage() for r in records)
    assert all(TOKEN_VALUE not in r.getMessage() for r in records)
