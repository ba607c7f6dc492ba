"""A throwaway redis-server for tests: Debian's package, on a unix socket, persistence off.

Started by the tests and stopped by its PID. ``stop()``/``start()`` restart it on the same
socket, ``pause()``/``resume()`` freeze it with SIGSTOP/SIGCONT (a hung Redis), and
``command()`` talks to it through ``redis-cli``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.system_tools import require


class RedisServer:
    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.binary = require("redis-server", "redis-server")
        self.cli = require("redis-cli", "redis-tools")
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> None:
        assert self.process is None
        arguments = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password is not None:
            arguments += ["--user", "default", "off"]
            arguments += ["--user", "policyd", "on", f">{self.password}", "~policyd:*", "+@all"]
        self.process = subprocess.Popen(arguments, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self._log()}")
            if self.socket.exists() and self._ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within 10 s: {self._log()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a paused server must be able to exit
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        self.socket.unlink(missing_ok=True)

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False

    def resume_if_paused(self) -> None:
        if self.paused and self.process is not None:
            self.resume()

    def command(self, *arguments: str) -> str:
        auth = ["--user", "policyd", "--pass", self.password] if self.password else []
        done = subprocess.run(
            [self.cli, "-s", str(self.socket), *auth, "--no-auth-warning", *arguments],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()

    def _ping(self) -> bool:
        try:
            return self.command("PING") == "PONG"
        except subprocess.CalledProcessError:
            return False

    def _log(self) -> str:
        log = self.directory / "redis.log"
        return log.read_text()[-2000:] if log.exists() else "(no log)"
