"""The shared store against a real redis-server: the script agrees with the in-process GCRA."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from policyd.ratelimit import Check, MemoryStore, Rate, RedisBackend
from policyd.redis_store import RedisStore
from tests import reactor_run
from tests.redis_server import RedisServer


def _store(reactor: Any, server: RedisServer, timeout: float = 0.5) -> RedisStore:
    return RedisStore(RedisBackend(server.address, timeout_seconds=timeout), reactor)


def test_charge_counts_in_redis_on_its_clock(redis_server: RedisServer) -> None:
    rate = Rate(3, 3_600_000_000, burst=2)  # 3/1h, burst 2

    @defer.inlineCallbacks
    def work(reactor: Any) -> Any:
        store = _store(reactor, redis_server)
        answers = []
        for _ in range(3):
            charged = yield store.check_and_charge([("user-hour", "alice", rate)])
            answers.append(charged)
        store.close()
        return answers

    first, second, third = reactor_run.run(work)
    assert [c.checks[0].allowed for c in (first, second, third)] == [True, True, False]
    assert [c.checks[0].remaining for c in (first, second, third)] == [1, 0, 0]
    # The third waits for one interval (1.2e9 us) less the time since the first.
    assert 0 < third.checks[0].retry_after_us <= rate.interval_us
    tat = int(redis_server.command("GET", "policyd:limit:user-hour:alice"))
    # GCRA: the first call starts at Redis's now, each allowed one adds one interval.
    assert tat == second.checks[0].tat == first.now_us + 2 * rate.interval_us
    ttl_ms = int(redis_server.command("PTTL", "policyd:limit:user-hour:alice"))
    assert 0 < ttl_ms <= (tat - third.now_us) // 1000 + 1


def test_peek_charges_nothing(redis_server: RedisServer) -> None:
    rate = Rate(1, 60_000_000)

    @defer.inlineCallbacks
    def work(reactor: Any) -> Any:
        store = _store(reactor, redis_server)
        peeked = yield store.check_and_charge([("l", "k", rate)], charge=False)
        charged = yield store.check_and_charge([("l", "k", rate)])
        refused = yield store.check_and_charge([("l", "k", rate)])
        existed = yield store.reset("l", "k")
        again = yield store.check_and_charge([("l", "k", rate)])
        store.close()
        return peeked, charged, refused, existed, again

    peeked, charged, refused, existed, again = reactor_run.run(work)
    assert peeked.checks[0].allowed and charged.checks[0].allowed
    assert not refused.checks[0].allowed
    assert existed is True and again.checks[0].allowed


# Sequences of (microseconds since the previous call, which limits the call meets).
_RATES = [Rate(2, 1_000_000, burst=3), Rate(5, 60_000_000, burst=1), Rate(7, 3_000_000, burst=7)]
_STEPS = st.lists(
    st.tuples(
        st.integers(0, 2_000_000),
        st.lists(st.sampled_from(range(len(_RATES))), min_size=1, max_size=3, unique=True),
        st.sampled_from(["a", "b"]),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=_STEPS)
def test_script_and_memory_store_agree(redis_server: RedisServer, steps: list[Any]) -> None:
    """The Redis script and ``MemoryStore`` give the same Check, call after call, for the same
    times and limits: allowed, tat, retry_after and remaining, all or nothing included."""
    redis_server.command("FLUSHALL")
    memory = MemoryStore()
    now = 1_700_000_000_000_000
    calls = []
    expected: list[list[Check]] = []
    for delay, chosen, key in steps:
        now += delay
        requests = [(f"limit{i}", key, _RATES[i]) for i in chosen]
        calls.append((now, requests))
        expected.append(memory.check_and_charge(requests, now))

    @defer.inlineCallbacks
    def work(reactor: Any) -> Any:
        store = _store(reactor, redis_server)
        got = []
        for at, requests in calls:
            keys = [f"policyd:limit:{limit}:{key}" for limit, key, _ in requests]
            args: list[str | int] = ["charge", at]
            for _, _, rate in requests:
                args += [rate.interval_us, rate.tolerance_us]
            charged = yield store.run_script(keys, args)
            got.append(charged.checks)
        store.close()
        return got

    assert reactor_run.run(work) == expected
