"""Run the real policyd (``python -m policyd serve``) as a subprocess for the end-to-end tests."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .postfix import EXAMPLE_TRANSPORT_TABLE_PATH, PostfixInstance, free_port


def terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM ``process`` by its PID, wait (bounded), SIGKILL if it is still there."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=timeout)
    return process.returncode


class PolicydError(RuntimeError):
    """policyd did not start or stop as expected."""


class PolicydProcess:
    """policyd serving ``config`` on ``inet:127.0.0.1:<port>``, stderr captured to a file.

    ``config`` is the YAML document as a dict; ``listen.policy`` is filled in with the port
    (a free one unless given), ``listen.socketmap`` with another port (given, or a free one;
    Postfix's transport_maps and smtp_sasl_password_maps point at it; ``socketmap=False``
    leaves it out) and, with ``metrics=True``, ``listen.metrics`` with a third.

    With ``transport_table=PATH``, policyd writes its static transport table there (the
    shipped main.cf's ``hash:/var/lib/policyd/transport``, moved): ``outbound.transport_table``
    gets that path and ``postfix_config_dir`` (the private Postfix's, for postmap). A config
    that already names a table must name the shipped path, which is the only thing replaced.

    The process is started with ``--verbose`` (plus ``extra_args``) so every decision is
    logged, and is only ever signalled by its own PID.
    """

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        socketmap: bool = True,
        socketmap_port: int | None = None,
        metrics: bool = False,
        control: bool = False,
        env: dict[str, str] | None = None,
        transport_table: Path | None = None,
        postfix_config_dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.socketmap_port = (socketmap_port or free_port(host)) if socketmap else None
        self.metrics_port = free_port(host) if metrics else None
        # A short path of its own: a unix socket's path is limited to 107 bytes.
        self.control_path = (
            Path(tempfile.mkdtemp(prefix="policyd-ctl-")) / "control.sock" if control else None
        )
        self.transport_table = transport_table
        self.postfix_config_dir = postfix_config_dir
        self.extra_args = list(extra_args)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # Extra environment for policyd (e.g. a password_env secret), on top of ours.
        self.env = {**os.environ, **(env or {})}
        self.config_path = workdir / "policyd.yaml"
        self.log_path = workdir / "policyd.log"
        self.config: dict[str, Any] = {}
        self.rewrite_config(config)
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @classmethod
    def for_postfix(
        cls, config: dict[str, Any], workdir: Path, instance: PostfixInstance, **options: Any
    ) -> PolicydProcess:
        """A policyd on ``instance``'s policy and socketmap ports, writing the transport table
        ``instance`` reads, with postmap using ``instance``'s main.cf."""
        if instance.socketmap_port is None or instance.transport_table is None:
            raise PolicydError("the Postfix instance has no socketmap port or transport table")
        return cls(
            config,
            workdir,
            port=instance.policy_port,
            socketmap_port=instance.socketmap_port,
            transport_table=instance.transport_table,
            postfix_config_dir=instance.config_dir,
            **options,
        )

    def rewrite_config(self, config: dict[str, Any]) -> None:
        """Write ``config`` as policyd's YAML (for the next start or SIGHUP), with this
        process's listeners and transport table path put in as described above."""
        config = copy.deepcopy(config)
        listen = config.setdefault("listen", {})
        listen["policy"] = f"inet:{self.host}:{self.port}"
        if self.socketmap_port is not None:
            listen["socketmap"] = f"inet:{self.host}:{self.socketmap_port}"
        if self.metrics_port is not None:
            listen["metrics"] = f"inet:{self.host}:{self.metrics_port}"
        if self.control_path is not None:
            listen["control"] = f"unix:{self.control_path}"
        if self.transport_table is not None:
            outbound = config.setdefault("outbound", {})
            table = outbound.setdefault("transport_table", {"path": EXAMPLE_TRANSPORT_TABLE_PATH})
            if table.get("path") not in (EXAMPLE_TRANSPORT_TABLE_PATH, str(self.transport_table)):
                raise PolicydError(
                    f"outbound.transport_table.path is {table.get('path')!r}, not the shipped "
                    f"{EXAMPLE_TRANSPORT_TABLE_PATH!r}: the harness cannot move it to the test's "
                    "table without changing what is under test"
                )
            table["path"] = str(self.transport_table)
            if self.postfix_config_dir is not None:
                table["postfix_config_dir"] = str(self.postfix_config_dir)
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))

    @property
    def endpoint(self) -> str:
        return f"inet:{self.host}:{self.port}"

    @property
    def socketmap_endpoint(self) -> str:
        """``inet:HOST:PORT`` of policyd's socketmap server (Postfix table notation)."""
        if self.socketmap_port is None:
            raise PolicydError("this policyd runs without a socketmap listener")
        return f"inet:{self.host}:{self.socketmap_port}"

    def ports(self) -> list[int]:
        """Every TCP port policyd listens on (policy, and socketmap/metrics if configured)."""
        return [p for p in (self.port, self.socketmap_port, self.metrics_port) if p is not None]

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "policyd",
            "serve",
            "--config",
            str(self.config_path),
            "--verbose",
            *self.extra_args,
        ]

    def start(self, timeout: float = 20) -> None:
        """Start policyd; return once all its ports accept connections (bounded)."""
        if self.process is not None and self.process.poll() is None:
            raise PolicydError(f"policyd already runs as PID {self.process.pid}")
        if self.control_path is not None:
            self.control_path.parent.mkdir(mode=0o700, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"=== {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                env=self.env,
            )
        self.returncode = None
        deadline = time.monotonic() + timeout
        waiting = self.ports()
        while waiting:
            exited = self.process.poll()
            if exited is not None:
                self.returncode = exited
                raise PolicydError(
                    f"policyd exited with {exited} before listening on {self.endpoint}\n"
                    f"--- config ---\n{self.config_path.read_text()}"
                    f"--- log ---\n{self.log_text()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, waiting[0]), timeout=1),
            ):
                waiting.pop(0)
                continue
            if time.monotonic() >= deadline:
                self.stop()
                raise PolicydError(
                    f"policyd did not listen on {self.host}:{waiting[0]} within {timeout}s\n"
                    f"--- log ---\n{self.log_text()}"
                )
            time.sleep(0.05)
        # The kernel accepts on the policy port as soon as policyd listens there, before it
        # has made the control socket a moment later: wait for that too (bounded).
        while self.control_path is not None and not self.control_path.exists():
            if self.process.poll() is not None or time.monotonic() >= deadline:
                raise PolicydError(
                    f"policyd made no control socket {self.control_path} within {timeout}s\n"
                    f"--- log ---\n{self.log_text()}"
                )
            time.sleep(0.01)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM by PID, wait (bounded), then SIGKILL. Returns the exit status.

        Safe to call when not running (returns the last exit status).
        """
        process = self.process
        if process is None:
            return self.returncode
        self.returncode = terminate(process, timeout)
        self.process = None
        if self.control_path is not None:
            shutil.rmtree(self.control_path.parent, ignore_errors=True)
        return self.returncode

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``python -m policyd ARGS...`` with this process's environment (not the server)."""
        return subprocess.run(
            [sys.executable, "-m", "policyd", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.workdir,
            check=False,
        )

    def scrape(self) -> str:
        """The text of ``/metrics`` (needs ``metrics=True``)."""
        if self.metrics_port is None:
            raise PolicydError("this policyd runs without a metrics listener")
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def log_text(self) -> str:
        """Everything policyd wrote to stdout/stderr so far (all runs of this object)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, *needles: str, timeout: float = 5, after: int = 0) -> str:
        """The first log line containing every needle, waiting (bounded) for it to be flushed;
        ``after`` skips that many characters of the log (``len(log_text())`` taken earlier)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_text()[after:].splitlines():
                if all(needle in line for needle in needles):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no policyd log line contains all of {needles!r}\n"
                    f"--- policyd log ---\n{self.log_text()}"
                )
            time.sleep(0.05)


EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "postfix-examples" / "policyd.yaml"


def shipped_policyd_config() -> dict[str, Any]:
    """postfix-examples/policyd.yaml as shipped, with ``listen`` emptied (PolicydProcess fills
    it in) and its relative ``file:`` lists made absolute (the copy is written elsewhere)."""
    config: dict[str, Any] = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["listen"] = {}
    config["local_domains"] = [
        f"file:{EXAMPLE_CONFIG.parent / entry[5:]}"
        if entry.startswith("file:") and not entry[5:].startswith("/")
        else entry
        for entry in config["local_domains"]
    ]
    return config
