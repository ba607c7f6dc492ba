"""systemd's service notification protocol (sd_notify(3)), written out: a few lines, no dependency.

Under ``Type=notify`` (or ``notify-reload``) systemd passes ``$NOTIFY_SOCKET``, a datagram socket
(a path, or an abstract name written ``@name``), and waits for newline-separated assignments on
it: ``READY=1`` once the service serves, ``RELOADING=1`` with ``MONOTONIC_USEC=`` (the
``CLOCK_MONOTONIC`` time in microseconds, which systemd 253 and later require in the same
datagram) when a reload starts and ``READY=1`` again when it is over, ``STOPPING=1`` when it
begins to stop, ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when
``WatchdogSec=`` is set, and ``STATUS=`` free text for ``systemctl status``.

Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every call does nothing.
A notification that cannot be sent is logged once and otherwise ignored: systemd's own timeouts
then tell the administrator.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("policyd")

#: The variables systemd sets for the main process only; children (postmap) must not see them.
_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify datagrams to the socket systemd named, if it named one.

    ``environ`` is read once, and the variables are removed from it (as sd_notify's
    ``unset_environment`` does) so that child processes do not inherit them.
    """

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_seconds = _watchdog_seconds(env)
        for name in _VARIABLES:
            env.pop(name, None)
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True when systemd asked for notifications."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``assignments`` (``NAME=value``) in one datagram; False if not sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as err:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd (%s): %s", _printable(self.address), err)
            return False
        return True

    def ready(self, status: str) -> bool:
        """Serving: every listener accepts connections."""
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        """A reload begins; ``ready()`` again when it is over, whatever its outcome."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> bool:
        """Stopping: no new connections, answering what is in flight."""
        return self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> bool:
        """Still alive: the reactor turns."""
        return self.send("WATCHDOG=1")


def _socket_address(value: str) -> str | bytes | None:
    """The address to send to: a path, an abstract name (``@name``), or None."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None  # unset, or a kind of socket (vsock:) that systemd 252 does not hand out


def _watchdog_seconds(environ: MutableMapping[str, str]) -> float | None:
    """``$WATCHDOG_USEC`` in seconds when it is meant for this process, else None."""
    text = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not text.isdigit() or (pid and pid != str(os.getpid())):
        return None
    usec = int(text)
    return usec / 1_000_000 if usec > 0 else None


def _printable(address: str | bytes) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode(errors="replace")
    return address
