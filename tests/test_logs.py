"""The serve log handler: lines are written at once, flushed once per reactor turn."""

from __future__ import annotations

import io
import logging
import threading

import pytest
from twisted.internet.task import Clock

from policyd.logs import SecondFormatter, TurnFlushedHandler, make_record


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
