"""dvs-agent as users install it, for the benchmarks: a fresh venv with runtime deps only.

The dev venv also holds the test tools (and click, which httpx then imports) plus an
editable-install hook, so start-up time and memory there are worse than in a deployment.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV_AGENT = Path(sys.executable).parent / "dvs-agent"


def install_agent(base: Path) -> Path:
    """Install the checkout into ``base/agent-venv``; returns its ``dvs-agent``."""
    venv = base / "agent-venv"
    print("installing dvs-agent into a fresh venv (runtime dependencies only)…", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(ROOT)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return venv / "bin" / "dvs-agent"
