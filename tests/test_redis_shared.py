"""Two policyd processes on one redis-server (an ACL user with a password from a file) enforce
one combined limit, as two MX hosts would."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.policyd_process import PolicydProcess
from tests.redis_server import RedisServer
from tests.test_service import RCPT, PolicyClient

DEFERRED = "action=450 4.7.1 Sending limit exceeded, try again later"


@pytest.fixture
def redis_with_acl(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, password=secrets.token_urlsafe(16))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def config(redis: RedisServer, password_file: Path) -> dict[str, Any]:
    return {
        "local_domains": ["local.example"],
        "relay": {"allow": {"client_networks": ["192.0.2.0/24"]}},
        "rate_limits": {
            "backend": {
                "redis": redis.address,
                "username": "policyd",
                "password_file": str(password_file),
            },
            "limits": [
                {
                    "name": "host",
                    "applies_to": ["relay.allow.client_networks"],
                    "key": "client_address",
                    "rate": "5/1h",
                    "burst": 5,
                }
            ],
        },
    }


def ask(process: PolicydProcess, client: str, recipient: str) -> str:
    sock = socket.create_connection((process.host, process.port), timeout=10)
    policy = PolicyClient(sock)
    try:
        sock.sendall(RCPT.format(client=client, recipient=recipient).encode())
        return policy.read_reply()
    finally:
        policy.close()


def test_two_policyd_share_one_limit(tmp_path: Path, redis_with_acl: RedisServer) -> None:
    assert redis_with_acl.password is not None
    secret = tmp_path / "redis-password"
    secret.write_text(redis_with_acl.password + "\n")
    secret.chmod(0o600)
    processes = [
        PolicydProcess(config(redis_with_acl, secret), tmp_path / name, metrics=True, control=True)
        for name in ("mx1", "mx2")
    ]
    try:
        for process in processes:
            process.start()
            process.wait_for_log("rate_limits backend", "connected")
        answers = [ask(processes[n % 2], "192.0.2.7", f"u{n}@remote.example") for n in range(8)]
        other = ask(processes[1], "192.0.2.8", "other@remote.example")
        scraped = [process.scrape() for process in processes]
        # The administrator asks either host: the budget is the shared one.
        config_file = str(processes[1].config_path)
        shown = processes[1].cli("limits", "show", "192.0.2.7", "--config", config_file)
        reset = processes[0].cli(
            "limits", "reset", "192.0.2.7", "-c", str(processes[0].config_path)
        )
        after = ask(processes[1], "192.0.2.7", "after@remote.example")
    finally:
        for process in processes:
            process.stop()
    # One budget of 5 for 192.0.2.7, however the requests are spread over the two hosts.
    assert answers == ["action=OK"] * 5 + [DEFERRED] * 3
    assert other == "action=OK"  # another key, its own budget
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("host (client_address 192.0.2.7): 0 of 5 left now; the next")
    assert f"[shared, {redis_with_acl.address}; then defer]" in shown.stdout
    assert reset.stdout.strip() == "host (client_address 192.0.2.7): reset: a full burst again (5)"
    assert after == "action=OK"
    for text in scraped:
        assert "policyd_rate_limit_backend_up 1.0" in text
        assert 'policyd_rate_limit_backend_errors_total{reason="connection"} 0.0' in text
    allowed = [
        line
        for text in scraped
        for line in text.splitlines()
        if line.startswith('policyd_rate_limit_checks_total{limit="host",result="allowed"}')
    ]
    assert sorted(float(line.split()[-1]) for line in allowed) == [3.0, 3.0]


def test_a_wrong_password_is_an_error_and_falls_back(
    tmp_path: Path, redis_with_acl: RedisServer
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("not-the-password\n")
    secret.chmod(0o600)
    process = PolicydProcess(config(redis_with_acl, secret), tmp_path / "mx", metrics=True)
    try:
        process.start()
        process.wait_for_log("rate_limits backend", "not reachable at start")
        answers = [ask(process, "192.0.2.7", f"u{n}@remote.example") for n in range(7)]
        process.wait_for_log("is down", "on_backend_error: local")
        scraped = process.scrape()
    finally:
        process.stop()
    # on_backend_error: local (the default): this process's own buckets, 5 then deferred.
    assert answers == ["action=OK"] * 5 + [DEFERRED] * 2
    assert redis_with_acl.command("EXISTS", "policyd:limit:host:192.0.2.7") == "0"
    assert "policyd_rate_limit_backend_degraded 1.0" in scraped
    assert 'policyd_rate_limit_checks_total{limit="host",result="degraded"} 7.0' in scraped
