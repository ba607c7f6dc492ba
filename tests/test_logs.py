"""The serve log handler: lines are written at once, flushed once per reactor turn."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import sys
import threading
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from policyd.logs import Event, JsonFormatter, SecondFormatter, TurnFlushedHandler, make_record
from tests.e2e.policyd_process import PolicydProcess


class _Counting(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("policyd.decision", logging.INFO, __file__, 1, message, None, None)


def test_records_are_flushed_once_per_turn() -> None:
    """Several records in one reactor turn: all written, one flush when the turn ends."""
    stream = _Counting()
    handler = TurnFlushedHandler(stream)
    handler.setFormatter(SecondFormatter())
    clock = Clock()
    handler.flush_each_turn(clock.callLater)
    for n in range(3):
        handler.handle(_record(f"decision {n}"))
    assert stream.getvalue().count("\n") == 3
    assert stream.flushes == 0
    clock.advance(0)
    assert stream.flushes == 1
    handler.handle(_record("decision 3"))
    clock.advance(0)
    assert stream.flushes == 2


def test_records_flush_at_once_before_the_reactor_and_off_its_thread() -> None:
    """Without the reactor, or from another thread, each record is flushed as written."""
    stream = _Counting()
    handler = TurnFlushedHandler(stream)
    handler.handle(_record("before the reactor"))
    assert stream.flushes == 1
    clock = Clock()
    handler.flush_each_turn(clock.callLater)
    worker = threading.Thread(target=handler.handle, args=(_record("from a worker"),))
    worker.start()
    worker.join()
    assert stream.flushes == 2
    assert not clock.getDelayedCalls()


def test_time_stamp_format() -> None:
    """The line layout: local time to the second, level, logger name, message."""
    formatter = SecondFormatter()
    record = _record("decision x")
    line = formatter.format(record)
    assert line.endswith(" INFO policyd.decision: decision x")
    assert len(line.split(" ")[0]) == len("2026-12-02T10:00:00")


def test_make_record_is_the_record_logging_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_record gives every field Logger.log would give a preformatted message (after
    setup() switched off caller, thread and process), so any formatter sees the same."""
    monkeypatch.setattr(logging, "logProcesses", False)
    monkeypatch.setattr(logging, "logThreads", False)
    monkeypatch.setattr(logging, "logMultiprocessing", False)
    monkeypatch.setattr(logging, "_srcfile", None)
    made: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            made.append(record)

    logger = logging.getLogger("policyd.test-make-record")
    logger.addHandler(Keep())
    logger.propagate = False
    try:
        logger.log(logging.WARNING, "decision a=b")
        ours = make_record(logger.name, logging.WARNING, "decision a=b")
    finally:
        logger.handlers.clear()
    theirs = made[0].__dict__
    timing = {"created", "msecs", "relativeCreated"}
    assert {k: v for k, v in ours.__dict__.items() if k not in timing} == {
        k: v for k, v in theirs.items() if k not in timing and k != "taskName"
    }
    assert set(ours.__dict__) >= timing
    assert 0 <= ours.created - made[0].created < 60
    assert ours.getMessage() == "decision a=b"


def _record(msg: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("policyd.decision", level, "", 0, msg, None, None)


def test_json_formatter_one_object_per_line() -> None:
    event = Event("decision", [("client", "192.0.2.7"), ("recipient", 'evil"\n\x1e\u2028@x')])
    line = JsonFormatter().format(_record(event))
    assert "\n" not in line and "\x1e" not in line and "\u2028" not in line
    data = json.loads(line)
    assert data["event"] == "decision" and data["level"] == "INFO"
    assert data["logger"] == "policyd.decision"
    assert data["client"] == "192.0.2.7" and data["recipient"] == 'evil"\n\x1e\u2028@x'
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", data["time"])
    # The same event in logfmt: quoted, escaped, one line.
    assert str(event) == 'decision client=192.0.2.7 recipient="evil\\"\\x0a\\x1e\\u2028@x"'


def test_json_formatter_plain_message_and_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("policyd", logging.ERROR, "", 0, "x %s", ("y",), sys.exc_info())
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "x y" and data["level"] == "ERROR"
    assert "ValueError: boom" in data["exception"]
    assert "time" not in json.loads(JsonFormatter(timestamp=False).format(_record("m")))


def _denied_request(process: PolicydProcess) -> None:
    with socket.create_connection((process.host, process.port), timeout=10) as sock:
        sock.sendall(
            b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=198.51.100.7\n"
            b"recipient=u@remote.example\nsasl_username=\n\n"
        )
        assert sock.recv(100).startswith(b"action=550")


def test_serve_logs_json(tmp_path: Path) -> None:
    process = PolicydProcess(
        {"local_domains": ["local.example"]},
        tmp_path,
        socketmap=False,
        extra_args=["--log-format", "json"],
    )
    process.start()
    try:
        _denied_request(process)
        process.wait_for_log('"event": "decision"')
    finally:
        process.stop()
    lines = [line for line in process.log_text().splitlines() if not line.startswith("===")]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    decision = next(r for r in records if r.get("event") == "decision")
    assert decision["verdict"] == "denied" and decision["rule"] == "relay.default"
    assert decision["client"] == "198.51.100.7"
    assert any(r.get("message", "").startswith("stopped") for r in records)


def test_serve_logs_to_syslog_facility_mail(tmp_path: Path) -> None:
    """--log-target syslog: one datagram per record, facility mail, ident policyd[PID]."""
    address = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(10)
    process = PolicydProcess(
        {"local_domains": ["local.example"]},
        tmp_path / "run",
        socketmap=False,
        extra_args=["--log-target", "syslog", "--syslog-address", str(address)],
    )
    try:
        process.start()
        _denied_request(process)
        assert process.process is not None
        pid = process.process.pid
        messages = []
        while not any(b"decision " in m for m in messages):
            messages.append(receiver.recv(4096))
        # <22>: facility mail (2) * 8 + severity info (6); then the ident; a NUL ends it.
        decision = next(m for m in messages if b"decision " in m)
        assert decision.startswith(f"<22>policyd[{pid}]: INFO policyd.decision: decision ".encode())
        assert b"verdict=denied" in decision
    finally:
        process.stop()
        receiver.close()
    assert "decision " not in process.log_text()  # not on stderr as well


def test_serve_without_syslog_socket_says_so(tmp_path: Path) -> None:
    process = PolicydProcess(
        {"local_domains": ["local.example"]},
        tmp_path,
        socketmap=False,
        extra_args=["--log-target", "syslog", "--syslog-address", str(tmp_path / "none")],
    )
    result = process.cli(*process.argv[3:], timeout=30)
    assert result.returncode == 1
    assert f"cannot log to syslog at {tmp_path / 'none'}" in result.stderr
