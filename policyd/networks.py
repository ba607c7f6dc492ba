"""Network lists: parsing configuration entries and compiled membership sets.

Everything here is pure: strings in, frozen lookup structures out. A list is compiled once,
when the configuration is loaded, into sorted disjoint integer intervals per address family;
a lookup is then one bisection, O(log n) in the number of intervals.

IPv4-mapped IPv6 addresses (``::ffff:192.0.2.7``) are IPv4 clients talking through a
dual-stack socket, so they are treated as the IPv4 address they carry, both as entries and as
looked-up addresses. An IPv6 entry that merely contains the mapped range (``::/0``,
``::/64``) stays a pure IPv6 entry: it does not match IPv4 clients, mapped or not.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import re
from collections.abc import Iterable

__all__ = [
    "EntryError",
    "IPAddress",
    "IPNetwork",
    "NetworkSet",
    "ServerAddressSet",
    "parse_client_address",
    "parse_network",
    "parse_server_address",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_IPV4_ALL_ONES = (1 << 32) - 1

# "192.0.2.0, MASK=255.255.255.0" and "IP=192.0.2.0, MASK=255.255.255.0" (the form some
# Windows mail servers export); keywords in any case, whitespace around every part.
_MASK_FORM = re.compile(
    r"(?:IP\s*=\s*)?(?P<address>[^,=]*?)\s*,\s*MASK\s*=\s*(?P<mask>.*?)",
    re.IGNORECASE | re.DOTALL,
)
_PREFIX = re.compile(r"[0-9]{1,3}")
_PORT = re.compile(r"[0-9]{1,5}")


class EntryError(ValueError):
    """A list entry that does not parse.

    ``str(err)`` is an operator-readable message that names the entry as written, for
    example ``'10.0.0.0/33' is not a network``, ``'10.0.0.1/24' has host bits set`` or
    ``'192.0.2.0, MASK=255.0.255.0' has a non-contiguous mask``. ``entry`` is the entry as
    given and ``problem`` the message without the entry.
    """

    def __init__(self, entry: str, problem: str) -> None:
        super().__init__(f"{entry!r} {problem}")
        self.entry = entry
        self.problem = problem


def _parse_address(text: str) -> IPAddress | None:
    """Parse a bare IPv4 or IPv6 address without zone id; None when it is not one."""
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _unmap_network(network: IPNetwork) -> IPNetwork:
    """Return the IPv4 network an IPv4-mapped IPv6 network stands for, else ``network``."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _make_network(entry: str, address: IPAddress, prefix: int) -> IPNetwork:
    """Build ``address/prefix``, refusing host bits; ``entry`` names it in errors."""
    value = int(address)
    if value & ((1 << (address.max_prefixlen - prefix)) - 1):
        raise EntryError(entry, "has host bits set")
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv4Network((value, prefix))
    return _unmap_network(ipaddress.IPv6Network((value, prefix)))


def _parse_cidr(entry: str, text: str, kind: str) -> IPNetwork:
    """Parse ``address`` or ``address/prefix``; errors name ``entry`` and say it is not ``kind``."""
    address_text, slash, prefix_text = text.partition("/")
    address_text = address_text.strip()
    if "%" in address_text and ":" in address_text:
        raise EntryError(entry, "has an IPv6 zone id")
    address = _parse_address(address_text)
    if address is None:
        raise EntryError(entry, f"is not {kind}")
    if not slash:
        return _make_network(entry, address, address.max_prefixlen)
    prefix_text = prefix_text.strip()
    if _PREFIX.fullmatch(prefix_text) is None:
        raise EntryError(entry, f"is not {kind}")
    prefix = int(prefix_text)
    if prefix > address.max_prefixlen:
        raise EntryError(entry, f"is not {kind}")
    return _make_network(entry, address, prefix)


def _parse_mask_form(entry: str, address_text: str, mask_text: str) -> IPNetwork:
    """Parse the legacy ``ADDRESS, MASK=DOTTED-MASK`` form (IPv4 only)."""
    address = _parse_address(address_text)
    mask = _parse_address(mask_text.strip())
    if not isinstance(address, ipaddress.IPv4Address) or not isinstance(
        mask, ipaddress.IPv4Address
    ):
        raise EntryError(entry, "is not a network")
    inverse = int(mask) ^ _IPV4_ALL_ONES
    # A contiguous mask is ones followed by zeros: its inverse is 2**k - 1.
    if inverse & (inverse + 1):
        raise EntryError(entry, "has a non-contiguous mask")
    return _make_network(entry, address, 32 - inverse.bit_length())


def parse_network(text: str) -> IPNetwork:
    """Parse one network-list entry.

    Accepted forms: an address (``192.0.2.7``, ``2001:db8::7``; a /32 or /128 network),
    CIDR (``192.0.2.0/24``, ``2001:db8::/32``) and the legacy IPv4 mask form
    (``192.0.2.0, MASK=255.255.255.0``, optionally with a leading ``IP=``). Whitespace around
    the entry and around its parts is ignored; the keywords are case-insensitive. An
    IPv4-mapped IPv6 entry with a prefix of at least 96 (``::ffff:192.0.2.0/120``) is
    returned as the IPv4 network it stands for (``192.0.2.0/24``).

    Raises EntryError, naming the entry, for host bits set, a non-contiguous mask, a prefix
    out of range, an IPv6 zone id, an empty string and anything else malformed.
    """
    stripped = text.strip()
    mask_form = _MASK_FORM.fullmatch(stripped)
    if mask_form is not None:
        return _parse_mask_form(text, mask_form["address"], mask_form["mask"])
    return _parse_cidr(text, stripped, "a network")


@functools.lru_cache(maxsize=8192)
def parse_client_address(text: str) -> IPAddress | None:
    """Parse Postfix's ``client_address`` or ``server_address`` value.

    Cached: the same clients and the same server addresses come back for every recipient.

    Returns the IPv4 or IPv6 address, or None for anything that is not exactly one (empty,
    ``unknown``, surrounding whitespace, garbage). An IPv4-mapped IPv6 address
    (``::ffff:192.0.2.7``) is returned as the IPv4 address it carries, so that it matches
    IPv4 entries. An IPv6 zone id (``fe80::1%eth0``) is dropped: the address is matched
    without it.
    """
    address_text, percent, zone = text.partition("%")
    if percent and (not zone or ":" not in address_text):
        return None
    address = _parse_address(address_text)
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
    return address


def _merge(intervals: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Merge (first, last) intervals into sorted, disjoint, non-adjacent ones.

    Returns the list of first addresses and the list of last addresses, index-aligned.
    """
    intervals.sort()
    starts: list[int] = []
    ends: list[int] = []
    last = -2
    for start, end in intervals:
        if start <= last + 1:
            if end > last:
                last = ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)
            last = end
    return starts, ends


def _in_intervals(starts: list[int], ends: list[int], value: int) -> bool:
    """Whether ``value`` lies in one of the merged intervals."""
    index = bisect.bisect_right(starts, value) - 1
    return index >= 0 and value <= ends[index]


class NetworkSet:
    """Compiled, immutable set of IPv4 and IPv6 networks.

    Construction merges the networks into sorted disjoint integer intervals per address
    family, in O(n log n); membership is one bisection, O(log n). IPv4-mapped IPv6 networks
    and addresses are treated as the IPv4 networks and addresses they carry. ``len()`` is the
    number of networks given, before merging.
    """

    __slots__ = ("_count", "_v4_ends", "_v4_starts", "_v6_ends", "_v6_starts")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        """Compile ``networks``; the iterable is consumed once."""
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        count = 0
        for network in networks:
            count += 1
            if isinstance(network, ipaddress.IPv6Network):
                network = _unmap_network(network)
            first = int(network.network_address)
            # The last address sets every host bit; shifts beat building broadcast_address.
            if network.version == 4:
                v4.append((first, first | ((1 << (32 - network.prefixlen)) - 1)))
            else:
                v6.append((first, first | ((1 << (128 - network.prefixlen)) - 1)))
        self._count = count
        self._v4_starts, self._v4_ends = _merge(v4)
        self._v6_starts, self._v6_ends = _merge(v6)

    def __contains__(self, address: object) -> bool:
        """Whether ``address`` lies in one of the networks.

        ``address`` is an IPv4Address or IPv6Address; an IPv4-mapped IPv6 address matches
        the IPv4 networks. Anything else (None, strings, networks) is never contained.
        """
        if type(address) is ipaddress.IPv4Address:  # the common case, first and inline
            value = int(address)
            index = bisect.bisect_right(self._v4_starts, value) - 1
            return index >= 0 and value <= self._v4_ends[index]
        if isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is None:
                return _in_intervals(self._v6_starts, self._v6_ends, int(address))
            address = mapped
        if isinstance(address, ipaddress.IPv4Address):
            return _in_intervals(self._v4_starts, self._v4_ends, int(address))
        return False

    def __len__(self) -> int:
        """Number of networks given to the constructor, before merging."""
        return self._count

    def __bool__(self) -> bool:
        """True when at least one network was given."""
        return self._count > 0

    def __repr__(self) -> str:
        return (
            f"<NetworkSet {self._count} networks, {len(self._v4_starts)} IPv4 and"
            f" {len(self._v6_starts)} IPv6 ranges>"
        )


def _parse_port(entry: str, text: str) -> int:
    """Parse a TCP port 1..65535; errors name ``entry``."""
    if _PORT.fullmatch(text) is None:
        raise EntryError(entry, "is not a server address")
    port = int(text)
    if not 1 <= port <= 65535:
        raise EntryError(entry, "has a port out of range (1-65535)")
    return port


def parse_server_address(text: str) -> tuple[IPNetwork, int | None]:
    """Parse one ``relay.allow.server_addresses`` entry into (network, port or None).

    Accepted forms: an address or network (``10.0.0.25``, ``10.0.0.0/24``, ``2001:db8::25``,
    ``2001:db8::/64``, the legacy mask form), an IPv4 address or network with a port
    (``10.0.0.25:587``, ``10.0.0.0/24:587``), and any address or network in brackets, with or
    without a port (``[10.0.0.25]:587``, ``[2001:db8::25]:587``, ``[2001:db8::/64]:587``,
    ``[2001:db8::25]``). An unbracketed IPv6 entry never has a port: ``2001:db8::25:587`` is
    the address ``2001:db8::25:587``. Ports are 1..65535.

    Raises EntryError, naming the entry, for anything malformed.
    """
    stripped = text.strip()
    kind = "a server address"
    if stripped.startswith("["):
        close = stripped.find("]")
        if close < 0:
            raise EntryError(text, f"is not {kind}")
        network = _parse_cidr(text, stripped[1:close], kind)
        rest = stripped[close + 1 :]
        if not rest:
            return network, None
        if not rest.startswith(":"):
            raise EntryError(text, f"is not {kind}")
        return network, _parse_port(text, rest[1:])
    if stripped.count(":") == 1:
        host, _, port_text = stripped.partition(":")
        network = _parse_cidr(text, host, kind)
        if network.version != 4:
            raise EntryError(text, f"is not {kind}")
        return network, _parse_port(text, port_text)
    if ":" in stripped:
        return _parse_cidr(text, stripped, kind), None
    return parse_network(text), None


class ServerAddressSet:
    """Compiled, immutable set of (network, optional port) server-address entries.

    An entry without a port matches any port; an entry with a port matches only that port.
    ``len()`` is the number of entries given.
    """

    __slots__ = ("_any_port", "_by_port", "_count")

    def __init__(self, entries: Iterable[tuple[IPNetwork, int | None]]) -> None:
        """Compile ``entries``; raises ValueError for a port outside 1..65535."""
        any_port: list[IPNetwork] = []
        by_port: dict[int, list[IPNetwork]] = {}
        count = 0
        for network, port in entries:
            count += 1
            if port is None:
                any_port.append(network)
            elif 1 <= port <= 65535:
                by_port.setdefault(port, []).append(network)
            else:
                raise ValueError(f"port {port} is out of range (1-65535)")
        self._count = count
        self._any_port = NetworkSet(any_port)
        self._by_port = {port: NetworkSet(networks) for port, networks in by_port.items()}

    def matches(self, address: IPAddress | None, port: int | None) -> bool:
        """Whether a connection to ``address``:``port`` matches an entry.

        True when ``address`` is in the network of an entry without a port, or in the network
        of an entry whose port equals ``port``. ``address`` None never matches; ``port`` None
        matches only entries without a port.
        """
        if address is None:
            return False
        if address in self._any_port:
            return True
        if port is None:
            return False
        networks = self._by_port.get(port)
        return networks is not None and address in networks

    def __len__(self) -> int:
        """Number of entries given to the constructor."""
        return self._count

    def __bool__(self) -> bool:
        """True when at least one entry was given."""
        return self._count > 0

    def __repr__(self) -> str:
        return f"<ServerAddressSet {self._count} entries>"
