"""docs/prometheus/alerts.yml through promtool: the rules check, and every alert shown firing and
not firing on synthetic series (``promtool test rules``).

The unit-test file promtool reads is generated here from ``CASES``: promtool wants the expected
annotations spelled out, and they are the rule's own, with the labels filled in.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.system_tools import require

ALERTS = Path(__file__).resolve().parent.parent / "docs" / "prometheus" / "alerts.yml"
MX = {"job": "policyd", "instance": "mx1:9469"}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require("promtool", "prometheus")


def rules() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule for group in data["groups"] for rule in group["rules"]}


@dataclass
class Case:
    """One alert on one set of series: firing at ``fires_at`` (with these extra labels), and
    not firing at ``quiet_at``."""

    alert: str
    series: dict[str, str]
    fires_at: str
    quiet_at: list[str]
    labels: dict[str, str] = field(default_factory=dict)


def _series(name: str, **labels: str) -> str:
    merged = {**MX, **labels}
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in merged.items()) + "}"


CASES = [
    Case(
        "PolicydDown",
        {_series("up"): "1 1 1 0 0 0 0 0"},
        fires_at="6m",
        quiet_at=["2m", "4m"],  # 0 since 3m: pending until 5m
        labels=MX,
    ),
    Case(
        "PolicydNotScraped",
        {'up{job="other", instance="x"}': "1x30"},
        fires_at="15m",
        quiet_at=["5m"],
        labels={"job": "policyd"},  # absent() keeps the selector's equality labels
    ),
    Case(
        "PolicydReloadFailing",
        {
            _series("policyd_config_reloads_total", result="failure"): "0 0 0 1 1 1" + " 1" * 30,
            _series("policyd_config_reloads_total", result="success"): "0x36",
        },
        fires_at="5m",
        quiet_at=["2m", "30m"],  # before the failure; and once 15 minutes passed without one
        labels={**MX, "result": "failure"},
    ),
    Case(
        "PolicydTransportTableWriteFailing",
        {_series("policyd_transport_table_writes_total", result="failure"): "0 0 2 2 2"},
        fires_at="3m",
        quiet_at=["1m"],
        labels={**MX, "result": "failure"},
    ),
    Case(
        "PolicydErrorVerdicts",
        {
            _series(
                "policyd_decisions_total", verdict="error", rule="internal_error"
            ): "0 0 0 0 1 1 1 1 1 1 1 1 1 1"
        },
        fires_at="6m",
        quiet_at=["3m", "13m"],
        labels={**MX, "verdict": "error", "rule": "internal_error"},
    ),
    Case(
        "PolicydLatencyHigh",
        {
            # 100 requests a minute; from minute 10 on every one takes between 10 and 50 ms.
            _series("policyd_request_duration_seconds_bucket", le="0.0001"): "0+100x10 1000x30",
            _series("policyd_request_duration_seconds_bucket", le="0.01"): "0+100x10 1000x30",
            _series("policyd_request_duration_seconds_bucket", le="0.05"): "0+100x40",
            _series("policyd_request_duration_seconds_bucket", le="+Inf"): "0+100x40",
        },
        fires_at="30m",
        quiet_at=["9m", "17m"],  # fast; slow but not yet 10 minutes
        labels={"instance": "mx1:9469"},
    ),
    Case(
        "PolicydDenialSurge",
        {
            # 6 hours at 6 denials a minute (0.1/s), then 120 a minute (2/s) for 15 minutes.
            _series(
                "policyd_decisions_total", verdict="denied", rule="relay.default"
            ): "0+6x360 2160+120x15",
        },
        fires_at="373m",
        quiet_at=["300m", "362m"],
        labels={"instance": "mx1:9469"},
    ),
    Case(
        "PolicydProtocolErrors",
        {
            _series(
                "policyd_protocol_errors_total", listener="policy", reason="malformed_line"
            ): "0 0 0 10 10 10 10 10 10 10 10 10 10 10 10 10 10 10",
        },
        fires_at="5m",
        quiet_at=["2m", "16m"],
        labels={"instance": "mx1:9469", "listener": "policy", "reason": "malformed_line"},
    ),
    Case(
        "PolicydNoRequests",
        {
            _series("up"): "1x150",
            # Requests for an hour, then none.
            _series("policyd_requests_total"): "0+50x60 3000x90",
        },
        fires_at="125m",
        quiet_at=["60m", "115m"],  # still counting; rate 0 only since 90m, pending for 30m
        labels=MX,
    ),
]


def _expand(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), template)


def test_every_alert_has_a_case_and_a_runbook() -> None:
    operations = (ALERTS.parent.parent / "operations.md").read_text()
    assert sorted(rules()) == sorted(case.alert for case in CASES)
    for name, rule in rules().items():
        anchor = name.lower()
        assert f"docs/operations.md#{anchor}" in rule["annotations"]["description"], name
        assert f"\n### {name}\n" in operations, f"no runbook section for {name}"


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", CASES, ids=[case.alert for case in CASES])
def test_promtool_alert_fires_and_stays_quiet(case: Case, promtool: str, tmp_path: Path) -> None:
    rule = rules()[case.alert]
    labels = {**case.labels, **rule.get("labels", {})}
    annotations = {k: _expand(v, labels) for k, v in rule["annotations"].items()}
    alert_tests: list[dict[str, Any]] = [
        {"eval_time": when, "alertname": case.alert, "exp_alerts": []} for when in case.quiet_at
    ]
    alert_tests.append(
        {
            "eval_time": case.fires_at,
            "alertname": case.alert,
            "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}],
        }
    )
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(ALERTS)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [
                            {"series": series, "values": values}
                            for series, values in case.series.items()
                        ],
                        "alert_rule_test": alert_tests,
                    }
                ],
            },
            sort_keys=False,
        )
    )
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
