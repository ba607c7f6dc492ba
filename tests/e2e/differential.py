"""Differential testing of policyd against Postfix's own relay checks.

One private Postfix has two smtpd listeners that differ only in their relay restrictions:

* the **oracle** (``ORACLE``): Postfix alone, ``permit_auth_destination`` (local mail),
  ``check_client_access cidr:never.cidr`` (the never-list, ``REJECT``), ``permit_mynetworks``
  (the allowed networks), ``reject_unauth_destination``;
* **policyd** (``POLICYD``): ``check_policy_service`` (policyd, with ``replies.local: OK``),
  then ``reject``: policyd's answer alone decides.

Both know the same local domains and networks, each written in its own notation
(``policyd_config`` and ``postfix_settings``). A loopback session claims any client
address with XCLIENT and sends many recipients in one transaction (the error and recipient
limits are raised), so both paths see exactly the same (client address, recipient) pairs,
parsed by the same smtpd. Every pair gets an outcome from each path (``oracle_outcome``,
``policyd_outcome``).

``generate_recipients`` and ``generate_clients`` build the pairs from every syntax Postfix
accepts and every notation policyd accepts (see their docstrings); ``judge`` in
test_differential.py applies the rule of the comparison.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .postfix import PostfixInstance

ORACLE = 0
POLICYD = 1

SENDER = "sender@sender.example"

# --------------------------------------------------------------------------- the rules, twice

# policyd's side, in policyd's notation. The file: lists are written by write_rule_files.
LOCAL_EXACT = ["local.example", "Local-Two.Example", "bücher.example", "xn--mnchen-3ya.example"]
LOCAL_PARENTS = ["hosted.example"]  # policyd ".hosted.example": its subdomains only
LOCAL_FILED = ["filed.example"]
LOCAL_LITERALS = ["[192.0.2.25]", "[IPv6:2001:db8::25]"]
# The server's own address (Postfix's inet_interfaces): Postfix takes [127.0.0.1] as local;
# policyd does not list it.
OWN_LITERAL = "[127.0.0.1]"

ALLOW_NETWORKS = ["10.1.0.0/16", "192.0.2.7", "2001:db8:1::/48"]
ALLOW_MASKED = ("172.16.0.0", "255.255.0.0")  # "172.16.0.0, MASK=255.255.0.0"
ALLOW_IP_MASKED = ("172.20.4.0", "255.255.252.0")  # "IP=172.20.4.0, MASK=255.255.252.0"
ALLOW_FILED = ["10.9.0.0/24", "2001:db8:9::7"]
NEVER_NETWORKS = ["10.1.2.0/24", "10.1.3.4", "2001:db8:1:5::/64"]
NEVER_FILED = ["172.16.99.0/24"]


def policyd_config(rules: Path) -> dict[str, Any]:
    """policyd's configuration for the differential (``listen`` is filled in by the
    harness); ``rules`` holds the file: lists written by write_rule_files."""
    return {
        "mode": "enforce",
        "local_domains": [
            *LOCAL_EXACT,
            *(f".{parent}" for parent in LOCAL_PARENTS),
            *LOCAL_LITERALS,
            f"file:{rules / 'local-domains.txt'}",
        ],
        "relay": {
            "allow": {
                "authenticated": False,
                "client_networks": [
                    *ALLOW_NETWORKS,
                    f"{ALLOW_MASKED[0]}, MASK={ALLOW_MASKED[1]}",
                    f"IP={ALLOW_IP_MASKED[0]}, MASK={ALLOW_IP_MASKED[1]}",
                    f"file:{rules / 'allowed-networks.txt'}",
                ],
            },
            "never": {
                "client_networks": [*NEVER_NETWORKS, f"file:{rules / 'never-networks.txt'}"],
            },
        },
        # Local mail is accepted by policyd's path itself (there is no reject_unauth_destination
        # behind it there): OK for local and allowed, the denial for the rest.
        "replies": {"denied": "550 5.7.1 Relaying Denied", "allowed": "OK", "local": "OK"},
    }


def _masked(pair: tuple[str, str]) -> str:
    return str(ipaddress.ip_network(f"{pair[0]}/{pair[1]}"))


def _postfix_network(entry: str) -> str:
    """A network in Postfix's mynetworks notation (IPv6 in brackets)."""
    network = ipaddress.ip_network(entry)
    if network.version == 6:
        return f"[{network.network_address}]/{network.prefixlen}"
    return str(network)


def write_rule_files(rules: Path) -> None:
    """The file: lists of both sides (policyd's and the oracle's notation)."""
    rules.mkdir(parents=True, exist_ok=True)
    rules.chmod(0o755)
    (rules / "local-domains.txt").write_text(
        "# policyd local domains from a file\n" + "".join(f"{d}\n" for d in LOCAL_FILED)
    )
    (rules / "allowed-networks.txt").write_text(
        "# allowed networks from a file\n" + "".join(f"{n}  # comment\n" for n in ALLOW_FILED)
    )
    (rules / "never-networks.txt").write_text("".join(f"{n}\n" for n in NEVER_FILED))
    # The oracle's side: mynetworks reads a file of patterns; the never-list is a cidr table.
    (rules / "postfix-mynetworks").write_text(
        "".join(f"{_postfix_network(n)}\n" for n in ALLOW_FILED)
    )
    (rules / "never.cidr").write_text(
        "".join(
            f"{ipaddress.ip_network(n)} REJECT never-listed client\n"
            for n in [*NEVER_NETWORKS, *NEVER_FILED]
        )
    )
    # mydestination is a string list (exact names): the subdomains take a regexp table.
    (rules / "local-parents.regexp").write_text(
        "".join(f"/\\.{re.escape(parent)}$/ OK\n" for parent in LOCAL_PARENTS)
    )
    for path in rules.iterdir():
        path.chmod(0o644)


def postfix_settings(rules: Path) -> str:
    """main.cf settings that give Postfix's own checks the same rules as policyd_config."""
    # Postfix folds case but does not map U-labels to A-labels: an administrator lists both.
    exact: list[str] = []
    for domain in (d.lower() for d in LOCAL_EXACT + LOCAL_FILED):
        alabel = domain.encode("idna").decode("ascii")
        unicode = domain.encode("ascii").decode("idna") if domain.isascii() else domain
        exact += dict.fromkeys([alabel, unicode])
    mynetworks = [
        *(_postfix_network(n) for n in ALLOW_NETWORKS),
        _masked(ALLOW_MASKED),
        _masked(ALLOW_IP_MASKED),
        str(rules / "postfix-mynetworks"),
    ]
    return "\n".join(
        [
            "# ---- tests/e2e/differential.py: the same rules as policyd's, in Postfix's terms",
            "inet_protocols = all",
            # A bare local part is completed with @$myorigin; policyd takes it as local.
            "myorigin = local.example",
            # policyd's local domains are final destinations ("this server accepts mail for
            # them"), so ".hosted.example" is in mydestination too, as a regexp table (in
            # mydestination ".parent" matches nothing). As relay_domains, Postfix would refuse
            # any routed address to them (user%local.example@a.hosted.example), which policyd
            # follows to its end.
            "mydestination = "
            + ", ".join([*exact, f"regexp:{rules / 'local-parents.regexp'}", *LOCAL_LITERALS]),
            "relay_domains =",
            # Address literals of these are local (like inet_interfaces' own 127.0.0.1).
            "proxy_interfaces = 192.0.2.25, 2001:db8::25",
            f"mynetworks = {', '.join(mynetworks)}",
            "smtpd_authorized_xclient_hosts = 127.0.0.1",
            # One transaction tries thousands of recipients.
            "smtpd_recipient_limit = 100000",
            "smtpd_soft_error_limit = 100000",
            "smtpd_hard_error_limit = 100000",
            "smtpd_error_sleep_time = 0",
            "smtpd_junk_command_limit = 100000",
            # Every transaction is abandoned at QUIT, so qmgr returns no flow-control tokens:
            # after the first hundred, cleanup paused in_flow_delay (1s) before each one.
            "in_flow_delay = 0",
            "smtpd_recipient_restrictions =",
            "oracle_relay_restrictions = permit_auth_destination,"
            f" check_client_access cidr:{rules / 'never.cidr'},"
            " permit_mynetworks, reject_unauth_destination",
            "policyd_relay_restrictions = check_policy_service"
            " { inet:127.0.0.1:$differential_policy_port, timeout=10s,"
            " { default_action = 451 4.3.5 policyd unavailable } }, reject",
            "",
        ]
    )


class DifferentialPostfix(PostfixInstance):
    """A private Postfix with the oracle listener and the policyd listener (no shipped
    main.cf or master.cf: the differential compares decisions, not the shipped placement)."""

    def __init__(self, policy_port: int, rules: Path, basedir: Path) -> None:
        super().__init__(
            policy_port,
            listeners=[("127.0.0.1", _free_port()), ("127.0.0.1", _free_port())],
            sasl=False,
            basedir=basedir,
        )
        self.rules = rules

    def shipped_relay_settings(self) -> str:
        return f"differential_policy_port = {self.policy_port}\n" + postfix_settings(self.rules)

    def shipped_master_cf(self) -> str:
        return ""

    def _master_cf(self) -> str:
        text = super()._master_cf()
        for index, name in ((ORACLE, "oracle"), (POLICYD, "policyd")):
            address, port = self.listeners[index]
            line = f"{address}:{port} inet n - n - - smtpd"
            text = text.replace(
                line, f"{line}\n  -o smtpd_relay_restrictions=${name}_relay_restrictions", 1
            )
        return text


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------- SMTP


@dataclasses.dataclass(frozen=True)
class Reply:
    """One SMTP reply: the code and the text of its last line."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SmtpSession:
    """A raw SMTP client (bytes, pipelined RCPTs) on one listener, as one claimed client."""

    def __init__(self, address: tuple[str, int], timeout: float = 60) -> None:
        self._sock = socket.create_connection(address, timeout=timeout)
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def reply(self) -> Reply:
        while True:
            line = self._file.readline(65536)
            if not line:
                raise ConnectionError("the SMTP server closed the connection")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text[3:4] != "-":
                return Reply(int(text[:3]), text[4:])

    def command(self, line: str) -> Reply:
        self._sock.sendall(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def expect(self, line: str, code: int) -> None:
        got = self.command(line)
        if got.code != code:
            raise AssertionError(f"{line!r}: expected {code}, got {got}")

    def start(self, client: str) -> None:
        """Greeting, EHLO, XCLIENT ADDR=client (the server greets again), EHLO, MAIL."""
        greeting = self.reply()
        if greeting.code != 220:
            raise AssertionError(f"greeting {greeting}")
        self.expect("EHLO differential.test", 250)
        addr = f"IPV6:{client}" if ":" in client else client
        self.expect(f"XCLIENT ADDR={addr} NAME=[UNAVAILABLE]", 220)
        self.expect("EHLO differential.test", 250)
        self.expect(f"MAIL FROM:<{SENDER}> SMTPUTF8", 250)

    def recipients(self, recipients: Sequence[str], batch: int = 200) -> list[Reply]:
        """RCPT TO for each, pipelined in batches; one reply per recipient, in order."""
        replies: list[Reply] = []
        for start in range(0, len(recipients), batch):
            chunk = recipients[start : start + batch]
            self._sock.sendall(b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in chunk))
            replies.extend(self.reply() for _ in chunk)
        return replies


def ask(
    postfix: PostfixInstance, listener: int, client: str, recipients: Sequence[str]
) -> list[Reply]:
    """Every recipient through one listener in one transaction claimed by ``client``."""
    session = SmtpSession(postfix.listeners[listener])
    try:
        session.start(client)
        replies = session.recipients(recipients)
        session.command("QUIT")
        return replies
    finally:
        session.close()


# ---------------------------------------------------------------------------------- judging

ACCEPTED = "accepted"
RELAY_REFUSED = "relay refused"


def oracle_outcome(reply: Reply) -> str:
    """``accepted``, ``relay refused`` (reject_unauth_destination or the never-list), or
    the reply itself (refused by smtpd before any relay check: bad syntax and the like)."""
    if reply.code == 250:
        return ACCEPTED
    if reply.code == 554 and (
        reply.text.endswith("Relay access denied") or reply.text.endswith("never-listed client")
    ):
        return RELAY_REFUSED
    return str(reply)


def policyd_outcome(reply: Reply) -> str:
    """``accepted``, ``relay refused`` (policyd's denial), or the reply itself."""
    if reply.code == 250:
        return ACCEPTED
    if (
        reply.code == 550
        and reply.text.startswith("5.7.1 ")
        and reply.text.endswith("Relaying Denied")
    ):
        return RELAY_REFUSED
    return str(reply)


@dataclasses.dataclass
class Pair:
    """One (client, recipient) pair and what each path answered."""

    client: str
    recipient: str
    oracle: str = ""
    policyd: str = ""
    # policyd's decision log entry for the request (its recipient is Postfix's internal
    # form), when policyd was asked.
    decision: dict[str, str] | None = None


class DecisionLog:
    """policyd's decision entries for RCPT requests, read from its ``--log-format json`` log
    in the order they were written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._pending = b""
        self._entries: list[dict[str, str]] = []

    def skip_existing(self) -> None:
        """Forget what is logged so far (a run's entries start after this)."""
        self._read()
        self._entries.clear()

    def _read(self) -> None:
        with self.path.open("rb") as stream:
            stream.seek(self._offset)
            chunk = stream.read()
        self._offset += len(chunk)
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if line.startswith(b"{"):
                entry = json.loads(line)
                if entry.get("event") == "decision" and entry.get("state") == "RCPT":
                    self._entries.append(entry)

    def take(self, count: int, timeout: float = 20) -> list[dict[str, str]]:
        """The next ``count`` entries, waiting (bounded) for policyd to flush them."""
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            if len(self._entries) >= count:
                taken, self._entries = self._entries[:count], self._entries[count:]
                return taken
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"policyd logged {len(self._entries)} RCPT decisions, {count} expected"
                )
            time.sleep(0.02)


def _postmaster(recipient: str) -> bool:
    """smtpd accepts a bare ``postmaster`` (RFC 5321 §4.5.1) before any restriction: no
    policy request is made for it."""
    return recipient.lower() == "postmaster"


def run_pairs(postfix: PostfixInstance, log: DecisionLog, pairs: Sequence[Pair]) -> None:
    """Send every pair through both listeners; fill in the outcomes and policyd's decisions.

    The pairs go one client at a time, in order, so policyd's decision entries are in the
    same order as the replies that came from policyd (accepted or denied by it).
    """
    by_client: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_client.setdefault(pair.client, []).append(pair)
    log.skip_existing()
    for client, group in by_client.items():
        recipients = [pair.recipient for pair in group]
        for pair, reply in zip(group, ask(postfix, ORACLE, client, recipients), strict=True):
            pair.oracle = oracle_outcome(reply)
        asked = []
        for pair, reply in zip(group, ask(postfix, POLICYD, client, recipients), strict=True):
            pair.policyd = policyd_outcome(reply)
            if pair.policyd in (ACCEPTED, RELAY_REFUSED) and not _postmaster(pair.recipient):
                asked.append(pair)
        for pair, entry in zip(asked, log.take(len(asked)), strict=True):
            pair.decision = entry


# ------------------------------------------------------------------------------- generating

_DOTS = ("\uff0e", "\u3002", "\uff61")  # fullwidth full stop, ideographic, halfwidth ideographic

# Domains as a recipient may write them: local (exact, from the file, subdomains of the
# parent, Unicode and A-label forms, listed literals in several spellings) and not local
# (the parent itself, look-alikes, suffix tricks, unlisted and own literals, broken names).
LOCAL_SPELLINGS = [
    "local.example",
    "local-two.example",
    "filed.example",
    "bücher.example",
    "xn--bcher-kva.example",
    "münchen.example",
    "xn--mnchen-3ya.example",
    "mail.hosted.example",
    "a.b.hosted.example",
    "[192.0.2.25]",
    "[IPv6:2001:db8::25]",
    "[ipv6:2001:DB8::25]",
    "[IPv6:2001:db8:0:0:0:0:0:25]",
    "[IPv6:2001:0db8::0025]",
    "[2001:db8::25]",
]
REMOTE_SPELLINGS = [
    "remote.example",
    "hosted.example",
    "local.example.remote.example",
    "remotelocal.example",
    "local.example.hosted.example.remote.example",
    "bücher.remote.example",
    "xn--bcher-kva.remote.example",
    "local..example",
    "-local.example",
    "local_example",
    "[192.0.2.99]",
    "[IPv6:2001:db8::99]",
    OWN_LITERAL,
    "[IPv6:::ffff:192.0.2.25]",
    "[192.0.2.025]",
    "[local.example]",
    "[IPv6:192.0.2.25]",
]


def spell(rng: random.Random, domain: str) -> str:
    """``domain`` in a random spelling: letter case and one trailing dot (the same domain to
    both), or Unicode full stops for some ASCII dots (UTS #46 maps them to ``.``, Postfix does
    not: another domain to both)."""
    choice = rng.randrange(6)
    if choice == 1:
        domain = domain.upper()
    elif choice == 2:
        domain = "".join(c.upper() if rng.random() < 0.5 else c for c in domain)
    elif choice == 3 and not domain.startswith("["):
        domain += "."
    elif choice == 4 and not domain.startswith("["):
        dot = rng.choice(_DOTS)
        domain = domain.replace(".", dot, 1 + rng.randrange(domain.count(".") or 1))
    return domain


LOCAL_PARTS = [
    "user",
    "First.Last+tag",
    "postmaster",
    '"quoted user"',
    '"a\\"b"',
    '"a\\\\b"',
    '""',
    '"user@remote.example"',
    '"user%remote.example"',
    '"remote.example!user"',
    '"user@local.example"',
    '"@"',
    "user%remote.example",
    "remote.example!user",
    "user%local.example",
    "local.example!user",
    "user%remote.example%local.example",
    "local.example!remote.example!user",
    "user%",
    "!user",
    "a!b%c",
    "user\\@remote.example",
]


def _local_part(rng: random.Random) -> str:
    return rng.choice(LOCAL_PARTS)


def _domain(rng: random.Random) -> str:
    pool = LOCAL_SPELLINGS if rng.random() < 0.6 else REMOTE_SPELLINGS
    return spell(rng, rng.choice(pool))


def _any_domain(rng: random.Random) -> str:
    return spell(rng, rng.choice(LOCAL_SPELLINGS + REMOTE_SPELLINGS))


def recipient(rng: random.Random) -> str:
    """One recipient address, in one of the forms a relay attempt can take."""
    form = rng.randrange(10)
    if form <= 4:
        return f"{_local_part(rng)}@{_domain(rng)}"
    if form == 5:  # doubled @
        return f"{_local_part(rng)}@{_any_domain(rng)}@{_domain(rng)}"
    if form == 6:  # source route, one or two hops
        hops = ",".join(f"@{_any_domain(rng)}" for _ in range(1 + rng.randrange(2)))
        return f"{hops}:{_local_part(rng)}@{_domain(rng)}"
    if form == 7:  # no @ at all: a bare local part, a bang path, a percent hack
        return _local_part(rng)
    if form == 8:  # routes with and without @ around a local domain
        local = spell(rng, rng.choice(LOCAL_SPELLINGS))
        other = _any_domain(rng)
        return rng.choice(
            [
                f"user%{other}@{local}",
                f"{other}!user@{local}",
                f"user%{other}",
                f"{other}!user",
                f"user%{other}%{local}",
                f"{local}!{other}!user",
            ]
        )
    return rng.choice(['""@local.example', "@local.example", "<@local.example>", "local.example"])


def generate_recipients(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct recipients (see ``recipient``)."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(recipient(rng), None)
    return list(seen)


def _edges(network: str) -> list[str]:
    """Addresses at and just beyond the edges of ``network``, and one inside."""
    net = ipaddress.ip_network(network)
    first, last = int(net.network_address), int(net.broadcast_address)
    cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
    top = 2**32 - 1 if net.version == 4 else 2**128 - 1
    points = {first, last, (first + last) // 2, max(first - 1, 0), min(last + 1, top)}
    return [str(cls(point)) for point in sorted(points)]


def generate_clients(rng: random.Random, extra: int) -> list[str]:
    """Clients at the edges of every allowed and never network (the holes the never-list
    carves in allowed networks included), outside addresses, and ``extra`` random
    addresses near the listed networks."""
    networks = [
        *ALLOW_NETWORKS,
        _masked(ALLOW_MASKED),
        _masked(ALLOW_IP_MASKED),
        *ALLOW_FILED,
        *NEVER_NETWORKS,
        *NEVER_FILED,
    ]
    clients: dict[str, None] = {}
    for network in networks:
        for address in _edges(network):
            clients.setdefault(address, None)
    for address in ("203.0.113.5", "2001:db8:ff::1", "127.0.0.1", "0.0.0.0"):
        clients.setdefault(address, None)
    for _ in range(extra):
        net = ipaddress.ip_network(rng.choice(networks))
        spread = max(net.num_addresses, 256)
        point = int(net.network_address) - spread // 2 + rng.randrange(2 * spread)
        cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        clients.setdefault(str(cls(point)), None)
    return list(clients)


# The cases issue 9 names, tried from every client: an escaped quote in a quoted local part
# (Postfix passes a"b@local.example on), the empty local part in both spellings (""@ and the
# internal @local.example), <@local.example> (RCPT TO:<<@local.example>>), the server's own
# address literal, a bare local part, and a domain with an ideographic full stop.
NAMED_RECIPIENTS = [
    '"a\\"b"@local.example',
    '""@local.example',
    "@local.example",
    "<@local.example>",
    f"user@{OWN_LITERAL}",
    "postmaster",  # accepted by smtpd itself, policyd is not asked
    "user@local\u3002example",
    "user%remote.example@local.example",
    "user@remote.example",
]


def generate_pairs(seed: int, count: int) -> list[Pair]:
    """At least ``count`` pairs: every client with NAMED_RECIPIENTS and a random sample of
    the generated recipients."""
    rng = random.Random(seed)
    clients = generate_clients(rng, extra=20)
    per_client = -(-count // len(clients)) - len(NAMED_RECIPIENTS)
    generated = generate_recipients(rng, max(per_client * 4, 200))
    recipients = [r for r in generated if r not in NAMED_RECIPIENTS]
    return [
        Pair(client, recipient)
        for client in clients
        for recipient in [*NAMED_RECIPIENTS, *rng.sample(recipients, max(per_client, 0))]
    ]


def corpus_selection(pairs: Sequence[Pair]) -> list[Pair]:
    """The pairs worth keeping: every NAMED_RECIPIENTS pair (all clients, the network edges)
    and, for every other recipient, its first pair per distinct pair of outcomes."""
    kept: dict[tuple[str, ...], Pair] = {}
    for pair in pairs:
        if pair.recipient in NAMED_RECIPIENTS:
            key: tuple[str, ...] = (pair.client, pair.recipient)
        else:
            key = (pair.recipient, str(pair.oracle), str(pair.policyd))
        kept.setdefault(key, pair)
    return list(kept.values())


def write_corpus(path: Path, pairs: Sequence[Pair]) -> None:
    """One JSON object per line: client, recipient, and both outcomes as recorded."""
    with path.open("w", encoding="utf-8") as out:
        for pair in pairs:
            record = {
                "client": pair.client,
                "recipient": pair.recipient,
                "postfix": pair.oracle,
                "policyd": pair.policyd,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_corpus(path: Path) -> list[tuple[Pair, Pair]]:
    """(recorded, fresh) per corpus line: the recorded outcomes, and a pair to run."""
    result: list[tuple[Pair, Pair]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        recorded = Pair(record["client"], record["recipient"])
        recorded.oracle, recorded.policyd = record["postfix"], record["policyd"]
        result.append((recorded, Pair(record["client"], record["recipient"])))
    return result
