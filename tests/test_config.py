"""Configuration validation: every error names the key path and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.config import ConfigError, Endpoint, load_config, parse_config

LISTEN = 'listen: {policy: "inet:127.0.0.1:10040"}\n'
EXAMPLE = Path(__file__).resolve().parent.parent / "postfix-examples" / "policyd.yaml"


def error_of(text: str, base_dir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="/etc/policyd/policyd.yaml", base_dir=base_dir)
    return str(info.value)


def test_example_configuration_is_valid() -> None:
    """The shipped example (what `make run` serves) loads, with its file: list."""
    config = load_config(EXAMPLE)
    assert config.listen.policy == Endpoint("inet", host="127.0.0.1", port=10040)
    assert config.mode == "enforce"
    assert "local-two.example" in config.local_domains
    assert config.relay.allow_authenticated
    assert config.file_lists and config.file_lists[0].endswith("local-domains.txt")


def test_minimal_configuration_defaults() -> None:
    """Only listen.policy is required; everything else defaults to relaying nothing."""
    config = parse_config(LISTEN)
    assert config.mode == "enforce"
    assert not config.relay.allow_authenticated
    assert not config.relay.allow_client_networks
    assert not config.relay.allow_server_addresses
    assert not config.local_domains
    assert config.replies.denied == "550 5.7.1 Relaying Denied"
    assert config.replies.error.startswith("451 ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("inet:127.0.0.1:10040", Endpoint("inet", host="127.0.0.1", port=10040)),
        ("inet:[::1]:10040", Endpoint("inet", host="::1", port=10040)),
        ("inet:[2001:DB8::1]:1", Endpoint("inet", host="2001:db8::1", port=1)),
        ("unix:/run/policyd/policy.sock", Endpoint("unix", path="/run/policyd/policy.sock")),
    ],
)
def test_endpoints(text: str, expected: Endpoint) -> None:
    """Postfix's endpoint notation for TCP (IPv4, IPv6) and UNIX sockets."""
    config = parse_config(f'listen: {{policy: "{text}"}}\n')
    assert config.listen.policy == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("tcp:127.0.0.1:10040", "is not inet:HOST:PORT"),
        ("inet:127.0.0.1:0", "port must be 1 to 65535"),
        ("inet:127.0.0.1:70000", "port must be 1 to 65535"),
        ("inet:::1:10040", "is not inet:HOST:PORT"),
        ("inet:localhost:10040", "is not an IP address"),
        ("unix:relative/path", "must be absolute"),
    ],
)
def test_bad_endpoints(text: str, fragment: str) -> None:
    """A bad listening address is an error naming listen.policy and the line."""
    message = error_of(f'listen:\n  policy: "{text}"\n')
    assert message.startswith("listen.policy: ")
    assert fragment in message
    assert message.endswith("(policyd.yaml:2)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            LISTEN + "relay:\n  allow:\n    client_networks:\n      - 10.0.0.0/8\n"
            "      - 192.0.2.0/24\n      - 10.0.0.0/33\n",
            "relay.allow.client_networks[2]: '10.0.0.0/33' is not a network (policyd.yaml:7)",
        ),
        (
            LISTEN + "relay:\n  allow:\n    client_netwroks: [10.0.0.0/8]\n",
            "relay.allow.client_netwroks: unknown key",
        ),
        (LISTEN + "relais: {}\n", "relais: unknown key"),
        (LISTEN + "mode: enforcing\n", "mode: must be enforce or warn"),
        (
            LISTEN + "relay:\n  allow:\n    authenticated: 'yes please'\n",
            "relay.allow.authenticated: expected true or false",
        ),
        (LISTEN + "local_domains: example.com\n", "local_domains: expected a list"),
        (LISTEN + "local_domains: [exa mple.com]\n", "local_domains[0]: "),
        (LISTEN + "relay:\n  never:\n    client_networks: [10.0.0.1/8]\n", "host bits"),
        (
            LISTEN + "relay:\n  allow:\n    client_networks: ['192.0.2.0, MASK=255.0.255.0']\n",
            "non-contiguous",
        ),
        (
            LISTEN + "relay:\n  allow:\n    server_addresses: ['10.0.0.25:99999']\n",
            "relay.allow.server_addresses[0]: ",
        ),
        (LISTEN + "replies: {denied: OK}\n", "replies.denied: 'OK' is not a rejection"),
        (LISTEN + "replies: {denied: '550'}\n", "is not a rejection"),
        (LISTEN + "replies: {error: 'DUNNO'}\n", "replies.error: 'DUNNO' is not a temporary"),
        (LISTEN + "replies: {error: '550 5.7.1 no'}\n", "is not a temporary failure"),
        (LISTEN + "replies: {allowed: DUNNO}\n", "replies.allowed: 'DUNNO' is not a permit"),
        (LISTEN + "replies: {local: OK}\nreplies: {local: OK}\n", "replies: duplicate key"),
        (LISTEN + "limits: {max_attributes: 5}\n", "limits.max_attributes: must be between"),
        (LISTEN + "limits: {max_line_bytes: 2048.5}\n", "must be a whole number"),
        (LISTEN + "limits: {max_connections: 0}\n", "limits.max_connections: must be between"),
        (LISTEN + "limits: {listen_backlog: 70000}\n", "limits.listen_backlog: must be between"),
        (LISTEN + "limits: {listen_backlog: 1.5}\n", "must be a whole number"),
        ("mode: enforce\n", "listen: missing"),
        ("listen: {}\n", "listen.policy: missing"),
        ("", "the configuration is empty"),
        ("listen: [\n", "YAML syntax error"),
        ("- a\n- b\n", "(top level): expected a mapping"),
        (
            LISTEN + "outbound:\n  default: {auth: kerberos}\n",
            "outbound.default.auth: 'kerberos' is not none, cleartext or ntlm",
        ),
        (
            LISTEN + "outbound:\n  domains:\n    partner.example: {auth: cleartext}\n",
            "outbound.domains.partner.example.username: missing",
        ),
    ],
)
def test_errors_name_key_path_and_line(text: str, expected: str) -> None:
    """Each mistake is a ConfigError whose message names the key path (and the line)."""
    message = error_of(text)
    assert expected in message
    assert "policyd.yaml" in message


def test_file_list_entries(tmp_path: Path) -> None:
    """file: lists are read relative to the config, with comments; errors name file and line."""
    (tmp_path / "nets").write_text("# inside\n10.0.0.0/8   # lan\n\n192.0.2.0/24\n")
    config = parse_config(
        LISTEN + "relay:\n  allow:\n    client_networks: ['file:nets']\n", base_dir=tmp_path
    )
    assert len(config.relay.allow_client_networks) == 2
    (tmp_path / "nets").write_text("10.0.0.0/8\n\n10.0.0.0/33\n")
    message = error_of(
        LISTEN + "relay:\n  allow:\n    client_networks: ['file:nets']\n", base_dir=tmp_path
    )
    assert message == (
        f"relay.allow.client_networks[0]: '10.0.0.0/33' is not a network ({tmp_path}/nets:3)"
    )


def test_missing_file_list(tmp_path: Path) -> None:
    """A file: list that cannot be read is an error naming the entry and the file."""
    message = error_of(LISTEN + "local_domains: ['file:/nonexistent/domains']\n")
    assert message.startswith("local_domains[0]: cannot read /nonexistent/domains")


def test_unreadable_config_file(tmp_path: Path) -> None:
    """load_config on a missing file says so."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_never_sasl_usernames_casefolded() -> None:
    """The never-list of SASL names is stored case-folded."""
    config = parse_config(LISTEN + "relay: {never: {sasl_usernames: [Bob@Example.COM]}}\n")
    assert config.relay.never_sasl_usernames == frozenset({"bob@example.com"})


def test_control_socket_must_be_a_unix_socket() -> None:
    listen = 'listen: {policy: "inet:127.0.0.1:10040", control: "CONTROL"}\n'
    config = parse_config(listen.replace("CONTROL", "unix:/run/policyd/control.sock"))
    assert config.listen.control == Endpoint("unix", path="/run/policyd/control.sock")
    with pytest.raises(ConfigError, match=r"listen\.control: .* must be a unix:/path socket"):
        parse_config(listen.replace("CONTROL", "inet:127.0.0.1:10042"))
