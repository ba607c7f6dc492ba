"""The e2e remote SMTP servers (tests/e2e/smtp_servers.py) refuse what they must refuse.

The outbound end-to-end tests conclude "Postfix logged in correctly" from these servers
accepting mail; that is only meaningful if the servers reject a wrong password, a wrong NTLM
account or domain, AUTH outside TLS, and mail without AUTH. Driven with smtplib and a small
NTLM client built from tests/e2e/ntlm.py; no Postfix involved.
"""

from __future__ import annotations

import base64
import secrets
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import ntlm
from .smtp_servers import NtlmAccount, RemoteServer, make_self_signed_cert

pytestmark = pytest.mark.e2e

ACCOUNT = "user@partner.example"
PASSWORD = secrets.token_urlsafe(12)
NTLM_PASSWORD = secrets.token_urlsafe(12)


@pytest.fixture(scope="module")
def cleartext_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    cert = make_self_signed_cert(Path(tmp_path_factory.mktemp("tls")), "test.remote")
    server = RemoteServer.cleartext(
        "cleartext", "127.0.0.41", accounts={ACCOUNT: PASSWORD}, tls_cert=cert
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ntlm_server() -> Iterator[RemoteServer]:
    server = RemoteServer.ntlm(
        "ntlm", "127.0.0.42", account=NtlmAccount("CORP", "svc-relay", NTLM_PASSWORD)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _tls_client(server: RemoteServer) -> smtplib.SMTP:
    client = smtplib.SMTP(server.host, server.port, timeout=10)
    client.ehlo("client.test")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo("client.test")
    return client


def test_cleartext_server_requires_starttls_before_auth(cleartext_server: RemoteServer) -> None:
    """Before STARTTLS the server announces no AUTH and refuses AUTH and MAIL."""
    with smtplib.SMTP(cleartext_server.host, cleartext_server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0a\0b").decode())[0] == 530
        assert client.mail("a@b.example")[0] == 530


def test_cleartext_server_checks_the_password(cleartext_server: RemoteServer) -> None:
    """Inside TLS: a wrong password gets 535 and no mail is accepted; the right one logs in
    and the message is recorded with its login, mechanism and TLS state."""
    with _tls_client(cleartext_server) as client:
        assert client.esmtp_features["auth"].split() == ["NTLM", "PLAIN", "LOGIN"]
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(ACCOUNT, PASSWORD + "x")
        assert client.mail("a@b.example")[0] == 530
    with _tls_client(cleartext_server) as client:
        client.login(ACCOUNT, PASSWORD)
        client.sendmail("a@b.example", ["to@partner.example"], b"Subject: x\r\n\r\nhi\r\n")
    message = cleartext_server.messages_to("to@partner.example")[0]
    assert message.tls and message.auth is not None
    assert (message.auth.login, message.auth.success) == (ACCOUNT, True)
    assert message.auth.mechanism in ("PLAIN", "LOGIN")
    # smtplib tries PLAIN, then LOGIN with the wrong password: all refused; then one success.
    outcomes = [a.success for a in cleartext_server.auth_attempts]
    assert outcomes[-1] and not any(outcomes[:-1]) and len(outcomes) >= 2, outcomes


def _ntlm_login(server: RemoteServer, user: str, domain: str, password: str, v2: bool) -> int:
    """AUTH NTLM with our own client; returns the final reply code."""
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.test")
        negotiate = ntlm.build_negotiate(
            ntlm.NEGOTIATE_UNICODE | ntlm.NEGOTIATE_OEM | ntlm.REQUEST_TARGET | ntlm.NEGOTIATE_NTLM
        )
        code, reply = client.docmd("AUTH", "NTLM " + base64.b64encode(negotiate).decode())
        assert code == 334, (code, reply)
        challenge_message = base64.b64decode(reply)
        challenge = challenge_message[24:32]
        if v2:
            key = ntlm.ntowf_v2(password, user, domain)
            blob = bytes.fromhex("0101000000000000") + bytes(8) + secrets.token_bytes(8)
            nt_response = ntlm.ntlmv2_proof(key, challenge, blob) + blob
        else:
            nt_response = ntlm.ntlmv1_response(password, challenge)
        authenticate = ntlm.build_authenticate(
            ntlm.NEGOTIATE_UNICODE | ntlm.NEGOTIATE_NTLM,
            user=user,
            domain=domain,
            nt_response=nt_response,
        )
        code, _ = client.docmd(base64.b64encode(authenticate).decode())
        return code


@pytest.mark.parametrize("v2", [False, True], ids=["NTLMv1", "NTLMv2"])
def test_ntlm_server_accepts_only_the_account(ntlm_server: RemoteServer, v2: bool) -> None:
    """The NTLM server logs in CORP\\svc-relay (as "svc-relay" with domain CORP, or as the
    down-level "CORP\\svc-relay") with the right password, NTLMv1 or NTLMv2, and refuses a
    wrong password, another user, another domain, and a user field whose DOMAIN disagrees
    with the domain field."""
    good = NTLM_PASSWORD
    accepted = [("svc-relay", "CORP", good), ("CORP\\svc-relay", "CORP", good)]
    refused = [
        ("svc-relay", "CORP", good + "x"),
        ("other", "CORP", good),
        ("svc-relay", "OTHERDOM", good),
        ("CORP\\svc-relay", "OTHERDOM", good),
    ]
    for user, domain, password in accepted:
        assert _ntlm_login(ntlm_server, user, domain, password, v2) == 235, (user, domain)
        attempt = ntlm_server.auth_attempts[-1]
        assert attempt.ntlm is not None
        assert attempt.ntlm.response_kind == ("NTLMv2" if v2 else "NTLMv1")
    for user, domain, password in refused:
        assert _ntlm_login(ntlm_server, user, domain, password, v2) == 535, (user, domain)
        assert not ntlm_server.auth_attempts[-1].success


def test_ntlm_server_refuses_mail_without_auth(ntlm_server: RemoteServer) -> None:
    """Without a successful AUTH, MAIL gets 530 and nothing is recorded as received."""
    with smtplib.SMTP(ntlm_server.host, ntlm_server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@b.example")[0] == 530
    assert ntlm_server.messages == []


def test_plain_server_takes_mail_without_auth(tmp_path: Path) -> None:
    """The default smart host announces no AUTH and accepts mail from anyone."""
    server = RemoteServer.plain("plain", "127.0.0.43")
    server.start()
    try:
        with smtplib.SMTP(server.host, server.port, timeout=10) as client:
            client.ehlo("client.test")
            assert not client.has_extn("auth")
            client.sendmail("a@b.example", ["x@y.example"], b"Subject: x\r\n\r\nhi\r\n")
        assert server.messages_to("x@y.example")[0].auth is None
    finally:
        server.stop()
