"""The signals the daemon serves, and keeping them away from its other threads."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

#: SIGHUP reloads; SIGTERM and SIGINT stop
SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def signals_to_main_thread() -> Iterator[None]:
    """Threads started inside block :data:`SIGNALS`, so that the kernel delivers them to the
    main thread. Python runs handlers in the main thread, but a signal that another thread took
    does not wake the main thread from a blocking wait (a queue or an event): the stop would
    wait for something else to wake it. Threads those threads start inherit the mask."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
