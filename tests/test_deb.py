"""The Debian package (issue 14), built by ``make deb`` and installed on this machine for real.

Built once for the module into a temp build dir, then: lintian finds no error or warning that
packaging/deb/lintian-overrides does not override; the package holds what it should; ``dpkg -i``
creates the unit's user and directories; the installed ``dvs-agent`` prints its version, checks
the shipped config and gets a token as the unit's user (from the project's token server, through
the unit's ``_FILE`` credential files); ``systemd-analyze verify`` accepts the installed unit (it
reads unit files offline, so it needs no running systemd: this container has none); an upgrade
in place, ``dpkg -r`` (configuration and state kept) and ``dpkg -P`` (both gone) do what the
maintainer scripts promise.

They need root and dpkg, and run where CI runs (as root in a Debian 12 container): there
(``CI`` set) a missing tool fails them; elsewhere they skip, saying why. They refuse a machine
where dvs-agent is installed or its paths exist (they would replace and purge it), and leave it
as they found it: a finalizer purges the package even when a test fails, and deletes the system
user if the package made it (purge keeps it, as Debian does). ``pytest -m deb`` selects them.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import agent
from agent.devserver import TokenServer
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REPO
from tests.test_systemd_install import parse_unit, unit_environment

NAME = "dvs-agent"
UNIT_SOURCE = REPO / "config" / "dvs-agent.service"
EXAMPLE_CONFIG = REPO / "config" / "agent.example.toml"
UNIT = Path("/lib/systemd/system/dvs-agent.service")
BINARY = Path("/usr/bin/dvs-agent")
PREFIX = Path("/opt/dvs-agent")
ETC = Path("/etc/dvs-agent")
CONFFILE = ETC / "agent.toml"
#: the paths the package makes or its scripts delete: none may exist before the tests
OURS = (ETC, PREFIX, Path("/var/lib/dvs-agent"), Path("/run/dvs-agent"), UNIT, BINARY)
#: the environment of every installed command: nothing of this test's venv or checkout
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


def _unmet() -> str | None:
    """Why the tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: it installs the package on this machine"
    for tool, package in (("dpkg", "dpkg"), ("dpkg-shlibdeps", "dpkg-dev")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt install {package}; `make unit` does, as root)"
    python = ["/usr/bin/python3", "-c", "import ensurepip"]
    if not Path(python[0]).exists() or subprocess.run(python, capture_output=True).returncode:
        return "the system's python3 cannot make a venv (apt install python3 python3-venv)"
    return None


def _require(reason: str | None) -> None:
    """Skip for ``reason``, except in CI, where these tests must run: fail there."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the .deb tests")
    pytest.skip(reason)


pytestmark = [pytest.mark.deb, pytest.mark.timeout(900)]


def run(*argv: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """An installed command, from /, in a clean environment (or ``env=``), never raising."""
    kwargs.setdefault("env", CLEAN_ENV)
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
        timeout=300,
        **kwargs,
    )


def ok(*argv: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = run(*argv, **kwargs)
    assert result.returncode == 0, f"{argv}: {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def dpkg_status() -> str | None:
    """dpkg's status of the package (``install ok installed``, ...), None when it has none."""
    result = run("dpkg-query", "-W", "-f=${Status}", NAME)
    status = result.stdout.strip() if result.returncode == 0 else ""
    return None if not status or status.endswith(" not-installed") else status


# --- the build ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require(_unmet())
    build = tmp_path_factory.mktemp("build")
    # -o: the dev toolchain this test runs in is installed; do not remake its stamp
    argv = [
        "make",
        "--no-print-directory",
        "-s",
        "-o",
        ".venv/.dev-stamp",
        "deb",
        f"BUILD={build}",
        f"BIN={Path(sys.executable).parent}",
    ]
    result = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = sorted((build / "deb").glob("*.deb"))
    arch = ok("dpkg", "--print-architecture").stdout.strip()
    assert [p.name for p in found] == [f"{NAME}_{agent.__version__}-1_{arch}.deb"], found
    return found[0]


def test_lintian_finds_no_error_or_warning(deb: Path) -> None:
    """Every E: and W: tag fails the test, unless the package's overrides (each with its
    reason) cover it; a summary of the tags, info tags too, is printed (``pytest -s``)."""
    if shutil.which("lintian") is None:
        _require("lintian is not installed (apt install lintian; `make unit` does, as root)")
    # --no-cfg: no user's or host's lintianrc may silence a tag
    argv = ["lintian", "--no-cfg", "--display-info", "--tag-display-limit=0"]
    result = run(*argv, "--fail-on=error,warning", deb)
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:")]
    counts: dict[str, int] = {}
    for line in tags:
        key = " ".join(line.split()[:3:2])
        counts[key] = counts.get(key, 0) + 1
    print("lintian:", ", ".join(f"{key} x{n}" for key, n in sorted(counts.items())) or "nothing")
    flagged = [line for line in tags if line.startswith(("E:", "W:"))]
    assert not flagged, "\n".join(flagged)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_holds_the_sources_files_and_no_bytecode(deb: Path) -> None:
    info = ok("dpkg-deb", "--field", deb, "Version", "Depends").stdout
    assert f"Version: {agent.__version__}-1" in info
    listing = ok("dpkg-deb", "--contents", deb).stdout.splitlines()
    paths = {line.split()[5].removeprefix(".").split(" -> ")[0] for line in listing}
    links = {
        line.split()[5].removeprefix("."): line.split()[-1] for line in listing if " -> " in line
    }
    assert links["/usr/bin/dvs-agent"] == "/opt/dvs-agent/bin/dvs-agent"
    for path in (
        "/opt/dvs-agent/bin/dvs-agent",
        "/opt/dvs-agent/pyvenv.cfg",
        str(UNIT),
        str(CONFFILE),
        "/usr/lib/sysusers.d/dvs-agent.conf",
        "/usr/lib/tmpfiles.d/dvs-agent.conf",
        "/usr/share/man/man8/dvs-agent.8.gz",
        "/usr/share/bash-completion/completions/dvs-agent",
        "/usr/share/zsh/vendor-completions/_dvs-agent",
        "/usr/share/doc/dvs-agent/copyright",
        "/usr/share/doc/dvs-agent/changelog.Debian.gz",
        "/usr/share/lintian/overrides/dvs-agent",
    ):
        assert path in paths, f"the package lacks {path}"
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]
    site = [p for p in paths if "/site-packages/" in p]
    for unwanted in ("pip", "setuptools", "_distutils_hack"):
        assert not [p for p in site if f"/site-packages/{unwanted}/" in p], unwanted
    # bin/: the venv's interpreter (the system's, by its versioned name) and the agent
    python = re.search(r"\bpython3\.\d+\b", info)
    assert python, info
    commands = {p.rsplit("/", 1)[1] for p in paths if p.startswith("/opt/dvs-agent/bin/")} - {""}
    assert commands == {NAME, "python", "python3", python.group()}
    assert links[f"/opt/dvs-agent/bin/{python.group()}"] == f"/usr/bin/{python.group()}"
    # the unit and the conffile are the sources' own files; the conffile is registered as one
    extract = deb.parent / "extract"
    shutil.rmtree(extract, ignore_errors=True)
    ok("dpkg-deb", "--raw-extract", deb, extract)
    assert (extract / UNIT.relative_to("/")).read_bytes() == UNIT_SOURCE.read_bytes()
    assert (extract / CONFFILE.relative_to("/")).read_bytes() == EXAMPLE_CONFIG.read_bytes()
    assert (extract / "DEBIAN" / "conffiles").read_text() == f"{CONFFILE}\n"
    for script in ("postinst", "prerm", "postrm"):
        text = (extract / "DEBIAN" / script).read_text()
        assert text.startswith("#!/bin/sh\n") and "\nset -e\n" in text, script
        assert "@" not in text.replace("$@", ""), f"{script}: an unfilled @NAME@"
        ok("sh", "-n", extract / "DEBIAN" / script)
    # built in a staging tree, the venv names only its final path (and the system's python)
    venv = extract / "opt" / "dvs-agent"
    assert (venv / "bin" / NAME).read_text().startswith("#!/opt/dvs-agent/bin/python\n")
    cfg = (venv / "pyvenv.cfg").read_text()
    absolute = re.findall(r"(?<![\w.-])/[\w./-]+", cfg)
    assert absolute and all(re.match(r"/usr/bin(/|$)|/opt/dvs-agent(/|$)", a) for a in absolute), (
        cfg
    )
    shutil.rmtree(extract)


# --- installed on this machine -----------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    deb: Path
    service: dict[str, list[str]]  # the installed unit's [Service]

    @property
    def user(self) -> str:
        return self.service["User"][0]

    def environment(self) -> dict[str, str]:
        """What the unit gives the agent: its Environment= lines (the _FILE credentials)."""
        return {**CLEAN_ENV, **unit_environment(self.service)}

    def write_credentials(self) -> dict[str, str]:
        """The files the unit's ``_FILE`` variables name, as the README installs them
        (the agent's user's, group root, 0400: the consumers in its group never read them)."""
        values = {"DVS_CLIENT_ID_FILE": CLIENT_ID, "DVS_CLIENT_SECRET_FILE": CLIENT_SECRET}
        env = unit_environment(self.service)
        assert sorted(env) == sorted(values), env
        uid = pwd.getpwnam(self.service["User"][0]).pw_uid
        for variable, value in values.items():
            path = Path(env[variable])
            path.write_text(value + "\n")
            os.chown(path, uid, 0)
            path.chmod(0o400)
        return env


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Installed]:
    status = dpkg_status()
    present = [str(p) for p in OURS if p.exists() or p.is_symlink()]
    if status or present:
        _require(
            f"{NAME} is on this machine ({status or ', '.join(present)}):"
            " the tests would replace and purge it"
        )
    user = parse_unit(UNIT_SOURCE.read_text())["Service"]["User"][0]
    had_user = _exists(pwd.getpwnam, user)
    had_group = _exists(grp.getgrnam, user)
    try:
        ok("dpkg", "-i", deb)
        yield Installed(deb, parse_unit(UNIT.read_text())["Service"])
    finally:
        if dpkg_status() is not None:
            subprocess.run(["dpkg", "--purge", NAME], capture_output=True, check=False)
        if not had_user and _exists(pwd.getpwnam, user):
            subprocess.run(["userdel", user], capture_output=True, check=False)
        if not had_group and _exists(grp.getgrnam, user):
            subprocess.run(["groupdel", user], capture_output=True, check=False)


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def test_the_installed_agent_prints_its_version_and_checks_the_shipped_config(
    installed: Installed,
) -> None:
    assert BINARY.is_symlink() and os.readlink(BINARY) == "/opt/dvs-agent/bin/dvs-agent"
    assert ok(BINARY, "--version").stdout.strip() == f"{NAME} {agent.__version__}"
    installed.write_credentials()
    checked = ok(BINARY, "check", "-c", CONFFILE, env=installed.environment())
    assert f"{CONFFILE}: ok" in checked.stdout, checked.stdout


def test_the_installed_agent_gets_a_token_as_the_units_user(installed: Installed) -> None:
    """``once`` as the unit's user and group (setpriv, no new privileges), with the unit's
    environment and the credential files: the venv's modules import and work on the target, the
    user can read its credentials and write its directories."""
    if shutil.which("setpriv") is None:
        _require("setpriv is missing (apt install util-linux)")
    installed.write_credentials()
    entry = pwd.getpwnam(installed.user)
    config = ETC / "test-once.toml"  # root's, 0644: as the agent wants its config
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}) as server:
        config.write_text(
            f"""
[agent]
state_dir = "/var/lib/dvs-agent"

[health]
listen = ""

[profiles.dvs]
token_url = "{server.url}"

[[profiles.dvs.sinks]]
type = "file"
path = "/run/dvs-agent/token"
mode = "0640"
"""
        )
        as_agent = [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            "--no-new-privs",
        ]
        ok(*as_agent, BINARY, "once", "-c", config, env=installed.environment())
        token = Path("/run/dvs-agent/token")
        assert token.read_text() in server.issued()
    info = token.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (entry.pw_uid, 0o640)
    assert any(Path("/var/lib/dvs-agent").iterdir()), "no state recorded"


def test_systemd_analyze_verifies_the_installed_unit(installed: Installed) -> None:
    """Offline (no systemd runs here): it checks the unit's syntax, that ExecStart's binary
    exists, and that the man page of Documentation= is installed (``man:dvs-agent(8)``)."""
    if shutil.which("systemd-analyze") is None:
        _require("systemd-analyze is missing (apt install systemd)")
    documentation = parse_unit(UNIT.read_text())["Unit"]["Documentation"]
    assert "man:dvs-agent(8)" in " ".join(documentation).split()
    result = ok("systemd-analyze", "verify", UNIT)
    assert result.stderr.strip() == "", result.stderr
    assert ok("man", "-w", "8", NAME).stdout.strip() == "/usr/share/man/man8/dvs-agent.8.gz"


def test_the_user_and_the_directories_are_the_units(installed: Installed) -> None:
    service = installed.service
    entry = pwd.getpwnam(installed.user)
    assert grp.getgrgid(entry.pw_gid).gr_name == service["Group"][0]
    assert entry.pw_uid < 1000 and entry.pw_shell == "/usr/sbin/nologin"  # a system user
    for setting, base, default in (("Runtime", "/run", "0755"), ("State", "/var/lib", "0755")):
        path = Path(base) / service[f"{setting}Directory"][0]
        mode = int(service.get(f"{setting}DirectoryMode", [default])[0], 8)
        info = path.stat()
        assert stat.S_ISDIR(info.st_mode), path
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
            entry.pw_uid,
            entry.pw_gid,
            mode,
        ), (path, oct(info.st_mode))
    conffiles = ok("dpkg-query", "-W", "-f=${Conffiles}", NAME).stdout
    assert str(CONFFILE) in conffiles
    # installed, not enabled (it has no credentials yet); its bytecode compiled by postinst
    wants = Path("/etc/systemd/system/multi-user.target.wants") / UNIT.name
    assert not wants.exists() and not wants.is_symlink()
    assert any(PREFIX.glob("lib/python3*/site-packages/agent/__pycache__/*.pyc"))


def test_upgrade_remove_and_purge(installed: Installed) -> None:
    """Installing over itself (the upgrade path of every script) changes nothing; remove keeps
    the configuration, the credential files and the state, and takes the program; purge takes
    the rest, but not the system user (Debian practice)."""
    credentials = [Path(p) for p in installed.write_credentials().values()]
    state = Path("/var/lib/dvs-agent")
    (state / "kept").write_text("state\n")
    ok("dpkg", "-i", installed.deb)
    assert dpkg_status() == "install ok installed"
    assert ok(BINARY, "--version").returncode == 0
    assert (state / "kept").exists()

    ok("dpkg", "--remove", NAME)
    assert dpkg_status() == "deinstall ok config-files"
    for gone in (BINARY, PREFIX, UNIT):
        assert not gone.exists() and not gone.is_symlink(), f"{gone} is left after remove"
    assert CONFFILE.read_bytes() == EXAMPLE_CONFIG.read_bytes()
    for path in [*credentials, state / "kept"]:
        assert path.exists(), f"remove took {path}"

    ok("dpkg", "--purge", NAME)
    assert dpkg_status() is None
    for gone in OURS:
        assert not gone.exists() and not gone.is_symlink(), f"{gone} is left after purge"
    for leftover in (
        Path("/etc/systemd/system") / UNIT.name,  # the mask remove sets, unmasked by purge
        Path("/var/lib/systemd/deb-systemd-helper-enabled") / f"{UNIT.name}.dsh-also",
    ):
        assert not leftover.exists() and not leftover.is_symlink(), leftover
    assert _exists(pwd.getpwnam, installed.user)
