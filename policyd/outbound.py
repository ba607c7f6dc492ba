"""Outbound authentication: profile selection and the socketmap tables Postfix reads.

Pure: built once from a validated configuration, then answers lookups from dicts. Postfix asks
two maps (see reference/postfix-interfaces.md §3):

- ``transport`` (``transport_maps``): the recipient address or domain → ``policyd-<kind>:nexthop``,
  a transport defined in postfix-examples/master.cf for that kind of authentication;
- ``sasl_passwd`` (``smtp_sasl_password_maps``): the remote host name, then the next hop exactly
  as written (brackets and port) → ``account:password``.

The same ``transport`` answers can also be written as a static Postfix table
(``transport_table_entries``), so that Postfix need not ask policyd about every recipient;
``sasl_passwd`` is only ever served, never written.

Passwords live in ``Secret`` objects whose ``repr``/``str`` never show the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from policyd.address import DomainSet, normalize_domain, unicode_form

AuthKind = Literal["none", "cleartext", "ntlm"]
AUTH_KINDS: tuple[AuthKind, ...] = get_args(AuthKind)
TlsLevel = Literal["encrypt", "may"]

#: The transport(5) value meaning "no change": Postfix routes as if the table had no entry.
NO_CHANGE = ":"

#: Transport names, one per kind of authentication, as defined in postfix-examples/master.cf.
TRANSPORTS: dict[str, str] = {
    "none": "policyd-none",
    "cleartext": "policyd-cleartext",
    "cleartext-notls": "policyd-cleartext-notls",
    "ntlm": "policyd-ntlm",
}


class Secret:
    """A password. Its value is only reachable through ``reveal()``; it never prints."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The password itself, for the sasl_passwd answer and nothing else."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class OutboundProfile:
    """One profile: ``outbound.default`` or ``outbound.domains.<domain>``.

    ``path`` is its key path, used as the profile's name in logs and ``explain``.
    """

    path: str = "outbound.default"
    auth: AuthKind = "none"
    username: str = ""
    password: Secret | None = None
    nexthop: str = ""
    tls: TlsLevel = "may"
    allow_plaintext: bool = False

    @property
    def transport(self) -> str:
        """The master.cf transport that delivers with this profile's authentication."""
        if self.auth == "cleartext" and self.tls != "encrypt":
            return TRANSPORTS["cleartext-notls"]
        return TRANSPORTS[self.auth]

    def describe(self) -> str:
        """One line for ``explain`` and logs: never the password."""
        parts = [f"{self.path}: auth {self.auth}"]
        if self.username:
            parts.append(f"as {self.username}")
        parts.append(f"via {self.nexthop}" if self.nexthop else "via the domain's MX")
        if self.auth == "cleartext":
            parts.append("TLS required" if self.tls == "encrypt" else "TLS optional")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Outbound:
    """The ``outbound`` section: a default and overrides keyed by normalised domain."""

    default: OutboundProfile = OutboundProfile()
    domains: tuple[tuple[str, OutboundProfile], ...] = ()


@dataclass(frozen=True, slots=True)
class Selection:
    """The profile a recipient domain will use, with the next hop Postfix is told."""

    profile: OutboundProfile
    nexthop: str  # "" when Postfix's own routing (default transport, relayhost) applies

    @property
    def transport_answer(self) -> str | None:
        """The ``transport`` map value, or None for NOTFOUND (Postfix's default delivery)."""
        if self.profile.auth == "none" and not self.nexthop:
            return None
        return f"{self.profile.transport}:{self.nexthop}"


class CredentialConflict(ValueError):
    """Two profiles need different credentials for the same next hop."""

    def __init__(self, key: str, first: str, second: str) -> None:
        self.key = key
        self.first = first
        self.second = second
        super().__init__(
            f"next hop {key!r} already has other credentials from {first}: one next hop "
            "can only log in with one account"
        )


class OutboundTables:
    """Compiled outbound profiles: selection by domain and the two socketmap tables."""

    def __init__(self, outbound: Outbound, local_domains: DomainSet) -> None:
        self.outbound = outbound
        self.local_domains = local_domains
        self._overrides = dict(outbound.domains)
        self._sasl: dict[str, tuple[str, OutboundProfile]] = {}
        host_owners: dict[str, set[tuple[str, str]]] = {}
        host_answers: dict[str, tuple[str, OutboundProfile]] = {}
        keyed = [(outbound.default.nexthop, outbound.default)] + [
            (profile.nexthop or domain, profile) for domain, profile in outbound.domains
        ]
        for key_text, profile in keyed:
            if profile.auth == "none" or profile.password is None or not key_text:
                continue
            key = key_text.lower()
            answer = f"{profile.username}:{profile.password.reveal()}"
            known = self._sasl.get(key)
            if known is not None and known[0] != answer:
                raise CredentialConflict(key_text, known[1].path, profile.path)
            self._sasl.setdefault(key, (answer, profile))
            host = nexthop_host(key)
            if host != key:
                host_owners.setdefault(host, set()).add((answer, profile.path))
                host_answers.setdefault(host, (answer, profile))
        # Postfix asks for the remote host name before the next hop. Answer it only when every
        # profile reaching that host agrees; otherwise the next-hop key decides.
        for host, owners in host_owners.items():
            if len({answer for answer, _ in owners}) == 1 and host not in self._sasl:
                self._sasl[host] = host_answers[host]

    def select(self, domain: str | None) -> Selection:
        """The profile for mail to ``domain`` (raw or normalised; None → the default)."""
        return self._select_normalized(_normalized_or_empty(domain) if domain else "")

    def select_normalized(self, domain: str | None) -> Selection:
        """``select`` for a domain already in normalize_domain's form (a Destination's)."""
        return self._select_normalized(domain or "")

    def _select_normalized(self, domain: str) -> Selection:
        override = self._overrides.get(domain)
        if override is not None:
            # An override without a next hop delivers to the domain itself (its MX), never
            # to the default's smart host.
            return Selection(override, override.nexthop or domain)
        default = self.outbound.default
        return Selection(default, default.nexthop)

    def transport(self, key: str) -> str | None:
        """The ``transport`` map: recipient address or domain → answer, None = NOTFOUND."""
        if key == "*":
            return None
        raw = key.rpartition("@")[2]
        if not raw:
            return None
        domain = _normalized_or_empty(raw)
        if domain and self.local_domains.contains_normalized(domain):
            return None
        return self._select_normalized(domain).transport_answer

    def transport_table_entries(self) -> tuple[tuple[str, str], ...]:
        """The ``transport`` map as rows of a static Postfix table: (key, value), sorted.

        Contract: for every recipient domain, Postfix's lookup in a fixed table (hash, lmdb,
        cdb, btree) holding exactly these rows gives what ``transport()`` answers for an
        address in that domain. Postfix tries the domain, then each parent as ``.parent``
        (``parent_domain_matches_subdomains`` does not list transport_maps by default), then
        ``*``; the first key found wins, and the value ``:`` means "no change" (Postfix's own
        routing, the same as ``transport()``'s NOTFOUND). So:

        - every override domain → its answer, or ``:`` if it is also local;
        - every exact local domain and address literal → ``:``; every ``.parent`` local entry
          → ``.parent :``, so that neither a ``*`` row nor anything else overrides local mail;
        - ``*`` → the default profile's answer, when it has one (a login or a next hop).

        Exact keys beat ``.parent`` keys and both beat ``*`` in Postfix, the order policyd
        decides in (local, then override, then default): the only key that could disagree, an
        override under a local parent, carries ``:``. Each key whose Unicode spelling differs
        (an IDNA domain) is written in both forms, because Postfix looks up SMTPUTF8 mail by
        U-labels; see ``unicode_form`` for the keys left out. Keys are lowercase, as Postfix
        folds them. Nothing here is secret.
        """
        rows: dict[str, str] = {}
        for domain in self.local_domains.exact:
            rows[domain] = NO_CHANGE
        for parent in self.local_domains.parents:
            rows[f".{parent}"] = NO_CHANGE
        for domain, _profile in self.outbound.domains:
            answer = None
            if not self.local_domains.contains_normalized(domain):
                answer = self._select_normalized(domain).transport_answer
            rows[domain] = NO_CHANGE if answer is None else answer
        default = Selection(self.outbound.default, self.outbound.default.nexthop).transport_answer
        if default is not None:
            rows["*"] = default
        for key, value in list(rows.items()):
            dot = "." if key.startswith(".") else ""
            spelled = unicode_form(key[len(dot) :])
            if spelled is not None:
                rows.setdefault(f"{dot}{spelled}", value)
        return tuple(sorted(rows.items()))

    def sasl_passwd(self, key: str) -> str | None:
        """The ``sasl_passwd`` map: host or next hop → ``account:password``, None = NOTFOUND."""
        found = self._sasl.get(key.lower())
        return found[0] if found else None


def _normalized_or_empty(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except ValueError:
        return ""


def nexthop_host(nexthop: str) -> str:
    """The host inside a next hop: ``[smtp.example]:587`` → ``smtp.example``."""
    if nexthop.startswith("["):
        return nexthop[1:].partition("]")[0]
    host, _, port = nexthop.rpartition(":")
    return host if host and port.isdigit() else nexthop
