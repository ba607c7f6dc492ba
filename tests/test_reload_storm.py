"""Reloads and stops under load, against a real policyd process (loopback, bounded).

Hundreds of SIGHUPs, alternating valid and invalid files, rewritten atomically (rename) and in
place, the YAML and its ``file:`` list both, while persistent connections keep asking: every
answer is one the rules in force could give, no connection is dropped, every reload is counted.
Then SIGTERM while they still ask: exit 0, every reply received is right.
``POLICYD_RELOAD_STORM`` sets the number of reloads (300 in the test command).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from tests.e2e.policyd_process import PolicydProcess
from tests.e2e.postfix import free_port
from tests.test_service import PolicyClient, connect, scrape

RELOADS = int(os.environ.get("POLICYD_RELOAD_STORM", "300"))

# 192.0.2.7 is allowed by every valid version, 198.51.100.7 by none, 203.0.113.7 by every other.
ALWAYS, NEVER, SOMETIMES = "192.0.2.7", "198.51.100.7", "203.0.113.7"
DENIED = "action=550 5.7.1 Relaying Denied"
NETWORKS = ["192.0.2.0/24\n", "192.0.2.0/24\n203.0.113.0/24\n"]
BAD_NETWORKS = "192.0.2.0/24\n300.0.113.0/24\n"


def write(path: Path, text: str, atomic: bool) -> None:
    if atomic:
        temporary = path.with_suffix(".new")
        temporary.write_text(text)
        temporary.chmod(0o644)
        os.replace(temporary, path)
    else:
        with path.open("w") as stream:
            stream.write(text)


class Asker(threading.Thread):
    """One persistent connection asking in a loop until told to stop; records every reply."""

    def __init__(self, process: PolicydProcess) -> None:
        super().__init__(daemon=True)
        self.client: PolicyClient = connect(process)
        self.stop = threading.Event()
        self.replies: list[tuple[str, str]] = []
        self.failure: BaseException | None = None
        self.closed_by_server = False

    def run(self) -> None:
        clients = (ALWAYS, NEVER, SOMETIMES)
        try:
            index = 0
            while not self.stop.is_set() and index < 200_000:
                address = clients[index % 3]
                self.replies.append((address, self.client.ask(address, "u@remote.example")))
                index += 1
        except ConnectionError:
            self.closed_by_server = True
        except BaseException as error:  # reported by the test
            self.failure = error


def wrong(replies: list[tuple[str, str]]) -> list[tuple[str, str]]:
    allowed = {ALWAYS: {"action=OK"}, NEVER: {DENIED}, SOMETIMES: {"action=OK", DENIED}}
    return [(address, reply) for address, reply in replies if reply not in allowed[address]]


def reloads(process: PolicydProcess) -> int:
    total = 0
    for line in scrape(process).splitlines():
        if line.startswith("policyd_config_reloads_total{"):
            total += int(float(line.split()[-1]))
    return total


def test_reload_storm_then_sigterm_under_load(tmp_path: Path) -> None:
    networks = tmp_path / "networks.txt"
    networks.write_text(NETWORKS[0])
    networks.chmod(0o644)
    config: dict[str, Any] = {
        "local_domains": ["local.example"],
        "relay": {"allow": {"client_networks": [f"file:{networks}"]}},
        "listen": {"metrics": f"inet:127.0.0.1:{free_port('127.0.0.1')}"},
    }
    process = PolicydProcess(config, tmp_path / "run")
    process.start()
    assert process.process is not None
    good_yaml = process.config_path.read_text()
    askers = [Asker(process) for _ in range(4)]
    for asker in askers:
        asker.start()
    failed = succeeded = 0
    try:
        for number in range(RELOADS):
            atomic = number % 2 == 0
            kind = number % 4
            if kind == 0:  # a valid file: list (the other version)
                write(networks, NETWORKS[(number // 4) % 2], atomic)
                write(process.config_path, good_yaml, atomic)
            elif kind == 1:  # a broken YAML
                write(process.config_path, good_yaml + "relay: [\n", atomic)
            elif kind == 2:  # the YAML valid again, the file: list broken
                write(process.config_path, good_yaml, atomic)
                write(networks, BAD_NETWORKS, atomic)
            else:  # both valid
                write(networks, NETWORKS[(number // 4) % 2], atomic)
            expected = reloads(process) + 1
            process.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while reloads(process) < expected:
                assert time.monotonic() < deadline, f"reload {number} was never counted"
                time.sleep(0.01)
            if kind in (1, 2):
                failed += 1
            else:
                succeeded += 1
        assert all(asker.is_alive() for asker in askers), "a connection was dropped"
        text = scrape(process)
        assert f'policyd_config_reloads_total{{result="success"}} {float(succeeded)}' in text
        assert f'policyd_config_reloads_total{{result="failure"}} {float(failed)}' in text
        asked_during_storm = sum(len(asker.replies) for asker in askers)
        # SIGTERM while every connection is still asking.
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(timeout=30) == 0
    finally:
        for asker in askers:
            asker.stop.set()
        for asker in askers:
            asker.join(timeout=30)
            asker.client.close()
        if process.process is not None and process.process.poll() is None:
            process.stop()
    for asker in askers:
        assert asker.failure is None, asker.failure
        assert asker.closed_by_server  # the stop closed it; it did not time out
        assert not wrong(asker.replies), wrong(asker.replies)[:5]
    print(
        f"\nreloads={RELOADS} (succeeded {succeeded}, failed {failed}) "
        f"answers_during_storm={asked_during_storm} "
        f"answers_total={sum(len(a.replies) for a in askers)}"
    )
    assert "stopped" in process.log_text()
