"""The rate_limits section (PRODUCT.md §8): compiled values, and strict errors with key path and
line."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.config import ConfigError, parse_config
from policyd.ratelimit import DEFAULT_REPLIES, RedisBackend

BASE = 'listen: {policy: "inet:127.0.0.1:10040"}\nlocal_domains: [local.example]\n'


def error_of(text: str, base_dir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + text, source="policyd.yaml", base_dir=base_dir)
    return str(info.value)


def test_the_product_example_compiles() -> None:
    config = parse_config(
        BASE
        + """
rate_limits:
  backend: memory
  on_backend_error: local
  exempt: {client_networks: [192.0.2.0/24], sasl_usernames: [Postmaster@local.example]}
  limits:
    - name: user-hour
      applies_to: [relay.allow.authenticated]
      key: sasl_username
      count: messages
      rate: 200/1h
      burst: 50
      action: defer
    - name: tripwire
      applies_to: [relay.allow.authenticated, relay.allow.client_networks]
      key: client_network
      rate: 2000/1d
      action: hold
"""
    )
    limits = config.rate_limits
    assert limits.backend == "memory" and limits.on_backend_error == "local"
    assert limits.exempt_sasl_usernames == frozenset({"postmaster@local.example"})
    assert len(limits.exempt_client_networks) == 1
    user, tripwire = limits.limits
    assert (user.name, user.key, user.count, user.action) == (
        "user-hour",
        "sasl_username",
        "messages",
        "defer",
    )
    assert (user.rate.count, user.rate.period_us, user.rate.burst) == (200, 3_600_000_000, 50)
    assert user.reply == DEFAULT_REPLIES["defer"] and user.rule == "rate_limits.user-hour"
    assert tripwire.count == "recipients" and tripwire.rate.burst == 1
    assert tripwire.action == "hold" and tripwire.reply == "policyd_hold"
    assert config.warnings == ()  # memory backend: enforced as configured


def test_no_section_means_no_limits() -> None:
    assert parse_config(BASE).rate_limits.limits == ()


def test_redis_backend(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    config = parse_config(
        BASE + "rate_limits:\n  backend: {redis: 'unix:/run/redis/redis.sock', username: policyd,"
        " password_file: redis-password, timeout: 0.02}\n",
        base_dir=tmp_path,
    )
    backend = config.rate_limits.backend
    assert isinstance(backend, RedisBackend)
    assert backend.address == "unix:/run/redis/redis.sock" and backend.username == "policyd"
    assert backend.password is not None and backend.password.reveal() == "pw"
    assert backend.timeout_seconds == 0.02
    assert "pw" not in repr(backend)


def test_redis_backend_defaults() -> None:
    config = parse_config(
        BASE + "rate_limits:\n  backend: {redis: 'inet:127.0.0.1:6379'}\n  limits:\n"
        "    - {name: n, applies_to: [relay.allow.client_networks], key: client_address,"
        " rate: 1/1h}\n"
    )
    assert config.rate_limits.backend == RedisBackend("inet:127.0.0.1:6379", "", None, 0.05)
    assert config.rate_limits.on_backend_error == "local" and not config.warnings


LIMIT = (
    "rate_limits:\n  limits:\n"
    "    - {name: n, applies_to: [relay.allow.authenticated], key: sasl_username, rate: 10/1h"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rate_limits: {speed: 1}\n", "rate_limits.speed: unknown key"),
        (
            "rate_limits: {backend: disk}\n",
            "rate_limits.backend: must be memory or {redis: ADDRESS}",
        ),
        ("rate_limits: {backend: {redis: 'redis:6379'}}\n", "must be unix:/path or inet:HOST:PORT"),
        ("rate_limits: {backend: {redis: 'inet:127.0.0.1'}}\n", "must be inet:HOST:PORT"),
        ("rate_limits: {backend: {redis: 'unix:/r', timeout: 5}}\n", "rate_limits.backend.timeout"),
        (
            "rate_limits: {on_backend_error: ignore}\n",
            "rate_limits.on_backend_error: must be one of local, defer, allow",
        ),
        (
            LIMIT + "}\n" + LIMIT.split("\n")[-1] + "}\n",  # the same name twice
            "rate_limits.limits[1].name: duplicate name 'n' (policyd.yaml:6)",
        ),
        (LIMIT + ", burst: 0}\n", "rate_limits.limits[0].burst"),
        (LIMIT + ", burst: 1.5}\n", "rate_limits.limits[0].burst: must be a whole number"),
        (
            LIMIT.replace("10/1h", "10/1w") + "}\n",
            "rate_limits.limits[0].rate: '10/1w' is not a rate",
        ),
        (
            LIMIT + ", action: drop}\n",
            "rate_limits.limits[0].action: must be one of defer, reject, hold",
        ),
        (LIMIT + ", reply: '550 5.7.1 no'}\n", "must be '4NN X.Y.Z text' for action defer"),
        (LIMIT + ", action: hold, reply: 'HOLD x'}\n", "bare HOLD would be followed"),
        (
            LIMIT + ", count: bytes}\n",
            "rate_limits.limits[0].count: must be one of messages, recipients",
        ),
        (
            LIMIT.replace("key: sasl_username", "key: ip") + "}\n",
            "rate_limits.limits[0].key: must be one of",
        ),
        (
            LIMIT.replace("relay.allow.authenticated", "relay.allow.client_networks") + "}\n",
            "sasl_username only exists for relay.allow.authenticated",
        ),
        (
            LIMIT.replace("relay.allow.authenticated", "relay.default") + "}\n",
            "rate_limits.limits[0].applies_to: must be one of",
        ),
        (
            LIMIT.replace("name: n", "name: 'Has Space'") + "}\n",
            "rate_limits.limits[0].name: must be 1-64 of a-z",
        ),
        (
            "rate_limits:\n  limits:\n    - {name: n, key: client_address, rate: 1/1h}\n",
            "rate_limits.limits[0].applies_to: missing (policyd.yaml:5)",
        ),
        (
            "rate_limits: {exempt: {client_networks: [300.0.0.0/8]}}\n",
            "rate_limits.exempt.client_networks",
        ),
    ],
)
def test_errors_name_the_key_path_and_line(text: str, expected: str) -> None:
    assert expected in error_of(text)
