"""Trust on disk (DESIGN §10): what ``state_dir`` may hold before the agent uses it.

A recorded token is validated like a server answer; a state file is used without credentials
to check it against only when it is the agent's own (its uid, mode 0600); every read is bounded
and never blocks; ``state_dir`` must be the agent's. Ownership is tested as root with files
chowned to uid 65534, and as uid 65534 through ``setpriv`` (the tests run as root in CI, and
root passes every permission check).

"Another uid" means any uid other than the agent's effective uid, for root too: a root agent
refuses a ``state_dir`` owned by uid 65534 (its owner could plant a record or a key in it).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.devserver import TokenServer
from agent.errors import SinkError
from agent.models import MAX_ANSWER_BYTES, MAX_TOKEN_BYTES, Credentials, Secret, Token
from agent.state import StateStore
from tests.conftest import agent_env, hour_token, run_cli, write_config
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
LOGGER = "tests.state_trust"
CREDENTIALS = Credentials("svc-client", Secret("s3cr3t"), "env", "1")
GOOD_TOKEN = "recorded-Token_1.2~3+4/5=="
FORGED_TOKEN = "ATTACKER-CHOSEN-TOKEN\nEVIL=1"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


# ------------------------------------------------------------------------------------ helpers


def record(fingerprint: str = "not-checked", **fields: Any) -> bytes:
    """A state record as StateStore.save writes it, valid for an hour, with ``fields`` changed."""
    now = time.time()
    doc: dict[str, Any] = {
        "fingerprint": fingerprint,
        "access_token": GOOD_TOKEN,
        "token_type": "bearer",
        "expires_in": 3600,
        "obtained_at": now,
        "expires_at": now + 3600,
        "scope": None,
        "extensions": {"provider_slug": "br-gamma"},
        "format": 1,
    }
    doc.update(fields)
    return json.dumps(doc).encode()


def plant(path: Path, data: bytes, *, mode: int = 0o600, uid: int | None = None) -> Path:
    """Write ``path`` with exactly this mode (and owner), as an attacker or the agent would."""
    path.write_bytes(data)
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    store = StateStore(tmp_path / "state", logger=logging.getLogger(LOGGER))
    store.prepare()
    return store


def fingerprint(store: StateStore) -> str:
    return CREDENTIALS.fingerprint(store.key)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


def in_thread(call: Callable[[], object], timeout: float = 10.0) -> object:
    """``call()`` in a thread: fails (instead of hanging the suite) when it blocks."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"blocked for more than {timeout}s"
    assert result, "raised in the thread (see the log)"
    return result[0]


def token_valid_for_an_hour(value: str = GOOD_TOKEN) -> Token:
    return hour_token(value)


# ------------------------------------------------------- without credentials: the agent's own


def test_own_private_record_is_used_without_credentials(store: StateStore) -> None:
    store.save("dvs", fingerprint(store), token_valid_for_an_hour())
    path = store.directory / "dvs.json"
    assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (os.geteuid(), 0o600)
    token = store.load("dvs", None)
    assert token is not None and token.access_token.reveal() == GOOD_TOKEN
    assert store.load("dvs", fingerprint(store)) is not None
    assert store.load("dvs", "other-credentials") is None
    # a 0400 file has no group or other bits either
    path.chmod(0o400)
    assert store.load("dvs", None) is not None


@as_root
def test_foreign_record_is_not_used_without_credentials(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    path = plant(store.directory / "dvs.json", record(fingerprint(store)), uid=NOBODY)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("dvs", None) is None
    (warning,) = warnings_of(caplog)
    assert str(path) in warning
    assert f"owned by uid {NOBODY}, not by the agent's uid {os.geteuid()}" in warning
    assert "mode 0600" in warning
    # with credentials, the keyed hash is the check: only a holder of the secret could make it
    assert store.load("dvs", fingerprint(store)) is not None


@pytest.mark.parametrize(
    "mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601, 0o666], ids=lambda m: f"{m:04o}"
)
def test_record_open_to_others_is_not_used_without_credentials(
    store: StateStore, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    path = plant(store.directory / "dvs.json", record(fingerprint(store)), mode=mode)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("dvs", None) is None
    (warning,) = warnings_of(caplog)
    assert str(path) in warning and f"its mode is {mode:04o}" in warning
    assert store.load("dvs", fingerprint(store)) is not None


# --------------------------------------------------- the recorded token, validated like an answer


@pytest.mark.parametrize(
    "value",
    [
        FORGED_TOKEN,
        "two words",
        'quote"d',
        "tab\there",
        "",
        "=leading",
        "a=b",
        "tök",
        "a" * (MAX_TOKEN_BYTES + 1),
    ],
    ids=["newline", "space", "quote", "tab", "empty", "leading-=", "inner-=", "non-ascii", "long"],
)
def test_bad_token_is_refused_with_and_without_credentials(
    store: StateStore, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    path = plant(store.directory / "dvs.json", record(fingerprint(store), access_token=value))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("dvs", fingerprint(store)) is None  # the keyed hash matches
        assert store.load("dvs", None) is None
    (warning,) = warnings_of(caplog)  # once: the same reason both times
    assert str(path) in warning and "not an RFC 6750 token" in warning
    assert not value or value.splitlines()[0] not in warning  # the value is never shown


@pytest.mark.parametrize("value", ["a" * MAX_TOKEN_BYTES, "abc-._~+/XYZ09==", "x="])
def test_good_tokens_up_to_64_kib_are_used(store: StateStore, value: str) -> None:
    plant(store.directory / "dvs.json", record(fingerprint(store), access_token=value))
    token = store.load("dvs", None)
    assert token is not None and token.access_token.reveal() == value


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"token_type": "mac"}, "token_type is not bearer"),
        ({"expires_in": 0}, "expires_in"),
        ({"expires_in": -1}, "expires_in"),
        ({"expires_in": 10**30}, "expires_in"),
        ({"expires_in": True}, "not a state record"),
        ({"obtained_at": -1.0}, "between 1970 and 9999"),
        ({"expires_at": 1e300}, "between 1970 and 9999"),
        ({"obtained_at": 2e9, "expires_at": 1e9}, "before its obtained_at"),
        ({"access_token": 42}, "not a state record"),
        ({"extensions": []}, "not a state record"),
    ],
)
def test_record_fields_are_validated(
    store: StateStore, caplog: pytest.LogCaptureFixture, fields: dict[str, Any], why: str
) -> None:
    plant(store.directory / "dvs.json", record(fingerprint(store), **fields))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("dvs", fingerprint(store)) is None
        assert store.load("dvs", None) is None
    assert why in warnings_of(caplog)[0]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b'{"fingerprint": "x"}',
        record().replace(b'"expires_in": 3600', b'"expires_in": 3600, "obtained_at": 1e999'),
        b'{"extensions": {"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}",
        b'{"fingerprint": "\xff"}',
    ],
    ids=["empty", "truncated", "array", "missing-fields", "infinite-time", "deep", "not-utf8"],
)
def test_garbled_record_is_refused(
    store: StateStore, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    plant(store.directory / "dvs.json", data)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("dvs", fingerprint(store)) is None
        assert store.load("dvs", None) is None
    assert "not a state record" in warnings_of(caplog)[0]


def test_non_ascii_fingerprint_does_not_raise(store: StateStore) -> None:
    # secrets.compare_digest raises TypeError on non-ASCII str: the store compares bytes
    plant(store.directory / "dvs.json", record("fïngerprint"))
    assert store.load("dvs", fingerprint(store)) is None
    assert store.load("dvs", None) is not None


def test_a_refusal_is_logged_once(store: StateStore, caplog: pytest.LogCaptureFixture) -> None:
    plant(store.directory / "dvs.json", record(access_token=FORGED_TOKEN))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            assert store.load("dvs", None) is None
    assert len(warnings_of(caplog)) == 1
    # another reason is another warning
    plant(store.directory / "dvs.json", record(access_token=FORGED_TOKEN), mode=0o644)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("dvs", None) is None
    assert len(warnings_of(caplog)) == 2


# ------------------------------------------------------------------------------ bounded reads


def test_a_200_mb_record_is_refused_without_reading_it(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    path = store.directory / "dvs.json"
    plant(path, record(fingerprint(store)))
    with open(path, "r+b") as handle:
        handle.truncate(200 * 1024 * 1024)  # sparse: no 200 MB written
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("dvs", fingerprint(store)) is None
        assert store.load("dvs", None) is None
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert growth < 50 * 1024, f"peak RSS grew by {growth} KiB"
    assert (
        f"it has {200 * 1024 * 1024} bytes, more than the {MAX_ANSWER_BYTES}"
        in (warnings_of(caplog)[0])
    )


def test_the_bound_is_1_mib(store: StateStore) -> None:
    path = store.directory / "dvs.json"
    data = record(fingerprint(store))
    plant(path, data + b" " * (MAX_ANSWER_BYTES - len(data)))  # JSON allows trailing spaces
    assert path.stat().st_size == MAX_ANSWER_BYTES
    assert store.load("dvs", None) is not None
    plant(path, data + b" " * (MAX_ANSWER_BYTES + 1 - len(data)))
    assert store.load("dvs", None) is None


@pytest.mark.parametrize("credentials", [True, False])
def test_a_fifo_as_state_file_does_not_block(
    store: StateStore, caplog: pytest.LogCaptureFixture, credentials: bool
) -> None:
    path = store.directory / "dvs.json"
    os.mkfifo(path, 0o600)
    fp = fingerprint(store) if credentials else None
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert in_thread(lambda: store.load("dvs", fp)) is None
    (warning,) = warnings_of(caplog)
    assert str(path) in warning and "it is a FIFO, not a regular file" in warning


def test_a_fifo_as_key_file_does_not_block_and_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    os.mkfifo(directory / "key", 0o600)
    store = StateStore(directory, logger=logging.getLogger(LOGGER))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        in_thread(lambda: store.prepare() or True)
    assert len(store.key) == 32
    info = (directory / "key").lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    (warning,) = warnings_of(caplog)
    assert f"{directory / 'key'}: it is a FIFO" in warning and "a new key is made" in warning


@pytest.mark.parametrize("target", ["good-record", "/dev/zero", "dangling"])
def test_a_symlinked_state_file_is_not_followed(
    store: StateStore, tmp_path: Path, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    good = plant(tmp_path / "elsewhere.json", record(fingerprint(store)))
    pointed = {"good-record": str(good), "/dev/zero": "/dev/zero", "dangling": "/nonexistent"}
    os.symlink(pointed[target], store.directory / "dvs.json")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert in_thread(lambda: store.load("dvs", fingerprint(store))) is None
    assert "it is a symbolic link, not a regular file" in warnings_of(caplog)[0]


def test_a_directory_as_state_file_is_refused(
    store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    (store.directory / "dvs.json").mkdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("dvs", None) is None
    assert "it is a directory, not a regular file" in warnings_of(caplog)[0]


# ---------------------------------------------------------------------------------- key file


def test_the_key_is_kept_across_restarts(store: StateStore) -> None:
    again = StateStore(store.directory)
    again.prepare()
    assert again.key == store.key


@pytest.mark.parametrize(
    ("setup", "why"),
    [
        (lambda p: plant(p, os.urandom(32).hex().encode(), mode=0o644), "its mode is 0644"),
        (lambda p: plant(p, os.urandom(32).hex().encode(), mode=0o620), "its mode is 0620"),
        (lambda p: plant(p, b"not hex at all"), "does not hold a key"),
        (lambda p: plant(p, b""), "holds a key of 0 bytes"),
        (lambda p: plant(p, b"00ff"), "holds a key of 2 bytes"),
        (lambda p: os.truncate(plant(p, b"00"), 200 * 1024 * 1024), "more than the 4096"),
    ],
    ids=["0644", "0620", "garbage", "empty", "short", "sparse-200mb"],
)
def test_an_untrusted_key_file_is_replaced(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    setup: Callable[[Path], object],
    why: str,
) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    key_path = directory / "key"
    setup(key_path)
    with open(key_path, "rb") as handle:
        old = handle.read(100)
    store = StateStore(directory, logger=logging.getLogger(LOGGER))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store.prepare()
    assert len(store.key) == 32 and store.key.hex().encode() != old
    assert key_path.read_bytes() == store.key.hex().encode()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    (warning,) = warnings_of(caplog)
    assert str(key_path) in warning and why in warning


@as_root
def test_a_key_file_of_another_uid_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    planted = os.urandom(32)
    plant(directory / "key", planted.hex().encode(), uid=NOBODY)
    store = StateStore(directory, logger=logging.getLogger(LOGGER))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store.prepare()
    assert store.key != planted
    assert (directory / "key").stat().st_uid == 0
    assert f"owned by uid {NOBODY}" in warnings_of(caplog)[0]


# --------------------------------------------------------------------------------- state_dir


@as_root
def test_root_refuses_a_state_dir_of_another_uid(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(SinkError) as info:
        StateStore(directory).prepare()
    message = str(info.value)
    assert message.startswith(f"agent.state_dir {directory}: owned by uid {NOBODY}, ")
    assert "not by the agent's uid 0" in message
    assert f"chown 0 {directory}" in message and "StateDirectory=" in message
    assert info.value.exit_code == 73
    assert list(directory.iterdir()) == []  # nothing written in it, no key made
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_own_state_dir_open_to_others_is_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    directory.chmod(0o777)  # the defect being fixed
    store = StateStore(directory, logger=logging.getLogger(LOGGER))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        store.prepare()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    (warning,) = warnings_of(caplog)
    assert f"agent.state_dir {directory} had mode 0777 (writable by other users)" in warning
    # a mode that let no one else write is fixed too, without a warning
    directory.chmod(0o755)
    caplog.clear()
    store.prepare()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert warnings_of(caplog) == []


UNPRIVILEGED_SCRIPT = textwrap.dedent(
    """
    import json, os, stat, sys
    from pathlib import Path
    from agent.errors import SinkError
    from agent.state import StateStore
    directory = Path(sys.argv[1])
    try:
        StateStore(directory).prepare()
    except SinkError as exc:
        error = str(exc)
    else:
        error = None
    info = directory.stat()
    print(json.dumps({"uid": os.geteuid(), "error": error, "mode": stat.S_IMODE(info.st_mode)}))
    """
)


def prepare_unprivileged(directory: Path) -> dict[str, Any]:
    """StateStore(directory).prepare() as uid 65534: its uid, SinkError text and the dir mode."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop privileges")
    argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    argv += [sys.executable, "-c", UNPRIVILEGED_SCRIPT, str(directory)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd="/", env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = msgspec.json.decode(done.stdout.strip().splitlines()[-1])
    assert result["uid"] == NOBODY
    return result


@as_root
def test_unprivileged_agent_refuses_a_state_dir_of_another_uid(shared_dir: Path) -> None:
    directory = shared_dir / "state"
    directory.mkdir()
    directory.chmod(0o777)  # writable by all: only the owner check stops uid 65534
    result = prepare_unprivileged(directory)
    assert result["error"] is not None
    assert result["error"].startswith(f"agent.state_dir {directory}: owned by uid 0, ")
    assert f"not by the agent's uid {NOBODY}" in result["error"]
    assert f"chown {NOBODY} {directory}" in result["error"]
    assert list(directory.iterdir()) == []


@as_root
def test_unprivileged_agent_fixes_its_own_state_dir(shared_dir: Path) -> None:
    directory = shared_dir / "state"
    directory.mkdir()
    directory.chmod(0o777)  # the defect being fixed
    os.chown(directory, NOBODY, NOBODY)
    result = prepare_unprivileged(directory)
    assert result["error"] is None
    assert result["mode"] == 0o700
    key = (directory / "key").stat()
    assert (key.st_uid, stat.S_IMODE(key.st_mode)) == (NOBODY, 0o600)


# --------------------------------------------------------------- end to end: `dvs-agent once`


def vault_down_config(tmp_path: Path, server: TokenServer) -> tuple[Path, dict[str, str]]:
    """A profile whose only source is a Vault nobody listens for: no credentials can be read."""
    address = f"http://127.0.0.1:{free_port()}"
    profile = (
        'sources = ["vault"]\n'
        f'[profiles.dvs.vault]\naddress = "{address}"\nauth_method = "token"\npath = "dvs/osigu"\n'
    )
    config = write_config(tmp_path, server.url, extra_profile=profile)
    return config, agent_env(VAULT_TOKEN="vault-token")


def forge_state_dir(tmp_path: Path) -> Path:
    """state_dir as the defect found it: the agent's uid, but mode 0777."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)  # the defect being reproduced
    return state


@pytest.mark.parametrize(
    ("access_token", "mode", "uid"),
    [
        pytest.param(FORGED_TOKEN, 0o644, NOBODY, id="another-uid-newline", marks=as_root),
        pytest.param("ATTACKER-CHOSEN-TOKEN", 0o600, NOBODY, id="another-uid", marks=as_root),
        pytest.param("ATTACKER-CHOSEN-TOKEN", 0o644, None, id="own-0644"),
        pytest.param(FORGED_TOKEN, 0o600, None, id="own-0600-newline"),
    ],
)
def test_once_does_not_write_a_forged_token_when_no_credentials_can_be_read(
    tmp_path: Path, server: TokenServer, access_token: str, mode: int, uid: int | None
) -> None:
    config, env = vault_down_config(tmp_path, server)
    forged = plant(
        forge_state_dir(tmp_path) / "dvs.json",
        record(access_token=access_token),
        mode=mode,
        uid=uid,
    )
    result = run_cli("once", "-c", str(config), env=env)
    assert result.returncode == 69, result.stderr
    assert not (tmp_path / "token").exists()
    assert not (tmp_path / "token.json").exists()
    assert server.token_requests() == []
    assert "ATTACKER" not in result.stderr
    assert f"ignoring {forged}: " in result.stderr
    assert "had mode 0777" in result.stderr
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_once_restores_the_agents_own_record_when_no_credentials_can_be_read(
    tmp_path: Path, server: TokenServer
) -> None:
    # the positive control of the test above: the same setup restores a trusted record
    config, env = vault_down_config(tmp_path, server)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    plant(state / "dvs.json", record(access_token=GOOD_TOKEN))
    result = run_cli("once", "-c", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "token").read_text() == GOOD_TOKEN
    assert "keeping the recorded token" in result.stderr
    assert server.token_requests() == []
