"""End to end: outbound authentication chosen by policyd, carried out by a real Postfix.

SMTP client (127.0.0.10, an allowed client network) -> private Postfix -> remote aiosmtpd
servers on other loopback addresses. Postfix runs postfix-examples/main.cf and master.cf as
shipped (only the policy and socketmap ports and the transport table's path differ), with real
``smtp`` delivery; for every recipient it looks up the static transport table policyd wrote
(``hash:``, built by postmap with this instance's main.cf) for the ``policyd-*`` transport and
next hop to use, and the smtp client asks policyd's ``sasl_passwd`` socketmap for the account
to log in with. The last test reloads policyd with changed profiles and follows mail the new way.

The remote servers (tests/e2e/smtp_servers.py), each announcing ``AUTH NTLM PLAIN LOGIN``:

* ``partner``   127.0.0.31:P1  STARTTLS, then AUTH PLAIN/LOGIN for relay@partner.example;
* ``partner2``  127.0.0.31:P2  the same account, another port: ``wrong.example`` goes there
  with a profile whose password file holds a WRONG password. Both profiles share the host
  127.0.0.31 with different credentials, so policyd must not answer the bare host key (which
  Postfix looks up before the next hop): if it did, one of the two would log in with the other's
  password and the tests below would see it;
* ``corp``      127.0.0.32  AUTH NTLM for CORP\\svc-relay, challenge naming the domain CORP;
* ``otherdom``  127.0.0.35  AUTH NTLM for the same account, but its challenge names OTHERDOM;
* ``legacy``    127.0.0.36  no STARTTLS, AUTH PLAIN/LOGIN in the clear: ``legacy.example``
  reaches it with a profile that allows plaintext (``tls: may``, ``allow_plaintext: true``);
* ``notls``     127.0.0.37  the same kind of server, for ``notls.example`` whose profile is a
  normal cleartext one (TLS required);
* ``default``   127.0.0.33  no TLS, no AUTH: the site's default smart host.

Passwords are generated at run time; none is committed.
"""

from __future__ import annotations

import copy
import os
import secrets
import signal
import smtplib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import ntlm
from .policyd_process import PolicydProcess
from .postfix import PostfixInstance
from .smtp_servers import NtlmAccount, RemoteServer, describe_attempts, make_self_signed_cert

pytestmark = pytest.mark.e2e

POSTFIX_DELIVERS = True  # conftest: real SMTP delivery
POLICYD_METRICS = True  # conftest: a metrics listener too

CLIENT = "127.0.0.10"  # in relay.allow.client_networks
SENDER = "sender@local.example"

PARTNER_ACCOUNT = "relay@partner.example"
NTLM_USERNAME = "CORP\\svc-relay"
DIRECT_ENV = "POLICYD_E2E_DIRECT_PASSWORD"

PARTNER_PASSWORD = secrets.token_urlsafe(18)
WRONG_PASSWORD = secrets.token_urlsafe(18)
CORP_PASSWORD = secrets.token_urlsafe(18)
DIRECT_PASSWORD = secrets.token_urlsafe(18)
POLICYD_ENV = {DIRECT_ENV: DIRECT_PASSWORD}  # conftest: policyd's extra environment
LEGACY_PASSWORD = secrets.token_urlsafe(18)
LEGACY_ACCOUNT = "relay@legacy.example"
ALL_PASSWORDS = {
    "partner": PARTNER_PASSWORD,
    "wrong": WRONG_PASSWORD,
    "corp": CORP_PASSWORD,
    "direct": DIRECT_PASSWORD,
    "legacy": LEGACY_PASSWORD,
}

DELIVERY_TIMEOUT = 30.0  # seconds; a bound for polling waits, not a timing assertion


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def servers(e2e_dir: Path) -> Iterator[dict[str, RemoteServer]]:
    """The remote SMTP servers, started for the module and stopped by handle afterwards."""
    cert = make_self_signed_cert(e2e_dir / "tls", "partner.remote.test")
    partner_accounts = {PARTNER_ACCOUNT: PARTNER_PASSWORD}
    corp_account = NtlmAccount(domain="CORP", user="svc-relay", password=CORP_PASSWORD)
    started: dict[str, RemoteServer] = {}
    wanted = {
        "partner": RemoteServer.cleartext(
            "partner", "127.0.0.31", accounts=partner_accounts, tls_cert=cert
        ),
        "partner2": RemoteServer.cleartext(
            "partner2", "127.0.0.31", accounts=partner_accounts, tls_cert=cert
        ),
        "corp": RemoteServer.ntlm("corp", "127.0.0.32", account=corp_account),
        "otherdom": RemoteServer.ntlm(
            "otherdom", "127.0.0.35", account=corp_account, target_name="OTHERDOM"
        ),
        "legacy": RemoteServer.cleartext_without_tls(
            "legacy", "127.0.0.36", accounts={LEGACY_ACCOUNT: LEGACY_PASSWORD}
        ),
        "notls": RemoteServer.cleartext_without_tls(
            "notls", "127.0.0.37", accounts={LEGACY_ACCOUNT: LEGACY_PASSWORD}
        ),
        "default": RemoteServer.plain("default", "127.0.0.33"),
    }
    try:
        for name, server in wanted.items():
            server.start()
            started[name] = server
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def secret_files(e2e_dir: Path) -> dict[str, Path]:
    """The password files (mode 0600, one trailing newline as an editor would leave)."""
    directory = e2e_dir / "secrets"
    directory.mkdir(mode=0o700, exist_ok=True)
    files = {}
    for name in ("partner", "wrong", "corp", "legacy"):
        path = directory / name
        path.write_text(ALL_PASSWORDS[name] + "\n")
        path.chmod(0o600)
        files[name] = path
    return files


@pytest.fixture(scope="module")
def policyd_config(
    servers: dict[str, RemoteServer], secret_files: dict[str, Path]
) -> dict[str, Any]:
    """Relay for 127.0.0.10; outbound default: no AUTH via the default server; overrides."""
    return {
        "mode": "enforce",
        "local_domains": ["local.example"],
        "relay": {"allow": {"client_networks": [CLIENT]}, "never": {}},
        "replies": {"denied": "550 5.7.1 Relaying Denied"},
        "outbound": {
            "default": {"auth": "none", "nexthop": servers["default"].nexthop},
            "domains": {
                "partner.example": {
                    "auth": "cleartext",
                    "username": PARTNER_ACCOUNT,
                    "password_file": str(secret_files["partner"]),
                    "nexthop": servers["partner"].nexthop,
                },
                "wrong.example": {
                    "auth": "cleartext",
                    "username": PARTNER_ACCOUNT,
                    "password_file": str(secret_files["wrong"]),
                    "nexthop": servers["partner2"].nexthop,
                },
                "corp.example": {
                    "auth": "ntlm",
                    "username": NTLM_USERNAME,
                    "password_file": str(secret_files["corp"]),
                    "nexthop": servers["corp"].nexthop,
                },
                "corp-other.example": {
                    "auth": "ntlm",
                    "username": NTLM_USERNAME,
                    "password_file": str(secret_files["corp"]),
                    "nexthop": servers["otherdom"].nexthop,
                },
                "legacy.example": {
                    "auth": "cleartext",
                    "username": LEGACY_ACCOUNT,
                    "password_file": str(secret_files["legacy"]),
                    "nexthop": servers["legacy"].nexthop,
                    "tls": "may",
                    "allow_plaintext": True,
                },
                "notls.example": {
                    "auth": "cleartext",
                    "username": LEGACY_ACCOUNT,
                    "password_file": str(secret_files["legacy"]),
                    "nexthop": servers["notls"].nexthop,
                },
                # An IDNA domain, written here in U-labels; Postfix looks SMTPUTF8 mail up
                # by its U-labels, other mail by the A-labels (xn--bcher-kva.example).
                "bücher.example": {
                    "auth": "cleartext",
                    "username": PARTNER_ACCOUNT,
                    "password_file": str(secret_files["partner"]),
                    "nexthop": servers["partner"].nexthop,
                },
                # No next hop: delivered to the domain itself (not reachable here: no DNS);
                # only its table answers are checked.
                "direct.example": {
                    "auth": "cleartext",
                    "username": "direct-user",
                    "password_env": DIRECT_ENV,
                },
            },
        },
    }


# ------------------------------------------------------------------------------------- helpers


def submit(postfix: PostfixInstance, recipient: str) -> None:
    """Submit one message from the allowed client; Postfix must accept it (250 at DATA)."""
    host, port = postfix.smtp_address
    with smtplib.SMTP(host, port, source_address=(CLIENT, 0), timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt(recipient)
        assert code == 250, (recipient, code, text)
        message = (
            f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: outbound e2e\r\n"
            f"Message-ID: <{secrets.token_hex(8)}@local.example>\r\n\r\nhello {recipient}\r\n"
        )
        code, text = client.data(message)
        assert code == 250, (recipient, code, text)


def delivered_line(postfix: PostfixInstance, recipient: str) -> str:
    """The maillog line recording the delivery of ``recipient`` (status=sent)."""
    return postfix.wait_for_maillog(f"to=<{recipient}>", "status=sent", timeout=DELIVERY_TIMEOUT)


def table(policyd: PolicydProcess, name: str) -> str:
    """A Postfix table name for policyd's socketmap map ``name``."""
    return f"socketmap:{policyd.socketmap_endpoint}:{name}"


def queued(postfix: PostfixInstance, recipient: str) -> list[dict[str, Any]]:
    """The queue entries (``postqueue -j``) of ``recipient``: (message, recipient) pairs."""
    return [
        {"queue_name": message["queue_name"], **entry}
        for message in postfix.queue()
        for entry in message.get("recipients", [])
        if entry.get("address") == recipient
    ]


def wait_deferred(postfix: PostfixInstance, recipient: str) -> dict[str, Any]:
    """``recipient``'s single queue entry once it sits in the deferred queue (bounded wait:
    a retry in progress shows it briefly in the active queue)."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        entries = queued(postfix, recipient)
        if [e["queue_name"] for e in entries] == ["deferred"]:
            return entries[0]
        if time.monotonic() >= deadline:
            raise AssertionError(f"{recipient} is not (only) in the deferred queue: {entries}")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------- tests


def test_instance_runs_the_shipped_outbound_wiring(
    postfix: PostfixInstance, policyd: PolicydProcess
) -> None:
    """``postfix check`` accepts the shipped snippets; Postfix's effective settings are
    postfix-examples/main.cf's (transport_maps is the static table policyd wrote, at the
    test's path; only the socketmap port differs) and the four policyd-*
    transports of postfix-examples/master.cf exist, with their mechanism filter, SASL security
    options and TLS level."""
    postfix.check()
    values = postfix.postconf(
        "transport_maps",
        "smtp_sasl_password_maps",
        "smtp_sasl_auth_enable",
        "smtp_sasl_auth_soft_bounce",
        "smtp_sender_dependent_authentication",
    )
    assert values == {
        "transport_maps": f"hash:{policyd.transport_table}",
        "smtp_sasl_password_maps": table(policyd, "sasl_passwd"),
        "smtp_sasl_auth_enable": "no",
        "smtp_sasl_auth_soft_bounce": "yes",
        "smtp_sender_dependent_authentication": "no",
    }
    services = postfix.master_services()
    expected = {
        "policyd-none": {"smtp_sasl_auth_enable": "no", "smtp_tls_security_level": "may"},
        "policyd-cleartext": {
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_mechanism_filter": "plain,login",
            "smtp_tls_security_level": "encrypt",
            "smtp_sasl_security_options": "noanonymous,noplaintext",
            "smtp_sasl_tls_security_options": "noanonymous",
        },
        "policyd-cleartext-notls": {
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_mechanism_filter": "plain,login",
            "smtp_tls_security_level": "may",
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
        },
        "policyd-ntlm": {
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_mechanism_filter": "ntlm",
            "smtp_tls_security_level": "may",
        },
    }
    for name, options in expected.items():
        assert name in services, f"master.cf has no {name} service: {sorted(services)}"
        command, service_options = services[name]
        assert command == "smtp", (name, command)
        for key, value in options.items():
            assert service_options.get(key) == value, (name, key, service_options)


def test_cleartext_override_logs_in_over_starttls(
    postfix: PostfixInstance, policyd: PolicydProcess, servers: dict[str, RemoteServer]
) -> None:
    """Mail to partner.example goes to its next hop through policyd-cleartext: STARTTLS first,
    then AUTH PLAIN or LOGIN as relay@partner.example with the password from its password file
    (the server checks it), although the server announces NTLM first."""
    recipient = "someone@partner.example"
    submit(postfix, recipient)
    message = servers["partner"].wait_for_message(
        recipient, DELIVERY_TIMEOUT, poke=postfix.flush_queue
    )
    assert message.tls, "delivered without TLS"
    assert message.auth is not None, "delivered without AUTH"
    assert message.auth.success
    assert message.auth.mechanism in ("PLAIN", "LOGIN"), message.auth
    assert message.auth.login == PARTNER_ACCOUNT
    assert message.auth.tls
    attempts = servers["partner"].auth_attempts
    assert attempts and all(a.success and a.tls for a in attempts), describe_attempts(attempts)
    line = delivered_line(postfix, recipient)
    assert "postfix/policyd-cleartext/smtp" in line, line
    assert f"relay=127.0.0.31[127.0.0.31]:{servers['partner'].port}" in line, line
    decision = policyd.wait_for_log(recipient, "verdict=")
    assert "verdict=allowed" in decision, decision
    assert "outbound" in decision and "cleartext" in decision, decision


def test_ntlm_override_does_an_ntlm_exchange(
    postfix: PostfixInstance, servers: dict[str, RemoteServer]
) -> None:
    """Mail to corp.example arrives at its NTLM server after an AUTH NTLM exchange for
    CORP\\svc-relay, although the server announces PLAIN and LOGIN too: the type 3 message's
    user and domain fields name that account and domain, and its NT response is the NTLMv1
    response for the account's password and the server's challenge (the server recomputes it).

    What Cyrus SASL's NTLM client sends, pinned here: a type 1 with flags
    UNICODE|OEM|REQUEST_TARGET|NTLM and no domain or workstation; a type 3 in UTF-16LE with
    the whole configured user name, backslash included, in the user field, the domain field
    copied from the server's challenge (see the next test), no workstation, a 24-byte NTLMv1 NT
    response and no LM response. Never NTLMv2: Postfix gives Cyrus no way to set its ntlm_v2
    option, so a server that requires NTLMv2 will refuse this client."""
    recipient = "someone@corp.example"
    submit(postfix, recipient)
    message = servers["corp"].wait_for_message(
        recipient, DELIVERY_TIMEOUT, poke=postfix.flush_queue
    )
    assert message.auth is not None and message.auth.success, message
    assert message.auth.mechanism == "NTLM", message.auth
    exchange = message.auth.ntlm
    assert exchange is not None and exchange.accepted, exchange
    summary = exchange.summary()
    negotiate, auth = exchange.negotiate, exchange.authenticate
    assert negotiate is not None and auth is not None, summary
    assert negotiate.flags & ntlm.NEGOTIATE_NTLM and negotiate.flags & ntlm.NEGOTIATE_UNICODE
    assert (negotiate.domain, negotiate.workstation) == ("", ""), summary
    assert auth.user == NTLM_USERNAME, summary
    assert auth.domain == "CORP", summary
    assert auth.workstation == "", summary
    assert auth.unicode, summary
    assert exchange.response_kind == "NTLMv1", summary
    assert len(auth.nt_response) == 24 and auth.lm_response == b"", summary
    line = delivered_line(postfix, recipient)
    assert "postfix/policyd-ntlm/smtp" in line, line


def test_ntlm_domain_field_comes_from_the_challenge(
    postfix: PostfixInstance, servers: dict[str, RemoteServer]
) -> None:
    """Against a server whose challenge names another domain (OTHERDOM), the client still
    sends the user field CORP\\svc-relay but copies OTHERDOM into the domain field: the
    DOMAIN part of the configured user name does not set the NTLM domain. That server refuses
    the mismatching account, and the mail is deferred, not delivered and not bounced."""
    recipient = "someone@corp-other.example"
    submit(postfix, recipient)
    postfix.wait_for_maillog(f"to=<{recipient}>", "status=deferred", timeout=DELIVERY_TIMEOUT)
    attempts = servers["otherdom"].auth_attempts
    assert attempts and all(a.mechanism == "NTLM" for a in attempts), describe_attempts(attempts)
    exchange = attempts[0].ntlm
    assert exchange is not None and exchange.authenticate is not None, describe_attempts(attempts)
    assert exchange.target_name == "OTHERDOM"
    assert exchange.authenticate.user == NTLM_USERNAME, exchange.summary()
    assert exchange.authenticate.domain == "OTHERDOM", exchange.summary()
    assert not any(a.success for a in attempts), describe_attempts(attempts)
    assert servers["otherdom"].messages_to(recipient) == []
    wait_deferred(postfix, recipient)


def test_domain_without_override_follows_the_site_default(
    postfix: PostfixInstance, servers: dict[str, RemoteServer]
) -> None:
    """Mail to a domain without an override goes through policyd-none to the default's next
    hop, without any AUTH command."""
    recipient = "someone@elsewhere.example"
    submit(postfix, recipient)
    message = servers["default"].wait_for_message(
        recipient, DELIVERY_TIMEOUT, poke=postfix.flush_queue
    )
    assert message.auth is None
    assert servers["default"].auth_attempts == []
    line = delivered_line(postfix, recipient)
    assert "postfix/policyd-none/smtp" in line, line


def test_local_mail_keeps_postfix_routing_despite_the_star_row(
    postfix: PostfixInstance, policyd: PolicydProcess, servers: dict[str, RemoteServer]
) -> None:
    """The default profile names a next hop, so the static table has a ``*`` row; the local
    domain's row ``:`` (transport(5): no change) keeps Postfix's own routing for it: the mail
    is delivered by local_transport (here discard:), not sent to the default smart host."""
    static = f"hash:{policyd.transport_table}"
    assert postfix.postmap_query("*", static).stdout.strip().startswith("policyd-none:")
    assert postfix.postmap_query("local.example", static).stdout.strip() == ":"
    recipient = "someone@local.example"
    submit(postfix, recipient)
    line = postfix.wait_for_maillog(f"to=<{recipient}>", "status=sent", timeout=DELIVERY_TIMEOUT)
    assert "postfix/discard[" in line and "relay=none" in line, line
    assert servers["default"].messages_to(recipient) == []


@pytest.mark.parametrize(
    "recipient", ["someone@bücher.example", "someone@xn--bcher-kva.example"], ids=["U", "A"]
)
def test_idna_domain_is_routed_in_both_spellings(
    postfix: PostfixInstance, servers: dict[str, RemoteServer], recipient: str
) -> None:
    """An override for an IDNA domain: mail sent with SMTPUTF8 to its U-label spelling (which
    trivial-rewrite looks up as such in the static table) and mail to its A-label spelling
    both leave through policyd-cleartext for the override's next hop. Only the route is
    checked: the test server offers no SMTPUTF8, so Postfix may refuse to hand it the U-label
    message ("SMTPUTF8 is required, but was not offered"). Without the U-label row, that mail
    went through the ``*`` row to the default smart host instead (seen when it was left out)."""
    host, port = postfix.smtp_address
    with smtplib.SMTP(host, port, source_address=(CLIENT, 0), timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("smtputf8")
        client.command_encoding = "utf-8"  # smtplib's own choice for SMTPUTF8 transactions
        assert client.mail(SENDER, ["SMTPUTF8"])[0] == 250
        code, text = client.rcpt(recipient)
        assert code == 250, (recipient, code, text)
        message = f"From: <{SENDER}>\r\nSubject: idna\r\n\r\nhello\r\n".encode()
        assert client.data(message)[0] == 250
    line = postfix.wait_for_maillog(f"to=<{recipient}>", "relay=", timeout=DELIVERY_TIMEOUT)
    assert "postfix/policyd-cleartext/smtp" in line, line
    assert f"relay=127.0.0.31[127.0.0.31]:{servers['partner'].port}" in line, line


def test_wrong_password_defers_never_bounces_or_sends_unauthenticated(
    postfix: PostfixInstance, servers: dict[str, RemoteServer]
) -> None:
    """A profile whose password file holds a wrong password: the server refuses the login, the
    mail stays in Postfix's deferred queue with "SASL authentication failed", is not bounced,
    and the server never receives it (nor a MAIL command without AUTH)."""
    recipient = "someone@wrong.example"
    submit(postfix, recipient)
    line = postfix.wait_for_maillog(
        f"to=<{recipient}>", "status=deferred", timeout=DELIVERY_TIMEOUT
    )
    assert "SASL authentication failed" in line, line
    assert "postfix/policyd-cleartext/smtp" in line, line
    attempts = servers["partner2"].auth_attempts
    assert attempts, "the server saw no AUTH attempt"
    assert all(
        a.mechanism in ("PLAIN", "LOGIN") and a.login == PARTNER_ACCOUNT and a.tls and not a.success
        for a in attempts
    ), describe_attempts(attempts)
    entry = wait_deferred(postfix, recipient)
    assert "SASL authentication failed" in entry.get("delay_reason", ""), entry
    for server in servers.values():
        assert server.messages_to(recipient) == [], server
    assert servers["partner2"].handler.refused == []
    assert not [
        line
        for line in postfix.maillog().splitlines()
        if f"to=<{recipient}>" in line and ("status=bounced" in line or "status=sent" in line)
    ]


def test_plaintext_profile_logs_in_without_tls(
    postfix: PostfixInstance, servers: dict[str, RemoteServer]
) -> None:
    """A cleartext profile with ``tls: may`` and ``allow_plaintext: true`` goes through
    policyd-cleartext-notls and logs in with PLAIN or LOGIN to a server without STARTTLS."""
    recipient = "someone@legacy.example"
    submit(postfix, recipient)
    message = servers["legacy"].wait_for_message(
        recipient, DELIVERY_TIMEOUT, poke=postfix.flush_queue
    )
    assert not message.tls
    assert message.auth is not None and message.auth.success, message
    assert message.auth.mechanism in ("PLAIN", "LOGIN"), message.auth
    assert message.auth.login == LEGACY_ACCOUNT
    line = delivered_line(postfix, recipient)
    assert "postfix/policyd-cleartext-notls/smtp" in line, line


def test_cleartext_profile_never_sends_the_password_without_tls(
    postfix: PostfixInstance, servers: dict[str, RemoteServer]
) -> None:
    """A normal cleartext profile (TLS required) towards a server that offers no STARTTLS:
    the mail is deferred ("TLS is required, but was not offered"), the server sees no AUTH
    command at all (the password never crosses the wire in the clear) and gets no message."""
    recipient = "someone@notls.example"
    submit(postfix, recipient)
    line = postfix.wait_for_maillog(
        f"to=<{recipient}>", "status=deferred", timeout=DELIVERY_TIMEOUT
    )
    assert "TLS is required, but was not offered" in line, line
    assert "postfix/policyd-cleartext/smtp" in line, line
    assert servers["notls"].auth_attempts == []
    assert servers["notls"].messages == []
    wait_deferred(postfix, recipient)


def test_queued_mail_waits_while_policyd_is_down(
    postfix: PostfixInstance, policyd: PolicydProcess, servers: dict[str, RemoteServer]
) -> None:
    """Mail already in the queue when policyd's socketmap is unreachable is deferred, not sent
    by some other route or without AUTH, and not bounced; once policyd is back, the next retry
    delivers it through its profile (AUTH over TLS)."""
    recipient = "later@partner.example"
    partner = servers["partner"]
    partner.defer_recipient(recipient)  # the first attempt gets a 451: the mail stays queued
    submit(postfix, recipient)
    postfix.wait_for_maillog(f"to=<{recipient}>", "status=deferred", timeout=DELIVERY_TIMEOUT)
    partner.defer_recipient(recipient, defer=False)
    wait_deferred(postfix, recipient)
    before = postfix.maillog()
    attempts_before = len(partner.auth_attempts)
    assert policyd.stop() == 0, policyd.log_text()
    try:
        postfix.flush_queue()
        postfix.wait_for_maillog(
            f"to=<{recipient}>", "status=deferred", timeout=DELIVERY_TIMEOUT, after=len(before)
        )
        # Postfix says why: its socketmap lookup failed (the sasl_passwd lookup: the transport
        # comes from the static table, which needs no policyd).
        postfix.wait_for_maillog(
            f"socketmap:{policyd.socketmap_endpoint}:", "lookup error", after=len(before)
        )
        assert partner.messages_to(recipient) == []
        assert len(partner.auth_attempts) == attempts_before, "AUTH without a password?"
        assert partner.handler.refused == [], "MAIL without AUTH"
        wait_deferred(postfix, recipient)
    finally:
        policyd.start()
    postfix.flush_queue()
    message = partner.wait_for_message(recipient, DELIVERY_TIMEOUT, poke=postfix.flush_queue)
    assert message.tls and message.auth is not None and message.auth.login == PARTNER_ACCOUNT
    assert not [
        line
        for line in postfix.maillog().splitlines()
        if f"to=<{recipient}>" in line and "status=bounced" in line
    ]


def test_postmap_reads_policyd_tables(
    postfix: PostfixInstance, policyd: PolicydProcess, servers: dict[str, RemoteServer]
) -> None:
    """``postmap -q`` against policyd's socketmap tables, as an administrator would check them:
    found keys print the answer and exit 0, unknown keys exit 1; keys are case-insensitive; the
    host shared by two profiles with different passwords is not answered. The socketmap
    ``transport`` map keeps working for those who use it, and the static table gives the same
    answers for the same domains."""
    sasl = table(policyd, "sasl_passwd")
    transport = table(policyd, "transport")
    partner, partner2, corp = servers["partner"], servers["partner2"], servers["corp"]
    found = {
        (partner.nexthop, sasl): f"{PARTNER_ACCOUNT}:{PARTNER_PASSWORD}",
        (partner2.nexthop, sasl): f"{PARTNER_ACCOUNT}:{WRONG_PASSWORD}",
        (corp.nexthop, sasl): f"{NTLM_USERNAME}:{CORP_PASSWORD}",
        ("127.0.0.32", sasl): f"{NTLM_USERNAME}:{CORP_PASSWORD}",
        ("direct.example", sasl): f"direct-user:{DIRECT_PASSWORD}",
        ("DIRECT.Example", sasl): f"direct-user:{DIRECT_PASSWORD}",
        ("someone@partner.example", transport): f"policyd-cleartext:{partner.nexthop}",
        ("Someone@PARTNER.example", transport): f"policyd-cleartext:{partner.nexthop}",
        ("partner.example", transport): f"policyd-cleartext:{partner.nexthop}",
        ("someone@corp.example", transport): f"policyd-ntlm:{corp.nexthop}",
        ("someone@direct.example", transport): "policyd-cleartext:direct.example",
        ("someone@elsewhere.example", transport): f"policyd-none:{servers['default'].nexthop}",
        ("someone@legacy.example", transport): (
            f"policyd-cleartext-notls:{servers['legacy'].nexthop}"
        ),
    }
    not_found = [
        ("127.0.0.31", sasl),  # shared by partner.example and wrong.example
        ("[127.0.0.99]:25", sasl),
        ("someone@partner.example", sasl),
        ("elsewhere.example", sasl),
        (servers["default"].nexthop, sasl),
        ("someone@local.example", transport),
        ("local.example", transport),
        ("*", transport),
    ]
    # The static table Postfix actually uses has the same answers under the domain keys
    # (postmap -q asks for the exact key: no parent domains, no '*' fallback).
    static = f"hash:{policyd.transport_table}"
    found.update(
        {
            ("partner.example", static): f"policyd-cleartext:{partner.nexthop}",
            ("PARTNER.Example", static): f"policyd-cleartext:{partner.nexthop}",
            ("corp.example", static): f"policyd-ntlm:{corp.nexthop}",
            ("direct.example", static): "policyd-cleartext:direct.example",
            ("legacy.example", static): f"policyd-cleartext-notls:{servers['legacy'].nexthop}",
            ("*", static): f"policyd-none:{servers['default'].nexthop}",
            ("local.example", static): ":",
        }
    )
    not_found.append(("elsewhere.example", static))
    for (key, name), expected in found.items():
        result = postfix.postmap_query(key, name)
        assert (result.returncode, result.stdout.strip()) == (0, expected), (key, name, result)
    for key, name in not_found:
        result = postfix.postmap_query(key, name)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", ""), (
            key,
            name,
            result,
        )


def test_unknown_map_is_a_lookup_error(postfix: PostfixInstance, policyd: PolicydProcess) -> None:
    """A map name policyd does not serve is a lookup error (PERM), not "not found": postmap
    dies with "query error" (Postfix defers mail on such errors) instead of a silent exit 1."""
    result = postfix.postmap_query("partner.example", table(policyd, "no_such_map"))
    assert result.returncode != 0, result
    assert result.stdout == "", result
    assert "fatal:" in result.stderr and "query error" in result.stderr, result


def test_nothing_policyd_writes_contains_a_password(
    postfix: PostfixInstance,
    policyd: PolicydProcess,
    servers: dict[str, RemoteServer],
    e2e_dir: Path,
) -> None:
    """After serving passwords (a delivery that logs in, postmap lookups, a reload), no test
    password appears in policyd's log, its /metrics, the transport table it wrote (source
    and .db), ``explain`` or ``check-config`` output,
    or the error ``check-config`` prints for a configuration that gives one next hop two
    different accounts."""
    # Make sure the secret-serving paths ran, whichever tests ran before.
    submit(postfix, "scan@partner.example")
    servers["partner"].wait_for_message(
        "scan@partner.example", DELIVERY_TIMEOUT, poke=postfix.flush_queue
    )
    assert postfix.postmap_query(servers["corp"].nexthop, table(policyd, "sasl_passwd")).stdout
    assert policyd.process is not None
    policyd.process.send_signal(signal.SIGHUP)
    policyd.wait_for_log("reload")

    outputs: dict[str, str] = {"policyd log": policyd.log_text()}
    assert policyd.transport_table is not None
    for path in (policyd.transport_table, policyd.transport_table.with_suffix(".db")):
        outputs[f"transport table {path.name}"] = path.read_bytes().decode(errors="replace")
    assert policyd.metrics_port is not None
    with urllib.request.urlopen(
        f"http://127.0.0.1:{policyd.metrics_port}/metrics", timeout=10
    ) as response:
        outputs["metrics"] = response.read().decode()
    assert "policyd_socketmap_lookups_total" in outputs["metrics"]

    config = ["--config", str(policyd.config_path)]
    client = f"client_address={CLIENT}"
    for name, args in {
        "explain": ["explain", *config, "recipient=someone@partner.example", client],
        "explain (ntlm)": ["explain", *config, "recipient=someone@corp.example", client],
        "check-config": ["check-config", *config],
    }.items():
        result = policyd.cli(*args)
        assert result.returncode == 0, (name, result)
        outputs[name] = result.stdout + result.stderr
    assert "cleartext" in outputs["explain"], outputs["explain"]

    # A configuration error that involves two secrets: one next hop, two different accounts.
    broken = yaml.safe_load(policyd.config_path.read_text())
    broken["outbound"]["domains"]["wrong.example"]["nexthop"] = servers["partner"].nexthop
    broken_path = e2e_dir / "policyd" / "broken.yaml"
    broken_path.write_text(yaml.safe_dump(broken, sort_keys=False))
    result = policyd.cli("check-config", "--config", str(broken_path))
    assert result.returncode != 0, result
    outputs["check-config error"] = result.stdout + result.stderr

    leaks = [
        f"{secret_name} password in {where}"
        for where, text in outputs.items()
        for secret_name, password in ALL_PASSWORDS.items()
        if password in text
    ]
    assert not leaks, leaks
    # The environment secret never left the environment either.
    assert DIRECT_PASSWORD not in policyd.config_path.read_text()
    assert os.environ.get(DIRECT_ENV) is None


def test_after_a_reload_mail_goes_the_new_way(
    postfix: PostfixInstance, policyd: PolicydProcess, servers: dict[str, RemoteServer]
) -> None:
    """A reload that moves moved.example from the default (policyd-none to the default smart
    host, no AUTH) to a cleartext profile (the partner server, AUTH over STARTTLS): policyd
    rewrites the static table during the reload, every running trivial-rewrite logs "table
    hash:... has changed -- restarting", and the next mail to moved.example is delivered to
    the partner server with the partner account. The earlier mail went the old way. (Waits
    are bounded polls; nothing here measures how long the pickup takes.)"""
    original = copy.deepcopy(policyd.config)
    submit(postfix, "before@moved.example")
    message = servers["default"].wait_for_message(
        "before@moved.example", DELIVERY_TIMEOUT, poke=postfix.flush_queue
    )
    assert message.auth is None
    table_name = f"hash:{policyd.transport_table}"
    rewriters = postfix.service_pids("trivial-rewrite")
    assert rewriters, "no trivial-rewrite is running (it just resolved a recipient)"
    log_mark, maillog_mark = len(policyd.log_text()), len(postfix.maillog())

    changed = copy.deepcopy(original)
    changed["outbound"]["domains"]["moved.example"] = {
        **original["outbound"]["domains"]["partner.example"]
    }
    policyd.rewrite_config(changed)
    assert policyd.process is not None
    try:
        policyd.process.send_signal(signal.SIGHUP)
        policyd.wait_for_log("reload succeeded", timeout=DELIVERY_TIMEOUT, after=log_mark)
        written = policyd.wait_for_log("transport table", "written", after=log_mark)
        assert table_name in written, written
        assert f"moved.example policyd-cleartext:{servers['partner'].nexthop}\n" in (
            policyd.transport_table.read_text()  # type: ignore[union-attr]
        )
        for pid in rewriters:
            # Postfix 3.7 logs the table with its flags: "table hash:PATH(0,lock|...) has
            # changed -- restarting".
            postfix.wait_for_maillog(
                f"trivial-rewrite[{pid}]: table {table_name}(",
                "has changed -- restarting",
                timeout=60,
                after=maillog_mark,
            )
        recipient = "after@moved.example"
        submit(postfix, recipient)
        message = servers["partner"].wait_for_message(
            recipient, DELIVERY_TIMEOUT, poke=postfix.flush_queue
        )
        assert message.tls and message.auth is not None and message.auth.success, message
        assert message.auth.mechanism in ("PLAIN", "LOGIN"), message.auth
        assert message.auth.login == PARTNER_ACCOUNT
        line = delivered_line(postfix, recipient)
        assert "postfix/policyd-cleartext/smtp" in line, line
        assert servers["default"].messages_to(recipient) == []
        rows = [
            line
            for line in policyd.transport_table.read_text().splitlines()  # type: ignore[union-attr]
            if line and not line.startswith("#")
        ]
        metrics = policyd.scrape()
        assert f"policyd_transport_table_entries {len(rows)}.0" in metrics, metrics
        assert 'policyd_transport_table_writes_total{result="failure"} 0.0' in metrics
    finally:
        policyd.rewrite_config(original)
        mark = len(policyd.log_text())
        policyd.process.send_signal(signal.SIGHUP)
        policyd.wait_for_log("reload succeeded", timeout=DELIVERY_TIMEOUT, after=mark)
