"""The load generator: N persistent connections, one request in flight on each, like Postfix.

Each smtpd process keeps one connection to the policy service and waits for the reply before it
sends the next request; this client does the same, with N connections driven by one asyncio loop
using plain ``asyncio.Protocol`` callbacks (no coroutine per request) and requests encoded ahead
of time, so that the client spends as little CPU per request as it can.

A run is bounded twice: it stops after ``max_requests`` requests or ``max_seconds`` of load,
whichever comes first, and a watchdog aborts it if replies stop coming.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    """What one run measured on the client side."""

    connections: int
    requests: int = 0
    wall_seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    client_cpu_seconds: float = 0.0
    mismatches: int = 0
    mismatch_examples: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stopped_by: str = ""

    def percentile_ms(self, fraction: float) -> float:
        """Latency percentile (nearest rank) in milliseconds; 0 when nothing was measured."""
        if not self.latencies_ns:
            return 0.0
        ordered = sorted(self.latencies_ns)
        index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
        return ordered[index] / 1e6

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ns) / 1e6 if self.latencies_ns else 0.0

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_seconds if self.wall_seconds > 0 else 0.0


class _Run:
    """State shared by the connections of one run."""

    def __init__(
        self, pool: list[tuple[bytes, bytes]], max_requests: int, max_seconds: float
    ) -> None:
        self.pool = pool
        self.remaining = max_requests
        self.max_seconds = max_seconds
        self.deadline = 0.0
        self.latencies: list[int] = []
        self.mismatches = 0
        self.mismatch_examples: list[str] = []
        self.errors: list[str] = []
        self.active = 0
        self.last_reply = 0.0
        self.hit_deadline = False
        self.done: asyncio.Future[None] | None = None

    def connection_finished(self) -> None:
        self.active -= 1
        if self.active == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)


class _Connection(asyncio.Protocol):
    """One persistent policy connection: send, wait for ``action=...\\n\\n``, send the next."""

    def __init__(self, run: _Run, offset: int) -> None:
        self.run = run
        self.index = offset % len(run.pool)
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.expected = b""
        self.sent_at = 0
        self.in_flight = False
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send_next(self) -> None:
        run = self.run
        if run.remaining <= 0:
            self.finish()
            return
        if time.perf_counter() >= run.deadline:
            run.hit_deadline = True
            self.finish()
            return
        run.remaining -= 1
        request, self.expected = run.pool[self.index]
        self.index += 1
        if self.index == len(run.pool):
            self.index = 0
        self.in_flight = True
        self.sent_at = time.perf_counter_ns()
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buffer = self.buffer + data if self.buffer else data
        if not buffer.endswith(b"\n\n"):
            self.buffer = buffer
            return
        self.buffer = b""
        run = self.run
        if not self.in_flight:
            run.errors.append(f"unsolicited data: {buffer[:80]!r}")
            self.finish()
            return
        self.in_flight = False
        run.latencies.append(now - self.sent_at)
        run.last_reply = time.perf_counter()
        if buffer != self.expected:
            run.mismatches += 1
            if len(run.mismatch_examples) < 3:
                run.mismatch_examples.append(f"got {buffer!r}, expected {self.expected!r}")
        self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.run.errors.append(f"connection lost mid-run: {exc or 'closed by server'}")
            self.finished = True
            self.run.connection_finished()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.run.connection_finished()


async def _connect_all(host: str, port: int, run: _Run, connections: int) -> list[_Connection]:
    """Open every connection before the load starts (at most 50 handshakes at a time)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(50)

    async def one(offset: int) -> _Connection:
        async with gate:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(run, offset), host, port), 10
            )
            return protocol

    # Spread the connections over the request pool so they do not send the same requests.
    step = max(1, len(run.pool) // connections)
    opened = await asyncio.gather(
        *(one(i * step) for i in range(connections)), return_exceptions=True
    )
    failures = [item for item in opened if isinstance(item, BaseException)]
    conns = [item for item in opened if isinstance(item, _Connection)]
    if failures:
        for conn in conns:
            conn.finished = True
            if conn.transport is not None:
                conn.transport.abort()
        raise RuntimeError(
            f"{len(failures)} of {connections} connections failed to open: {failures[0]!r}"
        )
    return conns


async def _drive(
    host: str,
    port: int,
    pool: list[tuple[bytes, bytes]],
    connections: int,
    max_requests: int,
    max_seconds: float,
    on_start: Callable[[], None] | None,
) -> LoadResult:
    loop = asyncio.get_running_loop()
    run = _Run(pool, max_requests, max_seconds)
    result = LoadResult(connections=connections)
    conns = await _connect_all(host, port, run, connections)
    try:
        run.done = loop.create_future()
        run.active = len(conns)
        if on_start is not None:
            on_start()
        cpu_before = os.times()
        started = time.perf_counter()
        run.deadline = started + max_seconds
        run.last_reply = started
        for conn in conns:
            conn.send_next()
        # Watchdog: the run ends by itself (request budget or deadline); if the server stops
        # answering, give up 10 s after the last reply or 10 s past the deadline.
        while not run.done.done():
            await asyncio.wait([run.done], timeout=0.5)
            now = time.perf_counter()
            if now - run.last_reply > 10 or now > run.deadline + 10:
                run.errors.append("no reply for 10 s: run aborted")
                break
        ended = time.perf_counter()
        cpu_after = os.times()
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.finished = True
                conn.transport.abort()
    result.requests = len(run.latencies)
    result.wall_seconds = ended - started
    result.latencies_ns = run.latencies
    result.client_cpu_seconds = (cpu_after.user + cpu_after.system) - (
        cpu_before.user + cpu_before.system
    )
    result.mismatches = run.mismatches
    result.mismatch_examples = run.mismatch_examples
    result.errors = run.errors
    result.stopped_by = "time limit" if run.hit_deadline else "request count"
    return result


def run_load(
    port: int,
    pool: list[tuple[bytes, bytes]],
    connections: int,
    max_requests: int,
    max_seconds: float,
    on_start: Callable[[], None] | None = None,
    host: str = "127.0.0.1",
) -> LoadResult:
    """Drive ``max_requests`` requests (or ``max_seconds``) over ``connections`` connections.

    ``pool`` holds (request bytes, expected reply bytes); connections cycle through it.
    ``on_start`` is called once every connection is open, right before the first request
    (the benchmark reads the server's CPU time there).
    """
    return asyncio.run(_drive(host, port, pool, connections, max_requests, max_seconds, on_start))
