"""The shipped systemd unit: systemd 252's own checks, and what it promises the administrator."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from policyd.cli import EXIT_CONFIG
from tests.system_tools import require

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "policyd.service"
SHIPPED_BINARY = "/opt/policyd/venv/bin/policyd"


@pytest.fixture
def systemd_analyze() -> str:
    return require("systemd-analyze", "systemd")


def installed_copy(tmp_path: Path) -> Path:
    """The unit as shipped, with ExecStart pointing at this checkout's policyd (verify checks
    that the command exists); nothing else changed."""
    binary = Path(sys.executable).parent / "policyd"
    assert binary.exists(), binary
    text = UNIT.read_text()
    assert SHIPPED_BINARY in text
    copy = tmp_path / "policyd.service"
    copy.write_text(text.replace(SHIPPED_BINARY, str(binary)))
    return copy


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_systemd_analyze_verify(tmp_path: Path, systemd_analyze: str) -> None:
    result = subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_analyze_security_exposure(tmp_path: Path, systemd_analyze: str) -> None:
    """The exposure docs/operations.md records (lower is safer; 'OK' is below 2.0)."""
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--no-pager",
            str(installed_copy(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match[1]) <= 1.5 and match[2] == "OK", result.stdout


def test_unit_notifies_and_does_not_restart_on_a_bad_configuration() -> None:
    unit = directives(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    assert unit["Restart"] == ["on-failure"]
    # serve validates the file itself (exit EXIT_CONFIG); an ExecStartPre check's failure
    # would not be covered by RestartPreventExitStatus.
    assert "ExecStartPre" not in unit
    assert unit["User"] == ["policyd"] and unit["CapabilityBoundingSet"] == [""]
