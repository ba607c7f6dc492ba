"""The command line: check-config and explain, run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "postfix-examples" / "policyd.yaml"


def policyd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_valid_prints_summary() -> None:
    """check-config on the example exits 0 and summarises what it loaded."""
    result = policyd("check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout
    assert "listen.policy: inet:127.0.0.1:10040" in result.stdout
    assert "relay.allow.authenticated: true" in result.stdout


def test_check_config_invalid_exits_1(tmp_path: Path) -> None:
    """check-config on a bad file exits 1 with the key path and line on stderr."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen:\n  policy: inet:127.0.0.1:10040\nrelay:\n  alow: {}\n")
    result = policyd("check-config", "--config", str(bad))
    assert result.returncode == 1
    assert "relay.alow: unknown key" in result.stderr
    assert "(bad.yaml:4)" in result.stderr
    assert result.stdout == ""


def test_usage_error_exits_2() -> None:
    """An unknown subcommand is a usage error."""
    assert policyd("frobnicate").returncode == 2


@pytest.mark.parametrize(
    ("attributes", "action", "verdict", "rule"),
    [
        (
            ["client_address=198.51.100.7", "recipient=user@remote.example"],
            "550 5.7.1 Relaying Denied",
            "denied",
            "relay.default",
        ),
        (
            ["client_address=198.51.100.7", "recipient=user@local.example"],
            "DUNNO",
            "local",
            "local_domains",
        ),
        (
            ["client_address=127.0.0.1", "recipient=user@remote.example"],
            "OK",
            "allowed",
            "relay.allow.client_networks",
        ),
        (
            ["client_address=198.51.100.7", "sasl_username=alice", "recipient=u@remote.example"],
            "OK",
            "allowed",
            "relay.allow.authenticated",
        ),
        (
            ["client_address=127.0.0.77", "sasl_username=alice", "recipient=u@remote.example"],
            "550 5.7.1 Relaying Denied",
            "denied",
            "relay.never.client_networks",
        ),
        (
            ["client_address=198.51.100.7", "recipient=user%remote.example@local.example"],
            "550 5.7.1 Relaying Denied",
            "denied",
            "relay.default",
        ),
        (
            ["protocol_state=MAIL", "client_address=198.51.100.7"],
            "DUNNO",
            "skipped",
            "protocol_state",
        ),
    ],
)
def test_explain_names_verdict_and_rule(
    attributes: list[str], action: str, verdict: str, rule: str
) -> None:
    """explain prints the reply, the verdict and the rule for a request given as arguments."""
    result = policyd("explain", "--config", str(EXAMPLE), *attributes)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"action: {action}" in lines
    assert f"verdict: {verdict}" in lines
    assert f"rule: {rule}" in lines


def test_explain_reads_postfix_request_on_stdin() -> None:
    """explain accepts a Postfix-format request on stdin."""
    request = (
        "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=198.51.100.7\n"
        "recipient=remote.example!user@local.example\n\n"
    )
    result = policyd("explain", "--config", str(EXAMPLE), stdin=request)
    assert result.returncode == 0, result.stderr
    assert "verdict: denied" in result.stdout
    assert "destination: remote.example" in result.stdout


def test_explain_rejects_malformed_attribute() -> None:
    """An argument without '=' is a usage error, exit 2."""
    result = policyd("explain", "--config", str(EXAMPLE), "client_address")
    assert result.returncode == 2
    assert "not a name=value attribute" in result.stderr


def test_explain_names_outbound_profile(tmp_path: Path) -> None:
    """explain prints the outbound profile an allowed relay will use, never its password."""
    secret = tmp_path / "pw"
    secret.write_text("hunter2-not-shown\n")
    secret.chmod(0o600)
    config = tmp_path / "p.yaml"
    config.write_text(
        "listen: {policy: 'inet:127.0.0.1:10040'}\n"
        "relay: {allow: {client_networks: [192.0.2.0/24]}}\n"
        "outbound:\n  domains:\n"
        "    partner.example: {auth: cleartext, username: relay@partner.example,\n"
        f"                      password_file: {secret}, nexthop: '[smtp.partner.example]:587'}}\n"
    )
    result = policyd(
        "explain",
        "--config",
        str(config),
        "client_address=192.0.2.7",
        "recipient=u@partner.example",
    )
    assert result.returncode == 0, result.stderr
    assert (
        "outbound: outbound.domains.partner.example: auth cleartext as relay@partner.example "
        "via [smtp.partner.example]:587 TLS required"
    ) in result.stdout.splitlines()
    check = policyd("check-config", "--config", str(config))
    assert "hunter2-not-shown" not in result.stdout + result.stderr + check.stdout + check.stderr


def test_explain_shows_the_limits_that_would_apply(tmp_path: Path) -> None:
    """explain names each sending limit an allowed relay meets, with its key; charges none."""
    path = tmp_path / "policyd.yaml"
    path.write_text(
        'listen: {policy: "inet:127.0.0.1:10040"}\nlocal_domains: [local.example]\n'
        "relay: {allow: {client_networks: [192.0.2.0/24]}}\n"
        "rate_limits:\n  limits:\n"
        "    - {name: host, applies_to: [relay.allow.client_networks], key: client_network,"
        " rate: 1/1h}\n"
    )
    for _ in range(2):  # a 1/1h limit, asked twice: nothing is charged
        result = policyd(
            "explain", "--config", str(path), "client_address=192.0.2.7", "recipient=u@x.example"
        )
        assert result.returncode == 0, result.stderr
        assert "verdict: allowed" in result.stdout
        assert "rate_limits: host (key 192.0.2.0/24) (not charged)" in result.stdout
