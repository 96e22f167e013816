"""``python -m agent`` and the ``dvs-agent`` command: hardening first, then the CLI."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from agent.process import hold_sighup, set_non_dumpable

    hold_sighup()  # before the imports below: a SIGHUP while starting must not kill us
    set_non_dumpable()
    from agent.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
