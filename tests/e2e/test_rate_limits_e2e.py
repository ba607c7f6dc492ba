"""End to end: sending limits through the real Postfix, with the example's ``rate_limits``.

An authenticated client (SMTP AUTH against a sasldb) -> private Postfix delivering by SMTP ->
an aiosmtpd smart host. policyd runs the ``rate_limits`` section of postfix-examples/policyd.yaml
as shipped, with only the numbers made small enough to reach in a test:

* ``login-hour`` (recipients per login, defer): 3 at once;
* ``login-day-tripwire`` (messages per login, hold): 2 at once.

So one message to five recipients gets ``250`` for three of them and ``450 4.7.1`` for the other
two, and the three are delivered; a login's third message trips the tripwire: Postfix accepts
it and puts it in the hold queue, where it waits for an administrator.
"""

from __future__ import annotations

import copy
import secrets
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .policyd_process import PolicydProcess, shipped_policyd_config
from .postfix import PostfixInstance
from .smtp_servers import RemoteServer

pytestmark = pytest.mark.e2e

POSTFIX_DELIVERS = True  # conftest: real SMTP delivery
POLICYD_METRICS = True  # conftest: a metrics listener too

CLIENT = "127.0.0.66"  # outside every allowed network: relays only once authenticated
SENDER = "sender@local.example"
PASSWORD = secrets.token_urlsafe(12)
DEFERRED = "450 4.7.1 Sending limit exceeded, try again later"
WAIT = 30.0  # seconds: a bound for polling waits, not a timing assertion


@pytest.fixture(scope="module")
def smart_host() -> Iterator[RemoteServer]:
    server = RemoteServer.plain("smarthost", "127.0.0.39")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def policyd_config(smart_host: RemoteServer) -> dict[str, Any]:
    shipped = shipped_policyd_config()
    limits = copy.deepcopy(shipped["rate_limits"])
    by_name = {limit["name"]: limit for limit in limits["limits"]}
    # The shipped limits, as shipped but for their numbers (see the module's docstring).
    assert by_name["login-hour"]["action"] == "defer"
    assert by_name["login-hour"]["count"] == "recipients"
    by_name["login-hour"].update(rate="3/1h", burst=3)
    assert by_name["login-day-tripwire"]["action"] == "hold"
    assert by_name["login-day-tripwire"]["count"] == "messages"
    by_name["login-day-tripwire"].update(rate="2/1d", burst=2)
    return {
        "mode": "enforce",
        "local_domains": ["local.example"],
        "relay": {"allow": {"authenticated": True}, "never": {}},
        "replies": {"denied": "550 5.7.1 Relaying Denied"},
        "outbound": {"default": {"auth": "none", "nexthop": smart_host.nexthop}},
        "rate_limits": limits,
    }


def login(postfix: PostfixInstance, user: str) -> tuple[str, str]:
    return postfix.add_sasl_user(user, PASSWORD), PASSWORD


def send(
    postfix: PostfixInstance, credentials: tuple[str, str], recipients: list[str]
) -> tuple[list[tuple[int, str]], int | None]:
    """One authenticated message: each RCPT's (code, text), and DATA's code if any passed."""
    host, port = postfix.smtp_address
    with smtplib.SMTP(host, port, source_address=(CLIENT, 0), timeout=30) as client:
        client.ehlo("client.test")
        assert client.login(*credentials)[0] == 235
        assert client.mail(SENDER)[0] == 250
        answers = []
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            answers.append((code, text.decode(errors="replace")))
        data_code = None
        if any(code == 250 for code, _ in answers):
            message = (
                f"From: <{SENDER}>\r\nTo: <{recipients[0]}>\r\nSubject: limits e2e\r\n"
                f"Message-ID: <{secrets.token_hex(8)}@local.example>\r\n\r\nhello\r\n"
            )
            data_code = client.data(message)[0]
    return answers, data_code


def test_past_the_limit_extra_recipients_are_deferred(
    postfix: PostfixInstance, policyd: PolicydProcess, smart_host: RemoteServer
) -> None:
    credentials = login(postfix, "alice")
    recipients = [f"r{n}-alice@remote.example" for n in range(5)]
    answers, data_code = send(postfix, credentials, recipients)
    assert [code for code, _ in answers] == [250, 250, 250, 450, 450], answers
    assert all(text.endswith("Sending limit exceeded, try again later") for _, text in answers[3:])
    assert all(text.startswith("4.7.1 ") for _, text in answers[3:])
    assert data_code == 250
    delivered = smart_host.wait_for_message(recipients[0], WAIT, poke=postfix.flush_queue)
    assert sorted(delivered.rcpt_tos) == sorted(recipients[:3])
    line = policyd.wait_for_log(recipients[3], "verdict=deferred")
    assert "rule=rate_limits.login-hour" in line and "sasl_username=alice" in line
    scraped = policyd.scrape()
    assert 'policyd_rate_limit_checks_total{limit="login-hour",result="limited"} 2.0' in scraped


def test_tripwire_puts_the_message_on_hold(
    postfix: PostfixInstance, policyd: PolicydProcess, smart_host: RemoteServer
) -> None:
    credentials = login(postfix, "bob")
    for n in range(2):
        answers, data_code = send(postfix, credentials, [f"m{n}-bob@remote.example"])
        assert answers[0][0] == 250 and data_code == 250
    answers, data_code = send(postfix, credentials, ["m2-bob@remote.example"])
    assert answers[0][0] == 250 and data_code == 250  # HOLD accepts the message...
    deadline = time.monotonic() + WAIT
    held: list[dict[str, Any]] = []
    while not held and time.monotonic() < deadline:
        held = [
            message
            for message in postfix.queue()
            if message["queue_name"] == "hold"
            and [r["address"] for r in message["recipients"]] == ["m2-bob@remote.example"]
        ]
        time.sleep(0.1)
    assert held, postfix.queue()  # ...and keeps it in the hold queue, undelivered
    for n in range(2):
        smart_host.wait_for_message(f"m{n}-bob@remote.example", WAIT, poke=postfix.flush_queue)
    assert smart_host.messages_to("m2-bob@remote.example") == []
    line = policyd.wait_for_log("m2-bob@remote.example", "verdict=deferred")
    assert "rule=rate_limits.login-day-tripwire" in line and "action=policyd_hold" in line
