"""policyd's reactor: installed by ``serve``; reads, writes and failures work as in Twisted's.

Each check runs in a fresh interpreter: a reactor can be installed only once per process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.e2e.policyd_process import PolicydProcess

_SCRIPT = textwrap.dedent(
    """
    import socket
    from policyd.reactor import install

    print("installed", install())
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    print("class", type(reactor).__name__)

    class Echo(Protocol):
        def dataReceived(self, data):
            if data == b"boom":
                raise RuntimeError("a bug in a protocol")
            self.transport.write(data.upper())

    port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    address = ("127.0.0.1", port.getHost().port)

    def client(payload):
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(payload)
            return sock.recv(100)

    def run():
        try:
            print("boom", client(b"boom"))  # the connection is dropped, nothing answered
            print("ping", client(b"ping"))  # and the reactor goes on serving others
            print("second install", install())
        finally:
            reactor.callFromThread(reactor.stop)

    reactor.callInThread(run)
    reactor.run()
    """
)


def test_reactor_serves_and_survives_a_failing_protocol() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    lines = result.stdout.splitlines()
    assert lines == [
        "installed policyd-epoll",
        "class PolicydReactor",
        "boom b''",
        "ping b'PING'",
        "second install default",
    ], result.stderr
    # Twisted's _doReadOrWrite logged the protocol's exception; the reactor did not die of it.
    assert "a bug in a protocol" in result.stderr


def test_serve_runs_on_the_policyd_reactor(tmp_path: Path) -> None:
    """``policyd serve`` installs the reactor before anything imports Twisted's default."""
    process = PolicydProcess(
        {"local_domains": ["local.example"]}, tmp_path, socketmap=False, extra_args=["--debug"]
    )
    process.start()
    try:
        with socket.create_connection((process.host, process.port), timeout=10) as sock:
            sock.sendall(
                b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=u@local.example\n\n"
            )
            assert sock.recv(100) == b"action=DUNNO\n\n"
        assert "reactor: policyd-epoll (PolicydReactor)" in process.wait_for_log("reactor:")
        assert "gc: " in process.wait_for_log("thresholds (20000, 20, 20)")
    finally:
        process.stop()
