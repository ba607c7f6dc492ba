"""The relay decision: a pure function from a configuration and a request to a ``Decision``.

The order is PRODUCT.md §1: requests outside RCPT/VRFY are skipped; local recipients are not
relaying; then the never-lists, authenticated clients, client networks, server addresses, and
finally the default denial. Each ``Decision`` carries the rule that made it, as a key path.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from policyd.address import resolve_destination
from policyd.config import Config
from policyd.outbound import OutboundProfile
from policyd.request import RELAY_STATES, PolicyRequest


class Verdict(StrEnum):
    """What policyd concluded about one request."""

    LOCAL = "local"
    ALLOWED = "allowed"
    DENIED = "denied"
    DEFERRED = "deferred"  # allowed, but over a sending limit (rule rate_limits.NAME)
    SKIPPED = "skipped"
    ERROR = "error"


class Rule(StrEnum):
    """The key path of the rule that decided, as it appears in logs, metrics and ``explain``."""

    LOCAL_DOMAINS = "local_domains"
    NEVER_CLIENT_NETWORKS = "relay.never.client_networks"
    NEVER_SASL_USERNAMES = "relay.never.sasl_usernames"
    ALLOW_AUTHENTICATED = "relay.allow.authenticated"
    ALLOW_CLIENT_NETWORKS = "relay.allow.client_networks"
    ALLOW_SERVER_ADDRESSES = "relay.allow.server_addresses"
    DEFAULT = "relay.default"
    PROTOCOL_STATE = "protocol_state"
    INTERNAL_ERROR = "internal_error"


class Decision(NamedTuple):
    """The answer for one request (a named tuple: one is built for every request).

    ``action`` is what goes to Postfix after ``action=``; ``destination`` is the hop that made
    the recipient local or a relay attempt (``None`` when there is none or it is unknown);
    ``warn_only`` is true when ``mode: warn`` turned a denial into a WARN; ``outbound`` is the
    outbound profile an allowed relay will be delivered with.
    """

    action: str
    verdict: Verdict
    #: A Rule, or ``rate_limits.NAME`` (a str) for a relay a sending limit deferred.
    rule: Rule | str
    destination: str | None = None
    warn_only: bool = False
    outbound: OutboundProfile | None = None


# decide() runs for every request. In Python 3.11 reading an Enum member off its class costs
# about ten times reading a global, and a named tuple's generated __new__ is one more Python
# call than tuple.__new__; the members it uses and the constant decision are looked up once.
_new_decision = tuple.__new__
_SKIPPED = Decision("DUNNO", Verdict.SKIPPED, Rule.PROTOCOL_STATE)
_LOCAL, _ALLOWED, _DENIED = Verdict.LOCAL, Verdict.ALLOWED, Verdict.DENIED
_LOCAL_DOMAINS = Rule.LOCAL_DOMAINS
_NEVER_CLIENT_NETWORKS = Rule.NEVER_CLIENT_NETWORKS
_NEVER_SASL_USERNAMES = Rule.NEVER_SASL_USERNAMES
_ALLOW_AUTHENTICATED = Rule.ALLOW_AUTHENTICATED
_ALLOW_CLIENT_NETWORKS = Rule.ALLOW_CLIENT_NETWORKS
_ALLOW_SERVER_ADDRESSES = Rule.ALLOW_SERVER_ADDRESSES
_DEFAULT = Rule.DEFAULT


def decide(config: Config, request: PolicyRequest) -> Decision:
    """Decide one request. Pure: no I/O, no clock, no mutable state."""
    if request.protocol_state not in RELAY_STATES:
        return _SKIPPED

    destination = resolve_destination(request.recipient, config.local_domains)
    where = destination.domain
    if destination.local:
        return _new_decision(
            Decision, (config.replies.local, _LOCAL, _LOCAL_DOMAINS, where, False, None)
        )

    relay = config.relay
    client_ip = request.client_ip

    if client_ip is not None and client_ip in relay.never_client_networks:
        return _deny(config, _NEVER_CLIENT_NETWORKS, where)
    if request.sasl_username and request.sasl_username.casefold() in relay.never_sasl_usernames:
        return _deny(config, _NEVER_SASL_USERNAMES, where)
    if relay.allow_authenticated and request.sasl_username:
        return _allow(config, _ALLOW_AUTHENTICATED, where)
    if client_ip is not None and client_ip in relay.allow_client_networks:
        return _allow(config, _ALLOW_CLIENT_NETWORKS, where)
    if relay.allow_server_addresses.matches(request.server_ip, request.server_port):
        return _allow(config, _ALLOW_SERVER_ADDRESSES, where)
    return _deny(config, _DEFAULT, where)


def error_decision(config: Config) -> Decision:
    """The decision used when deciding failed: a temporary failure, never a permit."""
    return Decision(config.replies.error, Verdict.ERROR, Rule.INTERNAL_ERROR)


def _allow(config: Config, rule: Rule, destination: str | None) -> Decision:
    profile = config.outbound_tables.select_normalized(destination).profile
    return _new_decision(
        Decision, (config.replies.allowed, _ALLOWED, rule, destination, False, profile)
    )


def _deny(config: Config, rule: Rule, destination: str | None) -> Decision:
    if config.mode == "warn":
        action = f"WARN policyd would reject: {config.replies.denied}"
        return Decision(action, Verdict.DENIED, rule, destination, warn_only=True)
    return _new_decision(Decision, (config.replies.denied, _DENIED, rule, destination, False, None))
