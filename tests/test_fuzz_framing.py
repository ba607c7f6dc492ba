"""Protocol fuzzing: hostile bytes into the policy and socketmap framing of the real service.

The handler is the real PolicyService (not a stub), with rules that permit nobody: whatever
the bytes, the only answers it can give are DUNNO (local mail or not a relay decision), the
denial and the temporary error. So any other reply is a permit born of garbage. Every test
also checks the buffers stay bounded after every chunk, and that a good request on a fresh
connection is still answered correctly afterwards (nothing shared was damaged).

``POLICYD_FUZZ_SCALE`` multiplies the number of examples (1 in the test command; the longer
run in docs/security.md sets 50).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from policyd.config import load_config
from policyd.metrics import Metrics
from policyd.protocol import PolicyFactory, PolicyProtocol
from policyd.service import PolicyService
from policyd.socketmap import MAX_REQUEST_BYTES, SocketmapFactory, SocketmapProtocol

CONFIG = """
listen: {policy: "inet:127.0.0.1:10040"}
local_domains: [local.example]
relay: {allow: {authenticated: false}}
limits: {max_line_bytes: 1024, max_request_bytes: 4096, max_attributes: 40}
outbound:
  default: {auth: none}
  domains:
    partner.example: {auth: none, nexthop: "[smtp.partner.example]:587"}
"""

SCALE = int(os.environ.get("POLICYD_FUZZ_SCALE", "1"))
FIXTURE = [HealthCheck.function_scoped_fixture]  # the service is stateless between examples

DENIED = "550 5.7.1 Relaying Denied"
ALLOWED_ANSWERS = {"DUNNO", DENIED, "451 4.3.0 Relay policy temporarily unavailable"}

GOOD = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"client_address=198.51.100.7\n"
    b"sasl_username=\n"
    b"recipient=user@remote.example\n"
    b"\n"
)
LOCAL = GOOD.replace(b"user@remote.example", b"user@local.example")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> PolicyService:
    path = tmp_path_factory.mktemp("fuzz") / "policyd.yaml"
    path.write_text(CONFIG)
    return PolicyService(
        str(path), load_config(path), MemoryReactorClock(), Metrics(CollectorRegistry())
    )


def answers(value: bytes) -> list[str]:
    """The actions in a transport's output, which must be whole ``action=...`` replies."""
    assert value.endswith(b"\n\n") or not value, value
    replies = value.split(b"\n\n")[:-1]
    actions = []
    for reply in replies:
        assert reply.startswith(b"action="), reply
        assert b"\n" not in reply, reply
        actions.append(reply[len(b"action=") :].decode())
    return actions


def policy_connection(service: PolicyService) -> tuple[PolicyProtocol, StringTransport]:
    factory = PolicyFactory(
        service.handle, lambda reason, peer: None, service.config.limits, MemoryReactorClock()
    )
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def feed_policy(service: PolicyService, chunks: list[bytes]) -> list[str]:
    """Feed ``chunks`` to one connection, checking the buffer bound after each."""
    protocol, transport = policy_connection(service)
    limit = service.config.limits.max_request_bytes
    for chunk in chunks:
        protocol.dataReceived(chunk)
        # Never more than one request's worth held, whatever arrived.
        assert len(protocol._buffer) <= limit
        assert not protocol._queued  # the handler answers at once: nothing waits
    return answers(transport.value())


def still_answers(service: PolicyService) -> None:
    """A fresh connection gets the right answers: garbage left nothing behind."""
    assert feed_policy(service, [GOOD, LOCAL]) == [DENIED, "DUNNO"]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


ATTRIBUTE_NAMES = st.sampled_from(
    [
        b"request",
        b"protocol_state",
        b"client_address",
        b"sasl_username",
        b"recipient",
        b"server_address",
        b"server_port",
        b"instance",
        b"x",
        b"",
    ]
)
VALUES = st.one_of(
    st.sampled_from(
        [
            b"smtpd_access_policy",
            b"RCPT",
            b"VRFY",
            b"198.51.100.7",
            b"::ffff:198.51.100.7",
            b"user@remote.example",
            b"user@local.example",
            b'"user@remote.example"@local.example',
            b"",
            b"\xff\xfe",
            b"\x00",
        ]
    ),
    st.binary(max_size=40),
)
LINES = st.one_of(
    st.builds(lambda n, v: n + b"=" + v, ATTRIBUTE_NAMES, VALUES),
    st.binary(max_size=60),
    st.just(b""),
    st.builds(lambda n: b"x" * n, st.integers(900, 1200)),  # around max_line_bytes
)
STREAMS = st.one_of(
    st.builds(lambda lines: b"\n".join(lines) + b"\n\n", st.lists(LINES, max_size=50)),
    st.binary(max_size=3000),
    # Good requests with garbage between them (interleaved frames).
    st.builds(
        lambda parts: b"".join(parts),
        st.lists(st.sampled_from([GOOD, LOCAL]) | st.binary(max_size=80), max_size=12),
    ),
    # A good request cut short, or with one byte changed.
    st.builds(lambda n: GOOD[:n], st.integers(0, len(GOOD))),
    st.builds(
        lambda i, b: GOOD[:i] + bytes([b]) + GOOD[i + 1 :],
        st.integers(0, len(GOOD) - 1),
        st.integers(0, 255),
    ),
)


@settings(max_examples=400 * SCALE, deadline=None, suppress_health_check=FIXTURE)
@given(data=STREAMS, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_policy_garbage_never_permits(service: PolicyService, data: bytes, cuts: list[int]) -> None:
    """Random and mangled streams, in random chunks: only DUNNO, the denial or the error."""
    for action in feed_policy(service, chunked(data, cuts)):
        assert action in ALLOWED_ANSWERS, action
    still_answers(service)


@settings(max_examples=50 * SCALE, deadline=None, suppress_health_check=FIXTURE)
@given(size=st.integers(4097, 200_000), chunk=st.sampled_from([1, 7, 4096, 65536]))
def test_policy_oversized_request_is_cut_off(service: PolicyService, size: int, chunk: int) -> None:
    """A request over max_request_bytes (one endless value, or endless short lines) is refused
    while it arrives, never held whole, never answered."""
    for body in (b"recipient=" + b"a" * size, b"a=b\n" * (size // 4)):
        data = GOOD[:-1] + body + b"\n\n"
        chunks = [data[i : i + chunk] for i in range(0, min(len(data), 20_000 * chunk), chunk)]
        assert feed_policy(service, chunks) == []
    still_answers(service)


def socketmap_connection(service: PolicyService) -> tuple[SocketmapProtocol, StringTransport]:
    factory = SocketmapFactory(service.lookup, lambda reason, peer: None)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
    protocol.makeConnection(transport)
    return protocol, transport


def netstring(payload: bytes) -> bytes:
    return str(len(payload)).encode() + b":" + payload + b","


def netstring_replies(value: bytes) -> list[bytes]:
    """Parse a socketmap server's output: whole netstrings only."""
    replies = []
    while value:
        length, sep, rest = value.partition(b":")
        assert sep and length.isdigit(), value
        size = int(length)
        assert rest[size : size + 1] == b",", value
        replies.append(rest[:size])
        value = rest[size + 1 :]
    return replies


SOCKETMAP_STREAMS = st.one_of(
    st.binary(max_size=3000),
    st.builds(
        lambda parts: b"".join(parts),
        st.lists(
            st.sampled_from(
                [
                    netstring(b"transport partner.example"),
                    netstring(b"sasl_passwd [smtp.partner.example]:587"),
                    netstring(b"nosuchmap key"),
                    netstring(b"transport"),
                    b"99999999999999999999:",
                    b"5:abc",
                    b"3:abc;",
                ]
            )
            | st.binary(max_size=40)
            | st.builds(netstring, st.binary(max_size=200)),
            max_size=12,
        ),
    ),
    st.builds(lambda n: b"%d:" % n + b"x" * min(n, 50_000), st.integers(16_000, 10**9)),
)


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=FIXTURE)
@given(data=SOCKETMAP_STREAMS, cuts=st.lists(st.integers(0, 60_000), max_size=8))
def test_socketmap_garbage(service: PolicyService, data: bytes, cuts: list[int]) -> None:
    """Random, truncated, oversized and interleaved netstrings: every reply is a whole
    netstring with one of the four socketmap answers; the buffer stays bounded; a fresh
    connection still gets the right answer."""
    protocol, transport = socketmap_connection(service)
    for chunk in chunked(data, cuts):
        if transport.disconnecting:
            break  # a real transport stops reading on loseConnection: no more data comes
        protocol.dataReceived(chunk)
        # What Twisted's NetstringReceiver holds: the unparsed rest and the payload so far.
        # One read from a socket is at most 64 KiB, so this bounds a connection's memory.
        held = len(protocol._remainingData) + protocol._payload.tell()
        assert held <= MAX_REQUEST_BYTES + len(chunk) + 32
    for reply in netstring_replies(transport.value()):
        assert reply.split(b" ", 1)[0] in (b"OK", b"NOTFOUND", b"TEMP", b"PERM"), reply
    protocol, transport = socketmap_connection(service)
    protocol.dataReceived(netstring(b"transport partner.example"))
    assert netstring_replies(transport.value()) == [b"OK policyd-none:[smtp.partner.example]:587"]


def test_config_file_unused_warning_guard(tmp_path: Path) -> None:
    """The fuzz configuration loads (a typo there would make every test above vacuous)."""
    path = tmp_path / "policyd.yaml"
    path.write_text(CONFIG)
    config = load_config(path)
    assert config.limits.max_request_bytes == 4096
    assert not config.relay.allow_client_networks
