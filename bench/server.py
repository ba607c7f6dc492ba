"""The policy servers the benchmark runs as subprocesses, and their resource use from /proc.

* ``PolicydServer``: ``python -m policyd serve --config FILE`` (no ``--verbose``: only denials
  and errors are logged, as in production, to a file);
* ``ResponderServer``: ``python bench/responder.py``, the minimal standard-library responder;
* ``PostfwdServer``: Debian's ``postfwd2`` with a rule file equivalent to the small
  configuration, its request cache off (``--cache=0``).

Each is only ever signalled by its own PID (postfwd2, which detaches with ``setsid``, by its
master's PID and then its process group): SIGTERM, a bounded wait, then SIGKILL. CPU time is
utime + stime from ``/proc/PID/stat``; for postfwd2 it is summed over the master and every
process of its session (the prefork children), each with the time of the children it has
already reaped (cutime + cstime), so that nothing is counted twice or lost.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.policyd_process import terminate
from tests.e2e.postfix import pid_alive, wait_pid_gone

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BENCH_DIR = Path(__file__).resolve().parent


class ServerError(RuntimeError):
    """A server did not start or stop as expected."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat fields from field 3 (state) on; the command name may contain spaces."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """utime + stime of ``pid`` (plus cutime + cstime of its reaped children if asked)."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLOCK_TICKS


def session_pids(session: int) -> list[int]:
    """Live (not zombie) processes whose session id is ``session``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == session:
            pids.append(int(entry.name))
    return pids


class ServerProcess:
    """A policy server on 127.0.0.1:``port``; subclasses say how it is started."""

    label = "server"

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def argv(self) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> Path:
        return self.log_path.parent

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerError(f"{self.label} is not running")
        return self.process.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start the server; return the seconds from process start until the port accepted."""
        with self.log_path.open("ab") as log:
            started = time.perf_counter()
            self.process = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.cwd()
            )
        self.startup_seconds = self._wait_listening(started, timeout)
        return self.startup_seconds

    def _exited(self) -> int | None:
        """The exit code if the server is gone before listening, else None."""
        assert self.process is not None
        return self.process.poll()

    def _wait_listening(self, started: float, timeout: float) -> float:
        deadline = started + timeout
        while True:
            code = self._exited()
            if code is not None:
                raise ServerError(
                    f"{self.label} exited with {code} before listening; log:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return time.perf_counter() - started
            except OSError:
                pass
            if time.perf_counter() >= deadline:
                raise ServerError(f"{self.label} did not listen within {timeout:.0f}s")
            time.sleep(0.005)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID, bounded wait, SIGKILL if needed. Safe to call more than once."""
        process = self.process
        if process is None:
            return None
        self.process = None
        return terminate(process, timeout)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far (from /proc/PID/stat)."""
        return process_cpu_seconds(self.pid)

    def memory_kib(self) -> int:
        """Resident memory (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "VmRSS":
                return int(rest.split()[0])
        return 0

    def log_lines(self) -> int:
        """Lines the server has written to its log so far."""
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


class PolicydServer(ServerProcess):
    """policyd serving ``config`` (whose ``listen.policy`` is 127.0.0.1:``port``)."""

    label = "policyd"

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        super().__init__(port, log_path)
        self.config = config

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "policyd", "serve", "--config", str(self.config)]

    def cwd(self) -> Path:
        return self.config.parent


class ResponderServer(ServerProcess):
    """bench/responder.py on 127.0.0.1:``port``."""

    label = "responder"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            str(BENCH_DIR / "responder.py"),
            "--listen",
            f"127.0.0.1:{self.port}",
        ]


# postfwd2 rules equivalent to workload.small_lists() for plain recipient addresses, in
# policyd's order (first match wins). postfwd2 1.35 matches client_address as IPv4 CIDR only;
# IPv6 entries are written as regular expressions over Postfix's (compressed) address text.
POSTFWD_RULES = r"""# postfwd2 rules equivalent to the benchmark's small policyd configuration
id=SKIPPED; protocol_state=!!(^(RCPT|VRFY)$); action=DUNNO
id=LOCAL_EXACT; action=DUNNO
    recipient=!!([%!@:].*@)
    recipient_domain=^(local\.example|corp\.example|shop\.example)\.?$
id=LOCAL_PARENT; action=DUNNO
    recipient=!!([%!@:].*@)
    recipient_domain=\.(local\.example|corp\.example)\.?$
id=NEVER_NETWORKS; client_address=172.16.9.9, 198.19.200.0/24; action=550 5.7.1 Relaying Denied
id=NEVER_SASL; sasl_username=^compromised@local\.example$; action=550 5.7.1 Relaying Denied
id=AUTHENTICATED; sasl_username=.; action=OK
id=CLIENT_NETWORKS; action=OK
    client_address=127.0.0.0/8, 192.0.2.0/24, 172.16.0.0/12, 100.64.0.0/16, 203.0.113.7
    client_address=^2001:0*db9:0*1:
id=SERVER_V4; server_address=^10\.0\.0\.25$; action=OK
id=SERVER_V6; server_address=^2001:0*db8:0*25::0*25$; server_port=^587$; action=OK
id=DEFAULT; action=550 5.7.1 Relaying Denied
"""


def postfwd_command() -> str | None:
    """Path of Debian's postfwd2, or None when the package is not installed."""
    return shutil.which("postfwd2") or next(
        (p for p in ("/usr/sbin/postfwd2", "/usr/bin/postfwd2") if os.access(p, os.X_OK)), None
    )


class PostfwdServer(ServerProcess):
    """Debian's postfwd2 on 127.0.0.1:``port`` with ``POSTFWD_RULES``, cache off.

    postfwd2 daemonizes (``setsid``): the process started here exits once the master has
    detached, and the master's PID is read from ``--pidfile``. Its policy server is Net::Server
    prefork: one child process per open connection, so ``children`` must be at least the number
    of connections a run opens; they are all forked at start. As root it runs as ``nobody``
    (its default user), so its directory is made readable and writable for that user.
    """

    label = "postfwd2"

    def __init__(self, directory: Path, port: int, children: int = 20) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(port, directory / "postfwd2.log")
        self.directory = directory
        self.children = children
        self.rules_path = directory / "rules.cf"
        self.pid_path = directory / "postfwd2-master.pid"
        self.master_pid: int | None = None

    def argv(self) -> list[str]:
        command = postfwd_command()
        if command is None:
            raise ServerError("postfwd2 not found: install Debian's postfwd package")
        if os.geteuid() == 0:
            user, group = "nobody", grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
        else:
            user = pwd.getpwuid(os.geteuid()).pw_name
            group = grp.getgrgid(os.getegid()).gr_name
        return [
            command,
            "--file",
            str(self.rules_path.resolve()),  # a relative path silently gives no rules at all
            "--interface",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--cache=0",
            "--cache_port",  # its cache daemon's socket: here, not the shared /var/tmp default
            str(self.directory / "postfwd2-cache.socket"),
            "--pidfile",
            str(self.pid_path),
            "--user",
            user,
            "--group",
            group,
            "--perfmon",  # no syslog (there is none here); policyd logs only its denials
            "--summary=0",
            f"--min_servers={self.children}",
            # Net::Server requires min_spare <= min_servers, max_spare < max_servers; with as
            # many spares as children, idle children are never reaped between runs.
            f"--max_servers={self.children + 20}",
            "--min_spare_servers=1",
            f"--max_spare_servers={self.children + 10}",
        ]

    def start(self, timeout: float = 120.0) -> float:
        self.rules_path.write_text(POSTFWD_RULES)
        self.rules_path.chmod(0o644)
        self.directory.chmod(0o755)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.directory, nobody.pw_uid, nobody.pw_gid)
        started = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.directory
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)  # the launcher exits once the master has detached
        deadline = started + timeout
        while self.master_pid is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(self.pid_path.read_text().split()[0])
                if pid_alive(pid):
                    self.master_pid = pid
                    break
            if time.perf_counter() >= deadline:
                self.stop()
                raise ServerError(f"postfwd2 wrote no master PID; log:\n{self.log_tail()}")
            time.sleep(0.02)
        try:
            self.startup_seconds = self._wait_listening(started, timeout)
            self._wait_children(deadline)
        except ServerError:
            self.stop()
            raise
        return self.startup_seconds

    def _wait_children(self, deadline: float) -> None:
        """Wait (bounded) until every prefork child is there."""
        while len(self.pids()) < self.children + 2:  # master, Net::Server parent, children
            if time.perf_counter() >= deadline:
                raise ServerError(
                    f"postfwd2 forked {len(self.pids()) - 2} of {self.children} children"
                )
            time.sleep(0.05)

    def _exited(self) -> int | None:
        if self.master_pid is not None and not pid_alive(self.master_pid):
            return -1
        return None

    @property
    def pid(self) -> int:
        if self.master_pid is None:
            raise ServerError("postfwd2 is not running")
        return self.master_pid

    def pids(self) -> list[int]:
        """The master and every process of its session (postfwd2 calls setsid)."""
        return session_pids(self.pid) if self.master_pid is not None else []

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError):
                total += process_cpu_seconds(pid, with_children=True)
        return total

    def memory_kib(self) -> int:
        """Proportional set size (PSS) summed over the processes: pages the prefork children
        share with each other are counted once, not once per child."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        return total

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the master; then SIGKILL to its process group if anything is left."""
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                terminate(self.process, 5)
            self.process = None
        pid = self.master_pid
        if pid is None:
            return None
        self.master_pid = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_pid_gone(pid, timeout)
        deadline = time.perf_counter() + timeout
        while session_pids(pid) and time.perf_counter() < deadline:
            time.sleep(0.05)
        if session_pids(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # its process group: setsid made it the leader
            deadline = time.perf_counter() + timeout
            while session_pids(pid) and time.perf_counter() < deadline:
                time.sleep(0.05)
        return 0
