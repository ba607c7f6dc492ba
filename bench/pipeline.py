"""Postfix pipeline comparison: smtp-source through a private Postfix, with and without policyd.

Uses the end-to-end tests' harness (``tests/e2e/postfix.py``, ``PostfixInstance``): a throwaway
Postfix under a temporary directory, listening on 127.0.0.1 only, every transport ``discard:``.
The variants:

* **built-in**: ``smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination``
  (``mynetworks = 127.0.0.0/8``), no policyd at all;
* **policyd, policy check only** (when the shipped main.cf also names policyd's socketmap
  tables): ``postfix-examples/main.cf`` with ``transport_maps`` and
  ``smtp_sasl_password_maps`` emptied, i.e. the cost of ``check_policy_service`` alone;
* **policyd as shipped**: ``postfix-examples/main.cf`` exactly as the e2e tests load it.

policyd serves the large configuration plus ``127.0.0.0/8``. ``smtp-source`` relays a bounded
number of messages (several recipients each, all at a remote domain, so every recipient is a
relay decision) over parallel sessions; the variants take turns, two rounds. Needs root
(Postfix's master runs as root) and Debian's postfix package; otherwise the comparison is
skipped with a message saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import workload
from server import PolicydServer
from tables import markdown_table

REPO_ROOT = Path(__file__).resolve().parents[1]
SESSIONS = 20
RECIPIENTS = 5
MESSAGE_BYTES = 2000
ROUNDS = 2
POLICY_ONLY_OVERRIDES = (
    "\n# benchmark: the socketmap tables switched off (a later setting wins in main.cf)\n"
    "transport_maps =\n"
    "smtp_sasl_password_maps =\n"
)
BUILTIN_RESTRICTIONS = (
    "# benchmark baseline: Postfix's own relay checks only\n"
    "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
)


def _missing() -> str | None:
    """Why the comparison cannot run here, or None."""
    if os.geteuid() != 0:
        return "not running as root (Postfix's master process must run as root)"
    for name in ("postfix", "postconf", "smtp-source"):
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists():
            return f"`{name}` not found (install Debian's postfix package)"
    return None


def _smtp_source() -> str:
    return shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def _send(address: tuple[str, int], messages: int, timeout: float) -> tuple[float, str]:
    """Run smtp-source for ``messages`` messages; (seconds, error text or '')."""
    argv = [
        _smtp_source(),
        "-s",
        str(SESSIONS),
        "-m",
        str(messages),
        "-r",
        str(RECIPIENTS),
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


QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


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


def run_pipeline(lists: workload.Lists, messages: int) -> str:
    """Run the comparison; return its Markdown section (or the reason it was skipped)."""
    missing = _missing()
    if missing:
        message = f"Skipped: {missing}."
        print(f"  {message}", flush=True)
        return message + "\n"
    from tests.e2e import postfix as harness

    class BuiltinPostfix(harness.PostfixInstance):
        """The harness's Postfix with Postfix's built-in relay restrictions, no policyd."""

        def shipped_relay_settings(self) -> str:
            return BUILTIN_RESTRICTIONS

    class PolicyOnlyPostfix(harness.PostfixInstance):
        """The shipped main.cf with its socketmap tables switched off: the policy check alone."""

        def shipped_relay_settings(self) -> str:
            return super().shipped_relay_settings() + POLICY_ONLY_OVERRIDES

    timeout = max(120.0, messages / 5)
    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-pf-"))
    workdir.chmod(0o755)
    server: PolicydServer | None = None
    instances: list[Any] = []
    rows: list[list[str]] = []
    problems: list[str] = []
    try:
        port = harness.free_port()
        socketmap_port = harness.free_port()
        config = workload.write_config(
            workdir,
            "pipeline",
            lists,
            port,
            extra_networks=("127.0.0.0/8",),
            extra_domains=("local.example",),
            socketmap_port=socketmap_port,
        )
        server = PolicydServer(config, port, workdir / "policyd-pipeline.log")
        server.start()

        def make(cls: Any, label: str) -> Any:
            return cls(
                policy_port=port,
                socketmap_port=socketmap_port,
                listeners=[("127.0.0.1", harness.free_port())],
                sasl=False,
                basedir=workdir / f"postfix-{label}",
            )

        variants: list[tuple[str, Any, bool]] = [
            (
                "built-in: permit_mynetworks, reject_unauth_destination",
                make(BuiltinPostfix, "b"),
                False,
            ),
            (
                "policyd: check_policy_service only (socketmap tables off)",
                make(PolicyOnlyPostfix, "p"),
                True,
            ),
            (
                "policyd: postfix-examples/main.cf as shipped (policy + socketmap tables)",
                make(harness.PostfixInstance, "s"),
                True,
            ),
        ]
        instances = [instance for _, instance, _ in variants]
        for round_number in range(1, ROUNDS + 1):
            for name, instance, uses_policyd in variants:
                instance.start()
                try:
                    _send(instance.smtp_address, min(100, messages), timeout)  # warm-up
                    _wait_drained(instance.queue_dir, timeout)
                    cpu_before = server.cpu_seconds()
                    machine_before = _cpu_busy_idle()
                    started = time.perf_counter()
                    seconds, error = _send(instance.smtp_address, messages, timeout)
                    machine_after = _cpu_busy_idle()
                    drained = _wait_drained(instance.queue_dir, timeout)
                    delivered = time.perf_counter() - started
                    policyd_cpu = server.cpu_seconds() - cpu_before
                finally:
                    instance.stop()
                if error:
                    problems.append(f"{name}, round {round_number}: {error}")
                    print(f"  ! {name}: {error}", flush=True)
                    continue
                per_rcpt = (
                    f"{policyd_cpu / (messages * RECIPIENTS) * 1e6:.0f}" if uses_policyd else "-"
                )
                rate = messages / seconds
                busy = machine_after[0] - machine_before[0]
                idle = machine_after[1] - machine_before[1]
                busy_share = f"{busy / (busy + idle) * 100:.0f} %" if busy + idle else "-"
                print(
                    f"  round {round_number} {name}: {messages} messages accepted in "
                    f"{seconds:.2f} s = {rate:.0f} msg/s, queue empty after {delivered:.2f} s",
                    flush=True,
                )
                if not drained:
                    problems.append(f"{name}, round {round_number}: queue not empty after run")
                rows.append(
                    [
                        name,
                        str(round_number),
                        f"{messages:,}",
                        f"{messages * RECIPIENTS:,}",
                        f"{seconds:.2f}",
                        f"{rate:.0f}",
                        f"{rate * RECIPIENTS:.0f}",
                        busy_share,
                        f"{delivered:.2f}" if drained else "not drained",
                        f"{messages / delivered:.0f}" if drained else "-",
                        per_rcpt,
                    ]
                )
    except Exception as err:
        problems.append(f"{type(err).__name__}: {err}")
        print(f"  ! pipeline comparison failed: {err}", flush=True)
    finally:
        for instance in instances:
            try:
                instance.stop()
            except Exception as err:
                problems.append(f"stopping Postfix: {err}")
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    lines = []
    if rows:
        lines.append(
            markdown_table(
                [
                    "relay restrictions",
                    "round",
                    "messages",
                    "recipients",
                    "accepted in s",
                    "accepted msg/s",
                    "accepted rcpt/s",
                    "machine CPU busy",
                    "queue empty after s",
                    "end-to-end msg/s",
                    "policyd CPU µs/rcpt",
                ],
                rows,
                "lrrrrrrrrrr",
            )
        )
        lines.append(
            f"\n`smtp-source -s {SESSIONS} -m N -r {RECIPIENTS} -d -N -l {MESSAGE_BYTES}` from "
            "127.0.0.1 to recipients at a remote domain (every recipient is a relay decision, "
            "allowed), through a private Postfix (harness `tests/e2e/postfix.py`, every "
            "transport `discard:`); policyd serves the large configuration plus 127.0.0.0/8. "
            "Postfix, policyd and smtp-source share the machine's cores. The variants were run "
            f"in turn, {ROUNDS} rounds, each after a 100-message warm-up and with an empty queue. "
            "*accepted* is smtp-source's run time: every message accepted over SMTP (the "
            "policy check happens here, and so do most socketmap `transport` lookups: "
            "trivial-rewrite consults `transport_maps` when smtpd and cleanup resolve each "
            "recipient). *queue empty* is the time from the start until the last message left "
            "the queue (delivered to `discard:`). *policyd CPU* is the policyd process's CPU "
            "time from the start until the queue was empty, divided by the recipients. "
            "*machine CPU busy* is "
            "the share of all cores' time not idle while smtp-source ran (from /proc/stat)."
        )
    for problem in problems:
        lines.append(f"\n- problem: {problem}")
    return "\n".join(lines) + "\n"
