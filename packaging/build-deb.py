#!/usr/bin/env python3
"""Build the Debian package ``BUILD/deb/dvs-agent_<version>_<arch>.deb`` (issue 14).

``make deb`` runs it after ``make man completions``. It needs the standard library, dpkg-dev and
the system's python3 with its venv module (python3-venv); ``dpkg-deb --root-owner-group`` builds
the package from a staged tree, without debhelper or fakeroot. What goes in:

- ``/opt/dvs-agent``: a venv of the system's ``/usr/bin/python3``, resolved to its versioned name
  (python3.11 on Debian 12) so that a later default python3 cannot swap the interpreter under the
  venv's site-packages. It holds the agent, installed from a copy of the sources (non-editable),
  and its runtime dependencies, no dev extra. It is built in the staging tree and its staging
  path is then rewritten to /opt/dvs-agent (the entry point's shebang, pyvenv.cfg): the build
  fails if the path is still found in any file. pip, setuptools and the headers directory are
  removed, bin/ keeps only the interpreter links and ``dvs-agent``, and the extension modules are
  stripped (each is imported afterwards, with the agent). No bytecode is shipped: postinst
  compiles it (the service cannot write /opt), prerm removes it.
- ``/usr/bin/dvs-agent`` (a link), the unit in ``/lib/systemd/system`` (config/dvs-agent.service,
  unchanged), ``/etc/dvs-agent/agent.toml`` (config/agent.example.toml, a conffile), the
  sysusers.d and tmpfiles.d snippets, the man page and the bash and zsh completions (from ``make
  man completions``), the README, a DEP-5 copyright file with a paragraph for every bundled
  distribution (its license from its metadata), changelog.Debian.gz and the lintian overrides.

The user, the directories and their modes come from the unit (User=, Group=, RuntimeDirectory=,
StateDirectory= and their modes) and fill packaging/deb/'s templates (``@USER@``, ...); the build
fails if the example config writes elsewhere (its state_dir, its file sinks' directory).

Environment: ``SOURCE_DATE_EPOCH`` (default: the last commit's time) dates the files and the
changelog; ``DEB_REVISION`` (default 1) is the Debian revision; ``DEB_MAINTAINER`` replaces the
Maintainer field. pip reads its own configuration (an index, ``PIP_CONSTRAINT`` to pin versions).
"""

from __future__ import annotations

import argparse
import ast
import email.utils
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "packaging" / "deb"
UNIT = REPO / "config" / "dvs-agent.service"
EXAMPLE_CONFIG = REPO / "config" / "agent.example.toml"

NAME = "dvs-agent"
PREFIX = PurePosixPath("/opt/dvs-agent")
CONFIG_DIR = PurePosixPath("/etc/dvs-agent")
MAINTAINER = "dvs-agent maintainers <maintainers@users.noreply.r-seed-f7b7a6a8.example>"
GECOS = "dvs-agent, keeps DVS access tokens"
# what the copy of the sources the venv installs holds (what the Dockerfile's builder copies)
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "agent", "config")
# removed from the venv once the agent is in: nothing needs them at run time
BUILD_ONLY = ("pip", "setuptools", "wheel")

# Bundled distributions whose metadata does not name their license precisely, read from their
# license files. Any other one must name it in License-Expression, License or one classifier;
# when one does not, the build stops and asks for a line here.
LICENSE_OF = {
    # its LICENSE: dual Apache-2.0/BSD-3-Clause since 2017-12-01, BSD-3-Clause before
    "python-dateutil": "Apache-2.0 AND BSD-3-Clause",
}
LICENSE_ALIASES = {  # License fields and classifiers seen in the wild -> SPDX
    "Apache 2": "Apache-2.0",
    "Apache 2.0": "Apache-2.0",
    "Apache License 2.0": "Apache-2.0",
    "Apache License, Version 2.0": "Apache-2.0",
    "License :: OSI Approved :: Apache Software License": "Apache-2.0",
    "License :: OSI Approved :: MIT License": "MIT",
    "License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "License :: OSI Approved :: ISC License (ISCL)": "ISC",
}
SPDX_TO_DEP5 = {"MIT": "Expat", "BSD-2-Clause": "BSD-2-clause", "BSD-3-Clause": "BSD-3-clause"}
KNOWN_SPDX = {*SPDX_TO_DEP5, "Apache-2.0", "MPL-2.0", "ISC", "PSF-2.0", "MIT-0", "0BSD"}
COMMON_LICENSES = Path("/usr/share/common-licenses")


def fail(message: str) -> NoReturn:
    raise SystemExit(f"build-deb: {message}")


def run(
    argv: Iterable[str | Path], *, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """A command, its output as text; a failure ends the build (unless ``check=False``)."""
    return subprocess.run([str(a) for a in argv], check=check, text=True, **kwargs)


def only(paths: Iterable[Path]) -> Path:
    found = list(paths)
    if len(found) != 1:
        fail(f"expected one match, found {found}")
    return found[0]


# --- what the sources say ----------------------------------------------------------------------


def upstream_version() -> str:
    """``agent.__version__``, read without importing the package."""
    for node in ast.parse((REPO / "agent" / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return str(ast.literal_eval(node.value))
    fail("agent/__init__.py has no __version__")


def debian_version(version: str, revision: str) -> str:
    """PEP 440 to Debian: pre- and dev releases sort before their release (``~``)."""
    match = re.fullmatch(
        r"(\d+(?:\.\d+)*)(?:(a|b|rc)(\d+))?(?:\.post(\d+))?(?:\.dev(\d+))?", version
    )
    if match is None:
        fail(f"cannot map the version {version!r} to a Debian version")
    release, pre, pre_number, post, dev = match.groups()
    upstream = release
    if pre:
        upstream += f"~{pre}{pre_number}"
    if post:
        upstream += f"+post{post}"
    if dev:
        upstream += f"~dev{dev}" if pre or post else f"~~dev{dev}"
    return f"{upstream}-{revision}"


@dataclass(frozen=True)
class Layout:
    """What the unit decides and the package follows: the user and the two directories."""

    user: str
    runtime_dir: PurePosixPath  # /run/<RuntimeDirectory=>: the token files
    runtime_mode: str
    state_dir: PurePosixPath  # /var/lib/<StateDirectory=>: the agent's state
    state_mode: str

    def substitutions(self) -> dict[str, str]:
        return {
            "NAME": NAME,
            "PREFIX": str(PREFIX),
            "CONFIG_DIR": str(CONFIG_DIR),
            "USER": self.user,
            "GROUP": self.user,
            "GECOS": GECOS,
            "RUNTIME_DIR": str(self.runtime_dir),
            "RUNTIME_MODE": self.runtime_mode,
            "STATE_DIR": str(self.state_dir),
            "STATE_MODE": self.state_mode,
        }


def unit_settings(text: str) -> dict[str, str]:
    """The [Service] section's settings (of a name set twice, the last, as systemd reads it)."""
    settings: dict[str, str] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def layout() -> Layout:
    service = unit_settings(UNIT.read_text())
    needed = ("User", "Group", "RuntimeDirectory", "StateDirectory")
    missing = [key for key in needed if key not in service]
    if missing:
        fail(f"{UNIT.relative_to(REPO)} has no {', '.join(missing)}= (the package needs them)")
    if service["User"] != service["Group"]:
        fail("the unit's User= and Group= differ: packaging/deb/sysusers.conf makes one for both")
    found = Layout(
        user=service["User"],
        runtime_dir=PurePosixPath("/run") / service["RuntimeDirectory"],
        runtime_mode=service.get("RuntimeDirectoryMode", "0755"),
        state_dir=PurePosixPath("/var/lib") / service["StateDirectory"],
        state_mode=service.get("StateDirectoryMode", "0755"),
    )
    # the conffile is the example config: it must write where the unit lets the agent write
    config = tomllib.loads(EXAMPLE_CONFIG.read_text())
    state_dir = config.get("agent", {}).get("state_dir")
    if state_dir != str(found.state_dir):
        fail(f"the example config's state_dir is {state_dir}, the unit's {found.state_dir}")
    for name, profile in config.get("profiles", {}).items():
        for sink in profile.get("sinks", []):
            directory = PurePosixPath(sink.get("path", "")).parent
            if sink.get("type", "file") == "file" and directory != found.runtime_dir:
                fail(f"the example's {name} writes {sink['path']}, not in {found.runtime_dir}")
    return found


def fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], template)


# --- the venv ----------------------------------------------------------------------------------


def build_venv(python: Path, root: Path, work: Path, env: dict[str, str]) -> Path:
    """The venv at ``root/opt/dvs-agent``, with the staging path rewritten to /opt/dvs-agent."""
    venv = root / PREFIX.relative_to("/")
    staged = str(venv).encode()
    run([python, "-m", "venv", venv], env=env)
    source = work / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip"]
    run([*pip, "install", "--quiet", "--no-compile", "--no-warn-script-location", source], env=env)
    site = only(venv.glob("lib/python3*/site-packages"))
    present = [d for d in BUILD_ONLY if any(site.glob(f"{d}-*.dist-info"))]
    run([*pip, "uninstall", "--quiet", "--yes", *present], env=env)
    shutil.rmtree(venv / "include")  # for building C extensions: nothing is built here
    # PEP 610's record of where the agent came from: the staging path, of no use on the target
    for direct_url in site.glob("*.dist-info/direct_url.json"):
        record = direct_url.parent / "RECORD"
        entry = f"{direct_url.parent.name}/direct_url.json,"
        lines = record.read_text().splitlines(keepends=True)
        record.write_text("".join(line for line in lines if not line.startswith(entry)))
        direct_url.unlink()
    # bin/ keeps the interpreter and dvs-agent: the activate scripts (there is no pip to use in
    # an activated venv) and the dependencies' own commands (httpx, normalizer, jp.py ...) go
    keep = {"python", "python3", python.name, NAME}
    for path in (venv / "bin").iterdir():
        if path.name not in keep:
            path.unlink()
    script = venv / "bin" / NAME
    shebang, newline, body = script.read_bytes().partition(b"\n")
    if not shebang.startswith(b"#!" + staged + b"/bin/python"):
        fail(f"unexpected shebang in bin/{NAME}: {shebang.decode()}")
    script.write_bytes(shebang.replace(staged, str(PREFIX).encode()) + newline + body)
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace(str(venv), str(PREFIX)))
    remove_bytecode(venv)
    for path in venv.rglob("*"):
        if path.is_file() and not path.is_symlink() and staged in path.read_bytes():
            fail(f"the staging path is still in {path.relative_to(root)}")
    return venv


def remove_bytecode(tree: Path) -> None:
    for cache in list(tree.rglob("__pycache__")):
        shutil.rmtree(cache)


def strip_and_check(venv: Path, env: dict[str, str]) -> list[Path]:
    """Strip the extension modules (as dh_strip does), import each and run the agent, and
    byte-compile everything once (postinst does it on the target): a broken wheel fails here,
    not at install. Returns the ELF files, for dpkg-shlibdeps."""
    python = venv / "bin" / "python"
    site = only(venv.glob("lib/python3*/site-packages"))
    elves = sorted(
        p for p in site.rglob("*.so*") if p.is_file() and p.read_bytes()[:4] == b"\x7fELF"
    )
    if elves and shutil.which("strip"):
        strip = ["strip", "--remove-section=.comment", "--remove-section=.note", "--strip-unneeded"]
        run([*strip, *elves])
    modules = [
        ".".join((p.relative_to(site).parent / p.name.split(".", 1)[0]).parts)
        for p in elves
        if ".cpython-" in p.name or ".abi3." in p.name
    ]
    probe = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)"
    run([python, "-c", probe, *modules], env=env)
    run([python, "-m", "agent", "--version"], env=env, stdout=subprocess.DEVNULL)
    argv: list[str | Path] = [python, "-m", "compileall", "-q", "-j", "0", venv / "lib"]
    compiled = run(argv, env=env, capture_output=True, check=False)
    if compiled.returncode != 0:
        fail(f"byte-compiling the venv failed:\n{compiled.stdout}{compiled.stderr}")
    remove_bytecode(venv)
    return elves


# --- the copyright file ------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundled:
    """A distribution in the venv, as the copyright file names it."""

    name: str
    version: str
    license: str  # an SPDX expression
    authors: str  # from its metadata, without e-mail addresses
    paths: tuple[str, ...]  # DEP-5 patterns of its files, relative to the package root
    license_files: tuple[str, ...]  # relative to site-packages


METADATA_PROBE = r"""
import importlib.metadata as m, json
print(json.dumps([
    {
        "name": d.metadata["Name"], "version": d.metadata["Version"],
        "expression": d.metadata.get("License-Expression"), "license": d.metadata.get("License"),
        "classifiers": [
            c for c in d.metadata.get_all("Classifier") or () if c.startswith("License ::")
        ],
        "authors": d.metadata.get("Author") or d.metadata.get("Author-email")
        or d.metadata.get("Maintainer") or d.metadata.get("Maintainer-email") or "",
        "files": [str(f) for f in d.files or ()],
    }
    for d in m.distributions()
]))
"""


def spdx_of(dist: dict[str, Any]) -> str:
    name = dist["name"]
    if name in LICENSE_OF:
        return LICENSE_OF[name]
    if dist["expression"]:
        return str(dist["expression"])
    text = " ".join((dist["license"] or "").split())
    if text in KNOWN_SPDX:
        return text
    if text in LICENSE_ALIASES:
        return LICENSE_ALIASES[text]
    if len(dist["classifiers"]) == 1 and dist["classifiers"][0] in LICENSE_ALIASES:
        return LICENSE_ALIASES[dist["classifiers"][0]]
    fail(
        f"the license of the bundled {name} {dist['version']} is not clear from its metadata"
        f" ({text[:60]!r}, {dist['classifiers']}): read its license file and add it to"
        " LICENSE_OF in packaging/build-deb.py"
    )


def bundled_distributions(venv: Path, root: Path, env: dict[str, str]) -> list[Bundled]:
    site = only(venv.glob("lib/python3*/site-packages"))
    probe = run([venv / "bin" / "python", "-c", METADATA_PROBE], env=env, capture_output=True)
    bundled = []
    for dist in json.loads(probe.stdout):
        if dist["name"] == NAME:
            continue  # Files: *
        tops = sorted({f.split("/", 1)[0] for f in dist["files"] if not f.startswith("..")})
        paths = tuple(
            f"{(site / top).relative_to(root)}" + ("/*" if (site / top).is_dir() else "")
            for top in tops
        )
        license_files = tuple(
            f
            for f in dist["files"]
            if ".dist-info/" in f
            and re.search(r"LICEN[CS]E|COPYING|NOTICE|AUTHORS", f.rsplit("/", 1)[-1], re.I)
        )
        authors = ", ".join(
            re.sub(r"\s*<[^>]*>", "", a).strip().strip('"') for a in dist["authors"].split(",")
        ).strip(", ")
        bundled.append(
            Bundled(dist["name"], dist["version"], spdx_of(dist), authors, paths, license_files)
        )
    return sorted(bundled, key=lambda b: b.name.lower())


def dep5_license(spdx: str) -> str:
    """SPDX to DEP-5 short names: ``MIT OR Apache-2.0`` is ``Expat or Apache-2.0``."""
    words = re.split(r"(\s+|\(|\))", spdx)
    return "".join(w.lower() if w in ("OR", "AND") else SPDX_TO_DEP5.get(w, w) for w in words)


def copyright_file(bundled: list[Bundled], site: PurePosixPath, years: str) -> str:
    lines = [
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
        f"Upstream-Name: {NAME}",
        f"Comment: The virtual environment under {PREFIX} bundles the Python",
        " distributions the agent depends on. Each has a paragraph below, with its license;",
        " its own license and notice files are in its .dist-info directory under",
        f" /{site}.",
        "",
        "Files: *",
        f"Copyright: {years} the {NAME} authors",
        "License: Apache-2.0",
        "",
    ]
    names = {"Apache-2.0"}
    for dist in bundled:
        license = dep5_license(dist.license)
        names.update(n for n in re.split(r"\s+(?:and|or)\s+|[()\s]", license) if n)
        lines += [
            "Files: " + "\n ".join(dist.paths),
            f"Copyright: the {dist.name} authors" + (f" ({dist.authors})" if dist.authors else ""),
            f"License: {license}",
            f"Comment: {dist.name} {dist.version}; its license and notice files: "
            + (", ".join(dist.license_files) or "none shipped"),
            "",
        ]
    for name in sorted(names):
        lines.append(f"License: {name}")
        if (COMMON_LICENSES / name).is_file():
            lines += [
                f" On Debian systems, the complete text of the {name} license can be found in",
                f' "{COMMON_LICENSES / name}".',
            ]
        else:
            lines += [
                " The complete text, with each holder's copyright notice, is in the license files",
                " named by the Comment of each paragraph above that uses this license.",
            ]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def copyright_years(epoch: int) -> str:
    """From the first commit's year (in a checkout) to SOURCE_DATE_EPOCH's."""
    last = time.gmtime(epoch).tm_year
    argv = ["git", "-C", str(REPO), "log", "--max-parents=0", "--format=%ct"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    stamps = [int(x) for x in result.stdout.split()] if result.returncode == 0 else []
    first = min((time.gmtime(s).tm_year for s in stamps), default=last)
    return f"{first}-{last}" if first < last else str(last)


# --- the package tree --------------------------------------------------------------------------


def install(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def install_gzipped(path: Path, data: bytes) -> None:
    """As ``gzip -9n``: no name and no time inside, so that the package is reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as out,
    ):
        out.write(data)


def changelog(version: str, upstream: str, maintainer: str, epoch: int) -> str:
    date = email.utils.formatdate(epoch).replace("-0000", "+0000")
    return (
        f"{NAME} ({version}) unstable; urgency=medium\n\n"
        f"  * dvs-agent {upstream}, packaged by packaging/build-deb.py.\n\n"
        f" -- {maintainer}  {date}\n"
    )


def normalise(root: Path, epoch: int) -> None:
    """Modes as dh_fixperms leaves them (0755 for directories and commands, 0644 for the rest;
    bundled modules are imported, never run, whatever mode their wheel gave them) and times
    clamped to SOURCE_DATE_EPOCH. Owners are root's: ``dpkg-deb --root-owner-group``."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            executable = path.stat().st_mode & 0o111 and "site-packages" not in path.parts
            path.chmod(0o755 if path.is_dir() or executable else 0o644)
        if path.lstat().st_mtime > epoch:
            os.utime(path, (epoch, epoch), follow_symlinks=False)


def installed_size(root: Path) -> int:
    """In KiB, as dpkg-gencontrol counts: each file rounded up, 1 for each directory or link."""
    total = 0
    for path in root.rglob("*"):
        if path.relative_to(root).parts[0] == "DEBIAN":
            continue
        regular = path.is_file() and not path.is_symlink()
        total += (path.stat().st_size + 1023) // 1024 if regular else 1
    return total


def shlib_depends(package: Path, elves: list[Path]) -> list[str]:
    """dpkg-shlibdeps on the extension modules, in the debian/ layout it expects (``package`` is
    ``debian/<name>``; it reads a debian/control)."""
    if not elves:
        return []
    top = package.parent.parent
    control = package.parent / "control"
    control.write_text(f"Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n")
    argv = ["dpkg-shlibdeps", "-O", "--warnings=1", *(f"-e{e.relative_to(top)}" for e in elves)]
    result = run(argv, cwd=top, capture_output=True)
    control.unlink()
    line = next(x for x in result.stdout.splitlines() if x.startswith("shlibs:Depends="))
    return [d.strip() for d in line.split("=", 1)[1].split(",") if d.strip()]


def md5sums(package: Path) -> str:
    lines = []
    for path in sorted(package.rglob("*")):
        relative = path.relative_to(package)
        if relative.parts[0] != "DEBIAN" and path.is_file() and not path.is_symlink():
            digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
            lines.append(f"{digest}  {relative}\n")
    return "".join(lines)


def source_date_epoch() -> int:
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    argv = ["git", "-C", str(REPO), "log", "-1", "--format=%ct"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    return int(result.stdout) if result.returncode == 0 and result.stdout.strip() else 0


def interpreter(path: Path) -> tuple[Path, str]:
    """The real file behind ``path`` (/usr/bin/python3 -> /usr/bin/python3.11), its X.Y."""
    python = Path(os.path.realpath(path))
    if not python.is_file():
        fail(f"{path} does not exist: apt install python3 python3-venv")
    code = "import ensurepip, sys; print('%d.%d' % sys.version_info[:2])"
    probe = run([python, "-c", code], capture_output=True, check=False)
    if probe.returncode != 0:
        fail(f"{python} cannot make a venv with pip (no ensurepip): apt install python3-venv")
    version = probe.stdout.strip()
    if tuple(int(x) for x in version.split(".")) < (3, 11):
        fail(f"{python} is Python {version}; dvs-agent needs 3.11 or newer")
    return python, version


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--build", type=Path, default=REPO / "build", help="make's BUILD dir")
    parser.add_argument("--python", type=Path, default=Path("/usr/bin/python3"))
    args = parser.parse_args()
    build: Path = args.build.resolve()
    for tool in ("dpkg", "dpkg-deb", "dpkg-shlibdeps"):
        if shutil.which(tool) is None:
            fail(f"{tool} is missing: apt install dpkg-dev")
    python, python_version = interpreter(args.python)
    man = build / "man" / f"{NAME}.8"
    bash = build / "completions" / f"{NAME}.bash"
    zsh = build / "completions" / f"_{NAME}"
    for generated in (man, bash, zsh):
        if not generated.is_file():
            fail(f"{generated} is missing: make man completions BUILD={build}")

    upstream = upstream_version()
    version = debian_version(upstream, os.environ.get("DEB_REVISION", "1"))
    arch = run(["dpkg", "--print-architecture"], capture_output=True).stdout.strip()
    maintainer = os.environ.get("DEB_MAINTAINER", MAINTAINER)
    epoch = source_date_epoch()
    values = layout().substitutions()
    # pip, and the agent run to check the venv: nothing of the caller's venv, no bytecode
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)

    out = build / "deb"
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    package = work / "debian" / NAME  # the layout dpkg-shlibdeps expects
    package.mkdir(parents=True)
    print(f"build-deb: {NAME} {version} ({arch}), a venv of {python}", flush=True)
    venv = build_venv(python, package, work, env)
    elves = strip_and_check(venv, env)
    site = PurePosixPath(only(venv.glob("lib/python3*/site-packages")).relative_to(package))
    bundled = bundled_distributions(venv, package, env)

    (package / "usr/bin").mkdir(parents=True)
    (package / "usr/bin" / NAME).symlink_to(PREFIX / "bin" / NAME)
    install(package / "lib/systemd/system" / f"{NAME}.service", UNIT.read_bytes())
    install(package / CONFIG_DIR.relative_to("/") / "agent.toml", EXAMPLE_CONFIG.read_bytes())
    for template, target in (
        ("sysusers.conf", f"usr/lib/sysusers.d/{NAME}.conf"),
        ("tmpfiles.conf", f"usr/lib/tmpfiles.d/{NAME}.conf"),
        ("lintian-overrides", f"usr/share/lintian/overrides/{NAME}"),
    ):
        install(package / target, fill((TEMPLATES / template).read_text(), values))
    install_gzipped(package / f"usr/share/man/man8/{NAME}.8.gz", man.read_bytes())
    install(package / f"usr/share/bash-completion/completions/{NAME}", bash.read_bytes())
    install(package / f"usr/share/zsh/vendor-completions/_{NAME}", zsh.read_bytes())
    doc = package / "usr/share/doc" / NAME
    install(doc / "copyright", copyright_file(bundled, site, copyright_years(epoch)))
    install_gzipped(
        doc / "changelog.Debian.gz", changelog(version, upstream, maintainer, epoch).encode()
    )
    install_gzipped(doc / "README.md.gz", (REPO / "README.md").read_bytes())

    control = package / "DEBIAN"
    for script in ("postinst", "prerm", "postrm"):
        install(control / script, fill((TEMPLATES / script).read_text(), values), 0o755)
    install(control / "conffiles", f"{CONFIG_DIR}/agent.toml\n")
    normalise(package, epoch)
    fields = {
        "VERSION": version,
        "ARCH": arch,
        "MAINTAINER": maintainer,
        "INSTALLED_SIZE": str(installed_size(package)),
        "DEPENDS": ", ".join([f"python{python_version}", *shlib_depends(package, elves)]),
    }
    install(control / "control", fill((TEMPLATES / "control").read_text(), fields))
    install(control / "md5sums", md5sums(package))
    normalise(control, epoch)

    deb = out / f"{NAME}_{version}_{arch}.deb"
    for old in out.glob(f"{NAME}_*.deb"):
        old.unlink()
    build_env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    run(
        ["dpkg-deb", "--root-owner-group", "--build", package, deb],
        env=build_env,
        stdout=subprocess.DEVNULL,
    )
    shutil.rmtree(work)
    print(f"build-deb: {deb}")


if __name__ == "__main__":
    main()
