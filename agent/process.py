"""Process-wide hardening done first thing at start (DESIGN §10).

- SIGHUP is blocked before any import that takes time: its default action kills the process,
  and ops may send it (``systemctl reload``) while the agent still starts. A blocked signal
  stays pending; ``run`` unblocks it once its handler is in place, and every other command
  gets the default back after argument parsing.
- The process is marked non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): a child of the same uid
  (an ``on_change`` hook, another local process of that user) can no longer read the agent's
  environment or memory through ``/proc``, and no core dump holds a secret.

And the file descriptors: how many are open (:func:`fds_in_use`), and the soft limit raised to
the hard one for the listeners that serve many connections (:func:`raise_descriptor_limit`).
"""

from __future__ import annotations

import os
import resource
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


#: the most :func:`raise_descriptor_limit` raises the soft limit to (an unlimited hard limit)
DESCRIPTOR_LIMIT_CEILING = 1 << 16


def fds_in_use() -> int:
    """The file descriptors this process has open (0 where the system does not list them)."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            # listdir holds one descriptor of its own while it reads, and lists it
            return max(0, len(os.listdir(directory)) - 1)
        except OSError:
            continue
    return 0


def raise_descriptor_limit() -> int:
    """Raise ``RLIMIT_NOFILE``'s soft limit to its hard limit (to
    :data:`DESCRIPTOR_LIMIT_CEILING` when that is unlimited), as Go's runtime does, and
    return the soft limit now in force. systemd gives services 1024 soft and 524288 hard; a
    proxy serving 256 connections may need more than 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = DESCRIPTOR_LIMIT_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft
        return target
    return soft
