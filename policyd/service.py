"""Wiring: listeners, the request handler, reload and shutdown. The only module using a reactor.

The reactor is passed in; ``PolicyService`` holds the configuration in use as a single reference,
so a reload is one assignment and a request always sees one whole configuration.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.internet import defer, threads
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from policyd.config import Config, ConfigError, Endpoint, load_config
from policyd.control import ControlFactory
from policyd.decision import Decision, Verdict, decide, error_decision
from policyd.logs import Event, make_record, quote_value
from policyd.metrics import CONFIG_LISTS, Metrics, set_config_info
from policyd.protocol import PolicyFactory
from policyd.ratelimit import (
    BACKEND_ERROR_REPLY,
    BACKEND_ERROR_RULE,
    Check,
    Limit,
    Limiter,
    MemoryStore,
    Outcome,
    RateLimits,
    RedisBackend,
    check,
    key_of,
)
from policyd.redis_store import BackendError, Breaker, RedisStore
from policyd.request import PolicyRequest
from policyd.socketmap import SocketmapFactory
from policyd.transport_table import TableWrite, TableWriteError, write_transport_table

log = logging.getLogger("policyd")
decision_log = logging.getLogger("policyd.decision")

#: How long SIGTERM waits for requests in flight before closing their connections.
SHUTDOWN_GRACE_SECONDS = 3.0


# Looked up once: reading an Enum member off its class is slow in Python 3.11 (see decision.py).
_DENIED, _ERROR = Verdict.DENIED, Verdict.ERROR
_ALLOWED, _DEFERRED = Verdict.ALLOWED, Verdict.DEFERRED


class PolicyService:
    """The running service: decides requests with the current configuration, reloads it."""

    def __init__(
        self,
        config_path: str,
        config: Config,
        reactor: Any,
        metrics: Metrics,
        *,
        log_all_decisions: bool = False,
        write_tables: bool = True,
        trusted_uids: frozenset[int] | None = None,
    ) -> None:
        self.config_path = config_path
        self.write_tables = write_tables
        #: Who may own the files a reload reads (None: not checked); see load_config.
        self.trusted_uids = trusted_uids
        self.config = config
        #: What listeners and the limits' store were built from (reloads change neither).
        self.config_at_start = config
        self.reactor = reactor
        self.metrics = metrics
        self.counts = metrics.counts
        self.log_all_decisions = log_all_decisions
        self.redis: RedisStore | None = None
        self.limiter = self._limiter(config.rate_limits)
        self._count_limits(config)
        self.factory = PolicyFactory(
            self.handle,
            self.report_protocol_error,
            config.limits,
            reactor,
            on_connections_changed=self.metrics.connections.labels(listener="policy").set,
        )
        self.socketmap_factory = SocketmapFactory(self.lookup, self.report_socketmap_error)
        # Read when Prometheus scrapes (on the reactor thread), from what is in use then.
        metrics.connections.labels(listener="socketmap").set_function(
            lambda: len(self.socketmap_factory.connections)
        )
        for name in CONFIG_LISTS:
            metrics.config_entries.labels(list=name).set_function(
                functools.partial(self.list_entries, name)
            )
        set_config_info(metrics, config.digest)
        self.ports: list[IListeningPort] = []
        #: ``starting`` until every listener accepts, then ``serving``, then ``stopping``.
        self.state = "starting"
        #: ``succeeded`` or ``failed`` once a reload has run, for systemd's status line.
        self.last_reload = "none"
        self._reloading = False
        self._reload_again = False
        self._last_backend_error = ""
        self.metrics.config_last_reload.set(time.time())

    # -- requests --------------------------------------------------------------------------

    def handle(self, attributes: Mapping[str, str]) -> str | defer.Deferred[str]:
        """Decide one request and record it. Never raises: a failure answers ``replies.error``.

        Answers at once, unless the sending limits of an allowed relay are kept in a shared
        store: then a Deferred that fires (never fails) within the store's deadline.
        """
        started = perf_counter()
        config = self.config
        state = ""
        try:
            request = PolicyRequest.from_attributes(attributes)
            state = request.protocol_state
            decision = decide(config, request)
        except Exception:
            log.exception("internal error while deciding; answering replies.error")
            decision = error_decision(config)
        if decision.verdict is _ALLOWED and self.limiter.limits.limits:
            now_us = int(self.reactor.seconds() * 1_000_000)
            outcome = self.limiter.charge(str(decision.rule), request, now_us)
            if type(outcome) is not Outcome:
                later: defer.Deferred[Outcome] = outcome  # type: ignore[assignment]
                answer = later.addCallback(self._limited, decision)
                answer.addErrback(self._limits_failed, config)
                return answer.addCallback(self._record, attributes, state, started)
            decision = self._limited(outcome, decision)
        return self._record(decision, attributes, state, started)

    def _record(
        self, decision: Decision, attributes: Mapping[str, str], state: str, started: float
    ) -> str:
        """Count and log a decision; its action is the answer."""
        counts = self.counts
        counts.requests += 1
        states = counts.states
        if state in states:
            states[state] += 1
        else:
            states["other"] += 1
        key = (decision.verdict, decision.rule)
        decisions = counts.decisions
        decisions[key] = decisions.get(key, 0) + 1
        if decision.outbound is not None and decision.verdict is _ALLOWED:
            counts.outbound[decision.outbound.auth] += 1
        verdict = decision.verdict
        if (
            verdict is _DENIED
            or verdict is _DEFERRED
            or verdict is _ERROR
            or self.log_all_decisions
        ):
            self.log_decision(attributes, decision)
        counts.observe(perf_counter() - started)
        return decision.action

    def _limited(self, outcome: Outcome, decision: Decision) -> Decision:
        """An allowed relay, after the sending limits that apply to it: deferred by the first
        limit over its rate (or by ``on_backend_error: defer``), else as it was."""
        checks = self.counts.limit_checks
        for key in outcome.results():
            checks[key] = checks.get(key, 0) + 1
        limit = outcome.limited
        if limit is not None:
            reply, rule = limit.reply, limit.rule
        elif outcome.fallback == "defer":
            reply, rule = BACKEND_ERROR_REPLY, BACKEND_ERROR_RULE
        else:
            return decision
        # Deferred: the limit's reply; the outbound profile stays recorded.
        return Decision(reply, _DEFERRED, rule, decision.destination, False, decision.outbound)

    def _limits_failed(self, failure: Failure, config: Config) -> Decision:
        """A bug after a shared store answered: fail safe, as for any internal error."""
        log.error(
            "internal error while applying sending limits; answering replies.error: %s",
            failure.getTraceback(),
        )
        return error_decision(config)

    def _limiter(self, limits: RateLimits) -> Limiter:
        """The limiter of ``limits``: in process, or on the shared store it names."""
        backend = limits.backend
        if not isinstance(backend, RedisBackend):
            return Limiter(limits, MemoryStore())
        metrics = self.metrics
        self.redis = RedisStore(
            backend, self.reactor, observe=metrics.rate_limit_backend_duration.observe
        )
        redis = self.redis
        metrics.rate_limit_backend_up.set_function(lambda: 1 if redis.connected else 0)
        breaker = Breaker(self.reactor.seconds, on_change=self._backend_changed)
        return Limiter(
            limits,
            MemoryStore(),  # the per-process buckets of on_backend_error: local
            shared=redis,
            breaker=breaker,
            on_backend_error=self._backend_failed,
        )

    def _backend_failed(self, error: Exception) -> None:
        reason = error.reason if isinstance(error, BackendError) else "connection"
        self.metrics.rate_limit_backend_errors.labels(reason=reason).inc()
        log.debug("rate_limits backend call failed: %s", error)
        self._last_backend_error = str(error)

    def _backend_changed(self, down: bool) -> None:
        """The breaker opened (the shared store is taken as down) or closed: logged once."""
        self.metrics.rate_limit_backend_degraded.set(1 if down else 0)
        policy = self.limiter.limits.on_backend_error
        address = self.redis.backend.address if self.redis is not None else "-"
        if down:
            log.warning(
                "rate_limits backend %s is down (%s); answering by on_backend_error: %s until "
                "it answers again",
                address,
                self._last_backend_error,
                policy,
            )
        else:
            log.info("rate_limits backend %s answers again; limits are shared again", address)

    # -- the control socket: policyd limits show|reset KEY ------------------------------------

    def control(self, command: str, text: str) -> defer.Deferred[tuple[bool, str]]:
        """``show`` (the budget left) or ``reset`` (a full burst again) of ``text`` under every
        limit that keys by that kind of key. Fires (ok, text for the administrator)."""
        limits = self.limiter.limits.limits
        if not limits:
            return defer.succeed((False, "no rate_limits.limits are configured"))
        pairs = [(limit, key) for limit in limits if (key := key_of(limit, text)) is not None]
        if not pairs:
            return defer.succeed((False, f"{text!r} is not a key of any configured limit"))
        if command == "reset":
            return self._reset_limits(pairs)
        return self._show_limits(pairs)

    def _show_limits(self, pairs: list[tuple[Limit, str]]) -> defer.Deferred[tuple[bool, str]]:
        items = [(limit.name, key, limit.rate) for limit, key in pairs]
        if self.redis is None:
            now = int(self.reactor.seconds() * 1_000_000)
            store = self.limiter.store
            checks = [check(store.tat(name, key), now, rate) for name, key, rate in items]
            return defer.succeed((True, _budget_lines(pairs, checks, "this process")))
        where = f"shared, {self.redis.backend.address}"
        answer = self.redis.check_and_charge(items, charge=False)
        return answer.addCallbacks(
            lambda charged: (True, _budget_lines(pairs, charged.checks, where)),
            lambda failure: (False, f"the rate_limits backend did not answer: {failure.value}"),
        )

    @defer.inlineCallbacks
    def _reset_limits(self, pairs: list[tuple[Limit, str]]) -> Any:
        lines = []
        for limit, key in pairs:
            # The per-process buckets too: the ones on_backend_error: local falls back to.
            had = self.limiter.store.reset(limit.name, key)
            if self.redis is not None:
                try:
                    had = (yield self.redis.reset(limit.name, key)) or had
                except BackendError as err:
                    return False, f"the rate_limits backend did not answer: {err}"
            state = "reset: a full burst again" if had else "nothing to reset (a full burst)"
            lines.append(f"{limit.name} ({limit.key} {key}): {state} ({limit.rate.burst})")
            log.info("rate_limits reset by policyd limits: limit=%s", limit.name)
        return True, "\n".join(lines)

    def _count_limits(self, config: Config) -> None:
        """Start the deferred series of every configured limit at zero (never removed)."""
        limits = config.rate_limits
        results = ["allowed", "limited"]
        if isinstance(limits.backend, RedisBackend):
            results += ["degraded", "error"]
            self.counts.decisions.setdefault((Verdict.DEFERRED, BACKEND_ERROR_RULE), 0)
        for limit in limits.limits:
            self.counts.decisions.setdefault((Verdict.DEFERRED, limit.rule), 0)
            for result in results:
                self.counts.limit_checks.setdefault((limit.name, result), 0)

    def log_decision(self, attributes: Mapping[str, str], decision: Decision) -> None:
        """One key=value line: denials, deferrals and errors always, the rest with verbose."""
        if decision.verdict is Verdict.ERROR:
            level = logging.WARNING
        elif decision.verdict in (Verdict.DENIED, Verdict.DEFERRED) or self.log_all_decisions:
            level = logging.INFO
        else:
            return
        if decision_log.isEnabledFor(level):
            event = Event("decision", decision_fields(attributes, decision))
            decision_log.handle(make_record(decision_log.name, level, event))

    def report_protocol_error(self, reason: str, peer: str) -> None:
        """Log and count a policy connection closed for bad input."""
        self.metrics.protocol_errors.labels(listener="policy", reason=reason).inc()
        log.warning("protocol_error listener=policy reason=%s peer=%s action=close", reason, peer)

    def report_socketmap_error(self, reason: str, peer: str) -> None:
        """Log and count a socketmap framing error or failed lookup."""
        self.metrics.protocol_errors.labels(listener="socketmap", reason=reason).inc()
        log.warning("protocol_error listener=socketmap reason=%s peer=%s", reason, peer)

    # -- socketmap -------------------------------------------------------------------------

    def lookup(self, name: str, key: str) -> str:
        """Answer one socketmap lookup from the configuration in use."""
        tables = self.config.outbound_tables
        if name == "transport":
            answer = tables.transport(key)
        elif name == "sasl_passwd":
            answer = tables.sasl_passwd(key)
        else:
            self.counts.lookups["unknown", "perm"] += 1
            log.warning("socketmap map=%s result=perm: unknown map", quote_value(name[:64]))
            return "PERM unknown map (policyd serves transport and sasl_passwd)"
        result = "notfound" if answer is None else "found"
        self.counts.lookups[name, result] += 1
        if log.isEnabledFor(logging.DEBUG):
            shown = "-" if answer is None or name == "sasl_passwd" else answer
            log.debug(
                "socketmap map=%s key=%s result=%s answer=%s",
                name,
                quote_value(key),
                result,
                quote_value(shown),
            )
        return "NOTFOUND " if answer is None else f"OK {answer}"

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the file and its ``file:`` lists, write the tables; swap in on success.

        On any failure the old configuration and the old tables stay. Synchronous: the
        reactor waits while the file is parsed. ``reload_in_thread`` is what SIGHUP uses.
        """
        try:
            config, written = self.prepare()
        except Exception as err:
            return self._reload_failed(err)
        return self._apply(config, written)

    def prepare(self) -> tuple[Config, TableWrite | None]:
        """The reload's work off the reactor: load the file, then write its static tables.

        Nothing here touches the configuration in use. Raises ``ConfigError`` or
        ``TableWriteError``; the tables are then as they were before.
        """
        config = load_config(self.config_path, self.trusted_uids)
        written = write_tables(config) if self.write_tables else None
        return config, written

    def list_entries(self, name: str) -> int:
        """How many entries the list ``name`` (one of CONFIG_LISTS) has in the rules in use."""
        config = self.config
        relay = config.relay
        sizes = {
            "local_domains": len(config.local_domains),
            "relay.allow.client_networks": len(relay.allow_client_networks),
            "relay.allow.server_addresses": len(relay.allow_server_addresses),
            "relay.never.client_networks": len(relay.never_client_networks),
            "relay.never.sasl_usernames": len(relay.never_sasl_usernames),
            "outbound.domains": len(config.outbound.domains),
        }
        return sizes[name]

    @property
    def reloading(self) -> bool:
        """True while a reload runs in its worker thread."""
        return self._reloading

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for ``/readyz``: ready once every listener accepts, until stopping."""
        if self.state == "serving":
            return True, "ready"
        return False, self.state

    @defer.inlineCallbacks
    def reload_in_thread(self) -> Any:
        """Like ``reload``, but load and write in a worker thread so requests are answered.

        A large configuration (100,000 networks) takes seconds to parse. Reloads never overlap:
        a SIGHUP during a reload triggers one more reload after it, so the last file wins.
        """
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        try:
            while True:
                self._reload_again = False
                try:
                    config, written = yield threads.deferToThreadPool(
                        self.reactor, self.reactor.getThreadPool(), self.prepare
                    )
                except Exception as err:
                    self._reload_failed(err)
                else:
                    self._apply(config, written)
                if not self._reload_again:
                    break
        finally:
            self._reloading = False

    def _reload_failed(self, err: Exception) -> bool:
        self.last_reload = "failed"
        self.metrics.config_reloads.labels(result="failure").inc()
        if isinstance(err, TableWriteError):
            self.metrics.transport_table_writes.labels(result="failure").inc()
        if isinstance(err, ConfigError | TableWriteError):
            log.error("reload failed, keeping the running configuration and tables: %s", err)
        else:
            log.error(
                "reload failed, keeping the running configuration and tables",
                exc_info=(type(err), err, err.__traceback__),
            )
        return False

    def _apply(self, config: Config, written: TableWrite | None = None) -> bool:
        """Swap in a loaded configuration (its tables already written): one assignment."""
        if config.listen != self.config.listen:
            log.warning("reload: changes to listen take effect only at restart")
        for warning in config.warnings:
            log.warning("configuration warning: %s", warning)
        previous = self.config.transport_table
        if self.write_tables and previous is not None and config.transport_table is None:
            log.warning(
                "reload: outbound.transport_table was removed; %s is no longer updated",
                previous.table,
            )
        self.config = config
        self.factory.limits = config.limits
        if config.rate_limits.backend != self.config_at_start.rate_limits.backend:
            log.warning("reload: changes to rate_limits.backend take effect only at restart")
        # The limits' state (per limit name and key) carries over; new limits start full.
        self.limiter.limits = config.rate_limits
        self._count_limits(config)
        self.record_table_write(written)
        self.last_reload = "succeeded"
        set_config_info(self.metrics, config.digest)
        self.metrics.config_reloads.labels(result="success").inc()
        self.metrics.config_last_reload.set(time.time())
        log.info("reload succeeded: %s", config.summary().replace("\n", ";"))
        return True

    def record_table_write(self, written: TableWrite | None) -> None:
        """Count and log a successful table write (at start or reload).

        None means policyd writes no table (none configured, or ``--no-transport-table``):
        the entries and timestamp gauges go to 0, as their help text says.
        """
        metrics = self.metrics
        if written is None:
            metrics.transport_table_entries.set(0)
            metrics.transport_table_last_write.set(0)
            return
        metrics.transport_table_writes.labels(result=written.result).inc()
        metrics.transport_table_entries.set(written.entries)
        metrics.transport_table_last_write.set(written.timestamp)
        log.info("%s", written.describe())

    # -- listeners -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Listen on the policy (and metrics) endpoints. Fails if any cannot be bound."""
        listen = self.config.listen
        backlog = self.config.limits.listen_backlog
        try:
            port = yield server_endpoint(self.reactor, listen.policy, backlog).listen(self.factory)
            self.ports.append(port)
            log.info("policy listener on %s", listen.policy)
            if listen.socketmap is not None:
                endpoint = server_endpoint(self.reactor, listen.socketmap, backlog)
                port = yield endpoint.listen(self.socketmap_factory)
                self.ports.append(port)
                log.info("socketmap listener on %s (maps transport, sasl_passwd)", listen.socketmap)
            if listen.control is not None:
                yield self._listen_control(listen.control)
            if listen.metrics is not None:
                root = Resource()  # type: ignore[no-untyped-call]
                root.putChild(b"metrics", MetricsPage(self.metrics.registry))
                root.putChild(b"healthz", HealthPage(lambda: (True, "ok")))
                root.putChild(b"readyz", HealthPage(self.readiness))
                site = Site(root)  # type: ignore[no-untyped-call]
                site.noisy = False
                site.log = lambda request: None  # type: ignore[method-assign]
                port = yield server_endpoint(self.reactor, listen.metrics, backlog).listen(site)
                self.ports.append(port)
                log.info(
                    "metrics listener on %s (HTTP /metrics, /healthz, /readyz)", listen.metrics
                )
        except Exception:
            yield self.stop_listening()
            raise
        self.state = "serving"
        if self.redis is not None:
            address = self.redis.backend.address
            self.redis.connect().addCallbacks(
                lambda _: log.info("rate_limits backend %s connected", address),
                lambda failure: log.warning(
                    "rate_limits backend %s not reachable at start: %s", address, failure.value
                ),
            )

    @defer.inlineCallbacks
    def _listen_control(self, endpoint: Endpoint) -> Any:
        """The control socket, mode 0600. Not needed for mail: if it cannot be made, say so
        and serve without it."""
        try:
            listening = UNIXServerEndpoint(  # type: ignore[no-untyped-call]
                self.reactor, endpoint.path, mode=0o600, wantPID=True
            )
            port = yield listening.listen(ControlFactory(self.control))  # type: ignore[no-untyped-call]
        except Exception as err:
            log.warning(
                "control listener on %s failed (%s); `policyd limits` cannot reach this process",
                endpoint,
                err,
            )
            return
        self.ports.append(port)
        log.info("control listener on %s (policyd limits show|reset)", endpoint)

    def stop_listening(self) -> defer.Deferred[Any]:
        """Close every listening port."""
        ports, self.ports = self.ports, []
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in ports], consumeErrors=True
        )

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop accepting, answer requests in flight, close every connection."""
        self.state = "stopping"
        log.info("stopping: no new connections; answering requests in flight")
        yield self.stop_listening()
        self.socketmap_factory.close_all()
        yield self.factory.drain(SHUTDOWN_GRACE_SECONDS)
        if self.redis is not None:
            self.redis.close()
        log.info("stopped")


class MetricsPage(Resource):
    """``/metrics``: the registry in the exposition format the scraper asks for.

    Rendered on the reactor thread, the only thread that changes the counters, so a scrape
    sees them between two requests, never in the middle of one.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:
        encoder, content_type = choose_encoder(request.getHeader("accept"))
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return encoder(self.registry)


class HealthPage(Resource):
    """``/healthz`` and ``/readyz``: 200 and ``ok``/``ready``, or 503 and the reason.

    ``check`` returns (healthy, text). Plain text, one line, never cached.
    """

    isLeaf = True

    def __init__(self, check: Callable[[], tuple[bool, str]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.check = check

    def render_GET(self, request: Any) -> bytes:
        healthy, text = self.check()
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return text.encode() + b"\n"


def write_tables(config: Config) -> TableWrite | None:
    """Write the static tables ``config`` asks for (``outbound.transport_table``), or None.

    Blocking file and process I/O: call it before the reactor runs or in a worker thread.
    Raises ``TableWriteError``; the table in place is then untouched.
    """
    settings = config.transport_table
    if settings is None:
        return None
    rows = config.outbound_tables.transport_table_entries()
    return write_transport_table(settings, rows, source=config.source)


def server_endpoint(reactor: Any, endpoint: Endpoint, backlog: int) -> IStreamServerEndpoint:
    """The Twisted server endpoint for a Postfix-notation listening address, with the
    kernel's accept queue ``backlog`` long (limits.listen_backlog)."""
    if endpoint.kind == "unix":
        return UNIXServerEndpoint(reactor, endpoint.path, backlog, mode=0o666, wantPID=True)  # type: ignore[no-untyped-call]
    if endpoint.is_ipv6:
        return TCP6ServerEndpoint(reactor, endpoint.port, backlog, interface=endpoint.host)  # type: ignore[no-untyped-call]
    return TCP4ServerEndpoint(reactor, endpoint.port, backlog, interface=endpoint.host)  # type: ignore[no-untyped-call]


def _budget_lines(pairs: list[tuple[Limit, str]], checks: list[Check], where: str) -> str:
    """``policyd limits show``: one line per limit, what is left of the burst now."""
    lines = []
    for (limit, key), result in zip(pairs, checks, strict=True):
        # A peek answers as if charged: what is left now is one more than after it.
        left = result.remaining + 1 if result.allowed else 0
        text = f"{limit.name} ({limit.key} {key}): {left} of {limit.rate.burst} left now"
        if not result.allowed:
            text += f"; the next passes in {_duration(result.retry_after_us)}"
        lines.append(f"{text} [{where}; then {limit.action}]")
    return "\n".join(lines)


def _duration(microseconds: int) -> str:
    seconds = -(-microseconds // 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours}h"] if hours else []
    if minutes:
        parts.append(f"{minutes}m")
    if seconds or not parts:
        parts.append(f"{seconds}s")
    return " ".join(parts)


def decision_fields(attributes: Mapping[str, str], decision: Decision) -> list[tuple[str, str]]:
    """The decision log line's (key, value) pairs, values as they are (not yet quoted)."""
    get = attributes.get
    fields = [
        ("queue_id", get("queue_id", "")),
        ("client", get("client_address", "")),
        ("server", _server(attributes)),
        ("sasl_username", get("sasl_username", "")),
        ("sender", get("sender", "")),
        ("recipient", get("recipient", "")),
        ("state", get("protocol_state", "")),
        # Verdicts and rules are fixed words (StrEnum members are their value as a str).
        ("verdict", decision.verdict),
        ("rule", decision.rule),
        ("action", decision.action),
    ]
    if decision.destination:
        fields.append(("destination", decision.destination))
    if decision.outbound is not None:
        fields.append(("outbound", decision.outbound.path))
        fields.append(("outbound_auth", decision.outbound.auth))
    if decision.warn_only:
        fields.append(("mode", "warn"))
    return fields


def format_decision(attributes: Mapping[str, str], decision: Decision) -> str:
    """The decision log line in the logfmt layout: key=value pairs, values quoted when they
    need it."""
    return str(Event("decision", decision_fields(attributes, decision)))


def _server(attributes: Mapping[str, str]) -> str:
    address = attributes.get("server_address", "")
    port = attributes.get("server_port", "")
    if not address:
        return ""
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}" if port else host
