"""systemd's service notification protocol (``sd_notify``), in a few lines of stdlib.

Under a unit with ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` to a unix datagram socket
(a filesystem path, or ``@name`` for Linux's abstract namespace) and waits for ``READY=1``
before it considers the service started; ``STOPPING=1`` says a stop has begun, ``STATUS=...``
is shown by ``systemctl status``, and with ``WatchdogSec=`` it sets ``WATCHDOG_USEC`` and
expects ``WATCHDOG=1`` at least that often (we send it from the event loop, at half the period,
so a wedged loop gets the service restarted).

Why no library: the protocol is one ``sendto`` per message; the pure-Python ``sdnotify``
package has had no release since 2017 and ``systemd-python`` needs libsystemd headers to build.

Guarantees: without ``NOTIFY_SOCKET`` every call is a no-op; a send never blocks (the socket is
non-blocking: a full receive queue drops the message); a send that fails (socket gone, queue
full, systemd restarting) is logged once at debug level and never raises, since a service must
not fail or stall because its supervisor's socket did.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends ``sd_notify`` messages to ``NOTIFY_SOCKET`` (no-op when it is unset)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if raw.startswith("@"):
            self.address = b"\0" + raw[1:].encode()  # abstract namespace
        elif raw.startswith("/"):
            self.address = raw
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6  # half the period, in seconds
        self._sock: socket.socket | None = None
        self._failed = False

    def __repr__(self) -> str:
        where = self.address if self.address is not None else "off"
        return f"<Notifier {where!r} watchdog={self.watchdog_interval}>"

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; True if it was sent."""
        if self.address is None or not lines:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop: a receiver that stopped reading (its queue full)
                # gets the message dropped (BlockingIOError) instead of stalling the agent.
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.debug("sd_notify to %r failed: %s", self.address, exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str = "ready") -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
