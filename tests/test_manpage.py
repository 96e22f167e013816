"""The man page and the bash/zsh completions, generated from the argument parser by
``make man completions`` (argparse-manpage and shtab, dev tools the agent never imports).

The tests run the make targets themselves into a temporary build dir, then walk the parser
(every subcommand, every flag, every choice) and look for each in what a reader or a shell
sees: the rendered page, section by section; the bash completion, by running its completion
function; the zsh completion, by its per-command option lists. The page must render without a
warning, and the systemd unit's ``Documentation=man:dvs-agent(8)`` must resolve to it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cli import build_parser
from tests.conftest import REPO

UNIT_PATH = REPO / "config" / "dvs-agent.service"


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # ("dvs-agent",), ("dvs-agent", "run"), ...
    flags: tuple[str, ...]  # every option string but -h/--help, which argparse adds
    choices: tuple[str, ...]  # the choices of its positional arguments (not subcommands)
    subcommands: tuple[str, ...]
    flag_choices: dict[str, tuple[str, ...]]  # a flag with choices (its longest spelling) → them


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> Iterator[Command]:
    flags: list[str] = []
    choices: list[str] = []
    subcommands: dict[str, argparse.ArgumentParser] = {}
    flag_choices: dict[str, tuple[str, ...]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            subcommands = dict(action.choices)
        elif action.option_strings:
            flags += action.option_strings
            if action.choices:
                flag = max(action.option_strings, key=len)
                flag_choices[flag] = tuple(str(choice) for choice in action.choices)
        elif action.choices:
            choices += [str(choice) for choice in action.choices]
    yield Command(words, tuple(flags), tuple(choices), tuple(subcommands), flag_choices)
    for name, sub in subcommands.items():
        yield from _commands(sub, (*words, name))


COMMANDS = list(_commands(build_parser(), ("dvs-agent",)))
IDS = [" ".join(c.words) for c in COMMANDS]


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


@dataclass(frozen=True)
class Generated:
    man: Path
    bash: Path
    zsh: Path


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    make = shutil.which("make")
    assert make, "make is needed to generate the man page and completions (make man completions)"
    build = tmp_path_factory.mktemp("build")
    # -o: the dev toolchain this test runs in is installed; do not remake its stamp
    result = subprocess.run(
        [
            make,
            "--no-print-directory",
            "-s",
            "-o",
            ".venv/.dev-stamp",
            "man",
            "completions",
            f"BUILD={build}",
            f"BIN={Path(sys.executable).parent}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    generated = Generated(
        man=build / "man" / "dvs-agent.8",
        bash=build / "completions" / "dvs-agent.bash",
        zsh=build / "completions" / "_dvs-agent",
    )
    for path in (generated.man, generated.bash, generated.zsh):
        assert path.is_file() and path.stat().st_size > 0, path
    return generated


# --- the man page ------------------------------------------------------------------------------


def _render(page: Path) -> str:
    """The page as a reader sees it: plain text, wide lines, no hyphenation."""
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed: the page cannot be rendered here")
    result = subprocess.run(
        ["groff", "-man", "-Tutf8", "-rLL=300n", "-rHY=0", "-P-cbou", str(page)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    # U+2010 and U+2212: the hyphen and minus glyphs some groff versions print for "-"
    return result.stdout.replace("\u2010", "-").replace("\u2212", "-")


def _sections(text: str) -> dict[str, str]:
    """Heading (a line at column 0) → the text under it."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            current = line.strip()
            sections.setdefault(current, [])
        else:
            sections.setdefault(current, []).append(line)
    return {heading: "\n".join(lines) for heading, lines in sections.items()}


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_the_man_page_documents_every_command_flag_and_choice(
    generated: Generated, command: Command
) -> None:
    sections = _sections(_render(generated.man))
    name = " ".join(command.words)
    # each flag is documented in its command's OPTIONS section (its usage line is not enough)
    if len(command.words) == 1:
        about, options = sections["DESCRIPTION"], sections["OPTIONS"]
    else:
        heading = f"COMMAND '{name}'"
        assert heading in sections, f"no section for {name}: {sorted(sections)}"
        about, options = sections[heading], sections.get(f"OPTIONS '{name}'", "")
    for flag in command.flags:
        assert _mentions(options, flag), f"man page: the options of {name} lack {flag}"
    for flag, values in command.flag_choices.items():
        for value in values:
            assert _mentions(options, value), f"man page: {name} {flag} lacks {value}"
    for choice in command.choices:
        assert _mentions(about, choice), f"man page: {name} lacks the choice {choice}"
    for sub in command.subcommands:
        assert f"COMMAND '{name} {sub}'" in sections, f"man page: no section for {name} {sub}"


def test_the_man_page_renders_without_a_warning(generated: Generated) -> None:
    """Every renderer on this machine: man-db's ``man -l`` (through groff), ``groff -ww`` (all
    warnings), ``mandoc -T lint`` where mandoc is installed."""
    checks = {
        "man": ["man", "--warnings=w", "-l", str(generated.man)],
        "groff": ["groff", "-man", "-Tutf8", "-ww", "-z", str(generated.man)],
        "mandoc": ["mandoc", "-T", "lint", "-W", "warning", str(generated.man)],
    }
    available = {tool: argv for tool, argv in checks.items() if shutil.which(tool)}
    if not available:
        pytest.skip("none of man, groff and mandoc is installed")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"}
    for tool, argv in available.items():
        result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        assert result.returncode == 0 and result.stderr == "", f"{tool}: {result.stderr}"
        if tool == "man":
            assert "dvs-agent" in result.stdout and "DVS-AGENT(8)" in result.stdout


def test_the_page_is_section_8_and_names_the_version(generated: Generated) -> None:
    import agent

    title = next(line for line in generated.man.read_text().splitlines() if line.startswith(".TH"))
    assert title.split()[1:3] == ["DVS\\-AGENT", '"8"'], title
    assert f"dvs\\-agent {agent.__version__}" in title


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_units_documentation_is_this_man_page(generated: Generated, tmp_path: Path) -> None:
    """``systemd-analyze verify`` looks up each ``man:`` entry of Documentation=: with the
    generated page on MANPATH it finds it (and without, it does not: the check is real)."""
    documentation = next(
        line for line in UNIT_PATH.read_text().splitlines() if line.startswith("Documentation=")
    )
    assert "man:dvs-agent(8)" in documentation.split("=", 1)[1].split()
    manpath = tmp_path / "man"
    (manpath / "man8").mkdir(parents=True)
    shutil.copy(generated.man, manpath / "man8" / "dvs-agent.8")
    binary = Path(sys.executable).parent / "dvs-agent"
    unit = tmp_path / "dvs-agent.service"
    unit.write_text(UNIT_PATH.read_text().replace("/opt/dvs-agent/bin/dvs-agent", str(binary)))

    def verify(path: Path) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MANPATH": str(path)}
        return subprocess.run(
            ["systemd-analyze", "verify", str(unit)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )

    found = verify(manpath)
    assert found.returncode == 0 and found.stderr.strip() == "", found.stderr
    missing = verify(tmp_path / "no-man-pages")
    assert missing.returncode != 0 and "dvs-agent(8)" in missing.stderr


# --- the completions ---------------------------------------------------------------------------


def _bash_completions(script: Path, lines: list[list[str]]) -> list[set[str]]:
    """What bash offers after each command line (the last word is the one being completed)."""
    program = [f"source {script}"]
    for words in lines:
        quoted = " ".join(f"'{w}'" for w in words)
        program.append(
            f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; COMPREPLY=(); "
            "_shtab_dvs_agent; printf '%s\\n' \"${COMPREPLY[@]}\"; echo '<end>'"
        )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", "\n".join(program)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    blocks = result.stdout.split("<end>\n")[: len(lines)]
    assert len(blocks) == len(lines), result.stdout
    return [{word for word in block.splitlines() if word} for block in blocks]


def test_the_bash_completion_offers_every_command_flag_and_choice(generated: Generated) -> None:
    assert shutil.which("bash"), "bash is not installed"
    text = generated.bash.read_text()
    assert re.search(r"^complete .*-F _shtab_dvs_agent dvs-agent$", text, re.MULTILINE)
    lines: list[list[str]] = []
    for command in COMMANDS:
        lines.append([*command.words, "-"])  # the flags, after a dash
        lines.append([*command.words, ""])  # the subcommands or choices
    values = [(c, flag) for c in COMMANDS for flag in c.flag_choices]
    lines += [[*command.words, flag, ""] for command, flag in values]  # a flag's values
    offered = _bash_completions(generated.bash, lines)
    for (command, flag), words in zip(values, offered[2 * len(COMMANDS) :], strict=True):
        name = " ".join(command.words)
        assert set(command.flag_choices[flag]) <= words, f"bash, {name} {flag} <TAB>: {words}"
    offered = offered[: 2 * len(COMMANDS)]
    pairs = zip(offered[::2], offered[1::2], strict=True)
    for command, (flags, words) in zip(COMMANDS, pairs, strict=True):
        name = " ".join(command.words)
        assert set(command.flags) <= flags, f"bash, {name} -<TAB>: {sorted(flags)}"
        expected = set(command.subcommands) | set(command.choices)
        assert expected <= words, f"bash, {name} <TAB>: {sorted(words)}"


def test_the_zsh_completion_names_every_command_flag_and_choice(generated: Generated) -> None:
    text = generated.zsh.read_text()
    assert text.startswith("#compdef dvs-agent\n")
    if shutil.which("zsh"):
        result = subprocess.run(["zsh", "-n", str(generated.zsh)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        name = " ".join(command.words)
        prefix = "_".join(["_shtab_dvs_agent", *command.words[1:]]).replace("-", "_")
        block = re.search(rf"^{re.escape(prefix)}_options=\(\n(.*?)^\)", text, re.M | re.S)
        assert block, f"zsh: no option list for {name} ({prefix}_options)"
        for flag in command.flags:
            assert _mentions(block.group(1), flag), f"zsh: {name} lacks {flag}"
        # choices are completed from a ":(one two ...)" action
        offered = {
            w for group in re.findall(r":\(([^)]*)\)", block.group(1)) for w in group.split()
        }
        assert set(command.choices) <= offered, f"zsh: {name} offers {sorted(offered)}"
        for flag, values in command.flag_choices.items():
            spec = re.search(rf"{re.escape(flag)}\[.*?:\(([^)]*)\)", block.group(1))
            assert spec and set(values) <= set(spec.group(1).split()), f"zsh: {name} {flag}"
        if len(command.words) > 1:
            # a command with subcommands has a function of its own
            word, fn = re.escape(command.words[-1]), re.escape(prefix)
            dispatch = (
                rf"^\s+{word}\) {fn} ;;"
                if command.subcommands
                else rf"^\s+{word}\) _arguments .*\${fn}_options"
            )
            assert re.search(dispatch, text, re.M), f"zsh: {name} is not dispatched"
        if command.subcommands:
            listing = re.search(
                rf"^{re.escape(prefix)}_commands\(\) \{{\n(.*?)^\}}", text, re.M | re.S
            )
            assert listing, f"zsh: no command list for {name}"
            for sub in command.subcommands:
                assert re.search(rf"^\s+{re.escape(sub)}:", listing.group(1), re.M), (
                    f"zsh: {name} lacks the command {sub}"
                )


# --- generated, never shipped to the daemon ----------------------------------------------------


def test_the_generators_are_dev_tools_the_agent_never_imports() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}

    assert {"argparse-manpage", "shtab"} <= names(pyproject["optional-dependencies"]["dev"])
    assert not {"argparse-manpage", "shtab"} & names(pyproject["dependencies"])
    code = (
        "import sys, agent.cli, agent.app; agent.cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'shtab', 'build_manpages'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"
