"""Tests for policyd.networks: network-list parsing and compiled membership sets."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.networks import (
    EntryError,
    IPAddress,
    IPNetwork,
    NetworkSet,
    ServerAddressSet,
    parse_client_address,
    parse_network,
    parse_server_address,
)

net = ipaddress.ip_network
addr = ipaddress.ip_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.7", "192.0.2.7/32"),
        ("192.0.2.0/24", "192.0.2.0/24"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.7/32", "192.0.2.7/32"),
        ("  192.0.2.0/24  ", "192.0.2.0/24"),
        ("192.0.2.0 / 24", "192.0.2.0/24"),
        ("192.0.2.0, MASK=255.255.255.0", "192.0.2.0/24"),
        ("192.0.2.0,MASK=255.255.255.0", "192.0.2.0/24"),
        ("192.0.2.0 , mask = 255.255.255.0", "192.0.2.0/24"),
        ("IP=192.0.2.0, MASK=255.255.255.0", "192.0.2.0/24"),
        ("ip = 192.0.2.0, Mask=255.255.255.0", "192.0.2.0/24"),
        ("10.0.0.0, MASK=255.0.0.0", "10.0.0.0/8"),
        ("192.0.2.7, MASK=255.255.255.255", "192.0.2.7/32"),
        ("0.0.0.0, MASK=0.0.0.0", "0.0.0.0/0"),
        ("2001:db8::7", "2001:db8::7/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("::1", "::1/128"),
        ("::/0", "::/0"),
        ("2001:db8:0:0::/64", "2001:db8::/64"),
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("::ffff:192.0.2.7", "192.0.2.7/32"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
        ("::/64", "::/64"),
    ],
)
def test_parse_network_accepts(text: str, expected: str) -> None:
    """Every accepted entry form parses to the expected network; mapped IPv6 becomes IPv4."""
    assert parse_network(text) == net(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1/24", "'10.0.0.1/24' has host bits set"),
        ("2001:db8::1/32", "'2001:db8::1/32' has host bits set"),
        ("192.0.2.1, MASK=255.255.255.0", "'192.0.2.1, MASK=255.255.255.0' has host bits set"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not a network"),
        ("2001:db8::/129", "'2001:db8::/129' is not a network"),
        ("10.0.0.0/-1", "'10.0.0.0/-1' is not a network"),
        ("10.0.0.0/", "'10.0.0.0/' is not a network"),
        ("10.0.0.0/8/8", "'10.0.0.0/8/8' is not a network"),
        ("10.0.0.0/x", "'10.0.0.0/x' is not a network"),
        ("10.0.0.0/255.0.0.0", "'10.0.0.0/255.0.0.0' is not a network"),
        (
            "192.0.2.0, MASK=255.0.255.0",
            "'192.0.2.0, MASK=255.0.255.0' has a non-contiguous mask",
        ),
        (
            "192.0.2.0, MASK=0.0.0.255",
            "'192.0.2.0, MASK=0.0.0.255' has a non-contiguous mask",
        ),
        ("192.0.2.0, MASK=255.255.255", "'192.0.2.0, MASK=255.255.255' is not a network"),
        ("192.0.2.0, MASK=", "'192.0.2.0, MASK=' is not a network"),
        ("2001:db8::, MASK=255.255.255.0", "'2001:db8::, MASK=255.255.255.0' is not a network"),
        ("192.0.2.0, 255.255.255.0", "'192.0.2.0, 255.255.255.0' is not a network"),
        ("IP=192.0.2.0", "'IP=192.0.2.0' is not a network"),
        ("fe80::1%eth0", "'fe80::1%eth0' has an IPv6 zone id"),
        ("fe80::%eth0/64", "'fe80::%eth0/64' has an IPv6 zone id"),
        ("", "'' is not a network"),
        ("   ", "'   ' is not a network"),
        ("garbage", "'garbage' is not a network"),
        ("256.0.0.0/8", "'256.0.0.0/8' is not a network"),
        ("010.0.0.0/8", "'010.0.0.0/8' is not a network"),
        ("10.0.0", "'10.0.0' is not a network"),
        ("10.0.0.0 8", "'10.0.0.0 8' is not a network"),
        ("file:/etc/networks", "'file:/etc/networks' is not a network"),
        ("10.0.0.0/٨", "'10.0.0.0/٨' is not a network"),
    ],
)
def test_parse_network_rejects(text: str, message: str) -> None:
    """Malformed entries raise EntryError whose message names the entry and the problem."""
    with pytest.raises(EntryError) as caught:
        parse_network(text)
    assert str(caught.value) == message
    assert caught.value.entry == text
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8::7", "2001:db8::7"),
        ("2001:DB8::7", "2001:db8::7"),
        ("::1", "::1"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("::FFFF:c000:207", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::1"),
        ("::ffff:192.0.2.7%eth0", "192.0.2.7"),
    ],
)
def test_parse_client_address_accepts(text: str, expected: str) -> None:
    """Postfix client addresses parse; IPv4-mapped ones come back as IPv4, zone ids drop."""
    parsed = parse_client_address(text)
    assert parsed == addr(expected)
    assert parsed is not None and parsed.version == addr(expected).version


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unknown",
        "garbage",
        " 192.0.2.7",
        "192.0.2.7 ",
        "192.0.2.0/24",
        "192.0.2.256",
        "010.0.2.7",
        "192.0.2.7%eth0",
        "fe80::1%",
        "[192.0.2.7]",
        "2001:db8::7:25:",
    ],
)
def test_parse_client_address_rejects(text: str) -> None:
    """Anything that is not exactly one address gives None, never an exception."""
    assert parse_client_address(text) is None


@given(st.text())
def test_parse_client_address_never_raises(text: str) -> None:
    """parse_client_address returns an address or None for arbitrary text."""
    result = parse_client_address(text)
    assert result is None or isinstance(result, ipaddress.IPv4Address | ipaddress.IPv6Address)


def _set(*entries: str) -> NetworkSet:
    return NetworkSet(parse_network(entry) for entry in entries)


MEMBERSHIP_SET = _set(
    "192.0.2.0/24",
    "198.51.100.7",
    "10.0.0.0/8",
    "10.1.0.0/16",  # overlaps 10.0.0.0/8
    "172.16.0.0/24",
    "172.16.1.0/24",  # adjacent to the previous one
    "2001:db8::/32",
    "::1",
    "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",  # inside 2001:db8::/32 already
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.0.2.0", True),
        ("192.0.2.255", True),
        ("192.0.2.128", True),
        ("192.0.1.255", False),
        ("192.0.3.0", False),
        ("198.51.100.7", True),
        ("198.51.100.6", False),
        ("198.51.100.8", False),
        ("10.0.0.0", True),
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.0", False),
        ("9.255.255.255", False),
        ("172.16.0.255", True),
        ("172.16.1.0", True),
        ("172.16.1.255", True),
        ("172.16.2.0", False),
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("2001:db8::", True),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", True),
        ("2001:db9::", False),
        ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", False),
        ("::1", True),
        ("::2", False),
        ("::", False),
        ("::ffff:192.0.2.7", True),
        ("::ffff:10.9.9.9", True),
        ("::ffff:203.0.113.1", False),
        # The same 32-bit integer as 192.0.2.7 in the IPv6 family is a different address.
        ("::c000:207", False),
    ],
)
def test_network_set_membership(address: str, expected: bool) -> None:
    """Membership is exact at range boundaries, merges overlaps, keeps families apart."""
    assert (addr(address) in MEMBERSHIP_SET) is expected


def test_network_set_mapped_entries_match_ipv4_clients() -> None:
    """A mapped IPv6 entry given directly (not via parse_network) matches IPv4 clients."""
    networks = NetworkSet([net("::ffff:192.0.2.0/120")])
    assert addr("192.0.2.9") in networks
    assert addr("::ffff:192.0.2.9") in networks
    assert addr("192.0.3.9") not in networks


def test_network_set_ipv6_supernet_does_not_match_ipv4() -> None:
    """An IPv6 entry covering the mapped range stays IPv6: it does not match IPv4 clients."""
    networks = _set("::/0")
    assert addr("2001:db8::1") in networks
    assert addr("192.0.2.7") not in networks
    assert addr("::ffff:192.0.2.7") not in networks


def test_network_set_families_are_separate() -> None:
    """IPv4 0.0.0.0/0 matches no IPv6 address and ::/0 no IPv4 address."""
    only_v4 = _set("0.0.0.0/0")
    only_v6 = _set("::/0")
    assert addr("203.0.113.1") in only_v4
    assert addr("2001:db8::1") not in only_v4
    assert addr("::1") not in only_v4
    assert addr("2001:db8::1") in only_v6
    assert addr("203.0.113.1") not in only_v6


def test_empty_network_set() -> None:
    """An empty set is falsy, has length 0 and contains nothing."""
    empty = NetworkSet([])
    assert not empty
    assert len(empty) == 0
    assert addr("0.0.0.0") not in empty
    assert addr("::") not in empty


def test_network_set_len_counts_given_networks() -> None:
    """len() counts the networks given, including duplicates and overlaps, not merged ranges."""
    networks = _set("10.0.0.0/8", "10.0.0.0/8", "10.1.0.0/16", "::1")
    assert len(networks) == 4
    assert networks


def test_network_set_accepts_a_generator() -> None:
    """The constructor consumes any iterable once, e.g. a generator."""
    networks = NetworkSet(net(f"10.{i}.0.0/16") for i in range(3))
    assert len(networks) == 3
    assert addr("10.2.255.255") in networks
    assert addr("10.3.0.0") not in networks


@pytest.mark.parametrize("thing", [None, "192.0.2.7", 3221225991, net("192.0.2.0/24"), b"x"])
def test_network_set_non_addresses_are_not_contained(thing: object) -> None:
    """Only address objects can be members; strings, ints, networks and None are not."""
    assert thing not in _set("0.0.0.0/0", "::/0")


def _canonical(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _canonical_network(network: IPNetwork) -> IPNetwork:
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _naive_contains(networks: list[IPNetwork], address: IPAddress) -> bool:
    target = _canonical(address)
    return any(
        target.version == n.version and target in n for n in map(_canonical_network, networks)
    )


# Addresses drawn from small pools so that random networks and addresses actually collide.
_v4_int = st.one_of(
    st.integers(0, 2**32 - 1),
    st.integers(0xC0000200, 0xC00002FF),  # 192.0.2.0/24
)
_v6_int = st.one_of(
    st.integers(0, 2**128 - 1),
    st.integers(0x20010DB8 << 96, (0x20010DB8 << 96) + 2**16),
    st.integers(0xFFFF << 32, (0xFFFF << 32) + 2**32 - 1),  # IPv4-mapped
)
_addresses = st.one_of(
    _v4_int.map(ipaddress.IPv4Address),
    _v6_int.map(ipaddress.IPv6Address),
)


@st.composite
def _networks(draw: st.DrawFn) -> IPNetwork:
    if draw(st.booleans()):
        prefix = draw(st.integers(0, 32))
        return ipaddress.IPv4Network((draw(_v4_int), prefix), strict=False)
    prefix = draw(st.integers(0, 128))
    return ipaddress.IPv6Network((draw(_v6_int), prefix), strict=False)


@given(st.lists(_networks(), max_size=30), st.lists(_addresses, min_size=1, max_size=20))
def test_network_set_matches_naive_lookup(
    networks: list[IPNetwork], addresses: list[IPAddress]
) -> None:
    """NetworkSet membership equals scanning every network, for random networks and addresses."""
    compiled = NetworkSet(networks)
    for address in addresses:
        assert (address in compiled) is _naive_contains(networks, address)
    # Each network's own first and last addresses are members, except mapped addresses at
    # the edge of a pure IPv6 network (::/80 ends in ::ffff:ffff:ffff, an IPv4 client).
    for network in networks:
        for edge in (network.network_address, network.broadcast_address):
            assert (edge in compiled) is _naive_contains(networks, edge)
            if _canonical(edge) == edge:
                assert edge in compiled


def test_network_set_with_100000_networks() -> None:
    """A set of 100,000 random /24-/32 networks compiles and answers like a naive scan.

    Correctness only: speed is measured by the benchmark, not asserted here.
    """
    rng = random.Random(1234)
    networks: list[IPNetwork] = []
    for _ in range(100_000):
        prefix = rng.randint(24, 32)
        networks.append(ipaddress.IPv4Network((rng.getrandbits(32), prefix), strict=False))
    compiled = NetworkSet(networks)
    assert len(compiled) == 100_000
    for network in rng.sample(networks, 200):
        assert network.network_address in compiled
        assert network.broadcast_address in compiled
    by_24: dict[int, list[IPNetwork]] = {}
    for network in networks:
        by_24.setdefault(int(network.network_address) >> 8, []).append(network)
    for _ in range(2_000):
        probe = ipaddress.IPv4Address(rng.getrandbits(32))
        candidates = by_24.get(int(probe) >> 8, [])
        assert (probe in compiled) is any(probe in n for n in candidates)
    for network in rng.sample(networks, 200):
        # Near-miss probes right outside a network.
        for probe_int in (int(network.network_address) - 1, int(network.broadcast_address) + 1):
            if 0 <= probe_int < 2**32:
                probe = ipaddress.IPv4Address(probe_int)
                candidates = by_24.get(probe_int >> 8, [])
                assert (probe in compiled) is any(probe in n for n in candidates)


@pytest.mark.parametrize(
    ("text", "network", "port"),
    [
        ("10.0.0.25", "10.0.0.25/32", None),
        ("10.0.0.25:587", "10.0.0.25/32", 587),
        ("[10.0.0.25]", "10.0.0.25/32", None),
        ("[10.0.0.25]:587", "10.0.0.25/32", 587),
        ("10.0.0.0/24", "10.0.0.0/24", None),
        ("10.0.0.0/24:25", "10.0.0.0/24", 25),
        ("[10.0.0.0/24]:587", "10.0.0.0/24", 587),
        ("10.0.0.0, MASK=255.255.255.0", "10.0.0.0/24", None),
        ("2001:db8::25", "2001:db8::25/128", None),
        ("2001:db8::/64", "2001:db8::/64", None),
        ("[2001:db8::25]", "2001:db8::25/128", None),
        ("[2001:db8::25]:587", "2001:db8::25/128", 587),
        ("[2001:db8::/64]:587", "2001:db8::/64", 587),
        ("[::ffff:10.0.0.25]:465", "10.0.0.25/32", 465),
        ("  [10.0.0.25]:1  ", "10.0.0.25/32", 1),
        ("10.0.0.25:65535", "10.0.0.25/32", 65535),
        ("2001:db8::25:587", "2001:db8::25:587/128", None),
    ],
)
def test_parse_server_address_accepts(text: str, network: str, port: int | None) -> None:
    """Every server-address form parses to (network, port); bare IPv6 never has a port."""
    assert parse_server_address(text) == (net(network), port)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.25:0", "'10.0.0.25:0' has a port out of range (1-65535)"),
        ("10.0.0.25:65536", "'10.0.0.25:65536' has a port out of range (1-65535)"),
        ("[10.0.0.25]:99999", "'[10.0.0.25]:99999' has a port out of range (1-65535)"),
        ("10.0.0.25:", "'10.0.0.25:' is not a server address"),
        ("10.0.0.25:smtp", "'10.0.0.25:smtp' is not a server address"),
        ("10.0.0.25:-1", "'10.0.0.25:-1' is not a server address"),
        ("10.0.0.25:587:1", "'10.0.0.25:587:1' is not a server address"),
        ("[10.0.0.25", "'[10.0.0.25' is not a server address"),
        ("[10.0.0.25]587", "'[10.0.0.25]587' is not a server address"),
        ("[10.0.0.25]:", "'[10.0.0.25]:' is not a server address"),
        ("[]:587", "'[]:587' is not a server address"),
        ("[mail.example]:587", "'[mail.example]:587' is not a server address"),
        ("mail.example:587", "'mail.example:587' is not a server address"),
        ("[10.0.0.1/24]:587", "'[10.0.0.1/24]:587' has host bits set"),
        ("[10.0.0.0/33]:587", "'[10.0.0.0/33]:587' is not a server address"),
        ("[fe80::1%eth0]:25", "'[fe80::1%eth0]:25' has an IPv6 zone id"),
        ("", "'' is not a network"),
        ("garbage", "'garbage' is not a network"),
    ],
)
def test_parse_server_address_rejects(text: str, message: str) -> None:
    """Malformed server addresses raise EntryError naming the entry."""
    with pytest.raises(EntryError) as caught:
        parse_server_address(text)
    assert str(caught.value) == message


SERVER_SET = ServerAddressSet(
    parse_server_address(entry)
    for entry in ["10.0.0.25", "[10.0.1.25]:587", "192.0.2.0/24:465", "[2001:db8::25]:587"]
)


@pytest.mark.parametrize(
    ("address", "port", "expected"),
    [
        ("10.0.0.25", 25, True),
        ("10.0.0.25", 587, True),
        ("10.0.0.25", None, True),
        ("10.0.0.26", 25, False),
        ("10.0.1.25", 587, True),
        ("10.0.1.25", 25, False),
        ("10.0.1.25", None, False),
        ("192.0.2.99", 465, True),
        ("192.0.2.99", 587, False),
        ("::ffff:192.0.2.99", 465, True),
        ("2001:db8::25", 587, True),
        ("2001:db8::25", 25, False),
        ("2001:db8::26", 587, False),
        ("10.0.0.25", 0, True),
        (None, 587, False),
        (None, None, False),
    ],
)
def test_server_address_set_matches(address: str | None, port: int | None, expected: bool) -> None:
    """Port-less entries match any port; entries with a port match only that port."""
    parsed = None if address is None else parse_client_address(address)
    assert SERVER_SET.matches(parsed, port) is expected


def test_server_address_set_len_and_bool() -> None:
    """len() counts entries; an empty set is falsy and matches nothing."""
    assert len(SERVER_SET) == 4
    assert SERVER_SET
    empty = ServerAddressSet([])
    assert not empty
    assert len(empty) == 0
    assert not empty.matches(addr("10.0.0.25"), 25)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_server_address_set_rejects_bad_ports(port: int) -> None:
    """Constructing a set with a port outside 1..65535 is a ValueError."""
    with pytest.raises(ValueError, match="out of range"):
        ServerAddressSet([(net("10.0.0.25"), port)])
