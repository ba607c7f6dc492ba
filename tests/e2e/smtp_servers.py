"""Remote SMTP servers on loopback for the outbound end-to-end tests (aiosmtpd).

Each ``RemoteServer`` listens on its own 127.0.0.x address and port in a thread of its own, and
records what every client did: the messages it received, and every AUTH attempt (mechanism,
login, whether it succeeded, whether the session was under TLS, and for NTLM the parsed
messages). Three kinds are used:

* ``RemoteServer.cleartext(...)``: offers STARTTLS (a self-signed certificate made with the
  ``openssl`` CLI at test time) and announces AUTH only after it; AUTH PLAIN/LOGIN checks the
  account and password; mail is refused (``530``) until the client has logged in;
* ``RemoteServer.ntlm(...)``: AUTH NTLM (a custom aiosmtpd mechanism): sends a type 2
  challenge naming ``target_name`` as the domain, parses the type 1 and type 3 messages, checks
  the user/domain fields and the NT response against the account's password (see ``ntlm.py``);
  refuses mail until the client has logged in; no TLS;
* ``RemoteServer.cleartext_without_tls(...)``: AUTH PLAIN/LOGIN in the clear, no STARTTLS
  (a legacy server);
* ``RemoteServer.plain(...)``: no TLS, no AUTH at all (the site's default smart host).

Every server announces ``AUTH NTLM PLAIN LOGIN`` in that order (when it announces AUTH), so that
the test also shows that the transport picked the mechanism its ``smtp_sasl_mechanism_filter``
allows, not just the first one offered. Mechanisms a server has no account for always fail.

Stop every server with ``stop()`` (each owns one thread and one listening socket).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from . import ntlm
from .postfix import free_port

ADVERTISED_MECHANISMS = ("NTLM", "PLAIN", "LOGIN")


def make_self_signed_cert(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A throwaway EC certificate and key, made with the openssl CLI; returns (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={common_name}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@dataclass
class AuthAttempt:
    """One AUTH command as the server saw it."""

    mechanism: str
    login: str  # PLAIN/LOGIN: the login; NTLM: the type 3 user field
    success: bool
    tls: bool
    ntlm: ntlm.NtlmExchange | None = None


def describe_attempts(attempts: list[AuthAttempt]) -> str:
    """A short, readable account of AUTH attempts for assertion messages."""
    if not attempts:
        return "no AUTH attempt"
    lines = []
    for a in attempts[-5:]:
        line = f"{a.mechanism} login={a.login!r} success={a.success} tls={a.tls}"
        if a.ntlm is not None:
            line += f" ntlm={a.ntlm.summary()}"
        lines.append(line)
    more = f" (last 5 of {len(attempts)})" if len(attempts) > 5 else ""
    return f"AUTH attempts{more}: " + "; ".join(lines)


@dataclass
class ReceivedMessage:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peer: str
    tls: bool
    auth: AuthAttempt | None  # the successful AUTH of that session, None without AUTH


@dataclass
class NtlmAccount:
    """The one account an NTLM server knows: DOMAIN\\user with its password."""

    domain: str
    user: str
    password: str


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP with an AUTH NTLM mechanism and the announced AUTH list reordered."""

    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        self._policy = handler
        super().__init__(handler, **kwargs)

    async def auth_NTLM(self, _: Any, args: list[str]) -> AuthResult:
        """AUTH NTLM [initial-response]: type 1 -> 334 type 2 -> type 3 -> 235/535."""
        assert self.session is not None
        exchange = ntlm.NtlmExchange()
        tls = self.session.ssl is not None
        policy = self._policy

        def fail(error: str) -> AuthResult:
            exchange.errors.append(error)
            policy.record_auth(AuthAttempt("NTLM", _ntlm_user(exchange), False, tls, exchange))
            return AuthResult(success=False, handled=False)

        if len(args) > 1:
            try:
                type1 = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                return fail("initial response is not base64")
        else:
            response = await self.challenge_auth(b"", encode_to_b64=False)
            if not isinstance(response, bytes):
                return fail("client aborted before the type 1 message")
            type1 = response
        try:
            exchange.negotiate = ntlm.Negotiate.parse(type1)
        except ntlm.NtlmError as exc:
            return fail(f"type 1: {exc}")

        challenge = secrets.token_bytes(8)
        account = policy.ntlm_account
        exchange.target_name = policy.ntlm_target_name
        type2, exchange.challenge_flags = ntlm.build_challenge(
            exchange.negotiate.flags, challenge, exchange.target_name
        )
        type3 = await self.challenge_auth(type2)
        if not isinstance(type3, bytes):
            return fail("client aborted after the challenge")
        try:
            exchange.authenticate = ntlm.Authenticate.parse(type3, exchange.challenge_flags)
        except ntlm.NtlmError as exc:
            return fail(f"type 3: {exc}")

        auth = exchange.authenticate
        if account is None:
            return fail("this server has no NTLM account")
        # The account named by the type 3 message: its user field, either "user" or the
        # down-level form "DOMAIN\user" (then DOMAIN must agree with the domain field).
        domain_field, user_field = auth.domain, auth.user
        claimed_domain, sep, claimed_user = user_field.rpartition("\\")
        if not sep:
            claimed_domain, claimed_user = domain_field, user_field
        if claimed_domain.upper() != domain_field.upper():
            return fail(
                f"user field names domain {claimed_domain!r}, domain field {domain_field!r}"
            )
        if (claimed_domain.upper(), claimed_user.lower()) != (
            account.domain.upper(),
            account.user.lower(),
        ):
            return fail(f"unknown account {claimed_domain}\\{claimed_user}")
        exchange.response_kind = ntlm.verify_response(auth, challenge, account.password)
        if exchange.response_kind is None:
            return fail("the response does not match the account's password")
        exchange.accepted = True
        attempt = AuthAttempt("NTLM", user_field, True, tls, exchange)
        policy.record_auth(attempt)
        return AuthResult(success=True, auth_data=attempt)


def _ntlm_user(exchange: ntlm.NtlmExchange) -> str:
    return exchange.authenticate.user if exchange.authenticate else ""


class _Handler:
    """aiosmtpd handler: records AUTH attempts and messages; refuses mail before AUTH."""

    def __init__(
        self,
        *,
        accounts: dict[str, str],
        ntlm_account: NtlmAccount | None,
        ntlm_target_name: str,
        auth: bool,
    ) -> None:
        self.accounts = accounts
        self.ntlm_account = ntlm_account
        self.ntlm_target_name = ntlm_target_name
        self.auth = auth
        self.lock = threading.Lock()
        self.messages: list[ReceivedMessage] = []
        self.auth_attempts: list[AuthAttempt] = []
        self.refused: list[tuple[str, str]] = []  # (command, reply) refused for lack of AUTH
        # Recipients answered "451" at RCPT while listed (a remote server's temporary trouble).
        self.defer_recipients: set[str] = set()

    def record_auth(self, attempt: AuthAttempt) -> None:
        with self.lock:
            self.auth_attempts.append(attempt)

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd ``authenticator`` for PLAIN and LOGIN."""
        assert isinstance(data, LoginPassword)
        login = data.login.decode(errors="replace")
        password = data.password.decode(errors="replace")
        expected = self.accounts.get(login)
        ok = expected is not None and secrets.compare_digest(expected, password)
        attempt = AuthAttempt(mechanism, login, ok, session.ssl is not None)
        self.record_auth(attempt)
        if not ok:
            # handled=False: aiosmtpd itself answers 535 (handled=True would leave the client
            # waiting for a reply that never comes).
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=attempt)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if not self.auth:
            return [r for r in responses if not r.startswith("250-AUTH")]
        return [
            "250-AUTH " + " ".join(ADVERTISED_MECHANISMS) if r.startswith("250-AUTH") else r
            for r in responses
        ]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.auth and not session.authenticated:
            reply = "530 5.7.0 Authentication required"
            with self.lock:
                self.refused.append((f"MAIL FROM:<{address}>", reply))
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        with self.lock:
            deferred = address in self.defer_recipients
        if deferred:
            return "451 4.3.0 Temporary trouble, try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        auth = session.auth_data if isinstance(session.auth_data, AuthAttempt) else None
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            content=bytes(envelope.original_content or b""),
            peer=str(session.peer),
            tls=session.ssl is not None,
            auth=auth if session.authenticated else None,
        )
        with self.lock:
            self.messages.append(message)
        return "250 2.0.0 Message accepted"


class RemoteServer:
    """One aiosmtpd server on ``host:port`` (a free port unless given), in its own thread."""

    def __init__(
        self,
        name: str,
        host: str,
        *,
        port: int = 0,
        accounts: dict[str, str] | None = None,
        ntlm_account: NtlmAccount | None = None,
        ntlm_target_name: str = "",
        tls_cert: tuple[Path, Path] | None = None,
        auth: bool = True,
    ) -> None:
        self.name = name
        self.host = host
        self.handler = _Handler(
            accounts=dict(accounts or {}),
            ntlm_account=ntlm_account,
            ntlm_target_name=ntlm_target_name,
            auth=auth,
        )
        tls_context = None
        if tls_cert is not None:
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(*map(str, tls_cert))
        self._smtp_kwargs: dict[str, Any] = {
            "hostname": f"{name}.remote.test",
            "tls_context": tls_context,
            "require_starttls": tls_context is not None,
            # PLAIN/LOGIN (and the AUTH announcement) only after STARTTLS on a TLS server.
            "auth_require_tls": tls_context is not None,
            "authenticator": self.handler.authenticate,
            "auth_exclude_mechanism": [] if auth else ["PLAIN", "LOGIN", "NTLM"],
        }
        self._port = port
        self._controller: Controller | None = None

    # ----------------------------------------------------------------------------- factories

    @classmethod
    def cleartext(
        cls, name: str, host: str, *, accounts: dict[str, str], tls_cert: tuple[Path, Path]
    ) -> RemoteServer:
        """STARTTLS, then AUTH PLAIN/LOGIN against ``accounts`` (login -> password)."""
        return cls(name, host, accounts=accounts, tls_cert=tls_cert)

    @classmethod
    def cleartext_without_tls(
        cls, name: str, host: str, *, accounts: dict[str, str]
    ) -> RemoteServer:
        """No STARTTLS at all; AUTH PLAIN/LOGIN in the clear against ``accounts``."""
        return cls(name, host, accounts=accounts)

    @classmethod
    def ntlm(
        cls, name: str, host: str, *, account: NtlmAccount, target_name: str | None = None
    ) -> RemoteServer:
        """AUTH NTLM for one account; the challenge names ``target_name`` (default: the
        account's domain) as the server's domain. No TLS."""
        return cls(
            name,
            host,
            ntlm_account=account,
            ntlm_target_name=account.domain if target_name is None else target_name,
        )

    @classmethod
    def plain(cls, name: str, host: str) -> RemoteServer:
        """No TLS, no AUTH: accepts mail from anyone."""
        return cls(name, host, auth=False)

    # ------------------------------------------------------------------------------- running

    def start(self) -> None:
        handler = self.handler
        kwargs = self._smtp_kwargs

        class _Controller(Controller):
            def factory(self) -> SMTP:
                return _RecordingSMTP(handler, **kwargs)

        port = self._port
        if port == 0:
            port = free_port(self.host)
        controller = _Controller(handler, hostname=self.host, port=port, ready_timeout=10)
        controller.start()
        self._controller = controller
        self._port = port

    def stop(self) -> None:
        if self._controller is not None:
            with contextlib.suppress(Exception):
                self._controller.stop()
            self._controller = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def nexthop(self) -> str:
        """This server as a Postfix next hop: ``[127.0.0.x]:port`` (no MX lookup)."""
        return f"[{self.host}]:{self.port}"

    # ----------------------------------------------------------------------------- recording

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self.handler.lock:
            return list(self.handler.messages)

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        with self.handler.lock:
            return list(self.handler.auth_attempts)

    def defer_recipient(self, recipient: str, defer: bool = True) -> None:
        """Answer ``451`` to RCPT TO:<recipient> from now on (or no longer, with False)."""
        with self.handler.lock:
            if defer:
                self.handler.defer_recipients.add(recipient)
            else:
                self.handler.defer_recipients.discard(recipient)

    def messages_to(self, recipient: str) -> list[ReceivedMessage]:
        return [m for m in self.messages if recipient in m.rcpt_tos]

    def wait_for_message(
        self, recipient: str, timeout: float, *, poke: Callable[[], None] | None = None
    ) -> ReceivedMessage:
        """Wait (bounded, polling) for a message to ``recipient``; ``poke`` is called about
        every 2 s while waiting (e.g. to flush the Postfix queue)."""
        deadline = time.monotonic() + timeout
        next_poke = time.monotonic() + 2
        while True:
            found = self.messages_to(recipient)
            if found:
                return found[0]
            now = time.monotonic()
            if now >= deadline:
                raise AssertionError(
                    f"{self.name} ({self.nexthop}) received no message for {recipient} within "
                    f"{timeout}s; it received {[m.rcpt_tos for m in self.messages]}; "
                    + describe_attempts(self.auth_attempts)
                )
            if poke is not None and now >= next_poke:
                poke()
                next_poke = now + 2
            time.sleep(0.05)

    def __repr__(self) -> str:
        return f"RemoteServer({self.name!r}, {self.nexthop})"


__all__ = [
    "AuthAttempt",
    "NtlmAccount",
    "ReceivedMessage",
    "RemoteServer",
    "describe_attempts",
    "make_self_signed_cert",
]
