"""Decision tables: every rule of PRODUCT.md §1, every address form, every relay trick."""

from __future__ import annotations

import pytest

from policyd.config import Config, parse_config
from policyd.decision import Decision, Rule, Verdict, decide
from policyd.request import PolicyRequest

CONFIG = """
listen: {policy: "inet:127.0.0.1:10040"}
local_domains: [local.example, .sub.local.example, "[192.0.2.25]", "[IPv6:2001:db8::25]",
                bücher.example]
relay:
  allow:
    authenticated: true
    client_networks: [192.0.2.0/24, "2001:db8:1::/48", "203.0.113.0, MASK=255.255.255.128"]
    server_addresses: [10.0.0.25, "10.0.0.26:587", "[2001:db8::25]:587"]
  never:
    client_networks: [192.0.2.128/25, "2001:db8:1:ffff::/64"]
    sasl_usernames: [Mallory@local.example]
"""

OUTSIDE_V4 = "198.51.100.7"
OUTSIDE_V6 = "2001:db8:99::7"
ALLOWED_V4 = "192.0.2.7"
ALLOWED_V6 = "2001:db8:1::7"
NEVER_V4 = "192.0.2.200"  # inside an allowed network and a never network: never wins
NEVER_V6 = "2001:db8:1:ffff::7"


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(CONFIG, source="test.yaml")


def request(**attributes: str) -> PolicyRequest:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT"}
    base.update(attributes)
    return PolicyRequest.from_attributes(base)


def check(config: Config, expected: tuple[Verdict, Rule], **attributes: str) -> Decision:
    decision = decide(config, request(**attributes))
    assert (decision.verdict, decision.rule) == expected, attributes
    return decision


LOCAL = (Verdict.LOCAL, Rule.LOCAL_DOMAINS)
DEFAULT = (Verdict.DENIED, Rule.DEFAULT)
BY_NETWORK = (Verdict.ALLOWED, Rule.ALLOW_CLIENT_NETWORKS)
BY_AUTH = (Verdict.ALLOWED, Rule.ALLOW_AUTHENTICATED)
BY_SERVER = (Verdict.ALLOWED, Rule.ALLOW_SERVER_ADDRESSES)
NEVER_NET = (Verdict.DENIED, Rule.NEVER_CLIENT_NETWORKS)
NEVER_USER = (Verdict.DENIED, Rule.NEVER_SASL_USERNAMES)

LOCAL_RECIPIENTS = [
    "user@local.example",
    "USER@LOCAL.EXAMPLE",
    "user@local.example.",
    'a"b@local.example',  # Postfix's internal form of "a\"b"@local.example
    "@local.example",  # and of ""@local.example (MAILER-DAEMON)
    "user@a.sub.local.example",
    "user@[192.0.2.25]",
    "user@[IPv6:2001:db8::25]",
    "user@bücher.example",
    "user@BÜCHER.example",
    "user@xn--bcher-kva.example",
    "user%local.example@local.example",
    "local.example!user",
    "local.example!user@local.example",
    "postmaster",
]

RELAY_RECIPIENTS = [
    "user@remote.example",
    "<user@local.example>",  # Postfix never sends brackets: not a valid domain
    "user@local\u3002example",  # UTS #46 would map the full stop; Postfix does not
    "user@sub.local.example",  # ".sub.local.example" covers subdomains only
    "user@other.local.example",  # no entry covers it
    "user%remote.example@local.example",
    "remote.example!user@local.example",
    '"user@remote.example"@local.example',
    "user@remote.example@local.example",
    "@local.example:user@remote.example",
    "user@[192.0.2.1]",
    "user@local.example.remote.example",
    "remote.example!user",
    "user%remote.example",
    "user@",
    "",
]


@pytest.mark.parametrize("recipient", LOCAL_RECIPIENTS)
@pytest.mark.parametrize("client", [OUTSIDE_V4, OUTSIDE_V6, NEVER_V4, ALLOWED_V4])
def test_local_recipient_is_not_relaying(config: Config, recipient: str, client: str) -> None:
    """Mail to a local domain is not relaying, from any client (never-listed ones too)."""
    decision = check(config, LOCAL, client_address=client, recipient=recipient)
    assert decision.action == "DUNNO"


@pytest.mark.parametrize("recipient", RELAY_RECIPIENTS)
@pytest.mark.parametrize("client", [OUTSIDE_V4, OUTSIDE_V6, "::ffff:198.51.100.7"])
def test_relay_attempt_from_outside_is_denied(config: Config, recipient: str, client: str) -> None:
    """Every relay attempt, each relay trick included, from an unallowed client is denied."""
    decision = check(config, DEFAULT, client_address=client, recipient=recipient)
    assert decision.action == "550 5.7.1 Relaying Denied"


@pytest.mark.parametrize("recipient", RELAY_RECIPIENTS)
@pytest.mark.parametrize("client", [ALLOWED_V4, ALLOWED_V6, "::ffff:192.0.2.7", "203.0.113.5"])
def test_relay_attempt_from_allowed_network(config: Config, recipient: str, client: str) -> None:
    """An allowed network relays anything, including trick addresses (IPv4-mapped too)."""
    decision = check(config, BY_NETWORK, client_address=client, recipient=recipient)
    assert decision.action == "OK"


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("203.0.113.127", BY_NETWORK),  # last address of the MASK= network
        ("203.0.113.128", DEFAULT),  # first address past it
        ("192.0.2.127", BY_NETWORK),
        ("192.0.2.128", NEVER_NET),
        ("192.0.2.255", NEVER_NET),
        (NEVER_V6, NEVER_NET),
        ("::ffff:192.0.2.200", NEVER_NET),
        ("unknown", DEFAULT),
        ("", DEFAULT),
        ("not-an-address", DEFAULT),
    ],
)
def test_client_network_boundaries(
    config: Config, client: str, expected: tuple[Verdict, Rule]
) -> None:
    """Network edges decide exactly; an unparseable client address matches no allow list."""
    check(config, expected, client_address=client, recipient="user@remote.example")


@pytest.mark.parametrize(
    ("client", "login", "expected"),
    [
        (OUTSIDE_V4, "alice@local.example", BY_AUTH),
        (OUTSIDE_V6, "alice@local.example", BY_AUTH),
        (NEVER_V4, "alice@local.example", NEVER_NET),
        (NEVER_V6, "alice@local.example", NEVER_NET),
        (OUTSIDE_V4, "mallory@local.example", NEVER_USER),
        (OUTSIDE_V4, "MALLORY@LOCAL.EXAMPLE", NEVER_USER),
        (ALLOWED_V4, "mallory@local.example", NEVER_USER),
        (OUTSIDE_V4, "", DEFAULT),
    ],
)
def test_authenticated_and_never_lists(
    config: Config, client: str, login: str, expected: tuple[Verdict, Rule]
) -> None:
    """SMTP AUTH allows relaying, but both never-lists win over it and over allowed networks."""
    check(
        config,
        expected,
        client_address=client,
        sasl_username=login,
        recipient="user@remote.example",
    )


@pytest.mark.parametrize(
    ("server_address", "server_port", "expected"),
    [
        ("10.0.0.25", "25", BY_SERVER),
        ("10.0.0.25", "587", BY_SERVER),
        ("10.0.0.26", "587", BY_SERVER),
        ("10.0.0.26", "25", DEFAULT),
        ("2001:db8::25", "587", BY_SERVER),
        ("2001:db8::25", "25", DEFAULT),
        ("10.0.0.27", "587", DEFAULT),
        ("", "", DEFAULT),  # Postfix before 3.2 sends no server_address: the rule cannot match
        ("10.0.0.26", "", DEFAULT),
    ],
)
def test_server_addresses(
    config: Config, server_address: str, server_port: str, expected: tuple[Verdict, Rule]
) -> None:
    """A client on an allowed listener (address, optionally port) relays; others do not."""
    attributes = {"client_address": OUTSIDE_V4, "recipient": "user@remote.example"}
    if server_address:
        attributes["server_address"] = server_address
    if server_port:
        attributes["server_port"] = server_port
    check(config, expected, **attributes)


def test_never_network_beats_server_address(config: Config) -> None:
    """A never-listed client is denied even on an allowed listener."""
    check(
        config,
        NEVER_NET,
        client_address=NEVER_V4,
        server_address="10.0.0.25",
        server_port="25",
        recipient="user@remote.example",
    )


@pytest.mark.parametrize(
    "state", ["CONNECT", "EHLO", "HELO", "MAIL", "DATA", "END-OF-MESSAGE", "ETRN", ""]
)
def test_other_states_are_skipped(config: Config, state: str) -> None:
    """Only RCPT and VRFY are relay decisions; everything else gets DUNNO, rule protocol_state."""
    decision = check(
        config,
        (Verdict.SKIPPED, Rule.PROTOCOL_STATE),
        protocol_state=state,
        client_address=OUTSIDE_V4,
        recipient="user@remote.example",
    )
    assert decision.action == "DUNNO"


@pytest.mark.parametrize("state", ["VRFY", "vrfy", "RCPT"])
def test_vrfy_is_a_relay_decision(config: Config, state: str) -> None:
    """VRFY is judged like RCPT."""
    check(config, DEFAULT, protocol_state=state, client_address=OUTSIDE_V4, recipient="u@remote.ex")


def test_null_sender_gets_no_exemption(config: Config) -> None:
    """A bounce (empty sender) relays only on the same terms as any other mail."""
    check(config, DEFAULT, client_address=OUTSIDE_V4, sender="", recipient="user@remote.example")


def test_nothing_relays_by_default() -> None:
    """With only a listener configured, authenticated clients and loopback are denied too."""
    config = parse_config('listen: {policy: "inet:127.0.0.1:10040"}')
    for attributes in (
        {"client_address": "127.0.0.1"},
        {"client_address": "::1"},
        {"client_address": "192.0.2.7", "sasl_username": "alice"},
        {"client_address": "192.0.2.7", "server_address": "127.0.0.1", "server_port": "25"},
    ):
        check(config, DEFAULT, recipient="user@remote.example", **attributes)


def test_warn_mode_replies_warn_but_counts_denial() -> None:
    """mode: warn keeps the verdict and rule of a denial but answers WARN."""
    config = parse_config(CONFIG + "mode: warn\n")
    decision = check(config, DEFAULT, client_address=OUTSIDE_V4, recipient="user@remote.example")
    assert decision.action.startswith("WARN ")
    assert "550 5.7.1 Relaying Denied" in decision.action
    assert decision.warn_only
    allowed = check(config, BY_NETWORK, client_address=ALLOWED_V4, recipient="u@remote.example")
    assert allowed.action == "OK"


def test_custom_replies() -> None:
    """replies.* set the actions sent for each verdict."""
    config = parse_config(
        CONFIG
        + "replies: {denied: '554 5.7.1 No relaying here', allowed: OK, local: DUNNO,"
        + " error: '450 4.3.0 try later'}\n"
    )
    decision = check(config, DEFAULT, client_address=OUTSIDE_V4, recipient="user@remote.example")
    assert decision.action == "554 5.7.1 No relaying here"


def test_decision_names_destination(config: Config) -> None:
    """The decision records the hop that made the recipient a relay attempt."""
    decision = check(
        config, DEFAULT, client_address=OUTSIDE_V4, recipient="user%remote.example@local.example"
    )
    assert decision.destination == "remote.example"
