"""Postfix policy delegation framing (SMTPD_POLICY_README): bytes in, one reply per request out.

A request is ``name=value`` lines ended by an empty line; the reply is ``action=...`` and an empty
line, on the same persistent connection. This module only frames: it decodes the attributes and
hands them to the handler it was given, which returns the action, or a Deferred firing with it
when the answer needs I/O (a shared sending-limit store). A framing problem is reported
through the error reporter and closes that one connection without a reply; Postfix then retries
and, failing that, uses its fail-closed ``default_action``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from policyd.config import Limits

#: Decides one request: decoded attributes in, the Postfix action out, at once or through a
#: Deferred. Must not raise, and its Deferreds must not fail.
Handler = Callable[[Mapping[str, str]], "str | defer.Deferred[str]"]

#: Told about every framing problem: (reason, peer description). ``reason`` is one of REASONS.
ErrorReporter = Callable[[str, str], None]

#: The framing problems, as they appear in logs and the ``reason`` metric label.
REASONS = (
    "line_too_long",
    "request_too_large",
    "too_many_attributes",
    "malformed_line",
    "invalid_utf8",
    "bad_request_type",
    "request_timeout",
    "disconnect_mid_request",
    "handler_failure",
    "connection_limit",
)


# The encoded replies of the actions answered so far: a handful (the configured replies).
_REPLIES: dict[str, bytes] = {}
_MAX_REPLIES = 256


class PolicyProtocol(Protocol, TimeoutMixin):
    """One policy connection: frames requests, answers each, waits for the next.

    A request is framed whole (up to its empty line) and then split into attributes, which is
    much cheaper than a callback per line. Requests pipelined in one write are answered in
    order, also when an answer waits for I/O: requests framed meanwhile wait in ``_queued``
    and are decided after it, one at a time. After ``drain()`` the connection closes as soon as
    it is idle.
    """

    def __init__(self, factory: PolicyFactory) -> None:
        self.factory = factory
        self.callLater = factory.clock.callLater  # type: ignore[assignment]
        self._buffer = bytearray()
        self._newlines = 0  # in the unfinished request held in _buffer
        self._line_start = 0  # where its last, unfinished line starts
        self._answered = 0
        self._draining = False
        self._failed = False
        self._socket: Any = None  # set once connected, while replies may bypass the transport
        self._seconds = factory.clock.seconds
        self._idle_since = 0.0  # when the connection last became idle (see timeoutConnection)
        self._waiting = False  # an answer is on its way (the handler returned a Deferred)
        self._queued: list[bytes] = []  # whole requests framed while waiting, in order

    # -- connection life ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        get_handle = getattr(self.transport, "getHandle", None)
        if get_handle is not None:
            handle = get_handle()
            if hasattr(handle, "send"):
                self._socket = handle
        self._idle_since = self._seconds()
        self.setTimeout(  # type: ignore[no-untyped-call]
            self.factory.limits.idle_timeout_seconds
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(  # type: ignore[no-untyped-call]
            None
        )
        self.factory.connections.discard(self)
        if not self.idle and not self._failed:
            self._fail("disconnect_mid_request", close=False)
        self.factory.connection_closed()

    @property
    def _connection(self) -> Any:
        """The transport, typed loosely: TCP and UNIX transports both abort and close."""
        return self.transport

    @property
    def idle(self) -> bool:
        """True between requests: nothing received of a next request yet, no answer pending."""
        return not self._buffer and not self._waiting

    def drain(self) -> None:
        """Stop taking requests: close now if idle, else right after answering the current one."""
        self._draining = True
        if self.idle:
            self._connection.loseConnection()

    def timeoutConnection(self) -> None:
        """The timer ran out: a request took too long, or the connection may have idled.

        Answering a request only notes the time the connection became idle instead of
        re-arming the timer (``DelayedCall.reset`` costs more than the rest of a whole
        request's framing): when the timer runs out, an idle connection that was busy since
        waits the rest of its idle time. Only a request that starts arriving re-arms it, with
        the request timeout.
        """
        if self._waiting and not self._buffer:
            # The answer on its way has its own deadline (the handler's): wait for it.
            self.setTimeout(  # type: ignore[no-untyped-call]
                self.factory.limits.request_timeout_seconds
            )
            return
        if not self.idle:
            self._fail("request_timeout")
            return
        remaining = self.factory.limits.idle_timeout_seconds - (self._seconds() - self._idle_since)
        if remaining > 0:
            self.setTimeout(remaining)  # type: ignore[no-untyped-call]
        else:
            self._connection.loseConnection()

    # -- framing -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Frame ``data``; a request must be complete within the request timeout of its start.

        Only the new bytes are scanned, so a request trickling in byte by byte costs linear,
        not quadratic, time.
        """
        if self._failed:
            return
        if (
            not self._buffer
            and not self._waiting
            and len(data) > 2
            and data.find(b"\n\n") == len(data) - 2
            and b"\r" not in data
            and data[0] != 0x0A
        ):
            # The common case (Postfix waits for each reply): exactly one whole request,
            # nothing held from before. The general framing below would answer it the same.
            if self._answer(data[:-2]):
                self._idle_since = self._seconds()  # see timeoutConnection
            return
        answered = self._answered
        was_idle = self.idle
        buffer = self._buffer
        before = len(buffer)
        buffer += data
        search_from = max(0, before - 3)  # an end of request may straddle the old end
        limits = self.factory.limits
        while buffer:
            if buffer[:1] == b"\n" or buffer[:2] == b"\r\n":
                self._fail("bad_request_type")  # an empty request: no attributes at all
                return
            start, end = _find_end(buffer, search_from)
            if start < 0:
                self._newlines += buffer.count(b"\n", before)
                last = buffer.rfind(b"\n", before)
                problem = None
                if last >= 0:
                    # Lines completed by this data are held too: none may be too long.
                    if _longest_line(buffer, self._line_start, last) > limits.max_line_bytes:
                        problem = "line_too_long"
                    self._line_start = last + 1
                problem = problem or self._check_partial(len(buffer), limits)
                if problem:
                    self._fail(problem)
                    return
                break
            block = bytes(buffer[:start])
            del buffer[:end]
            before = search_from = 0
            self._newlines = self._line_start = 0
            if self._waiting:
                self._queued.append(block)
                continue
            if not self._answer(block) or self._connection.disconnecting:
                return
        if self.idle:
            if self._answered != answered:
                # The timer running (idle or request) re-arms itself for the rest of the idle
                # time when it runs out: see timeoutConnection.
                self._idle_since = self._seconds()
        elif was_idle or self._answered != answered:
            self.setTimeout(  # type: ignore[no-untyped-call]
                limits.request_timeout_seconds
            )

    def _check_partial(self, size: int, limits: Limits) -> str | None:
        """The limit an unfinished request already breaks, if any."""
        if size > limits.max_request_bytes:
            return "request_too_large"
        if size - self._line_start > limits.max_line_bytes:
            return "line_too_long"
        if self._newlines > limits.max_attributes:
            return "too_many_attributes"
        return None

    def _answer(self, block: bytes) -> bool:
        """Parse one whole request and reply to it; False if the connection failed."""
        attributes = _parse(block, self.factory.limits)
        if isinstance(attributes, str):
            self._fail(attributes)
            return False
        if attributes.get("request") != "smtpd_access_policy":
            self._fail("bad_request_type")
            return False
        try:
            action = self.factory.handler(attributes)
        except Exception:
            # The handler is built never to raise; if it does, fail closed: no reply.
            self._fail("handler_failure")
            return False
        if type(action) is not str:
            self._waiting = True
            # Stop reading until it is answered: what a client pipelines meanwhile stays in
            # the kernel's socket buffer (TCP flow control), not in _queued. Only the rest of
            # the read in hand is framed and queued, so a connection holds at most one read.
            self._connection.pauseProducing()
            action.addCallbacks(self._answered_later, self._handler_failed)
            return not self._failed
        self._reply(action)
        return True

    def _answered_later(self, action: str) -> None:
        """The answer that waited for I/O: send it, then decide what queued up meanwhile."""
        self._waiting = False
        if self._failed:  # the connection failed or was lost meanwhile
            return
        self._reply(action)
        queued = self._queued
        while queued and not self._waiting:
            if self._connection.disconnecting:  # drained: what is queued waits for Postfix's retry
                self._queued = []
                return
            if not self._answer(queued.pop(0)):
                return
        if not self._waiting:
            self._connection.resumeProducing()
        if self.idle:
            self._idle_since = self._seconds()

    def _handler_failed(self, failure: Failure) -> None:
        self._waiting = False
        if not self._failed:
            self._fail("handler_failure")

    def _reply(self, action: str) -> None:
        reply = _REPLIES.get(action)
        if reply is None:
            reply = b"action=" + action.encode("utf-8") + b"\n\n"
            if len(_REPLIES) < _MAX_REPLIES:
                _REPLIES[action] = reply
        self._send(reply)
        self._answered += 1
        if self._draining:
            self._connection.loseConnection()

    def _send(self, reply: bytes) -> None:
        """Write ``reply``: straight to the socket while Twisted holds nothing unsent.

        ``transport.write`` only queues the bytes and asks the reactor to wake up when the
        socket is writable: two extra ``epoll_ctl`` calls and one more turn of the reactor per
        reply. A reply that fits the socket buffer (always, unless the peer stops reading) is
        sent at once instead; whatever the kernel does not take goes to ``transport.write``,
        and from then on every reply of this connection does, so the order never changes.
        """
        sock = self._socket
        if sock is not None:
            try:
                sent = sock.send(reply)
            except BlockingIOError:
                sent = 0
            except OSError:
                # The connection is broken: Twisted's own write path notices and closes it.
                sent = 0
            if sent == len(reply):
                return
            reply = reply[sent:]
            self._socket = None
        self._connection.write(reply)

    def _fail(self, reason: str, *, close: bool = True) -> None:
        self._failed = True
        self._buffer = bytearray()
        self._queued = []
        self.factory.report_error(reason, describe_peer(self.transport))
        if close:
            self._connection.loseConnection()


def _longest_line(buffer: bytearray, start: int, end: int) -> int:
    """Length of the longest of the lines in ``buffer[start:end]`` (newlines not counted)."""
    if end - start <= 0:
        return 0
    return max(map(len, buffer[start:end].split(b"\n")))


# The empty line that ends a request, when the request has carriage returns (manual tests).
_END_OF_REQUEST_CRLF = re.compile(rb"\r?\n\r?\n")


def _find_end(buffer: bytearray, start: int) -> tuple[int, int]:
    """(start, end) of the first empty line at or after ``start``; (-1, -1) if none yet.

    Postfix ends lines with a bare LF; a CR before each LF is tolerated (a request typed by
    hand), at the price of a regular expression only for buffers that hold a CR.
    """
    if b"\r" not in buffer:
        found = buffer.find(b"\n\n", start)
        return (found, found + 2) if found >= 0 else (-1, -1)
    match = _END_OF_REQUEST_CRLF.search(buffer, start)
    return match.span() if match is not None else (-1, -1)


def _parse(block: bytes, limits: Limits) -> dict[str, str] | str:
    """The attributes of one request (without its empty line), or the reason it is refused.

    A repeated attribute keeps its first value. Every line must be ``name=value`` with a
    non-empty name; a CR ending a line is dropped.
    """
    if len(block) + 2 > limits.max_request_bytes:
        return "request_too_large"
    if block.count(b"\n") >= limits.max_attributes:
        return "too_many_attributes"
    # Only a request longer than the line limit can hold a line that is too long.
    if len(block) > limits.max_line_bytes and (
        max(map(len, block.split(b"\n"))) > limits.max_line_bytes
    ):
        return "line_too_long"
    if b"\0" in block:
        return "malformed_line"
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    if "\r" in text:
        text = text.replace("\r\n", "\n").removesuffix("\r")
    attributes: dict[str, str] = {}
    for line in text.split("\n"):
        name, sep, value = line.partition("=")
        if not sep or not name:
            return "malformed_line"
        if name not in attributes:
            attributes[name] = value
    return attributes


class PolicyFactory(Factory):
    """Builds ``PolicyProtocol`` connections sharing one handler, error reporter and limits.

    ``limits`` may be replaced (by a reload); new connections and new requests use the new
    values. ``on_connections_changed`` is told the open-connection count after every change.
    """

    def __init__(
        self,
        handler: Handler,
        report_error: ErrorReporter,
        limits: Limits,
        clock: IReactorTime,
        on_connections_changed: Callable[[int], None] | None = None,
    ) -> None:
        self.handler = handler
        self.report_error = report_error
        self.limits = limits
        self.clock = clock
        self.connections: set[PolicyProtocol] = set()
        self._on_change = on_connections_changed
        self._drained: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> PolicyProtocol | None:
        if len(self.connections) >= self.limits.max_connections:
            # Twisted closes a connection the factory builds nothing for. Postfix then takes
            # its default_action (451 in the shipped main.cf): mail waits, nothing relays.
            self.report_error("connection_limit", describe_address(addr))
            return None
        protocol = PolicyProtocol(self)
        if self._on_change is not None:
            self._on_change(len(self.connections) + 1)
        return protocol

    def connection_closed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self.connections))
        if not self.connections:
            waiting, self._drained = self._drained, []
            for waiter in waiting:
                waiter.callback(None)

    def drain(self, grace_seconds: float) -> defer.Deferred[None]:
        """Close idle connections now and busy ones after their current request.

        Fires when every connection is closed; connections still open after ``grace_seconds``
        are aborted.
        """
        done: defer.Deferred[None] = defer.Deferred()
        if not self.connections:
            done.callback(None)
            return done
        self._drained.append(done)
        for protocol in list(self.connections):
            protocol.drain()

        def abort_stragglers() -> None:
            for protocol in list(self.connections):
                protocol._connection.abortConnection()

        call = self.clock.callLater(grace_seconds, abort_stragglers)
        done.addBoth(_cancel_call, call)
        return done


def _cancel_call(result: Any, call: Any) -> Any:
    if call.active():
        call.cancel()
    return result


def describe_peer(transport: object) -> str:
    """The peer of a transport as host:port, [v6]:port or unix:path, for log lines."""
    get_peer = getattr(transport, "getPeer", None)
    if get_peer is None:
        return "unknown"
    return describe_address(get_peer())


def describe_address(peer: object) -> str:
    """An address (IPv4Address, IPv6Address, UNIXAddress) as describe_peer writes it."""
    if peer is None:
        return "unknown"
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    name = getattr(peer, "name", None)
    return f"unix:{name.decode() if isinstance(name, bytes) else name or '-'}"
