"""The administration socket (``listen.control``): ``policyd limits show|reset KEY``.

A unix socket, mode 0600: only the policyd user and root may connect, which is its whole
authentication. One command per connection: a line ``show KEY`` or ``reset KEY``; the answer
is a status line (``ok`` or ``error``), the text for the administrator, and the end of the
connection.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

#: Runs one command: (command, key) -> (ok, text), at once or later.
Commands = Callable[[str, str], "defer.Deferred[tuple[bool, str]]"]
COMMANDS = ("show", "reset")
#: A key is a login or an address: a line longer than this is not a command.
MAX_LINE = 1024
#: How long the client waits for the answer (a shared store answers within its deadline).
CLIENT_TIMEOUT_SECONDS = 10.0


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, commands: Commands) -> None:
        self.commands = commands
        self._busy = False

    def lineReceived(self, line: bytes) -> None:
        if self._busy:
            return  # one command per connection
        self._busy = True
        command, _, key = line.decode("utf-8", "replace").strip().partition(" ")
        key = key.strip()
        if command not in COMMANDS or not key:
            self._answer((False, f"expected one of: {', '.join(COMMANDS)} KEY"))
            return
        answer = defer.maybeDeferred(self.commands, command, key)
        answer.addErrback(lambda failure: (False, f"internal error: {failure.value}"))
        answer.addCallback(self._answer)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._busy = True
        self._answer((False, f"command longer than {MAX_LINE} bytes"))

    def _answer(self, result: tuple[bool, str]) -> None:
        ok, text = result
        if self.transport is None:
            return
        status = b"ok\n" if ok else b"error\n"
        self.transport.write(status + text.rstrip("\n").encode("utf-8") + b"\n")
        self.transport.loseConnection()


class ControlFactory(Factory):
    noisy = False

    def __init__(self, commands: Commands) -> None:
        self.commands = commands

    def buildProtocol(self, addr: IAddress | None) -> ControlProtocol:
        return ControlProtocol(self.commands)


class ControlError(RuntimeError):
    """The running policyd could not be asked (not running, no permission, no answer)."""


def ask(path: str, command: str, key: str) -> tuple[bool, str]:
    """Send one command to the policyd listening on ``path``; (ok, text). Blocking: the CLI."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CLIENT_TIMEOUT_SECONDS)
            sock.connect(path)
            sock.sendall(f"{command} {key}\n".encode())
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError as err:
        raise ControlError(f"cannot ask policyd at unix:{path}: {err}") from None
    status, _, text = b"".join(chunks).decode("utf-8", "replace").partition("\n")
    if status not in ("ok", "error"):
        raise ControlError(f"unexpected answer from unix:{path}: {status!r}")
    return status == "ok", text.rstrip("\n")
