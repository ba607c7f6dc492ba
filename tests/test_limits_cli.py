"""``policyd limits show|reset KEY`` against a running policyd (in-process limits), through its
control socket; tests/test_redis_shared.py does the same with the limits in Redis."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from tests.e2e.policyd_process import PolicydProcess
from tests.test_redis_shared import DEFERRED, ask

CONFIG: dict[str, Any] = {
    "local_domains": ["local.example"],
    "relay": {"allow": {"client_networks": ["192.0.2.0/24"], "authenticated": True}},
    "rate_limits": {
        "limits": [
            {
                "name": "host",
                "applies_to": ["relay.allow.client_networks"],
                "key": "client_address",
                "rate": "4/1h",
                "burst": 3,
            },
            {
                "name": "net",
                "applies_to": ["relay.allow.client_networks"],
                "key": "client_network",
                "rate": "100/1h",
                "burst": 100,
            },
            {
                "name": "login",
                "applies_to": ["relay.allow.authenticated"],
                "key": "sasl_username",
                "rate": "10/1d",
                "burst": 10,
            },
        ]
    },
}


def test_show_and_reset_in_process_limits(tmp_path: Path) -> None:
    process = PolicydProcess(CONFIG, tmp_path, control=True)
    try:
        process.start()
        assert process.control_path is not None
        assert stat.S_IMODE(process.control_path.stat().st_mode) == 0o600
        answers = [ask(process, "192.0.2.7", f"u{n}@remote.example") for n in range(4)]
        shown = process.cli("limits", "show", "192.0.2.7", "--config", str(process.config_path))
        reset = process.cli("limits", "reset", "192.0.2.7", "--config", str(process.config_path))
        again = process.cli("limits", "show", "192.0.2.7", "--config", str(process.config_path))
        after = ask(process, "192.0.2.7", "after@remote.example")
        login = process.cli("limits", "show", "Alice@Example.org", "-c", str(process.config_path))
        network = process.cli("limits", "show", "192.0.2.0/24", "-c", str(process.config_path))
        wrong = process.cli("limits", "show", "10.0.0.0/8", "-c", str(process.config_path))
    finally:
        process.stop()
    assert answers == ["action=OK"] * 3 + [DEFERRED]
    assert shown.returncode == 0, shown.stderr
    # 4/1h: one every 15 minutes; three were sent at once, so the next one is due in about
    # 15 minutes (the seconds depend on when the command ran, so they are not compared).
    host, net, login_line = shown.stdout.splitlines()
    assert host.startswith("host (client_address 192.0.2.7): 0 of 3 left now; the next passes in ")
    assert host.endswith(" [this process; then defer]")
    assert "in 14m" in host or "in 15m" in host
    # The network limit counted the three allowed (the deferred one was charged to none).
    assert net.startswith("net (client_network 192.0.2.0/24): 97 of 100 left now")
    # A client address is also a login as far as the key goes: never charged, full.
    assert login_line.startswith("login (sasl_username 192.0.2.7): 10 of 10 left now")
    assert reset.returncode == 0, reset.stderr
    assert (
        reset.stdout.splitlines()[0]
        == "host (client_address 192.0.2.7): reset: a full burst again (3)"
    )
    assert "net (client_network 192.0.2.0/24): reset: a full burst again (100)" in reset.stdout
    assert "login (sasl_username 192.0.2.7): nothing to reset (a full burst) (10)" in reset.stdout
    assert again.stdout.splitlines()[0].startswith("host (client_address 192.0.2.7): 3 of 3 left")
    assert after == "action=OK"
    assert login.stdout.strip() == (
        "login (sasl_username alice@example.org): 10 of 10 left now [this process; then defer]"
    )
    assert network.stdout.splitlines() == [
        # 99: the reset of 192.0.2.7 reset its network's budget too, then one more was sent.
        "net (client_network 192.0.2.0/24): 99 of 100 left now [this process; then defer]",
        "login (sasl_username 192.0.2.0/24): 10 of 10 left now [this process; then defer]",
    ]
    assert wrong.returncode == 0 and "net" not in wrong.stdout  # not a /24: only as a login


def test_limits_without_a_control_socket_says_so(tmp_path: Path) -> None:
    process = PolicydProcess(CONFIG, tmp_path)  # writes the configuration; never started
    result = process.cli("limits", "show", "alice", "--config", str(process.config_path))
    assert result.returncode == 1
    assert "listen.control is not configured" in result.stderr


def test_limits_when_policyd_is_not_running(tmp_path: Path) -> None:
    process = PolicydProcess(CONFIG, tmp_path, control=True)
    result = process.cli("limits", "reset", "alice", "--config", str(process.config_path))
    assert result.returncode == 1
    assert "cannot ask policyd at unix:" in result.stderr and "is it running?" in result.stderr
