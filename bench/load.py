"""The load generator: N persistent connections, one request in flight on each, like Postfix.

Each smtpd process keeps one connection to the policy service and waits for the reply before it
sends the next request; this client does the same. It is a bare ``epoll`` loop over
non-blocking sockets (no asyncio, no callbacks, no per-request objects), with every request
encoded ahead of time, so that the client spends as little CPU per request as Python allows:
the figure to beat is a server's own cost per request, and the client must not be what limits
the throughput. With ``processes > 1`` the connections are split over that many forked client
processes (each its own loop), started together once every connection is open.

Every reply is compared with the expected one (computed by the caller with policyd's own
``decide()``); a difference counts as a mismatch, a connection closed or reset by the server
as an error. A run is bounded twice: it stops after ``max_requests`` requests or
``max_seconds`` of load, whichever comes first, and it gives up if no reply arrives for 10 s.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STALL_SECONDS = 10.0  # no reply for this long: the run is aborted


@dataclass
class LoadResult:
    """What one run measured on the client side."""

    connections: int
    requests: int = 0
    wall_seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    client_cpu_seconds: float = 0.0
    client_processes: int = 1
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

    @property
    def wrong(self) -> int:
        """Wrong answers plus connection failures: anything but the expected reply."""
        return self.mismatches + len(self.errors)


def raise_fd_limit(wanted: int = 4096) -> None:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _open(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` connected, non-blocking sockets (closed again if any connection fails)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.settimeout(10)
            sock.connect((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
    except OSError as err:
        for sock in socks:
            sock.close()
        raise RuntimeError(f"connection {len(socks)} of {count} failed: {err}") from err
    return socks


def _send(sock: socket.socket, request: bytes) -> None:
    """Send ``request`` on a non-blocking socket; in the rare case of a partial send (a full
    socket buffer), the rest goes out blocking."""
    sent = sock.send(request)
    if sent < len(request):
        sock.setblocking(True)
        try:
            sock.sendall(request[sent:])
        finally:
            sock.setblocking(False)


@dataclass
class _Outcome:
    """One loop's results (sent back from a client process as a plain tuple)."""

    latencies: list[int]
    mismatches: int
    examples: list[str]
    errors: list[str]
    hit_deadline: bool
    cpu_seconds: float
    ended: float  # time.perf_counter() when the loop ended


def _loop(
    socks: list[socket.socket],
    pool: list[tuple[bytes, bytes]],
    offsets: list[int],
    budget: int,
    deadline: float,
) -> _Outcome:
    """Drive ``socks`` until ``budget`` requests were sent or ``deadline`` passed."""
    cpu_before = os.times()
    poller = select.epoll(len(socks) + 1)
    size = len(pool)
    fds = [sock.fileno() for sock in socks]
    top = max(fds) + 1
    by_fd: list[Any] = [None] * top
    position = [0] * top
    expected: list[bytes] = [b""] * top
    sent_at = [0] * top
    partial: list[bytes] = [b""] * top
    latencies: list[int] = []
    record = latencies.append
    mismatches = 0
    examples: list[str] = []
    errors: list[str] = []
    hit_deadline = False
    deadline_ns = int(deadline * 1e9)
    clock = time.perf_counter_ns
    # perf_counter and perf_counter_ns share one clock
    active = 0
    remaining = budget
    for sock, offset in zip(socks, offsets, strict=True):
        fd = sock.fileno()
        by_fd[fd] = sock
        if remaining <= 0:
            continue
        remaining -= 1
        index = offset % size
        request, expected[fd] = pool[index]
        position[fd] = index + 1
        poller.register(fd, select.EPOLLIN)
        active += 1
        sent_at[fd] = clock()
        _send(sock, request)
    last_reply = clock()
    stall_ns = int(STALL_SECONDS * 1e9)
    while active:
        events = poller.poll(0.5)
        now = clock()
        if not events:
            if now - last_reply > stall_ns:
                errors.append(f"no reply for {STALL_SECONDS:.0f} s: run aborted")
                break
            continue
        last_reply = now
        for fd, _ in events:
            sock = by_fd[fd]
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                data = b""
                errors.append(f"connection failed mid-run: {err}")
            if not data:
                if not errors or not errors[-1].startswith("connection failed"):
                    errors.append("connection closed by the server mid-run")
                poller.unregister(fd)
                active -= 1
                continue
            if partial[fd]:
                data = partial[fd] + data
            if not data.endswith(b"\n\n"):
                partial[fd] = data
                continue
            partial[fd] = b""
            now = clock()
            record(now - sent_at[fd])
            if data != expected[fd]:
                mismatches += 1
                if len(examples) < 3:
                    examples.append(f"got {data!r}, expected {expected[fd]!r}")
            if remaining <= 0 or now >= deadline_ns:
                hit_deadline = hit_deadline or remaining > 0
                poller.unregister(fd)
                active -= 1
                continue
            remaining -= 1
            index = position[fd]
            if index == size:
                index = 0
            request, expected[fd] = pool[index]
            position[fd] = index + 1
            sent_at[fd] = now
            try:
                _send(sock, request)
            except OSError as err:
                errors.append(f"send failed mid-run: {err}")
                poller.unregister(fd)
                active -= 1
    ended = time.perf_counter()
    poller.close()
    cpu_after = os.times()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return _Outcome(latencies, mismatches, examples, errors, hit_deadline, cpu, ended)


def _child(
    conn: Any,
    host: str,
    port: int,
    pool: list[tuple[bytes, bytes]],
    offsets: list[int],
    budget: int,
) -> None:
    """A client process: connect, report ready, wait for the start time, drive, report."""
    try:
        socks = _open(host, port, len(offsets))
    except RuntimeError as err:
        conn.send(("failed", str(err)))
        conn.close()
        return
    try:
        conn.send(("ready", ""))
        message = conn.recv()
        if message is None:
            return
        outcome = _loop(socks, pool, offsets, budget, message)
        conn.send(("done", outcome))
    finally:
        for sock in socks:
            sock.close()
        conn.close()


def run_load(
    port: int,
    pool: list[tuple[bytes, bytes]],
    connections: int,
    max_requests: int,
    max_seconds: float,
    on_start: Callable[[], None] | None = None,
    host: str = "127.0.0.1",
    processes: int = 1,
) -> LoadResult:
    """Drive ``max_requests`` requests (or ``max_seconds``) over ``connections`` connections.

    ``pool`` holds (request bytes, expected reply bytes); connection *i* starts at an offset
    spread over the pool and cycles through it. ``on_start`` is called once every connection is
    open, right before the first request (the benchmark reads the server's CPU time there).
    ``processes`` splits the connections over that many client processes (at most one per
    connection); their CPU time is added up in ``client_cpu_seconds``.
    """
    raise_fd_limit(connections + 64)
    processes = max(1, min(processes, connections))
    step = max(1, len(pool) // connections)
    offsets = [i * step for i in range(connections)]
    result = LoadResult(connections=connections, client_processes=processes)
    if processes == 1:
        socks = _open(host, port, connections)
        try:
            if on_start is not None:
                on_start()
            started = time.perf_counter()
            outcomes = [_loop(socks, pool, offsets, max_requests, started + max_seconds)]
        finally:
            for sock in socks:
                sock.close()
    else:
        started, outcomes = _run_processes(
            host, port, pool, offsets, max_requests, max_seconds, processes, on_start
        )
    result.wall_seconds = max(outcome.ended for outcome in outcomes) - started
    for outcome in outcomes:
        result.latencies_ns += outcome.latencies
        result.mismatches += outcome.mismatches
        result.mismatch_examples += outcome.examples
        result.errors += outcome.errors
        result.client_cpu_seconds += outcome.cpu_seconds
    result.mismatch_examples = result.mismatch_examples[:3]
    result.requests = len(result.latencies_ns)
    hit = any(outcome.hit_deadline for outcome in outcomes)
    result.stopped_by = "time limit" if hit else "request count"
    return result


def _run_processes(
    host: str,
    port: int,
    pool: list[tuple[bytes, bytes]],
    offsets: list[int],
    max_requests: int,
    max_seconds: float,
    processes: int,
    on_start: Callable[[], None] | None,
) -> tuple[float, list[_Outcome]]:
    """Fork ``processes`` clients, start them together, collect their outcomes (bounded)."""
    context = multiprocessing.get_context("fork")
    children: list[tuple[Any, Any]] = []
    try:
        for n in range(processes):
            mine = offsets[n::processes]
            budget = max_requests // processes + (1 if n < max_requests % processes else 0)
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_child, args=(child_end, host, port, pool, mine, budget), daemon=True
            )
            process.start()
            child_end.close()
            children.append((process, parent_end))
        for _, pipe in children:
            if not pipe.poll(30):
                raise RuntimeError("a client process did not connect within 30 s")
            status, detail = pipe.recv()
            if status != "ready":
                raise RuntimeError(detail)
        if on_start is not None:
            on_start()
        started = time.perf_counter()
        for _, pipe in children:
            pipe.send(started + max_seconds)
        outcomes = []
        for _, pipe in children:
            if not pipe.poll(max_seconds + STALL_SECONDS + 30):
                raise RuntimeError("a client process did not finish in time")
            status, outcome = pipe.recv()
            outcomes.append(outcome)
        return started, outcomes
    finally:
        for process, pipe in children:
            pipe.close()
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
