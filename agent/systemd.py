"""systemd's notify protocol (``Type=notify``, DESIGN §7): ``READY=1``, ``STATUS=``,
``STOPPING=1`` and the watchdog's ``WATCHDOG=1``, each a datagram to ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.schedule import RefreshScheduler


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``READY=1``/``STATUS=…``/``STOPPING=1``; False when not run by systemd."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


class Notifier:
    """What the unit hears of the agent: ``READY=1`` once, with the first ``STATUS=`` line,
    then ``STATUS=`` whenever that line changes, and ``STOPPING=1``."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        #: READY=1 was sent
        self.ready = False
        self._status = ""

    def status(self, line: str) -> None:
        """``READY=1`` with ``line`` the first time, then ``line`` if it changed."""
        if not self.ready:
            self.ready = True
            self._status = line
            sd_notify(f"READY=1\nSTATUS={line}", self._environ)
        elif line != self._status:
            self._status = line
            sd_notify(f"STATUS={line}", self._environ)

    def stopping(self) -> None:
        sd_notify("STOPPING=1", self._environ)


def start_watchdog(scheduler: RefreshScheduler, environ: Mapping[str, str]) -> None:
    """``WATCHDOG=1`` from a job of ``scheduler`` at half ``$WATCHDOG_USEC``, so that systemd
    catches a hung scheduler; nothing when the unit has no watchdog (or it is another pid's)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) <= 0 or (pid and pid != str(os.getpid())):
        return
    interval = timedelta(microseconds=int(usec)) / 2
    scheduler.add_periodic("watchdog", lambda: sd_notify("WATCHDOG=1", environ), interval)
    sd_notify("WATCHDOG=1", environ)
