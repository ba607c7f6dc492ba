"""systemd notification (sd_notify): the datagrams ``policyd serve`` sends, and when.

A datagram socket in the test's directory stands in for systemd's ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.systemd import Notifier
from tests.e2e.policyd_process import PolicydProcess

BASE = {"local_domains": ["local.example"]}


class NotifySocket:
    """The receiving end of ``$NOTIFY_SOCKET``: a bound datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, timeout: float = 20) -> dict[str, str]:
        """The next datagram, as its assignments (bounded wait)."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def next_with(self, name: str, timeout: float = 20) -> dict[str, str]:
        """The next datagram that sets ``name`` (WATCHDOG=1 pings in between are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            if name in message:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


def test_ready_reload_and_stop_notifications(tmp_path: Path, notify: NotifySocket) -> None:
    process = PolicydProcess(
        BASE, tmp_path / "policyd", metrics=True, env={"NOTIFY_SOCKET": str(notify.path)}
    )
    starter = threading.Thread(target=process.start)
    starter.start()
    try:
        ready = notify.next()
        # READY=1 is the first thing said, and by then every listener accepts.
        assert ready["READY"] == "1", ready
        assert all(_accepts(process.host, port) for port in process.ports())
        assert ready["STATUS"].startswith("serving ")
        starter.join(30)
        assert process.process is not None
        pid = process.process.pid

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        os.kill(pid, signal.SIGHUP)
        reloading = notify.next()
        assert reloading["RELOADING"] == "1"
        # In the same datagram, as systemd 253's Type=notify-reload requires.
        assert before <= int(reloading["MONOTONIC_USEC"])
        after = notify.next()
        assert after["READY"] == "1" and "last reload succeeded" in after["STATUS"]

        (tmp_path / "policyd" / "policyd.yaml").write_text("local_domains: [\n")
        os.kill(pid, signal.SIGHUP)
        assert notify.next()["RELOADING"] == "1"
        after = notify.next()
        assert after["READY"] == "1" and "last reload failed" in after["STATUS"]
        assert _accepts(process.host, process.port)  # still serving the old rules

        os.kill(pid, signal.SIGTERM)
        assert notify.next()["STOPPING"] == "1"
        assert process.stop() == 0
    finally:
        starter.join(30)
        process.stop()


def test_watchdog_pings_from_the_reactor(tmp_path: Path, notify: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    process = PolicydProcess(BASE, tmp_path / "policyd", socketmap=False, env=env)
    process.start()
    try:
        assert notify.next_with("READY")["READY"] == "1"
        assert notify.next_with("WATCHDOG") == {"WATCHDOG": "1"}
        assert notify.next_with("WATCHDOG") == {"WATCHDOG": "1"}
    finally:
        process.stop()


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}
    assert Notifier(env).watchdog_seconds is None
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_seconds == 5.0


def test_notifier_takes_the_variables_out_of_the_environment() -> None:
    """Children (postmap) must not inherit systemd's variables and notify in policyd's name."""
    env = {"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "1000", "PATH": "/bin"}
    notifier = Notifier(env)
    assert notifier.address == b"\0abstract"
    assert env == {"PATH": "/bin"}


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_no_usable_socket_means_no_notifications(value: str) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert notifier.ready("serving") is False


def test_abstract_socket_is_reached(tmp_path: Path) -> None:
    name = f"policyd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(10)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert receiver.recv(100) == b"STOPPING=1\nSTATUS=stopping"


def test_unreachable_socket_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.ready("serving") is False
    assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1
