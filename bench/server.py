"""Run policyd as a subprocess for the benchmark and read its resource use from /proc.

The process is started as ``python -m policyd serve --config FILE`` (no ``--verbose``: only
denials and errors are logged, as in production), its stdout and stderr go to a file, and it is
only ever signalled by its own PID: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.policyd_process import terminate

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerError(RuntimeError):
    """policyd did not start or stop as expected."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PolicydServer:
    """One policyd process serving ``config`` on 127.0.0.1:``port``."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerError("policyd is not running")
        return self.process.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start policyd; return the seconds from process start until the port accepted."""
        argv = [sys.executable, "-m", "policyd", "serve", "--config", str(self.config)]
        with self.log_path.open("ab") as log:
            started = time.perf_counter()
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.config.parent
            )
        deadline = started + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"policyd exited with {code} before listening; log:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    self.startup_seconds = time.perf_counter() - started
                    return self.startup_seconds
            except OSError:
                pass
            if time.perf_counter() >= deadline:
                raise ServerError(f"policyd did not listen within {timeout:.0f}s")
            time.sleep(0.005)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID, bounded wait, SIGKILL if needed. Safe to call more than once."""
        process = self.process
        if process is None:
            return None
        self.process = None
        return terminate(process, timeout)

    def cpu_seconds(self) -> float:
        """User + system CPU time the policyd process has used so far (from /proc/PID/stat)."""
        text = Path(f"/proc/{self.pid}/stat").read_text()
        # Fields after the parenthesised command name start at field 3 (state).
        fields = text.rpartition(")")[2].split()
        utime, stime = int(fields[11]), int(fields[12])
        return (utime + stime) / _CLOCK_TICKS

    def memory_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB: resident memory now and its peak so far."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values.get("VmRSS", 0), values.get("VmHWM", 0)

    def log_lines(self) -> int:
        """Lines policyd has written to its log so far."""
        try:
            with self.log_path.open("rb") as log:
                return sum(1 for _ in log)
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
