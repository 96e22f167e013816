"""``python -m agent``: the same as the ``dvs-agent`` command."""

from agent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
