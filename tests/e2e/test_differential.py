"""policyd against Postfix's own relay checks, pair by pair, over real SMTP.

See tests/e2e/differential.py for the two listeners and the generators. The rule of the
comparison (PRODUCT.md §1: "policyd may be stricter, never looser"):

* a pair policyd accepts while Postfix refuses it as relaying fails the suite;
* a pair Postfix refuses before any relay check (bad syntax, ...) must get the same reply on
  both listeners (the same smtpd parsed it);
* a pair policyd refuses while Postfix accepts it must fall in one of the documented classes
  of ``STRICTER`` (docs/security.md), or the suite fails listing it.

The pairs are generated from a fixed seed (``POLICYD_DIFFERENTIAL_SEED``) and their number is
``POLICYD_DIFFERENTIAL_PAIRS`` (3,200 in the test command; the longer run in docs/security.md
sets more). The regression corpus (differential-corpus.jsonl) is replayed every time.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .differential import (
    ACCEPTED,
    OWN_LITERAL,
    RELAY_REFUSED,
    DecisionLog,
    DifferentialPostfix,
    Pair,
    corpus_selection,
    generate_pairs,
    policyd_config,
    read_corpus,
    run_pairs,
    write_corpus,
    write_rule_files,
)
from .policyd_process import PolicydProcess
from .postfix import free_port

PAIRS = int(os.environ.get("POLICYD_DIFFERENTIAL_PAIRS", "3200"))
SEED = int(os.environ.get("POLICYD_DIFFERENTIAL_SEED", "20261203"))
CORPUS = Path(__file__).with_name("differential-corpus.jsonl")


class Differential:
    """The running pair: the Postfix with both listeners and policyd behind one of them."""

    def __init__(self, postfix: DifferentialPostfix, policyd: PolicydProcess) -> None:
        self.postfix = postfix
        self.policyd = policyd
        self.log = DecisionLog(policyd.log_path)

    def run(self, pairs: list[Pair]) -> list[Pair]:
        run_pairs(self.postfix, self.log, pairs)
        return pairs


@pytest.fixture(scope="module")
def differential(e2e_dir: Path) -> Iterator[Differential]:
    rules = e2e_dir / "rules"
    write_rule_files(rules)
    port = free_port()
    postfix = DifferentialPostfix(port, rules, e2e_dir / "postfix")
    policyd = PolicydProcess(
        policyd_config(rules),
        e2e_dir / "policyd",
        port=port,
        socketmap=False,
        extra_args=["--log-format", "json"],
    )
    try:
        policyd.start()
        postfix.start()
        yield Differential(postfix, policyd)
    finally:
        postfix.stop()
        policyd.stop()


def describe(pair: Pair) -> str:
    decision = pair.decision or {}
    return (
        f"client={pair.client} rcpt=<{pair.recipient}> postfix={pair.oracle!r} "
        f"policyd={pair.policyd!r} policyd-saw={decision.get('recipient')!r} "
        f"rule={decision.get('rule')} destination={decision.get('destination')!r}"
    )


def _own_literal(pair: Pair) -> bool:
    return (pair.decision or {}).get("destination") == OWN_LITERAL


# Where policyd may refuse what Postfix accepts (PRODUCT.md §1; docs/security.md lists them).
STRICTER: dict[str, Callable[[Pair], bool]] = {
    # Postfix takes its own addresses (inet_interfaces) as local; policyd only the literals
    # local_domains lists, so a listener's address is never local by accident.
    "the server's own address literal, not in local_domains": _own_literal,
}


def judge(pairs: list[Pair]) -> list[str]:
    """Every pair that breaks the rule of the comparison, described."""
    problems: list[str] = []
    for pair in pairs:
        if pair.policyd == ACCEPTED and pair.oracle == RELAY_REFUSED:
            problems.append(f"LOOSER: {describe(pair)}")
        elif pair.policyd == RELAY_REFUSED and pair.oracle == ACCEPTED:
            if not any(rule(pair) for rule in STRICTER.values()):
                problems.append(f"STRICTER, unexplained: {describe(pair)}")
        elif pair.oracle != pair.policyd:
            # Refused before any relay check (syntax), refused for another reason, or
            # refused by one and deferred by the other: the same smtpd must answer alike.
            problems.append(f"DIFFERENT REPLY: {describe(pair)}")
    return problems


def test_generated_pairs_policyd_never_looser(differential: Differential) -> None:
    """Thousands of generated (client, recipient) pairs through both listeners: policyd never
    permits what Postfix refuses as relaying, and every stricter answer is a known class."""
    pairs = differential.run(generate_pairs(SEED, PAIRS))
    assert len(pairs) >= PAIRS
    outcomes = Counter((pair.oracle, pair.policyd) for pair in pairs)
    rules = Counter((pair.decision or {}).get("rule") for pair in pairs)
    summary = f"{len(pairs)} pairs, outcomes {dict(outcomes)}, policyd rules {dict(rules)}"
    problems = judge(pairs)
    assert not problems, summary + "\n" + "\n".join(problems[:50])
    # The comparison means something only if every side of it was exercised: a broken
    # oracle (refusing all, accepting all) or a policyd never asked fails here.
    assert outcomes[ACCEPTED, ACCEPTED] >= len(pairs) // 10, summary
    assert outcomes[RELAY_REFUSED, RELAY_REFUSED] >= len(pairs) // 10, summary
    for rule in ("local_domains", "relay.allow.client_networks", "relay.never.client_networks"):
        assert rules[rule] >= 10, summary
    assert rules["relay.default"] >= 10, summary
    if os.environ.get("POLICYD_DIFFERENTIAL_WRITE_CORPUS"):
        write_corpus(CORPUS, corpus_selection(pairs))


def test_regression_corpus_replays(differential: Differential) -> None:
    """Every pair kept in differential-corpus.jsonl gets the outcomes recorded for it, on
    both listeners, and passes the rule of the comparison."""
    corpus = read_corpus(CORPUS)
    assert len(corpus) >= 500, f"{CORPUS} holds only {len(corpus)} pairs"
    fresh = differential.run([pair for _, pair in corpus])
    changed = [
        f"recorded postfix={recorded.oracle!r} policyd={recorded.policyd!r}, now {describe(now)}"
        for recorded, now in zip((r for r, _ in corpus), fresh, strict=True)
        if (recorded.oracle, recorded.policyd) != (now.oracle, now.policyd)
    ]
    assert not changed, "\n".join(changed[:50])
    assert not judge(fresh)


def test_named_cases(differential: Differential) -> None:
    """The cases issue 9 names, decided as docs/security.md says, with the decision policyd
    logged (its reading of Postfix's internal form)."""
    outside, allowed = "203.0.113.5", "10.1.0.5"
    cases = [
        (outside, '"a\\"b"@local.example', ACCEPTED, 'a"b@local.example'),
        (outside, '""@local.example', ACCEPTED, "@local.example"),
        (outside, "<@local.example>", ACCEPTED, "@local.example"),
        (outside, "postmaster", ACCEPTED, None),  # smtpd accepts it before asking
        (outside, "user", ACCEPTED, "user"),
        (outside, "user@local\u3002example", RELAY_REFUSED, "user@local\u3002example"),
        (outside, "user%remote.example@local.example", RELAY_REFUSED, None),
        (allowed, "user%remote.example@local.example", ACCEPTED, None),
    ]
    pairs = differential.run([Pair(client, rcpt) for client, rcpt, _, _ in cases])
    for pair, (_, _, expected, seen) in zip(pairs, cases, strict=True):
        assert pair.oracle == expected, describe(pair)
        assert pair.policyd == expected, describe(pair)
        if seen is not None:
            assert (pair.decision or {}).get("recipient") == seen, describe(pair)
    own = differential.run([Pair(outside, f"user@{OWN_LITERAL}")])[0]
    assert (own.oracle, own.policyd) == (ACCEPTED, RELAY_REFUSED), describe(own)
