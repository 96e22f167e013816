"""``dvs-agent example NAME``: the files the package carries, printed without a checkout.

The originals stay in config/ (which the README and the other tests name); agent/examples/
holds links to them, so there is one copy to edit. That the wheel holds the files themselves,
and that an installed wheel prints them from outside a checkout, is in tests/test_packaging.py.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from agent.examples import EXAMPLES, example_text
from tests.conftest import REPO, agent_env, run_cli

EXAMPLES_DIR = REPO / "agent" / "examples"
CONFIG_DIR = REPO / "config"


def test_each_example_is_a_link_to_its_original_in_config() -> None:
    for filename in EXAMPLES.values():
        link = EXAMPLES_DIR / filename
        assert link.is_symlink(), f"{link} is a copy: make it a link to config/{filename}"
        # relative, so that it resolves in any checkout, sdist or build context
        assert os.readlink(link) == f"../../config/{filename}"
        assert link.resolve() == (CONFIG_DIR / filename).resolve()
    # nothing else lies there: every file is one the command can print
    present = {p.name for p in EXAMPLES_DIR.iterdir()} - {"__init__.py", "__pycache__"}
    assert present == set(EXAMPLES.values())


def test_every_example_is_package_data() -> None:
    """What the wheel takes is what the command prints (setuptools copies only the names the
    package-data list gives)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["agent.examples"]
    assert sorted(package_data) == sorted(EXAMPLES.values())


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_prints_the_file(name: str, tmp_path: Path) -> None:
    # from a directory without a config, with $DVS_AGENT_CONFIG pointing nowhere: the command
    # reads no configuration
    missing = str(tmp_path / "nothing.toml")
    result = run_cli("example", name, env=agent_env(DVS_AGENT_CONFIG=missing))
    assert result.returncode == 0, result.stderr
    assert result.stdout == (CONFIG_DIR / EXAMPLES[name]).read_text()
    assert result.stderr == ""
    assert example_text(name) == result.stdout


@pytest.mark.parametrize("args", [["example", "frobnicate"], ["example"]])
def test_an_unknown_or_missing_name_is_a_usage_error_listing_the_names(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 64, result.stderr
    assert result.stdout == ""
    assert "usage: dvs-agent example" in result.stderr
    if len(args) == 2:
        for name in EXAMPLES:
            assert repr(name) in result.stderr, result.stderr


def test_help_names_the_examples() -> None:
    assert list(EXAMPLES) == ["config", "systemd", "alerts", "kubernetes"]  # DESIGN §7
    assert "example" in run_cli("--help").stdout
    text = run_cli("example", "--help").stdout
    for name in EXAMPLES:
        assert name in text


def test_the_readme_shows_the_command_and_the_man_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert "dvs-agent example config" in readme
    assert "man dvs-agent" in readme
