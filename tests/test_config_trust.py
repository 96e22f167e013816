"""Config rules of DESIGN §10: profile names ≤ 64 characters, on_change_timeout ≤ 5 m, and the
warnings about a config file that others than root and the agent can change.

Ownership is tested as root with files chowned to uid 65534, and as uid 65534 through
``setpriv`` (the tests run as root in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import config_file_warnings, load_config, parse_config
from agent.errors import ConfigError
from agent.models import Secret, Token
from agent.state import StateStore

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
HOOK = '["systemctl", "reload", "my-app"]'
OTHER_HOOK = '["/usr/local/bin/notify", "--token changed"]'

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def config_text(name: str = "dvs", sink: str = "") -> str:
    return f'[profiles.{name}]\n[[profiles.{name}.sinks]]\npath = "/run/dvs-agent/token"\n{sink}\n'


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="agent.toml")
    return str(info.value)


# ------------------------------------------------------------------------------ profile names


def test_a_64_character_profile_name_is_accepted_and_can_save_state(tmp_path: Path) -> None:
    name = "p" * 63 + "9"
    config = parse_config(config_text(name))
    assert list(config.profiles) == [name]
    # the state file of the longest name fits a file name (255 bytes) with room to spare
    store = StateStore(tmp_path / "state")
    store.prepare()
    now = datetime.now(UTC)
    token = Token(Secret("tok"), "bearer", 60, now, now + timedelta(seconds=60))
    store.save(name, "fp", token)
    assert store.load(name, "fp") is not None


@pytest.mark.parametrize("length", [65, 300])
def test_a_longer_profile_name_is_a_config_error_naming_the_key(length: int) -> None:
    name = "p" * length
    message = error_of(config_text(name))
    assert message == (
        f"agent.toml: profiles.{name}: the profile name is {length} characters long, at most 64 "
        "are allowed (it names the state file NAME.json, metric labels and keys): choose a "
        "shorter name"
    )


def test_a_long_quoted_profile_name_is_named_as_typed() -> None:
    name = "a." * 40  # 80 characters, valid characters, a dotted (quoted) TOML key
    message = error_of(config_text(f'"{name}"'))
    assert f'profiles."{name}": the profile name is 80 characters long' in message


# -------------------------------------------------------------------------- on_change_timeout


@pytest.mark.parametrize("value", ['"5m"', "300", '"299s"', '"4m59s"', '"300000ms"'])
def test_on_change_timeout_up_to_5_minutes_is_accepted(value: str) -> None:
    config = parse_config(config_text(sink=f"on_change = {HOOK}\non_change_timeout = {value}"))
    sink = config.profiles["dvs"].sinks[0]
    assert sink.on_change_timeout <= timedelta(minutes=5)  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ['"6m"', "301", '"5m1s"', '"1h"', '"300001ms"'])
def test_on_change_timeout_over_5_minutes_is_a_config_error(value: str) -> None:
    message = error_of(config_text(sink=f"on_change = {HOOK}\non_change_timeout = {value}"))
    assert message.startswith(
        "agent.toml: profiles.dvs.sinks[0].on_change_timeout: must be at most 5 minutes"
    )


def test_on_change_timeout_of_0_is_still_refused() -> None:
    message = error_of(config_text(sink='on_change_timeout = "0s"'))
    assert message == "agent.toml: profiles.dvs.sinks[0].on_change_timeout: must be more than 0"


# -------------------------------------------------------------------- config_file_warnings


def write(path: Path, text: str, mode: int, uid: int | None = None) -> Path:
    path.write_text(text)
    path.chmod(mode)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def two_hooks() -> str:
    return (
        config_text(sink=f"on_change = {HOOK}")
        + "[[profiles.dvs.sinks]]\n"
        + 'path = "/run/dvs-agent/token.json"\nformat = "json"\n'
        + config_text("other", sink=f"on_change = {OTHER_HOOK}").replace(
            "/run/dvs-agent/token", "/run/dvs-agent/other"
        )
    )


def test_a_world_writable_config_is_a_warning_naming_every_hook(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", two_hooks(), 0o666)
    (warning,) = config_file_warnings(path, load_config(path))
    euid = os.geteuid()
    assert warning.startswith(f"{path}: the config file (mode 0666, owner uid {euid}")
    assert "is writable by group and others" in warning
    assert f"the commands the agent runs as uid {euid}" in warning
    assert f"profiles.dvs.sinks[0].on_change = {HOOK}" in warning
    assert f"profiles.other.sinks[0].on_change = {OTHER_HOOK}" in warning
    assert "sinks[1]" not in warning  # the json sink has no hook
    assert warning.endswith(f"chmod go-w {path}")


def test_a_group_writable_config_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", config_text(sink=f"on_change = {HOOK}"), 0o660)
    (warning,) = config_file_warnings(path, load_config(path))
    assert "(mode 0660," in warning and "is writable by group:" in warning
    assert HOOK in warning


def test_a_warning_without_hooks_says_what_is_at_stake(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", config_text(), 0o646)
    (warning,) = config_file_warnings(path, load_config(path))
    assert "is writable by others:" in warning
    assert "decides where tokens are written, and could add an on_change command" in warning


@as_root
def test_a_config_owned_by_another_uid_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", config_text(sink=f"on_change = {HOOK}"), 0o644, NOBODY)
    (warning,) = config_file_warnings(path, load_config(path))
    assert warning.startswith(f"{path}: the config file (mode 0644, owner uid {NOBODY}")
    assert f"is owned by uid {NOBODY}, not by root or the agent (uid 0)" in warning
    assert f"profiles.dvs.sinks[0].on_change = {HOOK}" in warning
    assert warning.endswith(f"chown root {path}")


@as_root
def test_owned_by_another_uid_and_writable_names_both_fixes(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", config_text(), 0o664, NOBODY)
    (warning,) = config_file_warnings(path, load_config(path))
    assert "is writable by group and is owned by uid 65534" in warning
    assert warning.endswith(f"chown root {path} && chmod go-w {path}")


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o644, 0o400])
def test_a_config_of_root_or_the_agent_not_writable_by_others_is_fine(
    tmp_path: Path, mode: int
) -> None:
    # as root (CI) this is the root-owned file; as another user it is the agent's own
    path = write(tmp_path / "agent.toml", config_text(sink=f"on_change = {HOOK}"), mode)
    assert path.stat().st_uid == os.geteuid()
    assert config_file_warnings(path, load_config(path)) == []


def test_a_directory_others_can_write_is_a_warning(tmp_path: Path) -> None:
    directory = tmp_path / "etc"
    directory.mkdir()
    directory.chmod(0o777)  # not sticky: anyone may replace agent.toml
    path = write(directory / "agent.toml", config_text(sink=f"on_change = {HOOK}"), 0o640)
    (warning,) = config_file_warnings(path, load_config(path))
    assert warning.startswith(f"{path}: the config file's directory {directory} (mode 0777")
    assert "can replace the file" in warning and HOOK in warning
    assert warning.endswith(f"chmod go-w {directory}")
    directory.chmod(0o1777)  # sticky, like /tmp: others cannot replace a file they do not own
    assert config_file_warnings(path, load_config(path)) == []


def test_the_directory_of_a_symlinks_target_counts(tmp_path: Path) -> None:
    real = tmp_path / "shared"
    real.mkdir()
    real.chmod(0o777)
    target = write(real / "agent.toml", config_text(), 0o640)
    safe = tmp_path / "etc"
    safe.mkdir(mode=0o755)
    link = safe / "agent.toml"
    link.symlink_to(target)
    (warning,) = config_file_warnings(link, load_config(link))
    assert warning.startswith(f"{link}: the config file's directory {real} (mode 0777")


def test_a_missing_file_gives_no_warning(tmp_path: Path) -> None:
    config = parse_config(config_text())
    assert config_file_warnings(tmp_path / "gone.toml", config) == []


UNPRIVILEGED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from agent.config import config_file_warnings, load_config
    result = {}
    for name in sys.argv[1:]:
        path = Path(name)
        result[name] = config_file_warnings(path, load_config(path))
    print(json.dumps({"uid": os.geteuid(), "warnings": result}))
    """
)


@as_root
def test_as_an_unprivileged_agent_root_and_own_files_are_fine(shared_dir: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop privileges")
    text = config_text(sink=f"on_change = {HOOK}")
    own = write(shared_dir / "own.toml", text, 0o640, NOBODY)
    rooted = write(shared_dir / "root.toml", text, 0o644)
    other = write(shared_dir / "other.toml", text, 0o644, 1000)
    argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    argv += [sys.executable, "-c", UNPRIVILEGED_SCRIPT, str(own), str(rooted), str(other)]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["uid"] == NOBODY
    warnings = result["warnings"]
    assert warnings[str(own)] == [] and warnings[str(rooted)] == []
    (warning,) = warnings[str(other)]
    assert f"is owned by uid 1000, not by root or the agent (uid {NOBODY})" in warning
    assert f"the commands the agent runs as uid {NOBODY}: profiles.dvs.sinks[0]" in warning


def test_run_and_once_warn_about_a_world_writable_config_at_start(tmp_path: Path) -> None:
    from agent.devserver import TokenServer
    from tests.conftest import CLIENT_ID, CLIENT_SECRET, run_cli, write_config

    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        config = write_config(tmp_path, server.url)
        config.chmod(0o666)
        result = run_cli("once", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "config_trust" in result.stderr and "chmod go-w" in result.stderr
