"""The example files the package carries, for ``dvs-agent example NAME`` (DESIGN §7).

Each file here is a symbolic link to its original under ``config/`` at the top of the
repository, which the README and the tests name; setuptools follows the links, so the wheel
holds the files themselves and an installed agent prints them without a checkout.
"""

from __future__ import annotations

from importlib.resources import files

#: the name ``dvs-agent example`` takes → the file it prints
EXAMPLES: dict[str, str] = {
    "config": "agent.example.toml",
    "systemd": "dvs-agent.service",
    "alerts": "prometheus-alerts.yaml",
    "kubernetes": "kubernetes.yaml",
}


def example_text(name: str) -> str:
    """The text of the example called *name* (a key of `EXAMPLES`)."""
    return files(__name__).joinpath(EXAMPLES[name]).read_text(encoding="utf-8")
