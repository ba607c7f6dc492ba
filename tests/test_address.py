"""Tests for policyd.address: domain normalization, DomainSet and recipient destinations."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.address import (
    Destination,
    DomainError,
    DomainSet,
    _resolve_routed,
    normalize_domain,
    resolve_destination,
    unicode_form,
)

# ---------------------------------------------------------------------------------------------
# normalize_domain


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("EXAMPLE.COM.", "example.com"),
        ("localhost", "localhost"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("_sip._tcp.Example.com", "_sip._tcp.example.com"),
        ("123.example", "123.example"),
        ("1.2.3.4.5", "1.2.3.4.5"),
        ("a-b--c.example", "a-b--c.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("BüChEr.Example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
        ("CAFÉ.example", "xn--caf-dma.example"),
        ("straße.example", "xn--strae-oqa.example"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("[192.0.2.25]", "[192.0.2.25]"),
        ("[192.0.2.25].", "[192.0.2.25]"),
        ("[IPv6:2001:db8::25]", "[ipv6:2001:db8::25]"),
        ("[IPv6:2001:DB8:0::25]", "[ipv6:2001:db8::25]"),
        ("[ipv6:2001:0db8:0000:0000:0000:0000:0000:0025]", "[ipv6:2001:db8::25]"),
        ("[IPV6:::1]", "[ipv6:::1]"),
        ("[2001:db8::25]", "[ipv6:2001:db8::25]"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
    ],
)
def test_normalize_domain_accepts(text: str, expected: str) -> None:
    """Case, one trailing dot, IDNA (both forms) and literal spellings normalize as documented."""
    assert normalize_domain(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "'' is not a domain"),
        (".", "'.' is not a domain"),
        ("..", "'..' is not a domain"),
        ("example.com..", "'example.com..' is not a domain"),
        (".example.com", "'.example.com' is not a domain"),
        ("a..b", "'a..b' is not a domain"),
        ("exa mple.com", "'exa mple.com' is not a domain"),
        (" example.com", "' example.com' is not a domain"),
        ("*.example.com", "'*.example.com' is not a domain"),
        ("user@example.com", "'user@example.com' is not a domain"),
        ("a%b.example", "'a%b.example' is not a domain"),
        ("-a.example", "'-a.example' is not a domain"),
        ("a-.example", "'a-.example' is not a domain"),
        ("a" * 64 + ".example", f"'{'a' * 64}.example' is not a domain"),
        (("a" * 60 + ".") * 5 + "example", None),
        ("bü_cher.example", "'bü_cher.example' is not a domain"),
        ("\u0663\u0664a.example", None),
        ("[192.0.2.25", "'[192.0.2.25' is not an address literal"),
        ("[]", "'[]' is not an address literal"),
        ("[300.0.2.25]", "'[300.0.2.25]' is not an address literal"),
        ("[192.0.2]", "'[192.0.2]' is not an address literal"),
        ("[IPv6:192.0.2.25]", "'[IPv6:192.0.2.25]' is not an address literal"),
        ("[IPv6:2001:db8::25%eth0]", "'[IPv6:2001:db8::25%eth0]' is not an address literal"),
        ("[IPv7:2001:db8::25]", "'[IPv7:2001:db8::25]' is not an address literal"),
        ("[mail.example]", "'[mail.example]' is not an address literal"),
        ("[192.0.2.25]x", "'[192.0.2.25]x' is not an address literal"),
        ("[[192.0.2.25]]", "'[[192.0.2.25]]' is not an address literal"),
        # UTS #46 would map these to ASCII; Postfix would not (only case is folded).
        ("ＥＸＡＭＰＬＥ.com", "'ＥＸＡＭＰＬＥ.com' is not a domain"),  # noqa: RUF001
        ("local。example", "'local。example' is not a domain"),
        ("local.example｡", "'local.example｡' is not a domain"),
    ],
)
def test_normalize_domain_rejects(text: str, message: str | None) -> None:
    """Bad domains and literals raise DomainError naming the input as given."""
    with pytest.raises(DomainError) as caught:
        normalize_domain(text)
    assert caught.value.entry == text
    if message is not None:
        assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


_domain_chars = st.sampled_from("abcxyzABCXYZ0189-_üÜßéÉ例ＡΣσς")
_labels = st.text(_domain_chars, min_size=1, max_size=12)
_domainish = st.builds(
    lambda labels, dot: ".".join(labels) + dot,
    st.lists(_labels, min_size=1, max_size=5),
    st.sampled_from(["", "."]),
)
_literalish = st.one_of(
    st.ip_addresses(v=4).map(lambda a: f"[{a}]"),
    st.ip_addresses(v=6).map(lambda a: f"[IPv6:{a.exploded.upper()}]"),
    st.ip_addresses(v=6).map(lambda a: f"[ipv6:{a}]"),
)


@given(st.one_of(_domainish, _literalish, st.text()))
def test_normalize_domain_is_idempotent(text: str) -> None:
    """Whatever normalize_domain accepts, its output normalizes to itself and is ASCII."""
    try:
        once = normalize_domain(text)
    except DomainError:
        return
    assert once.isascii()
    assert once == once.lower()
    assert normalize_domain(once) == once


@given(st.text())
def test_normalize_domain_raises_only_domain_error(text: str) -> None:
    """Arbitrary text either normalizes or raises DomainError, never another exception."""
    with contextlib.suppress(DomainError):
        normalize_domain(text)


# ---------------------------------------------------------------------------------------------
# DomainSet

DOMAINS = DomainSet(
    [
        "example.com",
        ".example.net",
        "Bücher.Example",
        ".XN--CAF-DMA.example.",
        "[192.0.2.25]",
        "[IPv6:2001:DB8:0::25]",
        "_internal.example.org",
    ]
)


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.com", True),
        ("EXAMPLE.COM", True),
        ("example.com.", True),
        ("Example.Com.", True),
        ("example.com..", False),
        ("sub.example.com", False),
        ("example.com.evil.example", False),
        ("xexample.com", False),
        ("com", False),
        ("example.net", False),
        ("a.example.net", True),
        ("A.B.C.Example.Net.", True),
        ("aexample.net", False),
        ("bücher.example", True),
        ("BÜCHER.EXAMPLE", True),
        ("BüCHER.example.", True),
        ("xn--bcher-kva.example", True),
        ("XN--BCHER-KVA.Example", True),
        ("www.bücher.example", False),
        ("café.example", False),
        ("shop.café.example", True),
        ("shop.CAFÉ.example", True),
        ("shop.xn--caf-dma.example", True),
        ("[192.0.2.25]", True),
        ("[192.0.2.25].", True),
        ("[192.0.2.26]", False),
        ("192.0.2.25", False),
        ("[IPv6:2001:db8::25]", True),
        ("[ipv6:2001:0db8::0025]", True),
        ("[IPV6:2001:DB8:0:0:0:0:0:25]", True),
        ("[2001:db8::25]", True),
        ("[IPv6:2001:db8::26]", False),
        ("_internal.example.org", True),
        ("", False),
        (".", False),
        ("exa mple.com", False),
        ("[garbage]", False),
        ("example.com\n", False),
    ],
)
def test_domain_set_membership(domain: str, expected: bool) -> None:
    """Exact entries match only themselves, .entries only subdomains; raw spellings normalize."""
    assert (domain in DOMAINS) is expected


@pytest.mark.parametrize("thing", [None, 1, b"example.com", ["example.com"]])
def test_domain_set_non_strings_are_not_contained(thing: object) -> None:
    """Non-string lookups are never contained and never raise."""
    assert thing not in DOMAINS


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("exa mple.com", "'exa mple.com' is not a domain"),
        ("", "'' is not a domain"),
        (".", "'.' is not a domain"),
        ("..example.com", "'..example.com' is not a domain"),
        (".[192.0.2.25]", "'.[192.0.2.25]' is not a domain"),
        (".exa mple.com", "'.exa mple.com' is not a domain"),
        ("*.example.com", "'*.example.com' is not a domain"),
        ("[192.0.2.300]", "'[192.0.2.300]' is not an address literal"),
        ("file:/etc/policyd/domains", "'file:/etc/policyd/domains' is not a domain"),
    ],
)
def test_domain_set_rejects_bad_entries(entry: str, message: str) -> None:
    """A bad entry makes the constructor raise DomainError naming that entry as written."""
    with pytest.raises(DomainError) as caught:
        DomainSet(["good.example", entry])
    assert str(caught.value) == message


def test_domain_set_len_and_bool() -> None:
    """len() counts entries given; an empty set is falsy and contains nothing."""
    assert len(DOMAINS) == 7
    assert DOMAINS
    empty = DomainSet([])
    assert not empty
    assert len(empty) == 0
    assert "example.com" not in empty


def test_domain_set_with_10000_entries() -> None:
    """A set of 10,000 exact and subdomain entries answers correctly (no timing asserted)."""
    entries = [f"d{i}.example" for i in range(5_000)]
    entries += [f".s{i}.example" for i in range(5_000)]
    domains = DomainSet(entries)
    assert len(domains) == 10_000
    assert "d4999.example" in domains
    assert "x.d4999.example" not in domains
    assert "a.b.s4999.example" in domains
    assert "s4999.example" not in domains
    assert "d5000.example" not in domains


@given(st.text())
def test_domain_set_lookup_never_raises(text: str) -> None:
    """Looking up arbitrary text in a DomainSet returns a bool and never raises."""
    assert (text in DOMAINS) in (True, False)


# ---------------------------------------------------------------------------------------------
# resolve_destination

LOCAL = DomainSet(["local.example", ".sub.local.example", "[192.0.2.25]"])


def _relay(domain: str | None, reason: str) -> Destination:
    return Destination(local=False, domain=domain, reason=reason)


def _local(domain: str | None, reason: str = "local domain") -> Destination:
    return Destination(local=True, domain=domain, reason=reason)


def _unresolved(reason: str) -> Destination:
    return Destination(local=False, domain=None, reason=reason)


RESOLVE_CASES: list[tuple[str, Destination]] = [
    # Plain local and remote addresses.
    ("user@local.example", _local("local.example")),
    ("user@LOCAL.EXAMPLE", _local("local.example")),
    ("user@LOCAL.EXAMPLE.", _local("local.example")),
    ("User.Name+tag@Local.Example", _local("local.example")),
    ("user@a.sub.local.example", _local("a.sub.local.example")),
    ("user@x.y.sub.local.example.", _local("x.y.sub.local.example")),
    ("user@sub.local.example", _relay("sub.local.example", "remote domain")),
    ("user@other.local.example", _relay("other.local.example", "remote domain")),
    ("user@remote.example", _relay("remote.example", "remote domain")),
    ("user@REMOTE.example.", _relay("remote.example", "remote domain")),
    ("user@local.example.remote.example", _relay("local.example.remote.example", "remote domain")),
    ("user@local.exampl", _relay("local.exampl", "remote domain")),
    ("user@xlocal.example", _relay("xlocal.example", "remote domain")),
    ("postmaster", _local(None, "bare local part")),
    ("Postmaster", _local(None, "bare local part")),
    ("first.last", _local(None, "bare local part")),
    ('"first last"@local.example', _local("local.example")),
    ('"first last"', _local(None, "bare local part")),
    ("first last@local.example", _local("local.example")),
    ("user:name@local.example", _local("local.example")),
    # Address literals.
    ("user@[192.0.2.25]", _local("[192.0.2.25]")),
    ("user@[192.0.2.25].", _local("[192.0.2.25]")),
    ("user@[192.0.2.1]", _relay("[192.0.2.1]", "address literal not listed")),
    ("user@[IPv6:2001:db8::25]", _relay("[ipv6:2001:db8::25]", "address literal not listed")),
    ("user@192.0.2.25", _relay("192.0.2.25", "remote domain")),
    ("user@[192.0.2.025]", _unresolved("invalid domain")),
    ("user@[local.example]", _unresolved("invalid domain")),
    # Percent hack.
    (
        "user%remote.example@local.example",
        _relay("remote.example", "percent-hack route to remote.example"),
    ),
    ("user%remote.example", _relay("remote.example", "percent-hack route to remote.example")),
    ("user%local.example@local.example", _local("local.example")),
    ("user%LOCAL.example.@local.example", _local("local.example")),
    ("user%local.example", _local("local.example")),
    ("user%[192.0.2.25]", _local("[192.0.2.25]")),
    ("user%[192.0.2.1]@local.example", _relay("[192.0.2.1]", "percent-hack route to [192.0.2.1]")),
    (
        "user%remote.example%local.example@local.example",
        _relay("remote.example", "percent-hack route to remote.example"),
    ),
    (
        "user%local.example%remote.example@local.example",
        _relay("remote.example", "percent-hack route to remote.example"),
    ),
    ("user%local.example%local.example@local.example", _local("local.example")),
    ("user%remote.example@remote.example", _relay("remote.example", "remote domain")),
    ("user%local.example@remote.example", _relay("remote.example", "remote domain")),
    ("user%@local.example", _unresolved("empty domain in percent-hack route")),
    ("%local.example@local.example", _unresolved("empty local part")),
    ("user%exa mple@local.example", _unresolved("invalid domain in percent-hack route")),
    # Bang paths.
    (
        "remote.example!user@local.example",
        _relay("remote.example", "bang-path route to remote.example"),
    ),
    ("remote.example!user", _relay("remote.example", "bang-path route to remote.example")),
    ("local.example!user", _local("local.example")),
    ("local.example!user@local.example", _local("local.example")),
    (
        "local.example!remote.example!user",
        _relay("remote.example", "bang-path route to remote.example"),
    ),
    (
        "remote.example!local.example!user",
        _relay("remote.example", "bang-path route to remote.example"),
    ),
    ("[192.0.2.25]!user", _local("[192.0.2.25]")),
    ("!user@local.example", _unresolved("empty domain in bang-path route")),
    ("local.example!@local.example", _unresolved("empty local part")),
    # Both % and !: every reading must be local.
    ("local.example!user%local.example", _local("local.example")),
    (
        "local.example!user%remote.example",
        _relay("remote.example", "percent-hack route to remote.example"),
    ),
    (
        "remote.example!user%local.example",
        _relay("remote.example", "bang-path route to remote.example"),
    ),
    ("local.example!user%local.example@local.example", _local("local.example")),
    (
        "local.example!user%remote.example@local.example",
        _relay("remote.example", "percent-hack route to remote.example"),
    ),
    ("user%local.example!x@local.example", _unresolved("invalid domain in bang-path route")),
    # Postfix's internal form: quoting is gone before policyd sees the address, so
    # "user@remote.example"@local.example arrives as user@remote.example@local.example (doubled
    # @, below) and a quote or backslash left in it is an ordinary character.
    ('a"b@local.example', _local("local.example")),  # sent as "a\"b"@local.example
    ("a b@local.example", _local("local.example")),  # sent as "a b"@local.example
    ('"user"@local.example', _local("local.example")),
    ('"<x>"@local.example', _local("local.example")),
    ('"user@local.example', _local("local.example")),
    ("a\\b@local.example", _local("local.example")),
    (
        "user\\@remote.example@local.example",
        _relay("remote.example", "sender-specified route to remote.example"),
    ),
    # Quotes in a domain make it invalid: never local.
    (
        '"user@remote.example"@local.example',
        _unresolved("invalid domain in sender-specified route"),
    ),
    (
        '"user%remote.example"@local.example',
        _unresolved("invalid domain in percent-hack route"),
    ),
    (
        '"remote.example!user"@local.example',
        _unresolved("invalid domain in bang-path route"),
    ),
    (
        '"@remote.example:user"@local.example',
        _unresolved("invalid domain in sender-specified route"),
    ),
    (
        '"user@local.example"@local.example',
        _unresolved("invalid domain in sender-specified route"),
    ),
    ('"user@remote.example"', _unresolved("invalid domain")),
    ('"user"@"local.example"', _unresolved("invalid domain")),
    ("user@local\\.example", _unresolved("invalid domain")),
    ("user@local.example\\", _unresolved("invalid domain")),
    # Doubled @.
    (
        "user@remote.example@local.example",
        _relay("remote.example", "sender-specified route to remote.example"),
    ),
    ("user@local.example@local.example", _local("local.example")),
    ("user@local.example@remote.example", _relay("remote.example", "remote domain")),
    ("user@@local.example", _unresolved("empty domain in sender-specified route")),
    # Source routes.
    (
        "@local.example:user@remote.example",
        _relay("remote.example", "sender-specified route to remote.example"),
    ),
    (
        "@remote.example:user@local.example",
        _relay("remote.example", "source route via remote.example"),
    ),
    ("@local.example:user@local.example", _local("local.example")),
    (
        "@local.example,@remote.example:user@local.example",
        _relay("remote.example", "source route via remote.example"),
    ),
    ("@local.example,@a.sub.local.example:user@local.example", _local("local.example")),
    ("@[192.0.2.25]:user@local.example", _local("local.example")),
    (
        "@[IPv6:2001:db8::1]:user@local.example",
        _relay("[ipv6:2001:db8::1]", "source route via [ipv6:2001:db8::1]"),
    ),
    (
        "@local.example:user%remote.example@local.example",
        _relay("remote.example", "percent-hack route to remote.example"),
    ),
    # ""@local.example arrives as @local.example: Postfix delivers it to MAILER-DAEMON.
    (
        "@local.example",
        Destination(True, "local.example", "empty local part (MAILER-DAEMON)"),
    ),
    ("@remote.example", _relay("remote.example", "remote domain")),
    ("@a@local.example", _unresolved("empty local part")),
    ("@local.example:", _unresolved("empty address")),
    ("@:user@local.example", _unresolved("empty domain in source route")),
    ("@local.example,local.example:user@local.example", _unresolved("unparseable source route")),
    ("@[IPv6:2001:db8::1:user@local.example", _unresolved("unparseable source route")),
    # Unicode and IDNA.
    ("user@LOCAL.EXAMPLE", _local("local.example")),
    # Postfix folds only case: fullwidth letters and other full stops are another domain.
    ("user@ＬＯＣＡＬ.example", _unresolved("invalid domain")),  # noqa: RUF001 (on purpose)
    ("user@local。example", _unresolved("invalid domain")),
    ("user@local．example", _unresolved("invalid domain")),  # noqa: RUF001 (on purpose)
    ("user@local｡example", _unresolved("invalid domain")),
    ("user@bücher.example", _relay("xn--bcher-kva.example", "remote domain")),
    # Angle brackets are not Postfix's: ordinary characters, and never in a valid domain.
    ("<user@local.example>", _unresolved("invalid domain")),
    ("<user@remote.example>", _unresolved("invalid domain")),
    ("<user%remote.example@local.example>", _unresolved("invalid domain")),
    ("<@local.example:user@remote.example>", _unresolved("invalid domain")),
    ("<<user@local.example>>", _unresolved("invalid domain")),
    ("user@local.example>", _unresolved("invalid domain")),
    ("remote <user@local.example>", _unresolved("invalid domain")),
    ("<user@local.example", _local("local.example")),
    ("<postmaster>", _local(None, "bare local part")),
    # Empty and garbage.
    ("", _unresolved("empty address")),
    ("user@", _unresolved("empty domain")),
    ("@", _unresolved("empty domain")),
    ("user@exa mple.com", _unresolved("invalid domain")),
    ("user@local.example..", _unresolved("invalid domain")),
    ("user@.local.example", _unresolved("invalid domain")),
    ("user@local.example(comment)", _unresolved("invalid domain")),
    (
        "user(@remote.example)@local.example",
        _unresolved("invalid domain in sender-specified route"),
    ),
    (
        "user@remote.example,user@local.example",
        _unresolved("invalid domain in sender-specified route"),
    ),
    ("x" * 5000 + "@local.example", _unresolved("address too long")),
    (
        "user@[IPv6:::ffff:192.0.2.25]",
        _relay("[ipv6:::ffff:c000:219]", "address literal not listed"),
    ),
    ("user@local.example﹫remote.example", _unresolved("invalid domain")),
    ("!", _unresolved("empty domain in bang-path route")),
    ("%", _unresolved("empty domain in percent-hack route")),
    ("local.example!" * 12 + "user", _unresolved("too many routing hops")),
]


@pytest.mark.parametrize(("recipient", "expected"), RESOLVE_CASES)
def test_resolve_destination(recipient: str, expected: Destination) -> None:
    """Each address form of PRODUCT.md section 1 resolves to the documented destination."""
    assert resolve_destination(recipient, LOCAL) == expected


UNICODE_LOCAL = DomainSet(["Bücher.example", "xn--caf-dma.example", ".straße.example"])


@pytest.mark.parametrize(
    ("recipient", "expected"),
    [
        ("user@bücher.example", _local("xn--bcher-kva.example")),
        ("user@BÜCHER.EXAMPLE.", _local("xn--bcher-kva.example")),
        ("user@xn--bcher-kva.example", _local("xn--bcher-kva.example")),
        ("user@XN--BCHER-KVA.example", _local("xn--bcher-kva.example")),
        ("user@café.example", _local("xn--caf-dma.example")),
        ("user@CAFÉ.example", _local("xn--caf-dma.example")),
        ("user@mail.STRASSE.example", _relay("mail.strasse.example", "remote domain")),
        ("user@mail.STRAẞE.example", _local("mail.xn--strae-oqa.example")),
        ("user%café.example@bücher.example", _local("xn--caf-dma.example")),
        ("bücher.example!user", _local("xn--bcher-kva.example")),
        (
            "user%bucher.example@BÜCHER.example",
            _relay("bucher.example", "percent-hack route to bucher.example"),
        ),
        (
            "user@bücher.example.evil.example",
            _relay("xn--bcher-kva.example.evil.example", "remote domain"),
        ),
    ],
)
def test_resolve_destination_unicode(recipient: str, expected: Destination) -> None:
    """Unicode and A-label spellings of local domains, in any case, are the same domain."""
    assert resolve_destination(recipient, UNICODE_LOCAL) == expected


def test_resolve_destination_empty_domain_set() -> None:
    """With no local domains only bare local parts are local; every domain is remote."""
    nothing = DomainSet([])
    assert resolve_destination("postmaster", nothing) == _local(None, "bare local part")
    assert not resolve_destination("user@local.example", nothing).local
    assert not resolve_destination("local.example!user", nothing).local


_hostile_chars = st.one_of(
    st.sampled_from('@%!:"\\<>[](),;. ab'),
    st.characters(),
    st.characters(codec=None, categories=["Cs"]),
)


@settings(max_examples=500)
@given(st.one_of(st.text(), st.text(_hostile_chars, max_size=60)))
def test_resolve_destination_never_raises(text: str) -> None:
    """Arbitrary text, including lone surrogates and routing soup, never raises."""
    result = resolve_destination(text, LOCAL)
    assert isinstance(result, Destination)
    if result.domain is None and not result.local:
        assert result.reason


@settings(max_examples=1000)
@given(st.one_of(st.text(), st.text(_hostile_chars, max_size=60)))
def test_plain_address_shortcut_agrees_with_the_full_reading(recipient: str) -> None:
    """The memoized ``local@domain`` shortcut gives exactly the full reading's answer.

    Asked twice, so the second answer comes from the memo.
    """
    if not recipient or len(recipient) > 4096:
        return
    full = _resolve_routed(recipient, LOCAL)
    assert resolve_destination(recipient, LOCAL) == full
    assert resolve_destination(recipient, LOCAL) == full


def test_domain_memo_is_bounded() -> None:
    """A flood of unique domains never grows a DomainSet's memo beyond its two generations."""
    domains = DomainSet(["local.example"])
    for n in range(40_000):
        assert not resolve_destination(f"user@d{n}.example", domains).local
        assert len(domains._destinations) <= 8192
        assert len(domains._older_destinations) <= 8192
    assert resolve_destination("user@LOCAL.example", domains) == _local(
        "local.example", "local domain"
    )


def test_domain_memo_keeps_the_domains_in_use() -> None:
    """A domain asked again while the memo turns over is kept, and its answer never changes."""
    domains = DomainSet(["local.example"])
    steady = "user@LOCAL.example"
    first = resolve_destination(steady, domains)
    for n in range(30_000):
        resolve_destination(f"user@d{n}.example", domains)
        if n % 1000 == 0:
            assert resolve_destination(steady, domains) is first
    assert first == _local("local.example", "local domain")


_USERS = ["user", "postmaster", "first.last", "x_y+tag", "a b"]
_LOCAL_SPELLINGS = [
    "local.example",
    "LOCAL.Example.",
    "a.sub.local.example",
    "[192.0.2.25]",
    "[IPv6:2001:db8::25]",
    "[ipv6:2001:DB8:0::25]",
    "bücher.example",
    "XN--BCHER-KVA.example",
]
_REMOTE_SPELLINGS = [
    "remote.example",
    "REMOTE.example.",
    "local.example.remote.example",
    "sub.local.example",
    "local.exampl",
    "[192.0.2.1]",
    "[IPv6:2001:db8::1]",
    "bucher.example",
    "büchér.example",
    "example",
]
SAFETY_LOCAL = DomainSet(
    ["local.example", ".sub.local.example", "[192.0.2.25]", "[IPv6:2001:db8::25]", "Bücher.example"]
)
# Quoting ("user@remote.example"@local.example) is gone in Postfix's internal form: it
# arrives as the doubled @ of "at".
_OPERATIONS = ["at", "percent", "bang", "source-route"]


def _apply(address: str, operation: str, domain: str) -> str:
    """Route ``address`` through ``domain`` with one routing construct."""
    if operation == "at":
        return f"{address}@{domain}"
    if operation == "percent":
        return f"{address}%{domain}"
    if operation == "bang":
        return f"{domain}!{address}"
    if address.startswith("@"):
        return f"@{domain},{address}"
    return f"@{domain}:{address}"


@st.composite
def _routed_addresses(draw: st.DrawFn, domains: list[str]) -> tuple[str, list[str]]:
    address = draw(st.sampled_from(_USERS))
    used: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        domain = draw(st.sampled_from(domains))
        address = _apply(address, draw(st.sampled_from(_OPERATIONS)), domain)
        used.append(domain)
    return address, used


@settings(max_examples=1000)
@given(_routed_addresses(_LOCAL_SPELLINGS + _REMOTE_SPELLINGS))
def test_any_remote_hop_makes_a_relay_attempt(routed: tuple[str, list[str]]) -> None:
    """SAFETY: if any remote domain appears anywhere in a routed address, it is not local."""
    address, used = routed
    result = resolve_destination(address, SAFETY_LOCAL)
    if any(domain in _REMOTE_SPELLINGS for domain in used):
        assert not result.local, (address, result)


@st.composite
def _well_formed_local_routes(draw: st.DrawFn) -> str:
    """Addresses routed only through local domains, with unambiguous structure.

    ``%`` and ``!`` are applied only while no ``@`` is present: ``user@local%local`` has a
    domain containing ``%`` and is rightly unparseable.
    """
    address = draw(st.sampled_from(_USERS))
    for _ in range(draw(st.integers(1, 6))):
        domain = draw(st.sampled_from(_LOCAL_SPELLINGS))
        operations = _OPERATIONS if "@" not in address else ["at", "source-route"]
        address = _apply(address, draw(st.sampled_from(operations)), domain)
    return address


@settings(max_examples=500)
@given(_well_formed_local_routes())
def test_routes_through_local_domains_only_are_local(address: str) -> None:
    """Strictness has limits: well-formed routes through local domains only stay local."""
    result = resolve_destination(address, SAFETY_LOCAL)
    assert result.local, (address, result)
    assert result.domain is not None
    assert result.domain in SAFETY_LOCAL


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("xn--bcher-kva.example", "bücher.example"),
        ("mx.xn--bcher-kva.xn--l-0ga.example", "mx.bücher.öl.example"),
        ("local.example", None),  # nothing to spell differently
        ("[192.0.2.25]", None),
        ("xn--zz.example", None),  # an A-label that does not decode
        ("xn--strae-oqa.example", None),  # straße: its case fold is strasse, another domain
    ],
)
def test_unicode_form(domain: str, expected: str | None) -> None:
    """The U-label spelling of a normalized domain, or None where no such key is safe."""
    assert unicode_form(domain) == expected


def test_domain_set_exposes_exact_and_parent_entries() -> None:
    """``exact`` and ``parents`` are the normalized entries (parents without the dot)."""
    domains = DomainSet(["Local.Example", ".Sub.Example", "[IPv6:2001:DB8::25]", "bücher.example"])
    assert domains.exact == {"local.example", "[ipv6:2001:db8::25]", "xn--bcher-kva.example"}
    assert domains.parents == {"sub.example"}
