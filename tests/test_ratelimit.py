"""GCRA on integer microseconds: the arithmetic of policyd/ratelimit.py, tested exactly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from policyd.config import parse_config
from policyd.ratelimit import (
    Charged,
    Check,
    Limiter,
    MemoryStore,
    Outcome,
    Rate,
    RateError,
    RateLimits,
    applicable,
    check,
    limit_key,
    parse_rate,
    remaining,
)
from policyd.redis_store import BackendError, Breaker
from policyd.request import PolicyRequest

HOUR = 3_600_000_000
T0 = 1_796_000_000_000_000  # an arbitrary "now" in microseconds since the epoch


@pytest.mark.parametrize(
    ("text", "count", "period_us"),
    [
        ("200/1h", 200, HOUR),
        ("10/30s", 10, 30_000_000),
        ("5/m", 5, 60_000_000),
        (" 1 / 1d ", 1, 86_400_000_000),
    ],
)
def test_parse_rate(text: str, count: int, period_us: int) -> None:
    rate = parse_rate(text, burst=3)
    assert (rate.count, rate.period_us, rate.burst) == (count, period_us, 3)


@pytest.mark.parametrize("text", ["", "0/1h", "10/0h", "10", "10/1w", "-1/1h", "1.5/1h", "10/h/2"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(RateError):
        parse_rate(text)


def test_interval_is_rounded_up_never_faster_than_configured() -> None:
    assert Rate(200, HOUR).interval_us == 18_000_000  # exact
    assert Rate(7, HOUR).interval_us == 514_285_715  # 514,285,714.28... rounded up
    assert Rate(7, HOUR).interval_us * 7 >= HOUR
    assert Rate(200, HOUR, burst=50).tolerance_us == 49 * 18_000_000


def test_burst_then_one_per_interval() -> None:
    """200/1h with burst 50: 50 at once, the 51st refused 18 s short; one more every 18 s."""
    rate = Rate(200, HOUR, burst=50)
    tat = None
    for n in range(50):
        result = check(tat, T0, rate)
        assert result.allowed and result.remaining == 49 - n
        tat = result.tat
    assert tat == T0 + 50 * 18_000_000
    refused = check(tat, T0, rate)
    assert not refused.allowed and refused.tat == tat and refused.retry_after_us == 18_000_000
    assert not check(tat, T0 + 17_999_999, rate).allowed
    assert check(tat, T0 + 17_999_999, rate).retry_after_us == 1
    again = check(tat, T0 + 18_000_000, rate)
    assert again.allowed and again.remaining == 0


def test_refused_attempts_cost_nothing() -> None:
    rate = Rate(1, 60_000_000)  # 1/1m, burst 1
    first = check(None, T0, rate)
    for offset in range(0, 60_000_000, 7_000_000):  # retries every 7 s
        assert not check(first.tat, T0 + offset, rate).allowed
    assert check(first.tat, T0 + 60_000_000, rate).allowed  # not pushed back by the retries


def test_idle_key_is_full_again() -> None:
    rate = Rate(10, HOUR, burst=5)
    assert remaining(None, T0, rate) == 5
    assert remaining(T0 - 1, T0, rate) == 5  # tat in the past: full
    assert remaining(T0 + rate.tolerance_us, T0, rate) == 1
    assert remaining(T0 + rate.tolerance_us + 1, T0, rate) == 0


def _reference(times: list[int], rate: Rate) -> list[bool]:
    """A sliding-schedule reference: a request passes when, counting only the requests that
    passed, the bucket (capacity ``burst``, one token back every interval) holds a token."""
    tokens_us = rate.burst * rate.interval_us  # the bucket, in microseconds of credit
    level = tokens_us
    last = None
    out = []
    for now in times:
        if last is not None:
            level = min(tokens_us, level + (now - last))
        last = now
        if level >= rate.interval_us:
            level -= rate.interval_us
            out.append(True)
        else:
            out.append(False)
    return out


@given(
    count=st.integers(1, 50),
    period_s=st.integers(1, 3600),
    burst=st.integers(1, 20),
    gaps=st.lists(st.integers(0, 120_000_000), min_size=1, max_size=60),
)
def test_gcra_equals_a_token_bucket(count: int, period_s: int, burst: int, gaps: list[int]) -> None:
    """GCRA with tau = (B - 1) T is the token bucket of capacity B refilled one per T."""
    rate = Rate(count, period_s * 1_000_000, burst)
    times = []
    now = T0
    for gap in gaps:
        now += gap
        times.append(now)
    tat = None
    got = []
    for now in times:
        result = check(tat, now, rate)
        if result.allowed:
            tat = result.tat
        got.append(result.allowed)
    assert got == _reference(times, rate)


def test_all_or_nothing_across_limits() -> None:
    """Two limits on one request: when one refuses, the other is not charged."""
    store = MemoryStore()
    tight, loose = Rate(1, HOUR), Rate(100, HOUR, burst=100)
    request = [("per-user", "alice", loose), ("per-host", "192.0.2.7", tight)]
    assert [c.allowed for c in store.check_and_charge(request, T0)] == [True, True]
    charged = store.tat("per-user", "alice")
    results = store.check_and_charge(request, T0 + 1)
    assert [c.allowed for c in results] == [True, False]
    assert store.tat("per-user", "alice") == charged  # not charged by the refused request
    assert results[0].remaining == 99  # 100 - the one request charged
    assert results[1].retry_after_us == HOUR - 1


def test_reset_gives_a_full_bucket() -> None:
    store = MemoryStore()
    rate = Rate(1, HOUR)
    store.check_and_charge([("l", "k", rate)], T0)
    assert not store.check_and_charge([("l", "k", rate)], T0)[0].allowed
    assert store.reset("l", "k") and not store.reset("l", "k")
    assert store.check_and_charge([("l", "k", rate)], T0)[0].allowed


def test_store_is_bounded_and_drops_full_buckets_first() -> None:
    store = MemoryStore(max_keys=3)
    rate = Rate(1, 1_000_000)  # 1/1s
    for n in range(3):
        store.check_and_charge([("l", f"old{n}", rate)], T0)
    # Two seconds later every bucket is full again: they are dropped, not the new key refused.
    store.check_and_charge([("l", "new", rate)], T0 + 2_000_000)
    assert len(store) == 1 and store.tat("l", "new") is not None
    for n in range(10):
        assert store.check_and_charge([("l", f"flood{n}", rate)], T0 + 2_000_000)[0].allowed
        assert len(store) <= 3


def _limits(text: str) -> RateLimits:
    base = 'listen: {policy: "inet:127.0.0.1:10040"}\nlocal_domains: [local.example]\n'
    return parse_config(base + text).rate_limits


LIMITS = """
rate_limits:
  exempt: {client_networks: [192.0.2.0/28], sasl_usernames: [Boss@local.example]}
  limits:
    - {name: login, applies_to: [relay.allow.authenticated], key: sasl_username, rate: 10/1h}
    - {name: host, applies_to: [relay.allow.authenticated, relay.allow.client_networks],
       key: client_address, rate: 10/1h}
    - {name: net, applies_to: [relay.allow.client_networks], key: client_network, rate: 10/1h}
"""


def _request(client: str, login: str = "") -> PolicyRequest:
    return PolicyRequest.from_attributes(
        {"protocol_state": "RCPT", "client_address": client, "sasl_username": login}
    )


def test_keys_per_limit_kind() -> None:
    limits = _limits(LIMITS)
    pairs = applicable(limits, "relay.allow.authenticated", _request("198.51.100.7", "Alice@X"))
    assert [(limit.name, key) for limit, key in pairs] == [
        ("login", "alice@x"),
        ("host", "198.51.100.7"),
    ]
    pairs = applicable(limits, "relay.allow.client_networks", _request("::ffff:198.51.100.7"))
    assert [(limit.name, key) for limit, key in pairs] == [
        ("host", "198.51.100.7"),  # IPv4-mapped counts as IPv4
        ("net", "198.51.100.0/24"),
    ]
    pairs = applicable(limits, "relay.allow.client_networks", _request("2001:db8:1:2:3::4"))
    assert [key for _, key in pairs] == ["2001:db8:1:2:3::4", "2001:db8:1:2::/64"]


def test_exempt_and_unrelated_rules_count_nothing() -> None:
    limits = _limits(LIMITS)
    assert applicable(limits, "relay.allow.client_networks", _request("192.0.2.9")) == []
    authenticated = _request("198.51.100.7", "boss@LOCAL.example")
    assert applicable(limits, "relay.allow.authenticated", authenticated) == []
    assert applicable(limits, "relay.allow.server_addresses", _request("198.51.100.7")) == []
    # No parseable client address: the address-keyed limits have no key and are skipped.
    pairs = applicable(limits, "relay.allow.authenticated", _request("unknown", "alice"))
    assert [limit.name for limit, _ in pairs] == ["login"]


def _rcpt(login: str, instance: str, client: str = "198.51.100.7") -> PolicyRequest:
    return PolicyRequest.from_attributes(
        {
            "protocol_state": "RCPT",
            "client_address": client,
            "sasl_username": login,
            "instance": instance,
        }
    )


AUTH = "relay.allow.authenticated"


def test_messages_are_counted_once_per_instance() -> None:
    """count: messages, 2/1h: a message of any number of recipients costs one."""
    limiter = Limiter(
        _limits(
            "rate_limits:\n  limits:\n    - {name: msgs, applies_to: [relay.allow.authenticated],"
            " key: sasl_username, count: messages, rate: 2/1h, burst: 2}\n"
        ),
        MemoryStore(),
    )
    for recipient in range(5):  # message a: five recipients
        assert limiter.charge(AUTH, _rcpt("alice", "a"), T0 + recipient).limited is None
    assert limiter.charge(AUTH, _rcpt("alice", "b"), T0 + 10).limited is None  # message b
    refused = limiter.charge(AUTH, _rcpt("alice", "c"), T0 + 20)  # message c: over
    assert refused.limited is not None and refused.limited.name == "msgs"
    # Recipients of the messages already counted still pass; bob has his own budget.
    assert limiter.charge(AUTH, _rcpt("alice", "a"), T0 + 30).limited is None
    assert limiter.charge(AUTH, _rcpt("bob", "c"), T0 + 40).limited is None


def test_recipients_limit_and_message_limit_all_or_nothing() -> None:
    """When the recipient limit refuses, the message is not counted: its next recipient is
    checked against the message limit again (and the refused attempt cost nothing)."""
    limiter = Limiter(
        _limits(
            "rate_limits:\n  limits:\n"
            "    - {name: msgs, applies_to: [relay.allow.authenticated], key: sasl_username,"
            " count: messages, rate: 10/1h, burst: 10}\n"
            "    - {name: rcpts, applies_to: [relay.allow.authenticated], key: client_address,"
            " count: recipients, rate: 1/1h}\n"
        ),
        MemoryStore(),
    )
    first = limiter.charge(AUTH, _rcpt("alice", "a"), T0)
    assert first.limited is None and [limit.name for limit, _ in first.checks] == [
        "msgs",
        "rcpts",
    ]
    second = limiter.charge(AUTH, _rcpt("alice", "b"), T0 + 1)
    assert second.limited is not None and second.limited.name == "rcpts"
    msgs_check = dict((limit.name, result) for limit, result in second.checks)["msgs"]
    assert msgs_check.allowed and msgs_check.remaining == 9  # b not charged
    third = limiter.charge(AUTH, _rcpt("alice", "b"), T0 + 2)
    assert [limit.name for limit, _ in third.checks] == ["msgs", "rcpts"]  # b checked again


def test_no_applicable_limit_is_no_work() -> None:
    limiter = Limiter(_limits(LIMITS), MemoryStore())
    outcome = limiter.charge("relay.allow.server_addresses", _rcpt("", "x"), T0)
    assert outcome == Outcome(None)


# -- a shared store: its answers, its failures, the breaker --------------------------------------


class FakeShared:
    """A shared store whose answers the test gives (the real one runs in test_redis_store)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str, Rate]]] = []
        self.pending: list[defer.Deferred[Charged]] = []

    def check_and_charge(
        self, requests: Sequence[tuple[str, str, Rate]], *, charge: bool = True
    ) -> defer.Deferred[Charged]:
        self.calls.append(list(requests))
        answer: defer.Deferred[Charged] = defer.Deferred()
        self.pending.append(answer)
        return answer


SHARED = """
rate_limits:
  backend: {redis: "unix:/run/redis/redis.sock"}
  on_backend_error: POLICY
  limits:
    - {name: login, applies_to: [relay.allow.authenticated], key: sasl_username, rate: 1/1h}
"""


def _shared_limiter(policy: str) -> tuple[Limiter, FakeShared, Breaker, Clock]:
    clock = Clock()
    shared = FakeShared()
    breaker = Breaker(clock.seconds, failures=2, open_seconds=5.0)
    limiter = Limiter(
        _limits(SHARED.replace("POLICY", policy)), MemoryStore(), shared=shared, breaker=breaker
    )
    return limiter, shared, breaker, clock


def _fired(answer: Any) -> Outcome:
    assert isinstance(answer, defer.Deferred)
    results: list[Outcome] = []
    answer.addCallback(results.append)
    (outcome,) = results
    return outcome


def test_shared_store_answers() -> None:
    limiter, shared, _, _ = _shared_limiter("local")
    answer = limiter.charge(AUTH, _rcpt("Alice", "a"), T0)
    assert shared.calls == [[("login", "alice", Rate(1, HOUR))]]
    shared.pending[0].callback(Charged(T0, [Check(False, T0 + HOUR, 10, 0)]))
    outcome = _fired(answer)
    assert outcome.limited is not None and outcome.limited.name == "login"
    assert outcome.fallback is None and outcome.results() == [("login", "limited")]


@pytest.mark.parametrize(
    ("policy", "limited", "result"),
    [("local", [False, True], "degraded"), ("allow", [False, False], "error")],
)
def test_store_failure_answers_by_policy(policy: str, limited: list[bool], result: str) -> None:
    """local: the per-process buckets judge (1/1h: the second message is over); allow: not
    judged at all. Both fire; neither fails."""
    limiter, shared, _, _ = _shared_limiter(policy)
    outcomes = []
    for instance in ("a", "b"):
        answer = limiter.charge(AUTH, _rcpt("alice", instance), T0)
        shared.pending[-1].errback(BackendError("timeout", "no answer"))
        outcomes.append(_fired(answer))
    assert [outcome.limited is not None for outcome in outcomes] == limited
    assert all(outcome.fallback == policy for outcome in outcomes)
    assert outcomes[0].results() == [("login", result)]


def test_store_failure_with_defer() -> None:
    limiter, shared, _, _ = _shared_limiter("defer")
    answer = limiter.charge(AUTH, _rcpt("alice", "a"), T0)
    shared.pending[0].errback(BackendError("connection", "refused"))
    outcome = _fired(answer)
    assert outcome.limited is None and outcome.fallback == "defer"
    assert outcome.results() == [("login", "error")]


def test_open_breaker_answers_at_once_without_the_store() -> None:
    """Two failures open the breaker: from then on no call reaches the store and the answer is
    immediate, until the breaker lets one probe through after its open time."""
    limiter, shared, breaker, clock = _shared_limiter("local")
    for instance in ("a", "b"):
        answer = limiter.charge(AUTH, _rcpt(f"user-{instance}", instance), T0)
        shared.pending[-1].errback(BackendError("timeout", "no answer"))
        _fired(answer)
    assert breaker.is_open and len(shared.calls) == 2
    immediate = limiter.charge(AUTH, _rcpt("carol", "c"), T0)
    assert isinstance(immediate, Outcome) and immediate.fallback == "local"
    assert len(shared.calls) == 2
    clock.advance(5.0)
    probe = limiter.charge(AUTH, _rcpt("dave", "d"), T0)  # the one probe
    during = limiter.charge(AUTH, _rcpt("erin", "e"), T0)  # others: still at once
    assert isinstance(probe, defer.Deferred) and isinstance(during, Outcome)
    assert len(shared.calls) == 3
    shared.pending[-1].callback(Charged(T0, [Check(True, T0 + HOUR, 0, 0)]))
    assert _fired(probe).fallback is None and not breaker.is_open
    assert isinstance(limiter.charge(AUTH, _rcpt("fred", "f"), T0), defer.Deferred)


def test_breaker() -> None:
    clock = Clock()
    changes: list[bool] = []
    breaker = Breaker(clock.seconds, failures=3, open_seconds=2.0, on_change=changes.append)
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success in between: the count starts again
    breaker.failure()
    breaker.failure()
    assert breaker.allow() and not breaker.is_open
    breaker.failure()
    assert breaker.is_open and not breaker.allow() and changes == [True]
    clock.advance(1.999)
    assert not breaker.allow()
    clock.advance(0.001)
    assert breaker.allow()  # half-open: one probe
    assert not breaker.allow()
    breaker.failure()  # the probe failed: open again, for the whole open time
    assert not breaker.allow()
    clock.advance(2.0)
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow() and changes == [True, False]


@given(address=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_client_network_key_is_the_24_or_64(address: Any) -> None:
    """The key computed from the address text equals the network ``ipaddress`` gives."""
    import ipaddress

    limit = _limits(
        "rate_limits:\n  limits:\n    - {name: n, applies_to: [relay.allow.client_networks],"
        " key: client_network, rate: 1/1h}\n"
    ).limits[0]
    request = PolicyRequest.from_attributes({"client_address": str(address)})
    ip = request.client_ip
    assert ip is not None
    expected = ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 64}", strict=False)
    assert limit_key(limit, request) == str(expected)
