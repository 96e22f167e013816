"""Process-wide hardening done first thing at start (DESIGN §10).

- SIGHUP is blocked before any import that takes time: its default action kills the process,
  and ops may send it (``systemctl reload``) while the agent still starts. A blocked signal
  stays pending; ``run`` unblocks it once its handler is in place, and every other command
  gets the default back after argument parsing.
- The process is marked non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): a child of the same uid
  (an ``on_change`` hook, another local process of that user) can no longer read the agent's
  environment or memory through ``/proc``, and no core dump holds a secret.
"""

from __future__ import annotations

import signal

#: prctl(2) option
_PR_SET_DUMPABLE = 4


def hold_sighup() -> None:
    """Block SIGHUP in this (the main) thread; threads started later inherit the mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def release_sighup() -> None:
    """Unblock SIGHUP: a SIGHUP that arrived meanwhile is delivered now (to its handler, if
    one is installed, else with its default action)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def set_non_dumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)``; False where it is not available (not Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
