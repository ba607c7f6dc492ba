"""PolicyService with its limits in a real redis-server: shared answers, and every way Redis
can fail (stopped, hung by SIGSTOP, CLIENT PAUSE), the fallbacks, and the recovery.

Nothing here is timed: "costs nothing once detected" is shown by the answers being immediate
(``handle`` returns the action itself, no Deferred) and by the store not being called.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer

from policyd.config import load_config
from policyd.metrics import Metrics
from policyd.service import PolicyService
from tests import reactor_run
from tests.redis_server import RedisServer

CONFIG = """
listen: {policy: "inet:127.0.0.1:10040"}
local_domains: [local.example]
relay:
  allow: {client_networks: [192.0.2.0/24], authenticated: true}
  never: {client_networks: [192.0.2.128/25]}
rate_limits:
  backend: {redis: "ADDRESS", timeout: 0.05}
  on_backend_error: POLICY
  limits:
    - {name: host, applies_to: [relay.allow.client_networks], key: client_address,
       rate: 3/1h, burst: 3}
"""

ALLOWED = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "client_address": "192.0.2.7",
    "recipient": "user@remote.example",
    "sasl_username": "",
}
#: In an allowed network, but also in relay.never: denied whatever else matches.
DENIED = dict(ALLOWED, client_address="192.0.2.200")
DENY = "550 5.7.1 Relaying Denied"


@pytest.fixture
def make(tmp_path: Path, redis_server: RedisServer) -> Iterator[Any]:
    services: list[PolicyService] = []

    def build(reactor: Any, policy: str = "local") -> PolicyService:
        path = tmp_path / "policyd.yaml"
        path.write_text(CONFIG.replace("ADDRESS", redis_server.address).replace("POLICY", policy))
        service = PolicyService(str(path), load_config(path), reactor, Metrics(CollectorRegistry()))
        services.append(service)
        return service

    yield build
    for service in services:
        if service.redis is not None:
            service.redis.close()


def answer(service: PolicyService, attributes: dict[str, str]) -> defer.Deferred[str]:
    return defer.maybeDeferred(service.handle, attributes)


def fail(redis_server: RedisServer, failure: str) -> None:
    """Stop Redis, hang it (SIGSTOP) or pause it (CLIENT PAUSE)."""
    if failure == "paused":
        # Long enough for a test (three 50 ms deadlines), short enough to end by itself:
        # while paused Redis answers no client, a CLIENT UNPAUSE included.
        redis_server.command("CLIENT", "PAUSE", "3000", "ALL")
    elif failure == "hung":
        redis_server.pause()
    else:
        redis_server.stop()


def sample(service: PolicyService, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


def test_limits_are_kept_in_redis(make: Any, redis_server: RedisServer) -> None:
    @defer.inlineCallbacks
    def work(reactor: Any) -> Any:
        service = make(reactor)
        answers = []
        for _ in range(4):
            answers.append((yield answer(service, ALLOWED)))
        return service, answers, sample(service, "policyd_rate_limit_backend_up")

    service, answers, up = reactor_run.run(work)
    assert answers == ["OK"] * 3 + ["450 4.7.1 Sending limit exceeded, try again later"]
    assert redis_server.command("EXISTS", "policyd:limit:host:192.0.2.7") == "1"
    assert sample(service, "policyd_rate_limit_checks_total", limit="host", result="allowed") == 3
    assert sample(service, "policyd_rate_limit_checks_total", limit="host", result="limited") == 1
    assert sample(service, "policyd_rate_limit_backend_duration_seconds_count") == 4
    assert up == 1


@pytest.mark.parametrize("failure", ["stopped", "hung", "paused"])
@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # local: the per-process buckets (3/1h, full again) judge: 3 allowed, then over.
        ("local", ["OK"] * 3 + ["450 4.7.1 Sending limit exceeded, try again later"] * 3),
        ("defer", ["451 4.3.0 Sending limits cannot be checked now, try again later"] * 6),
        ("allow", ["OK"] * 6),
    ],
)
def test_redis_down_falls_back_and_never_allows_a_denial(
    make: Any, redis_server: RedisServer, failure: str, policy: str, expected: list[str]
) -> None:
    """Redis stopped, hung (SIGSTOP) or paused (CLIENT PAUSE): the allowed relays are answered
    by on_backend_error; the denials are answered at once, as always; after three failures
    the breaker opens and the answers are immediate, the store no longer called."""
    fail(redis_server, failure)

    @defer.inlineCallbacks
    def work(reactor: Any) -> Any:
        service = make(reactor, policy)
        answers = []
        denied = []
        immediate = []
        for _ in range(6):
            denial = service.handle(DENIED)
            denied.append(denial)
            reply = service.handle(ALLOWED)
            immediate.append(isinstance(reply, str))
            answers.append((yield defer.maybeDeferred(lambda r=reply: r)))
        return service, answers, denied, immediate

    try:
        service, answers, denied, immediate = reactor_run.run(work)
    finally:
        if failure == "hung":
            redis_server.resume()
    assert denied == [DENY] * 6  # strings: never waited for Redis
    assert answers == expected
    assert immediate == [False] * 3 + [True] * 3  # three tries, then the breaker is open
    errors = sum(
        sample(service, "policyd_rate_limit_backend_errors_total", reason=reason)
        for reason in ("connection", "timeout", "response")
    )
    assert errors == 3
    expected_reason = "connection" if failure == "stopped" else "timeout"
    assert sample(service, "policyd_rate_limit_backend_errors_total", reason=expected_reason) == 3
    assert sample(service, "policyd_rate_limit_backend_degraded") == 1
    result = "degraded" if policy == "local" else "error"
    assert sample(service, "policyd_rate_limit_checks_total", limit="host", result=result) == 6


@pytest.mark.parametrize("failure", ["stopped", "hung"])
def test_recovery_when_redis_returns(make: Any, redis_server: RedisServer, failure: str) -> None:
    """Once Redis answers again, the next probe (after the breaker's open time) closes the
    breaker and the limits are shared again."""
    fail(redis_server, failure)

    @defer.inlineCallbacks
    def work(reactor: Any) -> Any:
        service = make(reactor)
        for _ in range(3):
            yield answer(service, ALLOWED)
        assert sample(service, "policyd_rate_limit_backend_degraded") == 1
        if failure == "hung":
            redis_server.resume()
        else:
            redis_server.start()
        yield reactor_run.sleep(reactor, 1.05)  # the breaker's open time (1 s)
        reply = yield answer(service, dict(ALLOWED, client_address="192.0.2.8"))
        return service, reply, sample(service, "policyd_rate_limit_backend_up")

    service, reply, up = reactor_run.run(work)
    assert reply == "OK"
    assert sample(service, "policyd_rate_limit_backend_degraded") == 0
    assert up == 1
    assert redis_server.command("EXISTS", "policyd:limit:host:192.0.2.8") == "1"
    assert sample(service, "policyd_rate_limit_checks_total", limit="host", result="allowed") == 1
