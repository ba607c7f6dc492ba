"""PolicyService without sockets: failure handling, logging, metrics, reload."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock

import policyd
import policyd.service
from policyd.config import Config, load_config
from policyd.decision import Decision, Rule, Verdict
from policyd.metrics import Metrics
from policyd.outbound import OutboundProfile
from policyd.request import PolicyRequest
from policyd.service import PolicyService, format_decision, quote_value

CONFIG = """
listen: {policy: "inet:127.0.0.1:10040"}
local_domains: [local.example]
relay: {allow: {client_networks: [192.0.2.0/24]}}
"""

RELAY = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "client_address": "198.51.100.7",
    "recipient": "user@remote.example",
    "queue_id": "4XyZ1",
    "sender": "a@b.example",
    "sasl_username": "",
}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "policyd.yaml"
    path.write_text(CONFIG)
    return path


def make_service(config_path: Path, *, verbose: bool = False) -> PolicyService:
    config = load_config(config_path)
    return PolicyService(
        str(config_path),
        config,
        MemoryReactorClock(),
        Metrics(CollectorRegistry()),
        log_all_decisions=verbose,
    )


def sample(service: PolicyService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_internal_error_answers_replies_error_never_permit(
    config_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If deciding raises, the reply is replies.error (a 4xx), counted and logged as error."""
    service = make_service(config_path)

    def broken(config: Config, request: PolicyRequest) -> Decision:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(policyd.service, "decide", broken)
    with caplog.at_level(logging.INFO):
        action = service.handle({**RELAY, "client_address": "192.0.2.7"})
    assert action == "451 4.3.0 Relay policy temporarily unavailable"
    assert sample(service, "policyd_decisions_total", verdict="error", rule="internal_error") == 1
    assert sample(service, "policyd_requests_total") == 1
    assert "simulated bug" in caplog.text  # the traceback, for the operator
    assert "verdict=error rule=internal_error" in caplog.text


def test_denials_logged_by_default_others_only_verbose(
    config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without --verbose only denials are logged; with it every decision is."""
    quiet = make_service(config_path)
    with caplog.at_level(logging.INFO):
        quiet.handle(RELAY)
        quiet.handle({**RELAY, "recipient": "user@local.example"})
    lines = [r.getMessage() for r in caplog.records if r.name == "policyd.decision"]
    assert len(lines) == 1 and "verdict=denied" in lines[0]
    caplog.clear()
    verbose = make_service(config_path, verbose=True)
    with caplog.at_level(logging.INFO):
        verbose.handle(RELAY)
        verbose.handle({**RELAY, "recipient": "user@local.example"})
    lines = [r.getMessage() for r in caplog.records if r.name == "policyd.decision"]
    assert len(lines) == 2 and "verdict=local rule=local_domains" in lines[1]


def test_decision_log_line_fields() -> None:
    """The log line carries queue id, client, login, sender, recipient, verdict, rule, action."""
    decision = Decision("550 5.7.1 Relaying Denied", Verdict.DENIED, Rule.DEFAULT, "remote.example")
    line = format_decision({**RELAY, "sasl_username": "bob"}, decision)
    assert line == (
        "decision queue_id=4XyZ1 client=198.51.100.7 server=- sasl_username=bob "
        "sender=a@b.example recipient=user@remote.example state=RCPT verdict=denied "
        'rule=relay.default action="550 5.7.1 Relaying Denied" destination=remote.example'
    )


def test_decision_log_line_outbound_and_warn_fields() -> None:
    """An allowed relay names its outbound profile; a warn-mode denial says mode=warn."""
    profile = OutboundProfile(path="outbound.domains.partner.example", auth="ntlm")
    allowed = Decision(
        "OK", Verdict.ALLOWED, Rule.ALLOW_AUTHENTICATED, "partner.example", outbound=profile
    )
    assert format_decision({**RELAY, "sasl_username": "a b"}, allowed).endswith(
        'sasl_username="a b" sender=a@b.example recipient=user@remote.example state=RCPT'
        " verdict=allowed rule=relay.allow.authenticated action=OK destination=partner.example"
        " outbound=outbound.domains.partner.example outbound_auth=ntlm"
    )
    warned = Decision("WARN x", Verdict.DENIED, Rule.DEFAULT, None, warn_only=True)
    assert format_decision({}, warned) == (
        "decision queue_id=- client=- server=- sasl_username=- sender=- recipient=- state=-"
        ' verdict=denied rule=relay.default action="WARN x" mode=warn'
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "-"),
        ("plain@example.com", "plain@example.com"),
        ("two words", '"two words"'),
        ('a"b', '"a\\"b"'),
        ("x=y", '"x=y"'),
        ("tab\there", '"tab\\x09here"'),
        ("fake verdict=allowed", '"fake verdict=allowed"'),
    ],
)
def test_log_values_cannot_forge_fields(value: str, expected: str) -> None:
    """Client-controlled values are quoted so they cannot inject key=value pairs."""
    assert quote_value(value) == expected


@given(st.text())
def test_log_values_round_trip(value: str) -> None:
    """Every quoted value is one token: no bare space or quote, and it decodes back exactly."""
    quoted = quote_value(value)
    if not value:
        assert quoted == "-"
        return
    if quoted[0] != '"':
        assert quoted == value
        assert not any(c in quoted for c in ' "=\\')
        return
    body = quoted[1:-1]
    assert quoted.endswith('"')
    assert all(c.isprintable() for c in body)
    decoded = re.sub(
        r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|["\\])',
        lambda m: m.group(1) if len(m.group(1)) == 1 else chr(int(m.group(1)[1:], 16)),
        body,
    )
    assert decoded == value


def test_metrics_count_every_request(config_path: Path) -> None:
    """requests_total and the duration histogram count skipped requests too."""
    service = make_service(config_path)
    service.handle(RELAY)
    service.handle({**RELAY, "protocol_state": "DATA"})
    assert sample(service, "policyd_requests_total") == 2
    assert sample(service, "policyd_request_duration_seconds_count") == 2
    assert sample(service, "policyd_decisions_total", verdict="skipped", rule="protocol_state") == 1
    assert sample(service, "policyd_decisions_total", verdict="denied", rule="relay.default") == 1


def test_reload_swaps_or_keeps(config_path: Path) -> None:
    """reload() swaps in a valid file and keeps the running rules on an invalid one."""
    service = make_service(config_path)
    assert service.handle(RELAY).startswith("550")
    config_path.write_text(CONFIG.replace("192.0.2.0/24", "198.51.100.0/24"))
    assert service.reload()
    assert service.handle(RELAY) == "OK"
    config_path.write_text(CONFIG.replace("192.0.2.0/24", "198.51.100.0/33"))
    assert not service.reload()
    assert service.handle(RELAY) == "OK"
    assert sample(service, "policyd_config_reloads_total", result="success") == 1
    assert sample(service, "policyd_config_reloads_total", result="failure") == 1


def test_readiness_follows_the_service_state(config_path: Path) -> None:
    """Not ready while starting or stopping; ready only in between (serve sets ``serving``
    once every listener accepts, see test_service and test_systemd)."""
    service = make_service(config_path)
    assert service.readiness() == (False, "starting")
    service.state = "serving"
    assert service.readiness() == (True, "ready")
    service.stop()
    assert service.readiness() == (False, "stopping")


def test_requests_by_protocol_state_are_bounded(config_path: Path) -> None:
    """Postfix's state names are counted as they are; anything else as other."""
    service = make_service(config_path)
    for state in ("RCPT", "rcpt", "END-OF-MESSAGE", "BOGUS", ""):
        service.handle({**RELAY, "protocol_state": state})
    service.handle({k: v for k, v in RELAY.items() if k != "protocol_state"})
    name = "policyd_requests_by_state_total"
    assert sample(service, name, protocol_state="RCPT") == 2
    assert sample(service, name, protocol_state="END-OF-MESSAGE") == 1
    assert sample(service, name, protocol_state="other") == 3
    assert sample(service, name, protocol_state="DATA") == 0  # present at zero
    assert sample(service, "policyd_requests_total") == 6


def test_build_config_and_list_metrics(config_path: Path, tmp_path: Path) -> None:
    """Build info, the digest of the rules in use (it follows a reload), list sizes."""
    networks = tmp_path / "networks.txt"
    networks.write_text("192.0.2.0/24\n198.51.100.0/24\n")
    config_path.write_text(
        'listen: {policy: "inet:127.0.0.1:10040"}\n'
        "local_domains: [local.example, .local.example]\n"
        'relay: {allow: {client_networks: ["file:networks.txt"]}}\n'
    )
    service = make_service(config_path)
    registry = service.metrics.registry
    build = [s for m in registry.collect() if m.name == "policyd_build_info" for s in m.samples]
    assert len(build) == 1 and build[0].value == 1
    assert build[0].labels["version"] == policyd.__version__

    def digests() -> list[str]:
        return [
            s.labels["sha256"]
            for m in registry.collect()
            if m.name == "policyd_config_info"
            for s in m.samples
        ]

    first = digests()
    assert first == [service.config.digest] and len(first[0]) == 64
    assert sample(service, "policyd_config_entries", list="local_domains") == 2
    assert sample(service, "policyd_config_entries", list="relay.allow.client_networks") == 2
    assert sample(service, "policyd_config_entries", list="relay.never.client_networks") == 0

    # A changed file: list changes the digest and the sizes; one series at a time.
    networks.write_text("192.0.2.0/24\n198.51.100.0/24\n203.0.113.0/24\n")
    assert service.reload()
    assert digests() != first and len(digests()) == 1
    assert sample(service, "policyd_config_entries", list="relay.allow.client_networks") == 3
    # The same content again gives the same digest.
    networks.write_text("192.0.2.0/24\n198.51.100.0/24\n")
    assert service.reload()
    assert digests() == first


def test_config_digest_leaves_password_files_out(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    base = (
        'listen: {policy: "inet:127.0.0.1:10040"}\n'
        "local_domains: [local.example]\n"
        "outbound:\n"
        "  domains:\n"
        "    partner.example: {auth: cleartext, username: u, password_file: secret,"
        ' nexthop: "[smtp.partner.example]:587"}\n'
    )
    (tmp_path / "policyd.yaml").write_text(base)
    secret.write_text("one\n")
    secret.chmod(0o600)
    first = load_config(tmp_path / "policyd.yaml").digest
    secret.write_text("two\n")
    assert load_config(tmp_path / "policyd.yaml").digest == first


LIMITED = """
listen: {policy: "inet:127.0.0.1:10040"}
local_domains: [local.example]
relay: {allow: {client_networks: [192.0.2.0/24]}}
rate_limits:
  limits:
    - {name: host, applies_to: [relay.allow.client_networks], key: client_address,
       rate: 2/1h, burst: 2}
"""


def test_sending_limit_defers_allowed_relays_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over its limit an allowed client is deferred (450, rule rate_limits.host); local mail
    and denials are untouched and not counted; time refills the budget."""
    path = tmp_path / "policyd.yaml"
    path.write_text(LIMITED)
    service = make_service(path)
    allowed = {**RELAY, "client_address": "192.0.2.7"}
    with caplog.at_level(logging.INFO, logger="policyd.decision"):
        assert service.handle(allowed) == "OK"
        assert service.handle({**allowed, "recipient": "u@local.example"}) == "DUNNO"
        assert service.handle(allowed) == "OK"
        assert service.handle(allowed) == "450 4.7.1 Sending limit exceeded, try again later"
        assert service.handle(RELAY) == "550 5.7.1 Relaying Denied"  # denial stays a denial
        assert service.handle({**allowed, "client_address": "192.0.2.8"}) == "OK"  # own key
    name = "policyd_decisions_total"
    assert sample(service, name, verdict="deferred", rule="rate_limits.host") == 1
    assert sample(service, name, verdict="allowed", rule="relay.allow.client_networks") == 3
    checks = "policyd_rate_limit_checks_total"
    assert sample(service, checks, limit="host", result="allowed") == 3
    assert sample(service, checks, limit="host", result="limited") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "policyd.decision"]
    assert any("verdict=deferred rule=rate_limits.host" in line for line in lines)
    # A refused attempt cost nothing: one interval (30 minutes) later one more passes.
    assert isinstance(service.reactor, MemoryReactorClock)
    service.reactor.advance(1800)
    assert service.handle(allowed) == "OK"
    assert service.handle(allowed).startswith("450 ")


def test_reload_keeps_the_limit_state(tmp_path: Path) -> None:
    path = tmp_path / "policyd.yaml"
    path.write_text(LIMITED)
    service = make_service(path)
    allowed = {**RELAY, "client_address": "192.0.2.7"}
    assert [service.handle(allowed) for _ in range(3)][-1].startswith("450 ")
    assert service.reload()
    assert service.handle(allowed).startswith("450 ")  # still over after a reload
    # The key's state is kept as it is (its bucket is empty until an hour from now, in
    # absolute time); a new limit whose tolerance reaches that far lets it send again.
    path.write_text(LIMITED.replace("rate: 2/1h, burst: 2", "rate: 10/1h, burst: 20"))
    assert service.reload()
    assert service.handle(allowed) == "OK"
