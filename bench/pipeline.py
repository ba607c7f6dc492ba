"""Postfix pipeline comparison: smtp-source through a private Postfix, with each policy service.

Uses the end-to-end tests' harness (``tests/e2e/postfix.py``, ``PostfixInstance``): a throwaway
Postfix under a temporary directory, listening on 127.0.0.1 only, every transport ``discard:``.
The variants (``VARIANTS``, in the order they take turns):

* **built-in**: ``smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination``
  (``mynetworks = 127.0.0.0/8``), no policy service at all;
* **responder**: ``postfix-examples/main.cf``'s ``check_policy_service`` exactly as shipped,
  pointed at ``bench/responder.py`` (the floor), the outbound tables switched off;
* **policyd, policy check only**: the same, pointed at policyd (small configuration);
* **policyd as shipped**: ``postfix-examples/main.cf`` exactly as the e2e tests load it
  (``shipped_relay_settings()``), policy check plus the outbound tables, against a policyd
  whose YAML comes from ``shipped_policyd_config()``;
* **postfwd2**: like the responder, pointed at Debian's postfwd2 with equivalent rules.

Every policy service decides with the benchmark's small rules, which allow 127.0.0.0/8.
``smtp-source`` relays a bounded number of messages over 20 parallel sessions, 1 and then 5
recipients per message (the same number of recipients, i.e. policy requests, in each run), all
at a remote domain (every recipient is an allowed relay); the variants take turns within each
round, each on a freshly started Postfix with the same settings (``BENCH_SETTINGS``). Needs
root (Postfix's master runs as root) and Debian's postfix package; otherwise the comparison is
skipped with a message saying why.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workload
from server import PolicydServer, ServerProcess, free_port
from tables import markdown_table

SESSIONS = 20
MESSAGE_BYTES = 2000
WARMUP_MESSAGES = 300  # lets Postfix fork its smtpd, cleanup and trivial-rewrite processes
POLICY_ONLY_OVERRIDES = (
    "\n# benchmark: the outbound tables switched off (a later setting wins in main.cf)\n"
    "transport_maps =\n"
    "smtp_sasl_password_maps =\n"
)
BUILTIN_RESTRICTIONS = (
    "# benchmark baseline: Postfix's own relay checks only\n"
    "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
)
# Appended to every variant's main.cf (after the relay settings under test, which it does not
# touch). in_flow_delay: cleanup otherwise pauses up to 1 s per message whenever the queue
# manager has not yet caught up, which made acceptance rates swing by a factor of three
# between identical runs and measured the delivery side rather than the policy check.
BENCH_SETTINGS = "\n# benchmark: no inflow throttling (see bench/pipeline.py)\nin_flow_delay = 0s\n"
# (key, label, policy service key or None, main.cf flavour)
VARIANTS = (
    ("builtin", "built-in: permit_mynetworks, reject_unauth_destination", None, "builtin"),
    ("responder", "responder (floor): check_policy_service as shipped", "responder", "policy"),
    ("policy", "policyd: check_policy_service only (outbound tables off)", "policyd", "policy"),
    ("shipped", "policyd: postfix-examples/main.cf as shipped", "shipped", "shipped"),
    ("postfwd", "postfwd2: check_policy_service as shipped", "postfwd", "policy"),
)
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
# postfwd2 accepts mail at a third of the others' rate: its runs send a third of the
# recipients, so that they take about as long as the others' (a rate is a rate) and the whole
# benchmark stays within its time budget.
RECIPIENT_DIVISOR = {"postfwd": 3}


def shipped_policyd_config(directory: Path, port: int, socketmap_port: int) -> Path:
    """The policyd YAML behind the "as shipped" variant: the small rules plus what the shipped
    main.cf's outbound lines need from policyd: its socketmap listener (``sasl_passwd``) and the
    static transport table it writes (``transport_table_path()``), built by ``postmap`` with a
    minimal main.cf of its own (the Postfix instances do not exist yet when policyd starts)."""
    config = workload.write_config(
        directory, "shipped", workload.small_lists(), port, socketmap_port=socketmap_port
    )
    postmap_config = directory / "postmap-config"
    postmap_config.mkdir(exist_ok=True)
    (postmap_config / "main.cf").write_text("compatibility_level = 3.7\n")
    with config.open("a") as out:
        out.write(
            "outbound:\n"
            "  transport_table:\n"
            f"    path: {transport_table_path(directory)}\n"
            f"    postfix_config_dir: {postmap_config}\n"
        )
    return config


def transport_table_path(directory: Path) -> Path:
    """Where the "as shipped" policyd writes the transport table the Postfix instances read."""
    return directory / "transport"


@dataclass
class PipelineRun:
    variant: str
    recipients: int
    round: int
    messages: int
    seconds: float  # smtp-source run time: every message accepted
    drained_seconds: float | None  # start -> queue empty; None if it did not empty
    server_cpu_seconds: float | None
    machine_busy: float | None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


@dataclass
class PipelineResult:
    runs: list[PipelineRun] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str = ""
    recipients_per_run: int = 0
    rounds: int = 0
    recipients: tuple[int, ...] = ()

    def median_rate(self, variant: str, recipients: int) -> float | None:
        rates = [r.rate for r in self.runs if r.variant == variant and r.recipients == recipients]
        return statistics.median(rates) if rates else None


def rotated(items: list[Any], turn: int) -> list[Any]:
    """``items`` starting at ``turn`` (mod its length): round N starts one place further on,
    so that no variant always follows the same other one (Postfix's processes winding down,
    caches warmed by the previous variant)."""
    if not items:
        return items
    turn %= len(items)
    return items[turn:] + items[:turn]


def missing_requirements() -> str | None:
    """Why the comparison cannot run here, or None."""
    if os.geteuid() != 0:
        return "not running as root (Postfix's master process must run as root)"
    for name in ("postfix", "postconf", "smtp-source"):
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists():
            return f"`{name}` not found (install Debian's postfix package)"
    return None


def _smtp_source() -> str:
    return shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def _send(
    address: tuple[str, int], messages: int, recipients: int, timeout: float
) -> tuple[float, str]:
    """Run smtp-source for ``messages`` messages; (seconds, error text or '')."""
    argv = [
        _smtp_source(),
        "-s",
        str(SESSIONS),
        "-m",
        str(messages),
        "-r",
        str(recipients),
        "-d",
        "-N",
        "-l",
        str(MESSAGE_BYTES),
        "-M",
        "client.bench.example",
        "-f",
        "sender@client.bench.example",
        "-t",
        "user@remote.bench.example",
        f"{address[0]}:{address[1]}",
    ]
    started = time.perf_counter()
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, f"smtp-source did not finish within {timeout:.0f}s"
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        return elapsed, f"smtp-source exited {result.returncode}: {' / '.join(output[-3:])}"
    return elapsed, ""


def _cpu_busy_idle() -> tuple[int, int]:
    """(busy, idle) jiffies of all CPUs together, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, idle


def _queued(queue_dir: Path) -> int:
    """Messages still in the instance's queue (files under its queue directories)."""
    count = 0
    for name in QUEUES:
        for _, _, files in os.walk(queue_dir / name):
            count += len(files)
    return count


def _wait_drained(queue_dir: Path, timeout: float) -> bool:
    """Wait (bounded) until the queue is empty; True if it emptied."""
    deadline = time.perf_counter() + timeout
    while _queued(queue_dir):
        if time.perf_counter() >= deadline:
            return False
        time.sleep(0.02)
    return True


def run_pipeline(
    services: dict[str, ServerProcess],
    workdir: Path,
    recipients_per_run: int,
    rounds: int,
    recipients: tuple[int, ...] = (1, 5),
) -> PipelineResult:
    """Run the comparison. ``services`` holds the running "responder", "policyd" and "postfwd"
    servers (a missing one leaves its variant out); the "as shipped" policyd is started here.
    Each run sends ``recipients_per_run`` recipients: that many messages of one recipient, a
    fifth as many of five."""
    result = PipelineResult(
        recipients_per_run=recipients_per_run, rounds=rounds, recipients=recipients
    )
    missing = missing_requirements()
    if missing:
        result.skipped = missing
        print(f"  skipped: {missing}", flush=True)
        return result
    from tests.e2e import postfix as harness

    class BenchPostfix(harness.PostfixInstance):
        """The harness's Postfix, its main.cf as the e2e tests write it plus BENCH_SETTINGS."""

        def _main_cf(self) -> str:
            return super()._main_cf() + BENCH_SETTINGS

    class BuiltinPostfix(BenchPostfix):
        """The harness's Postfix with Postfix's built-in relay restrictions, no policy service."""

        def shipped_relay_settings(self) -> str:
            return BUILTIN_RESTRICTIONS

    class PolicyOnlyPostfix(BenchPostfix):
        """The shipped main.cf with its outbound tables switched off: the policy check alone."""

        def shipped_relay_settings(self) -> str:
            return super().shipped_relay_settings() + POLICY_ONLY_OVERRIDES

    flavours: dict[str, Any] = {
        "builtin": BuiltinPostfix,
        "policy": PolicyOnlyPostfix,
        "shipped": BenchPostfix,
    }
    timeout = max(120.0, recipients_per_run / 20)
    base = workdir / "pipeline"
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    shipped: PolicydServer | None = None
    instances: list[Any] = []
    try:
        port, socketmap_port = free_port(), free_port()
        config = shipped_policyd_config(base, port, socketmap_port)
        shipped = PolicydServer(config, port, base / "policyd-shipped.log")
        shipped.start()
        servers: dict[str, ServerProcess] = {**services, "shipped": shipped}
        variants: list[tuple[str, Any, ServerProcess | None]] = []
        for key, _label, service, flavour in VARIANTS:
            server = servers.get(service) if service else None
            if service and server is None:
                continue
            instance = flavours[flavour](
                policy_port=server.port if server is not None else free_port(),
                socketmap_port=socketmap_port,
                transport_table=transport_table_path(base),
                listeners=[("127.0.0.1", free_port())],
                sasl=False,
                basedir=base / f"postfix-{key}",
            )
            instances.append(instance)
            variants.append((key, instance, server))
        for round_number in range(1, rounds + 1):
            for key, instance, server in rotated(variants, round_number - 1):
                instance.start()
                try:
                    _send(instance.smtp_address, WARMUP_MESSAGES, max(recipients), timeout)
                    _wait_drained(instance.queue_dir, timeout)
                    for count in recipients:
                        run = _measure(
                            key,
                            instance,
                            server,
                            max(1, recipients_per_run // RECIPIENT_DIVISOR.get(key, 1) // count),
                            count,
                            round_number,
                            timeout,
                        )
                        if isinstance(run, str):
                            result.problems.append(run)
                            print(f"  ! {run}", flush=True)
                        else:
                            result.runs.append(run)
                finally:
                    instance.stop()
    except Exception as err:
        result.problems.append(f"{type(err).__name__}: {err}")
        print(f"  ! pipeline comparison failed: {err}", flush=True)
    finally:
        for instance in instances:
            try:
                instance.stop()
            except Exception as err:
                result.problems.append(f"stopping Postfix: {err}")
        if shipped is not None:
            shipped.stop()
        shutil.rmtree(base, ignore_errors=True)
    return result


def _measure(
    key: str,
    instance: Any,
    server: ServerProcess | None,
    messages: int,
    recipients: int,
    round_number: int,
    timeout: float,
) -> PipelineRun | str:
    """One smtp-source run on a started instance with an empty queue; a problem as text."""
    if not _wait_drained(instance.queue_dir, timeout):
        return f"{key}, round {round_number}: queue not empty before the run"
    cpu_before = server.cpu_seconds() if server is not None else 0.0
    machine_before = _cpu_busy_idle()
    started = time.perf_counter()
    seconds, error = _send(instance.smtp_address, messages, recipients, timeout)
    machine_after = _cpu_busy_idle()
    drained = _wait_drained(instance.queue_dir, timeout)
    delivered = time.perf_counter() - started
    server_cpu = server.cpu_seconds() - cpu_before if server is not None else None
    if error:
        return f"{key}, {recipients} rcpt, round {round_number}: {error}"
    busy = machine_after[0] - machine_before[0]
    idle = machine_after[1] - machine_before[1]
    run = PipelineRun(
        key,
        recipients,
        round_number,
        messages,
        seconds,
        delivered if drained else None,
        server_cpu,
        busy / (busy + idle) if busy + idle else None,
    )
    print(
        f"  round {round_number} {key:9} {recipients} rcpt: {messages} messages accepted in "
        f"{seconds:.2f} s = {run.rate:.0f} msg/s"
        + (
            f", server CPU {server_cpu / (messages * recipients) * 1e6:.0f} µs/rcpt"
            if server_cpu is not None
            else ""
        ),
        flush=True,
    )
    return run


def _median_range(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def pipeline_report(result: PipelineResult) -> str:
    """The Markdown section: medians per variant and recipient count, with ratios."""
    if result.skipped:
        return f"Skipped: {result.skipped}.\n"
    rows = []
    for count in result.recipients:
        builtin = result.median_rate("builtin", count)
        floor = result.median_rate("responder", count)
        for key, label, service, _ in VARIANTS:
            runs = [r for r in result.runs if r.variant == key and r.recipients == count]
            if not runs:
                continue
            rate = statistics.median(r.rate for r in runs)
            cpu = [
                r.server_cpu_seconds / (r.messages * count) * 1e6
                for r in runs
                if r.server_cpu_seconds is not None
            ]
            drained = [r.messages / r.drained_seconds for r in runs if r.drained_seconds]
            busy = [r.machine_busy * 100 for r in runs if r.machine_busy is not None]
            rows.append(
                [
                    str(count),
                    label,
                    str(len(runs)),
                    _median_range([r.rate for r in runs], ".0f"),
                    f"{rate * count:.0f}",
                    f"{rate / builtin:.2f}" if builtin else "-",
                    f"{rate / floor:.2f}" if floor and service else "-",
                    _median_range(drained, ".0f") if len(drained) == len(runs) else "not drained",
                    _median_range(cpu, ".0f") if service else "-",
                    _median_range(busy, ".0f"),
                ]
            )
    lines = [
        markdown_table(
            [
                "rcpt/msg",
                "relay restrictions",
                "rounds",
                "accepted msg/s, median (range)",
                "rcpt/s",
                "÷ built-in",
                "÷ responder",
                "end-to-end msg/s",
                "policy server CPU µs/rcpt",
                "machine CPU busy %",
            ],
            rows,
            "rlrrrrrrrr",
        ),
        "",
        f"`smtp-source -s {SESSIONS} -m {result.recipients_per_run:,}/R -r R -d -N -l "
        f"{MESSAGE_BYTES}` (R recipients per message, {result.recipients_per_run:,} recipients "
        "per run, a third of them for postfwd2, whose rate is a third of the others') from "
        "127.0.0.1 to recipients at a remote domain (every recipient is a relay decision, "
        "allowed), through a private Postfix per variant (harness `tests/e2e/postfix.py`, every "
        "transport `discard:`, `in_flow_delay = 0s`); the variants took turns in each of "
        f"{result.rounds} rounds (each round starting one variant further on), each on a "
        f"freshly started Postfix, after a {WARMUP_MESSAGES}-message warm-up and with an empty "
        "queue. Ratios are of the medians.",
    ]
    for problem in result.problems:
        lines.append(f"\n- problem: {problem}")
    return "\n".join(lines) + "\n"
