"""The documented systemd install, run for real (README "Install as a systemd service").

The agent is started the way ``config/dvs-agent.service`` starts it: its ``ExecStart=``
arguments, only the environment its ``Environment=`` lines give (plus what systemd always sets),
its ``UMask=``, ``NoNewPrivileges=``, ``User=``/``Group=`` (an unprivileged uid and gid through
``setpriv``; the tests run as root in CI, where every permission check would pass), and the
``RuntimeDirectory=``/``StateDirectory=`` modes; every path under ``/etc/dvs-agent``,
``/run/dvs-agent`` and ``/var/lib/dvs-agent`` is remapped into a temp directory. The credential
files are made, and rotated, by running the README's own commands (``sudo`` dropped, the
unit's group replaced by the test gid), so the documentation and the unit cannot drift from
what is tested. What needs systemd itself (``LoadCredential=``'s copy into
``$CREDENTIALS_DIRECTORY``) is imitated: the copy is made at each start, as systemd does.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.devserver import TokenServer
from agent.sources.env import EnvSourceConfig
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REPO, wait_for

UNIT_PATH = REPO / "config" / "dvs-agent.service"
README_PATH = REPO / "README.md"
#: the uid and gid standing in for the unit's User=/Group= (no passwd entry is needed)
AGENT_UID = AGENT_GID = 64010
#: another unprivileged user, in no group of the agent's
OTHER_UID = OTHER_GID = 64011
#: the directories the unit and the README name, remapped into the test's root
ETC, RUN, STATE = "/etc/dvs-agent", "/run/dvs-agent", "/var/lib/dvs-agent"
CREDSTORE = "/etc/credstore.encrypted"
NEW_SECRET = "rotated-Secret_value+2/="
_REAL_PATHS = re.compile(
    "(?<![\\w.-])("
    + "|".join(map(re.escape, (CREDSTORE, ETC, RUN, STATE, "/run/credentials")))
    + ")"
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (the credential files are root's) and setpriv to drop to the unit's user",
)


# ---------------------------------------------------------------- the unit and the README
Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """``{section: {key: [values in order]}}`` (comments and blank lines skipped)."""
    unit: Unit = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        unit.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return unit


def unit_environment(service: dict[str, list[str]]) -> dict[str, str]:
    """What the ``Environment=`` lines set (several assignments per line, quoted or not;
    a later assignment wins, as in systemd)."""
    env: dict[str, str] = {}
    for value in service.get("Environment", []):
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


def unit() -> Unit:
    return parse_unit(UNIT_PATH.read_text())


def systemd_section() -> str:
    """The README from "## Install as a systemd service" to "### In a container"."""
    text = README_PATH.read_text()
    start = text.index("## Install as a systemd service")
    return text[start : text.index("### In a container", start)]


def code_block(text: str, lang: str, *, after: str = "") -> str:
    """The first fenced ``lang`` block of ``text`` after the line ``after``."""
    offset = text.index(after) if after else 0
    match = re.compile(rf"^```{lang}\n(.*?)^```", re.S | re.M).search(text, offset)
    assert match is not None, f"no ```{lang} block after {after!r} in the README"
    return match.group(1)


def install_block() -> str:
    return code_block(systemd_section(), "sh")


def runbook_block() -> str:
    return code_block(systemd_section(), "sh", after="### Rotating the secret under systemd")


def load_credential_block() -> str:
    return code_block(systemd_section(), "ini", after="### Hardened alternative")


def commands(block: str) -> list[str]:
    """The command lines of a shell block (comment lines dropped)."""
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


# ---------------------------------------------------------------- the install, remapped
@dataclass
class Installed:
    """A root directory holding etc/, run/ and var/lib/ as the README and the unit lay them out."""

    root: Path
    server: TokenServer
    service: dict[str, list[str]] = field(default_factory=lambda: unit()["Service"])
    procs: list[AgentRun] = field(default_factory=list)

    def path(self, value: str) -> str:
        """A path (or a text holding paths) of the real install, moved into the test root
        (a path already moved stays as it is)."""
        return _REAL_PATHS.sub(lambda m: f"{self.root}{m.group(0)}", value)

    def local(self, real: str) -> Path:
        return Path(self.path(real))

    def shell(self, line: str, stdin: str = "") -> None:
        """A README command as root, remapped: no sudo, the unit's user and group as the test
        uid and gid."""
        user, group = self.service["User"][0], self.service["Group"][0]
        line = line.replace("sudo ", "").replace(f"-o {user} ", f"-o {AGENT_UID} ")
        line = line.replace(f"-g {group} ", f"-g {AGENT_GID} ")
        subprocess.run(["bash", "-c", self.path(line)], input=stdin, text=True, check=True)

    def make_dirs(self) -> None:
        """What systemd makes for the unit (RuntimeDirectory=, StateDirectory=) and the
        README's ``install -d`` of /etc/dvs-agent."""
        for line in commands(install_block()):
            if "install -d -m" in line and line.rstrip().endswith(ETC):
                self.shell(line)
        assert self.local(ETC).is_dir(), "the README no longer creates /etc/dvs-agent"
        for key, base in (("RuntimeDirectory", "/run"), ("StateDirectory", "/var/lib")):
            directory = self.local(f"{base}/{self.service[key][0]}")
            directory.mkdir(parents=True)
            os.chown(directory, AGENT_UID, AGENT_GID)
            os.chmod(directory, int(self.service[f"{key}Mode"][0], 8))

    def write_credentials(self, client_id: str | None, secret: str | None) -> None:
        """The README's commands that write the credential files (None: that one is skipped)."""
        env = unit_environment(self.service)
        wanted = {
            env["DVS_CLIENT_ID_FILE"]: client_id,
            env["DVS_CLIENT_SECRET_FILE"]: secret,
        }
        done = set()
        for line in commands(install_block()):
            target = line.split()[-1]
            if target in wanted and "/dev/stdin" in line:
                done.add(target)
                value = wanted[target]
                if value is not None:
                    self.shell(line, stdin=value + "\n")  # typed: Enter, then Ctrl-D
        assert done == set(wanted), f"the README does not create {set(wanted) - done}"

    def rotate_secret(self, secret: str, *, reload_pid: int | None = None) -> None:
        """The README's runbook, line by line; ``systemctl reload`` is the unit's ExecReload
        (run only with ``reload_pid``)."""
        lines = commands(runbook_block())
        staged: Path | None = None
        for line in lines:
            if "systemctl reload" in line:
                if reload_pid is not None:
                    self.reload(reload_pid)
                continue
            if "/dev/stdin" in line:
                self.shell(line, stdin=secret + "\n")
                staged = self.local(line.split("#")[0].split()[-1])
                # the temp file has its final owner and mode before it holds the secret's place
                assert_private(staged)
            else:
                self.shell(line)
        assert staged is not None and not staged.exists(), "the runbook leaves its temp file"

    def reload(self, pid: int) -> None:
        """``systemctl reload``: systemd runs ExecReload with $MAINPID."""
        (command,) = self.service["ExecReload"]
        subprocess.run(shlex.split(command.replace("$MAINPID", str(pid))), check=True)

    def write_config(self, *, poll: str = "1s", profiles: str | None = None) -> Path:
        """/etc/dvs-agent/agent.toml (root's, 0644, as the README installs it)."""
        args = self.exec_args()
        config = Path(args[args.index("-c") + 1])
        if profiles is None:
            profiles = f"""
[profiles.dvs]
token_url = "{self.server.url}"

[profiles.dvs.rotation]
poll_interval = "{poll}"

[[profiles.dvs.sinks]]
type = "file"
path = "{self.path(RUN)}/token"
mode = "0640"
"""
        config.write_text(
            f"""
[agent]
log_level = "info"
state_dir = "{self.path(STATE)}"

[health]
listen = ""
{profiles}
"""
        )
        os.chmod(config, 0o644)
        return config

    def exec_args(self) -> list[str]:
        (command,) = self.service["ExecStart"]
        argv = shlex.split(command)
        assert argv[0] == "/opt/dvs-agent/bin/dvs-agent", argv
        return [self.path(arg) for arg in argv[1:]]

    def environment(self, **changes: str | None) -> dict[str, str]:
        """The environment systemd gives the service: the unit's Environment= lines (remapped)
        and what it always sets; ``changes`` stand for a drop-in (None unsets a variable)."""
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/",
            "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is root's: no __pycache__ attempts
        }
        env.update({k: self.path(v) for k, v in unit_environment(self.service).items()})
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def start(self, env: dict[str, str] | None = None, command: str = "run") -> AgentRun:
        args = self.exec_args()
        assert args[0] == "run"
        argv = [
            "setpriv",
            f"--reuid={AGENT_UID}",
            f"--regid={AGENT_GID}",
            "--clear-groups",  # the unit has no SupplementaryGroups=
            *(["--no-new-privs"] if self.service["NoNewPrivileges"] == ["yes"] else []),
            sys.executable,
            "-m",
            "agent",
            command,
            *args[1:],
        ]
        log = self.root / f"agent-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                env=self.environment() if env is None else env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                umask=int(self.service["UMask"][0], 8),
            )
        run = AgentRun(proc, log)
        self.procs.append(run)
        return run

    def token(self) -> str | None:
        try:
            return self.local(f"{RUN}/token").read_text()
        except FileNotFoundError:
            return None

    def secret_of_token(self) -> str | None:
        issued = self.server.issued().get(self.token() or "")
        return issued.client_secret if issued else None


@dataclass
class AgentRun:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def assert_private(path: Path) -> None:
    """the agent's user's file, group root, 0400: as the README installs the credentials."""
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (AGENT_UID, 0, 0o400), (
        path,
        info.st_uid,
        info.st_gid,
        oct(info.st_mode),
    )


def as_user(uid: int, gid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def installed(shared_dir: Path, server: TokenServer) -> Iterator[Installed]:
    setup = Installed(shared_dir, server)
    setup.make_dirs()
    yield setup
    for run in setup.procs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


# ---------------------------------------------------------------- the unit on its own
def test_the_unit_gives_the_env_source_files_not_values() -> None:
    """Rotation works only through files: a plain variable cannot change in a running agent."""
    service = unit()["Service"]
    assert "EnvironmentFile" not in service
    env = unit_environment(service)
    defaults = EnvSourceConfig()
    assert env == {
        f"{defaults.client_id_var}_FILE": f"{ETC}/client_id",
        f"{defaults.client_secret_var}_FILE": f"{ETC}/client_secret",
    }
    # /etc is read-only to the agent: it reads the files, it can never rewrite them
    assert service["ProtectSystem"] == ["strict"]
    writable = " ".join(service["ReadWritePaths"]).split()
    assert not any(path == ETC or path.startswith(("/etc/", ETC)) for path in writable)
    # 78 (a plain variable missing) stops the unit instead of a restart loop
    assert service["RestartPreventExitStatus"] == ["78"]
    assert shlex.split(service["ExecReload"][0])[:2] == ["/bin/kill", "-HUP"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("drop_in", [False, True], ids=["unit", "with-load-credential"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, drop_in: bool) -> None:
    """``systemd-analyze verify`` finds nothing wrong (ExecStart pointed at this venv's
    dvs-agent, since /opt/dvs-agent does not exist here), alone and with the README's
    LoadCredential= drop-in. The man page of Documentation= is generated at build time, not
    installed here: tests/test_manpage.py verifies the unit with it on MANPATH."""
    binary = Path(sys.executable).parent / "dvs-agent"
    assert binary.exists()
    text = UNIT_PATH.read_text().replace("/opt/dvs-agent/bin/dvs-agent", str(binary))
    if drop_in:
        text += "\n" + load_credential_block()
    path = tmp_path / "dvs-agent.service"
    path.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_readme_and_the_unit_agree() -> None:
    """The README's install, runbook and LoadCredential= drop-in name the unit's paths, its
    group and the env source's variables, so that neither can drift from the other."""
    service = unit()["Service"]
    env = unit_environment(service)
    group = service["Group"][0]
    section = " ".join(systemd_section().split())  # prose, whatever its line breaks
    install = install_block()
    assert "credentials.env" not in install and "EnvironmentFile" not in install
    # the user the README creates is the unit's User= (and its group the unit's Group=)
    assert any(
        line.startswith("sudo useradd") and line.split()[-1] == service["User"][0] == group
        for line in commands(install)
    )
    for var, path in env.items():
        # the README says which files the unit names, and creates each of them as documented
        assert f"Environment={var}={path}" in section
        line = next((line for line in commands(install) if line.split()[-1] == path), None)
        assert line is not None, f"the README's install does not create {path}"
        assert f"install -m 0400 -o {service['User'][0]} -g root /dev/stdin {path}" in line
    # the runbook replaces the unit's secret file through a temp file in the same directory
    secret = env["DVS_CLIENT_SECRET_FILE"]
    staged, replace, reload = commands(runbook_block())
    assert f"install -m 0400 -o {service['User'][0]} -g root /dev/stdin {secret}.new" in staged
    assert replace.split() == ["sudo", "mv", "-f", f"{secret}.new", secret]
    assert reload.split()[:4] == ["sudo", "systemctl", "reload", "dvs-agent"]
    # LoadCredential=: one credential per variable, named as the file %d/NAME the variable names
    drop_in = parse_unit(load_credential_block())["Service"]
    loaded = {
        spec.partition(":")[0]: spec.partition(":")[2]
        for key in ("LoadCredential", "LoadCredentialEncrypted")
        for spec in drop_in.get(key, [])
    }
    assert loaded.get("client_id") == env["DVS_CLIENT_ID_FILE"]
    assert "client_secret" in loaded
    assert unit_environment(drop_in) == {var: f"%d/{Path(p).name}" for var, p in env.items()}
    assert {Path(p).name for p in env.values()} == set(loaded)
    assert "systemctl restart dvs-agent" in section  # LoadCredential= rotates only so


# ---------------------------------------------------------------- the install, for real
def test_the_credential_files_are_the_agents_to_read_and_nobody_elses(
    installed: Installed,
) -> None:
    installed.write_credentials(CLIENT_ID, CLIENT_SECRET)
    env = unit_environment(installed.service)
    for real in env.values():
        path = installed.local(real)
        assert_private(path)
        # the agent's user reads it ...
        agent = as_user(AGENT_UID, AGENT_GID, "cat", str(path))
        assert agent.returncode == 0, agent.stderr
        assert agent.stdout.rstrip("\n") in (CLIENT_ID, CLIENT_SECRET)
        # ... but cannot change it, nor put a file beside it
        append = as_user(AGENT_UID, AGENT_GID, "sh", "-c", f"echo x >> {path}")
        assert append.returncode != 0 and "Permission denied" in append.stderr
        beside = as_user(AGENT_UID, AGENT_GID, "touch", f"{path.parent}/planted")
        assert beside.returncode != 0 and "Permission denied" in beside.stderr
        # another unprivileged user reads nothing
        other = as_user(OTHER_UID, OTHER_GID, "cat", str(path))
        assert other.returncode != 0 and "Permission denied" in other.stderr, other
        assert CLIENT_SECRET not in other.stdout
        # nor does a consumer, a member of the agent's group (it reads the token, never this)
        consumer = as_user(OTHER_UID, AGENT_GID, "cat", str(path))
        assert consumer.returncode != 0 and "Permission denied" in consumer.stderr, consumer


def test_the_installed_agent_rotates_by_polling(installed: Installed) -> None:
    """The runbook without a reload: the agent's poll finds the new file and re-authenticates."""
    installed.write_credentials(CLIENT_ID, CLIENT_SECRET)
    installed.write_config(poll="1s")
    agent = installed.start()
    assert wait_for(lambda: installed.secret_of_token() == CLIENT_SECRET, 20), agent.output()
    status = Path(f"/proc/{agent.pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{AGENT_UID}\s", status, re.M), "not running as the unit's user"
    assert re.search(rf"^Gid:\s+{AGENT_GID}\s", status, re.M)
    installed.server.set_secret(CLIENT_ID, NEW_SECRET)  # the auth server's side of it
    installed.rotate_secret(NEW_SECRET)
    rotated = time.monotonic()
    assert wait_for(lambda: installed.secret_of_token() == NEW_SECRET, 10), agent.output()
    assert time.monotonic() - rotated < 6  # poll_interval 1 s, generous for a shared machine
    assert "rotation detected" in agent.output()
    assert_private(installed.local(f"{ETC}/client_secret"))  # still the agent's, 0400
    assert NEW_SECRET not in agent.output() and CLIENT_SECRET not in agent.output()
    assert agent.stop() == 0


def test_the_installed_agent_rotates_at_once_on_reload(installed: Installed) -> None:
    """The runbook with ``systemctl reload`` (the unit's ExecReload: SIGHUP), polling off:
    the reload alone makes the agent re-authenticate, at once."""
    installed.write_credentials(CLIENT_ID, CLIENT_SECRET)
    installed.write_config(poll="0")
    agent = installed.start()
    assert wait_for(lambda: installed.secret_of_token() == CLIENT_SECRET, 20), agent.output()
    assert wait_for(lambda: '"event":"started"' in agent.output(), 10), agent.output()
    installed.server.set_secret(CLIENT_ID, NEW_SECRET)
    installed.rotate_secret(NEW_SECRET, reload_pid=agent.pid)
    reloaded = time.monotonic()
    assert wait_for(lambda: installed.secret_of_token() == NEW_SECRET, 10), agent.output()
    assert time.monotonic() - reloaded < 3
    assert '"event":"reload"' in agent.output()
    assert agent.stop() == 0


@pytest.mark.parametrize(
    ("case", "changes", "named"),
    [
        # the old install's EnvironmentFile=, now missing: no credential variable at all
        (
            "nothing",
            {"DVS_CLIENT_ID_FILE": None, "DVS_CLIENT_SECRET_FILE": None},
            "DVS_CLIENT_ID",
        ),
        (
            "secret-unset",
            {
                "DVS_CLIENT_ID_FILE": None,
                "DVS_CLIENT_SECRET_FILE": None,
                "DVS_CLIENT_ID": CLIENT_ID,
            },
            "DVS_CLIENT_SECRET",
        ),
        # the id from its file, the secret's _FILE dropped by a drop-in: it can never appear
        ("secret-file-dropped", {"DVS_CLIENT_SECRET_FILE": None}, "DVS_CLIENT_SECRET"),
        (
            "secret-empty",
            {"DVS_CLIENT_SECRET_FILE": None, "DVS_CLIENT_SECRET": ""},
            "DVS_CLIENT_SECRET",
        ),
    ],
)
def test_plain_credentials_missing_at_start_exit_78(
    installed: Installed, case: str, changes: dict[str, str | None], named: str
) -> None:
    """A plain variable cannot appear in a running process: ``run`` exits 78 at once
    (RestartPreventExitStatus=78 stops systemd from restarting it), naming the variable and
    the _FILE form, before any token request. ``once`` says 78 too."""
    installed.write_credentials(CLIENT_ID, CLIENT_SECRET)
    installed.write_config(poll="1s")
    env = installed.environment(**changes)
    started = time.monotonic()
    agent = installed.start(env)
    assert agent.proc.wait(20) == 78, agent.output()
    assert time.monotonic() - started < 15
    output = agent.output()
    assert named in output and f"{named}_FILE" in output, output
    assert "cannot appear" in output and "exiting (78)" in output, output
    assert installed.server.token_requests() == []
    assert installed.token() is None
    once = installed.start(env, command="once")
    assert once.proc.wait(20) == 78, once.output()
    assert named in once.output()


def test_one_profile_whose_credentials_can_never_appear_stops_the_agent(
    installed: Installed,
) -> None:
    """With several profiles, one whose only source is plain variables that are unset is a
    broken install: 78 at start, naming that profile, as a config error in it would be."""
    installed.write_credentials(CLIENT_ID, CLIENT_SECRET)
    profiles = f"""
[profiles.good]
token_url = "{installed.server.url}"

[[profiles.good.sinks]]
type = "file"
path = "{installed.path(RUN)}/good"

[profiles.tenant]
token_url = "{installed.server.url}"

[profiles.tenant.env]
client_id_var = "TENANT_ID"
client_secret_var = "TENANT_SECRET"

[[profiles.tenant.sinks]]
type = "file"
path = "{installed.path(RUN)}/tenant"
"""
    installed.write_config(profiles=profiles)
    agent = installed.start(installed.environment(TENANT_ID="tenant-client"))
    assert agent.proc.wait(20) == 78, agent.output()
    assert "profile tenant" in agent.output() and "TENANT_SECRET" in agent.output()
    assert "profile good:" not in agent.output()
    assert installed.server.token_requests() == []


def test_a_missing_credential_file_is_retried_until_it_appears(installed: Installed) -> None:
    """A _FILE may appear later (created after the agent started): no 78, the agent retries
    and takes the credentials once the README's command has written the file."""
    installed.write_credentials(CLIENT_ID, None)  # client_secret not written yet
    installed.write_config(poll="1s")
    agent = installed.start()
    assert wait_for(lambda: "does not exist" in agent.output(), 15), agent.output()
    time.sleep(2)
    assert agent.proc.poll() is None, agent.output()
    assert installed.server.token_requests() == []
    installed.write_credentials(None, CLIENT_SECRET)
    assert wait_for(lambda: installed.secret_of_token() == CLIENT_SECRET, 15), agent.output()
    assert agent.stop() == 0


def test_a_profile_with_a_store_keeps_retrying(installed: Installed) -> None:
    """sources = ["vault", "env"] with the plain variables unset: Vault may answer later (it is
    down here), so the agent keeps running and retrying instead of exiting 78."""
    token_file = installed.local(f"{ETC}/vault-token")
    token_file.write_text("unused")
    os.chown(token_file, 0, AGENT_GID)
    os.chmod(token_file, 0o640)
    profiles = f"""
[profiles.dvs]
token_url = "{installed.server.url}"
sources = ["vault", "env"]

[profiles.dvs.vault]
address = "http://127.0.0.1:9"
auth_method = "token"
token_file = "{token_file}"
path = "dvs/osigu"

[profiles.dvs.rotation]
poll_interval = "1s"

[[profiles.dvs.sinks]]
type = "file"
path = "{installed.path(RUN)}/token"
"""
    installed.write_config(profiles=profiles)
    env = installed.environment(DVS_CLIENT_ID_FILE=None, DVS_CLIENT_SECRET_FILE=None)
    agent = installed.start(env)
    assert wait_for(lambda: "refresh failed" in agent.output(), 20), agent.output()
    time.sleep(3)
    assert agent.proc.poll() is None, agent.output()
    assert agent.stop() == 0


def test_load_credential_restarts_reuse_the_token_and_a_rotation_costs_one_request(
    installed: Installed,
) -> None:
    """The README's LoadCredential= drop-in, imitated: at each start the credentials are copied
    into $CREDENTIALS_DIRECTORY (%d), private to the agent's user, as systemd does. A restart
    with unchanged credentials sends no token request (the recorded token is reused); a
    reload after a rotation changes nothing (the copy is the old one); a restart after it sends
    exactly one request, with the new secret."""
    installed.write_credentials(CLIENT_ID, CLIENT_SECRET)
    installed.write_config(poll="1s")
    drop_in = parse_unit(load_credential_block())["Service"]
    credentials = installed.local("/run/credentials/dvs-agent.service")
    sources = {
        name: installed.local(source)
        for key in ("LoadCredential", "LoadCredentialEncrypted")
        for name, _, source in (spec.partition(":") for spec in drop_in.get(key, []))
    }
    # LoadCredentialEncrypted= decrypts at start: here its store holds the plain text
    encrypted = sources["client_secret"]
    encrypted.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copy(installed.local(f"{ETC}/client_secret"), encrypted)
    env = installed.environment(
        **{k: v.replace("%d", str(credentials)) for k, v in unit_environment(drop_in).items()}
    )

    def start() -> AgentRun:
        if credentials.exists():
            shutil.rmtree(credentials)
        credentials.mkdir(mode=0o500, parents=True)
        for name, source in sources.items():
            shutil.copy(source, credentials / name)
            os.chown(credentials / name, AGENT_UID, AGENT_GID)
            os.chmod(credentials / name, 0o400)
        os.chown(credentials, AGENT_UID, AGENT_GID)
        return installed.start(env)

    server = installed.server
    first = start()
    assert wait_for(lambda: installed.secret_of_token() == CLIENT_SECRET, 20), first.output()
    assert first.stop() == 0
    assert len(server.token_requests()) == 1
    # restart, credentials unchanged: the recorded token, no request
    second = start()
    assert wait_for(lambda: "reusing the recorded token" in second.output(), 20), second.output()
    time.sleep(1)
    assert len(server.token_requests()) == 1
    # rotate the stored secret: a reload re-reads the copy, which is still the old one
    server.set_secret(CLIENT_ID, NEW_SECRET)
    encrypted.write_text(NEW_SECRET + "\n")
    installed.reload(second.pid)
    assert wait_for(lambda: '"event":"reload"' in second.output(), 10), second.output()
    time.sleep(2)
    assert all(t.client_secret == CLIENT_SECRET for t in server.issued().values())
    assert second.stop() == 0
    # the restart copies the new secret: exactly one request, with it
    before = len(server.token_requests())
    third = start()
    assert wait_for(lambda: installed.secret_of_token() == NEW_SECRET, 20), third.output()
    time.sleep(1)
    assert len(server.token_requests()) == before + 1
    assert third.stop() == 0
