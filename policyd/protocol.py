"""Postfix policy delegation framing (SMTPD_POLICY_README): bytes in, one reply per request out.

A request is ``name=value`` lines ended by an empty line; the reply is ``action=...`` and an empty
line, on the same persistent connection. This module only frames: it decodes the attributes and
hands them to the handler it was given, which returns the action. A framing problem is reported
through the error reporter and closes that one connection without a reply; Postfix then retries
and, failing that, uses its fail-closed ``default_action``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from policyd.config import Limits

#: Decides one request: decoded attributes in, the Postfix action out. Must not raise.
Handler = Callable[[Mapping[str, str]], str]

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
)


class PolicyProtocol(LineOnlyReceiver, TimeoutMixin):
    """One policy connection: collects a request's attributes, answers it, waits for the next.

    Requests pipelined in one write are answered in order, because each is answered before the
    next line is read. After ``drain()`` the connection closes as soon as it is idle.
    """

    delimiter = b"\n"

    def __init__(self, factory: PolicyFactory) -> None:
        self.factory = factory
        self.MAX_LENGTH = factory.limits.max_line_bytes
        self.callLater = factory.clock.callLater  # type: ignore[assignment]
        self._attributes: dict[str, str] = {}
        self._request_bytes = 0
        self._lines = 0
        self._answered = 0
        self._draining = False
        self._failed = False

    # -- connection life ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
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
        """True between requests: nothing received of a next request yet."""
        return self._lines == 0 and not self._buffer

    def drain(self) -> None:
        """Stop taking requests: close now if idle, else right after answering the current one."""
        self._draining = True
        if self.idle:
            self._connection.loseConnection()

    def timeoutConnection(self) -> None:
        if not self.idle:
            self._fail("request_timeout")
        else:
            self._connection.loseConnection()

    # -- framing -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Frame ``data``; a request must be complete within the request timeout of its start."""
        answered = self._answered
        was_idle = self.idle
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self._failed or self._connection.disconnecting:
            return
        limits = self.factory.limits
        if self.idle:
            if self._answered != answered:
                self.setTimeout(  # type: ignore[no-untyped-call]
                    limits.idle_timeout_seconds
                )
        elif was_idle or self._answered != answered:
            self.setTimeout(  # type: ignore[no-untyped-call]
                limits.request_timeout_seconds
            )

    def lineReceived(self, line: bytes) -> None:
        if self._failed:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._end_of_request()
            return
        self._lines += 1
        self._request_bytes += len(line) + 1
        limits = self.factory.limits
        if self._request_bytes > limits.max_request_bytes:
            self._fail("request_too_large")
            return
        if self._lines > limits.max_attributes:
            self._fail("too_many_attributes")
            return
        name, sep, value = line.partition(b"=")
        if not sep or not name or b"\0" in line:
            self._fail("malformed_line")
            return
        try:
            key = name.decode("utf-8")
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("invalid_utf8")
            return
        self._attributes.setdefault(key, text)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail("line_too_long")

    def _end_of_request(self) -> None:
        attributes = self._attributes
        had_lines = self._lines
        self._attributes = {}
        self._lines = 0
        self._request_bytes = 0
        if not had_lines or attributes.get("request") != "smtpd_access_policy":
            self._fail("bad_request_type")
            return
        try:
            action = self.factory.handler(attributes)
        except Exception:
            # The handler is built never to raise; if it does, fail closed: no reply.
            self._fail("handler_failure")
            return
        self._connection.write(b"action=" + action.encode("utf-8") + b"\n\n")
        self._answered += 1
        if self._draining:
            self._connection.loseConnection()

    def _fail(self, reason: str, *, close: bool = True) -> None:
        self._failed = True
        self._attributes = {}
        self.factory.report_error(reason, describe_peer(self.transport))
        if close:
            self._connection.loseConnection()


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

    def buildProtocol(self, addr: IAddress | None) -> PolicyProtocol:
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
    peer = get_peer()
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    name = getattr(peer, "name", None)
    return f"unix:{name.decode() if isinstance(name, bytes) else name or '-'}"
