"""The in-process micro-benchmark: policyd's pure decision path, no sockets, no Twisted.

For each verdict type it builds a pool of distinct requests that ``decide()`` really puts in
that type (checked before timing), then times ``decide(config, PolicyRequest.from_attributes(
attributes))`` over many iterations, cycling through the pool. Comparing the small and the large
configuration shows whether a lookup slows down as the lists grow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from workload import EXPECTED, RequestFactory

from policyd.config import Config
from policyd.decision import decide
from policyd.request import PolicyRequest

# The verdict types timed, with a readable label, in table order.
MICRO_TYPES = (
    ("local_exact", "local: exact domain"),
    ("local_subdomain", "local: .parent subdomain"),
    ("allowed_network_v4", "allowed: client network (IPv4)"),
    ("allowed_network_v6", "allowed: client network (IPv6)"),
    ("allowed_authenticated", "allowed: authenticated"),
    ("denied_default", "denied: relay.default"),
    ("denied_never", "denied: never network"),
    ("skipped", "skipped: not RCPT"),
)

POOL_SIZE = 1000
# Each type is timed in REPEATS slices of iterations / REPEATS per configuration, the slices of
# the configurations interleaved (small, large, small, large, ...) so that anything else
# happening on the machine affects both alike. The best slice and the median are reported.
REPEATS = 7


@dataclass
class MicroResult:
    config: str
    category: str
    label: str
    iterations: int
    slices: list[float]  # seconds per decision, one per slice, sorted
    pool_size: int
    off_category: int  # generated requests that decide() put in another type (left out)

    @property
    def best_us(self) -> float:
        return self.slices[0] * 1e6

    @property
    def median_us(self) -> float:
        return self.slices[len(self.slices) // 2] * 1e6


def build_pool(
    config: Config, factory: RequestFactory, category: str, size: int
) -> tuple[list[dict[str, str]], int]:
    """``size`` requests that ``decide()`` puts in ``category``; and how many did not fit."""
    verdict, rule = EXPECTED[category]
    pool: list[dict[str, str]] = []
    off = 0
    attempts = 0
    while len(pool) < size and attempts < size * 10:
        attempts += 1
        attributes = factory.attributes(category)
        decision = decide(config, PolicyRequest.from_attributes(attributes))
        if decision.verdict.value == verdict and decision.rule.value == rule:
            pool.append(attributes)
        else:
            off += 1
    if not pool:
        raise RuntimeError(f"could not build any {category} request for this configuration")
    return pool, off


def time_slice(config: Config, pool: list[dict[str, str]], iterations: int) -> float:
    """Seconds per decision over ``iterations`` decisions, cycling through ``pool``."""
    from_attributes = PolicyRequest.from_attributes
    size = len(pool)
    rounds, rest = divmod(iterations, size)
    started = time.perf_counter()
    for _ in range(rounds):
        for attributes in pool:
            decide(config, from_attributes(attributes))
    for attributes in pool[:rest]:
        decide(config, from_attributes(attributes))
    return (time.perf_counter() - started) / iterations


def run_micro(
    configs: dict[str, tuple[Config, RequestFactory]], iterations: int
) -> list[MicroResult]:
    """Time every verdict type on every configuration (name -> (config, request factory))."""
    per_slice = max(1, iterations // REPEATS)
    results = []
    for category, label in MICRO_TYPES:
        pools = {
            name: build_pool(config, factory, category, POOL_SIZE)
            for name, (config, factory) in configs.items()
        }
        slices: dict[str, list[float]] = {name: [] for name in configs}
        for name, (config, _) in configs.items():  # warm-up
            time_slice(config, pools[name][0], min(per_slice, 500))
        for _ in range(REPEATS):
            for name, (config, _) in configs.items():
                slices[name].append(time_slice(config, pools[name][0], per_slice))
        for name in configs:
            pool, off = pools[name]
            results.append(
                MicroResult(
                    name,
                    category,
                    label,
                    per_slice * REPEATS,
                    sorted(slices[name]),
                    len(pool),
                    off,
                )
            )
    return results


# The lookups alone, isolated from request parsing: (key, label, source category, what).
LOOKUP_TYPES = (
    ("net_v4_hit", "client_networks: IPv4 hit", "allowed_network_v4", "ip"),
    ("net_v6_hit", "client_networks: IPv6 hit", "allowed_network_v6", "ip"),
    ("net_miss", "client_networks: miss", "denied_default", "ip"),
    ("dom_exact", "local_domains: exact hit", "local_exact", "domain"),
    ("dom_parent", "local_domains: .parent hit", "local_subdomain", "domain"),
    ("dom_miss", "local_domains: miss", "denied_default", "domain"),
)


def _lookup_slice(container: Any, keys: list[Any], iterations: int) -> float:
    """Seconds per ``key in container`` over ``iterations`` lookups, cycling through ``keys``."""
    rounds, rest = divmod(iterations, len(keys))
    started = time.perf_counter()
    for _ in range(rounds):
        for key in keys:
            key in container  # noqa: B015 (the lookup is what is timed)
    for key in keys[:rest]:
        key in container  # noqa: B015
    return (time.perf_counter() - started) / iterations


def run_lookups(
    configs: dict[str, tuple[Config, RequestFactory]], iterations: int
) -> list[MicroResult]:
    """Time ``address in relay.allow.client_networks`` and ``domain in local_domains`` alone."""
    per_slice = max(1, iterations // REPEATS)
    results = []
    for key, label, category, what in LOOKUP_TYPES:
        inputs: dict[str, tuple[Any, list[Any]]] = {}
        for name, (config, factory) in configs.items():
            keys: list[Any] = []
            for _ in range(POOL_SIZE):
                attributes = factory.attributes(category)
                if what == "ip":
                    keys.append(PolicyRequest.from_attributes(attributes).client_ip)
                else:
                    keys.append(attributes["recipient"].rpartition("@")[2])
            container = config.relay.allow_client_networks if what == "ip" else config.local_domains
            expected = not key.endswith("miss")
            found = sum(1 for k in keys if (k in container) == expected)
            inputs[name] = (container, keys)
            if found != len(keys):
                print(f"  ! {name} {label}: {len(keys) - found} keys not as expected", flush=True)
        slices: dict[str, list[float]] = {name: [] for name in configs}
        for name in configs:  # warm-up
            _lookup_slice(*inputs[name], min(per_slice, 500))
        for _ in range(REPEATS):
            for name in configs:
                slices[name].append(_lookup_slice(*inputs[name], per_slice))
        for name in configs:
            results.append(
                MicroResult(
                    name, key, label, per_slice * REPEATS, sorted(slices[name]), POOL_SIZE, 0
                )
            )
    return results
