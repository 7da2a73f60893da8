"""systemd's notify protocol (sd_notify(3)): one datagram per message to $NOTIFY_SOCKET.

Twenty lines instead of a dependency. Outside systemd (no NOTIFY_SOCKET) every call
is a no-op, so the daemon behaves the same in a terminal, in tests and under systemd.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier"]


class Notifier:
    """Sends READY=1, WATCHDOG=1, STATUS=…, STOPPING=1 to the service manager, if there is one."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # '@' is Linux's abstract namespace, written with a leading NUL on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # systemd's advice: ping at half the interval, so one late wake-up is not a restart.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """One message of `KEY=value` lines; False when there is no manager or it is unreachable."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            return False  # the manager went away: nothing to tell, and no reason to stop measuring
        return True
