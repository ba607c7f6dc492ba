"""Outbound authentication: profile selection, exact socketmap answers, validation, secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policyd.config import Config, ConfigError, parse_config
from policyd.decision import Verdict, decide
from policyd.outbound import Secret
from policyd.request import PolicyRequest

PARTNER_PW = "partner-Secret-1:with:colons"
CORP_PW = "corp-Secret-2"
DIRECT_PW = "direct-Secret-3"
SMARTHOST_PW = "smarthost-Secret-4"


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    for name, value in (
        ("partner", PARTNER_PW + "\n"),
        ("corp", CORP_PW),
        ("smarthost", SMARTHOST_PW + "\r\n"),
    ):
        path = tmp_path / name
        path.write_text(value)
        path.chmod(0o600)
    return tmp_path


def config_text(default: str = "{auth: none}") -> str:
    return f"""
listen: {{policy: "inet:127.0.0.1:10040", socketmap: "inet:127.0.0.1:10041"}}
local_domains: [local.example, .local.example]
relay: {{allow: {{client_networks: [192.0.2.0/24]}}}}
outbound:
  default: {default}
  domains:
    partner.example: {{auth: cleartext, username: relay@partner.example,
                      password_file: partner, nexthop: "[smtp.partner.example]:587"}}
    CORP.example: {{auth: ntlm, username: 'CORP\\svc-relay', password_file: corp}}
    direct.example: {{auth: cleartext, username: direct-user, password_env: POLICYD_TEST_PW}}
    insecure.example: {{auth: cleartext, username: plain-user, password_file: partner,
                       nexthop: "[10.9.9.9]:25", tls: may, allow_plaintext: true}}
    bypass.example: {{auth: none}}
    routed.example: {{auth: none, nexthop: "[gw.example]"}}
"""


@pytest.fixture
def config(secrets_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("POLICYD_TEST_PW", DIRECT_PW)
    return parse_config(config_text(), source="policyd.yaml", base_dir=secrets_dir)


@pytest.fixture
def smarthost_config(secrets_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("POLICYD_TEST_PW", DIRECT_PW)
    default = (
        "{auth: cleartext, username: site@isp.example, password_file: smarthost, "
        "nexthop: '[smtp.isp.example]:587'}"
    )
    return parse_config(config_text(default), source="policyd.yaml", base_dir=secrets_dir)


@pytest.mark.parametrize(
    ("key", "answer"),
    [
        ("someone@partner.example", "policyd-cleartext:[smtp.partner.example]:587"),
        ("partner.example", "policyd-cleartext:[smtp.partner.example]:587"),
        ("Someone@PARTNER.Example", "policyd-cleartext:[smtp.partner.example]:587"),
        ("someone@partner.example.", "policyd-cleartext:[smtp.partner.example]:587"),
        ("someone@corp.example", "policyd-ntlm:corp.example"),
        ("someone@direct.example", "policyd-cleartext:direct.example"),
        ("someone@insecure.example", "policyd-cleartext-notls:[10.9.9.9]:25"),
        ("someone@bypass.example", "policyd-none:bypass.example"),
        ("someone@routed.example", "policyd-none:[gw.example]"),
        ("someone@elsewhere.example", None),
        ("someone@sub.partner.example", None),  # overrides are exact domains
        ("someone@local.example", None),
        ("someone@mx.local.example", None),
        ("*", None),
        ("", None),
        ("postmaster", None),
    ],
)
def test_transport_answers(config: Config, key: str, answer: str | None) -> None:
    """transport map: overrides get their kind's transport and next hop; the rest NOTFOUND."""
    assert config.outbound_tables.transport(key) == answer


@pytest.mark.parametrize(
    ("key", "answer"),
    [
        ("someone@partner.example", "policyd-cleartext:[smtp.partner.example]:587"),
        ("someone@elsewhere.example", "policyd-cleartext:[smtp.isp.example]:587"),
        ("someone@bypass.example", "policyd-none:bypass.example"),
        ("someone@direct.example", "policyd-cleartext:direct.example"),
        ("someone@local.example", None),
        ("*", None),
    ],
)
def test_transport_with_smart_host_default(
    smarthost_config: Config, key: str, answer: str | None
) -> None:
    """With an authenticated smart host as default, every other remote domain goes there; an
    override without next hop (even auth none) goes to the domain itself, not the smart host."""
    assert smarthost_config.outbound_tables.transport(key) == answer


@pytest.mark.parametrize(
    ("key", "answer"),
    [
        ("[smtp.partner.example]:587", f"relay@partner.example:{PARTNER_PW}"),
        ("[SMTP.Partner.Example]:587", f"relay@partner.example:{PARTNER_PW}"),
        ("smtp.partner.example", f"relay@partner.example:{PARTNER_PW}"),
        ("corp.example", f"CORP\\svc-relay:{CORP_PW}"),
        ("CORP.EXAMPLE", f"CORP\\svc-relay:{CORP_PW}"),
        ("direct.example", f"direct-user:{DIRECT_PW}"),
        ("[10.9.9.9]:25", f"plain-user:{PARTNER_PW}"),
        ("10.9.9.9", f"plain-user:{PARTNER_PW}"),
        ("[smtp.partner.example]", None),  # not the next hop as written
        ("smtp.partner.example:587", None),
        ("partner.example", None),  # has a next hop: credentials are keyed by it
        ("gw.example", None),  # auth none
        ("bypass.example", None),
        ("someone@partner.example", None),  # sender keys: sender-dependent auth is not used
        ("elsewhere.example", None),
        ("*", None),
    ],
)
def test_sasl_passwd_answers(config: Config, key: str, answer: str | None) -> None:
    """sasl_passwd map: host name, next hop as written, or the domain without next hop."""
    assert config.outbound_tables.sasl_passwd(key) == answer


def test_smart_host_credentials(smarthost_config: Config) -> None:
    """The default's smart host is answered under its next hop and its host name."""
    tables = smarthost_config.outbound_tables
    assert tables.sasl_passwd("[smtp.isp.example]:587") == f"site@isp.example:{SMARTHOST_PW}"
    assert tables.sasl_passwd("smtp.isp.example") == f"site@isp.example:{SMARTHOST_PW}"


def test_shared_host_different_ports_answers_only_next_hops(
    secrets_dir: Path,
) -> None:
    """Two next hops on one host with different accounts: the host key is withheld (Postfix
    asks it first and would get the wrong account); each next hop key answers its own."""
    text = """
listen: {policy: "inet:127.0.0.1:10040"}
outbound:
  domains:
    a.example: {auth: cleartext, username: a, password_file: partner, nexthop: "[10.0.0.5]:587"}
    b.example: {auth: ntlm, username: 'D\\b', password_file: corp, nexthop: "[10.0.0.5]:2525"}
"""
    tables = parse_config(text, base_dir=secrets_dir).outbound_tables
    assert tables.sasl_passwd("10.0.0.5") is None
    assert tables.sasl_passwd("[10.0.0.5]:587") == f"a:{PARTNER_PW}"
    assert tables.sasl_passwd("[10.0.0.5]:2525") == f"D\\b:{CORP_PW}"


@pytest.mark.parametrize(
    ("client", "recipient", "path", "auth"),
    [
        ("192.0.2.7", "u@partner.example", "outbound.domains.partner.example", "cleartext"),
        ("192.0.2.7", "u@corp.example", "outbound.domains.CORP.example", "ntlm"),
        ("192.0.2.7", "u@elsewhere.example", "outbound.default", "none"),
        (
            "192.0.2.7",
            "u%partner.example@local.example",
            "outbound.domains.partner.example",
            "cleartext",
        ),
    ],
)
def test_allowed_relay_records_outbound_profile(
    config: Config, client: str, recipient: str, path: str, auth: str
) -> None:
    """An allowed relay decision names the outbound profile of the recipient's domain."""
    request = PolicyRequest.from_attributes(
        {"protocol_state": "RCPT", "client_address": client, "recipient": recipient}
    )
    decision = decide(config, request)
    assert decision.verdict is Verdict.ALLOWED
    assert decision.outbound is not None
    assert (decision.outbound.path, decision.outbound.auth) == (path, auth)


def test_denied_and_local_have_no_outbound(config: Config) -> None:
    """Only relays that will be delivered carry an outbound profile."""
    for client, recipient in (
        ("198.51.100.1", "u@partner.example"),
        ("192.0.2.7", "u@local.example"),
    ):
        request = PolicyRequest.from_attributes(
            {"protocol_state": "RCPT", "client_address": client, "recipient": recipient}
        )
        assert decide(config, request).outbound is None


def test_secrets_never_printed(config: Config) -> None:
    """repr/str of the configuration, its profiles and the summary never contain a password."""
    texts = [repr(config), str(config), config.summary(), repr(config.outbound)]
    texts += [profile.describe() for _, profile in config.outbound.domains]
    for text in texts:
        for password in (PARTNER_PW, CORP_PW, DIRECT_PW):
            assert password not in text
    assert "********" in repr(Secret("x"))


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("{auth: kerberos}", "outbound.domains.x.example.auth: 'kerberos' is not none"),
        ("{auth: cleartext, password_file: partner}", "username: missing"),
        ("{auth: cleartext, username: u}", "give exactly one of password_file, password_env"),
        (
            "{auth: cleartext, username: u, password_file: partner, password_env: X}",
            "give exactly one of password_file, password_env",
        ),
        ("{auth: cleartext, username: u, password_file: absent}", "cannot read"),
        ("{auth: ntlm, username: u, password_env: POLICYD_UNSET_VAR}", "is not set or empty"),
        (
            "{auth: cleartext, username: u, password_file: partner, tls: may}",
            "cleartext authentication without TLS",
        ),
        (
            "{auth: cleartext, username: u, password_file: partner, tls: none}",
            "'none' is not encrypt or may",
        ),
        (
            "{auth: ntlm, username: u, password_file: corp, tls: encrypt}",
            "only for auth: cleartext",
        ),
        ("{auth: none, username: u}", "username: not used with auth: none"),
        ("{auth: cleartext, username: 'a:b', password_file: partner}", "must not contain ':'"),
        ("{auth: none, nexthop: '[smtp.example'}", "is not a next hop"),
        ("{auth: none, nexthop: '[smtp.example]:99999'}", "port out of range"),
        ("{auth: none, colour: blue}", "outbound.domains.x.example.colour: unknown key"),
        ("{auth: cleartext, username: u, password_file: empty}", "is empty"),
    ],
)
def test_profile_validation(secrets_dir: Path, profile: str, expected: str) -> None:
    """Each bad profile is an error with the key path and line, never the password."""
    (secrets_dir / "empty").write_text("\n")
    text = (
        'listen: {policy: "inet:127.0.0.1:10040"}\n'
        f"outbound:\n  domains:\n    x.example: {profile}\n"
    )
    os.environ.pop("POLICYD_UNSET_VAR", None)
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="policyd.yaml", base_dir=secrets_dir)
    message = str(info.value)
    assert expected in message
    assert "(policyd.yaml:4)" in message
    assert PARTNER_PW not in message and CORP_PW not in message


def test_conflicting_credentials_for_one_next_hop(secrets_dir: Path) -> None:
    """Two profiles with different accounts for the same next hop are refused."""
    text = """listen: {policy: "inet:127.0.0.1:10040"}
outbound:
  domains:
    a.example: {auth: cleartext, username: a, password_file: partner, nexthop: "[mx.example]:587"}
    b.example: {auth: cleartext, username: b, password_file: partner, nexthop: "[MX.example]:587"}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="policyd.yaml", base_dir=secrets_dir)
    message = str(info.value)
    assert message.startswith("outbound.domains.b.example: next hop '[MX.example]:587'")
    assert "outbound.domains.a.example" in message
    assert "(policyd.yaml:5)" in message
    assert PARTNER_PW not in message


def test_same_credentials_for_one_next_hop_is_fine(secrets_dir: Path) -> None:
    """Two domains sharing a next hop and its account are allowed."""
    text = """listen: {policy: "inet:127.0.0.1:10040"}
outbound:
  domains:
    a.example: {auth: cleartext, username: a, password_file: partner, nexthop: "[mx.example]:587"}
    b.example: {auth: cleartext, username: a, password_file: partner, nexthop: "[mx.example]:587"}
"""
    tables = parse_config(text, base_dir=secrets_dir).outbound_tables
    assert tables.sasl_passwd("[mx.example]:587") == f"a:{PARTNER_PW}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "outbound:\n  default: {auth: cleartext, username: u, password_file: partner}\n",
            "outbound.default.nexthop: missing",
        ),
        (
            "local_domains: [local.example]\n"
            "outbound:\n  domains:\n    local.example: {auth: none}\n",
            "is a local domain",
        ),
        ("outbound:\n  domains:\n    .sub.example: {auth: none}\n", "is not a domain"),
        (
            "outbound:\n  domains:\n    a.example: {auth: none}\n    A.EXAMPLE.: {auth: none}\n",
            "same domain as outbound.domains.a.example",
        ),
    ],
)
def test_outbound_section_validation(secrets_dir: Path, text: str, expected: str) -> None:
    """Section-level outbound rules."""
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        parse_config(
            'listen: {policy: "inet:127.0.0.1:10040"}\n' + text,
            source="policyd.yaml",
            base_dir=secrets_dir,
        )


def test_world_readable_secret_is_a_warning(secrets_dir: Path) -> None:
    """A password file readable by group or others loads, with a warning naming the file."""
    (secrets_dir / "partner").chmod(0o644)
    config = parse_config(
        'listen: {policy: "inet:127.0.0.1:10040"}\noutbound:\n  domains:\n'
        "    x.example: {auth: cleartext, username: u, password_file: partner}\n",
        base_dir=secrets_dir,
    )
    assert len(config.warnings) == 1
    assert "readable by others" in config.warnings[0]
    assert "partner" in config.warnings[0]
    assert PARTNER_PW not in config.warnings[0]


@pytest.mark.parametrize(
    ("listen", "ok"),
    [
        ('socketmap: "inet:127.0.0.1:10041"', True),
        ('socketmap: "inet:127.0.0.2:10041"', True),
        ('socketmap: "inet:[::1]:10041"', True),
        ('socketmap: "unix:/run/policyd/socketmap.sock"', True),
        ('socketmap: "inet:0.0.0.0:10041"', False),
        ('socketmap: "inet:192.0.2.1:10041"', False),
        ('socketmap: "inet:192.0.2.1:10041", socketmap_allow_remote: true', True),
    ],
)
def test_socketmap_listener_loopback_only(listen: str, ok: bool) -> None:
    """The socketmap serves passwords unauthenticated: non-loopback needs an explicit yes."""
    text = f'listen: {{policy: "inet:127.0.0.1:10040", {listen}}}\n'
    if ok:
        parse_config(text)
    else:
        with pytest.raises(ConfigError, match=r"listen\.socketmap: .* is not a loopback address"):
            parse_config(text)
