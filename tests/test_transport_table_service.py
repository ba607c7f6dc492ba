"""The transport table in the running service and on the command line.

``serve`` writes it before listening (a failure is a configuration error: exit 1); a reload
writes it before the new rules are swapped in, and a failed write fails the reload as a whole;
``check-config`` reports it without writing; ``explain`` prints the transport Postfix gets;
``write-tables`` writes it once. postmap is the real one, with a private config directory.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock

from policyd.config import load_config
from policyd.metrics import Metrics
from policyd.service import PolicyService
from tests.e2e.policyd_process import PolicydProcess
from tests.e2e.postfix import free_port

RELAY = {
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "client_address": "198.51.100.7",
    "recipient": "user@remote.example",
}


def config_text(postfix_dir: Path, *, nexthop: str, networks: str, postmap: str = "") -> str:
    extra = f", postmap: {postmap}" if postmap else ""
    return f"""
listen: {{policy: "inet:127.0.0.1:10040"}}
local_domains: [local.example]
relay: {{allow: {{client_networks: [{networks}]}}}}
outbound:
  default: {{auth: none}}
  domains:
    partner.example: {{auth: none, nexthop: "{nexthop}"}}
  transport_table: {{path: state/transport, postfix_config_dir: {postfix_dir}{extra}}}
"""


def table_text(tmp_path: Path) -> str:
    return (tmp_path / "state" / "transport").read_text()


def sample(service: PolicyService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def started_service(tmp_path: Path, postfix_dir: Path) -> tuple[PolicyService, Path]:
    (tmp_path / "state").mkdir()
    path = tmp_path / "policyd.yaml"
    path.write_text(config_text(postfix_dir, nexthop="[gw1.example]", networks="192.0.2.0/24"))
    service = PolicyService(
        str(path), load_config(path), MemoryReactorClock(), Metrics(CollectorRegistry())
    )
    assert service.reload()  # what serve does at start, plus one swap
    return service, path


def test_reload_writes_the_table_then_skips_unchanged(tmp_path: Path, postfix_dir: Path) -> None:
    """A reload that changes a profile rewrites the table before the new rules apply; one
    that changes nothing here leaves the file alone. The metrics say which, and how many
    rows the table in place has."""
    service, path = started_service(tmp_path, postfix_dir)
    assert "partner.example policyd-none:[gw1.example]\n" in table_text(tmp_path)
    assert sample(service, "policyd_transport_table_writes_total", result="written") == 1
    assert sample(service, "policyd_transport_table_entries") == 2
    assert sample(service, "policyd_transport_table_last_write_timestamp_seconds") > 0

    path.write_text(config_text(postfix_dir, nexthop="[gw2.example]", networks="192.0.2.0/24"))
    assert service.reload()
    assert "partner.example policyd-none:[gw2.example]\n" in table_text(tmp_path)
    assert sample(service, "policyd_transport_table_writes_total", result="written") == 2

    path.write_text(config_text(postfix_dir, nexthop="[gw2.example]", networks="198.51.100.0/24"))
    assert service.reload()
    assert service.handle(RELAY) == "OK"
    assert sample(service, "policyd_transport_table_writes_total", result="unchanged") == 1
    assert sample(service, "policyd_transport_table_writes_total", result="failure") == 0


def test_failed_write_fails_the_reload_old_rules_and_table_kept(
    tmp_path: Path, postfix_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If postmap fails, the reload fails as a whole: the old rules keep answering, the old
    table stays in place, the reload and the write count as failures, and the log says why."""
    service, path = started_service(tmp_path, postfix_dir)
    before = table_text(tmp_path)
    path.write_text(
        config_text(
            postfix_dir,
            nexthop="[gw2.example]",
            networks="198.51.100.0/24",
            postmap=str(tmp_path / "no-such-postmap"),
        )
    )
    assert not service.reload()
    assert service.handle(RELAY).startswith("550")  # the old relay rules
    assert service.config.outbound_tables.transport("x@partner.example") == (
        "policyd-none:[gw1.example]"
    )
    assert table_text(tmp_path) == before
    assert sample(service, "policyd_config_reloads_total", result="failure") == 1
    assert sample(service, "policyd_transport_table_writes_total", result="failure") == 1
    assert sample(service, "policyd_transport_table_entries") == 2
    assert "reload failed, keeping the running configuration and tables: " in caplog.text
    assert "outbound.transport_table: cannot write hash:" in caplog.text
    assert "no-such-postmap' not found" in caplog.text


def test_removing_the_section_stops_the_writes(
    tmp_path: Path, postfix_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload without outbound.transport_table leaves the old file alone, warns that it is
    no longer updated, and the entries gauge goes to 0 (policyd writes no table now)."""
    service, path = started_service(tmp_path, postfix_dir)
    before = table_text(tmp_path)
    text = config_text(postfix_dir, nexthop="[gw2.example]", networks="192.0.2.0/24")
    path.write_text(text[: text.index("  transport_table:")])
    assert service.reload()
    assert table_text(tmp_path) == before
    assert "outbound.transport_table was removed; hash:" in caplog.text
    assert sample(service, "policyd_transport_table_entries") == 0


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyd", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_serve_refuses_to_start_when_the_table_cannot_be_written(
    tmp_path: Path, postfix_dir: Path
) -> None:
    """A table that cannot be written at start (bogus postmap): exit 1, a configuration
    error naming outbound.transport_table, nothing listening."""
    (tmp_path / "state").mkdir()
    port = free_port("127.0.0.1")
    path = tmp_path / "policyd.yaml"
    path.write_text(
        config_text(
            postfix_dir, nexthop="[gw.example]", networks="192.0.2.0/24", postmap="/bin/false"
        ).replace("10040", str(port))
    )
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 1, result
    assert "policyd: configuration error: outbound.transport_table: cannot write hash:" in (
        result.stderr
    )
    assert "/bin/false exited with 1" in result.stderr
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    assert not (tmp_path / "state" / "transport").exists()


def test_serve_writes_before_listening_and_on_sighup(tmp_path: Path, postfix_dir: Path) -> None:
    """Once serve listens, the table is there (and the log says so); a SIGHUP that changes a
    next hop rewrites it; /metrics tells how many rows it has and how it was written."""
    state = tmp_path / "state"
    state.mkdir()
    config = {
        "local_domains": ["local.example"],
        "outbound": {
            "default": {"auth": "none"},
            "domains": {"partner.example": {"auth": "none", "nexthop": "[gw1.example]"}},
            "transport_table": {
                "path": str(state / "transport"),
                "postfix_config_dir": str(postfix_dir),
            },
        },
    }
    process = PolicydProcess(config, tmp_path / "run", metrics=True)
    process.start()
    try:
        assert "partner.example policyd-none:[gw1.example]" in (state / "transport").read_text()
        process.wait_for_log("transport table hash:", "written (2 entries)")
        config["outbound"]["domains"]["partner.example"]["nexthop"] = "[gw2.example]"  # type: ignore[index]
        process.rewrite_config(config)
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)
        process.wait_for_log("reload succeeded")
        assert "partner.example policyd-none:[gw2.example]" in (state / "transport").read_text()
        metrics = process.scrape()
        assert 'policyd_transport_table_writes_total{result="written"} 2.0' in metrics
        assert "policyd_transport_table_entries 2.0" in metrics
    finally:
        assert process.stop() == 0


def test_check_config_reports_and_never_writes(tmp_path: Path, postfix_dir: Path) -> None:
    """check-config names the table and its entry count, warns about what would make serve
    fail (here: the directory is missing), and writes nothing."""
    path = tmp_path / "policyd.yaml"
    path.write_text(config_text(postfix_dir, nexthop="[gw.example]", networks="192.0.2.0/24"))
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result
    assert f"outbound.transport_table: hash:{tmp_path}/state/transport (2 entries;" in result.stdout
    assert f"warning: outbound.transport_table: directory {tmp_path}/state does not exist" in (
        result.stdout
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policyd.yaml"]


def test_write_tables_command_and_explain(tmp_path: Path, postfix_dir: Path) -> None:
    """``write-tables`` writes the table once (then finds it unchanged); ``explain`` prints
    the transport Postfix gets for the request's destination, from the same rows."""
    (tmp_path / "state").mkdir()
    path = tmp_path / "policyd.yaml"
    path.write_text(config_text(postfix_dir, nexthop="[gw.example]", networks="192.0.2.0/24"))
    first = run_cli("write-tables", "--config", str(path))
    assert (first.returncode, first.stdout.strip()) == (
        0,
        f"transport table hash:{tmp_path}/state/transport: written (2 entries)",
    ), first
    again = run_cli("write-tables", "--config", str(path))
    assert "unchanged, not rewritten (2 entries)" in again.stdout
    table = f"hash:{tmp_path}/state/transport"
    for recipient, transport in (
        ("x@partner.example", f"policyd-none:[gw.example] ({table} and the socketmap"),
        ("x@local.example", f"- (Postfix's own routing; {table} and the socketmap"),
        ("x@else.example", "- (Postfix's own routing;"),
    ):
        shown = run_cli(
            "explain", "--config", str(path), "client_address=192.0.2.7", f"recipient={recipient}"
        )
        assert shown.returncode == 0, shown
        assert f"transport: {transport}" in shown.stdout, shown.stdout


def test_no_transport_table_option(tmp_path: Path) -> None:
    """``serve --no-transport-table`` (what ``make run`` uses) starts without postmap or the
    table's directory, and says that it does not write the table."""
    config = {
        "outbound": {"transport_table": {"path": str(tmp_path / "missing" / "transport")}},
    }
    process = PolicydProcess(config, tmp_path / "run", extra_args=["--no-transport-table"])
    process.start()
    try:
        process.wait_for_log("not writing hash:", "--no-transport-table")
    finally:
        assert process.stop() == 0
    assert not (tmp_path / "missing").exists()
