"""Finding the Debian tools some tests drive (promtool, prometheus, systemd-analyze)."""

from __future__ import annotations

import shutil

import pytest

#: Debian's postmap (the transport-table tests run it; Postfix is installed by make test).
POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"


def require(tool: str, package: str) -> str:
    """The path of ``tool``; fails the test (never skips it) when it is not installed."""
    found = shutil.which(tool)
    if found is None:
        pytest.fail(
            f"{tool} not found: this test needs Debian's {package} package; run `make test` "
            "(or `bash scripts/install-system-deps.sh`) to install it"
        )
    return found
