"""Sending limits, the arithmetic: GCRA (the generic cell rate algorithm) on integer microseconds.

A limit ``N/P`` with burst ``B`` (``rate: 200/1h``, ``burst: 50``) lets a key send ``B`` at once
and, in the long run, ``N`` per period ``P``. GCRA keeps one number per key, the *theoretical
arrival time* ``tat``: when the key's bucket would be empty again at the sustained rate.

With the emission interval ``T = ceil(P / N)`` (in microseconds: an interval is a whole number
of microseconds, rounded up, so the sustained rate is never above ``N/P``) and the tolerance
``tau = (B - 1) * T``, a request at time ``now`` is:

- **allowed** when ``max(tat, now) - now <= tau``; the key's ``tat`` becomes ``max(tat, now) + T``;
- **limited** otherwise; ``tat`` is left unchanged (a refused attempt costs nothing, so
  retrying does not extend the penalty); it would be allowed again after
  ``max(tat, now) - now - tau`` microseconds.

A key never seen, or whose ``tat`` is in the past, has a full bucket: ``B`` requests now. After
``k`` requests at one instant ``tat = now + k*T``, so exactly ``B`` pass (``k*T <= tau`` for ``k``
up to ``B - 1``). The number still allowed at ``now`` is ``(tau - (max(tat, now) - now)) // T + 1``
when that is positive, else 0.

Several limits on one request are checked and charged **all or nothing**: if any refuses, none is
charged. ``MemoryStore`` is the in-process store (one MX host); a shared store runs the same
arithmetic in one atomic Redis script.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from policyd.networks import NetworkSet
from policyd.outbound import Secret
from policyd.request import PolicyRequest

#: Microseconds per unit of a rate's period.
UNITS = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_RATE = re.compile(r"^\s*([1-9][0-9]*)\s*/\s*([1-9][0-9]*)?\s*([smhd])\s*$")


class RateError(ValueError):
    """A rate that does not parse; ``str()`` says what is expected."""


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` per ``period_us`` microseconds, ``burst`` at once."""

    count: int
    period_us: int
    burst: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or self.period_us < 1 or self.burst < 1:
            raise RateError("count, period and burst must be positive")

    @property
    def interval_us(self) -> int:
        """T: microseconds between two requests at the sustained rate, rounded up."""
        return -(-self.period_us // self.count)

    @property
    def tolerance_us(self) -> int:
        """tau = (burst - 1) * T: how far ahead of now ``tat`` may be for a request to pass."""
        return (self.burst - 1) * self.interval_us


def parse_rate(text: str, burst: int = 1) -> Rate:
    """``200/1h``, ``10/30s``, ``5/m`` (a missing multiplier is 1) -> Rate."""
    match = _RATE.match(text)
    if match is None:
        raise RateError(f"{text!r} is not a rate: expected N/1s, N/1m, N/1h or N/1d (N > 0)")
    count, multiplier, unit = int(match[1]), int(match[2] or 1), match[3]
    return Rate(count, multiplier * UNITS[unit], burst)


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one limit for one request."""

    allowed: bool
    #: The key's ``tat`` after the request (unchanged when refused, or when another refused).
    tat: int
    #: Microseconds until one more request would pass (0 when allowed).
    retry_after_us: int
    #: Requests still allowed right now, after this one if it was charged.
    remaining: int


def check(tat: int | None, now: int, rate: Rate) -> Check:
    """Judge one request at ``now`` against a key whose state is ``tat`` (None: never seen).

    Pure: returns the new ``tat`` as if charged when allowed; the caller decides whether to
    store it (all or nothing across limits).
    """
    interval, tolerance = rate.interval_us, rate.tolerance_us
    start = now if tat is None or tat < now else tat
    ahead = start - now
    if ahead > tolerance:
        return Check(False, start, ahead - tolerance, 0)
    new_tat = start + interval
    return Check(True, new_tat, 0, remaining(new_tat, now, rate))


def remaining(tat: int | None, now: int, rate: Rate) -> int:
    """Requests a key could still send at ``now``."""
    ahead = 0 if tat is None or tat < now else tat - now
    left = rate.tolerance_us - ahead
    return left // rate.interval_us + 1 if left >= 0 else 0


class MemoryStore:
    """The in-process store: one ``tat`` per (limit name, key), bounded in size.

    Keys whose bucket is full again (``tat <= now``) hold no information and are dropped
    when the store reaches ``max_keys`` (then, if still full, the oldest ones go first: a flood
    of new keys forgets the keys least recently charged, never refuses a request because of
    the store).
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._tats: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._tats)

    def tat(self, limit: str, key: str) -> int | None:
        return self._tats.get((limit, key))

    def check_and_charge(self, requests: Sequence[tuple[str, str, Rate]], now: int) -> list[Check]:
        """Check every (limit name, key, rate); charge all of them only if all allow."""
        checks = [check(self._tats.get((limit, key)), now, rate) for limit, key, rate in requests]
        if all(result.allowed for result in checks):
            for (limit, key, _), result in zip(requests, checks, strict=True):
                self._store((limit, key), result.tat, now)
            return checks
        # Another limit refused: nothing is charged, and the limits that would have allowed
        # report their state as it stays.
        results = []
        for (limit, key, rate), result in zip(requests, checks, strict=True):
            if result.allowed:
                stored = self._tats.get((limit, key))
                kept = stored if stored is not None and stored > now else now
                result = Check(True, kept, 0, remaining(stored, now, rate))
            results.append(result)
        return results

    def reset(self, limit: str, key: str) -> bool:
        """Forget a key's state (a full bucket again); False if it had none."""
        return self._tats.pop((limit, key), None) is not None

    def _store(self, item: tuple[str, str], tat: int, now: int) -> None:
        tats = self._tats
        if item not in tats and len(tats) >= self.max_keys:
            for stale in [k for k, t in tats.items() if t <= now]:
                del tats[stale]
            while len(tats) >= self.max_keys:
                del tats[next(iter(tats))]  # insertion order: the least recently charged
        tats.pop(item, None)  # re-insert at the end: most recently charged
        tats[item] = tat


# -- configuration (the ``rate_limits`` section, PRODUCT.md §8) ---------------------------------

#: The allow rules a limit may apply to (key paths, as decisions name them).
ALLOW_RULES = (
    "relay.allow.authenticated",
    "relay.allow.client_networks",
    "relay.allow.server_addresses",
)
LimitKey = Literal["sasl_username", "client_address", "client_network"]
LIMIT_KEYS: tuple[LimitKey, ...] = ("sasl_username", "client_address", "client_network")
CountKind = Literal["messages", "recipients"]
COUNT_KINDS: tuple[CountKind, ...] = ("messages", "recipients")
LimitAction = Literal["defer", "reject", "hold"]
LIMIT_ACTIONS: tuple[LimitAction, ...] = ("defer", "reject", "hold")
BackendErrorPolicy = Literal["local", "defer", "allow"]
BACKEND_ERROR_POLICIES: tuple[BackendErrorPolicy, ...] = ("local", "defer", "allow")
#: The reply of each action when the limit gives none.
DEFAULT_REPLIES: dict[str, str] = {
    "defer": "450 4.7.1 Sending limit exceeded, try again later",
    "reject": "550 5.7.1 Sending limit exceeded",
    # A restriction class of main.cf (postfix-examples/main.cf): HOLD, then permit. A bare
    # HOLD does not end Postfix's restriction list: reject_unauth_destination would follow
    # and refuse the relay.
    "hold": "policyd_hold",
}


@dataclass(frozen=True, slots=True)
class Limit:
    """One entry of ``rate_limits.limits``."""

    name: str
    applies_to: frozenset[str]
    key: LimitKey
    count: CountKind
    rate: Rate
    action: LimitAction = "defer"
    reply: str = DEFAULT_REPLIES["defer"]

    @property
    def rule(self) -> str:
        """The rule key path a decision this limit deferred carries."""
        return f"rate_limits.{self.name}"

    def describe(self) -> str:
        """One line: what it counts, per what, how fast, and what happens over it."""
        rate = self.rate
        return (
            f"{self.count} per {self.key}, {rate.count} per {_period(rate.period_us)}, "
            f"burst {rate.burst}, then {self.action} ({self.reply!r}); applies to "
            f"{', '.join(sorted(self.applies_to))}"
        )


def _period(microseconds: int) -> str:
    for unit, size in (("d", UNITS["d"]), ("h", UNITS["h"]), ("m", UNITS["m"])):
        if microseconds % size == 0:
            return f"{microseconds // size}{unit}"
    return f"{microseconds // UNITS['s']}s"


@dataclass(frozen=True, slots=True)
class RedisBackend:
    """``rate_limits.backend: {redis: ...}``: shared state for several MX hosts."""

    address: str  # "unix:/run/redis/redis.sock" or "inet:HOST:PORT"
    username: str = ""
    password: Secret | None = None
    timeout_seconds: float = 0.05


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The ``rate_limits`` section, compiled. No limits: nothing is counted."""

    backend: Literal["memory"] | RedisBackend = "memory"
    on_backend_error: BackendErrorPolicy = "local"
    exempt_client_networks: NetworkSet = field(default_factory=lambda: NetworkSet(()))
    exempt_sasl_usernames: frozenset[str] = frozenset()
    limits: tuple[Limit, ...] = ()


# -- which limits a request meets, and under which key -----------------------------------------


def limit_key(limit: Limit, request: PolicyRequest) -> str | None:
    """The key ``limit`` counts ``request`` under, or None when the request has none (no login
    for ``sasl_username``, an unparseable client address for the others).

    ``sasl_username`` is lowercased; ``client_network`` is the /24 of an IPv4 client and the
    /64 of an IPv6 one (an IPv4-mapped IPv6 client already counts as IPv4).
    """
    if limit.key == "sasl_username":
        return request.sasl_username.lower() or None
    address = request.client_ip
    if address is None:
        return None
    text = str(address)
    if limit.key == "client_address":
        return text
    if address.version == 4:
        # The /24 from the dotted quad itself: parsing a network per request costs more than
        # the rest of the limit check.
        return text[: text.rindex(".")] + ".0/24"
    network = ipaddress.IPv6Address(int(address) >> 64 << 64)
    return f"{network}/64"


def key_of(limit: Limit, text: str) -> str | None:
    """The key ``limit`` keeps for what an administrator typed (``policyd limits show``): a
    login for sasl_username limits, an address (or, for client_network, its network or the
    network itself) for the others; None when ``text`` is not that kind of key."""
    if limit.key == "sasl_username":
        return text.lower()
    if "/" in text and limit.key == "client_network":
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError:
            return None
        wanted = 24 if network.version == 4 else 64
        return str(network) if network.prefixlen == wanted else None
    request = PolicyRequest.from_attributes({"client_address": text})
    if request.client_ip is None:
        return None
    return limit_key(limit, request)


def applicable(limits: RateLimits, rule: str, request: PolicyRequest) -> list[tuple[Limit, str]]:
    """The (limit, key) pairs that count an allowed relay decided by ``rule``.

    None when the client or the login is exempt; a limit whose key the request lacks is
    skipped.
    """
    if not limits.limits:
        return []
    if request.client_ip is not None and request.client_ip in limits.exempt_client_networks:
        return []
    login = request.sasl_username.lower()
    if login and login in limits.exempt_sasl_usernames:
        return []
    found = []
    for limit in limits.limits:
        if rule in limit.applies_to:
            key = limit_key(limit, request)
            if key is not None:
                found.append((limit, key))
    return found


# -- the limiter: every applicable limit, checked and charged at once ---------------------------


#: The reply when ``on_backend_error: defer`` and the shared store cannot answer.
BACKEND_ERROR_REPLY = "451 4.3.0 Sending limits cannot be checked now, try again later"
#: The rule such a deferral carries.
BACKEND_ERROR_RULE = "rate_limits.on_backend_error"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the limits said about one allowed relay."""

    #: The first limit (in configuration order) that refused; None when all allowed.
    limited: Limit | None
    #: Each limit checked, with its result (a ``messages`` limit already charged for this
    #: message is not checked again and is not listed). None: not checked (backend error).
    checks: tuple[tuple[Limit, Check | None], ...] = ()
    #: None when the configured store answered; else the ``on_backend_error`` policy that did
    #: (``local``: the per-process buckets judged; ``defer``/``allow``: nothing was checked).
    fallback: BackendErrorPolicy | None = None

    def results(self) -> list[tuple[str, str]]:
        """(limit name, result) of each check, as ``policyd_rate_limit_checks_total`` counts:
        allowed or limited by the configured store, degraded (judged by the per-process
        fallback), error (not judged at all)."""
        if self.fallback is None:
            return [
                (limit.name, "allowed" if check is None or check.allowed else "limited")
                for limit, check in self.checks
            ]
        result = "degraded" if self.fallback == "local" else "error"
        return [(limit.name, result) for limit, _ in self.checks]


NOTHING = Outcome(None)


class SharedStore(Protocol):
    """A store several MX hosts share (``redis_store.RedisStore``): its own clock, I/O."""

    def check_and_charge(
        self, requests: Sequence[tuple[str, str, Rate]], *, charge: bool = True
    ) -> Deferred[Charged]: ...


@dataclass(frozen=True, slots=True)
class Charged:
    """A shared store's answer: its time and one Check per limit, in order."""

    now_us: int
    checks: list[Check]


class Limiter:
    """Applies ``RateLimits`` to allowed relays, with the state in ``store``, or in ``shared``
    when the configuration names a shared backend (then ``store`` is the per-process fallback).

    ``messages`` limits count the first allowed relayed recipient of each Postfix ``instance``
    (one per message); later recipients of a message that was counted pass those limits
    without being checked again. A request without ``instance`` counts as a message of its own.
    The (limit, key, instance) triples already counted are remembered up to ``max_messages``.

    With a shared store, ``charge`` returns a Deferred that never fails: a store error answers
    by ``on_backend_error`` instead. Without one, and while the ``breaker`` is open (the store
    is taken as down: ``on_backend_error`` answers), it answers at once.
    """

    def __init__(
        self,
        limits: RateLimits,
        store: MemoryStore,
        max_messages: int = 100_000,
        *,
        shared: SharedStore | None = None,
        breaker: BreakerLike | None = None,
        on_backend_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.limits = limits
        self.store = store
        self.shared = shared
        self.breaker = breaker
        self.max_messages = max_messages
        #: Told of every shared-store failure (for logs and metrics).
        self.on_backend_error = on_backend_error
        self._counted: dict[tuple[str, str, str], None] = {}

    def charge(self, rule: str, request: PolicyRequest, now_us: int) -> Outcome | Deferred[Outcome]:
        """Check and charge, all or nothing, the limits an allowed relay by ``rule`` meets.

        ``now_us`` is this host's time: the in-process store's clock (a shared store has its
        own).
        """
        todo: list[tuple[Limit, str]] = []
        messages: list[tuple[str, str, str]] = []
        for limit, key in applicable(self.limits, rule, request):
            if limit.count == "messages" and request.instance:
                counted = (limit.name, key, request.instance)
                if counted in self._counted:
                    continue
                messages.append(counted)
            todo.append((limit, key))
        if not todo:
            return NOTHING
        items = [(limit.name, key, limit.rate) for limit, key in todo]
        shared = self.shared
        if shared is None:
            return self._outcome(todo, messages, self.store.check_and_charge(items, now_us))
        breaker = self.breaker
        if breaker is not None and not breaker.allow():
            # Taken as down: answered at once, without waiting for the store.
            return self._fall_back(todo, messages, items, now_us)
        answer = shared.check_and_charge(items)
        answer.addCallbacks(
            self._shared_answered,
            self._shared_failed,
            callbackArgs=(todo, messages),
            errbackArgs=(todo, messages, items, now_us),
        )
        return answer  # type: ignore[return-value]  # the callbacks made it an Outcome

    def _shared_answered(
        self, charged: Charged, todo: list[tuple[Limit, str]], messages: list[Any]
    ) -> Outcome:
        if self.breaker is not None:
            self.breaker.success()
        return self._outcome(todo, messages, charged.checks)

    def _shared_failed(
        self,
        failure: Failure,
        todo: list[tuple[Limit, str]],
        messages: list[Any],
        items: list[tuple[str, str, Rate]],
        now_us: int,
    ) -> Outcome:
        if self.breaker is not None:
            self.breaker.failure()
        if self.on_backend_error is not None:
            error = failure.value
            self.on_backend_error(error if isinstance(error, Exception) else Exception(error))
        return self._fall_back(todo, messages, items, now_us)

    def _fall_back(
        self,
        todo: list[tuple[Limit, str]],
        messages: list[Any],
        items: list[tuple[str, str, Rate]],
        now_us: int,
    ) -> Outcome:
        policy = self.limits.on_backend_error
        if policy == "local":
            outcome = self._outcome(todo, messages, self.store.check_and_charge(items, now_us))
            return Outcome(outcome.limited, outcome.checks, "local")
        return Outcome(None, tuple((limit, None) for limit, _ in todo), policy)

    def _outcome(
        self, todo: list[tuple[Limit, str]], messages: list[Any], results: list[Check]
    ) -> Outcome:
        checks = tuple((limit, result) for (limit, _), result in zip(todo, results, strict=True))
        refused = next((limit for limit, result in checks if not result.allowed), None)
        if refused is None:
            for counted in messages:
                self._remember(counted)
        return Outcome(refused, checks)

    def _remember(self, counted: tuple[str, str, str]) -> None:
        if len(self._counted) >= self.max_messages:
            del self._counted[next(iter(self._counted))]
        self._counted[counted] = None


class BreakerLike(Protocol):
    """What the limiter asks of a circuit breaker (``redis_store.Breaker``)."""

    def allow(self) -> bool: ...
    def success(self) -> None: ...
    def failure(self) -> None: ...
