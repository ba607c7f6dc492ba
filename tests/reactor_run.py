"""Run Twisted code to completion inside a test, on a reactor of its own.

The global reactor cannot be started twice in one process; a fresh ``SelectReactor`` per call
can. Only code given this reactor explicitly runs on it (policyd passes its reactor around).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.selectreactor import SelectReactor
from twisted.python.failure import Failure

T = TypeVar("T")


def run(work: Callable[[Any], defer.Deferred[T]], timeout: float = 30.0) -> T:
    """``work(reactor)``'s result once its Deferred fires; raises what it fails with.

    Stops by itself after ``timeout`` seconds (the test then fails with TimeoutError).
    """
    reactor: Any = SelectReactor()  # type: ignore[no-untyped-call]
    outcome: list[Any] = []

    def start() -> None:
        result = defer.maybeDeferred(work, reactor)
        result.addTimeout(timeout, reactor)
        result.addBoth(finish)

    def finish(value: Any) -> None:
        outcome.append(value)
        reactor.stop()

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    for reader in list(reactor.getReaders()) + list(reactor.getWriters()):
        reactor.removeReader(reader)
        reactor.removeWriter(reader)
        connection_lost = getattr(reader, "connectionLost", None)
        if connection_lost is not None:
            connection_lost(Failure(ConnectionError("test reactor stopped")))
    (value,) = outcome
    if isinstance(value, Failure):
        value.raiseException()
    return value  # type: ignore[no-any-return]


def sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    return defer.Deferred.fromCoroutine(_sleep(reactor, seconds))


async def _sleep(reactor: Any, seconds: float) -> None:
    waiting: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, waiting.callback, None)
    await waiting
