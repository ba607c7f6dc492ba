"""The static transport table's rows: what Postfix finds in them equals the socketmap answer.

``OutboundTables.transport_table_entries`` is pure; these tests need no Postfix. The property
test pits it against a small model of Postfix's fixed-table transport lookup (transport(5):
``domain``, then each parent as ``.parent``, then ``*``; the value ``:`` = no change) over
random configurations and recipient domains, including configurations the YAML validation
refuses (an override that is also local), so the rows are right whatever reaches them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.address import DomainSet, normalize_domain, unicode_form
from policyd.config import parse_config
from policyd.outbound import (
    NO_CHANGE,
    Outbound,
    OutboundProfile,
    OutboundTables,
    Secret,
)

# ------------------------------------------------------------------------ a model of Postfix


def postfix_fixed_lookup(rows: dict[str, str], domain: str) -> str | None:
    """What trivial-rewrite's transport lookup finds for mail to ``domain`` in a fixed table
    holding ``rows`` (transport(5), src/global/transport.c; no ``user@domain`` keys exist in
    policyd's rows): the domain, then ``.parent`` for each parent, then ``*``. Postfix folds
    the key's case first. ``:`` (null transport, null next hop) means "no change", the same
    as no entry at all. Returns the value found, None for Postfix's own routing."""
    key = domain.casefold()
    candidates = [key]
    dot = key.find(".", 1)
    while dot >= 0:
        candidates.append(key[dot:])
        dot = key.find(".", dot + 1)
    candidates.append("*")
    for candidate in candidates:
        if candidate in rows:
            value = rows[candidate]
            return None if value == NO_CHANGE else value
    return None


# ------------------------------------------------------------------------------- table rows


def make_tables(
    local: tuple[str, ...] = (),
    overrides: tuple[tuple[str, OutboundProfile], ...] = (),
    default: OutboundProfile | None = None,
) -> OutboundTables:
    outbound = Outbound(default=default or OutboundProfile(), domains=overrides)
    return OutboundTables(outbound, DomainSet(local))


CLEARTEXT = OutboundProfile(
    path="outbound.domains.partner.example",
    auth="cleartext",
    username="relay@partner.example",
    password=Secret("pw-partner"),
    nexthop="[smtp.partner.example]:587",
    tls="encrypt",
)
NTLM_DIRECT = OutboundProfile(
    path="outbound.domains.corp.example", auth="ntlm", username="C\\u", password=Secret("pw-c")
)
NONE_ROUTED = OutboundProfile(path="outbound.domains.routed.example", nexthop="[gw.example]")
SMARTHOST = OutboundProfile(
    auth="cleartext",
    username="site@isp.example",
    password=Secret("pw-isp"),
    nexthop="[smtp.isp.example]:587",
    tls="encrypt",
)


@pytest.mark.parametrize(
    ("tables", "rows"),
    [
        pytest.param(make_tables(), (), id="nothing configured: an empty table"),
        pytest.param(
            make_tables(local=("local.example", ".local.example", "[192.0.2.25]")),
            ((".local.example", ":"), ("[192.0.2.25]", ":"), ("local.example", ":")),
            id="local domains, subdomains and literals: ':' (Postfix's own routing)",
        ),
        pytest.param(
            make_tables(
                local=("local.example",),
                overrides=(
                    ("partner.example", CLEARTEXT),
                    ("corp.example", NTLM_DIRECT),
                    ("routed.example", NONE_ROUTED),
                ),
            ),
            (
                ("corp.example", "policyd-ntlm:corp.example"),
                ("local.example", ":"),
                ("partner.example", "policyd-cleartext:[smtp.partner.example]:587"),
                ("routed.example", "policyd-none:[gw.example]"),
            ),
            id="overrides: transport and next hop; without next hop the domain itself; no '*'",
        ),
        pytest.param(
            make_tables(
                local=("local.example",),
                default=OutboundProfile(nexthop="[127.0.0.33]:25"),
            ),
            (("*", "policyd-none:[127.0.0.33]:25"), ("local.example", ":")),
            id="a default with a next hop is the '*' row; local domains still ':'",
        ),
        pytest.param(
            make_tables(default=SMARTHOST),
            (("*", "policyd-cleartext:[smtp.isp.example]:587"),),
            id="a default that logs in is the '*' row",
        ),
        pytest.param(
            make_tables(
                local=(".local.example", "partner.example"),
                overrides=(("partner.example", CLEARTEXT), ("x.local.example", NTLM_DIRECT)),
                default=SMARTHOST,
            ),
            (
                ("*", "policyd-cleartext:[smtp.isp.example]:587"),
                (".local.example", ":"),
                ("partner.example", ":"),
                ("x.local.example", ":"),
            ),
            id="an override that is also local (exactly or under a local parent) is ':'",
        ),
        pytest.param(
            make_tables(
                local=("bücher.example", ".ÖL.example"),
                overrides=(("xn--mnchen-3ya.example", CLEARTEXT),),
            ),
            (
                (".xn--l-0ga.example", ":"),
                (".öl.example", ":"),
                ("bücher.example", ":"),
                ("münchen.example", "policyd-cleartext:[smtp.partner.example]:587"),
                ("xn--bcher-kva.example", ":"),
                ("xn--mnchen-3ya.example", "policyd-cleartext:[smtp.partner.example]:587"),
            ),
            id="IDNA domains: A-label and U-label keys",
        ),
        pytest.param(
            make_tables(local=("straße.example",)),
            (("xn--strae-oqa.example", ":"),),
            id="no U-label key when case folding would turn it into another domain (ß → ss)",
        ),
    ],
)
def test_transport_table_rows(tables: OutboundTables, rows: tuple[tuple[str, str], ...]) -> None:
    """The rows written for typical configurations, key by key (sorted, lowercase)."""
    assert tables.transport_table_entries() == rows


def test_rows_never_contain_a_password() -> None:
    """The table is world-readable: no row carries a password or an account name."""
    tables = make_tables(
        local=("local.example",),
        overrides=(("partner.example", CLEARTEXT), ("corp.example", NTLM_DIRECT)),
        default=SMARTHOST,
    )
    text = repr(tables.transport_table_entries())
    for secret in ("pw-partner", "pw-c", "pw-isp", "relay@partner.example", "site@isp.example"):
        assert secret not in text


def test_rows_from_a_loaded_configuration(tmp_path: Path) -> None:
    """Through the YAML loader: the rows follow outbound and local_domains as configured."""
    (tmp_path / "pw").write_text("secret")
    (tmp_path / "pw").chmod(0o600)
    config = parse_config(
        """
listen: {policy: "inet:127.0.0.1:10040"}
local_domains: [Local.Example]
outbound:
  default: {auth: none}
  domains:
    Partner.Example.: {auth: cleartext, username: u, password_file: pw, nexthop: "[h]:587"}
""",
        base_dir=tmp_path,
    )
    assert config.outbound_tables.transport_table_entries() == (
        ("local.example", ":"),
        ("partner.example", "policyd-cleartext:[h]:587"),
    )


# --------------------------------------------------------------------------- property test

# Few labels, so that generated domains often sit under one another and collide with entries.
_ASCII_LABELS = ("a", "b", "mx", "local", "partner", "xn--bcher-kva", "xn--l-0ga")
_labels = st.sampled_from(_ASCII_LABELS)
_domains = st.lists(_labels, min_size=1, max_size=4).map(".".join)
_literals = st.sampled_from(("[192.0.2.25]", "[ipv6:2001:db8::25]"))
_nexthops = st.sampled_from(("", "[gw.example]", "[127.0.0.31]:2525", "smtp.example:587"))


@st.composite
def _profiles(draw: st.DrawFn, path: str, *, default: bool) -> OutboundProfile:
    auth = draw(st.sampled_from(("none", "cleartext", "ntlm")))
    nexthop = draw(_nexthops)
    if default and auth != "none" and not nexthop:
        nexthop = "[smarthost.example]:587"  # the loader requires a smart host for this
    if auth == "none":
        return OutboundProfile(path=path, nexthop=nexthop)
    tls = draw(st.sampled_from(("encrypt", "may")))
    # No password: credentials play no part in the transport map (and cannot conflict).
    return OutboundProfile(
        path=path,
        auth="cleartext" if auth == "cleartext" else "ntlm",
        username="u",
        nexthop=nexthop,
        tls="encrypt" if auth != "cleartext" or tls == "encrypt" else "may",
        allow_plaintext=tls == "may",
    )


@st.composite
def _configurations(draw: st.DrawFn) -> OutboundTables:
    exact = draw(st.lists(st.one_of(_domains, _literals), max_size=4))
    parents = draw(st.lists(_domains, max_size=3))
    local = tuple(exact) + tuple(f".{parent}" for parent in parents)
    override_domains = draw(st.lists(_domains, max_size=5, unique=True))
    overrides = tuple(
        (domain, draw(_profiles(f"outbound.domains.{domain}", default=False)))
        for domain in override_domains
    )
    default = draw(_profiles("outbound.default", default=True))
    return make_tables(local=local, overrides=overrides, default=default)


@st.composite
def _recipient_domains(draw: st.DrawFn) -> str:
    """A domain as a recipient could spell it: A-labels or U-labels, any letter case, or one
    that does not normalize. (Never empty: trivial-rewrite completes ``user@`` with
    ``$myorigin`` before any transport lookup.)"""
    domain = draw(st.one_of(_domains, _literals, st.sampled_from(("x..y", "-bad", "a_b"))))
    if draw(st.booleans()):
        domain = unicode_form(domain) or domain
    if draw(st.booleans()):
        domain = domain.upper()
    return domain


@settings(max_examples=400, deadline=None)
@given(_configurations(), st.lists(_recipient_domains(), min_size=1, max_size=8))
def test_static_table_gives_postfix_what_the_socketmap_answers(
    tables: OutboundTables, domains: list[str]
) -> None:
    """For every configuration and recipient domain, Postfix's fixed-table lookup over the
    written rows finds exactly the socketmap ``transport`` answer for that recipient (an
    override's transport, ``:``/nothing for local and default-routed mail, the default's
    transport via ``*``), in A-label and U-label spelling and any letter case."""
    rows = dict(tables.transport_table_entries())
    for domain in domains:
        expected = tables.transport(f"user@{domain}")
        assert postfix_fixed_lookup(rows, domain) == expected, (domain, rows)


@given(_configurations())
def test_rows_are_lowercase_unique_and_whitespace_free(tables: OutboundTables) -> None:
    """Every key is written once, already case-folded, and no key or value has white space
    (a postmap source line is ``key value``)."""
    rows = tables.transport_table_entries()
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys))
    for key, value in rows:
        assert key == key.casefold()
        assert key and value and not any(c.isspace() for c in key + value)
        if key not in ("*",) and not key.startswith("["):
            bare = key.removeprefix(".")
            assert normalize_domain(bare) == normalize_domain(bare.upper())
