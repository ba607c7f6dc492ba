"""Fixtures for the end-to-end tests: a real policyd and a real private Postfix on loopback.

These tests must run in CI, so a missing Postfix is a FAILURE, not a skip. The only way to skip
them is to run as a non-root user with POLICYD_E2E_ALLOW_SKIP=1 (Postfix's master must run as
root); as non-root without that variable they fail too.

Each test module gets one policyd and one Postfix (module scope), so a module runs in seconds.
A module sets its own policyd rules by overriding the ``policyd_config`` fixture; the Postfix
listener addresses come from ``smtp_listeners`` so that the rules can name them. policyd always
gets a socketmap listener (the shipped main.cf points smtp_sasl_password_maps at it) and writes
its static transport table into the module's directory (the shipped main.cf's transport_maps
reads it). The order is: the Postfix instance is configured (``postfix_instance``), policyd
starts and writes its table with that instance's main.cf (``policyd``), then Postfix starts
(``postfix``). test_outbound_e2e.py overrides ``postfix_instance`` and ``policyd`` to add real
SMTP delivery and a metrics listener.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .policyd_process import PolicydProcess
from .postfix import POSTFIX_COMMANDS, PostfixInstance, find_command, free_port

E2E_DIR = Path(__file__).resolve().parent
INSTALL_HINT = "run `make test` (or `bash scripts/install-system-deps.sh`) to install them"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e carries the ``e2e`` marker (select with ``-m e2e``)."""
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed e2e test, attach the tails of policyd's log and Postfix's maillog."""
    report = yield
    if report.failed and E2E_DIR in Path(str(item.path)).resolve().parents:
        funcargs = getattr(item, "funcargs", {})
        policyd = funcargs.get("policyd")
        if isinstance(policyd, PolicydProcess):
            tail = "\n".join(policyd.log_text().splitlines()[-40:])
            report.sections.append(("policyd log (tail)", tail))
        postfix = funcargs.get("postfix")
        if isinstance(postfix, PostfixInstance):
            report.sections.append(("postfix maillog (tail)", postfix.maillog_tail(40)))
    return report


@pytest.fixture(scope="session")
def e2e_preflight() -> None:
    """Refuse to run without root or without Postfix/SASL tools, loudly."""
    if os.geteuid() != 0:
        message = (
            "the end-to-end tests run a private Postfix and must run as root "
            "(set POLICYD_E2E_ALLOW_SKIP=1 to skip them on a workstation)"
        )
        if os.environ.get("POLICYD_E2E_ALLOW_SKIP") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    missing = [name for name in POSTFIX_COMMANDS if find_command(name) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: the end-to-end tests need Postfix and Cyrus SASL "
            f"(Debian packages postfix, sasl2-bin, libsasl2-modules); {INSTALL_HINT}",
            pytrace=False,
        )
    if shutil.which("script") is None:
        pytest.fail("`script` (util-linux) not found; it surfaces postfix(1) errors", pytrace=False)
    if shutil.which("openssl") is None:
        pytest.fail(
            "`openssl` not found: the outbound tests make their TLS certificate with it "
            f"(Debian package openssl, a dependency of postfix); {INSTALL_HINT}",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def e2e_dir(e2e_preflight: None) -> Iterator[Path]:
    """A world-traversable work directory (Postfix's daemons run as `postfix`)."""
    path = Path(tempfile.mkdtemp(prefix="policyd-e2e-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def smtp_listeners(e2e_preflight: None) -> list[tuple[str, int]]:
    """The Postfix smtpd listeners: 127.0.0.1 and 127.0.0.2, each on a free port."""
    return [("127.0.0.1", free_port("127.0.0.1")), ("127.0.0.2", free_port("127.0.0.2"))]


@pytest.fixture(scope="module")
def policyd_config(smtp_listeners: list[tuple[str, int]]) -> dict[str, Any]:
    """policyd's rules for the module (``listen.policy`` is filled in); override per module."""
    return {
        "mode": "enforce",
        "local_domains": ["local.example"],
        "relay": {"allow": {}, "never": {}},
        "replies": {"denied": "550 5.7.1 Relaying Denied"},
    }


@pytest.fixture(scope="module")
def policyd_ports(e2e_preflight: None) -> tuple[int, int]:
    """policyd's policy and socketmap ports, chosen before either side is configured."""
    return free_port("127.0.0.1"), free_port("127.0.0.1")


@pytest.fixture(scope="module")
def transport_table(e2e_dir: Path) -> Path:
    """Where policyd writes, and Postfix reads, the static transport table (instead of the
    shipped /var/lib/policyd/transport); the directory is readable by Postfix's daemons."""
    directory = e2e_dir / "tables"
    directory.mkdir(mode=0o755, exist_ok=True)
    return directory / "transport"


@pytest.fixture(scope="module")
def postfix_instance(
    request: pytest.FixtureRequest,
    policyd_ports: tuple[int, int],
    transport_table: Path,
    smtp_listeners: list[tuple[str, int]],
    e2e_dir: Path,
) -> Iterator[PostfixInstance]:
    """The private Postfix, configured but not started (policyd's postmap reads its main.cf).

    It delivers over SMTP when the test module sets ``POSTFIX_DELIVERS = True``.
    """
    instance = PostfixInstance(
        policy_port=policyd_ports[0],
        socketmap_port=policyd_ports[1],
        transport_table=transport_table,
        listeners=smtp_listeners,
        deliver=getattr(request.module, "POSTFIX_DELIVERS", False),
        basedir=e2e_dir / "postfix",
    )
    instance.configure()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def policyd(
    request: pytest.FixtureRequest,
    policyd_config: dict[str, Any],
    e2e_dir: Path,
    postfix_instance: PostfixInstance,
) -> Iterator[PolicydProcess]:
    """The real policyd, running for the whole module; stopped by PID afterwards.

    A test module may set ``POLICYD_METRICS = True`` (a metrics listener too) and
    ``POLICYD_ENV`` (extra environment, e.g. for a password_env secret).
    """
    process = PolicydProcess.for_postfix(
        policyd_config,
        e2e_dir / "policyd",
        postfix_instance,
        metrics=getattr(request.module, "POLICYD_METRICS", False),
        env=getattr(request.module, "POLICYD_ENV", None),
    )
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def postfix(
    policyd: PolicydProcess, postfix_instance: PostfixInstance
) -> Iterator[PostfixInstance]:
    """The private Postfix, started once policyd has written its table; it asks ``policyd``
    through postfix-examples/main.cf."""
    try:
        postfix_instance.start()
        yield postfix_instance
    finally:
        postfix_instance.stop()
