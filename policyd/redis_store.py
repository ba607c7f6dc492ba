"""The shared sending-limit store: the GCRA of ``ratelimit`` in one atomic Redis script.

Every request's limits go to Redis in one ``EVALSHA``: the script reads each key's ``tat``,
judges them all on Redis's clock (``TIME``, so the MX hosts' clocks never matter) and stores the
new ``tat`` of every key only if all of them allow. The arithmetic is that of
``ratelimit.check`` line for line; a property test runs both on the same sequences.

A key holds its ``tat`` as a decimal integer of microseconds and expires when its bucket is
full again (``tat`` in the past carries no information), so Redis holds only the keys that are
currently limiting something.

The connection is policyd's own (one per process, no pool: a script call takes microseconds and
replies come back in order). Every call has a deadline; a ``Breaker`` stops calling a backend
that failed several times in a row, and lets one call through now and then to see whether it
is back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from policyd.ratelimit import Charged, Check, Rate, RedisBackend

log = logging.getLogger("policyd.ratelimit")

#: Every key policyd writes starts with this: ``policyd:limit:<limit name>:<key>``.
KEY_PREFIX = "policyd:limit:"

#: KEYS: one per limit. ARGV[1]: ``charge`` (charge all or none) or ``peek`` (charge none);
#: ARGV[2]: the time in microseconds, or empty for Redis's clock (tests give it, policyd never);
#: then for each key its interval T and tolerance tau, in microseconds.
#: Returns: now, then for each key: allowed (1/0), tat, retry_after, remaining.
#: Lua numbers are doubles: exact for integers below 2**53 (microseconds: year 2255).
SCRIPT = """
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local function remaining(tat, interval, tolerance)
  local ahead = 0
  if tat and tat > now then ahead = tat - now end
  local left = tolerance - ahead
  if left < 0 then return 0 end
  return math.floor(left / interval) + 1
end
local out = {now}
local stored, new = {}, {}
local all = true
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i + 1])
  local tolerance = tonumber(ARGV[2 * i + 2])
  local tat = tonumber(redis.call('GET', key))
  stored[i] = tat
  local start = now
  if tat and tat > now then start = tat end
  local ahead = start - now
  if ahead > tolerance then
    all = false
    new[i] = false
    for _, v in ipairs({0, start, ahead - tolerance, 0}) do out[#out + 1] = v end
  else
    new[i] = start + interval
    for _, v in ipairs({1, new[i], 0, remaining(new[i], interval, tolerance)}) do
      out[#out + 1] = v
    end
  end
end
if all and ARGV[1] == 'charge' then
  for i, key in ipairs(KEYS) do
    local ttl = math.floor((new[i] - now) / 1000) + 1
    redis.call('SET', key, string.format('%d', new[i]), 'PX', ttl)
  end
  return out
end
-- Nothing is charged: the limits that would have allowed report their state as it stays.
for i = 1, #KEYS do
  if new[i] then
    local base = 1 + (i - 1) * 4
    local kept = now
    if stored[i] and stored[i] > now then kept = stored[i] end
    local interval = tonumber(ARGV[2 * i + 1])
    local tolerance = tonumber(ARGV[2 * i + 2])
    out[base + 2] = kept
    out[base + 4] = remaining(stored[i], interval, tolerance)
  end
end
return out
"""


class BackendError(Exception):
    """The shared store could not answer: unreachable, too slow, or an error reply."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        #: One of ``connection``, ``timeout``, ``response``, ``breaker_open`` (a metric label).
        self.reason = reason


def redis_key(limit: str, key: str) -> str:
    return f"{KEY_PREFIX}{limit}:{key}"


def client_endpoint(reactor: Any, address: str, timeout: float) -> IStreamClientEndpoint:
    """The endpoint of ``unix:/path`` or ``inet:HOST:PORT`` (config.py validated it)."""
    if address.startswith("unix:"):
        return UNIXClientEndpoint(reactor, address[5:], timeout=timeout)  # type: ignore[no-untyped-call]
    host, _, port = address[5:].rpartition(":")
    host = host.strip("[]")
    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, int(port), timeout=timeout)  # type: ignore[no-untyped-call]
    return TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout)


class Breaker:
    """A circuit breaker on a clock: closed, open after ``failures`` failures in a row, and
    after ``open_seconds`` half-open: one call may try; its success closes the breaker, its
    failure opens it again.

    ``on_change(open)`` is told each time the breaker opens or closes.
    """

    def __init__(
        self,
        seconds: Callable[[], float],
        failures: int = 3,
        open_seconds: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.seconds = seconds
        self.failures = failures
        self.open_seconds = open_seconds
        self.on_change = on_change
        self._failed = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        """True from opening until a call succeeds again (half-open included)."""
        return self._open_until is not None

    def allow(self) -> bool:
        """May a call go to the backend now?"""
        if self._open_until is None:
            return True
        if self._probing or self.seconds() < self._open_until:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failed = 0
        self._probing = False
        if self._open_until is not None:
            self._open_until = None
            if self.on_change is not None:
                self.on_change(False)

    def failure(self) -> None:
        self._failed += 1
        was_open = self._open_until is not None
        if was_open or self._failed >= self.failures:
            self._probing = False
            self._open_until = self.seconds() + self.open_seconds
            if not was_open and self.on_change is not None:
                self.on_change(True)


class RedisStore:
    """Check and charge limits in Redis, each call within ``backend.timeout_seconds``.

    ``check_and_charge`` fires with ``Charged`` or fails with ``BackendError``; it never waits
    longer than the deadline, connecting included. A connection lost or timed out is dropped
    (so a late reply can never answer a later call) and made again by the next call.
    """

    def __init__(
        self,
        backend: RedisBackend,
        reactor: Any,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.backend = backend
        #: Told the duration in seconds of every successful script call.
        self.observe = observe
        self.reactor = reactor
        self.timeout = backend.timeout_seconds
        self._endpoint = client_endpoint(reactor, backend.address, max(self.timeout, 0.001))
        self._connection: Any = None
        self._connecting = False
        self._waiters: list[defer.Deferred[Any]] = []

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.connected == 1

    def check_and_charge(
        self, requests: Sequence[tuple[str, str, Rate]], *, charge: bool = True
    ) -> defer.Deferred[Charged]:
        """Judge every (limit name, key, rate) on Redis's clock; charge all only if all allow
        (never with ``charge=False``)."""
        keys = [redis_key(limit, key) for limit, key, _ in requests]
        args: list[str | int] = ["charge" if charge else "peek", ""]
        for _, _, rate in requests:
            args += [rate.interval_us, rate.tolerance_us]
        return self.run_script(keys, args)

    def run_script(self, keys: list[str], args: list[str | int]) -> defer.Deferred[Charged]:
        """``SCRIPT`` with these KEYS and ARGV (tests give ARGV[2], the time)."""
        started = perf_counter()
        result = self._call(lambda connection: connection.eval(SCRIPT, keys, args))
        if self.observe is not None:
            result.addCallback(self._timed, started)
        return result.addCallback(_charged)

    def _timed(self, reply: Any, started: float) -> Any:
        if self.observe is not None:
            self.observe(perf_counter() - started)
        return reply

    def reset(self, limit: str, key: str) -> defer.Deferred[bool]:
        """Forget a key (a full bucket again); fires True if it existed."""
        result = self._call(lambda connection: connection.delete(redis_key(limit, key)))
        return result.addCallback(lambda deleted: bool(deleted))

    def connect(self) -> defer.Deferred[Any]:
        """Connect (and authenticate) now, within the deadline: start-up warms the connection."""
        return self._call(lambda connection: defer.succeed(None))

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.loseConnection()

    def _call(self, command: Callable[[Any], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        @defer.inlineCallbacks
        def attempt() -> Any:
            connection = yield self._connected()
            reply = yield command(connection)
            if isinstance(reply, Exception):
                raise reply
            return reply

        call: defer.Deferred[Any] = attempt()
        call.addTimeout(self.timeout, self.reactor)
        return call.addErrback(self._failed)

    def _connected(self) -> defer.Deferred[Any]:
        if self.connected:
            return defer.succeed(self._connection)
        waiting: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append(waiting)
        if not self._connecting:
            self._connecting = True
            self._open().addBoth(self._connect_done)
        return waiting

    @defer.inlineCallbacks
    def _open(self) -> Any:
        connection = _txredisapi().RedisProtocol(replyTimeout=self.timeout)
        connection.callLater = self.reactor.callLater  # its reply deadline, on our reactor
        yield self._endpoint.connect(_OneConnection(connection))
        try:
            yield connection.whenConnected()
            password = self.backend.password
            if password is not None:
                username = self.backend.username or None
                reply = yield connection.auth(password.reveal(), username)
                if isinstance(reply, Exception):
                    raise reply
        except BaseException:
            connection.transport.abortConnection()
            raise
        return connection

    def _connect_done(self, result: Any) -> None:
        """Hand the new connection (or why there is none) to every call still waiting."""
        self._connecting = False
        waiters, self._waiters = self._waiters, []
        if not isinstance(result, Failure):
            self._connection = result
        for waiting in waiters:
            if waiting.called:  # its call's deadline passed meanwhile
                continue
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)

    def _failed(self, failure: Any) -> Any:
        # Whatever went wrong, the connection is not trusted again: a reply that comes late
        # must never be read as the answer to a later call.
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.abortConnection()
        error = failure.value
        if isinstance(error, defer.TimeoutError | defer.CancelledError):
            raise BackendError("timeout", f"no answer within {self.timeout * 1000:g} ms")
        if isinstance(error, _txredisapi().ResponseError):
            raise BackendError("response", str(error))
        raise BackendError("connection", str(error) or type(error).__name__)


def _txredisapi() -> Any:
    """txredisapi, imported on first use: importing it imports ``twisted.internet.reactor``,
    which installs the default reactor, and ``serve`` installs its own first."""
    import txredisapi  # type: ignore[import-untyped]

    return txredisapi


def _charged(reply: Any) -> Charged:
    values = [int(value) for value in reply]
    now, rest = values[0], values[1:]
    checks = [
        Check(bool(rest[i]), rest[i + 1], rest[i + 2], rest[i + 3]) for i in range(0, len(rest), 4)
    ]
    return Charged(now, checks)


class _OneConnection(Factory):
    """The factory an endpoint wants, for one protocol built in advance."""

    noisy = False
    isLazy = False  # read by txredisapi when its own AUTH fails (policyd does its own)

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> Any:
        self.connection.factory = self
        return self.connection

    def stopTrying(self) -> None:
        pass

    def connectionError(self, message: str) -> None:
        log.warning("redis: %s", message)
