"""policyd benchmark: ``make bench`` (or ``.venv/bin/python bench/run.py [--quick]``).

Measures what PRODUCT.md section 7 promises, and prints figures (it never passes or fails on
speed):

1. a large configuration (100,000 client networks, 10,000 local domains, in ``file:`` lists)
   and a small one (a handful of entries) are generated in a temporary directory;
2. policyd runs on each as a subprocess; the time from process start to the policy port
   accepting connections is the configuration load time;
3. N persistent connections (1, 10, 100, 300) send Postfix-like requests one at a time each;
   per run: throughput, client-observed latency, and the policyd process's CPU time per
   request (utime + stime from /proc/PID/stat), its RSS, and the benchmark client's own CPU;
4. in-process micro-benchmarks time the pure decision path per verdict type, and the list
   lookups alone, on both configurations;
5. optionally (root and Postfix installed) a private Postfix fed by ``smtp-source`` compares
   policyd against Postfix's built-in relay checks.

Every load is bounded by a request count and a wall time; every process started is stopped by
its PID, also on errors. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (BENCH_DIR, REPO_ROOT):  # bench modules, and the tests' process helpers
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import workload  # noqa: E402
from load import LoadResult, run_load  # noqa: E402
from micro import REPEATS, MicroResult, run_lookups, run_micro  # noqa: E402
from server import PolicydServer, free_port  # noqa: E402
from tables import markdown_table  # noqa: E402

from policyd.config import Config, load_config  # noqa: E402
from policyd.decision import decide  # noqa: E402
from policyd.request import PolicyRequest  # noqa: E402

SEED = 20240611
REQUEST_POOL = 5000


@dataclass
class ConfigInfo:
    """One generated configuration and what loading it cost."""

    name: str
    path: Path
    port: int
    lists: workload.Lists
    config: Config | None = None
    load_seconds: float = 0.0  # load_config() in a fresh process
    startup_seconds: float = 0.0  # policyd process start -> port accepting
    idle_rss_kib: int = 0
    file_bytes: int = 0
    pool: list[tuple[bytes, bytes]] = field(default_factory=list)
    pool_denied_share: float = 0.0


@dataclass
class SocketRun:
    config: str
    load: LoadResult
    server_cpu_seconds: float
    rss_kib: int
    log_lines: int


# --------------------------------------------------------------------------------------------
# Machine


def machine_info() -> list[tuple[str, str]]:
    """What the benchmark ran on, as (label, value) pairs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    system = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                system = line.partition("=")[2].strip().strip('"')
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", cpu),
        ("cores", f"{os.cpu_count()} ({usable} usable by this process)"),
        ("memory", memory),
        ("OS", system),
        ("kernel", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("Twisted", _version("twisted")),
        ("PyYAML", _version("pyyaml")),
        ("prometheus-client", _version("prometheus-client")),
        ("policyd", _version("policyd")),
    ]


def reference_loop(repeats: int = 15) -> tuple[float, float]:
    """(best, median) milliseconds of a fixed pure-Python loop: the machine's speed right now.

    Shared or throttled virtual CPUs change speed during a run; comparing this figure at the
    start and at the end of the benchmark shows how much.
    """
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i * i
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return times[0], times[len(times) // 2]


def cpu_counters() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat; (0, 0) when unavailable."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0, 0
    values = [int(v) for v in first[1:]]
    steal = values[7] if len(values) > 7 else 0
    # guest time is already counted in user time
    return steal, sum(values[:8])


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------
# Configurations and request pools


def prepare_configs(workdir: Path, args: argparse.Namespace) -> list[ConfigInfo]:
    """Write the small and the large configuration; load each in-process (timed)."""
    infos = [
        ConfigInfo("small", Path(), free_port(), workload.small_lists()),
        ConfigInfo(
            "large",
            Path(),
            free_port(),
            workload.large_lists(SEED, args.networks, args.domains),
        ),
    ]
    for info in infos:
        info.path = workload.write_config(workdir, info.name, info.lists, info.port)
        info.file_bytes = sum(
            p.stat().st_size for p in workdir.iterdir() if p.name.startswith(f"{info.name}")
        )
        info.load_seconds = time_load_config(info.path)
        info.config = load_config(info.path)
        info.pool, info.pool_denied_share = build_request_pool(info.config, info.lists)
    return infos


_TIME_LOAD = (
    "import sys, time\n"
    "from policyd.config import load_config\n"
    "started = time.perf_counter()\n"
    "load_config(sys.argv[1])\n"
    "print(time.perf_counter() - started)\n"
)


def time_load_config(path: Path) -> float:
    """Seconds ``load_config()`` takes in a fresh Python process (imports not included)."""
    result = subprocess.run(
        [sys.executable, "-c", _TIME_LOAD, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(result.stdout.strip())


def build_request_pool(
    config: Config, lists: workload.Lists
) -> tuple[list[tuple[bytes, bytes]], float]:
    """The socket benchmark's requests, encoded, each with the reply policyd must give.

    The expected reply comes from policyd's own ``decide()``; the client counts every reply
    that differs (it should be none).
    """
    factory = workload.RequestFactory(lists, SEED + 1)
    pool = []
    denied = 0
    for _, attributes in factory.mixed(REQUEST_POOL):
        decision = decide(config, PolicyRequest.from_attributes(attributes))
        denied += decision.verdict.value == "denied"
        expected = b"action=" + decision.action.encode() + b"\n\n"
        pool.append((workload.encode(attributes), expected))
    return pool, denied / len(pool)


# --------------------------------------------------------------------------------------------
# Socket benchmark


def socket_benchmark(
    infos: list[ConfigInfo], workdir: Path, args: argparse.Namespace
) -> list[SocketRun]:
    """Start policyd on every configuration, drive each concurrency level, stop them (always).

    The configurations take turns at each level (small, large, small, large, ...), so that a
    change in the machine's speed during the benchmark affects them alike.
    """
    servers = {
        info.name: PolicydServer(info.path, info.port, workdir / f"policyd-{info.name}.log")
        for info in infos
    }
    runs: list[SocketRun] = []
    try:
        for info in infos:
            server = servers[info.name]
            info.startup_seconds = server.start()
            time.sleep(0.2)
            info.idle_rss_kib = server.memory_kib()[0]
            print(
                f"  policyd [{info.name}] PID {server.pid}: listening after "
                f"{info.startup_seconds:.2f} s, RSS {info.idle_rss_kib / 1024:.0f} MiB",
                flush=True,
            )
        for info in infos:  # warm-up, not reported
            run_load(info.port, info.pool, 10, min(2000, args.requests), 10.0)
        for connections in args.concurrency:
            for info in infos:
                runs.append(measure(servers[info.name], info, connections, args))
    finally:
        for name, server in servers.items():
            code = server.stop()
            if code not in (0, None):
                print(f"  ! policyd [{name}] exited with {code}", flush=True)
    return runs


def measure(
    server: PolicydServer, info: ConfigInfo, connections: int, args: argparse.Namespace
) -> SocketRun:
    """One bounded run; the server's CPU time is read right before the first request."""
    cpu: list[float] = []
    lines_before = server.log_lines()
    result = run_load(
        info.port,
        info.pool,
        connections,
        args.requests,
        args.max_seconds,
        on_start=lambda: cpu.append(server.cpu_seconds()),
    )
    server_cpu = server.cpu_seconds() - cpu[0]
    rss = server.memory_kib()[0]
    run = SocketRun(info.name, result, server_cpu, rss, server.log_lines() - lines_before)
    print("  " + describe_run(run), flush=True)
    for problem in result.errors[:3] + result.mismatch_examples:
        print(f"    ! {problem}", flush=True)
    if result.errors:
        print(f"    ! policyd log tail:\n{server.log_tail(10)}", flush=True)
    return run


def describe_run(run: SocketRun) -> str:
    load = run.load
    per_request = run.server_cpu_seconds / load.requests * 1e6 if load.requests else 0.0
    return (
        f"{run.config:5} {load.connections:4} conns: {load.requests} requests in "
        f"{load.wall_seconds:.2f} s = {load.throughput:.0f}/s, p50 {load.percentile_ms(0.5):.2f}"
        f" ms, p99 {load.percentile_ms(0.99):.2f} ms, server CPU {per_request:.0f} µs/request"
        f" ({load.stopped_by})"
    )


# --------------------------------------------------------------------------------------------
# Report


def report(
    machine: list[tuple[str, str]],
    infos: list[ConfigInfo],
    runs: list[SocketRun],
    micro: list[MicroResult],
    lookups: list[MicroResult],
    pipeline_text: str,
    args: argparse.Namespace,
    elapsed: float,
) -> str:
    out: list[str] = []
    out.append("### Machine\n")
    out += [f"- {label}: {value}" for label, value in machine]
    mode = "quick" if args.quick else "full"
    out.append(
        f"- run: {mode}, {args.requests} requests or {args.max_seconds:g} s per level "
        f"(whichever first), concurrency {', '.join(map(str, args.concurrency))}, "
        f"{args.micro_iterations} decisions per micro-benchmark type; took {elapsed:.0f} s"
    )

    out.append("\n### Configurations\n")
    rows = []
    for info in infos:
        assert info.config is not None
        relay = info.config.relay
        rows.append(
            [
                info.name,
                f"{len(relay.allow_client_networks):,}",
                f"{len(info.config.local_domains):,}",
                f"{len(relay.never_client_networks):,}",
                f"{info.file_bytes / 1024:,.0f} KiB",
                f"{info.load_seconds:.2f} s",
                f"{info.startup_seconds:.2f} s",
                f"{info.idle_rss_kib / 1024:.0f} MiB",
            ]
        )
    out.append(
        markdown_table(
            [
                "config",
                "allow networks",
                "local domains",
                "never networks",
                "files",
                "load_config()",
                "start → listening",
                "idle RSS",
            ],
            rows,
            "lrrrrrrr",
        )
    )

    out.append("\n### Policy protocol over TCP (loopback)\n")
    rows = []
    for run in runs:
        load = run.load
        per_request = run.server_cpu_seconds / load.requests * 1e6 if load.requests else 0.0
        rows.append(
            [
                run.config,
                str(load.connections),
                f"{load.requests:,}",
                f"{load.wall_seconds:.2f}",
                f"{load.throughput:,.0f}",
                f"{load.percentile_ms(0.50):.2f}",
                f"{load.percentile_ms(0.90):.2f}",
                f"{load.percentile_ms(0.99):.2f}",
                f"{load.max_ms:.1f}",
                f"{per_request:.0f}",
                f"{run.server_cpu_seconds / load.wall_seconds * 100:.0f} %"
                if load.wall_seconds
                else "-",
                f"{load.client_cpu_seconds / load.wall_seconds * 100:.0f} %"
                if load.wall_seconds
                else "-",
                f"{run.rss_kib / 1024:.0f}",
                f"{run.log_lines:,}",
                str(load.mismatches + len(load.errors)),
            ]
        )
    out.append(
        markdown_table(
            [
                "config",
                "conns",
                "requests",
                "wall s",
                "req/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "server CPU µs/req",
                "server CPU",
                "client CPU",
                "server RSS MiB",
                "log lines",
                "errors",
            ],
            rows,
            "lrrrrrrrrrrrrrr",
        )
    )
    shares = ", ".join(f"{info.name} {info.pool_denied_share * 100:.1f} %" for info in infos)
    out.append(
        f"\nRequest mix: {', '.join(f'{name} {share} %' for name, share in workload.LOAD_MIX)}"
        f" (29 attributes each, as Postfix 3.7 sends them). Denied, and so logged by policyd: "
        f"{shares} of the requests. *errors* counts replies that differ from what policyd's "
        "own `decide()` gives for the request, plus connection failures."
    )

    out.append("\n### Decision path in-process (no sockets)\n")
    out.append(micro_table(micro, "verdict type"))
    iterations = micro[0].iterations if micro else 0
    out.append(
        "\nEach figure: µs per `decide(config, PolicyRequest.from_attributes(attributes))`, "
        f"{iterations:,} decisions per type and configuration in {REPEATS} slices (small and "
        "large interleaved), cycling through 1,000 distinct requests that `decide()` really "
        "puts in that type; *best* is the fastest slice, *median* the middle one."
    )
    out.append("\n### List lookups alone (in-process)\n")
    out.append(micro_table(lookups, "lookup"))
    out.append(
        "\nµs per `client_ip in config.relay.allow_client_networks` (a parsed address) or "
        "`domain in config.local_domains` (the raw recipient domain, normalized by the lookup),"
        " measured like the table above. These are the only steps whose work could depend on "
        "the size of the lists."
    )
    if pipeline_text:
        out.append("\n### Postfix pipeline\n")
        out.append(pipeline_text)
    return "\n".join(out) + "\n"


def micro_table(results: list[MicroResult], first_column: str) -> str:
    """small vs large, best and median, one row per type."""
    small = {r.category: r for r in results if r.config == "small"}
    large = {r.category: r for r in results if r.config == "large"}
    rows = []
    for category, result in large.items():
        base = small[category]
        rows.append(
            [
                result.label,
                f"{base.best_us:.2f}",
                f"{result.best_us:.2f}",
                f"{result.best_us / base.best_us:.2f}",
                f"{base.median_us:.2f}",
                f"{result.median_us:.2f}",
            ]
        )
    return markdown_table(
        [
            first_column,
            "small µs (best)",
            "large µs (best)",
            "large / small",
            "small µs (median)",
            "large µs (median)",
        ],
        rows,
        "lrrrrr",
    )


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="policyd benchmark (prints figures only)")
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--output", metavar="FILE", help="also write the Markdown report here")
    parser.add_argument(
        "--concurrency",
        metavar="N,N,...",
        help="persistent connections per run (default 1,10,100,300; quick: 1,10,100)",
    )
    parser.add_argument("--requests", type=int, help="requests per run (default 20000)")
    parser.add_argument("--max-seconds", type=float, help="wall-time bound per run (default 30)")
    parser.add_argument(
        "--micro-iterations", type=int, help="decisions per micro-benchmark type (default 100000)"
    )
    parser.add_argument("--networks", type=int, default=100_000, help="large config networks")
    parser.add_argument("--domains", type=int, default=10_000, help="large config domains")
    parser.add_argument(
        "--pipeline",
        choices=("auto", "skip"),
        default="auto",
        help="Postfix pipeline comparison: auto (if root and Postfix are there) or skip",
    )
    parser.add_argument(
        "--pipeline-messages", type=int, help="messages per pipeline run (default 3000)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.concurrency is None:
        args.concurrency = [1, 10, 100] if quick else [1, 10, 100, 300]
    else:
        args.concurrency = [int(n) for n in args.concurrency.split(",") if n.strip()]
    if args.requests is None:
        args.requests = 3000 if quick else 20_000
    if args.max_seconds is None:
        args.max_seconds = 10.0 if quick else 30.0
    if args.micro_iterations is None:
        args.micro_iterations = 10_000 if quick else 100_000
    if args.pipeline_messages is None:
        args.pipeline_messages = 500 if quick else 3000
    for name in ("requests", "max_seconds", "micro_iterations", "pipeline_messages"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not args.concurrency or min(args.concurrency) <= 0 or max(args.concurrency) > 1000:
        parser.error("--concurrency: 1 to 1000 connections per run")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    steal_before = cpu_counters()
    speed_before = reference_loop()
    machine = machine_info()
    print("policyd benchmark")
    for label, value in machine:
        print(f"  {label}: {value}")
    print(flush=True)

    with tempfile.TemporaryDirectory(prefix="policyd-bench-") as tmp:
        workdir = Path(tmp)
        print(
            f"generating configurations ({args.networks:,} networks, {args.domains:,} domains)",
            flush=True,
        )
        infos = prepare_configs(workdir, args)
        for info in infos:
            print(f"  {info.name}: load_config() {info.load_seconds:.2f} s", flush=True)

        print("\ndecision micro-benchmark (in-process)", flush=True)
        micro_configs = {
            info.name: (info.config, workload.RequestFactory(info.lists, SEED + 2))
            for info in infos
            if info.config is not None
        }
        micro = run_micro(micro_configs, args.micro_iterations)
        lookups = run_lookups(micro_configs, args.micro_iterations)
        for result in micro + lookups:
            print(
                f"  {result.config:5} {result.label:32} best {result.best_us:6.2f} µs,"
                f" median {result.median_us:6.2f} µs",
                flush=True,
            )

        print("\npolicy protocol over TCP", flush=True)
        runs = socket_benchmark(infos, workdir, args)

        pipeline_text = ""
        if args.pipeline == "auto":
            from pipeline import run_pipeline

            print("\nPostfix pipeline", flush=True)
            large = infos[-1]
            pipeline_text = run_pipeline(large.lists, args.pipeline_messages)

    steal_after = cpu_counters()
    speed_after = reference_loop()
    machine.append(
        (
            "reference loop (200,000 multiply-adds in Python), best / median",
            f"{speed_before[0]:.1f} / {speed_before[1]:.1f} ms at the start, "
            f"{speed_after[0]:.1f} / {speed_after[1]:.1f} ms at the end",
        )
    )
    total = steal_after[1] - steal_before[1]
    if total > 0:
        steal = (steal_after[0] - steal_before[0]) / total * 100
        machine.append(("CPU steal during the run", f"{steal:.1f} % (time taken by the host)"))
    text = report(
        machine, infos, runs, micro, lookups, pipeline_text, args, time.perf_counter() - started
    )
    print()
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
