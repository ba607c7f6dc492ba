"""Benchmark inputs: the large and small configurations and a realistic Postfix request mix.

Everything is generated from a seeded random generator, so two runs with the same seed measure
the same configuration and the same requests. Address ranges are kept apart on purpose:

* the large configuration's allowed client networks never touch 127.0.0.0/8, 198.0.0.0/8 or
  the IPv6 documentation prefix 2001:db8::/32 (the small one allows 127.0.0.0/8, for Postfix);
* "outside" clients (inbound mail, relay attempts) come from 198.18.0.0/15 and 2001:db8::/32;
* the never-list holds single addresses picked inside allowed networks (so "never wins over
  allow" is exercised) plus a few networks in 198.19.0.0/16.

The category a request was built for is only a label: the expected reply of every request is
computed by policyd's own ``decide()`` on the same configuration (see ``expected_reply``), and
the benchmarks check what they receive against it.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Postfix 3.7 policy request attributes (SMTPD_POLICY_README), in the order smtpd sends them.
ATTRIBUTE_NAMES = (
    "request",
    "protocol_state",
    "protocol_name",
    "helo_name",
    "queue_id",
    "sender",
    "recipient",
    "recipient_count",
    "client_address",
    "client_name",
    "reverse_client_name",
    "instance",
    "sasl_method",
    "sasl_username",
    "sasl_sender",
    "size",
    "ccert_subject",
    "ccert_issuer",
    "ccert_fingerprint",
    "encryption_protocol",
    "encryption_cipher",
    "encryption_keysize",
    "etrn_domain",
    "stress",
    "ccert_pubkey_fingerprint",
    "client_port",
    "policy_context",
    "server_address",
    "server_port",
)

# The request mix of the socket benchmark: (category, share). Mostly inbound mail to local
# domains, a fifth relayed for inside networks or authenticated users, about one in eight
# refused (and therefore logged by policyd).
LOAD_MIX = (
    ("local_exact", 41),
    ("local_subdomain", 25),
    ("allowed_network_v4", 14),
    ("allowed_network_v6", 3),
    ("allowed_authenticated", 5),
    ("denied_default", 10),
    ("denied_never", 2),
)

# What each category must be decided as: (verdict, rule), as policyd names them.
EXPECTED = {
    "local_exact": ("local", "local_domains"),
    "local_subdomain": ("local", "local_domains"),
    "allowed_network_v4": ("allowed", "relay.allow.client_networks"),
    "allowed_network_v6": ("allowed", "relay.allow.client_networks"),
    "allowed_authenticated": ("allowed", "relay.allow.authenticated"),
    "denied_default": ("denied", "relay.default"),
    "denied_never": ("denied", "relay.never.client_networks"),
    "skipped": ("skipped", "protocol_state"),
}

_OUTSIDE_V4 = ipaddress.IPv4Network("198.18.0.0/15")
_OUTSIDE_V6 = ipaddress.IPv6Network("2001:db8::/32")
_NEVER_EXTRA_V4 = "198.19.{}.0/24"

# Prefix lengths of generated IPv4 networks, with weights: a few /16s, many /24s and hosts.
_V4_PREFIXES = ((16, 2), (18, 2), (20, 4), (22, 6), (23, 4), (24, 30), (26, 6), (28, 6), (32, 40))
_V6_PREFIXES = ((32, 5), (40, 5), (48, 30), (56, 20), (64, 25), (128, 15))

_WORDS = (
    "acme",
    "mail",
    "corp",
    "shop",
    "bank",
    "north",
    "south",
    "media",
    "cloud",
    "farm",
    "lab",
    "dev",
    "city",
    "news",
    "team",
)
_TLDS = ("example", "example.com", "example.net", "example.org", "test")
_USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")


@dataclass
class Lists:
    """The entries of one configuration, as written to its files, plus what requests need."""

    allow_networks: list[str] = field(default_factory=list)
    never_networks: list[str] = field(default_factory=list)
    exact_domains: list[str] = field(default_factory=list)
    parent_domains: list[str] = field(default_factory=list)
    # Parsed allow networks, for picking a client address inside one.
    allow_parsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    # Addresses put into the never-list from inside allowed networks.
    never_hosts: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Configurations


def _weighted(rng: random.Random, table: tuple[tuple[int, int], ...]) -> int:
    values = [value for value, _ in table]
    weights = [weight for _, weight in table]
    return rng.choices(values, weights)[0]


def _random_v4_network(rng: random.Random) -> ipaddress.IPv4Network:
    while True:
        first = rng.randint(1, 223)
        if first not in (10, 127, 198):
            break
    value = (first << 24) | rng.getrandbits(24)
    prefix = _weighted(rng, _V4_PREFIXES)
    value &= ~((1 << (32 - prefix)) - 1) & 0xFFFFFFFF
    return ipaddress.IPv4Network((value, prefix))


def _random_v6_network(rng: random.Random) -> ipaddress.IPv6Network:
    top = rng.randint(0x2400, 0x2FFF)  # inside 2000::/3, far from 2001:db8::/32
    value = (top << 112) | rng.getrandbits(112)
    prefix = _weighted(rng, _V6_PREFIXES)
    value &= ~((1 << (128 - prefix)) - 1) & ((1 << 128) - 1)
    return ipaddress.IPv6Network((value, prefix))


def _entry_text(rng: random.Random, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """How an administrator might have written the network: CIDR, a bare host, or a mask."""
    if network.prefixlen == network.max_prefixlen and rng.random() < 0.7:
        return str(network.network_address)
    if network.version == 4 and rng.random() < 0.02:
        return f"{network.network_address}, MASK={network.netmask}"
    return str(network)


def _host_in(rng: random.Random, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    host_bits = network.max_prefixlen - network.prefixlen
    offset = rng.getrandbits(host_bits) if host_bits else 0
    return str(network.network_address + offset)


def large_lists(seed: int, networks: int, domains: int, v6_share: float = 0.1) -> Lists:
    """``networks`` allow networks (mixed IPv4 /16-/32, some IPv6), ``domains`` local domains
    (about two thirds exact, one third ``.parent``), and a never-list."""
    rng = random.Random(seed)
    lists = Lists()
    seen: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    while len(lists.allow_parsed) < networks:
        net: ipaddress.IPv4Network | ipaddress.IPv6Network
        net = _random_v6_network(rng) if rng.random() < v6_share else _random_v4_network(rng)
        if net in seen:
            continue
        seen.add(net)
        lists.allow_parsed.append(net)
        lists.allow_networks.append(_entry_text(rng, net))
    # Never: 200 single hosts inside allowed networks, and 20 outside networks.
    for net in rng.sample(lists.allow_parsed, 200):
        host = _host_in(rng, net)
        lists.never_hosts.append(host)
        lists.never_networks.append(host)
    lists.never_networks += [_NEVER_EXTRA_V4.format(i) for i in range(200, 220)]

    names: set[str] = set()
    while len(names) < domains:
        names.add(f"{rng.choice(_WORDS)}-{rng.randrange(10**6)}.{rng.choice(_TLDS)}")
    ordered = sorted(names)
    rng.shuffle(ordered)
    cut = (domains * 2) // 3
    lists.exact_domains = ordered[:cut]
    lists.parent_domains = ordered[cut:]
    return lists


def small_lists() -> Lists:
    """A handful of entries, as a small site would have.

    ``bench/responder.py`` and ``server.POSTFWD_RULES`` hard-code the same rules: keep them in
    step (the benchmark and the smoke test check every reply of both against ``decide()``).
    """
    allow = [
        "127.0.0.0/8",  # the Postfix pipeline's clients
        "192.0.2.0/24",
        "172.16.0.0/12",
        "100.64.0.0/16",
        "203.0.113.7",
        "2001:db9:1::/48",
    ]
    lists = Lists(
        allow_networks=allow,
        never_networks=["172.16.9.9", "198.19.200.0/24"],
        exact_domains=["local.example", "corp.example", "shop.example"],
        parent_domains=["local.example", "corp.example"],
        allow_parsed=[ipaddress.ip_network(entry) for entry in allow],
        never_hosts=["172.16.9.9"],
    )
    return lists


def write_config(
    directory: Path,
    name: str,
    lists: Lists,
    port: int,
    *,
    extra_networks: tuple[str, ...] = (),
    extra_domains: tuple[str, ...] = (),
    socketmap_port: int | None = None,
) -> Path:
    """Write ``NAME.yaml`` and its ``file:`` lists into ``directory``; return the YAML path.

    ``extra_networks``/``extra_domains`` are added inline in the YAML, before the files;
    ``socketmap_port`` adds ``listen.socketmap`` on 127.0.0.1.
    """
    directory.mkdir(parents=True, exist_ok=True)
    networks_file = directory / f"{name}-client-networks.txt"
    domains_file = directory / f"{name}-local-domains.txt"
    never_file = directory / f"{name}-never-networks.txt"
    networks_file.write_text(
        "# allowed client networks (generated by bench/workload.py)\n"
        + "\n".join(lists.allow_networks)
        + "\n"
    )
    domains_file.write_text(
        "# local domains (generated by bench/workload.py)\n"
        + "\n".join(lists.exact_domains)
        + "\n"
        + "\n".join(f".{domain}" for domain in lists.parent_domains)
        + "\n"
    )
    never_file.write_text("\n".join(lists.never_networks) + "\n")
    config = directory / f"{name}.yaml"
    extra_domain_lines = "".join(f'\n  - "{entry}"' for entry in extra_domains)
    extra_network_lines = "".join(f'\n      - "{entry}"' for entry in extra_networks)
    socketmap_line = (
        f"\n  socketmap: inet:127.0.0.1:{socketmap_port}" if socketmap_port is not None else ""
    )
    config.write_text(
        f"""# policyd benchmark configuration '{name}' (generated by bench/workload.py)
listen:
  policy: inet:127.0.0.1:{port}{socketmap_line}
mode: enforce
local_domains:{extra_domain_lines}
  - "file:{domains_file.name}"
relay:
  allow:
    authenticated: true
    client_networks:{extra_network_lines}
      - "file:{networks_file.name}"
    server_addresses:
      - 10.0.0.25
      - "[2001:db8:25::25]:587"
  never:
    client_networks:
      - "file:{never_file.name}"
    sasl_usernames: [compromised@local.example]
replies:
  denied: "550 5.7.1 Relaying Denied"
  allowed: OK
  local: DUNNO
  error: "451 4.3.0 Relay policy temporarily unavailable"
"""
    )
    return config


# --------------------------------------------------------------------------------------------
# Requests


class RequestFactory:
    """Builds Postfix-like policy requests (29 attributes) of a given category."""

    def __init__(self, lists: Lists, seed: int) -> None:
        self.lists = lists
        self.rng = random.Random(seed)
        self._counter = 0
        self._by_version = {
            version: [n for n in lists.allow_parsed if n.version == version] for version in (4, 6)
        }
        self._builders: dict[str, Callable[[], tuple[str, str, str]]] = {
            "local_exact": self._local_exact,
            "local_subdomain": self._local_subdomain,
            "allowed_network_v4": lambda: self._allowed_network(4),
            "allowed_network_v6": lambda: self._allowed_network(6),
            "allowed_authenticated": self._authenticated,
            "denied_default": self._denied_default,
            "denied_never": self._denied_never,
            "skipped": self._skipped,
        }

    # -- parts ---------------------------------------------------------------------------

    def _outside_client(self) -> str:
        rng = self.rng
        if rng.random() < 0.1:
            return str(_OUTSIDE_V6.network_address + rng.getrandbits(96))
        return str(_OUTSIDE_V4.network_address + rng.getrandbits(17))

    def _user(self) -> str:
        rng = self.rng
        return f"{rng.choice(_USERS)}.{rng.choice(_USERS)}{rng.randrange(100)}"

    def _remote_recipient(self) -> str:
        rng = self.rng
        return f"{self._user()}@remote-{rng.randrange(10**5)}.{rng.choice(('com', 'net', 'org'))}"

    def _local_domain(self, domain: str) -> str:
        # Recipients arrive in any letter case; a few do.
        return domain.upper() if self.rng.random() < 0.03 else domain

    # -- categories: each returns (client_address, recipient, sasl_username) --------------

    def _local_exact(self) -> tuple[str, str, str]:
        domain = self.rng.choice(self.lists.exact_domains)
        return self._outside_client(), f"{self._user()}@{self._local_domain(domain)}", ""

    def _local_subdomain(self) -> tuple[str, str, str]:
        rng = self.rng
        parent = rng.choice(self.lists.parent_domains)
        host = rng.choice(("mail", "mx1", "eu.sales", "hq", "dept.north"))
        return self._outside_client(), f"{self._user()}@{host}.{self._local_domain(parent)}", ""

    def _allowed_network(self, version: int) -> tuple[str, str, str]:
        rng = self.rng
        network = rng.choice(self._by_version[version])
        client = _host_in(rng, network)
        if client in self.lists.never_hosts:
            client = str(network.network_address)
        return client, self._remote_recipient(), ""

    def _authenticated(self) -> tuple[str, str, str]:
        login = f"{self._user()}@local.example"
        return self._outside_client(), self._remote_recipient(), login

    def _denied_default(self) -> tuple[str, str, str]:
        return self._outside_client(), self._remote_recipient(), ""

    def _denied_never(self) -> tuple[str, str, str]:
        rng = self.rng
        if rng.random() < 0.8:
            client = rng.choice(self.lists.never_hosts)
        else:
            client = f"198.19.{200 + rng.randrange(2)}.{rng.randrange(1, 255)}"
        return client, self._remote_recipient(), ""

    def _skipped(self) -> tuple[str, str, str]:
        return self._denied_default()

    # -- requests ------------------------------------------------------------------------

    def attributes(self, category: str) -> dict[str, str]:
        """One request of ``category`` as Postfix 3.7 would send it (all 29 attributes)."""
        rng = self.rng
        client, recipient, login = self._builders[category]()
        self._counter += 1
        tls = rng.random() < 0.6
        known_name = rng.random() < 0.7
        client_name = f"host-{rng.randrange(10**6)}.isp.example" if known_name else "unknown"
        values = {
            "request": "smtpd_access_policy",
            "protocol_state": "END-OF-MESSAGE" if category == "skipped" else "RCPT",
            "protocol_name": "ESMTP",
            "helo_name": f"mail{rng.randrange(1000)}.sender.example",
            "queue_id": f"{rng.getrandbits(40):010X}",
            "sender": f"{self._user()}@sender-{rng.randrange(1000)}.example",
            "recipient": recipient,
            "recipient_count": "0",
            "client_address": client,
            "client_name": client_name,
            "reverse_client_name": client_name,
            "instance": f"{rng.getrandbits(16):x}.{rng.getrandbits(32):08x}.{self._counter:x}.0",
            "sasl_method": "PLAIN" if login else "",
            "sasl_username": login,
            "sasl_sender": "",
            "size": str(rng.randrange(1000, 200000)),
            "ccert_subject": "",
            "ccert_issuer": "",
            "ccert_fingerprint": "",
            "encryption_protocol": "TLSv1.3" if tls else "",
            "encryption_cipher": "TLS_AES_256_GCM_SHA384" if tls else "",
            "encryption_keysize": "256" if tls else "0",
            "etrn_domain": "",
            "stress": "",
            "ccert_pubkey_fingerprint": "",
            "client_port": str(rng.randrange(1024, 65536)),
            "policy_context": "",
            "server_address": "192.0.2.25" if ":" not in client else "2001:db8:25::1",
            "server_port": "25",
        }
        assert tuple(values) == ATTRIBUTE_NAMES
        return values

    def mixed(self, count: int) -> list[tuple[str, dict[str, str]]]:
        """``count`` requests drawn from LOAD_MIX, as (category, attributes)."""
        categories = [name for name, _ in LOAD_MIX]
        weights = [share for _, share in LOAD_MIX]
        return [
            (category, self.attributes(category))
            for category in self.rng.choices(categories, weights, k=count)
        ]


def encode(attributes: dict[str, str]) -> bytes:
    """The request as it goes over the wire: ``name=value`` lines and an empty line."""
    return "".join(f"{name}={value}\n" for name, value in attributes.items()).encode() + b"\n"
