"""Socketmap netstring framing without sockets, and the service's lookup over a real socket."""

from __future__ import annotations

import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from policyd.socketmap import MAX_REQUEST_BYTES, SocketmapFactory, SocketmapProtocol
from tests.e2e.policyd_process import PolicydProcess


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class Harness:
    def __init__(self) -> None:
        self.lookups: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.factory = SocketmapFactory(
            self.lookup, lambda reason, peer: self.errors.append(reason)
        )

    def lookup(self, name: str, key: str) -> str:
        self.lookups.append((name, key))
        if name == "boom":
            raise RuntimeError("secret detail")
        return f"OK {name}/{key}" if key != "missing" else "NOTFOUND "

    def connect(self) -> tuple[SocketmapProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000))
        protocol.makeConnection(transport)
        return protocol, transport


def test_whole_request() -> None:
    """One netstring request gets one netstring reply; the key may contain spaces."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(netstring(b"sasl_passwd [smtp.example]:587 with space"))
    assert harness.lookups == [("sasl_passwd", "[smtp.example]:587 with space")]
    assert transport.value() == netstring(b"OK sasl_passwd/[smtp.example]:587 with space")
    assert not transport.disconnecting


def test_byte_by_byte_and_pipelined() -> None:
    """Requests split into single bytes, or several in one write, are answered in order."""
    harness = Harness()
    protocol, transport = harness.connect()
    data = netstring(b"transport a@b.example") + netstring(b"transport missing")
    for index in range(len(data)):
        protocol.dataReceived(data[index : index + 1])
    assert transport.value() == netstring(b"OK transport/a@b.example") + netstring(b"NOTFOUND ")
    protocol.dataReceived(data)
    assert transport.value().count(b",") == 4


@pytest.mark.parametrize(
    "data",
    [
        b"abc:transport x,",
        b"5:transport x,",  # length does not match
        b"21:transport a@b.example;",  # wrong terminator
        b"%d:" % (MAX_REQUEST_BYTES + 1),  # oversized
        b"99999999999999999999:",
    ],
)
def test_framing_errors_close_connection(data: bytes) -> None:
    """A malformed or oversized netstring closes that connection and is reported once."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(data)
    protocol.dataReceived(netstring(b"transport later"))
    assert transport.disconnecting
    assert harness.errors == ["bad_netstring"]
    assert (("transport", "later")) not in harness.lookups


def test_malformed_payload_is_perm() -> None:
    """A request without a space (no key) gets PERM; the connection stays usable."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(netstring(b"transport"))
    assert transport.value() == netstring(b"PERM malformed request: expected 'name key'")
    assert not transport.disconnecting


def test_lookup_exception_is_temp_without_detail() -> None:
    """A failing lookup answers TEMP (mail is deferred) and never leaks the exception text."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(netstring(b"boom key"))
    assert transport.value() == netstring(b"TEMP internal error")
    assert b"secret detail" not in transport.value()
    assert harness.errors == ["lookup_failure"]


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    """Any input yields replies or a reported framing error, never an exception."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(data)
    if transport.disconnecting:
        assert harness.errors == ["bad_netstring"]


# -- over a real socket, through the running service --------------------------------------------


def ask(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(netstring(payload))
    data = b""
    while not (data and data.endswith(b",") and b":" in data):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(data)
        data += chunk
        length, _, rest = data.partition(b":")
        if len(rest) >= int(length) + 1:
            break
    length, _, rest = data.partition(b":")
    return rest[: int(length)]


def _partner_config(tmp_path: Path) -> dict[str, Any]:
    """One cleartext outbound profile whose password (``s3cret-pw``) is in a 0600 file."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret-pw\n")
    secret.chmod(0o600)
    return {
        "local_domains": ["local.example"],
        "outbound": {
            "domains": {
                "partner.example": {
                    "auth": "cleartext",
                    "username": "relay@partner.example",
                    "password_file": str(secret),
                    "nexthop": "[127.0.0.31]:2526",
                }
            }
        },
    }


def test_service_socketmap_over_socket(tmp_path: Path) -> None:
    """policyd serves transport and sasl_passwd on listen.socketmap; unknown maps get PERM;
    a SIGHUP reload changes the answers on the same connection; lookups are counted."""
    config = _partner_config(tmp_path)
    process = PolicydProcess(config, tmp_path / "run", metrics=True)
    port, metrics = process.socketmap_port, process.metrics_port
    process.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert ask(sock, b"transport u@partner.example") == (
                b"OK policyd-cleartext:[127.0.0.31]:2526"
            )
            assert ask(sock, b"transport u@local.example") == b"NOTFOUND "
            assert ask(sock, b"transport *") == b"NOTFOUND "
            assert ask(sock, b"sasl_passwd [127.0.0.31]:2526") == (
                b"OK relay@partner.example:s3cret-pw"
            )
            assert ask(sock, b"sasl_passwd [127.0.0.32]:2526") == b"NOTFOUND "
            assert ask(sock, b"virtual x").startswith(b"PERM ")

            process.config["outbound"]["domains"]["partner.example"]["nexthop"] = "[127.0.0.35]:25"
            process.config_path.write_text(yaml.safe_dump(process.config))
            assert process.process is not None
            process.process.send_signal(signal.SIGHUP)
            process.wait_for_log("reload succeeded")
            assert ask(sock, b"transport u@partner.example") == (
                b"OK policyd-cleartext:[127.0.0.35]:25"
            )
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as page:
            text = page.read().decode()
        assert 'policyd_socketmap_lookups_total{map="transport",result="found"} 2.0' in text
        assert 'policyd_socketmap_lookups_total{map="transport",result="notfound"} 2.0' in text
        assert 'policyd_socketmap_lookups_total{map="sasl_passwd",result="found"} 1.0' in text
        assert 'policyd_socketmap_lookups_total{map="unknown",result="perm"} 1.0' in text
        assert "s3cret-pw" not in text
    finally:
        process.stop()
    assert "s3cret-pw" not in process.log_text()


def test_no_secret_in_json_debug_logs(tmp_path: Path) -> None:
    """With every log line on (--debug) and in JSON, the sasl_passwd answer is never logged."""
    config = _partner_config(tmp_path)
    process = PolicydProcess(
        config, tmp_path / "run", extra_args=["--debug", "--log-format", "json"]
    )
    process.start()
    try:
        with socket.create_connection(("127.0.0.1", process.socketmap_port), timeout=10) as sock:
            assert ask(sock, b"sasl_passwd [127.0.0.31]:2526").endswith(b":s3cret-pw")
        process.wait_for_log("sasl_passwd", "found")
    finally:
        process.stop()
    assert "s3cret-pw" not in process.log_text()
