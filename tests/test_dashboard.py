"""The Grafana dashboard and the alert rules use only metrics policyd exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.testing import MemoryReactorClock

from policyd.config import parse_config
from policyd.metrics import Metrics
from policyd.service import PolicyService
from tests.system_tools import require

DOCS = Path(__file__).resolve().parent.parent / "docs"
DASHBOARD = DOCS / "grafana" / "policyd.json"
ALERTS = DOCS / "prometheus" / "alerts.yml"


def dashboard_expressions() -> dict[str, str]:
    """{panel title and target: PromQL expression} of every dashboard panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        f"{panel['title']} / {target['refId']}": target["expr"]
        for panel in dashboard["panels"]
        for target in panel["targets"]
    }


def alert_expressions() -> dict[str, str]:
    data = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule["expr"] for group in data["groups"] for rule in group["rules"]}


def exposition() -> str:
    """What a freshly started policyd serves on /metrics."""
    config = parse_config('listen: {policy: "inet:127.0.0.1:10040"}\nlocal_domains: [l.example]\n')
    registry = CollectorRegistry()
    PolicyService("policyd.yaml", config, MemoryReactorClock(), Metrics(registry))
    return generate_latest(registry).decode()


def exported_names() -> set[str]:
    """Every sample name a freshly started policyd exposes on /metrics."""
    text = exposition()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def test_promtool_check_metrics() -> None:
    """Prometheus's own linter: naming conventions, help text, types (no output when clean)."""
    promtool = require("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_metric_used_is_exported() -> None:
    exported = exported_names()
    used = {**dashboard_expressions(), **alert_expressions()}
    assert len(dashboard_expressions()) >= 12
    for where, expr in used.items():
        for name in re.findall(r"\bpolicyd_[a-z_]+", expr):
            assert name in exported, f"{where}: {name} is not exported"


def test_dashboard_covers_what_an_operator_watches() -> None:
    """Decisions by verdict and rule, denials, latency, errors, reloads, outbound, connections."""
    exprs = " ".join(dashboard_expressions().values())
    for needed in (
        "sum by (verdict) (rate(policyd_decisions_total",
        "sum by (rule) (rate(policyd_decisions_total",
        'verdict="denied"',
        "histogram_quantile(0.99",
        'verdict="error"',
        "policyd_protocol_errors_total",
        "policyd_config_reloads_total",
        "policyd_relay_outbound_total",
        "policyd_connections",
    ):
        assert needed in exprs, needed
