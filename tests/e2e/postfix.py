"""A private, throwaway Postfix instance for the end-to-end tests.

``PostfixInstance`` builds a complete Postfix configuration under a temporary directory and runs
it with ``postfix -c DIR``. It never touches /etc/postfix, /var/spool/postfix or a system Postfix
that may be running: everything (config, queue, data, log, pid) lives under its own directory.

How the instance is set up (see reference/postfix-sandbox-pitfalls.md for the why):

* its own ``config_directory`` (``main.cf``, ``master.cf``, ``dynamicmaps.cf``, ``sasl/``),
  ``queue_directory`` (root-owned, 0755) and ``data_directory`` (owned by ``postfix``, 0700);
* logging to a file: ``maillog_file`` **and** ``maillog_file_prefixes`` covering it, and a
  ``postlog`` service in master.cf (without the prefix, ``postfix start`` fails silently);
* ``chroot = n`` for every service, no DNS at all (``smtpd_peername_lookup = no``,
  ``smtp_dns_support_level = disabled``), ``inet_interfaces = 127.0.0.1``;
* one ``smtpd`` master.cf line per listener (``127.0.0.1:P1``, ``127.0.0.2:P2``, ...), since
  ``inet_interfaces`` cannot list several loopback addresses;
* ``mydestination = local.example, localhost``; by default every transport is ``discard:`` so
  accepted mail is thrown away instead of being delivered; with ``deliver=True`` (the outbound
  tests) ``default_transport`` and ``relay_transport`` are real ``smtp`` instead, and mail leaves
  through the transports policyd's ``transport`` table names;
* ``mynetworks = 127.0.0.0/8`` on purpose: every test client is in "mynetworks", so a relay
  placement that consulted ``permit_mynetworks`` would let the "outside" clients relay and the
  tests would notice;
* ``postfix-examples/main.cf`` is appended **unchanged** except for the endpoints' ports
  (``inet:127.0.0.1:10040`` becomes ``inet:127.0.0.1:<policy_port>``, the socketmap's
  ``inet:127.0.0.1:10041`` becomes ``inet:127.0.0.1:<socketmap_port>``) and the path of the
  static transport table policyd writes (``hash:/var/lib/policyd/transport`` becomes
  ``hash:<transport_table>``), and
  ``postfix-examples/master.cf`` is appended to master.cf **unchanged**, so the relay placement
  and the outbound transports under test are exactly the ones shipped to administrators;
* optional Cyrus SASL (``smtpd_sasl_auth_enable = yes``) with a sasldb under the instance
  directory. PLAIN/LOGIN are offered over plaintext loopback connections: acceptable for a test
  bound to 127.0.0.0/8, never for production (use ``smtpd_tls_auth_only = yes`` there).

Must run as root (Postfix's master runs as root and drops to ``mail_owner``).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_MAIN_CF = REPO_ROOT / "postfix-examples" / "main.cf"
EXAMPLE_MASTER_CF = REPO_ROOT / "postfix-examples" / "master.cf"
# The endpoints written in postfix-examples/main.cf; the harness swaps in its own ports.
EXAMPLE_POLICY_ENDPOINT = "inet:127.0.0.1:10040"
EXAMPLE_SOCKETMAP_ENDPOINT = "inet:127.0.0.1:10041"
# The static transport table policyd writes (outbound.transport_table in policyd.yaml) and
# postfix-examples/main.cf reads; the harness moves it into the test's directory.
EXAMPLE_TRANSPORT_TABLE_PATH = "/var/lib/policyd/transport"
EXAMPLE_TRANSPORT_TABLE = f"hash:{EXAMPLE_TRANSPORT_TABLE_PATH}"

POSTFIX_COMMANDS = ("postfix", "postconf", "postmap", "postqueue", "saslpasswd2")
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (for config comments)."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def last_setting_wins(main_cf: str) -> str:
    """``main_cf`` with every parameter assignment but the last of its name removed (with its
    continuation lines), which is what Postfix makes of it anyway. Postfix warns about each
    overridden entry in every process it starts, postlogd included; postlogd sends its own
    warnings to its own socket before it reads it, so more than net.unix.max_dgram_qlen (10)
    of them deadlock it, and with it every process that logs: smtpd never sends its banner."""
    entries: list[tuple[str | None, list[str]]] = []
    for line in main_cf.splitlines():
        if line[:1].isspace() and line.strip() and entries:
            entries[-1][1].append(line)
            continue
        name, equals, _ = line.partition("=")
        setting = name.strip() if equals and not line.lstrip().startswith("#") else None
        entries.append((setting, [line]))
    last = {name: index for index, (name, _) in enumerate(entries) if name}
    kept = [
        line
        for index, (name, lines) in enumerate(entries)
        if name is None or last[name] == index
        for line in lines
    ]
    return "\n".join(kept) + "\n"


class PostfixError(RuntimeError):
    """The private Postfix could not be configured, started or stopped."""


def find_command(name: str) -> str | None:
    """Path of a Postfix/SASL command, also looking in sbin dirs missing from a user's PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (our init may be slow to reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 3, after the parenthesised command name (which may contain spaces).
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait (bounded) for ``pid`` to go away; True if it did."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class PostfixInstance:
    """A private Postfix with policyd wired in through ``postfix-examples/main.cf``.

    Usage::

        pf = PostfixInstance(policy_port=10040, socketmap_port=10041,
                             listeners=[("127.0.0.1", 2525)])
        pf.start()          # returns once every listener answers with a 220 banner
        ...
        pf.stop()           # `postfix stop`, waits for the master process to exit
        pf.cleanup()        # removes the instance directory

    ``listeners`` are (address, port) pairs, one ``smtpd`` service each; the default is
    127.0.0.1 and 127.0.0.2, each on a free port. ``socketmap_port`` is policyd's socketmap
    listener (required when the shipped main.cf names one). ``transport_table`` is where the
    test's policyd writes its static transport table (required: the shipped main.cf reads
    one). ``deliver=True`` makes ``default_transport``/``relay_transport`` real ``smtp``
    instead of ``discard:``.

    ``configure()`` may run before policyd starts (policyd's postmap reads this instance's
    main.cf); ``start()`` then needs the table in place.
    """

    def __init__(
        self,
        policy_port: int,
        *,
        socketmap_port: int | None = None,
        transport_table: Path | None = None,
        listeners: Sequence[tuple[str, int]] | None = None,
        local_domain: str = "local.example",
        sasl: bool = True,
        deliver: bool = False,
        basedir: Path | None = None,
        example_main_cf: Path = EXAMPLE_MAIN_CF,
        example_master_cf: Path = EXAMPLE_MASTER_CF,
    ) -> None:
        self.policy_port = policy_port
        self.socketmap_port = socketmap_port
        self.transport_table = transport_table
        self.deliver = deliver
        self.example_master_cf = example_master_cf
        self.listeners: list[tuple[str, int]] = (
            list(listeners)
            if listeners is not None
            else [("127.0.0.1", free_port("127.0.0.1")), ("127.0.0.2", free_port("127.0.0.2"))]
        )
        self.local_domain = local_domain
        self.sasl = sasl
        self.example_main_cf = example_main_cf

        self._owns_basedir = basedir is None
        if basedir is None:
            basedir = Path(tempfile.mkdtemp(prefix="policyd-pf-"))
        # Postfix daemons run as `postfix` and must traverse to the sasldb and the log.
        basedir.mkdir(parents=True, exist_ok=True)
        basedir.chmod(0o755)
        self.basedir = basedir
        self.config_dir = basedir / "etc"
        self.queue_dir = basedir / "spool"
        self.data_dir = basedir / "data"
        self.log_dir = basedir / "log"
        self.maillog_path = self.log_dir / "maillog"
        self.sasl_dir = self.config_dir / "sasl"
        self.sasldb_path = self.sasl_dir / "sasldb2"
        self.master_pid_path = self.queue_dir / "pid" / "master.pid"

        self._postfix = self._command("postfix")
        self._postconf = self._command("postconf")
        self._postmap = self._command("postmap")
        self._postqueue = self._command("postqueue")
        self._configured = False
        self._started = False

    # ----------------------------------------------------------------------------- configuration

    @staticmethod
    def _command(name: str) -> str:
        path = find_command(name)
        if path is None:
            raise PostfixError(
                f"`{name}` not found: install the system packages with "
                "`make test` or `bash scripts/install-system-deps.sh`"
            )
        return path

    @property
    def smtp_address(self) -> tuple[str, int]:
        """The first listener (127.0.0.1:P1 by default)."""
        return self.listeners[0]

    def shipped_relay_settings(self) -> str:
        """``postfix-examples/main.cf`` with only the policy and socketmap ports and the
        transport table's path replaced."""
        text = self.example_main_cf.read_text()
        if EXAMPLE_POLICY_ENDPOINT not in text:
            raise PostfixError(
                f"{self.example_main_cf} no longer names the policy endpoint "
                f"{EXAMPLE_POLICY_ENDPOINT!r}; the e2e harness cannot point it at the test "
                "policyd without rewriting the placement under test"
            )
        text = text.replace(EXAMPLE_POLICY_ENDPOINT, f"inet:127.0.0.1:{self.policy_port}")
        if EXAMPLE_SOCKETMAP_ENDPOINT in text:
            if self.socketmap_port is None:
                raise PostfixError(
                    f"{self.example_main_cf} names policyd's socketmap "
                    f"{EXAMPLE_SOCKETMAP_ENDPOINT!r}: give PostfixInstance a socketmap_port"
                )
            text = text.replace(EXAMPLE_SOCKETMAP_ENDPOINT, f"inet:127.0.0.1:{self.socketmap_port}")
        if f"transport_maps = {EXAMPLE_TRANSPORT_TABLE}\n" not in text:
            raise PostfixError(
                f"{self.example_main_cf} no longer sets transport_maps = "
                f"{EXAMPLE_TRANSPORT_TABLE}; the e2e harness cannot point it at the test's "
                "table without rewriting the setup under test"
            )
        if self.transport_table is None:
            raise PostfixError(
                f"{self.example_main_cf} reads policyd's static table {EXAMPLE_TRANSPORT_TABLE}: "
                "give PostfixInstance a transport_table (where the test's policyd writes it)"
            )
        return text.replace(EXAMPLE_TRANSPORT_TABLE, f"hash:{self.transport_table}")

    def shipped_master_cf(self) -> str:
        """``postfix-examples/master.cf``, unchanged."""
        return self.example_master_cf.read_text()

    def _main_cf(self) -> str:
        d = self.local_domain
        lines = [
            "# Generated by tests/e2e/postfix.py: a private Postfix for the policyd e2e tests.",
            "compatibility_level = 3.7",
            f"queue_directory = {self.queue_dir}",
            f"data_directory = {self.data_dir}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            f"myhostname = mx.{d}",
            f"mydomain = {d}",
            "myorigin = $myhostname",
            # The domains postfix-examples/policyd.yaml counts as local (its local_domains and
            # local-domains.txt), as an administrator following the examples would list them.
            f"mydestination = {d}, local-two.example, localhost",
            "relay_domains =",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            # Deliberately broad, see the module docstring.
            "mynetworks = 127.0.0.0/8",
            "",
            "# Logging to a file (no syslog in the sandbox)",
            f"maillog_file = {self.maillog_path}",
            f"maillog_file_prefixes = {self.log_dir}",
            "",
            "# No DNS: the resolver is not reachable",
            "smtpd_peername_lookup = no",
            "smtp_dns_support_level = disabled",
            "smtp_host_lookup = native",
            "",
            *(
                [
                    "# Remote mail leaves over SMTP (transport_maps picks the policyd-* transport)",
                    "local_transport = discard:",
                    "default_transport = smtp",
                    "relay_transport = smtp",
                    "virtual_transport = discard:",
                    "smtp_tls_loglevel = 1",
                ]
                if self.deliver
                else [
                    "# Accepted mail goes nowhere",
                    "local_transport = discard:",
                    "default_transport = discard:",
                    "relay_transport = discard:",
                    "virtual_transport = discard:",
                ]
            ),
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "",
            "smtpd_banner = $myhostname ESMTP policyd-e2e",
            "biff = no",
            "smtpd_tls_security_level = none",
            "smtp_tls_security_level = none",
        ]
        if self.sasl:
            lines += [
                "",
                "# SMTP AUTH through Cyrus SASL (sasldb). Debian's Postfix reads",
                "# <config_directory>/sasl/smtpd.conf. PLAIN over plaintext loopback: test only.",
                "smtpd_sasl_auth_enable = yes",
                "smtpd_sasl_type = cyrus",
                "smtpd_sasl_path = smtpd",
                "smtpd_sasl_security_options = noanonymous",
                "smtpd_tls_auth_only = no",
            ]
        else:
            lines += ["", "smtpd_sasl_auth_enable = no"]
        lines += [
            "",
            f"# ---- {_shown(self.example_main_cf)} as shipped "
            f"(policy port {self.policy_port} instead of 10040, "
            f"socketmap port {self.socketmap_port} instead of 10041, "
            f"transport table {self.transport_table} instead of "
            f"{EXAMPLE_TRANSPORT_TABLE_PATH}) ----",
            self.shipped_relay_settings(),
        ]
        return "\n".join(lines) + "\n"

    def _master_cf(self) -> str:
        services = [f"{addr}:{port} inet n - n - - smtpd" for addr, port in self.listeners]
        # Debian's stock services, chroot (5th column) "n" everywhere.
        services += [
            "pickup    unix  n - n 60    1 pickup",
            "cleanup   unix  n - n -     0 cleanup",
            "qmgr      unix  n - n 300   1 qmgr",
            # Without tlsmgr the smtp client has "no entropy for TLS key generation" and
            # disables TLS: smtp_tls_security_level=encrypt then defers every delivery.
            "tlsmgr    unix  - - n 1000? 1 tlsmgr",
            "rewrite   unix  - - n -     - trivial-rewrite",
            "bounce    unix  - - n -     0 bounce",
            "defer     unix  - - n -     0 bounce",
            "trace     unix  - - n -     0 bounce",
            "verify    unix  - - n -     1 verify",
            "flush     unix  n - n 1000? 0 flush",
            "proxymap  unix  - - n -     - proxymap",
            "proxywrite unix - - n -     1 proxymap",
            "smtp      unix  - - n -     - smtp",
            "relay     unix  - - n -     - smtp",
            "showq     unix  n - n -     - showq",
            "error     unix  - - n -     - error",
            "retry     unix  - - n -     - error",
            "discard   unix  - - n -     - discard",
            "local     unix  - n n -     - local",
            "anvil     unix  - - n -     1 anvil",
            "scache    unix  - - n -     1 scache",
            "postlog   unix-dgram n - n - 1 postlogd",
        ]
        return (
            "# Generated by tests/e2e/postfix.py\n"
            + "\n".join(services)
            + f"\n\n# ---- {_shown(self.example_master_cf)} as shipped ----\n"
            + self.shipped_master_cf()
        )

    def configure(self) -> None:
        """Write the configuration and create the directories (idempotent)."""
        postfix_uid = pwd.getpwnam("postfix").pw_uid
        postfix_gid = grp.getgrnam("postfix").gr_gid

        for directory in (self.config_dir, self.queue_dir, self.log_dir):
            directory.mkdir(mode=0o755, exist_ok=True)
            os.chown(directory, 0, 0)
            directory.chmod(0o755)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, postfix_uid, postfix_gid)

        (self.config_dir / "main.cf").write_text(last_setting_wins(self._main_cf()))
        (self.config_dir / "master.cf").write_text(self._master_cf())
        system_dynamicmaps = Path("/etc/postfix/dynamicmaps.cf")
        if system_dynamicmaps.is_file():
            shutil.copyfile(system_dynamicmaps, self.config_dir / "dynamicmaps.cf")

        if self.sasl:
            self.sasl_dir.mkdir(mode=0o755, exist_ok=True)
            (self.sasl_dir / "smtpd.conf").write_text(
                "pwcheck_method: auxprop\n"
                "auxprop_plugin: sasldb\n"
                "mech_list: PLAIN LOGIN\n"
                f"sasldb_path: {self.sasldb_path}\n"
            )
        self._configured = True

    def add_sasl_user(self, user: str, password: str, domain: str | None = None) -> str:
        """Create (or replace) a sasldb user; returns the login name ``user@domain``.

        The sasldb is read at every AUTH, so this works on a running instance.
        """
        if not self.sasl:
            raise PostfixError("this instance was built without SASL")
        if not self._configured:
            self.configure()
        domain = domain or self.local_domain
        saslpasswd2 = self._command("saslpasswd2")
        result = subprocess.run(
            [saslpasswd2, "-p", "-c", "-f", str(self.sasldb_path), "-u", domain, user],
            input=password,
            text=True,
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise PostfixError(f"saslpasswd2 failed ({result.returncode}): {result.stderr}")
        os.chown(self.sasldb_path, 0, grp.getgrnam("postfix").gr_gid)
        self.sasldb_path.chmod(0o640)
        return f"{user}@{domain}"

    def postconf(self, *names: str) -> dict[str, str]:
        """The effective values of main.cf parameters, as ``postconf -c DIR -h`` sees them."""
        values: dict[str, str] = {}
        for name in names:
            result = subprocess.run(
                [self._postconf, "-c", str(self.config_dir), "-h", name],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if result.returncode != 0:
                raise PostfixError(f"postconf {name} failed: {result.stderr.strip()}")
            values[name] = result.stdout.strip()
        return values

    def master_services(self) -> dict[str, tuple[str, dict[str, str]]]:
        """master.cf as Postfix parses it: service name -> (command, its ``-o`` overrides),
        from ``postconf -F`` and ``postconf -P``."""
        services: dict[str, tuple[str, dict[str, str]]] = {}
        for flag in ("-F", "-P"):
            result = subprocess.run(
                [self._postconf, "-c", str(self.config_dir), flag],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if result.returncode != 0:
                raise PostfixError(f"postconf {flag} failed: {result.stderr.strip()}")
            for line in result.stdout.splitlines():
                path, _, value = line.partition(" = ")
                name, _type, field = path.split("/", 2)
                _command, options = services.setdefault(name, ("", {}))
                if flag == "-F" and field == "command":
                    services[name] = (value.split()[0], options)
                elif flag == "-P":
                    options[field] = value
        return services

    def postmap_query(self, key: str, table: str) -> subprocess.CompletedProcess[str]:
        """``postmap -c DIR -q KEY TABLE`` (exit 0 and the value when found, 1 when not)."""
        return subprocess.run(
            [self._postmap, "-c", str(self.config_dir), "-q", key, table],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def flush_queue(self) -> None:
        """``postqueue -f``: ask the queue manager to retry deferred mail now."""
        subprocess.run(
            [self._postqueue, "-c", str(self.config_dir), "-f"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )

    def queue(self) -> list[dict[str, Any]]:
        """The queue as ``postqueue -j`` reports it: one dict per message (queue_name,
        queue_id, sender, recipients[{address, delay_reason?}], ...)."""
        result = subprocess.run(
            [self._postqueue, "-c", str(self.config_dir), "-j"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise PostfixError(f"postqueue -j failed: {result.stderr.strip()}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    # ------------------------------------------------------------------------------- processes

    def _run_postfix(self, action: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c DIR ACTION`` under a pseudo-terminal.

        Without a terminal, postfix(1) reports its errors only to the mail log; ``script -qec``
        gives it one, so the message shows up in our output too.
        """
        argv = [self._postfix, "-c", str(self.config_dir), action]
        script = shutil.which("script")
        if script is not None:
            argv = [script, "-qec", shlex.join(argv), "/dev/null"]
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def master_pid(self) -> int | None:
        """The PID in ``queue_directory/pid/master.pid`` if that process is alive."""
        try:
            pid = int(self.master_pid_path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def service_pids(self, command: str) -> list[int]:
        """PIDs of this instance's running ``command`` daemons (e.g. ``trivial-rewrite``):
        the master's children whose process name is ``command``."""
        master = self.master_pid()
        if master is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            parent = int(stat.rpartition(")")[2].split()[1])
            if parent == master and Path(argv0).name == command:
                pids.append(int(entry.name))
        return sorted(pids)

    def check(self) -> None:
        """``postfix check``; raise with its output if it fails."""
        if not self._configured:
            self.configure()
        result = self._run_postfix("check")
        if result.returncode != 0:
            raise PostfixError(self._describe("postfix check failed", result))

    def start(self, timeout: float = 30) -> None:
        """Start the instance; return once every listener answers with its 220 banner."""
        if not self._configured:
            self.configure()
        if self.master_pid() is not None:
            raise PostfixError(f"a Postfix master already runs for {self.config_dir}")
        result = self._run_postfix("start")
        self._started = True
        if result.returncode != 0:
            self.stop()
            raise PostfixError(self._describe("postfix start failed", result))
        try:
            deadline = time.monotonic() + timeout
            for address in self.listeners:
                self._wait_banner(address, deadline)
        except PostfixError as exc:
            self.stop()
            raise PostfixError(self._describe(str(exc), result)) from None

    def _wait_banner(self, address: tuple[str, int], deadline: float) -> None:
        last_error = "no attempt"
        while time.monotonic() < deadline:
            fatal = [line for line in self.maillog().splitlines() if " fatal: " in line]
            if fatal:
                raise PostfixError(f"Postfix logged a fatal error: {fatal[-1]}")
            wait = max(0.1, min(2.0, deadline - time.monotonic()))
            try:
                with socket.create_connection(address, timeout=wait) as sock:
                    sock.settimeout(wait)
                    banner = sock.makefile("rb").readline()
                    if banner.startswith(b"220 "):
                        sock.sendall(b"QUIT\r\n")
                        return
                    last_error = f"unexpected greeting {banner!r}"
            except OSError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if self._started and self.master_pid() is None and self.master_pid_path.exists():
                last_error += " (the master process is gone)"
            time.sleep(0.1)
        raise PostfixError(
            f"no SMTP banner on {address[0]}:{address[1]} within the start timeout: {last_error}"
        )

    def stop(self, timeout: float = 20) -> None:
        """``postfix stop``, then wait (bounded) for the master to exit; kill it by PID if not.

        Safe to call more than once, and after a failed start.
        """
        pid = self.master_pid()
        if pid is None:
            self._started = False
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._run_postfix("stop", timeout=timeout)
        if not wait_pid_gone(pid, timeout):
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if wait_pid_gone(pid, grace):
                    break
        self._started = False
        if pid_alive(pid):
            raise PostfixError(f"Postfix master {pid} did not exit")

    def cleanup(self) -> None:
        """Stop if needed and remove the instance directory (if this object created it)."""
        self.stop()
        if self._owns_basedir:
            shutil.rmtree(self.basedir, ignore_errors=True)

    # ------------------------------------------------------------------------------------- logs

    def maillog(self) -> str:
        """The whole mail log of this instance ('' before anything was logged)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_maillog(self, *needles: str, timeout: float = 30, after: int = 0) -> str:
        """The first maillog line containing every needle, waiting (bounded) for it; ``after``
        skips that many characters of the log (``len(maillog())`` taken earlier)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.maillog()[after:].splitlines():
                if all(needle in line for needle in needles):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no maillog line contains all of {needles!r} within {timeout}s\n"
                    f"--- maillog tail ---\n{self.maillog_tail()}"
                )
            time.sleep(0.1)

    def maillog_tail(self, lines: int = 40) -> str:
        return "\n".join(self.maillog().splitlines()[-lines:])

    def _describe(self, what: str, result: subprocess.CompletedProcess[str]) -> str:
        output = (result.stdout + result.stderr).strip() or "(no output)"
        return (
            f"{what} (exit {result.returncode}) for {self.config_dir}\n"
            f"--- postfix output ---\n{output}\n"
            f"--- maillog tail ({self.maillog_path}) ---\n{self.maillog_tail() or '(empty)'}"
        )

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
