"""``policyd check-postfix``: is Postfix wired to policyd safely?

The commonest way to make an open relay with a policy service is a wrong placement in
``main.cf`` or ``master.cf``. This module reads Postfix's configuration through ``postconf``
(``-x`` for the expanded values, ``-P`` for ``master.cf`` ``-o`` overrides, ``-M`` for the
services) and compares it with policyd's configuration. Each finding names the Postfix parameter
(and the ``master.cf`` service) and says what to change. Errors make an open relay, fail open,
bypass policyd or refuse mail Postfix accepts; warnings are risky or unusual but not unsafe.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from policyd.config import Config, Endpoint
from policyd.outbound import TRANSPORTS

Severity = Literal["error", "warning"]

#: Restrictions that end a restriction list with "permit" for some clients, without policyd.
PERMITS = frozenset(
    {
        "permit",
        "permit_mynetworks",
        "permit_sasl_authenticated",
        "permit_tls_clientcerts",
        "permit_tls_all_clientcerts",
        "permit_auth_destination",
        "permit_mx_backup",
        "permit_inet_interfaces",
        "permit_dnswl_client",
        "permit_rhswl_client",
    }
)
#: Postfix's own relay check: refuses what is neither local nor permitted.
UNAUTH_DESTINATION = frozenset({"reject_unauth_destination", "defer_unauth_destination"})
#: main.cf parameters read (expanded with -x).
PARAMETERS = (
    "smtpd_relay_restrictions",
    "smtpd_recipient_restrictions",
    "smtpd_policy_service_default_action",
    "mydestination",
    "relay_domains",
    "virtual_alias_domains",
    "virtual_mailbox_domains",
    "smtp_sasl_password_maps",
    "transport_maps",
    "smtpd_restriction_classes",
)
RESTRICTION_LISTS = ("smtpd_relay_restrictions", "smtpd_recipient_restrictions")
DOMAIN_LISTS = (
    "mydestination",
    "relay_domains",
    "virtual_alias_domains",
    "virtual_mailbox_domains",
)


class PostconfError(RuntimeError):
    """postconf could not be run or failed."""


@dataclass(frozen=True)
class Finding:
    severity: Severity
    where: str  # "main.cf smtpd_relay_restrictions", "master.cf submission/inet ..."
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


@dataclass
class PostfixSettings:
    """What ``postconf`` said: main.cf values, master.cf overrides and services."""

    parameters: dict[str, str]
    #: (service, type) -> {parameter: value} from ``-o`` options.
    overrides: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    #: (service, type) -> the command (``smtpd``, ``smtp``, ...).
    services: dict[tuple[str, str], str] = field(default_factory=dict)


def _postconf(postconf: str, config_dir: str | None, *args: str) -> str:
    argv = [postconf, *(["-c", config_dir] if config_dir else []), *args]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL
        )
    except OSError as err:
        raise PostconfError(f"cannot run {postconf}: {err}") from None
    if result.returncode != 0:
        raise PostconfError(
            f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def read_postfix(config_dir: str | None = None, postconf: str = "postconf") -> PostfixSettings:
    """Read the instance in ``config_dir`` (Postfix's default one when None)."""
    parameters: dict[str, str] = {}
    for line in _postconf(postconf, config_dir, "-x", *PARAMETERS).splitlines():
        name, _, value = line.partition(" = ")
        parameters[name.strip()] = value.strip()
    classes = split_list(parameters.get("smtpd_restriction_classes", ""))
    if classes:
        # A class is a parameter of its own name; postconf prints nothing for an undefined one.
        for line in _postconf(postconf, config_dir, "-x", *classes).splitlines():
            name, _, value = line.partition(" = ")
            parameters[name.strip()] = value.strip()
    overrides: dict[tuple[str, str], dict[str, str]] = {}
    for line in _postconf(postconf, config_dir, "-P", "-x").splitlines():
        key, _, value = line.partition(" = ")
        parts = key.strip().split("/")
        if len(parts) == 3:
            overrides.setdefault((parts[0], parts[1]), {})[parts[2]] = value.strip()
    services: dict[tuple[str, str], str] = {}
    for line in _postconf(postconf, config_dir, "-M").splitlines():
        fields = line.split()
        if len(fields) >= 8:
            services[(fields[0], fields[1])] = fields[7]
    return PostfixSettings(parameters, overrides, services)


# -- restriction lists ----------------------------------------------------------------------


def split_list(value: str) -> list[str]:
    """Split a Postfix list at commas and white space, keeping ``{ ... }`` groups whole."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(depth - 1, 0)
        if depth == 0 and char in ", \t\n":
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        items.append("".join(current))
    return items


@dataclass
class PolicyCall:
    """One ``check_policy_service`` in a list: its server and its default_action, if set."""

    index: int
    server: str
    default_action: str | None


def _policy_call(index: int, argument: str) -> PolicyCall:
    if argument.startswith("{") and argument.endswith("}"):
        inner = split_list(argument[1:-1])
        server = inner[0] if inner else ""
        action = None
        for item in inner[1:]:
            body = item[1:-1] if item.startswith("{") else item
            name, _, value = body.partition("=")
            if name.strip() == "default_action":
                action = value.strip()
        return PolicyCall(index, server, action)
    return PolicyCall(index, argument, None)


def _policy_calls(items: list[str]) -> list[PolicyCall]:
    calls = []
    for index, item in enumerate(items):
        if item == "check_policy_service" and index + 1 < len(items):
            calls.append(_policy_call(index, items[index + 1]))
    return calls


def _same_endpoint(server: str, endpoint: Endpoint) -> bool:
    return server.strip() == str(endpoint)


def _permits(action: str) -> bool:
    """Whether an access(5) action permits: ``OK``, or an all-numerical result (``451 text``
    is a reply code, not all-numerical)."""
    text = action.strip()
    return text.upper() == "OK" or text.upper().startswith("OK ") or text.isdigit()


def check_restrictions(
    lists: dict[str, str], config: Config, default_action: str, where: str
) -> list[Finding]:
    """Findings for one smtpd's restriction lists (main.cf's, or a service's with overrides)."""
    findings: list[Finding] = []
    policy = config.listen.policy
    placed: dict[str, PolicyCall] = {}
    for name in RESTRICTION_LISTS:
        items = split_list(lists.get(name, ""))
        calls = _policy_calls(items)
        ours = [call for call in calls if _same_endpoint(call.server, policy)]
        for call in calls:
            if not _same_endpoint(call.server, policy):
                findings.append(
                    Finding(
                        "error",
                        f"{where} {name}",
                        f"check_policy_service {call.server} is not policyd's listen.policy "
                        f"({policy}); point it at {policy}",
                    )
                )
        if not ours:
            continue
        call = ours[0]
        placed[name] = call
        for item in items[: call.index]:
            if item in PERMITS:
                findings.append(
                    Finding(
                        "error",
                        f"{where} {name}",
                        f"{item} comes before check_policy_service: clients it permits relay "
                        "without policyd (and escape relay.never); remove it, policyd decides it",
                    )
                )
            elif item.startswith("check_") and item.endswith("_access"):
                findings.append(
                    Finding(
                        "warning",
                        f"{where} {name}",
                        f"{item} comes before check_policy_service: an OK in its table "
                        "permits without policyd; move it behind check_policy_service",
                    )
                )
        action = call.default_action or default_action
        if _permits(action):
            findings.append(
                Finding(
                    "error",
                    f"{where} {name}",
                    f"default_action {action!r} permits when policyd cannot be reached (fail "
                    "open); use a temporary error such as 451 4.3.5 Relay policy unavailable",
                )
            )
    if not placed:
        findings.append(
            Finding(
                "error",
                f"{where} smtpd_relay_restrictions",
                f"policyd ({policy}) is not asked: add check_policy_service {policy} first in "
                "smtpd_relay_restrictions, followed by reject_unauth_destination",
            )
        )
        return findings
    # Postfix's own relay check must stand behind policyd (warn mode, skipped states, DUNNO).
    for name, call in placed.items():
        after = split_list(lists.get(name, ""))[call.index + 2 :]
        behind = bool(UNAUTH_DESTINATION & set(after))
        if name == "smtpd_recipient_restrictions":
            behind = behind or bool(
                UNAUTH_DESTINATION & set(split_list(lists.get("smtpd_relay_restrictions", "")))
            )
        if not behind:
            findings.append(
                Finding(
                    "error",
                    f"{where} {name}",
                    "reject_unauth_destination is missing behind check_policy_service: "
                    "whatever policyd does not refuse (warn mode, a DUNNO) is then relayed; "
                    "add it right after check_policy_service",
                )
            )
    if "smtpd_relay_restrictions" not in placed:
        findings.append(
            Finding(
                "warning",
                f"{where} smtpd_recipient_restrictions",
                "policyd is asked only in smtpd_recipient_restrictions; the recommended place "
                "is first in smtpd_relay_restrictions",
            )
        )
    return findings


# -- domains and outbound ---------------------------------------------------------------------


def check_domains(settings: PostfixSettings, config: Config) -> list[Finding]:
    findings: list[Finding] = []
    accepted: set[str] = set()
    for name in DOMAIN_LISTS:
        for item in split_list(settings.parameters.get(name, "")):
            if ":" in item or item.startswith("/"):
                findings.append(
                    Finding(
                        "warning",
                        f"main.cf {name}",
                        f"{item} is a lookup table: check-postfix cannot compare its domains; "
                        "make sure each is in local_domains",
                    )
                )
                continue
            accepted.add(item.lower().removesuffix("."))
            if item not in config.local_domains:
                findings.append(
                    Finding(
                        "error",
                        f"main.cf {name}",
                        f"Postfix accepts mail for {item}, but policyd does not count it as "
                        f"local and refuses it as relaying: add {item} to local_domains",
                    )
                )
    for domain in sorted(config.local_domains.exact):
        if domain not in accepted and not domain.startswith("["):
            findings.append(
                Finding(
                    "warning",
                    "local_domains",
                    f"{domain} is local to policyd, but Postfix lists it in none of "
                    f"{', '.join(DOMAIN_LISTS)} (reject_unauth_destination refuses its mail): "
                    "remove it, or add it to Postfix",
                )
            )
    return findings


def check_outbound(settings: PostfixSettings, config: Config) -> list[Finding]:
    findings: list[Finding] = []
    profiles = [config.outbound.default, *(p for _, p in config.outbound.domains)]
    for transport in sorted({profile.transport for profile in profiles}):
        if (transport, "unix") not in settings.services:
            findings.append(
                Finding(
                    "error",
                    f"master.cf {transport}/unix",
                    f"the transport of an outbound profile is missing from master.cf: copy "
                    f"{transport} from postfix-examples/master.cf",
                )
            )
            continue
        needs_login = transport != TRANSPORTS["none"]
        enabled = settings.overrides.get((transport, "unix"), {}).get("smtp_sasl_auth_enable")
        if needs_login and enabled != "yes":
            findings.append(
                Finding(
                    "error",
                    f"master.cf {transport}/unix smtp_sasl_auth_enable",
                    f"{transport} delivers with a login but smtp_sasl_auth_enable is not yes "
                    "for it: add -o smtp_sasl_auth_enable=yes",
                )
            )
        if transport == TRANSPORTS["cleartext"]:
            level = settings.overrides.get((transport, "unix"), {}).get("smtp_tls_security_level")
            if level not in ("encrypt", "verify", "secure", "dane-only", "fingerprint"):
                findings.append(
                    Finding(
                        "error",
                        f"master.cf {transport}/unix smtp_tls_security_level",
                        f"{transport} sends a password in clear text but TLS is not mandatory "
                        f"for it ({level or 'unset'}): add -o smtp_tls_security_level=encrypt",
                    )
                )
    if any(profile.auth != "none" for profile in profiles):
        maps = settings.parameters.get("smtp_sasl_password_maps", "")
        socketmap = config.listen.socketmap
        wanted = f"socketmap:{socketmap}:sasl_passwd" if socketmap else None
        if wanted is None or wanted not in split_list(maps):
            which = wanted or "listen.socketmap is unset"
            findings.append(
                Finding(
                    "error",
                    "main.cf smtp_sasl_password_maps",
                    "outbound profiles log in, but smtp_sasl_password_maps does not ask "
                    f"policyd's socketmap ({which})",
                )
            )
    return findings


def check(settings: PostfixSettings, config: Config) -> list[Finding]:
    """Every finding, errors and warnings, in the order: main.cf, master.cf, domains, outbound."""
    main = settings.parameters
    default_action = main.get("smtpd_policy_service_default_action", "")
    findings = check_restrictions(
        {name: main.get(name, "") for name in RESTRICTION_LISTS},
        config,
        default_action,
        "main.cf",
    )
    for (service, kind), options in sorted(settings.overrides.items()):
        if settings.services.get((service, kind)) != "smtpd":
            continue
        changed = {name: options[name] for name in RESTRICTION_LISTS if name in options}
        if not changed:
            continue
        lists = {name: options.get(name, main.get(name, "")) for name in RESTRICTION_LISTS}
        action = options.get("smtpd_policy_service_default_action", default_action)
        findings += check_restrictions(lists, config, action, f"master.cf {service}/{kind}")
    findings += check_domains(settings, config)
    findings += check_outbound(settings, config)
    findings += check_hold_classes(settings, config)
    return findings


def check_hold_classes(settings: PostfixSettings, config: Config) -> list[Finding]:
    """A ``hold`` limit answers a restriction class name: main.cf must define that class,
    and it must end by permitting (else Postfix goes on to reject_unauth_destination)."""
    main = settings.parameters
    classes = split_list(main.get("smtpd_restriction_classes", ""))
    findings = []
    for limit in config.rate_limits.limits:
        if limit.action != "hold":
            continue
        name = limit.reply
        where = "main.cf smtpd_restriction_classes"
        if name not in classes or not main.get(name):
            findings.append(
                Finding(
                    "error",
                    where,
                    f"rate_limits limit {limit.name} (action hold) answers {name!r}, which is "
                    f"not a restriction class here: add {name} to smtpd_restriction_classes and "
                    f"define it, e.g. {name} = check_sender_access "
                    "static:{HOLD sending limit exceeded}, permit (postfix-examples/main.cf)",
                )
            )
            continue
        items = split_list(main[name])
        if not items or items[-1] != "permit":
            findings.append(
                Finding(
                    "error",
                    f"main.cf {name}",
                    f"rate_limits limit {limit.name} (action hold) answers {name}, which does "
                    "not end with permit: the held message's relay would then be refused by "
                    "reject_unauth_destination",
                )
            )
    return findings


def report(findings: Sequence[Finding]) -> str:
    if not findings:
        return "ok: Postfix asks policyd first and reject_unauth_destination behind it\n"
    errors = sum(f.severity == "error" for f in findings)
    lines = [str(f) for f in findings]
    lines.append(f"{errors} error(s), {len(findings) - errors} warning(s)")
    return "\n".join(lines) + "\n"
