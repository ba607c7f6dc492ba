"""Policy protocol framing, without sockets: StringTransport and a Clock."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from policyd.config import Limits
from policyd.protocol import PolicyFactory, PolicyProtocol

REQUEST = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"client_address=192.0.2.7\n"
    b"recipient=user@remote.example\n"
    b"\n"
)


class Harness:
    """A factory whose handler records requests and answers with a counter."""

    def __init__(self, limits: Limits | None = None, action: str = "DUNNO") -> None:
        self.requests: list[dict[str, str]] = []
        self.errors: list[str] = []
        self.clock = Clock()
        self.action = action
        self.factory = PolicyFactory(self.handle, self.report, limits or Limits(), self.clock)

    def handle(self, attributes: Mapping[str, str]) -> str:
        self.requests.append(dict(attributes))
        return f"{self.action} {len(self.requests)}"

    def report(self, reason: str, peer: str) -> None:
        self.errors.append(reason)

    def connect(self) -> tuple[PolicyProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        return protocol, transport


def test_whole_request_gets_one_reply() -> None:
    """A complete request is decoded, handed to the handler and answered with one action."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST)
    assert transport.value() == b"action=DUNNO 1\n\n"
    assert harness.requests == [
        {
            "request": "smtpd_access_policy",
            "protocol_state": "RCPT",
            "client_address": "192.0.2.7",
            "recipient": "user@remote.example",
        }
    ]
    assert not transport.disconnecting


def test_byte_by_byte() -> None:
    """A request delivered one byte at a time is answered exactly once, at its end."""
    harness = Harness()
    protocol, transport = harness.connect()
    for index in range(len(REQUEST)):
        protocol.dataReceived(REQUEST[index : index + 1])
        if index < len(REQUEST) - 1:
            assert transport.value() == b""
    assert transport.value() == b"action=DUNNO 1\n\n"


def test_pipelined_requests_answered_in_order() -> None:
    """Two requests in one write get two replies, in order, on the same open connection."""
    harness = Harness()
    protocol, transport = harness.connect()
    second = REQUEST.replace(b"user@remote", b"other@remote")
    protocol.dataReceived(REQUEST + second)
    assert transport.value() == b"action=DUNNO 1\n\naction=DUNNO 2\n\n"
    assert [r["recipient"] for r in harness.requests] == [
        "user@remote.example",
        "other@remote.example",
    ]
    assert not transport.disconnecting


def test_persistent_connection_many_requests() -> None:
    """The connection stays open across requests, as Postfix reuses it."""
    harness = Harness()
    protocol, transport = harness.connect()
    for _ in range(50):
        protocol.dataReceived(REQUEST)
    assert transport.value().count(b"action=") == 50
    assert not transport.disconnecting


def test_first_value_of_repeated_attribute_is_kept() -> None:
    """A repeated attribute keeps its first value; a later one cannot override it."""
    harness = Harness()
    protocol, _ = harness.connect()
    protocol.dataReceived(REQUEST.replace(b"\n\n", b"\nclient_address=10.0.0.1\n\n"))
    assert harness.requests[0]["client_address"] == "192.0.2.7"


def test_value_may_contain_equals_sign() -> None:
    """Lines split at the first '=' only."""
    harness = Harness()
    protocol, _ = harness.connect()
    protocol.dataReceived(b"request=smtpd_access_policy\nccert_subject=CN=x=y\n\n")
    assert harness.requests[0]["ccert_subject"] == "CN=x=y"


def test_crlf_line_endings_tolerated() -> None:
    """A trailing carriage return (a person testing with telnet) is not part of the value."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST.replace(b"\n", b"\r\n"))
    assert harness.requests[0]["recipient"] == "user@remote.example"
    assert transport.value() == b"action=DUNNO 1\n\n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"request=smtpd_access_policy\nno equals sign\n\n", "malformed_line"),
        (b"request=smtpd_access_policy\n=value\n\n", "malformed_line"),
        (b"request=smtpd_access_policy\nname=va\0lue\n\n", "malformed_line"),
        (b"request=smtpd_access_policy\nsender=\xff\xfe@x\n\n", "invalid_utf8"),
        (b"protocol_state=RCPT\n\n", "bad_request_type"),
        (b"request=something_else\n\n", "bad_request_type"),
        (b"\n", "bad_request_type"),
    ],
)
def test_malformed_request_closes_without_reply(data: bytes, reason: str) -> None:
    """Malformed input is reported with its reason and closes the connection, with no reply."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(data)
    assert transport.value() == b""
    assert transport.disconnecting
    assert harness.errors == [reason]
    assert harness.requests == []


def test_malformed_request_stops_pipeline() -> None:
    """After a framing error, nothing more is read from that connection."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(b"request=smtpd_access_policy\nbad line\n\n" + REQUEST)
    assert transport.value() == b""
    assert harness.requests == []
    assert harness.errors == ["malformed_line"]


def test_line_too_long() -> None:
    """A line over max_line_bytes closes the connection, reported as line_too_long."""
    harness = Harness(Limits(max_line_bytes=1024))
    protocol, transport = harness.connect()
    protocol.dataReceived(b"request=smtpd_access_policy\nsender=" + b"a" * 2000 + b"\n\n")
    assert transport.disconnecting
    assert transport.value() == b""
    assert harness.errors == ["line_too_long"]


def test_line_at_limit_accepted() -> None:
    """A line just under max_line_bytes is still a valid attribute."""
    harness = Harness(Limits(max_line_bytes=1024))
    protocol, transport = harness.connect()
    value = b"a" * (1024 - len(b"sender=") - 1)
    protocol.dataReceived(b"request=smtpd_access_policy\nsender=" + value + b"\n\n")
    assert transport.value() == b"action=DUNNO 1\n\n"


def test_request_too_large() -> None:
    """A request over max_request_bytes in total is refused even if each line is short."""
    harness = Harness(Limits(max_line_bytes=1024, max_request_bytes=4096, max_attributes=1000))
    protocol, transport = harness.connect()
    lines = b"".join(b"attr%d=%s\n" % (i, b"x" * 100) for i in range(60))
    protocol.dataReceived(b"request=smtpd_access_policy\n" + lines + b"\n")
    assert harness.errors == ["request_too_large"]
    assert transport.value() == b""


def test_too_many_attributes() -> None:
    """More attributes than max_attributes closes the connection."""
    harness = Harness(Limits(max_attributes=10))
    protocol, transport = harness.connect()
    lines = b"".join(b"a%d=1\n" % i for i in range(20))
    protocol.dataReceived(b"request=smtpd_access_policy\n" + lines + b"\n")
    assert harness.errors == ["too_many_attributes"]
    assert transport.value() == b""


def test_unfinished_request_times_out() -> None:
    """A request that never finishes is closed after request_timeout_seconds and counted."""
    harness = Harness(Limits(request_timeout_seconds=5, idle_timeout_seconds=100))
    protocol, transport = harness.connect()
    protocol.dataReceived(b"request=smtpd_access_policy\n")
    harness.clock.advance(4)
    assert not transport.disconnecting
    protocol.dataReceived(b"protocol_state=RCPT\n")
    harness.clock.advance(1.5)
    assert transport.disconnecting
    assert harness.errors == ["request_timeout"]


def test_idle_connection_closed_quietly() -> None:
    """An idle connection is closed after idle_timeout_seconds without counting an error."""
    harness = Harness(Limits(request_timeout_seconds=5, idle_timeout_seconds=100))
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST)
    harness.clock.advance(99)
    assert not transport.disconnecting
    harness.clock.advance(2)
    assert transport.disconnecting
    assert harness.errors == []


@pytest.mark.parametrize("chunk", [len(REQUEST), 7, 1])
def test_idle_time_counts_from_the_last_answer(chunk: int) -> None:
    """The idle timeout runs from the last answer, however the requests arrived."""
    harness = Harness(Limits(request_timeout_seconds=5, idle_timeout_seconds=100))
    protocol, transport = harness.connect()
    for when in (0, 60, 90):
        harness.clock.advance(when - harness.clock.seconds())
        for start in range(0, len(REQUEST), chunk):
            protocol.dataReceived(REQUEST[start : start + chunk])
    assert transport.value().count(b"action=") == 3
    harness.clock.advance(189 - harness.clock.seconds())
    assert not transport.disconnecting
    harness.clock.advance(2)
    assert transport.disconnecting
    assert harness.errors == []


def test_request_timeout_after_idle_answers() -> None:
    """After whole requests, a request that then stalls still gets the request timeout."""
    harness = Harness(Limits(request_timeout_seconds=5, idle_timeout_seconds=100))
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST)
    harness.clock.advance(50)
    protocol.dataReceived(REQUEST)
    protocol.dataReceived(REQUEST[:10])
    harness.clock.advance(4)
    assert not transport.disconnecting
    harness.clock.advance(2)
    assert transport.disconnecting
    assert harness.errors == ["request_timeout"]


def test_disconnect_mid_request_reported() -> None:
    """A client that hangs up mid-request is reported; the handler is never called."""
    harness = Harness()
    protocol, _ = harness.connect()
    protocol.dataReceived(b"request=smtpd_access_policy\nprotocol_state=RC")
    protocol.connectionLost()
    assert harness.errors == ["disconnect_mid_request"]
    assert harness.requests == []
    assert harness.factory.connections == set()


def test_disconnect_between_requests_is_not_an_error() -> None:
    """Postfix closing an idle connection is normal."""
    harness = Harness()
    protocol, _ = harness.connect()
    protocol.dataReceived(REQUEST)
    protocol.connectionLost()
    assert harness.errors == []


def test_handler_failure_closes_without_reply() -> None:
    """If the handler raises, no reply is sent (Postfix falls back to default_action)."""
    harness = Harness()

    def broken(attributes: Mapping[str, str]) -> str:
        raise RuntimeError("boom")

    harness.factory.handler = broken
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST)
    assert transport.value() == b""
    assert transport.disconnecting
    assert harness.errors == ["handler_failure"]


def test_one_bad_connection_does_not_affect_another() -> None:
    """A framing error on one connection leaves a second one working."""
    harness = Harness()
    bad, bad_transport = harness.connect()
    good, good_transport = harness.connect()
    bad.dataReceived(b"request=smtpd_access_policy\n\xff\n\n")
    good.dataReceived(REQUEST)
    assert bad_transport.disconnecting
    assert good_transport.value() == b"action=DUNNO 1\n\n"
    assert not good_transport.disconnecting


def test_drain_closes_idle_and_finishes_busy() -> None:
    """drain() closes idle connections at once and a busy one right after its reply."""
    harness = Harness()
    idle, idle_transport = harness.connect()
    busy, busy_transport = harness.connect()
    busy.dataReceived(b"request=smtpd_access_policy\n")
    done = harness.factory.drain(3)
    assert idle_transport.disconnecting
    assert not busy_transport.disconnecting
    busy.dataReceived(b"protocol_state=RCPT\n\n")
    assert busy_transport.value() == b"action=DUNNO 1\n\n"
    assert busy_transport.disconnecting
    fired: list[object] = []
    done.addCallback(fired.append)
    assert fired == []
    idle.connectionLost()
    busy.connectionLost()
    assert fired == [None]


def test_drain_aborts_stragglers_after_grace() -> None:
    """A request still unfinished after the grace period has its connection aborted."""
    harness = Harness()
    busy, transport = harness.connect()
    busy.dataReceived(b"request=smtpd_access_policy\n")
    harness.factory.drain(3)
    harness.clock.advance(3)
    assert transport.disconnecting


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    """Any byte string, in any chunking, either yields replies or a reported error: no crash."""
    harness = Harness(Limits(max_line_bytes=512, max_request_bytes=1024, max_attributes=10))
    protocol, transport = harness.connect()
    for start in range(0, len(data), 7):
        protocol.dataReceived(data[start : start + 7])
    replies = transport.value().count(b"action=")
    assert replies == len(harness.requests)
    if transport.disconnecting:
        assert harness.errors


@given(
    st.dictionaries(
        st.text(
            alphabet=st.characters(blacklist_characters="=\n\r\0", blacklist_categories=["Cs"]),
            min_size=1,
            max_size=20,
        ),
        st.text(
            alphabet=st.characters(blacklist_characters="\n\r\0", blacklist_categories=["Cs"]),
            max_size=50,
        ),
        max_size=15,
    ),
    st.integers(min_value=1, max_value=50),
)
def test_parser_round_trip(attributes: dict[str, str], chunk: int) -> None:
    """Any well-formed attribute set, in any chunking, reaches the handler unchanged."""
    attributes = {"request": "smtpd_access_policy", **attributes}
    attributes["request"] = "smtpd_access_policy"
    data = b"".join(f"{k}={v}\n".encode() for k, v in attributes.items()) + b"\n"
    harness = Harness()
    protocol, transport = harness.connect()
    for start in range(0, len(data), chunk):
        protocol.dataReceived(data[start : start + chunk])
    assert harness.errors == []
    assert harness.requests == [attributes]
    assert transport.value() == b"action=DUNNO 1\n\n"


def test_partial_request_limits_apply_before_the_end() -> None:
    """An unfinished request is refused as soon as it breaks a limit, fed one byte at a time."""
    for data, limits, reason in (
        (
            b"request=smtpd_access_policy\nsender=" + b"a" * 600,
            Limits(max_line_bytes=512),
            "line_too_long",
        ),
        (b"a=1\n" * 12, Limits(max_attributes=10), "too_many_attributes"),
        (
            b"".join(b"attr%d=%s\n" % (i, b"x" * 100) for i in range(20)),
            Limits(max_line_bytes=512, max_request_bytes=1024),
            "request_too_large",
        ),
    ):
        harness = Harness(limits)
        protocol, transport = harness.connect()
        for index in range(len(data)):
            protocol.dataReceived(data[index : index + 1])
            if transport.disconnecting:
                break
        assert harness.errors == [reason]
        assert transport.disconnecting


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=40))
def test_crlf_requests_in_any_chunking(cuts: list[int]) -> None:
    """CRLF-terminated pipelined requests, cut anywhere (also inside the end marker), parse."""
    data = REQUEST.replace(b"\n", b"\r\n") * 3
    harness = Harness()
    protocol, transport = harness.connect()
    position = 0
    for cut in cuts:
        protocol.dataReceived(data[position : position + cut])
        position += cut
    protocol.dataReceived(data[position:])
    assert harness.errors == []
    assert transport.value() == b"action=DUNNO 1\n\naction=DUNNO 2\n\naction=DUNNO 3\n\n"
    assert all(r["recipient"] == "user@remote.example" for r in harness.requests)


def _outcome(
    data: bytes, chunk: int, limits: Limits
) -> tuple[bytes, list[str], list[dict[str, str]], bool]:
    harness = Harness(limits)
    protocol, transport = harness.connect()
    for start in range(0, len(data), chunk):
        protocol.dataReceived(data[start : start + chunk])
    return transport.value(), harness.errors, harness.requests, transport.disconnecting


_FRAGMENTS = st.sampled_from(
    [
        b"request=smtpd_access_policy\n",
        b"recipient=u@x\n",
        b"=v\n",
        b"name\n",
        b"\n",
        b"\r\n",
        b"a=b",
        b"\0",
        b"\xff",
        b"x" * 40,
        b"\n\n",
    ]
)


@given(st.lists(_FRAGMENTS, max_size=12).map(b"".join))
def test_one_write_and_byte_by_byte_agree(data: bytes) -> None:
    """A request written whole (the fast path) is answered exactly as one trickled in byte by
    byte (the general framing): same replies, errors, requests seen and closing."""
    limits = Limits(max_line_bytes=64, max_request_bytes=256, max_attributes=6)
    whole, trickled = _outcome(data, len(data) or 1, limits), _outcome(data, 1, limits)
    # Input that breaks several limits at once may be refused for either of them first.
    assert (whole[0], len(whole[1]), whole[2], whole[3]) == (
        trickled[0],
        len(trickled[1]),
        trickled[2],
        trickled[3],
    )


# -- answers that wait for I/O (a Deferred from the handler) -----------------------------------


class DeferredHarness(Harness):
    """A handler whose answers wait: each request gets a Deferred, fired by the test."""

    def __init__(self, limits: Limits | None = None) -> None:
        super().__init__(limits)
        self.pending: list[defer.Deferred[str]] = []

    def handle(self, attributes: Mapping[str, str]) -> defer.Deferred[str]:  # type: ignore[override]
        self.requests.append(dict(attributes))
        waiting: defer.Deferred[str] = defer.Deferred()
        self.pending.append(waiting)
        return waiting


def _numbered(n: int) -> bytes:
    return REQUEST.replace(b"user@", f"user{n}@".encode())


def test_waiting_answers_keep_request_order() -> None:
    """Pipelined requests whose answers wait are decided one at a time and answered in order:
    the second is not even handed over before the first is answered."""
    harness = DeferredHarness()
    protocol, transport = harness.connect()
    protocol.dataReceived(_numbered(1) + _numbered(2) + _numbered(3))
    assert len(harness.requests) == 1 and transport.value() == b""
    harness.pending[0].callback("DUNNO first")
    assert len(harness.requests) == 2
    assert transport.value() == b"action=DUNNO first\n\n"
    protocol.dataReceived(_numbered(4))  # arrives while the second waits: queued behind it
    harness.pending[1].callback("DUNNO second")
    harness.pending[2].callback("DUNNO third")
    harness.pending[3].callback("DUNNO fourth")
    assert transport.value() == (
        b"action=DUNNO first\n\naction=DUNNO second\n\naction=DUNNO third\n\n"
        b"action=DUNNO fourth\n\n"
    )
    assert [r["recipient"] for r in harness.requests] == [
        f"user{n}@remote.example" for n in (1, 2, 3, 4)
    ]
    assert protocol.idle and not harness.errors


def test_mixed_immediate_and_waiting_answers_stay_in_order() -> None:
    """A handler answering some requests at once and others later keeps the order."""
    harness = Harness()
    later: list[defer.Deferred[str]] = []

    def handle(attributes: Mapping[str, str]) -> str | defer.Deferred[str]:
        harness.requests.append(dict(attributes))
        if len(harness.requests) % 2:
            return f"DUNNO {len(harness.requests)}"
        waiting: defer.Deferred[str] = defer.Deferred()
        later.append(waiting)
        return waiting

    harness.factory.handler = handle
    protocol, transport = harness.connect()
    protocol.dataReceived(b"".join(_numbered(n) for n in range(1, 6)))
    assert transport.value() == b"action=DUNNO 1\n\n"
    later[0].callback("DUNNO 2")
    later[1].callback("DUNNO 4")
    replies = transport.value().split(b"\n\n")[:-1]
    assert replies == [f"action=DUNNO {n}".encode() for n in range(1, 6)]


def test_already_fired_deferred_is_answered_at_once() -> None:
    harness = Harness()
    harness.factory.handler = lambda attributes: defer.succeed("DUNNO now")
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST + REQUEST)
    assert transport.value() == b"action=DUNNO now\n\n" * 2
    assert protocol.idle


def test_disconnect_while_waiting_drops_the_answer() -> None:
    """Postfix gave up (its own timeout): the late answer is not written anywhere."""
    harness = DeferredHarness()
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST + REQUEST)
    protocol.connectionLost()
    harness.pending[0].callback("DUNNO late")
    assert transport.value() == b""
    assert len(harness.requests) == 1  # the queued request is never decided
    assert harness.errors == ["disconnect_mid_request"]


def test_failed_deferred_closes_without_reply() -> None:
    harness = DeferredHarness()
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST)
    harness.pending[0].errback(RuntimeError("a bug"))
    assert transport.value() == b"" and transport.disconnecting
    assert harness.errors == ["handler_failure"]


def test_timer_while_waiting_does_not_fail_the_request() -> None:
    """The idle timer running out while an answer waits re-arms; the answer still goes out."""
    harness = DeferredHarness(Limits(idle_timeout_seconds=10.0, request_timeout_seconds=5.0))
    protocol, transport = harness.connect()
    harness.clock.advance(9.99)
    protocol.dataReceived(REQUEST)
    harness.clock.advance(0.02)  # the idle timer runs out while the answer waits
    assert not transport.disconnecting and not harness.errors
    harness.pending[0].callback("DUNNO done")
    assert transport.value() == b"action=DUNNO done\n\n"
    harness.clock.advance(9.0)
    assert not transport.disconnecting
    harness.clock.advance(1.1)
    assert transport.disconnecting and not harness.errors  # idle since the answer


def test_drain_while_waiting_answers_then_closes() -> None:
    harness = DeferredHarness()
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST + REQUEST)
    protocol.drain()
    assert not transport.disconnecting
    harness.pending[0].callback("DUNNO last")
    assert transport.value() == b"action=DUNNO last\n\n"
    assert transport.disconnecting and len(harness.requests) == 1


def test_connection_limit_closes_the_one_too_many() -> None:
    """At limits.max_connections open connections the next is not built (Twisted closes it)
    and reported as connection_limit; once one closes, a new one is built again."""
    harness = Harness(Limits(max_connections=2))
    first, _ = harness.connect()
    harness.connect()
    assert harness.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001)) is None
    assert harness.errors == ["connection_limit"]
    first.connectionLost(Failure(ConnectionDone()))
    protocol, transport = harness.connect()
    protocol.dataReceived(REQUEST)
    assert transport.value() == b"action=DUNNO 1\n\n"


def test_reading_pauses_while_an_answer_waits() -> None:
    """While an answer waits for I/O the connection stops reading (what a client pipelines
    meanwhile stays in the kernel), and reads again once everything framed is answered."""
    harness = DeferredHarness()
    protocol, transport = harness.connect()
    protocol.dataReceived(_numbered(1) + _numbered(2))
    assert transport.producerState == "paused"
    assert len(protocol._queued) == 1  # the rest of the read in hand, no more
    harness.pending[0].callback("DUNNO first")
    assert transport.producerState == "paused"  # the second waits now
    harness.pending[1].callback("DUNNO second")
    assert transport.producerState == "producing"
    assert transport.value() == b"action=DUNNO first\n\naction=DUNNO second\n\n"
