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
import json
import logging
import logging.handlers
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TextIO

#: ``--log-format``: key=value pairs (the default) or one JSON object per line.
LogFormat = Literal["logfmt", "json"]
#: ``--log-target``: standard error (the journal, under systemd) or syslog, facility mail.
LogTarget = Literal["stderr", "syslog"]
LOG_FORMATS: tuple[LogFormat, ...] = ("logfmt", "json")
LOG_TARGETS: tuple[LogTarget, ...] = ("stderr", "syslog")
DEFAULT_SYSLOG_ADDRESS = "/dev/log"


class Event:
    """A structured log message: an event name and (key, value) fields, values unquoted.

    ``str()`` is the logfmt line (``decision queue_id=... client=...``, values quoted by
    ``quote_value``), built only when a formatter asks; ``JsonFormatter`` takes the fields as
    they are instead.
    """

    __slots__ = ("fields", "name")

    def __init__(self, name: str, fields: Sequence[tuple[str, str]]) -> None:
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        return self.name + "".join([f" {key}={quote_value(value)}" for key, value in self.fields])


def quote_value(value: str) -> str:
    """Make a log value safe: ``-`` when empty, quoted and escaped when it has odd characters."""
    if not value:
        return "-"
    if value.isprintable():
        # Four substring tests beat one regular-expression search on these short values.
        if " " not in value and '"' not in value and "=" not in value and "\\" not in value:
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return '"' + "".join(_escape(c) for c in value) + '"'


def _escape(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


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


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (control characters escaped, no separator byte).

    ``{"time": "2026-12-02T10:00:00.123+00:00", "level": "INFO", "logger": "policyd.decision",
    "event": "decision", "queue_id": "...", ...}`` for an ``Event``; other records carry
    ``"message"`` (and ``"exception"`` with the traceback, if any).
    """

    def __init__(self, *, timestamp: bool = True) -> None:
        super().__init__()
        self.timestamp = timestamp

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {}
        if self.timestamp:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            zone = time.strftime("%z", time.localtime(record.created))
            out["time"] = f"{stamp}.{int(record.msecs):03d}{zone[:3]}:{zone[3:]}"
        out["level"] = record.levelname
        out["logger"] = record.name
        message = record.msg
        if isinstance(message, Event) and not record.args:
            out["event"] = message.name
            for key, value in message.fields:
                out.setdefault(key, str(value))
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True)


class SyslogLineFormatter(logging.Formatter):
    """``LEVEL logger: message`` for syslog, which adds the time, host and ``policyd[PID]``."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")


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


def make_record(name: str, level: int, message: str | Event) -> logging.LogRecord:
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


class SyslogHandler(logging.handlers.SysLogHandler):
    """Syslog, facility ``mail`` (as Postfix's own programs log), ident ``policyd[PID]``.

    Each record is one datagram to the local syslog socket; ``flush_each_turn`` exists so
    that ``serve`` treats both targets alike, and does nothing.
    """

    def __init__(self, address: str) -> None:
        # SysLogHandler ignores an unreachable socket (and then loses every record): refuse
        # to start instead, so that the administrator learns it at once.
        _probe_syslog(address)
        super().__init__(address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        self.ident = f"policyd[{os.getpid()}]: "

    def flush_each_turn(self, call_later: Callable[..., Any]) -> None:
        """Nothing to batch: syslog takes each record as it comes."""


def _probe_syslog(address: str) -> None:
    """Raise OSError unless a datagram or stream socket at ``address`` accepts a connection."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
    except OSError:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(address)


def setup(
    debug: bool,
    stream: TextIO,
    log_format: LogFormat = "logfmt",
    target: LogTarget = "stderr",
    syslog_address: str = DEFAULT_SYSLOG_ADDRESS,
) -> TurnFlushedHandler | SyslogHandler:
    """Log to ``stream`` (or syslog), one line per event, in ``log_format``; route Twisted's
    own log to the same place.

    Returns the handler, so that ``serve`` can switch it to per-turn flushing once the
    reactor exists. Raises OSError when syslog's socket cannot be reached.
    """
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    # No line shows them, and collecting them costs more than formatting the line.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no stack walk to find the caller's file and line
    handler: TurnFlushedHandler | SyslogHandler
    if target == "syslog":
        handler = SyslogHandler(syslog_address)
        if log_format == "json":
            handler.setFormatter(JsonFormatter(timestamp=False))
        else:
            handler.setFormatter(SyslogLineFormatter())
    else:
        handler = TurnFlushedHandler(block_buffered(stream))
        handler.setFormatter(JsonFormatter() if log_format == "json" else SecondFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("twisted").setLevel(logging.DEBUG if debug else logging.WARNING)
    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)
    return handler
