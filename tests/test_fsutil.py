"""agent.fsutil.atomic_write: the one atomic writer of the file sink and the state store
(DESIGN §11 "atomic writes one function"), and its temp files."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.errors import SinkError
from agent.fsutil import NotDurable, atomic_write, remove_stale_temps, stale_temps
from agent.models import Secret, Token
from agent.state import StateStore
from tests.conftest import file_sink

OWN = f"{os.getpid() & 0xFFFFFFFF:08x}"


def _token(value: str = "tok-1") -> Token:
    now = datetime.now(UTC)
    return Token(
        access_token=Secret(value),
        token_type="bearer",
        expires_in=3600,
        obtained_at=now,
        expires_at=now + timedelta(seconds=3600),
    )


Writer = Callable[[Path], None]


def _sink_writes(path: Path) -> None:
    file_sink(path).write(_token())


def _state_writes(path: Path) -> None:
    StateStore(path.parent).save(path.name.removesuffix(".json"), "fp", _token())


WRITERS = pytest.mark.parametrize("write", [_sink_writes, _state_writes], ids=["sink", "state"])


def _renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every os.replace (source, destination), which still happens."""
    seen: list[tuple[str, str]] = []
    replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append((os.fspath(src), os.fspath(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    return seen


@WRITERS
def test_both_writers_use_one_temp_scheme_in_the_same_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Writer
) -> None:
    path = tmp_path / "p.json"
    renames = _renames(monkeypatch)
    write(path)
    [(src, _)] = [r for r in renames if r[1] == str(path)]
    temp = Path(src)
    assert temp.parent == path.parent
    assert re.fullmatch(rf"\.p\.json\.dvs-agent\.{OWN}[0-9a-f]{{8}}\.tmp", temp.name)
    assert not temp.exists() and path.exists()


def test_atomic_write_gives_mode_owner_and_group_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "f"
    old = os.umask(0o077)
    try:
        atomic_write(path, b"data", 0o640, uid=os.geteuid(), gid=os.getegid())
    finally:
        os.umask(old)
    info = os.lstat(path)
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert (info.st_uid, info.st_gid) == (os.geteuid(), os.getegid())
    assert path.read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["f"]


@WRITERS
@pytest.mark.parametrize("how", ["enospc", "zero-bytes"])
def test_a_full_disk_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Writer, how: str
) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(b"old")

    def full(fd: int, data: bytes | memoryview) -> int:
        if how == "zero-bytes":
            return 0  # a write that makes no progress must not loop for ever
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    try:
        write(path)
    except SinkError as exc:
        assert os.strerror(errno.ENOSPC) in str(exc)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["p.json"]


def test_atomic_write_raises_the_system_error_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError) as info:
        atomic_write(path, b"data", 0o600)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_a_directory_that_cannot_be_synced_is_reported_with_the_file_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    sink = file_sink(path)
    fsync = os.fsync

    def no_dir_sync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_dir_sync)
    with pytest.raises(NotDurable):
        atomic_write(tmp_path / "f", b"data", 0o600)
    assert (tmp_path / "f").read_bytes() == b"data"
    with pytest.raises(SinkError, match="could not fsync"):
        sink.write(_token())
    assert path.read_bytes() == b"tok-1"


def test_the_state_store_keeps_this_process_temp_files_and_removes_stale_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """prepare() removes temps left by a kill -9 (either scheme: this release's and the 12 hex
    digits of earlier ones), never one of this process (a write in flight)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ours = f".p.json.dvs-agent.{OWN}c0ffee00.tmp"
    stale = [
        ".p.json.dvs-agent.7fffffffdeadbeef.tmp",  # no such pid (above any pid_max)
        ".p.json.0123456789ab.tmp",
        ".key.a1b2c3d4e5f6.tmp",
    ]
    kept = [ours, "notes.tmp", ".p.json.dvs-agent.xyz.tmp"]
    for name in stale + kept:
        (state / name).write_bytes(b"partial")
    (state / ".q.json.dvs-agent.7ffffffffeedface.tmp").mkdir()  # not a file: left alone
    with caplog.at_level(logging.INFO):
        StateStore(state).prepare()
    names = set(os.listdir(state))
    assert names.isdisjoint(stale)
    assert set(kept) <= names
    assert ".q.json.dvs-agent.7ffffffffeedface.tmp" in names
    assert sum("removed stale temp file" in r.getMessage() for r in caplog.records) == 3


def _temp_of(pid: int, basename: str = "p.json") -> str:
    return f".{basename}.dvs-agent.{pid & 0xFFFFFFFF:08x}0badf00d.tmp"


def test_a_temp_of_another_live_process_is_kept_and_removed_once_it_is_gone(
    tmp_path: Path,
) -> None:
    """``check --connect`` prepares the state directory beside a running daemon: the daemon's
    write in flight (its pid in the temp name) is kept; once that process is gone the temp is
    stale and removed. A pid of 0 is never taken for a live process (kill(0) signals a group)."""
    writer = subprocess.Popen(["sleep", "60"])
    try:
        live = _temp_of(writer.pid)
        (tmp_path / live).write_bytes(b"partial")
        (tmp_path / _temp_of(0)).write_bytes(b"partial")
        assert stale_temps(tmp_path) == [tmp_path / _temp_of(0)]
        assert remove_stale_temps(tmp_path) == [tmp_path / _temp_of(0)]
        assert (tmp_path / live).exists()
    finally:
        writer.kill()
        writer.wait()
    assert remove_stale_temps(tmp_path) == [tmp_path / live]
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_a_temp_of_a_live_process_under_another_uid_is_kept(shared_dir: Path) -> None:
    """A process of another uid answers kill(pid, 0) with EPERM: it is alive, its temp kept."""
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop privileges")
    tmp_path = shared_dir  # traversable and readable by the unprivileged lister
    (tmp_path / _temp_of(os.getpid())).write_bytes(b"partial")  # this root process's
    dead = _temp_of(0x7FFFFFFF)
    (tmp_path / dead).write_bytes(b"partial")
    script = (
        "import sys; from pathlib import Path; from agent.fsutil import stale_temps; "
        "print([p.name for p in stale_temps(Path(sys.argv[1]))])"
    )
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    run = subprocess.run(
        [*argv, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == repr([dead])
