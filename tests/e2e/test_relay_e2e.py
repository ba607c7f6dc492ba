"""End to end: SMTP clients -> a real private Postfix -> the real policyd.

Postfix runs the relay placement shipped in postfix-examples/main.cf, unchanged except for the
policy port. Clients connect from distinct loopback addresses (smtplib ``source_address``) so
that policyd sees them as different hosts:

* 127.0.0.66 -- an outside client (no rule allows it);
* 127.0.0.10 -- a client inside ``relay.allow.client_networks``;
* 127.0.0.77 -- a client inside ``relay.never.client_networks``.

Postfix listens on 127.0.0.1:P1 and 127.0.0.2:P2; only ``127.0.0.2`` is in
``relay.allow.server_addresses`` (the "inside interface"). policyd runs
postfix-examples/policyd.yaml as shipped, with only its listeners and its transport table's
path replaced. Note that ``mynetworks`` covers all of 127.0.0.0/8 in the test instance: any
relay permission must come from policyd.
"""

from __future__ import annotations

import secrets
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .policyd_process import PolicydProcess, shipped_policyd_config
from .postfix import EXAMPLE_POLICY_ENDPOINT, EXAMPLE_TRANSPORT_TABLE_PATH, PostfixInstance

pytestmark = pytest.mark.e2e

OUTSIDE = "127.0.0.66"
ALLOWED_NET = "127.0.0.10"
NEVER_NET = "127.0.0.77"
SASL_USER = "alice"
SASL_PASSWORD = secrets.token_urlsafe(12)
SENDER = "sender@outside.example"


@pytest.fixture(scope="module")
def policyd_config(smtp_listeners: list[tuple[str, int]]) -> dict[str, Any]:
    """postfix-examples/policyd.yaml as shipped: only ``listen`` is the test's own (and the
    transport table's path, which PolicydProcess moves), and its relative ``file:`` lists are
    made absolute because the copy is written elsewhere."""
    config = shipped_policyd_config()  # PolicydProcess fills in listen; no metrics listener
    inside_address, _ = smtp_listeners[1]
    # What the tests below rely on, as the example states it:
    assert config["relay"]["allow"]["authenticated"] is True
    assert "local.example" in config["local_domains"]
    assert any(ALLOWED_NET in entry for entry in config["relay"]["allow"]["client_networks"])
    assert config["relay"]["allow"]["server_addresses"] == [inside_address]
    assert config["relay"]["never"]["client_networks"] == [NEVER_NET]
    # The table the shipped main.cf reads; PolicydProcess moves only its path.
    assert config["outbound"]["transport_table"] == {"path": EXAMPLE_TRANSPORT_TABLE_PATH}
    return config


@pytest.fixture(scope="module")
def sasl_login(postfix: PostfixInstance) -> tuple[str, str]:
    """A sasldb user on the running instance: (login name, password)."""
    return postfix.add_sasl_user(SASL_USER, SASL_PASSWORD), SASL_PASSWORD


@dataclass
class Attempt:
    """What Postfix answered to one mail transaction."""

    rcpt_code: int
    rcpt_text: str
    data_code: int | None = None  # set when the recipient was accepted and DATA was sent
    data_text: str = ""


def send(
    postfix: PostfixInstance,
    recipient: str,
    *,
    source: str = OUTSIDE,
    listener: int = 0,
    login: tuple[str, str] | None = None,
) -> Attempt:
    """One SMTP session from ``source``: EHLO, [AUTH], MAIL, RCPT, and DATA if RCPT passed."""
    host, port = postfix.listeners[listener]
    with smtplib.SMTP(host, port, source_address=(source, 0), timeout=30) as client:
        client.ehlo("client.test")
        if login is not None:
            code, text = client.login(*login)
            assert code == 235, (code, text)
        code, text = client.mail(SENDER)
        assert code == 250, (code, text)
        rcpt_code, rcpt_text = client.rcpt(recipient)
        attempt = Attempt(rcpt_code, rcpt_text.decode(errors="replace"))
        if rcpt_code == 250:
            message = f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: e2e\r\n\r\nhello\r\n"
            data_code, data_text = client.data(message)
            attempt.data_code = data_code
            attempt.data_text = data_text.decode(errors="replace")
        else:
            client.rset()
    return attempt


def assert_accepted(attempt: Attempt) -> None:
    assert attempt.rcpt_code == 250, attempt
    assert attempt.data_code == 250, attempt


def assert_relay_denied(attempt: Attempt) -> None:
    """policyd's denial as the client sees it: 550 5.7.1 <rcpt>: ...: Relaying Denied."""
    assert attempt.rcpt_code == 550, attempt
    assert attempt.rcpt_text.startswith("5.7.1 "), attempt
    assert attempt.rcpt_text.endswith("Relaying Denied"), attempt


def assert_policy_unavailable(attempt: Attempt) -> None:
    """The shipped default_action: deferred, 451 4.3.5 Relay policy unavailable."""
    assert attempt.rcpt_code == 451, attempt
    assert attempt.rcpt_text.startswith("4.3.5 "), attempt
    assert attempt.rcpt_text.endswith("Relay policy unavailable"), attempt


def decision(policyd: PolicydProcess, recipient: str) -> str:
    """policyd's decision log line for ``recipient`` (recipients are unique per test)."""
    return policyd.wait_for_log(recipient, "verdict=")


def test_instance_runs_the_shipped_relay_placement(postfix: PostfixInstance) -> None:
    """Postfix's effective smtpd_relay_restrictions is postfix-examples/main.cf's, only the
    policy port differs: policyd first (fail closed), then reject_unauth_destination."""
    effective = postfix.postconf("smtpd_relay_restrictions")["smtpd_relay_restrictions"]
    port = postfix.policy_port
    assert EXAMPLE_POLICY_ENDPOINT not in effective
    assert effective.startswith(f"check_policy_service {{ inet:127.0.0.1:{port},"), effective
    assert "default_action = 451 4.3.5 Relay policy unavailable" in effective
    assert effective.endswith("reject_unauth_destination"), effective
    assert "permit" not in effective


def test_outside_client_cannot_relay(postfix: PostfixInstance, policyd: PolicydProcess) -> None:
    """An unlisted client relaying to a remote domain gets policyd's 550 5.7.1 Relaying Denied,
    decided by relay.default."""
    recipient = "someone@remote.example"
    attempt = send(postfix, recipient, source=OUTSIDE)
    assert_relay_denied(attempt)
    line = decision(policyd, recipient)
    assert "verdict=denied" in line
    assert "rule=relay.default" in line


def test_outside_client_can_send_to_local_domain(
    postfix: PostfixInstance, policyd: PolicydProcess
) -> None:
    """The same outside client may send to a local domain: policyd says local (DUNNO), Postfix's
    reject_unauth_destination agrees, and the message is accepted."""
    recipient = "user@local.example"
    assert_accepted(send(postfix, recipient, source=OUTSIDE))
    line = decision(policyd, recipient)
    assert "verdict=local" in line
    assert "rule=local_domains" in line


def test_client_in_allowed_network_relays(
    postfix: PostfixInstance, policyd: PolicydProcess
) -> None:
    """A client inside relay.allow.client_networks relays to a remote domain (policyd OK)."""
    recipient = "from-allowed-net@remote.example"
    assert_accepted(send(postfix, recipient, source=ALLOWED_NET))
    line = decision(policyd, recipient)
    assert "verdict=allowed" in line
    assert "rule=relay.allow.client_networks" in line


def test_authenticated_client_relays(
    postfix: PostfixInstance, policyd: PolicydProcess, sasl_login: tuple[str, str]
) -> None:
    """A client that completed SMTP AUTH relays from an outside address
    (relay.allow.authenticated), and policyd's log names the SASL login."""
    recipient = "from-authenticated@remote.example"
    assert_accepted(send(postfix, recipient, source=OUTSIDE, login=sasl_login))
    line = decision(policyd, recipient)
    assert "verdict=allowed" in line
    assert "rule=relay.allow.authenticated" in line
    assert sasl_login[0] in line


def test_failed_authentication_does_not_relay(
    postfix: PostfixInstance, policyd: PolicydProcess, sasl_login: tuple[str, str]
) -> None:
    """A client whose AUTH was refused is not authenticated: its relay attempt is denied."""
    recipient = "after-failed-auth@remote.example"
    host, port = postfix.smtp_address
    with smtplib.SMTP(host, port, source_address=(OUTSIDE, 0), timeout=30) as client:
        client.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(sasl_login[0], sasl_login[1] + "-wrong")
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt(recipient)
    assert_relay_denied(Attempt(code, text.decode()))
    line = decision(policyd, recipient)
    assert "verdict=denied" in line
    assert "rule=relay.default" in line


def test_never_network_beats_authentication(
    postfix: PostfixInstance, policyd: PolicydProcess, sasl_login: tuple[str, str]
) -> None:
    """An authenticated client from relay.never.client_networks is still refused 550:
    never wins over every allow rule."""
    recipient = "from-never-net@remote.example"
    assert_relay_denied(send(postfix, recipient, source=NEVER_NET, login=sasl_login))
    line = decision(policyd, recipient)
    assert "verdict=denied" in line
    assert "rule=relay.never.client_networks" in line


def test_never_network_can_send_to_local_domain(
    postfix: PostfixInstance, policyd: PolicydProcess
) -> None:
    """relay.never only restricts relaying: a never-listed client may still send local mail."""
    recipient = "never-net-local@local.example"
    assert_accepted(send(postfix, recipient, source=NEVER_NET))
    assert "verdict=local" in decision(policyd, recipient)


def test_allowed_server_address_relays_only_on_that_listener(
    postfix: PostfixInstance, policyd: PolicydProcess
) -> None:
    """A client connecting to the listener named in relay.allow.server_addresses (127.0.0.2)
    relays; the same client on the other listener (127.0.0.1:P1) is refused 550."""
    inside = "via-inside-listener@remote.example"
    assert_accepted(send(postfix, inside, source=OUTSIDE, listener=1))
    line = decision(policyd, inside)
    assert "verdict=allowed" in line
    assert "rule=relay.allow.server_addresses" in line

    outside = "via-outside-listener@remote.example"
    assert_relay_denied(send(postfix, outside, source=OUTSIDE, listener=0))
    line = decision(policyd, outside)
    assert "verdict=denied" in line
    assert "rule=relay.default" in line


@pytest.fixture
def policyd_down(policyd: PolicydProcess) -> Iterator[PolicydProcess]:
    """policyd stopped (SIGTERM) for one test, and started again afterwards."""
    status = policyd.stop()
    try:
        assert status == 0, f"policyd exited with {status} on SIGTERM\n{policyd.log_text()}"
        yield policyd
    finally:
        policyd.start()


def test_policyd_down_defers_and_never_relays(
    postfix: PostfixInstance, policyd_down: PolicydProcess
) -> None:
    """With policyd stopped, Postfix fails closed: relay attempts (even from a client policyd
    would allow) and local mail are all deferred with 451 4.3.5, never accepted."""
    assert_policy_unavailable(send(postfix, "down-outside@remote.example", source=OUTSIDE))
    assert_policy_unavailable(send(postfix, "down-allowed@remote.example", source=ALLOWED_NET))
    assert_policy_unavailable(send(postfix, "down-local@local.example", source=OUTSIDE))
    # The 451 is Postfix's default_action, not an answer from a policy server.
    assert "down-outside@remote.example" not in policyd_down.log_text()
    assert f"problem talking to server 127.0.0.1:{policyd_down.port}" in postfix.maillog()


def test_relaying_resumes_after_policyd_restart(
    postfix: PostfixInstance, policyd: PolicydProcess
) -> None:
    """After policyd is stopped and started again, Postfix reconnects by itself (no reload)
    and decisions are made again."""
    assert policyd.stop() == 0, policyd.log_text()
    policyd.start()
    recipient = "after-restart@remote.example"
    assert_accepted(send(postfix, recipient, source=ALLOWED_NET))
    assert "rule=relay.allow.client_networks" in decision(policyd, recipient)
