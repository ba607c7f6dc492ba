"""Prometheus metrics. The registry is passed in, so tests and a service each own theirs.

Names and labels are fixed by PRODUCT.md §3. Labels are bounded: verdict, rule, result, map,
reason, listener — never an address or a domain.

The counters touched by every request (requests, decisions, their duration, outbound
selections, socketmap lookups) are plain integers in ``RequestCounts``, incremented on the
reactor thread without a lock; a custom collector turns them into metric families when
Prometheus scrapes. The rest are ordinary prometheus-client metrics.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Iterator

import twisted
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from policyd import __version__
from policyd.decision import Rule, Verdict
from policyd.outbound import AUTH_KINDS, AuthKind
from policyd.protocol import REASONS
from policyd.socketmap import REASONS as SOCKETMAP_REASONS

#: Why a call to the shared sending-limit store failed (redis_store.BackendError.reason).
BACKEND_ERROR_REASONS = ("connection", "timeout", "response")
#: Bounds of policyd_rate_limit_backend_duration_seconds: 100 us to the largest deadline (1 s).
BACKEND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# A decision takes microseconds; the buckets still reach far enough to show a stalled reactor.
DURATION_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
)

# The ``le`` label of each bucket, written as prometheus-client writes it.
_BUCKET_LABELS: tuple[str, ...] = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in (*DURATION_BUCKETS, float("inf"))
)

#: The verdict/rule pairs that can occur, initialised at zero so dashboards see every series.
DECISION_LABELS: tuple[tuple[Verdict, Rule], ...] = (
    (Verdict.SKIPPED, Rule.PROTOCOL_STATE),
    (Verdict.LOCAL, Rule.LOCAL_DOMAINS),
    (Verdict.DENIED, Rule.NEVER_CLIENT_NETWORKS),
    (Verdict.DENIED, Rule.NEVER_SASL_USERNAMES),
    (Verdict.ALLOWED, Rule.ALLOW_AUTHENTICATED),
    (Verdict.ALLOWED, Rule.ALLOW_CLIENT_NETWORKS),
    (Verdict.ALLOWED, Rule.ALLOW_SERVER_ADDRESSES),
    (Verdict.DENIED, Rule.DEFAULT),
    (Verdict.ERROR, Rule.INTERNAL_ERROR),
)

#: The socketmap (map, result) pairs counted; an unknown map name is counted as "unknown".
LOOKUP_LABELS: tuple[tuple[str, str], ...] = (
    ("transport", "found"),
    ("transport", "notfound"),
    ("sasl_passwd", "found"),
    ("sasl_passwd", "notfound"),
    ("unknown", "perm"),
)


#: The ``protocol_state`` values Postfix sends (SMTPD_POLICY_README); any other is ``other``.
PROTOCOL_STATES = (
    "CONNECT",
    "EHLO",
    "HELO",
    "MAIL",
    "RCPT",
    "DATA",
    "END-OF-MESSAGE",
    "VRFY",
    "ETRN",
)

#: The compiled lists whose sizes ``policyd_config_entries`` reports, by key path.
CONFIG_LISTS = (
    "local_domains",
    "relay.allow.client_networks",
    "relay.allow.server_addresses",
    "relay.never.client_networks",
    "relay.never.sasl_usernames",
    "outbound.domains",
)


class RequestCounts:
    """The per-request counters, as plain numbers. Only the reactor thread changes them.

    ``observe()`` files a duration into the histogram buckets (``le`` bounds, as Prometheus
    defines them: a value equal to a bound counts in that bound's bucket).
    """

    __slots__ = (
        "decisions",
        "duration_buckets",
        "duration_sum",
        "limit_checks",
        "lookups",
        "outbound",
        "requests",
        "states",
    )

    def __init__(self) -> None:
        self.requests = 0
        #: Sending-limit checks by (limit name, result): allowed, limited, degraded, error.
        self.limit_checks: dict[tuple[str, str], int] = {}
        #: Requests by protocol_state: Postfix's names, and ``other`` (bounded).
        self.states: dict[str, int] = dict.fromkeys((*PROTOCOL_STATES, "other"), 0)
        self.decisions: dict[tuple[Verdict, Rule | str], int] = dict.fromkeys(DECISION_LABELS, 0)
        self.outbound: dict[AuthKind, int] = dict.fromkeys(AUTH_KINDS, 0)
        self.lookups: dict[tuple[str, str], int] = dict.fromkeys(LOOKUP_LABELS, 0)
        # One count per bucket (not cumulative), the last one for values above every bound.
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one request duration."""
        self.duration_buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds


class _RequestCountsCollector:
    """Exposes ``RequestCounts`` under the metric names PRODUCT.md fixes."""

    def __init__(self, counts: RequestCounts) -> None:
        self.counts = counts

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        counts = self.counts
        yield _counter(
            "policyd_requests",
            "Policy requests answered, of every protocol_state (skipped ones included).",
            [],
            [([], counts.requests)],
        )
        yield _counter(
            "policyd_requests_by_state",
            "Policy requests by Postfix's protocol_state (any unknown state counts as other).",
            ["protocol_state"],
            [([state], n) for state, n in counts.states.copy().items()],
        )
        yield _counter(
            "policyd_decisions",
            "Policy decisions by verdict and by the configuration rule (key path) that decided.",
            ["verdict", "rule"],
            [([str(v), str(r)], n) for (v, r), n in counts.decisions.copy().items()],
        )
        cumulative = 0
        buckets = []
        for bound, value in zip(_BUCKET_LABELS, list(counts.duration_buckets), strict=True):
            cumulative += value
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "policyd_request_duration_seconds",
            "Time spent deciding one policy request, from the complete request to the reply.",
            buckets=buckets,
            sum_value=counts.duration_sum,
        )
        yield _counter(
            "policyd_relay_outbound",
            "Allowed relay decisions by the outbound authentication their recipient domain uses.",
            ["auth"],
            [([auth], n) for auth, n in counts.outbound.copy().items()],
        )
        yield _counter(
            "policyd_rate_limit_checks",
            "Sending-limit checks of allowed relays, by limit name and that limit's own result: "
            "allowed, limited (over this limit), degraded (judged by the per-process fallback "
            "while the shared store is down), error (not judged: the store is down and "
            "on_backend_error is defer or allow). All or nothing: when one limit is over, the "
            "others that allowed are not charged.",
            ["limit", "result"],
            [(list(key), n) for key, n in counts.limit_checks.copy().items()],
        )
        yield _counter(
            "policyd_socketmap_lookups",
            "Socketmap lookups by map and result (found, notfound, perm, temp).",
            ["map", "result"],
            [(list(key), n) for key, n in counts.lookups.copy().items()],
        )


def _counter(
    name: str, documentation: str, labels: list[str], samples: list[tuple[list[str], int]]
) -> CounterMetricFamily:
    """A counter family (``name`` without ``_total``) holding ``samples``."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, value in samples:
        family.add_metric(label_values, value)
    return family


def set_config_info(metrics: Metrics, digest: str) -> None:
    """Point ``policyd_config_info`` at the configuration now in use (one series only)."""
    metrics.config_info.clear()
    metrics.config_info.labels(sha256=digest).set(1)


class Metrics:
    """Every metric policyd exports, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.config_reloads = Counter(
            "policyd_config_reloads",
            "Configuration reloads (SIGHUP) by result: success, or failure (old rules kept).",
            ["result"],
            registry=registry,
        )
        self.config_last_reload = Gauge(
            "policyd_config_last_reload_success_timestamp_seconds",
            "Unix time at which the configuration in use was loaded.",
            registry=registry,
        )
        self.protocol_errors = Counter(
            "policyd_protocol_errors",
            "Connections closed, or lookups failed, because of bad input, by listener and reason.",
            ["listener", "reason"],
            registry=registry,
        )
        self.connections = Gauge(
            "policyd_connections",
            "Open connections, by listener (policy, socketmap).",
            ["listener"],
            registry=registry,
        )
        self.build_info = Gauge(
            "policyd_build_info",
            "Always 1; the labels name the policyd, Python and Twisted versions running.",
            ["version", "python_version", "twisted_version"],
            registry=registry,
        )
        self.config_info = Gauge(
            "policyd_config_info",
            "Always 1; sha256 is the SHA-256 of the configuration in use and of its file: "
            "lists (password files left out). It changes when a reload changes the rules.",
            ["sha256"],
            registry=registry,
        )
        self.config_entries = Gauge(
            "policyd_config_entries",
            "Entries in each list of the configuration in use, by key path, as written (before "
            "merging overlapping networks).",
            ["list"],
            registry=registry,
        )
        self.counts = RequestCounts()
        registry.register(_RequestCountsCollector(self.counts))
        self.build_info.labels(
            version=__version__,
            python_version=platform.python_version(),
            twisted_version=twisted.__version__,
        ).set(1)
        # Every bounded series starts at zero, so dashboards see it.
        for result in ("success", "failure"):
            self.config_reloads.labels(result=result)
        for reason in REASONS:
            self.protocol_errors.labels(listener="policy", reason=reason)
        for reason in SOCKETMAP_REASONS:
            self.protocol_errors.labels(listener="socketmap", reason=reason)
        # -- the static transport table (outbound.transport_table) ----------------------------
        # Written at start and on every reload, never on the request path.
        self.transport_table_entries = Gauge(
            "policyd_transport_table_entries",
            "Rows in the transport table file in place (outbound.transport_table); 0 when "
            "policyd writes none.",
            registry=registry,
        )
        self.transport_table_writes = Counter(
            "policyd_transport_table_writes",
            "Attempts to write the transport table, by result: written (replaced), unchanged "
            "(same content, left alone), failure (old table kept; a reload fails with it).",
            ["result"],
            registry=registry,
        )
        self.transport_table_last_write = Gauge(
            "policyd_transport_table_last_write_timestamp_seconds",
            "Unix time at which the transport table in place was built (its file's mtime when "
            "it was left unchanged); 0 when policyd writes none.",
            registry=registry,
        )
        for result in ("written", "unchanged", "failure"):
            self.transport_table_writes.labels(result=result)
        # -- the shared sending-limit store (rate_limits.backend: redis) ---------------------
        # Present, at 0, also without one: the alerts and dashboard read them unconditionally.
        self.rate_limit_backend_up = Gauge(
            "policyd_rate_limit_backend_up",
            "1 while policyd holds a working connection to the shared sending-limit store "
            "(Redis), else 0 (always 0 with backend: memory).",
            registry=registry,
        )
        self.rate_limit_backend_degraded = Gauge(
            "policyd_rate_limit_backend_degraded",
            "1 while the shared sending-limit store is taken as down (its circuit breaker is "
            "open) and requests are answered by rate_limits.on_backend_error, else 0.",
            registry=registry,
        )
        self.rate_limit_backend_errors = Counter(
            "policyd_rate_limit_backend_errors",
            "Calls to the shared sending-limit store that failed, by reason: connection, "
            "timeout (no answer within backend.timeout), response (an error reply).",
            ["reason"],
            registry=registry,
        )
        self.rate_limit_backend_duration = Histogram(
            "policyd_rate_limit_backend_duration_seconds",
            "Time of the successful calls to the shared sending-limit store (one script per "
            "request), from sending to the answer.",
            buckets=BACKEND_BUCKETS,
            registry=registry,
        )
        for reason in BACKEND_ERROR_REASONS:
            self.rate_limit_backend_errors.labels(reason=reason)
