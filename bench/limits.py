"""What sending limits cost, and what a Redis failure costs: ``make bench-limits`` (also part of
``make bench``), or ``.venv/bin/python bench/limits.py [--quick]``.

1. **Cost per allowed relay.** Three policyd processes on the same rules take turns, in
   several rounds, under the same load: limits off, limits in process (``backend: memory``),
   limits in Redis (a throwaway ``redis-server`` on a unix socket, persistence off). Every
   request is an allowed relay from one of 4,096 client addresses that two limits apply to
   (per ``client_address`` and per ``client_network``), with rates far above the load, so every
   request is checked and charged and none is deferred: the cost of the check itself. Per run:
   throughput, latency, policyd's CPU time per request and, with Redis, redis-server's too.
   Every reply is checked (``action=OK``).
2. **Redis failing under load.** policyd with its limits in Redis (deadline
   ``timeout: 0.05``, ``on_backend_error: local``) answers 20 connections, a third of the
   requests relay attempts it must deny; after one second Redis is stopped with SIGSTOP (hung)
   or SIGKILL (dead), after two more it is resumed or restarted. Reported: the slowest answer,
   the answers slower than the deadline plus 5 ms, and the wrong answers (a denial answered
   with anything but the denial counts).

Loads are bounded by a request count and a wall time; every process is stopped by its PID.
Only loopback addresses and unix sockets are used.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT):  # bench modules, and the tests' process helpers
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import yaml  # noqa: E402
from load import LoadResult, run_load  # noqa: E402
from pipeline import rotated  # noqa: E402
from server import PolicydServer, ServerProcess, free_port, process_cpu_seconds  # noqa: E402
from tables import markdown_table  # noqa: E402
from workload import encode  # noqa: E402

from tests.redis_server import RedisServer  # noqa: E402

ALLOWED_NETWORK = ipaddress.ip_network("10.20.0.0/20")  # 16 /24s, 4,096 addresses
DENIED_NETWORK = ipaddress.ip_network("198.51.100.0/24")
DEADLINE_SECONDS = 0.05
VARIANTS = (("off", "limits off"), ("memory", "limits in process"), ("redis", "limits in Redis"))
LABELS = dict(VARIANTS)
OK = b"action=OK\n\n"
DENY = b"action=550 5.7.1 Relaying Denied\n\n"


def config(port: int, variant: str, redis: RedisServer | None) -> dict[str, Any]:
    rules: dict[str, Any] = {
        "listen": {"policy": f"inet:127.0.0.1:{port}"},
        "local_domains": ["local.example"],
        "relay": {"allow": {"client_networks": [str(ALLOWED_NETWORK)]}},
    }
    if variant == "off":
        return rules
    backend: Any = "memory"
    if variant == "redis":
        assert redis is not None
        backend = {"redis": redis.address, "timeout": DEADLINE_SECONDS}
    never_reached = {"rate": "1000000/1s", "burst": 1_000_000}
    rules["rate_limits"] = {
        "backend": backend,
        "on_backend_error": "local",
        "limits": [
            {
                "name": "host",
                "applies_to": ["relay.allow.client_networks"],
                "key": "client_address",
                **never_reached,
            },
            {
                "name": "net",
                "applies_to": ["relay.allow.client_networks"],
                "key": "client_network",
                **never_reached,
            },
        ],
    }
    return rules


def request(client: str, n: int) -> bytes:
    return encode(
        {
            "request": "smtpd_access_policy",
            "protocol_state": "RCPT",
            "protocol_name": "ESMTP",
            "client_address": client,
            "client_name": "unknown",
            "helo_name": "client.example",
            "sender": f"sender{n}@client.example",
            "recipient": f"user{n}@remote.example",
            "recipient_count": "0",
            "queue_id": "",
            "instance": f"{n:x}.{n:x}.0",
            "size": "0",
            "sasl_method": "",
            "sasl_username": "",
            "server_address": "127.0.0.1",
            "server_port": "25",
        }
    )


def pool(size: int, denied_share: float, seed: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    allowed = list(ALLOWED_NETWORK.hosts())
    denied = list(DENIED_NETWORK.hosts())
    items = []
    for n in range(size):
        if rng.random() < denied_share:
            items.append((request(str(rng.choice(denied)), n), DENY))
        else:
            items.append((request(str(rng.choice(allowed)), n), OK))
    return items


@dataclass
class Run:
    variant: str
    round: int
    load: LoadResult
    policyd_cpu: float
    redis_cpu: float

    def per_request_us(self, seconds: float) -> float:
        return seconds / self.load.requests * 1e6 if self.load.requests else 0.0


def measure(
    variant: str,
    server: ServerProcess,
    redis: RedisServer,
    items: list[tuple[bytes, bytes]],
    connections: int,
    round_number: int,
    args: argparse.Namespace,
) -> Run:
    before: list[float] = []
    redis_pid = redis.process.pid if redis.process is not None else 0

    def on_start() -> None:
        before.append(server.cpu_seconds())
        before.append(process_cpu_seconds(redis_pid))

    result = run_load(server.port, items, connections, args.requests, args.max_seconds, on_start)
    policyd_cpu = server.cpu_seconds() - before[0]
    redis_cpu = process_cpu_seconds(redis_pid) - before[1]
    run = Run(variant, round_number, result, policyd_cpu, redis_cpu if variant == "redis" else 0.0)
    print(
        f"    {LABELS[variant]:18} {connections:4} conns: {result.requests:7} requests, "
        f"{result.throughput:7.0f}/s, p50 {result.percentile_ms(0.5):5.2f} ms, p99 "
        f"{result.percentile_ms(0.99):6.2f} ms, policyd {run.per_request_us(policyd_cpu):5.1f} "
        f"µs/req, redis {run.per_request_us(run.redis_cpu):4.1f} µs/req"
        + (f", {result.wrong} WRONG" if result.wrong else ""),
        flush=True,
    )
    for problem in result.errors[:3] + result.mismatch_examples:
        print(f"      ! {problem}", flush=True)
    return run


def cost_benchmark(
    workdir: Path, redis: RedisServer, args: argparse.Namespace, stack: contextlib.ExitStack
) -> list[Run]:
    servers: dict[str, ServerProcess] = {}
    for variant, label in VARIANTS:
        port = free_port()
        path = workdir / f"{variant}.yaml"
        path.write_text(yaml.safe_dump(config(port, variant, redis)))
        server = PolicydServer(path, port, workdir / f"{variant}.log")
        stack.callback(server.stop)
        server.start()
        servers[variant] = server
        print(f"  {label}: PID {server.pid}", flush=True)
    items = pool(5000, 0.0, 20261202)
    for server in servers.values():  # warm-up, not reported
        run_load(server.port, items, 10, 2000, 5.0)
    runs = []
    for round_number in range(1, args.rounds + 1):
        print(f"  round {round_number}", flush=True)
        for connections in args.concurrency:
            for variant in rotated(list(servers), round_number - 1):
                runs.append(
                    measure(
                        variant,
                        servers[variant],
                        redis,
                        items,
                        connections,
                        round_number,
                        args,
                    )
                )
    return runs


@dataclass
class Outage:
    failure: str
    load: LoadResult
    slow: int  # answers slower than the deadline plus 5 ms


def outage_benchmark(workdir: Path, redis: RedisServer, args: argparse.Namespace) -> list[Outage]:
    results = []
    items = pool(5000, 1 / 3, 20261203)
    for failure in ("hung", "killed"):
        if redis.process is None:
            redis.start()
        redis.command("FLUSHALL")
        port = free_port()
        path = workdir / f"outage-{failure}.yaml"
        path.write_text(yaml.safe_dump(config(port, "redis", redis)))
        server = PolicydServer(path, port, workdir / f"outage-{failure}.log")
        try:
            server.start()
            run_load(port, items, 10, 2000, 5.0)  # warm, connected to Redis
            events = _schedule(redis, failure)
            result = run_load(port, items, 20, 10**9, args.outage_seconds, on_start=events.start)
            events.join()
        finally:
            server.stop()
            redis.resume_if_paused()
        limit_ns = (DEADLINE_SECONDS + 0.005) * 1e9
        slow = sum(1 for latency in result.latencies_ns if latency > limit_ns)
        outage = Outage(failure, result, slow)
        results.append(outage)
        print(
            f"  Redis {failure}: {result.requests} requests, slowest {result.max_ms:.1f} ms, "
            f"p99 {result.percentile_ms(0.99):.2f} ms, {slow} slower than "
            f"{(DEADLINE_SECONDS + 0.005) * 1000:.0f} ms, {result.wrong} wrong answers",
            flush=True,
        )
        for problem in result.errors[:3] + result.mismatch_examples:
            print(f"      ! {problem}", flush=True)
    return results


def _schedule(redis: RedisServer, failure: str) -> threading.Thread:
    """A thread that fails Redis 1 s into the load and brings it back 2 s later."""

    def run() -> None:
        time.sleep(1.0)
        if failure == "hung":
            redis.pause()
        else:
            assert redis.process is not None
            os.kill(redis.process.pid, signal.SIGKILL)
            redis.process.wait(10)
            redis.process = None
        time.sleep(2.0)
        if failure == "hung":
            redis.resume()
        else:
            redis.start()

    return threading.Thread(target=run, daemon=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(runs: list[Run], outages: list[Outage], args: argparse.Namespace) -> str:
    rows = []
    ratio_rows = []
    for connections in args.concurrency:
        by_variant: dict[str, list[Run]] = {
            variant: [r for r in runs if r.variant == variant and r.load.connections == connections]
            for variant, _ in VARIANTS
        }

        def per(
            variant: str, pick: Callable[[Run], float], runs_of: dict[str, list[Run]] = by_variant
        ) -> float:
            return median([pick(run) for run in runs_of[variant]])

        for variant, label in VARIANTS:
            rows.append(
                [
                    label,
                    str(connections),
                    f"{per(variant, lambda r: r.load.throughput):,.0f}",
                    f"{per(variant, lambda r: r.load.percentile_ms(0.5)):.2f}",
                    f"{per(variant, lambda r: r.load.percentile_ms(0.99)):.2f}",
                    f"{per(variant, lambda r: r.per_request_us(r.policyd_cpu)):.1f}",
                    f"{per(variant, lambda r: r.per_request_us(r.redis_cpu)):.1f}"
                    if variant == "redis"
                    else "-",
                    str(sum(r.load.wrong for r in by_variant[variant])),
                ]
            )
        for variant in ("memory", "redis"):
            # Per round, then the median: the variants of one round ran side by side.
            cpu = [
                on.per_request_us(on.policyd_cpu + on.redis_cpu)
                / off.per_request_us(off.policyd_cpu)
                for on, off in zip(by_variant[variant], by_variant["off"], strict=True)
            ]
            throughput = [
                on.load.throughput / off.load.throughput
                for on, off in zip(by_variant[variant], by_variant["off"], strict=True)
            ]
            extra = [
                on.per_request_us(on.policyd_cpu + on.redis_cpu)
                - off.per_request_us(off.policyd_cpu)
                for on, off in zip(by_variant[variant], by_variant["off"], strict=True)
            ]
            ratio_rows.append(
                [
                    f"{LABELS[variant]} ÷ limits off",
                    str(connections),
                    f"{median(cpu):.2f} ({', '.join(f'{v:.2f}' for v in cpu)})",
                    f"{median(extra):+.1f}",
                    f"{median(throughput):.2f}",
                ]
            )
    lines = [
        "### Cost of sending limits per allowed relay",
        "",
        markdown_table(
            [
                "variant",
                "connections",
                "requests/s",
                "p50 ms",
                "p99 ms",
                "policyd CPU µs/req",
                "redis-server CPU µs/req",
                "wrong",
            ],
            rows,
            "lrrrrrrr",
        ),
        "",
        markdown_table(
            [
                "comparison",
                "connections",
                "CPU per request (policyd + redis-server), median (rounds)",
                "extra CPU µs/req",
                "throughput",
            ],
            ratio_rows,
            "lrrrr",
        ),
        "",
        f"Medians of {args.rounds} rounds; every request an allowed relay meeting two limits.",
        "",
        "### Redis failing under load (20 connections, a third of the requests denied)",
        "",
        markdown_table(
            [
                "Redis",
                "requests",
                "slowest answer ms",
                "p99 ms",
                f"answers over {(DEADLINE_SECONDS + 0.005) * 1000:.0f} ms",
                "wrong answers",
            ],
            [
                [
                    outage.failure,
                    str(outage.load.requests),
                    f"{outage.load.max_ms:.1f}",
                    f"{outage.load.percentile_ms(0.99):.2f}",
                    str(outage.slow),
                    str(outage.load.wrong),
                ]
                for outage in outages
            ],
            "lrrrrr",
        ),
        "",
        f"Deadline (rate_limits.backend.timeout) {DEADLINE_SECONDS * 1000:.0f} ms; Redis failed "
        f"1 s into a {args.outage_seconds:.0f} s load and came back 2 s later.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="the cost of sending limits (figures only)")
    parser.add_argument("--quick", action="store_true", help="a short run (about 1 minute)")
    parser.add_argument("--output", metavar="FILE", help="also write the Markdown report here")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 2)")
    parser.add_argument("--requests", type=int, help="requests per run at most (default 100000)")
    parser.add_argument("--max-seconds", type=float, help="seconds per run at most (default 2.5)")
    parser.add_argument(
        "--outage-seconds", type=float, default=5.0, help="length of each outage run (default 5)"
    )
    args = parser.parse_args(argv)
    args.concurrency = [1, 20] if args.quick else [1, 20, 100]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.requests is None:
        args.requests = 20_000 if args.quick else 100_000
    if args.max_seconds is None:
        args.max_seconds = 1.0 if args.quick else 2.5
    if min(args.rounds, args.requests, args.max_seconds) <= 0 or args.outage_seconds < 4:
        parser.error("counts and times must be positive; --outage-seconds at least 4")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    print("policyd sending-limits benchmark", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="policyd-bench-limits-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        redis = RedisServer(workdir)
        stack.callback(redis.stop)
        redis.start()
        print(f"  redis-server: PID {redis.process.pid if redis.process else '-'}", flush=True)
        runs = cost_benchmark(workdir, redis, args, stack)
        print("\nRedis failing under load", flush=True)
        outages = outage_benchmark(workdir, redis, args)
    text = report(runs, outages, args)
    text += f"\n\nThe whole run took {time.perf_counter() - started:.0f} s.\n"
    print()
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
