"""Postfix socketmap framing (socketmap_table(5)): netstrings in, netstrings out.

Each request is one netstring ``<len>:<name> <key>,`` and gets one reply netstring: ``OK data``,
``NOTFOUND ``, ``TEMP reason`` or ``PERM reason``. Connections are persistent. This module only
frames: the lookup function passed in gives the answer. A framing error closes that one
connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import NetstringReceiver
from twisted.python.failure import Failure

from policyd.protocol import describe_peer

#: Answers one lookup: (map name, key) → the reply payload, e.g. "OK smtp:[x]" or "NOTFOUND ".
Lookup = Callable[[str, str], str]

#: Told about every framing error: (reason, peer description).
ErrorReporter = Callable[[str, str], None]

#: Framing problems, as they appear in logs and the ``reason`` metric label.
REASONS = ("bad_netstring", "lookup_failure")

#: The longest request accepted. Postfix 3.12 caps queries at 10000 bytes; 3.7 sends addresses.
MAX_REQUEST_BYTES = 16384


class SocketmapProtocol(NetstringReceiver):
    """One socketmap connection: a reply netstring per request netstring, in order."""

    MAX_LENGTH = MAX_REQUEST_BYTES

    def __init__(self, factory: SocketmapFactory) -> None:
        self.factory = factory
        self._failed = False

    def connectionMade(self) -> None:
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections.discard(self)

    def stringReceived(self, string: bytes) -> None:
        name, sep, key = string.partition(b" ")
        if not sep or not name:
            reply = "PERM malformed request: expected 'name key'"
        else:
            try:
                reply = self.factory.lookup(
                    name.decode("utf-8", "replace"), key.decode("utf-8", "surrogateescape")
                )
            except Exception:
                # Never fail open, never leak exception text: a temporary failure defers mail.
                self.factory.report_error("lookup_failure", describe_peer(self.transport))
                reply = "TEMP internal error"
        self.sendString(reply.encode("utf-8", "surrogateescape"))  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self.brokenPeer:
            # Twisted has already closed the connection; say why, once.
            self._failed = True
            self.factory.report_error("bad_netstring", describe_peer(self.transport))


class SocketmapFactory(Factory):
    """Builds ``SocketmapProtocol`` connections sharing one lookup and error reporter."""

    def __init__(self, lookup: Lookup, report_error: ErrorReporter) -> None:
        self.lookup = lookup
        self.report_error = report_error
        self.connections: set[SocketmapProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> SocketmapProtocol:
        return SocketmapProtocol(self)

    def close_all(self) -> None:
        """Close every connection (socketmap requests are answered at once: none in flight)."""
        for protocol in list(self.connections):
            transport: Any = protocol.transport
            transport.loseConnection()
