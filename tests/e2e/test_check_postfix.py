"""``policyd check-postfix`` through the real ``postconf``: clean on the shipped examples loaded
into a private Postfix, and each deliberately broken placement found, with the parameter named.

The instance is configured (main.cf, master.cf) but never started: postconf reads the files.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .policyd_process import shipped_policyd_config
from .postfix import PostfixInstance, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def instance(tmp_path: Path, e2e_preflight: None) -> Iterator[PostfixInstance]:
    tmp_path.chmod(0o755)
    table = tmp_path / "transport"
    postfix = PostfixInstance(
        free_port("127.0.0.1"),
        socketmap_port=free_port("127.0.0.1"),
        transport_table=table,
        basedir=tmp_path / "postfix",
    )
    postfix.configure()
    yield postfix
    postfix.cleanup()


def policyd_yaml(instance: PostfixInstance, tmp_path: Path, **changes: Any) -> Path:
    """The shipped policyd.yaml on the instance's ports (``changes`` replace top-level keys)."""
    config = shipped_policyd_config()
    config["listen"] = {
        "policy": f"inet:127.0.0.1:{instance.policy_port}",
        "socketmap": f"inet:127.0.0.1:{instance.socketmap_port}",
    }
    config.update(changes)
    path = tmp_path / "policyd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def check_postfix(config: Path, instance: PostfixInstance) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "policyd",
            "check-postfix",
            "--config",
            str(config),
            "--postfix-dir",
            str(instance.config_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def append(path: Path, text: str) -> None:
    with path.open("a") as out:
        out.write("\n" + text + "\n")


def test_shipped_examples_are_clean(instance: PostfixInstance, tmp_path: Path) -> None:
    result = check_postfix(policyd_yaml(instance, tmp_path), instance)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: "), result.stdout


POLICY = (
    "check_policy_service {{ inet:127.0.0.1:{port}, timeout=10s, {{ default_action = {action} }} }}"
)

# (name, main.cf lines to append, master.cf lines to append, expected error fragments)
BROKEN = [
    (
        "hold class missing",
        "smtpd_restriction_classes =",
        "",
        [
            "limit login-day-tripwire (action hold) answers 'policyd_hold', which is not a "
            "restriction class here"
        ],
    ),
    (
        "hold class that does not permit",
        "policyd_hold = check_sender_access static:{{HOLD sending limit exceeded}}",
        "",
        [
            "main.cf policyd_hold: rate_limits limit login-day-tripwire (action hold) answers "
            "policyd_hold, which does not end with permit"
        ],
    ),
    (
        "permit_mynetworks first",
        "smtpd_relay_restrictions = permit_mynetworks, {policy}, reject_unauth_destination",
        "",
        ["main.cf smtpd_relay_restrictions: permit_mynetworks comes before check_policy_service"],
    ),
    (
        "permit_sasl_authenticated first",
        "smtpd_relay_restrictions = permit_sasl_authenticated, {policy}, reject_unauth_destination",
        "",
        ["permit_sasl_authenticated comes before check_policy_service"],
    ),
    (
        "no reject_unauth_destination",
        "smtpd_relay_restrictions = {policy}",
        "",
        ["smtpd_relay_restrictions: reject_unauth_destination is missing behind"],
    ),
    (
        "fail open",
        "smtpd_relay_restrictions = "
        "check_policy_service {{ inet:127.0.0.1:{port}, {{ default_action = OK }} }}, "
        "reject_unauth_destination",
        "",
        ["default_action 'OK' permits when policyd cannot be reached"],
    ),
    (
        "fail open by the global default",
        "smtpd_relay_restrictions = check_policy_service inet:127.0.0.1:{port}, "
        "reject_unauth_destination\nsmtpd_policy_service_default_action = OK",
        "",
        ["default_action 'OK' permits"],
    ),
    (
        "another address",
        "smtpd_relay_restrictions = check_policy_service inet:127.0.0.1:9, "
        "reject_unauth_destination",
        "",
        ["check_policy_service inet:127.0.0.1:9 is not policyd's listen.policy", "is not asked"],
    ),
    (
        "submission overrides without policyd",
        "",
        "submission inet n - n - - smtpd\n"
        "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
        ["master.cf submission/inet smtpd_relay_restrictions: policyd"],
    ),
    (
        "only in recipient restrictions after a permit",
        "smtpd_relay_restrictions = reject_unauth_destination\n"
        "smtpd_recipient_restrictions = permit_mynetworks, {policy}",
        "",
        ["smtpd_recipient_restrictions: permit_mynetworks comes before check_policy_service"],
    ),
    (
        "a domain Postfix accepts but policyd does not",
        "virtual_alias_domains = aliases.example",
        "",
        ["main.cf virtual_alias_domains: Postfix accepts mail for aliases.example"],
    ),
    (
        "outbound transport missing",
        "",
        None,  # master.cf without postfix-examples/master.cf's transports
        ["master.cf policyd-none/unix: the transport of an outbound profile is missing"],
    ),
]


@pytest.mark.parametrize(("name", "main", "master", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_placement_is_found(
    name: str,
    main: str,
    master: str | None,
    expected: list[str],
    instance: PostfixInstance,
    tmp_path: Path,
) -> None:
    port = instance.policy_port
    policy = POLICY.format(port=port, action="451 4.3.5 Relay policy unavailable")
    if main:
        append(instance.config_dir / "main.cf", main.format(policy=policy, port=port))
    master_cf = instance.config_dir / "master.cf"
    if master is None:
        text = master_cf.read_text()
        master_cf.write_text(text[: text.index(instance.shipped_master_cf().splitlines()[0])])
    elif master:
        append(master_cf, master)
    result = check_postfix(policyd_yaml(instance, tmp_path), instance)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    for fragment in expected:
        assert any(fragment in line for line in errors), (fragment, result.stdout)


def test_warnings_alone_exit_zero(instance: PostfixInstance, tmp_path: Path) -> None:
    """A domain policyd counts as local that Postfix does not accept is only a warning."""
    config = shipped_policyd_config()
    path = policyd_yaml(
        instance, tmp_path, local_domains=[*config["local_domains"], "extra.example"]
    )
    result = check_postfix(path, instance)
    assert result.returncode == 0, result.stdout
    assert "warning: local_domains: extra.example is local to policyd" in result.stdout
    assert "0 error(s), 1 warning(s)" in result.stdout
