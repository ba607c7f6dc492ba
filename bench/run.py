"""policyd benchmark: ``make bench`` (or ``.venv/bin/python bench/run.py [--quick]``).

Measures what PRODUCT.md section 7 promises, side by side with the cheapest honest policy
service (``bench/responder.py``) and Debian's postfwd2, and prints figures and ratios (it never
passes or fails on speed):

1. a large configuration (100,000 client networks, 10,000 local domains, in ``file:`` lists)
   and a small one (a handful of entries) are generated in a temporary directory;
2. in-process micro-benchmarks time the pure decision path per verdict type, and the list
   lookups alone, on both configurations;
3. four policy servers run as subprocesses: policyd on the small configuration, the responder
   and postfwd2 with the same rules, and policyd on the large configuration. N persistent
   connections (1, 20, 100, 500) send Postfix-like requests, one in flight on each; the servers
   take turns at every level, in several rounds, and every reply is checked against policyd's
   own ``decide()``. Per run: throughput, client-observed latency, the server's CPU time per
   request (utime + stime from /proc/PID/stat), and the client's own CPU;
4. optionally (root and Postfix installed) a private Postfix fed by ``smtp-source`` compares
   Postfix's built-in relay checks, the responder, policyd (policy check only, and
   ``postfix-examples/main.cf`` as shipped) and postfwd2 as the policy service;
5. the report gives medians over the rounds and the ratios PRODUCT.md's targets are about,
   each marked met or missed.

Every load is bounded by a request count and a wall time; every process started is stopped by
its PID, also on errors. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
from pipeline import PipelineResult, pipeline_report, rotated, run_pipeline  # noqa: E402
from server import (  # noqa: E402
    PolicydServer,
    PostfwdServer,
    ResponderServer,
    ServerProcess,
    free_port,
    postfwd_command,
)
from tables import markdown_table  # noqa: E402

from policyd.config import Config, load_config  # noqa: E402
from policyd.decision import decide  # noqa: E402
from policyd.request import PolicyRequest  # noqa: E402

SEED = 20240611
REQUEST_POOL = 5000

# The servers of the socket benchmark, in the order they take turns: (key, label, config).
SERVERS = (
    ("policyd", "policyd (small)", "small"),
    ("responder", "responder (floor)", "small"),
    ("postfwd", "postfwd2", "small"),
    ("policyd-large", "policyd (large)", "large"),
)
LABELS = {key: label for key, label, _ in SERVERS}


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
    server: str
    round: int
    load: LoadResult
    server_cpu_seconds: float
    rss_kib: int

    @property
    def cpu_us(self) -> float:
        return self.server_cpu_seconds / self.load.requests * 1e6 if self.load.requests else 0.0

    @property
    def client_cpu_us(self) -> float:
        load = self.load
        return load.client_cpu_seconds / load.requests * 1e6 if load.requests else 0.0


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
        ("postfwd2", _command_output([postfwd_command() or "postfwd2", "-V"], "not installed")),
        (
            "Postfix",
            _command_output(["postconf", "-d", "mail_version"], "not installed").rpartition("= ")[
                2
            ],
        ),
    ]


def _command_output(argv: list[str], missing: str) -> str:
    """The first line a version command prints, or ``missing``."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return missing
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0] if lines else missing  # postfwd2 -V exits 1


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


def prepare_configs(workdir: Path, args: argparse.Namespace) -> dict[str, ConfigInfo]:
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
    return {info.name: info for info in infos}


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


def machine_busy(seconds: float = 1.0) -> float:
    """Share (%) of all cores' time not idle over ``seconds`` while the benchmark is idle:
    what other users of the machine take."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = values[3] + values[4]
        return sum(values) - idle, idle

    busy0, idle0 = sample()
    time.sleep(seconds)
    busy1, idle1 = sample()
    total = (busy1 - busy0) + (idle1 - idle0)
    return (busy1 - busy0) / total * 100 if total else 0.0


# --------------------------------------------------------------------------------------------
# Socket benchmark


def start_servers(
    infos: dict[str, ConfigInfo],
    workdir: Path,
    max_connections: int,
    stack: contextlib.ExitStack,
) -> dict[str, ServerProcess]:
    """Start every server of ``SERVERS`` that can run here; each is stopped by ``stack``."""
    servers: dict[str, ServerProcess] = {}
    for key, label, config in SERVERS:
        info = infos[config]
        server: ServerProcess
        if key.startswith("policyd"):
            server = PolicydServer(info.path, info.port, workdir / f"{key}.log")
        elif key == "responder":
            server = ResponderServer(free_port(), workdir / "responder.log")
        else:
            if postfwd_command() is None:
                print("  postfwd2: not installed (Debian package postfwd), left out", flush=True)
                continue
            # Net::Server prefork: one child per connection, all forked at start.
            server = PostfwdServer(workdir / "postfwd2", free_port(), children=max_connections + 10)
        stack.callback(_stop, server)
        seconds = server.start()
        time.sleep(0.2)
        if key.startswith("policyd"):
            info.startup_seconds = seconds
            info.idle_rss_kib = server.memory_kib()
        print(
            f"  {label}: PID {server.pid}, listening after {seconds:.2f} s, "
            f"RSS {server.memory_kib() / 1024:.0f} MiB",
            flush=True,
        )
        servers[key] = server
    return servers


def _stop(server: ServerProcess) -> None:
    code = server.stop()
    if code not in (0, None, -15):
        print(f"  ! {server.label} exited with {code}", flush=True)


def socket_benchmark(
    servers: dict[str, ServerProcess],
    pools: dict[str, list[tuple[bytes, bytes]]],
    args: argparse.Namespace,
) -> list[SocketRun]:
    """Every level, every server, ``args.rounds`` times: servers take turns at each level, in
    an order that starts one server further on in each round."""
    runs: list[SocketRun] = []
    for key, server in servers.items():  # warm-up, not reported
        run_load(server.port, pools[key], 10, 2000, 5.0)
    for round_number in range(1, args.rounds + 1):
        print(f"  round {round_number}", flush=True)
        order = rotated(list(servers), round_number - 1)  # each round starts one further on
        for connections in args.concurrency:
            for key in order:
                server = servers[key]
                runs.append(measure(key, server, pools[key], connections, round_number, args))
    return runs


def measure(
    key: str,
    server: ServerProcess,
    pool: list[tuple[bytes, bytes]],
    connections: int,
    round_number: int,
    args: argparse.Namespace,
) -> SocketRun:
    """One bounded run; the server's CPU time is read right before the first request."""
    cpu: list[float] = []
    try:
        result = run_load(
            server.port,
            pool,
            connections,
            args.requests,
            args.max_seconds,
            on_start=lambda: cpu.append(server.cpu_seconds()),
            processes=args.client_processes,
        )
    except RuntimeError as err:  # could not even connect
        result = LoadResult(connections=connections, errors=[str(err)])
    server_cpu = server.cpu_seconds() - cpu[0] if cpu else 0.0
    run = SocketRun(key, round_number, result, server_cpu, server.memory_kib())
    load = run.load
    print(
        f"    {LABELS[key]:18} {connections:4} conns: {load.requests:7} requests in "
        f"{load.wall_seconds:5.2f} s = {load.throughput:7.0f}/s, p50 {load.percentile_ms(0.5):6.2f}"
        f" ms, p99 {load.percentile_ms(0.99):7.2f} ms, server {run.cpu_us:5.1f} µs/req, "
        f"client {run.client_cpu_us:4.1f} µs/req ({load.stopped_by})"
        + (f", {load.wrong} WRONG" if load.wrong else ""),
        flush=True,
    )
    for problem in load.errors[:3] + load.mismatch_examples:
        print(f"      ! {problem}", flush=True)
    return run


# --------------------------------------------------------------------------------------------
# Medians and ratios


@dataclass
class Summary:
    """One server at one level: medians over the rounds."""

    server: str
    connections: int
    runs: list[SocketRun]

    def median(self, value: Callable[[SocketRun], float]) -> float:
        return statistics.median(value(run) for run in self.runs)

    def spread(self, value: Callable[[SocketRun], float], fmt: str) -> str:
        values = [value(run) for run in self.runs]
        text = format(statistics.median(values), fmt)
        if len(values) > 1:
            text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
        return text

    @property
    def wrong(self) -> int:
        return sum(run.load.wrong for run in self.runs)

    @property
    def throughput(self) -> float:
        return self.median(lambda r: r.load.throughput)

    @property
    def cpu_us(self) -> float:
        return self.median(lambda r: r.cpu_us)

    @property
    def p99_ms(self) -> float:
        return self.median(lambda r: r.load.percentile_ms(0.99))


def share(cpu_seconds: float, run: SocketRun) -> float:
    """CPU time as a percentage of one core during the run."""
    wall = run.load.wall_seconds
    return cpu_seconds / wall * 100 if wall else 0.0


def summarize(runs: list[SocketRun]) -> dict[tuple[str, int], Summary]:
    summaries: dict[tuple[str, int], Summary] = {}
    for run in runs:
        key = (run.server, run.load.connections)
        summaries.setdefault(key, Summary(run.server, run.load.connections, [])).runs.append(run)
    return summaries


@dataclass
class Ratio:
    """A ratio: the median of the per-round ratios (each round's two runs ran back to back, so
    a machine whose speed drifts during the benchmark changes both alike)."""

    what: str
    where: str
    value: float | None  # None: not comparable
    target: str  # "≤ 1.5", "≥ 0.95" or "" (no target)
    note: str = ""
    rounds: list[float] = field(default_factory=list)  # the per-round ratios

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not comparable"
        if not self.target:
            return "—"
        bound = float(self.target.split()[1])
        met = self.value <= bound if self.target.startswith("≤") else self.value >= bound
        return "met" if met else "**missed**"


def paired_ratios(first: dict[int, float], second: dict[int, float]) -> list[float]:
    """first ÷ second in each round both have (rounds in order); a zero divisor is left out."""
    return [first[r] / second[r] for r in sorted(first) if second.get(r)]


def socket_ratios(summaries: dict[tuple[str, int], Summary], levels: list[int]) -> list[Ratio]:
    """The ratios of the socket benchmark: per round, then the median over the rounds."""
    ratios: list[Ratio] = []

    def pair(
        what: str,
        a: str,
        b: str,
        value: Callable[[SocketRun], float],
        target: Callable[[int], str],
    ) -> None:
        for level in levels:
            first, second = summaries.get((a, level)), summaries.get((b, level))
            if first is None or second is None:
                continue
            per_round = paired_ratios(
                {run.round: value(run) for run in first.runs},
                {run.round: value(run) for run in second.runs},
            )
            comparable = not first.wrong and not second.wrong and bool(per_round)
            wrong = [LABELS[s.server] for s in (first, second) if s.wrong]
            ratios.append(
                Ratio(
                    what,
                    f"{level} conns",
                    statistics.median(per_round) if comparable else None,
                    target(level),
                    f"wrong answers from {', '.join(wrong)}" if wrong else "",
                    per_round,
                )
            )

    pair(
        "policyd ÷ responder, server CPU per request",
        "policyd",
        "responder",
        lambda r: r.cpu_us,
        lambda n: "≤ 1.5" if n in (20, 100) else "",
    )
    pair(
        "policyd ÷ postfwd2, server CPU per request",
        "policyd",
        "postfwd",
        lambda r: r.cpu_us,
        lambda n: "≤ 0.1",
    )
    pair(
        "policyd ÷ responder, throughput",
        "policyd",
        "responder",
        lambda r: r.load.throughput,
        lambda n: "≥ 0.67",
    )
    pair(
        "policyd ÷ responder, p99 latency",
        "policyd",
        "responder",
        lambda r: r.load.percentile_ms(0.99),
        lambda n: "≤ 1.5" if n == 100 else "",
    )
    pair(
        "policyd large ÷ small configuration, throughput",
        "policyd-large",
        "policyd",
        lambda r: r.load.throughput,
        lambda n: "≥ 0.95",
    )
    pair(
        "policyd large ÷ small configuration, server CPU per request",
        "policyd-large",
        "policyd",
        lambda r: r.cpu_us,
        lambda n: "",
    )
    return ratios


def pipeline_ratios(result: PipelineResult) -> list[Ratio]:
    ratios: list[Ratio] = []
    targets = {"shipped": "≥ 0.95", "policy": "≥ 0.97"}
    names = {
        "responder": "responder",
        "policy": "policyd policy check only",
        "shipped": "policyd as shipped",
        "postfwd": "postfwd2",
    }

    def rates(key: str, count: int) -> dict[int, float]:
        return {r.round: r.rate for r in result.runs if r.variant == key and r.recipients == count}

    def add(what: str, count: int, key: str, divisor: str, target: str) -> None:
        per_round = paired_ratios(rates(key, count), rates(divisor, count))
        if per_round:
            where = f"{count} rcpt/msg"
            ratios.append(Ratio(what, where, statistics.median(per_round), target, "", per_round))

    for count in result.recipients:
        for key in ("policy", "shipped"):
            what = f"pipeline: {names[key]} ÷ responder, accepted msg/s"
            add(what, count, key, "responder", targets[key])
        for key in ("responder", "policy", "shipped", "postfwd"):
            add(f"pipeline: {names[key]} ÷ built-in, accepted msg/s", count, key, "builtin", "")
    return ratios


# --------------------------------------------------------------------------------------------
# Report


def report(
    machine: list[tuple[str, str]],
    infos: dict[str, ConfigInfo],
    runs: list[SocketRun],
    micro: list[MicroResult],
    lookups: list[MicroResult],
    pipeline: PipelineResult | None,
    args: argparse.Namespace,
    elapsed: float,
) -> str:
    out: list[str] = []
    out.append("### Machine\n")
    out += [f"- {label}: {value}" for label, value in machine]
    mode = "quick" if args.quick else "full"
    pipeline_text = (
        f"; Postfix pipeline {args.pipeline_recipients:,} recipients per run"
        if args.pipeline == "auto"
        else "; Postfix pipeline skipped"
    )
    out.append(
        f"- run: {mode}, {args.rounds} rounds, each run {args.requests:,} requests or "
        f"{args.max_seconds:g} s (whichever first), concurrency "
        f"{', '.join(map(str, args.concurrency))}, {args.client_processes} client process(es), "
        f"{args.micro_iterations:,} decisions per micro-benchmark type{pipeline_text}; "
        f"took {elapsed:.0f} s ({elapsed / 60:.1f} min)"
    )

    summaries = summarize(runs)
    ratios = socket_ratios(summaries, args.concurrency)
    if pipeline is not None:
        ratios += pipeline_ratios(pipeline)
    out.append("\n### Ratios against the targets\n")
    out.append(
        "Each ratio is computed per round, from the two runs of that round (the servers and "
        "variants take turns: the two ran seconds apart, in the pipeline minutes); *value* is "
        "the median of the per-round ratios listed under *rounds*.\n"
    )
    out.append(
        markdown_table(
            ["ratio", "at", "value", "rounds", "target", "verdict", "note"],
            [
                [
                    r.what,
                    r.where,
                    f"{r.value:.2f}" if r.value is not None else "-",
                    ", ".join(f"{v:.2f}" for v in r.rounds),
                    r.target or "—",
                    r.verdict,
                    r.note,
                ]
                for r in ratios
            ],
            "llrllll",
        )
    )

    out.append("\n### Configurations\n")
    rows = []
    for info in infos.values():
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
    for level in args.concurrency:
        for key, label, _ in SERVERS:
            summary = summaries.get((key, level))
            if summary is None:
                continue
            rows.append(
                [
                    str(level),
                    label,
                    str(len(summary.runs)),
                    summary.spread(lambda r: r.load.throughput, ",.0f"),
                    f"{summary.median(lambda r: r.load.percentile_ms(0.5)):.2f}",
                    f"{summary.p99_ms:.2f}",
                    summary.spread(lambda r: r.cpu_us, ".1f"),
                    f"{summary.median(lambda r: share(r.server_cpu_seconds, r)):.0f} %",
                    f"{summary.median(lambda r: r.client_cpu_us):.1f}",
                    f"{summary.median(lambda r: share(r.load.client_cpu_seconds, r)):.0f} %",
                    f"{summary.median(lambda r: r.rss_kib) / 1024:.0f}",
                    f"{summary.median(lambda r: r.load.requests):,.0f}",
                    str(summary.wrong) if not summary.wrong else f"**{summary.wrong}**",
                ]
            )
    out.append(
        markdown_table(
            [
                "conns",
                "server",
                "rounds",
                "req/s, median (range)",
                "p50 ms",
                "p99 ms",
                "server CPU µs/req, median (range)",
                "server CPU",
                "client CPU µs/req",
                "client CPU",
                "server RSS MiB",
                "requests/run",
                "wrong answers",
            ],
            rows,
            "rlrrrrrrrrrrr",
        )
    )
    small = infos["small"]
    large = infos["large"]
    out.append(
        f"\nRequest mix: {', '.join(f'{name} {share} %' for name, share in workload.LOAD_MIX)}"
        " (29 attributes each, as Postfix 3.7 sends them). Denied, and so logged by policyd: "
        f"small {small.pool_denied_share * 100:.1f} %, large {large.pool_denied_share * 100:.1f}"
        " % of the requests. Every reply of every server was compared with what policyd's own "
        "`decide()` gives for the request; *wrong answers* counts the differences plus "
        "connection failures over all rounds. Latency and CPU columns are medians over the "
        "rounds; *server CPU* and *client CPU* are shares of one core during the run "
        "(postfwd2: master and prefork children summed, so it can exceed 100 %)."
    )
    wrong = sorted({LABELS[s.server] for s in summaries.values() if s.wrong})
    if wrong:
        out.append(
            f"\n**Wrong answers from: {', '.join(wrong)}.** Their figures are not comparable."
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
    if pipeline is not None:
        out.append("\n### Postfix pipeline\n")
        out.append(pipeline_report(pipeline))
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
    parser.add_argument("--quick", action="store_true", help="a short run (about 3 minutes)")
    parser.add_argument("--output", metavar="FILE", help="also write the Markdown report here")
    parser.add_argument(
        "--concurrency",
        metavar="N,N,...",
        help="persistent connections per run (default 1,20,100,500; quick: 1,20,100)",
    )
    parser.add_argument("--rounds", type=int, help="rounds of every comparison (default 3)")
    parser.add_argument("--requests", type=int, help="requests per run at most (default 200000)")
    parser.add_argument("--max-seconds", type=float, help="load time per run at most (default 2.5)")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="client processes sharing the connections (default 1)",
    )
    parser.add_argument(
        "--micro-iterations", type=int, help="decisions per micro-benchmark type (default 50000)"
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
        "--pipeline-recipients",
        type=int,
        help="recipients (policy requests) per pipeline run (default 15000)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.concurrency is None:
        args.concurrency = [1, 20, 100] if quick else [1, 20, 100, 500]
    else:
        args.concurrency = [int(n) for n in args.concurrency.split(",") if n.strip()]
    defaults = {
        "rounds": (2, 3),
        "requests": (50_000, 200_000),
        "max_seconds": (1.0, 2.5),
        "micro_iterations": (10_000, 50_000),
        "pipeline_recipients": (2500, 15_000),
    }
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    for name in (*defaults, "client_processes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not args.concurrency or min(args.concurrency) <= 0 or max(args.concurrency) > 1000:
        parser.error("--concurrency: 1 to 1000 connections per run")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    busy_before = machine_busy()
    steal_before = cpu_counters()
    speed_before = reference_loop()
    machine = machine_info()
    print("policyd benchmark")
    for label, value in machine:
        print(f"  {label}: {value}")
    print(f"  machine CPU busy before the start: {busy_before:.0f} %", flush=True)
    print(flush=True)

    pipeline: PipelineResult | None = None
    with (
        tempfile.TemporaryDirectory(prefix="policyd-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        workdir.chmod(0o755)  # postfwd2 and Postfix's daemons run as other users
        print(
            f"generating configurations ({args.networks:,} networks, {args.domains:,} domains)",
            flush=True,
        )
        infos = prepare_configs(workdir, args)
        for info in infos.values():
            print(f"  {info.name}: load_config() {info.load_seconds:.2f} s", flush=True)

        print("\ndecision micro-benchmark (in-process)", flush=True)
        micro_configs = {
            info.name: (info.config, workload.RequestFactory(info.lists, SEED + 2))
            for info in infos.values()
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
        servers = start_servers(infos, workdir, max(args.concurrency), stack)
        pools = {key: infos[config].pool for key, _, config in SERVERS}
        runs = socket_benchmark(servers, pools, args)

        if args.pipeline == "auto":
            print("\nPostfix pipeline", flush=True)
            services = {k: servers[k] for k in ("responder", "policyd", "postfwd") if k in servers}
            pipeline = run_pipeline(services, workdir, args.pipeline_recipients, args.rounds)
        stack.close()  # every server stopped before the closing measurements

    steal_after = cpu_counters()
    speed_after = reference_loop()
    busy_after = machine_busy()
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
    machine.append(
        (
            "machine CPU busy with the benchmark idle (others' load), 1 s",
            f"{busy_before:.0f} % before the start, {busy_after:.0f} % after the end",
        )
    )
    text = report(
        machine, infos, runs, micro, lookups, pipeline, args, time.perf_counter() - started
    )
    print()
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
