"""systemd's notify protocol (``Type=notify``): a datagram to ``$NOTIFY_SOCKET``, a few lines."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


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
