"""Recipient domains: normalization, the local-domain set and the destination of an address.

The question answered here is "is mail to this recipient local, or a relay attempt?", judged
the way a mail router would read the address, so that the classic relay tricks (percent hack,
bang paths, quoted or doubled ``@``, source routes, unlisted address literals) are relay
attempts and never local mail. Wherever the reading is uncertain the answer is "not local":
policyd may be stricter than Postfix's ``reject_unauth_destination``, never looser.

Addresses are read in Postfix's *internal* form, the form Postfix sends in the policy
``recipient`` attribute: quoting is already removed (``"a b"@x`` arrives as ``a b@x``,
``"a\\"b"@x`` as ``a"b@x``, ``"user@remote"@x`` as ``user@remote@x``), so quotes and
backslashes are ordinary characters of a local part, as they are to Postfix's resolver.

Pure functions over strings; no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

import idna

__all__ = [
    "Destination",
    "DomainError",
    "DomainSet",
    "normalize_domain",
    "resolve_destination",
    "unicode_form",
]

# Longer input cannot be a domain (253 octets), even with characters that IDNA mapping drops;
# refusing it early bounds the work done on hostile input.
_MAX_INPUT_LENGTH = 1024
_MAX_DOMAIN_LENGTH = 253
# Letters, digits, hyphen and underscore, no hyphen at either end of a label: host names plus
# the underscore labels real DNS names carry (_dmarc, SRV names). Digits-only labels pass too.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_ASCII_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}", re.ASCII)
_IPV6_TAG = "ipv6:"

# How many domains an address may route through before it counts as unresolvable.
_MAX_HOPS = 10
# RFC 5321 caps a path at 256 octets; anything far longer is garbage, not mail to resolve.
_MAX_ADDRESS_LENGTH = 4096
# Domains per generation of a DomainSet's destination memo (two generations: at most 16,384
# domains, about 4 MiB even for domains of 64 characters).
_MAX_MEMO_DOMAINS = 8192
# Characters that route in a local part: an address without them (and with one "@") is plain.
_ROUTING = re.compile(r"[%!]")


class DomainError(ValueError):
    """A domain or domain-list entry that does not normalize.

    ``str(err)`` names the entry as written, for example ``'exa mple.com' is not a domain``.
    ``entry`` is the entry as given and ``problem`` the message without it.
    """

    def __init__(self, entry: str, problem: str = "is not a domain") -> None:
        super().__init__(f"{entry!r} {problem}")
        self.entry = entry
        self.problem = problem


def _normalize_literal(literal: str, entry: str) -> str:
    """Canonicalize an address literal ``[...]`` (trailing dot already removed)."""
    if len(literal) < 3 or not literal.endswith("]"):
        raise DomainError(entry, "is not an address literal")
    inner = literal[1:-1]
    tagged = inner[: len(_IPV6_TAG)].lower() == _IPV6_TAG
    if tagged:
        inner = inner[len(_IPV6_TAG) :]
    # ipaddress accepts IPv6 zone ids ("fe80::1%eth0"); a literal may not carry one.
    if "%" not in inner:
        try:
            address = ipaddress.ip_address(inner)
        except ValueError:
            pass
        else:
            if address.version == 6:
                return f"[{_IPV6_TAG}{address.compressed}]"
            if not tagged:
                return f"[{address.compressed}]"
    raise DomainError(entry, "is not an address literal")


def _to_ascii(domain: str, entry: str) -> str:
    """Map a Unicode domain to lowercase A-labels (UTS #46, non-transitional).

    Only letter case may differ: a domain that UTS #46 would change in any other way
    (fullwidth letters, the ideographic and fullwidth full stops, compatibility forms) is
    refused. Postfix compares domains as written, folding only case, so "local", U+3002,
    "example" is not its ``local.example``; matching it here would make policyd call local
    what Postfix delivers elsewhere (found by the differential tests).
    """
    try:
        mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False)
    except ValueError as err:
        raise DomainError(entry) from err
    if mapped != domain.lower():
        raise DomainError(entry)
    labels: list[str] = []
    for label in mapped.split("."):
        if label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(idna.alabel(label).decode("ascii"))
        except ValueError as err:
            raise DomainError(entry) from err
    return ".".join(labels)


def _normalize(text: str, entry: str) -> str:
    """normalize_domain with errors naming ``entry``."""
    if len(text) > _MAX_INPUT_LENGTH:
        raise DomainError(entry)
    domain = text.removesuffix(".")
    if domain.startswith("["):
        return _normalize_literal(domain, entry)
    domain = domain.lower() if domain.isascii() else _to_ascii(domain, entry)
    if len(domain) > _MAX_DOMAIN_LENGTH or _ASCII_DOMAIN.fullmatch(domain) is None:
        raise DomainError(entry)
    return domain


def normalize_domain(text: str) -> str:
    """Return the canonical form of a domain or address literal, for matching.

    - One trailing dot is removed (``example.com.`` is ``example.com``; ``example.com..`` is
      an error).
    - Letters are lowercased; a Unicode domain, in any letter case, becomes its IDNA A-label
      form by UTS #46 non-transitional mapping (``BÜCHER.example`` and
      ``xn--bcher-kva.example`` both normalize to ``xn--bcher-kva.example``). A-labels given
      in ASCII are only lowercased. A domain the mapping would change in any other way than
      case (fullwidth letters, the full stops U+3002, U+FF0E, U+FF61) is refused: Postfix
      does not take it for the same domain.
    - Labels are 1..63 characters of letters, digits, ``-`` and ``_``, not starting or
      ending with ``-`` (digits-only labels and underscores occur in real DNS names); the
      whole name is at most 253 characters.
    - Address literals become ``[192.0.2.25]`` and ``[ipv6:2001:db8::25]``: the ``IPv6:``
      tag is lowercased and the address is written in compressed lowercase form.
      ``[2001:db8::25]`` without the tag is accepted as the same IPv6 literal (as Postfix
      does). Zone ids, and the ``IPv6:`` tag on an IPv4 address, are refused.

    The result is a fixed point: normalizing it again returns it unchanged. Raises
    DomainError, naming ``text``, for anything else (empty, spaces, bad literals, labels
    IDNA refuses).
    """
    return _normalize(text, text)


def unicode_form(domain: str) -> str | None:
    """The U-label spelling of a domain in normalize_domain's form, or None.

    Every ``xn--`` label becomes its Unicode form (``xn--bcher-kva.example`` ->
    ``bücher.example``). None when nothing changes (no A-label, an address literal), when an
    A-label does not decode, or when the Unicode form is not its own case fold: a table whose
    keys are case-folded (Postfix folds ``ß`` to ``ss``) would then also match another,
    ASCII domain (``strasse.example``), so no such key may be written.
    """
    if domain.startswith("[") or "xn--" not in domain:
        return None
    labels: list[str] = []
    for label in domain.split("."):
        if label.startswith("xn--"):
            try:
                label = idna.ulabel(label)
            except (ValueError, UnicodeError):
                return None
        labels.append(label)
    result = ".".join(labels)
    if result.casefold() != result:
        return None
    return result


class DomainSet:
    """Compiled, immutable set of local domains.

    Entries are ``example.com`` (exactly that domain, not its subdomains), ``.example.com``
    (its subdomains at any depth, not ``example.com`` itself) and address literals
    (``[192.0.2.25]``, ``[IPv6:2001:db8::25]``), each normalized by normalize_domain. A
    lookup costs one set probe per label of the looked-up domain. ``len()`` is the number of
    entries given.
    """

    __slots__ = ("_count", "_destinations", "_exact", "_older_destinations", "_parents")

    def __init__(self, entries: Iterable[str]) -> None:
        """Compile ``entries``; raises DomainError naming the first bad entry."""
        exact: set[str] = set()
        parents: set[str] = set()
        count = 0
        for entry in entries:
            count += 1
            if entry.startswith("."):
                parent = entry[1:]
                if parent.startswith(("[", ".")):
                    raise DomainError(entry)
                parents.add(_normalize(parent, entry))
            else:
                exact.add(_normalize(entry, entry))
        self._count = count
        self._exact = frozenset(exact)
        self._parents = frozenset(parents)
        # Destinations of plain ``local@domain`` recipients, by the raw domain: the domains
        # seen since the memo last filled up, and those seen in the generation before.
        self._destinations: dict[str, Destination] = {}
        self._older_destinations: dict[str, Destination] = {}

    def contains_normalized(self, domain: str) -> bool:
        """Membership of a domain already in normalize_domain's form."""
        if domain in self._exact:
            return True
        if not self._parents or domain.startswith("["):
            return False
        dot = domain.find(".")
        while dot >= 0:
            if domain[dot + 1 :] in self._parents:
                return True
            dot = domain.find(".", dot + 1)
        return False

    def __contains__(self, domain: object) -> bool:
        """Whether the raw recipient domain ``domain`` is local.

        ``domain`` is taken as it appears in an address: any letter case, an optional
        trailing dot, Unicode or A-labels, or an address literal. Anything that does not
        normalize, and anything that is not a string, is not contained; this never raises.
        """
        if not isinstance(domain, str):
            return False
        try:
            normalized = normalize_domain(domain)
        except DomainError:
            return False
        return self.contains_normalized(normalized)

    def destination_of_domain(self, raw: str) -> Destination:
        """Where a recipient ``local@raw`` goes whose local part routes nowhere else.

        The answer depends only on ``raw``: memoized in two generations of at most
        _MAX_MEMO_DOMAINS domains each. When the current one is full it becomes the older
        one and the oldest is dropped; a domain found in the older one moves to the current
        one. So the domains in steady use stay (there is no cliff at the bound), and a flood
        of unique domains cannot grow the memo.
        """
        known = self._destinations.get(raw)
        if known is None:
            known = self._older_destinations.get(raw)
            if known is None:
                known = self.check_domain(raw, "address")
            if len(self._destinations) >= _MAX_MEMO_DOMAINS:
                self._older_destinations = self._destinations
                self._destinations = {}
            self._destinations[raw] = known
        return known

    def check_domain(self, raw: str, route: str) -> Destination:
        """Where the raw domain ``raw`` leads, reached by ``route``.

        ``route`` names the kind of routing that led to the domain, for the reason text:
        ``address`` for the domain of the address as given, else a route such as
        ``percent-hack route``. A local domain gives a local Destination whose ``domain`` is
        the normalized domain.
        """
        where = "" if route == "address" else f" in {route}"
        if not raw:
            return _unresolved(f"empty domain{where}")
        try:
            domain = normalize_domain(raw)
        except DomainError:
            return _unresolved(f"invalid domain{where}")
        if self.contains_normalized(domain):
            return _local(domain)
        if route == "address":
            if domain.startswith("["):
                return Destination(False, domain, "address literal not listed")
            return Destination(False, domain, "remote domain")
        preposition = "via" if route == "source route" else "to"
        return Destination(False, domain, f"{route} {preposition} {domain}")

    @property
    def exact(self) -> frozenset[str]:
        """The exact entries (domains and address literals), in normalize_domain's form."""
        return self._exact

    @property
    def parents(self) -> frozenset[str]:
        """The ``.parent`` entries, without their leading dot, in normalize_domain's form."""
        return self._parents

    def __len__(self) -> int:
        """Number of entries given to the constructor."""
        return self._count

    def __bool__(self) -> bool:
        """True when at least one entry was given."""
        return self._count > 0

    def __repr__(self) -> str:
        return f"<DomainSet {self._count} entries>"


class Destination(NamedTuple):
    """Where a recipient address leads (a named tuple: cheap to build, immutable).

    ``local`` is True when mail to the recipient is not relaying. ``domain`` is the hop that
    decided, in normalize_domain's form: the first non-local hop of a relay attempt, the
    (last) local domain of local mail, and None for a bare local part or an address whose
    destination cannot be determined (which is never local). ``reason`` is short
    operator-readable text such as ``local domain``, ``bare local part``,
    ``percent-hack route to remote.example`` or ``unparseable address``.
    """

    local: bool
    domain: str | None
    reason: str


def _local(domain: str) -> Destination:
    """Mail to a local domain."""
    return Destination(True, domain, "local domain")


def _unresolved(reason: str) -> Destination:
    """A destination that cannot be determined: a relay attempt to nowhere in particular."""
    return Destination(local=False, domain=None, reason=reason)


def _split_source_route(address: str) -> tuple[list[str], str] | None:
    """Split ``@hop1,@hop2:rest`` into (["hop1", "hop2"], "rest"), or None if malformed.

    The separating colon is the first one outside ``[...]``, so IPv6 literal hops
    (``@[IPv6:2001:db8::1]:user@example.com``) stay whole.
    """
    depth = 0
    for index, char in enumerate(address):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        elif char == ":" and depth == 0:
            hops: list[str] = []
            for hop in address[:index].split(","):
                if not hop.startswith("@"):
                    return None
                hops.append(hop[1:])
            return hops, address[index + 1 :]
    return None


class _Router:
    """Follows every reading of one address through the local domains (one call's state)."""

    def __init__(self, local_domains: DomainSet) -> None:
        self._local_domains = local_domains
        self._memo: dict[tuple[str, int, str | None], Destination] = {}

    def _hop(self, raw: str, hops: int, route: str, rest: str) -> Destination:
        """Route through the hop ``raw``; if it is local, resolve ``rest`` there."""
        checked = self._local_domains.check_domain(raw, route)
        if not checked.local:
            return checked
        if not rest:
            return _unresolved("empty local part")
        return self.resolve(rest, hops + 1, checked.domain)

    def resolve(self, address: str, hops: int, via: str | None) -> Destination:
        """Destination of ``address``, reached after ``hops`` local hops.

        ``via`` is the last local domain passed, None when nothing routed yet.
        """
        key = (address, hops, via)
        known = self._memo.get(key)
        if known is None:
            known = self._memo[key] = self._resolve(address, hops, via)
        return known

    def _resolve(self, address: str, hops: int, via: str | None) -> Destination:
        if hops >= _MAX_HOPS:
            return _unresolved("too many routing hops")
        if not address:
            return _unresolved("empty address")
        if address.startswith("@") and ":" in address:
            return self._source_route(address, hops, via)
        local_part, at, domain = address.rpartition("@")
        if at:
            if not local_part:
                if via is None:
                    return self._empty_local_part(domain)
                return _unresolved("empty local part")
            route = "address" if via is None else "sender-specified route"
            return self._hop(domain, hops, route, local_part)
        # No "@" left: the local part of a local domain, or a bare address. A router may
        # still read "site!user" (leftmost "!") or "user%site" (rightmost "%") as a route;
        # every applicable reading must stay local for the address to be local.
        first_local: Destination | None = None
        bang = address.find("!")
        if bang >= 0:
            result = self._hop(address[:bang], hops, "bang-path route", address[bang + 1 :])
            if not result.local:
                return result
            first_local = result
        percent = address.rfind("%")
        if percent >= 0:
            result = self._hop(
                address[percent + 1 :], hops, "percent-hack route", address[:percent]
            )
            if not result.local:
                return result
            first_local = first_local or result
        if first_local is not None:
            return first_local
        if via is None:
            return Destination(True, None, "bare local part")
        return _local(via)

    def _empty_local_part(self, raw: str) -> Destination:
        """``@domain``: what Postfix makes of ``""@domain`` (its internal form).

        Postfix delivers an empty local part to MAILER-DAEMON at that domain: local mail when
        the domain is local, a relay attempt to it otherwise.
        """
        checked = self._local_domains.check_domain(raw, "address")
        if not checked.local:
            return checked
        return Destination(True, checked.domain, "empty local part (MAILER-DAEMON)")

    def _source_route(self, address: str, hops: int, via: str | None) -> Destination:
        """``@hop1,@hop2:rest``: every hop and the rest must be local.

        Postfix ignores the route and judges only the rest; a router honouring the route
        would send the mail to ``hop1``. policyd requires both to be local (stricter).
        """
        split = _split_source_route(address)
        if split is None:
            return _unresolved("unparseable source route")
        route_hops, rest = split
        for raw in route_hops:
            if hops >= _MAX_HOPS:
                return _unresolved("too many routing hops")
            checked = self._local_domains.check_domain(raw, "source route")
            if not checked.local:
                return checked
            via = checked.domain
            hops += 1
        return self.resolve(rest, hops, via)


def resolve_destination(recipient: str, local_domains: DomainSet) -> Destination:
    """Judge where mail to ``recipient`` goes, as Postfix's resolver would read the address.

    ``recipient`` is in Postfix's internal form (the policy ``recipient`` attribute): no
    quoting, no angle brackets. It is read as follows:

    - ``@hop1,@hop2:rest`` (source route): every hop must be local, and so must ``rest``
      (Postfix ignores the route; policyd is stricter).
    - Otherwise the address splits at its last ``@``; a domain that is not local makes it a
      relay attempt to that domain. Beyond a local domain the local part is read again: an
      ``@`` in it is another address (``user@remote.example@local.example``, which is what
      ``"user@remote.example"@local.example`` becomes); otherwise the leftmost ``!``
      (``remote.example!user``) and the rightmost ``%`` (``user%remote.example``) are routes
      to a next hop. With both, each reading is followed, and the address is local only if
      every reading is. Quotes, backslashes and angle brackets are ordinary characters.
    - An empty local part (``@local.example``, from ``""@local.example``) is local mail at a
      local domain, as Postfix delivers it to MAILER-DAEMON there.
    - An address without ``@`` gets the same local-part reading: ``postmaster`` is a local
      bare local part, ``remote.example!user`` a relay attempt.
    - A domain matches ``local_domains`` by normalize_domain's rules; an address literal is
      local only if listed (Postfix also takes its own interface addresses as local; policyd
      does not).

    Empty input, empty domains or local parts next to routing characters, domains that do not
    normalize (a quote, a bracket or a space in a domain included), more than a few routing
    hops and addresses longer than 4096 characters give a non-local Destination with
    ``domain`` None. Never raises for any string.
    """
    if len(recipient) > _MAX_ADDRESS_LENGTH:
        return _unresolved("address too long")
    if not recipient:
        return _unresolved("empty address")
    # The common case, ``local@domain`` with nothing that routes: where it goes depends on
    # the domain alone (the full reading below gives the same answer).
    local_part, _, domain = recipient.rpartition("@")
    if local_part and "@" not in local_part and _ROUTING.search(local_part) is None:
        return local_domains.destination_of_domain(domain)
    return _resolve_routed(recipient, local_domains)


def _resolve_routed(address: str, local_domains: DomainSet) -> Destination:
    """resolve_destination's full reading of ``address``."""
    return _Router(local_domains).resolve(address, 0, None)
