"""A real Prometheus (Debian's package) scrapes a running policyd; every dashboard panel and every
alert expression is evaluated through its HTTP API.

Prometheus listens on 127.0.0.1 only, keeps its data in the test's directory, scrapes every
second, and is stopped by its PID. The expressions run as instant queries: each must succeed,
and every metric selector in it must return series (a threshold like ``> 0`` may rightly leave
an alert's whole expression empty on a healthy policyd).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.policyd_process import PolicydProcess, terminate
from tests.e2e.postfix import free_port
from tests.system_tools import require
from tests.test_dashboard import alert_expressions, dashboard_expressions

RCPT = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\n"
    "recipient={recipient}\n\n"
)
# A metric name with an optional {...} selector, not followed by "(" (a function).
_SELECTOR = re.compile(r"\b(policyd_[a-z_]+|up)\b(\{[^}]*\})?(?!\s*\()")


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        binary = require("prometheus", "prometheus")
        self.port = free_port("127.0.0.1")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: policyd\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            cwd=workdir,
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    def wait_for(self, expr: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Poll (bounded) until ``expr`` returns series."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self.query(expr)
                if result:
                    return result
            except OSError:
                pass  # not listening yet
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{expr!r} returned nothing within {timeout} s")
            time.sleep(0.5)

    def stop(self) -> None:
        terminate(self.process, 20)
        self.log.close()


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[tuple[PolicydProcess, Prometheus]]:
    config = {
        "local_domains": ["local.example"],
        "relay": {"allow": {"client_networks": ["192.0.2.0/24"]}},
    }
    policyd = PolicydProcess(config, tmp_path / "policyd", metrics=True)
    policyd.start()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{policyd.metrics_port}")
    try:
        yield policyd, prometheus
    finally:
        prometheus.stop()
        policyd.stop()


def _traffic(policyd: PolicydProcess) -> None:
    with socket.create_connection((policyd.host, policyd.port), timeout=10) as sock:
        for client, recipient in [
            ("198.51.100.7", "u@remote.example"),
            ("192.0.2.7", "u@remote.example"),
            ("198.51.100.7", "u@local.example"),
        ]:
            sock.sendall(RCPT.format(client=client, recipient=recipient).encode())
            reply = b""
            while not reply.endswith(b"\n\n"):
                reply += sock.recv(100)


def _instant(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def test_prometheus_evaluates_every_panel_and_alert(
    scraped: tuple[PolicydProcess, Prometheus],
) -> None:
    policyd, prometheus = scraped
    assert prometheus.wait_for('up{job="policyd"} == 1')
    # Traffic between scrapes, so that rates have two samples to differ by.
    for _ in range(3):
        _traffic(policyd)
        time.sleep(1.2)
    prometheus.wait_for('increase(policyd_requests_total{job="policyd"}[1m]) > 0')
    expressions = {**dashboard_expressions(), **alert_expressions()}
    assert len(expressions) >= 20
    for where, expr in expressions.items():
        expr = _instant(expr)
        prometheus.query(expr)  # evaluates without error
        for name, selector in _SELECTOR.findall(expr):
            series = prometheus.query(name + selector)
            assert series, f"{where}: {name}{selector} returned no series from a running policyd"
    # And the panels' whole expressions return data (alerts rightly stay empty when healthy).
    for where, expr in dashboard_expressions().items():
        assert prometheus.query(_instant(expr)), f"panel {where} returned nothing"
