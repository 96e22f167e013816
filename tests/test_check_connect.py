"""``dvs-agent check --connect`` proves what it says: one token request per profile, recorded in
state_dir so that the first start reuses it (no request), never printed; a 401 exits 77 like
``once``; ``--user NAME`` checks the file sinks' directories and state_dir as that user, leaving
nothing behind. Real processes against the token test server (agent/devserver.py)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from agent.devserver import TokenServer
from tests.conftest import Spawn, agent_env, run_cli, wait_for, write_config

SECOND_PROFILE = """
[profiles.other]
token_url = "{url}"

[[profiles.other.sinks]]
type = "file"
path = "{directory}/other-token"
"""

NOBODY = 65534


def _tree(base: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``base`` with its owner and mode (what a check may not change)."""
    found = {}
    for directory, dirs, files in os.walk(base):
        for name in dirs + files:
            path = Path(directory, name)
            info = path.lstat()
            found[str(path.relative_to(base))] = (info.st_uid, info.st_mode)
    return found


def test_one_request_per_profile_recorded_and_reused_by_run(
    server: TokenServer, tmp_path: Path, spawn: Spawn
) -> None:
    config = write_config(tmp_path, server.url)
    with config.open("a") as handle:
        handle.write(SECOND_PROFILE.format(url=server.url, directory=tmp_path))

    result = run_cli("check", "--connect", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(server.token_requests()) == 2  # one per profile
    issued = server.issued()
    assert len(issued) == 2
    for token in issued:
        assert token not in result.stdout + result.stderr
    for name in ("dvs", "other"):
        assert f"{name}: every sink is writable" in result.stdout
        assert f"{name}: token obtained" in result.stdout
        assert (tmp_path / "state" / f"{name}.json").exists()
    assert "expires 20" in result.stdout
    assert f"recorded in {tmp_path / 'state'}" in result.stdout
    # check writes no sink: the daemon's first start does, with the recorded tokens
    assert not (tmp_path / "token").exists()

    agent = spawn(config)
    assert wait_for(lambda: "dvs-agent running" in agent.output()), agent.output()
    assert wait_for(lambda: (tmp_path / "other-token").exists())
    assert (tmp_path / "token").read_text().strip() in issued
    assert (tmp_path / "other-token").read_text().strip() in issued
    assert len(server.token_requests()) == 2  # zero more
    assert agent.stop() == 0


def test_rejected_credentials_exit_77_with_one_request(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url)
    env = agent_env(DVS_CLIENT_SECRET="not-the-secret")
    result = run_cli("check", "--connect", "-c", str(config), env=env)
    assert result.returncode == 77, result.stdout + result.stderr
    assert len(server.token_requests()) == 1
    assert "not-the-secret" not in result.stdout + result.stderr
    assert not (tmp_path / "state" / "dvs.json").exists()


def test_unknown_user_is_a_usage_error(server: TokenServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, server.url)
    result = run_cli("check", "--connect", "--user", "no-such-user-here", "-c", str(config))
    assert result.returncode == 64
    assert "no-such-user-here" in result.stderr
    assert server.token_requests() == []


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY not in {p.pw_uid for p in pwd.getpwall()},
    reason="--user switches to uid 65534 (CI runs as root)",
)


@needs_root
def test_user_cannot_write_a_root_only_directory(server: TokenServer, shared_dir: Path) -> None:
    sinks = shared_dir / "root-only"
    sinks.mkdir(mode=0o755)
    state = shared_dir / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    config = write_config(shared_dir, server.url)
    text = config.read_text().replace(f"{shared_dir}/token", f"{sinks}/token")
    config.write_text(text.replace(f'state_dir = "{shared_dir}/state"', f'state_dir = "{state}"'))
    before = _tree(shared_dir)

    result = run_cli("check", "--connect", "--user", "nobody", "-c", str(config))
    assert result.returncode == 73, result.stdout + result.stderr
    assert f"user nobody (uid {NOBODY}): state_dir {state}: writable" in result.stdout
    assert f"cannot create a file in {sinks}: Permission denied" in result.stdout
    assert "dvs: every sink is writable" in result.stdout  # root's own check, as before
    after = _tree(shared_dir)
    recorded = {k: v for k, v in after.items() if k not in before}
    # the token is recorded as the service user; nothing else is left behind
    assert set(recorded) == {"state/key", "state/dvs.json"}
    assert all(uid == NOBODY for uid, _ in recorded.values())


@needs_root
def test_user_can_write_its_directories_and_records_the_token(
    server: TokenServer, shared_dir: Path
) -> None:
    sinks, var = shared_dir / "sinks", shared_dir / "var"
    for directory in (sinks, var):
        directory.mkdir(mode=0o755)
        os.chown(directory, NOBODY, NOBODY)
    state = var / "state"  # missing: the service user may create it
    config = write_config(shared_dir, server.url)
    text = config.read_text().replace(f"{shared_dir}/token", f"{sinks}/token")
    config.write_text(text.replace(f'state_dir = "{shared_dir}/state"', f'state_dir = "{state}"'))
    before = _tree(shared_dir)

    result = run_cli("check", "--connect", "--user", "nobody", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    who = f"user nobody (uid {NOBODY})"
    assert f"{who}: state_dir {state}: writable" in result.stdout
    assert f"{who}: profile dvs sink 0 {sinks}/token: writable" in result.stdout
    assert f"recorded in {state}" in result.stdout
    for token in server.issued():
        assert token not in result.stdout + result.stderr
    after = _tree(shared_dir)
    new = {k: v for k, v in after.items() if k not in before}
    # state_dir did not exist: created by the service user, with the record; no probe is left
    assert set(new) == {"var/state", "var/state/key", "var/state/dvs.json"}
    assert all(uid == NOBODY for uid, _ in new.values())
    assert not any(".dvs-agent-check-" in k for k in after)
    assert len(server.token_requests()) == 1
