"""Prometheus metrics. The registry is passed in, so tests and a service each own theirs.

Names and labels are fixed by PRODUCT.md §3. Labels are bounded: verdict, rule, result, map,
reason, listener — never an address or a domain.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from policyd.decision import Rule, Verdict
from policyd.outbound import AUTH_KINDS, AuthKind
from policyd.protocol import REASONS
from policyd.socketmap import REASONS as SOCKETMAP_REASONS

# A decision takes microseconds; the buckets still reach far enough to show a stalled reactor.
_DURATION_BUCKETS = (
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


class Metrics:
    """Every metric policyd exports, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "policyd_requests",
            "Policy requests answered, of every protocol_state (skipped ones included).",
            registry=registry,
        )
        self.decisions = Counter(
            "policyd_decisions",
            "Policy decisions by verdict and by the configuration rule (key path) that decided.",
            ["verdict", "rule"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "policyd_request_duration_seconds",
            "Time spent deciding one policy request, from the complete request to the reply.",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
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
        self.socketmap_lookups = Counter(
            "policyd_socketmap_lookups",
            "Socketmap lookups by map and result (found, notfound, perm, temp).",
            ["map", "result"],
            registry=registry,
        )
        self.protocol_errors = Counter(
            "policyd_protocol_errors",
            "Connections closed, or lookups failed, because of bad input, by listener and reason.",
            ["listener", "reason"],
            registry=registry,
        )
        self.relay_outbound = Counter(
            "policyd_relay_outbound",
            "Allowed relay decisions by the outbound authentication their recipient domain uses.",
            ["auth"],
            registry=registry,
        )
        self.connections = Gauge(
            "policyd_connections",
            "Open policy connections.",
            ["listener"],
            registry=registry,
        )
        # Every bounded series starts at zero, so dashboards see it; the children the request
        # paths count in are kept, so counting one is a dict lookup rather than labels().
        self.decision_counters: dict[tuple[Verdict, Rule], Counter] = {
            (verdict, rule): self.decisions.labels(verdict=verdict.value, rule=rule.value)
            for verdict, rule in DECISION_LABELS
        }
        for result in ("success", "failure"):
            self.config_reloads.labels(result=result)
        for reason in REASONS:
            self.protocol_errors.labels(listener="policy", reason=reason)
        for reason in SOCKETMAP_REASONS:
            self.protocol_errors.labels(listener="socketmap", reason=reason)
        self.outbound_counters: dict[AuthKind, Counter] = {
            auth: self.relay_outbound.labels(auth=auth) for auth in AUTH_KINDS
        }
        self.lookup_counters: dict[tuple[str, str], Counter] = {
            (map_name, result): self.socketmap_lookups.labels(map=map_name, result=result)
            for map_name in ("transport", "sasl_passwd")
            for result in ("found", "notfound")
        }

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
