"""Log output for ``serve``: one line per event, cheap enough to log every denial.

A decision line is written for every denied request (and for every request with
``--verbose``), so the cost of a log record is on the request path. Three things keep it to a
few microseconds:

- the ``logging`` module is told not to collect what no line shows (process id, thread name,
  the caller's file and line: ``logging.logProcesses``, ``logThreads``, ``_srcfile``);
- the time stamp is formatted once per second, not once per record;
- lines go to a block-buffered stream that is flushed once per reactor turn (after every
  request that arrived together has been answered), instead of one ``write`` system call per
  line. Until the reactor runs, and from any other thread, each record is flushed at once.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

#: The line layout: ``2026-12-02T10:00:00 INFO policyd.decision: decision ...``.
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class SecondFormatter(logging.Formatter):
    """``LINE_FORMAT`` with a local-time stamp formatted once per second."""

    def __init__(self) -> None:
        super().__init__(LINE_FORMAT, TIME_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(TIME_FORMAT, time.localtime(second))
            self._second = second
        return self._stamp


class TurnFlushedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that flushes once per reactor turn rather than once per record.

    ``flush_each_turn(call_later)`` is given the reactor's ``callLater`` from the reactor's
    thread; records emitted on that thread then schedule one flush for the end of the
    current turn. Before that, and for records from any other thread, every record is
    flushed as it is written.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._call_later: Callable[..., Any] | None = None
        self._reactor_thread = -1
        self._flush_pending = False

    def flush_each_turn(self, call_later: Callable[..., Any]) -> None:
        """From now on, batch the flushes of records logged on the calling thread."""
        self._call_later = call_later
        self._reactor_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        if self._call_later is None or threading.get_ident() != self._reactor_thread:
            self.flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self._call_later(0, self._flush_turn)

    def _flush_turn(self) -> None:
        self._flush_pending = False
        self.acquire()
        try:
            self.flush()
        finally:
            self.release()


#: What a LogRecord holds besides its name, level, message and time, as ``logging`` fills it
#: in for a preformatted message once setup() has switched off caller, thread and process.
_RECORD_FIELDS: dict[str, Any] = {
    "args": (),
    "exc_info": None,
    "exc_text": None,
    "filename": "(unknown file)",
    "funcName": "(unknown function)",
    "lineno": 0,
    "module": "(unknown file)",
    "pathname": "(unknown file)",
    "process": None,
    "processName": None,
    "stack_info": None,
    "thread": None,
    "threadName": None,
}
_new_record = object.__new__
_START = getattr(logging, "_startTime", time.time())


def make_record(name: str, level: int, message: str) -> logging.LogRecord:
    """The LogRecord ``logging`` would make for ``message`` (already formatted, no arguments),
    for a fifth of the cost: ``Logger.log`` spends most of its time on fields (caller,
    thread, process) that setup() switched off. Hand it to ``Logger.handle``."""
    now = time.time()
    record: logging.LogRecord = _new_record(logging.LogRecord)
    record.__dict__ = {
        **_RECORD_FIELDS,
        "name": name,
        "msg": message,
        "levelno": level,
        "levelname": logging.getLevelName(level),
        "created": now,
        "msecs": int((now - int(now)) * 1000) + 0.0,
        "relativeCreated": (now - _START) * 1000,
    }
    return record


def block_buffered(stream: TextIO) -> TextIO:
    """A block-buffered text stream on the file descriptor of ``stream`` (stderr, say).

    Python's stderr is line-buffered: one ``write`` system call per line. Streams without a
    file descriptor (tests' ``StringIO``) are returned as they are.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream
    binary = open(fd, "wb", buffering=64 * 1024, closefd=False)  # noqa: SIM115 (lives as long as the process)
    return io.TextIOWrapper(binary, encoding="utf-8", errors="backslashreplace")


def setup(debug: bool, stream: TextIO) -> TurnFlushedHandler:
    """Log to ``stream``, one line per event; route Twisted's own log to the same place.

    Returns the handler, so that ``serve`` can switch it to per-turn flushing once the
    reactor exists.
    """
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    # No line shows them, and collecting them costs more than formatting the line.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no stack walk to find the caller's file and line
    handler = TurnFlushedHandler(block_buffered(stream))
    handler.setFormatter(SecondFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("twisted").setLevel(logging.DEBUG if debug else logging.WARNING)
    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)
    return handler
