"""Command line: ``policyd serve``, ``check-config``, ``explain``, ``write-tables``.

Exit codes (the only module that sets them):

- 0: success (``serve`` stopped by SIGTERM/SIGINT; a valid configuration; a decision explained;
  the tables written)
- 1: the configuration is invalid or unreadable, or ``outbound.transport_table`` cannot be
  written (nothing was started)
- 2: usage error (bad arguments, a malformed request given to ``explain``)
- 3: ``serve`` could not listen on a configured address
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from policyd import __version__
from policyd.config import Config, ConfigError, load_config
from policyd.logs import DEFAULT_SYSLOG_ADDRESS, LOG_FORMATS, LOG_TARGETS, LogFormat, LogTarget

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_LISTEN = 3

DEFAULT_CONFIG = "/etc/policyd/policyd.yaml"

log = logging.getLogger("policyd")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="policyd", description="Relay-control policy service for Postfix."
    )
    parser.add_argument("--version", action="version", version=f"policyd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            "-c",
            default=DEFAULT_CONFIG,
            metavar="FILE",
            help=f"the YAML configuration (default: {DEFAULT_CONFIG})",
        )
        return sub

    serve = add("serve", "Run the policy service in the foreground, logging to stderr or syslog.")
    serve.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="log every decision (default: only denials and errors)",
    )
    serve.add_argument("--debug", action="store_true", help="debug logging (implies --verbose)")
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="logfmt",
        help="logfmt: key=value lines (default); json: one JSON object per line",
    )
    serve.add_argument(
        "--log-target",
        choices=LOG_TARGETS,
        default="stderr",
        help="stderr (default; the journal under systemd) or syslog (facility mail, as "
        "Postfix logs)",
    )
    serve.add_argument(
        "--syslog-address",
        default=DEFAULT_SYSLOG_ADDRESS,
        metavar="PATH",
        help=f"the syslog socket for --log-target syslog (default: {DEFAULT_SYSLOG_ADDRESS})",
    )
    serve.add_argument(
        "--no-transport-table",
        action="store_true",
        help="do not write outbound.transport_table (to try a configuration on a machine "
        "without Postfix, as `make run` does); the socketmap still serves the transport map",
    )
    add(
        "check-config",
        "Validate the configuration, print a summary, exit non-zero on error. Writes nothing.",
    )
    add(
        "write-tables",
        "Write outbound.transport_table once (as serve does at start), then exit.",
    )
    check_postfix = add(
        "check-postfix",
        "Read Postfix's configuration through postconf and report every setting that makes an "
        "open relay, fails open or bypasses policyd. Exit 1 on errors, 0 with warnings only.",
    )
    check_postfix.add_argument(
        "--postfix-dir",
        metavar="DIR",
        help="the Postfix configuration directory (postconf -c DIR; default: Postfix's own)",
    )
    explain = add(
        "explain",
        "Decide one request and print the reply, verdict, rule and outbound profile. "
        "Attributes as name=value arguments, or a Postfix-format request on stdin.",
    )
    explain.add_argument(
        "attributes",
        nargs="*",
        metavar="NAME=VALUE",
        help="request attributes, e.g. client_address=192.0.2.7 recipient=user@example.org "
        "(protocol_state defaults to RCPT)",
    )
    limits = add(
        "limits",
        "Ask the running policyd (through listen.control) for a key's sending-limit budget, or "
        "clear it: `limits show alice@example.org`, `limits reset 192.0.2.7`.",
    )
    limits.add_argument("action", choices=("show", "reset"), help="show the budget, or reset it")
    limits.add_argument(
        "key", metavar="KEY", help="a SASL login, a client address, or a /24 or /64 network"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(
            args.config,
            verbose=args.verbose or args.debug,
            debug=args.debug,
            write_tables=not args.no_transport_table,
            log_format=args.log_format,
            log_target=args.log_target,
            syslog_address=args.syslog_address,
        )
    if args.command == "check-config":
        return check_config(args.config, sys.stdout, sys.stderr)
    if args.command == "write-tables":
        return write_tables(args.config, sys.stdout, sys.stderr)
    if args.command == "check-postfix":
        return check_postfix(args.config, args.postfix_dir, sys.stdout, sys.stderr)
    if args.command == "limits":
        return limits(args.config, args.action, args.key, sys.stdout, sys.stderr)
    return explain(args.config, args.attributes, sys.stdin, sys.stdout, sys.stderr)


def _load(path: str, err: TextIO, trusted_uids: frozenset[int] | None = None) -> Config | None:
    try:
        return load_config(path, trusted_uids)
    except ConfigError as error:
        print(f"policyd: configuration error: {error}", file=err)
        return None


def check_postfix(path: str, postfix_dir: str | None, out: TextIO, err: TextIO) -> int:
    """``policyd check-postfix``: errors exit 1, warnings alone 0."""
    from policyd import postfix_check

    config = _load(path, err)
    if config is None:
        return EXIT_CONFIG
    try:
        settings = postfix_check.read_postfix(postfix_dir)
    except postfix_check.PostconfError as error:
        print(f"policyd: cannot read the Postfix configuration: {error}", file=err)
        return EXIT_CONFIG
    findings = postfix_check.check(settings, config)
    out.write(postfix_check.report(findings))
    return EXIT_CONFIG if any(f.severity == "error" for f in findings) else EXIT_OK


def limits(path: str, action: str, key: str, out: TextIO, err: TextIO) -> int:
    """``policyd limits show|reset KEY``: asks the running policyd; 1 when it says no."""
    from policyd.control import ControlError, ask

    config = _load(path, err)
    if config is None:
        return EXIT_CONFIG
    control = config.listen.control
    if control is None:
        print(
            "policyd: listen.control is not configured: the running policyd has no control "
            "socket to ask (postfix-examples/policyd.yaml: unix:/run/policyd/control.sock)",
            file=err,
        )
        return EXIT_CONFIG
    try:
        ok, text = ask(control.path, action, key)
    except ControlError as error:
        print(f"policyd: {error} (is it running? as root or the policyd user?)", file=err)
        return EXIT_CONFIG
    print(text, file=out if ok else err)
    return EXIT_OK if ok else EXIT_CONFIG


def check_config(path: str, out: TextIO, err: TextIO) -> int:
    """``policyd check-config``."""
    config = _load(path, err)
    if config is None:
        return EXIT_CONFIG
    print(config.summary(), file=out)
    if config.transport_table is not None:
        from policyd.transport_table import problems

        for problem in problems(config.transport_table):
            print(f"  warning: outbound.transport_table: {problem} (serve would fail)", file=out)
    return EXIT_OK


def write_tables(path: str, out: TextIO, err: TextIO) -> int:
    """``policyd write-tables``: write outbound.transport_table as ``serve`` would."""
    from policyd.service import write_tables as write
    from policyd.transport_table import TableWriteError

    config = _load(path, err)
    if config is None:
        return EXIT_CONFIG
    try:
        written = write(config)
    except TableWriteError as error:
        print(f"policyd: {error}", file=err)
        return EXIT_CONFIG
    if written is None:
        print("no outbound.transport_table configured: nothing to write", file=out)
    else:
        print(written.describe(), file=out)
    return EXIT_OK


def explain(path: str, arguments: Sequence[str], stdin: TextIO, out: TextIO, err: TextIO) -> int:
    """``policyd explain``: decide one request without any network."""
    from policyd.decision import decide
    from policyd.request import PolicyRequest

    config = _load(path, err)
    if config is None:
        return EXIT_CONFIG
    attributes = {"request": "smtpd_access_policy", "protocol_state": "RCPT"}
    lines: list[str] = list(arguments)
    if not lines and not stdin.isatty():
        lines = [line.rstrip("\r\n") for line in stdin]
        lines = lines[: lines.index("")] if "" in lines else lines
    for item in lines:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"policyd: not a name=value attribute: {item!r}", file=err)
            return EXIT_USAGE
        attributes[name] = value
    request = PolicyRequest.from_attributes(attributes)
    decision = decide(config, request)
    print(f"action: {decision.action}", file=out)
    print(f"verdict: {decision.verdict.value}", file=out)
    print(f"rule: {decision.rule}", file=out)
    print(f"destination: {decision.destination or '-'}", file=out)
    if decision.outbound is not None:
        print(f"outbound: {decision.outbound.describe()}", file=out)
    elif decision.verdict.value in ("denied", "allowed"):
        profile = config.outbound_tables.select(decision.destination).profile
        print(f"outbound: {profile.describe()} (if it were relayed)", file=out)
    else:
        print("outbound: - (not relayed)", file=out)
    print(f"transport: {_transport_line(config, decision.destination)}", file=out)
    if decision.verdict.value == "allowed":
        from policyd.ratelimit import applicable

        pairs = applicable(config.rate_limits, str(decision.rule), request)
        shown = ", ".join(f"{limit.name} (key {key})" for limit, key in pairs)
        print(f"rate_limits: {shown or '- (none applies)'} (not charged)", file=out)
    if decision.warn_only:
        print("mode: warn (would be denied in enforce mode)", file=out)
    return EXIT_OK


def _transport_line(config: Config, destination: str | None) -> str:
    """What transport_maps gives Postfix for mail to ``destination`` (table and socketmap)."""
    if not destination:
        return "- (no destination domain)"
    answer = config.outbound_tables.transport(destination)
    where = "socketmap transport map"
    if config.transport_table is not None:
        where = f"{config.transport_table.table} and the {where}"
    if answer is None:
        return f"- (Postfix's own routing; {where})"
    return f"{answer} ({where})"


def serve(
    path: str,
    *,
    verbose: bool,
    debug: bool,
    write_tables: bool = True,
    log_format: LogFormat = "logfmt",
    log_target: LogTarget = "stderr",
    syslog_address: str = DEFAULT_SYSLOG_ADDRESS,
) -> int:
    """``policyd serve``: write the tables, run until SIGTERM/SIGINT; SIGHUP reloads."""
    from policyd import logs
    from policyd.systemd import Notifier

    try:
        handler = logs.setup(debug, sys.stderr, log_format, log_target, syslog_address)
    except OSError as error:
        print(f"policyd: cannot log to syslog at {syslog_address}: {error}", file=sys.stderr)
        return EXIT_CONFIG
    # Before any child process (postmap) starts: it takes systemd's variables out of the
    # environment, so that only this process notifies.
    notifier = Notifier()
    # The files that decide who relays must be root's or this user's, and nobody else's to
    # change (load_config); the same holds for every reload.
    trusted_uids = frozenset({0, os.geteuid()})
    config = _load(path, sys.stderr, trusted_uids)
    if config is None:
        return EXIT_CONFIG
    from policyd.service import write_tables as write
    from policyd.transport_table import TableWrite, TableWriteError

    written: TableWrite | None = None
    if write_tables:
        try:
            written = write(config)
        except TableWriteError as error:
            print(f"policyd: configuration error: {error}", file=sys.stderr)
            return EXIT_CONFIG
    elif config.transport_table is not None:
        log.warning(
            "not writing %s (--no-transport-table): a table already there is left as it is; "
            "the socketmap transport map answers from this configuration",
            config.transport_table.table,
        )

    from prometheus_client import CollectorRegistry

    from policyd.reactor import install as install_reactor
    from policyd.reactor import tune_gc

    reactor_name = install_reactor()
    from twisted.internet import reactor as _reactor
    from twisted.internet.error import ReactorNotRunning
    from twisted.internet.task import LoopingCall

    from policyd.metrics import Metrics
    from policyd.service import PolicyService

    reactor: Any = _reactor
    handler.flush_each_turn(reactor.callLater)
    log.debug("reactor: %s (%s)", reactor_name, type(reactor).__name__)

    for warning in config.warnings:
        log.warning("configuration warning: %s", warning)
    service = PolicyService(
        path,
        config,
        reactor,
        Metrics(CollectorRegistry()),
        log_all_decisions=verbose,
        write_tables=write_tables,
        trusted_uids=trusted_uids,
    )
    service.record_table_write(written)
    failures: list[Any] = []

    def stop_reactor() -> bool:
        """Stop the reactor; False if it is already stopping (a second signal, say)."""
        try:
            reactor.stop()
        except ReactorNotRunning:
            return False
        return True

    def stop(signum: int) -> None:
        notifier.stopping()
        note = "" if stop_reactor() else ": already stopping"
        log.info("received %s%s", signal.Signals(signum).name, note)

    def on_stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop, signum)

    def listen() -> None:
        # Runs once the reactor is up. Twisted's own SIGTERM/SIGINT handlers
        # (and the wake-up descriptor that lets a signal interrupt the reactor's
        # wait) are in place by then; ours replace the handlers so that a second
        # signal during the stop is noted instead of raising. Either way a stop
        # that arrives the moment the first port accepts is an orderly one
        # (exit 0), never the default action that kills the process.
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)

        def listening(_: object) -> None:
            log.info("policyd %s serving %s (mode %s)", __version__, path, config.mode)
            notifier.ready(f"serving {path}")
            if notifier.watchdog_seconds is not None:
                # Half the interval, as sd_watchdog_enabled(3) advises; from the reactor, so
                # a reactor that stops turning stops the pings.
                LoopingCall(notifier.watchdog).start(notifier.watchdog_seconds / 2)

        def cannot_listen(failure: Any) -> None:
            failures.append(failure)
            stop_reactor()

        service.start().addCallbacks(listening, cannot_listen)

    def reload() -> None:
        if service.reloading or service.state != "serving":
            # One more after the running reload, which notifies; or before READY=1 (or while
            # stopping), when systemd must not be told the service is ready.
            service.reload_in_thread()
            return
        notifier.reloading()

        def reloaded(_: object) -> None:
            notifier.ready(f"serving {path}; last reload {service.last_reload}")

        service.reload_in_thread().addBoth(reloaded)

    def on_hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload)

    # Before anything listens, so an early SIGHUP reloads instead of killing.
    signal.signal(signal.SIGHUP, on_hup)
    reactor.addSystemEventTrigger("before", "shutdown", service.stop)
    reactor.callWhenRunning(listen)
    frozen = tune_gc()
    log.debug("gc: %d objects frozen at start, thresholds %s", frozen, gc.get_threshold())
    reactor.run()
    handler.flush()
    if failures:
        print(f"policyd: cannot listen: {failures[0].getErrorMessage()}", file=sys.stderr)
        return EXIT_LISTEN
    return EXIT_OK
