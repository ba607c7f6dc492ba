"""policyd over real sockets: serve, IPv6 and UNIX listeners, metrics, reload, SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.policyd_process import PolicydProcess, terminate
from tests.e2e.postfix import free_port

RCPT = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\n"
    "sasl_username=\nrecipient={recipient}\nqueue_id=\n\n"
)

BASE: dict[str, Any] = {
    "local_domains": ["local.example"],
    "relay": {"allow": {"client_networks": ["192.0.2.0/24"]}},
}


class PolicyClient:
    """A persistent policy connection that sends requests and reads whole replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.buffer = b""

    def ask(self, client: str, recipient: str) -> str:
        self.sock.sendall(RCPT.format(client=client, recipient=recipient).encode())
        return self.read_reply()

    def read_reply(self) -> str:
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed; partial data {self.buffer!r}")
            self.buffer += chunk
        reply, self.buffer = self.buffer.split(b"\n\n", 1)
        return reply.decode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def policyd(tmp_path: Path) -> Iterator[PolicydProcess]:
    config = dict(BASE)
    config["listen"] = {"metrics": f"inet:127.0.0.1:{free_port('127.0.0.1')}"}
    process = PolicydProcess(config, tmp_path)
    process.start()
    yield process
    process.stop()


def connect(process: PolicydProcess) -> PolicyClient:
    return PolicyClient(socket.create_connection((process.host, process.port), timeout=10))


def test_serve_answers_on_persistent_connection(policyd: PolicydProcess) -> None:
    """serve answers relay, local and allowed requests on one persistent TCP connection."""
    client = connect(policyd)
    try:
        assert client.ask("198.51.100.7", "u@remote.example") == (
            "action=550 5.7.1 Relaying Denied"
        )
        assert client.ask("198.51.100.7", "u@local.example") == "action=DUNNO"
        assert client.ask("192.0.2.7", "u@remote.example") == "action=OK"
    finally:
        client.close()
    line = policyd.wait_for_log("verdict=denied", "rule=relay.default")
    assert "client=198.51.100.7" in line and "recipient=u@remote.example" in line
    policyd.wait_for_log("verdict=allowed", "rule=relay.allow.client_networks")


def test_pipelined_requests_over_socket(policyd: PolicydProcess) -> None:
    """Two requests sent in one write are answered in order."""
    client = connect(policyd)
    try:
        data = RCPT.format(client="198.51.100.7", recipient="a@remote.example") + RCPT.format(
            client="192.0.2.7", recipient="b@remote.example"
        )
        client.sock.sendall(data.encode())
        assert client.read_reply() == "action=550 5.7.1 Relaying Denied"
        assert client.read_reply() == "action=OK"
    finally:
        client.close()


def test_bad_connection_does_not_affect_others(policyd: PolicydProcess) -> None:
    """Garbage on one connection closes it, logs and counts; another connection keeps working."""
    good = connect(policyd)
    bad = socket.create_connection((policyd.host, policyd.port), timeout=10)
    try:
        bad.sendall(b"request=smtpd_access_policy\nsender=\xff\xfe\n\n")
        assert bad.recv(100) == b""  # closed without a reply
        assert good.ask("192.0.2.7", "u@remote.example") == "action=OK"
    finally:
        bad.close()
        good.close()
    policyd.wait_for_log("protocol_error", "reason=invalid_utf8")
    assert 'policyd_protocol_errors_total{listener="policy",reason="invalid_utf8"} 1.0' in scrape(
        policyd
    )


def scrape(process: PolicydProcess) -> str:
    url = "http://" + process.config["listen"]["metrics"].removeprefix("inet:") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def test_metrics_endpoint(policyd: PolicydProcess) -> None:
    """/metrics exports the fixed metric names with verdict and rule labels."""
    client = connect(policyd)
    try:
        client.ask("198.51.100.7", "u@remote.example")
        client.ask("198.51.100.7", "u@local.example")
    finally:
        client.close()
    text = scrape(policyd)
    assert "policyd_requests_total 2.0" in text
    assert 'policyd_decisions_total{rule="relay.default",verdict="denied"} 1.0' in text
    assert 'policyd_decisions_total{rule="local_domains",verdict="local"} 1.0' in text
    assert "policyd_request_duration_seconds_count 2.0" in text
    assert 'policyd_config_reloads_total{result="success"} 0.0' in text
    assert "# HELP policyd_decisions_total" in text
    assert 'policyd_requests_by_state_total{protocol_state="RCPT"} 2.0' in text
    assert 'policyd_connections{listener="socketmap"} 0.0' in text
    assert policyd.socketmap_port is not None
    with socket.create_connection((policyd.host, policyd.socketmap_port), timeout=10) as sock:
        query = b"transport remote.example"
        sock.sendall(b"%d:%s," % (len(query), query))
        reply = sock.recv(100)  # one netstring (NOTFOUND or OK ...); the connection stays open
        assert reply.endswith(b",") and b":" in reply, reply
        assert 'policyd_connections{listener="socketmap"} 1.0' in scrape(policyd)


def _get(process: PolicydProcess, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET ``path`` on the metrics listener."""
    config_metrics = process.config["listen"]["metrics"]
    url = f"http://{config_metrics.removeprefix('inet:')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_health_and_readiness(policyd: PolicydProcess) -> None:
    """/healthz: the process answers; /readyz: configuration loaded, every listener up."""
    assert _get(policyd, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    assert _get(policyd, "/readyz") == (200, "text/plain; charset=utf-8", "ready\n")
    # Still ready after a failed reload: the running configuration keeps serving.
    policyd.config_path.write_text("local_domains: [\n")
    assert policyd.process is not None
    policyd.process.send_signal(signal.SIGHUP)
    policyd.wait_for_log("reload failed")
    assert _get(policyd, "/readyz")[0] == 200
    assert _get(policyd, "/nothing")[0] == 404


def test_reload_good_and_bad_file_on_existing_connection(policyd: PolicydProcess) -> None:
    """SIGHUP swaps in a valid file (seen on an open connection); an invalid one is refused."""
    client = connect(policyd)
    try:
        assert client.ask("198.51.100.7", "u@remote.example").startswith("action=550")
        config = dict(policyd.config)
        config["relay"] = {"allow": {"client_networks": ["198.51.100.0/24"]}}
        policyd.config_path.write_text(yaml.safe_dump(config))
        assert policyd.process is not None
        policyd.process.send_signal(signal.SIGHUP)
        policyd.wait_for_log("reload succeeded")
        assert client.ask("198.51.100.7", "u@remote.example") == "action=OK"

        policyd.config_path.write_text(yaml.safe_dump(config) + "unknown_key: 1\n")
        policyd.process.send_signal(signal.SIGHUP)
        line = policyd.wait_for_log("reload failed")
        assert "unknown_key: unknown key" in line
        assert client.ask("198.51.100.7", "u@remote.example") == "action=OK"
    finally:
        client.close()
    text = scrape(policyd)
    assert 'policyd_config_reloads_total{result="success"} 1.0' in text
    assert 'policyd_config_reloads_total{result="failure"} 1.0' in text


def test_reload_rereads_file_lists(tmp_path: Path) -> None:
    """A SIGHUP re-reads file: lists even when the YAML itself did not change."""
    networks = tmp_path / "networks"
    networks.write_text("192.0.2.0/24\n")
    process = PolicydProcess(
        {"relay": {"allow": {"client_networks": [f"file:{networks}"]}}}, tmp_path / "run"
    )
    process.start()
    try:
        client = connect(process)
        assert client.ask("198.51.100.7", "u@remote.example").startswith("action=550")
        networks.write_text("192.0.2.0/24\n198.51.100.0/24\n")
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)
        process.wait_for_log("reload succeeded")
        assert client.ask("198.51.100.7", "u@remote.example") == "action=OK"
        client.close()
    finally:
        process.stop()


def test_reload_refuses_a_file_list_others_can_write(tmp_path: Path) -> None:
    """A reload whose file: list became writable by others is refused (docs/security.md):
    the rules in use keep answering, unchanged."""
    networks = tmp_path / "networks"
    networks.write_text("192.0.2.0/24\n")
    networks.chmod(0o644)
    process = PolicydProcess(
        {"relay": {"allow": {"client_networks": [f"file:{networks}"]}}}, tmp_path / "run"
    )
    process.start()
    try:
        client = connect(process)
        networks.write_text("192.0.2.0/24\n198.51.100.0/24\n")
        networks.chmod(0o666)
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)
        line = process.wait_for_log("reload failed")
        assert "refusing an unsafe file" in line
        assert "writable by others than its owner (mode 0666)" in line
        assert client.ask("198.51.100.7", "u@remote.example").startswith("action=550")
        assert client.ask("192.0.2.7", "u@remote.example") == "action=OK"
        client.close()
    finally:
        process.stop()


def test_sigterm_with_idle_connection_exits_zero(policyd: PolicydProcess) -> None:
    """SIGTERM stops policyd (exit 0) even with an idle persistent connection open."""
    client = connect(policyd)
    try:
        assert client.ask("192.0.2.7", "u@remote.example") == "action=OK"
        assert policyd.process is not None
        policyd.process.send_signal(signal.SIGTERM)
        assert policyd.process.wait(timeout=20) == 0
        assert client.sock.recv(100) == b""  # the server closed the idle connection
    finally:
        client.close()
    assert "stopped" in policyd.log_text()


@pytest.mark.parametrize("sigterms", [1, 2], ids=["one_sigterm", "second_sigterm_while_stopping"])
def test_sigterm_answers_request_in_flight(policyd: PolicydProcess, sigterms: int) -> None:
    """A request half sent when SIGTERM arrives is still answered before the connection closes.

    A second SIGTERM during that stop (systemd and make both pass one on) is only noted: the
    request is still answered and policyd exits 0 with no error logged.
    """
    client = connect(policyd)
    try:
        client.sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n")
        time.sleep(0.2)  # let policyd read the first half (ordering only, nothing is timed)
        assert policyd.process is not None
        policyd.process.send_signal(signal.SIGTERM)
        policyd.wait_for_log("stopping")
        if sigterms == 2:
            policyd.process.send_signal(signal.SIGTERM)
            policyd.wait_for_log("SIGTERM", "already stopping")
        client.sock.sendall(b"client_address=192.0.2.7\nrecipient=u@remote.example\n\n")
        assert client.read_reply() == "action=OK"
        assert policyd.process.wait(timeout=20) == 0
    finally:
        client.close()
    log = policyd.log_text()
    assert "Traceback" not in log, log
    assert "CRITICAL" not in log, log


def free_port_v6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        return int(sock.getsockname()[1])


def wait_for_unix_socket(path: Path, process: subprocess.Popen[bytes]) -> None:
    for _ in range(400):
        if process.poll() is not None:
            raise AssertionError(f"policyd exited with {process.returncode}")
        if path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_unix_and_ipv6_listeners(tmp_path: Path) -> None:
    """unix:/path and inet:[::1]:PORT listeners both answer."""
    sock_path = tmp_path / "policy.sock"
    for listen, family, address in (
        (f"unix:{sock_path}", socket.AF_UNIX, str(sock_path)),
        (f"inet:[::1]:{free_port_v6()}", socket.AF_INET6, None),
    ):
        config_path = tmp_path / "policyd.yaml"
        config_path.write_text(yaml.safe_dump({**BASE, "listen": {"policy": listen}}))
        process = subprocess.Popen(
            [sys.executable, "-m", "policyd", "serve", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            if family == socket.AF_UNIX:
                wait_for_unix_socket(sock_path, process)
                target: Any = address
            else:
                target = ("::1", int(listen.rsplit(":", 1)[1]), 0, 0)
            for _ in range(400):
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.connect(target)
                    break
                except OSError:
                    sock.close()
                    time.sleep(0.05)
            else:
                raise AssertionError(f"cannot connect to {listen}")
            client = PolicyClient(sock)
            assert client.ask("2001:db8::7", "u@remote.example").startswith("action=550")
            assert client.ask("192.0.2.9", "u@remote.example") == "action=OK"
            client.close()
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0


def run_serve(config_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `policyd serve` expecting it to exit by itself (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "policyd", "serve", "--config", str(config_path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_error_at_start_exits_nonzero_nothing_listening(tmp_path: Path) -> None:
    """A bad configuration at start: exit 1, the message with path and line, no listener."""
    port = free_port("127.0.0.1")
    config_path = tmp_path / "bad.yaml"
    config_path.write_text(
        f"listen:\n  policy: inet:127.0.0.1:{port}\nrelay:\n  allow:\n"
        "    client_networks: [10.0.0.0/33]\n"
    )
    result = run_serve(config_path)
    assert result.returncode == 1
    assert (
        "relay.allow.client_networks[0]: '10.0.0.0/33' is not a network (bad.yaml:5)"
        in result.stderr
    )
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_port_in_use_exits_3(tmp_path: Path) -> None:
    """serve exits 3 with a message when its listening address is taken."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config_path = tmp_path / "p.yaml"
        config_path.write_text(f"listen: {{policy: 'inet:127.0.0.1:{port}'}}\n")
        result = run_serve(config_path)
    assert result.returncode == 3
    assert "cannot listen" in result.stderr


def signal_once_listening(config_path: Path, port: int, signum: int) -> int:
    """Start serve, send ``signum`` the moment its port first accepts, then stop it; exit status.

    The connect loop polls with no pause worth the name, so the signal lands as early after
    the port opens as a client could possibly notice it.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "policyd", "serve", "--config", str(config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(20_000):  # bounded: about 20 s at most
            if process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                time.sleep(0.001)
                continue
            process.send_signal(signum)
            break
        if signum != signal.SIGTERM and process.poll() is None:
            process.send_signal(signal.SIGTERM)
        return process.wait(timeout=20)
    finally:
        terminate(process, timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_right_after_port_opens_is_handled(tmp_path: Path, signum: int) -> None:
    """SIGTERM or SIGHUP at the first moment the port accepts is handled, never fatal.

    The handlers are in place before anything listens: a SIGTERM is an orderly stop (exit 0),
    a SIGHUP a reload, not the default action that kills the process with the signal.
    """
    for attempt in range(15):
        port = free_port("127.0.0.1")
        config_path = tmp_path / f"p{attempt}.yaml"
        config_path.write_text(
            yaml.safe_dump({**BASE, "listen": {"policy": f"inet:127.0.0.1:{port}"}})
        )
        assert signal_once_listening(config_path, port, signum) == 0, f"attempt {attempt}"


def test_thousand_idle_connections_do_not_stall_others(policyd: PolicydProcess) -> None:
    """1000 idle and half-finished connections neither stall a new client nor block SIGTERM."""
    idle: list[socket.socket] = []
    try:
        for index in range(1000):
            sock = socket.create_connection((policyd.host, policyd.port), timeout=10)
            if index % 10 == 0:
                sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RC")
            idle.append(sock)
        client = connect(policyd)
        assert client.ask("192.0.2.7", "u@remote.example") == "action=OK"
        assert 'policyd_connections{listener="policy"} 1001.0' in scrape(policyd)
        client.close()
        assert policyd.process is not None
        policyd.process.send_signal(signal.SIGTERM)
        assert policyd.process.wait(timeout=30) == 0
    finally:
        for sock in idle:
            sock.close()


def test_connection_limit_and_listen_backlog(tmp_path: Path) -> None:
    """limits.max_connections: the connection one past it is closed at once (Postfix then takes
    its default_action), counted, and the open ones keep answering; limits.listen_backlog is
    the backlog the kernel reports for the listening socket."""
    config = dict(BASE)
    config["listen"] = {"metrics": f"inet:127.0.0.1:{free_port('127.0.0.1')}"}
    config["limits"] = {"max_connections": 3, "listen_backlog": 300}
    process = PolicydProcess(config, tmp_path)
    process.start()
    clients: list[PolicyClient] = []
    try:
        listening = subprocess.run(
            ["ss", "-ltnH", f"sport = :{process.port}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        assert listening[0] == "LISTEN" and listening[2] == "300", listening
        for _ in range(3):
            clients.append(connect(process))
            assert clients[-1].ask("192.0.2.7", "u@remote.example") == "action=OK"
        extra = connect(process)
        try:
            assert extra.sock.recv(100) == b""  # closed by policyd without a word
        finally:
            extra.close()
        line = process.wait_for_log("reason=connection_limit")
        assert "action=close" in line
        for client in clients:
            assert client.ask("198.51.100.7", "u@remote.example").startswith("action=550")
        text = scrape(process)
        assert (
            'policyd_protocol_errors_total{listener="policy",reason="connection_limit"} 1.0' in text
        )
        clients.pop().close()
        # Once policyd has seen the close (its gauge says 2), a new connection is accepted.
        deadline = time.monotonic() + 10
        while 'policyd_connections{listener="policy"} 2.0' not in scrape(process):
            assert time.monotonic() < deadline, "policyd never saw the connection close"
            time.sleep(0.05)
        clients.append(connect(process))
        assert clients[-1].ask("192.0.2.7", "u@remote.example") == "action=OK"
    finally:
        for client in clients:
            client.close()
        process.stop()
