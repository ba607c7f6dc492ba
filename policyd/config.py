"""The YAML configuration: parsed, validated strictly and compiled into a frozen ``Config``.

Every error names the key path and the line it came from, so an administrator can go straight to
it: ``relay.allow.client_networks[2]: '10.0.0.0/33' is not a network (policyd.yaml:14)``.
Unknown keys are errors: a typo must never silently change who may relay. Lists of networks and
domains are compiled here into lookup structures, so a decision never scans a list.

No Twisted here: this module reads files and builds values, nothing else.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policyd.address import DomainError, DomainSet, normalize_domain
from policyd.networks import (
    EntryError,
    IPNetwork,
    NetworkSet,
    ServerAddressSet,
    parse_network,
    parse_server_address,
)
from policyd.outbound import (
    AUTH_KINDS,
    AuthKind,
    CredentialConflict,
    Outbound,
    OutboundProfile,
    OutboundTables,
    Secret,
    TlsLevel,
)
from policyd.ratelimit import (
    ALLOW_RULES,
    BACKEND_ERROR_POLICIES,
    COUNT_KINDS,
    DEFAULT_REPLIES,
    LIMIT_ACTIONS,
    LIMIT_KEYS,
    BackendErrorPolicy,
    CountKind,
    Limit,
    LimitAction,
    RateError,
    RateLimits,
    RedisBackend,
    parse_rate,
)
from policyd.transport_table import (
    DEFAULT_POSTFIX_CONFIG_DIR,
    TABLE_TYPES,
    TableType,
    TransportTableSettings,
)

T = TypeVar("T")

Mode = Literal["enforce", "warn"]


class ConfigError(Exception):
    """A configuration that cannot be used. ``str()`` is the whole operator-facing message."""

    def __init__(self, path: str, message: str, source: str | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        text = f"{path}: {message}" if path else message
        super().__init__(f"{text} ({source})" if source else text)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A listening address in Postfix notation: ``inet:HOST:PORT`` or ``unix:/path``."""

    kind: Literal["inet", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"inet:{host}:{self.port}"

    @property
    def is_ipv6(self) -> bool:
        """True for an ``inet:`` endpoint on an IPv6 address."""
        return self.kind == "inet" and ":" in self.host


@dataclass(frozen=True, slots=True)
class Listen:
    """The ``listen`` section."""

    policy: Endpoint
    socketmap: Endpoint | None = None
    metrics: Endpoint | None = None
    socketmap_allow_remote: bool = False
    #: The administration socket (``policyd limits``): a unix socket, mode 0600.
    control: Endpoint | None = None


@dataclass(frozen=True, slots=True)
class Replies:
    """The ``replies`` section: the Postfix actions sent for each verdict."""

    denied: str = "550 5.7.1 Relaying Denied"
    allowed: str = "OK"
    local: str = "DUNNO"
    error: str = "451 4.3.0 Relay policy temporarily unavailable"


@dataclass(frozen=True, slots=True)
class Limits:
    """The ``limits`` section: protection against broken or hostile policy clients."""

    max_line_bytes: int = 16384
    max_request_bytes: int = 65536
    max_attributes: int = 100
    request_timeout_seconds: float = 30.0
    idle_timeout_seconds: float = 900.0
    #: Open policy connections at most; one more is closed at once (Postfix: default_action).
    max_connections: int = 4096
    #: The kernel's queue of connections not yet accepted, per listener (Twisted's default is
    #: 50; the kernel caps it at net.core.somaxconn). Takes effect at restart.
    listen_backlog: int = 1024


@dataclass(frozen=True, slots=True)
class RelayRules:
    """The ``relay`` section, compiled."""

    allow_authenticated: bool = False
    allow_client_networks: NetworkSet = field(default_factory=lambda: NetworkSet(()))
    allow_server_addresses: ServerAddressSet = field(default_factory=lambda: ServerAddressSet(()))
    never_client_networks: NetworkSet = field(default_factory=lambda: NetworkSet(()))
    never_sasl_usernames: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Config:
    """A complete, validated configuration. Immutable: a reload builds a new one."""

    source: str
    listen: Listen
    mode: Mode
    local_domains: DomainSet
    relay: RelayRules
    replies: Replies
    limits: Limits
    outbound: Outbound
    outbound_tables: OutboundTables
    transport_table: TransportTableSettings | None = None
    rate_limits: RateLimits = field(default_factory=RateLimits)
    file_lists: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    #: SHA-256 (hex) of the YAML text and of every ``file:`` list (path and content), in the
    #: order read: changes whenever a reload would decide differently. Password files are
    #: left out, so the digest reveals nothing about a secret.
    digest: str = ""

    def summary(self) -> str:
        """A short multi-line description for ``check-config`` and the reload log."""
        relay = self.relay
        lines = [
            f"configuration {self.source} is valid",
            f"  listen.policy: {self.listen.policy}",
            f"  listen.socketmap: {self.listen.socketmap or '-'}",
            f"  listen.metrics: {self.listen.metrics or '-'}",
            f"  listen.control: {self.listen.control or '-'}",
            f"  mode: {self.mode}",
            f"  local_domains: {len(self.local_domains)} entries",
            f"  relay.allow.authenticated: {'true' if relay.allow_authenticated else 'false'}",
            f"  relay.allow.client_networks: {len(relay.allow_client_networks)} networks",
            f"  relay.allow.server_addresses: {len(relay.allow_server_addresses)} entries",
            f"  relay.never.client_networks: {len(relay.never_client_networks)} networks",
            f"  relay.never.sasl_usernames: {len(relay.never_sasl_usernames)} names",
            f"  outbound: default auth {self.outbound.default.auth}, "
            f"{len(self.outbound.domains)} domain overrides",
        ]
        for domain, profile in self.outbound.domains:
            lines.append(f"    {domain}: {profile.describe()}")
        table = self.transport_table
        if table is None:
            lines.append("  outbound.transport_table: - (transport served by the socketmap only)")
        else:
            entries = len(self.outbound_tables.transport_table_entries())
            lines.append(
                f"  outbound.transport_table: {table.table} ({entries} entries; built file "
                f"{table.built_path.name}, postmap {table.postmap_command()} -c "
                f"{table.postfix_config_dir})"
            )
        limits = self.rate_limits
        if limits.limits:
            backend = limits.backend
            where = "memory" if isinstance(backend, str) else f"redis {backend.address}"
            lines.append(
                f"  rate_limits: {len(limits.limits)} limits, backend {where}, "
                f"on_backend_error {limits.on_backend_error}"
            )
            for limit in limits.limits:
                lines.append(f"    {limit.name}: {limit.describe()}")
        if self.file_lists:
            lines.append(f"  file lists: {', '.join(self.file_lists)}")
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Loading


def untrusted_reason(path: Path, trusted_uids: frozenset[int]) -> str | None:
    """Why the file at ``path`` may not decide who relays, or None.

    A file others can change is a way to turn the server into an open relay: it must be owned
    by one of ``trusted_uids`` (root and the user policyd runs as), not writable by group or
    others, and in a directory that is neither (unless the directory is sticky, like /tmp,
    where others cannot replace a file they do not own).
    """
    try:
        info = path.stat()
        directory = path.parent.stat()
    except OSError as err:
        return f"cannot check {path}: {err.strerror or err}"
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in trusted_uids:
        return (
            f"{path} is owned by uid {info.st_uid}, not by root or the user policyd runs as "
            f"(uid {', '.join(map(str, sorted(trusted_uids)))}); chown it"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by others than its owner (mode {mode:04o}); chmod go-w it"
    sticky = directory.st_mode & stat.S_ISVTX
    if not sticky and directory.st_uid not in trusted_uids:
        return (
            f"{path.parent}, the directory of {path.name}, is owned by uid {directory.st_uid},"
            " not by root or the user policyd runs as; others could replace the file"
        )
    if not sticky and directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{path.parent}, the directory of {path.name}, is writable by others than its "
            f"owner (mode {stat.S_IMODE(directory.st_mode):04o}); others could replace the file"
        )
    return None


def load_config(path: str | Path, trusted_uids: frozenset[int] | None = None) -> Config:
    """Read, validate and compile the configuration file at ``path``.

    With ``trusted_uids`` (``serve`` and its reloads pass root and the user it runs as), the
    configuration, every ``file:`` list and every password file must pass
    ``untrusted_reason``. Raises ``ConfigError`` for anything wrong, naming the key path and
    line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError("", f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not valid UTF-8") from None
    if trusted_uids is not None:
        reason = untrusted_reason(path, trusted_uids)
        if reason is not None:
            raise ConfigError("", f"refusing an unsafe file: {reason}")
    return parse_config(text, source=str(path), base_dir=path.parent, trusted_uids=trusted_uids)


def parse_config(
    text: str,
    source: str = "<config>",
    base_dir: Path | None = None,
    trusted_uids: frozenset[int] | None = None,
) -> Config:
    """Validate and compile configuration ``text``; ``file:`` paths resolve against base_dir;
    with ``trusted_uids`` the files it names are checked (see load_config)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{Path(source).name}:{mark.line + 1}" if mark else source
        raise ConfigError("", f"YAML syntax error: {err.problem or err}", where) from None
    except yaml.YAMLError as err:
        raise ConfigError("", f"YAML error: {err}", source) from None
    builder = _Builder(source, base_dir or Path.cwd(), trusted_uids)
    builder.digest.update(text.encode("utf-8"))
    return builder.build(root)


# --------------------------------------------------------------------------------------------
# Validation


_ENDPOINT_INET = re.compile(
    r"^inet:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)$"
)

# Actions Postfix accepts, by what they do. The word is case-insensitive (access(5)).
_REJECT_CODE = re.compile(
    r"^(?P<code>[45]\d\d)(?: (?P<dsn>[45]\.\d{1,3}\.\d{1,3}))? (?P<text>\S.*)$"
)


class _Builder:
    """Walks the composed YAML node tree, remembering each node's line for error messages."""

    def __init__(
        self, source: str, base_dir: Path, trusted_uids: frozenset[int] | None = None
    ) -> None:
        self.source = source
        self.name = Path(source).name
        self.base_dir = base_dir
        self.trusted_uids = trusted_uids
        self.file_lists: list[str] = []
        self.digest = hashlib.sha256()
        self.warnings: list[str] = []
        self.outbound_tables: OutboundTables | None = None
        self.transport_table: TransportTableSettings | None = None

    # -- helpers -------------------------------------------------------------------------

    def error(self, path: str, node: Node | None, message: str) -> ConfigError:
        where = f"{self.name}:{node.start_mark.line + 1}" if node is not None else self.name
        return ConfigError(path, message, where)

    def check_trusted(self, file_path: Path, path: str, node: Node) -> None:
        """With trusted_uids, refuse a file others could change (see untrusted_reason)."""
        if self.trusted_uids is None:
            return
        reason = untrusted_reason(file_path, self.trusted_uids)
        if reason is not None:
            raise self.error(path, node, f"refusing an unsafe file: {reason}")

    def mapping(
        self, node: Node, path: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[ScalarNode, Node]]:
        if not isinstance(node, MappingNode):
            raise self.error(path or "(top level)", node, "expected a mapping")
        result: dict[str, tuple[ScalarNode, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                raise self.error(path or "(top level)", key_node, "keys must be plain strings")
            key = key_node.value
            sub = f"{path}.{key}" if path else key
            if key in result:
                raise self.error(sub, key_node, "duplicate key")
            if key not in allowed:
                raise self.error(
                    sub, key_node, f"unknown key (expected one of: {', '.join(allowed)})"
                )
            result[key] = (key_node, value_node)
        return result

    def scalar(self, node: Node, path: str) -> object:
        if not isinstance(node, ScalarNode):
            raise self.error(path, node, "expected a single value, not a list or mapping")
        return yaml.SafeLoader("").construct_object(node)

    def string(self, node: Node, path: str, *, allow_empty: bool = False) -> str:
        value = self.scalar(node, path)
        if not isinstance(value, str):
            raise self.error(path, node, f"expected a string, got {_describe(value)}")
        if not allow_empty and not value.strip():
            raise self.error(path, node, "must not be empty")
        if any(c in value for c in "\n\r\0"):
            raise self.error(path, node, "must not contain newlines or NUL characters")
        return value

    def boolean(self, node: Node, path: str) -> bool:
        value = self.scalar(node, path)
        if not isinstance(value, bool):
            raise self.error(path, node, f"expected true or false, got {_describe(value)}")
        return value

    def number(self, node: Node, path: str, low: float, high: float) -> float:
        value = self.scalar(node, path)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(path, node, f"expected a number, got {_describe(value)}")
        if not low <= value <= high:
            raise self.error(path, node, f"must be between {low:g} and {high:g}, got {value:g}")
        return float(value)

    def sequence(self, node: Node, path: str) -> list[Node]:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, SequenceNode):
            raise self.error(path, node, "expected a list")
        return list(node.value)

    def entries(self, node: Node, path: str, parse: Callable[[str], T]) -> Iterator[T]:
        """Parse each entry of a list; ``file:PATH`` entries expand to the file's lines."""
        for index, item in enumerate(self.sequence(node, path)):
            item_path = f"{path}[{index}]"
            text = self.string(item, item_path).strip()
            if text.startswith("file:"):
                yield from self.file_entries(text[5:].strip(), item, item_path, parse)
                continue
            try:
                yield parse(text)
            except (EntryError, DomainError) as err:
                raise self.error(item_path, item, str(err)) from None

    def file_entries(
        self, name: str, node: Node, path: str, parse: Callable[[str], T]
    ) -> Iterator[T]:
        if not name:
            raise self.error(path, node, "'file:' needs a path")
        file_path = Path(name)
        if not file_path.is_absolute():
            file_path = self.base_dir / file_path
        try:
            content = file_path.read_text(encoding="utf-8")
        except OSError as err:
            raise self.error(
                path, node, f"cannot read {file_path}: {err.strerror or err}"
            ) from None
        except UnicodeDecodeError:
            raise self.error(path, node, f"{file_path} is not valid UTF-8") from None
        self.check_trusted(file_path, path, node)
        self.file_lists.append(str(file_path))
        self.digest.update(b"\0file:" + str(file_path).encode() + b"\0" + content.encode("utf-8"))
        for number, raw in enumerate(content.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                yield parse(line)
            except (EntryError, DomainError) as err:
                raise ConfigError(path, str(err), f"{file_path}:{number}") from None

    # -- sections ------------------------------------------------------------------------

    def build(self, root: Node | None) -> Config:
        if root is None:
            raise ConfigError("", "the configuration is empty", self.name)
        top = self.mapping(
            root,
            "",
            (
                "listen",
                "mode",
                "local_domains",
                "relay",
                "replies",
                "limits",
                "outbound",
                "rate_limits",
            ),
        )
        if "listen" not in top:
            raise self.error("listen", root, "missing (listen.policy is required)")
        listen = self.listen(top["listen"][1])
        mode: Mode = "enforce"
        if "mode" in top:
            value = self.string(top["mode"][1], "mode")
            if value not in ("enforce", "warn"):
                raise self.error("mode", top["mode"][1], f"must be enforce or warn, got {value!r}")
            mode = "warn" if value == "warn" else "enforce"
        local_domains = DomainSet(())
        if "local_domains" in top:
            node = top["local_domains"][1]
            local_domains = DomainSet(self.entries(node, "local_domains", _domain_entry))
        relay = self.relay(top["relay"][1]) if "relay" in top else RelayRules()
        replies = self.replies(top["replies"][1]) if "replies" in top else Replies()
        limits = self.limits(top["limits"][1]) if "limits" in top else Limits()
        outbound = (
            self.outbound(top["outbound"][1], local_domains) if "outbound" in top else Outbound()
        )
        tables = self.outbound_tables or OutboundTables(outbound, local_domains)
        rate_limits = (
            self.rate_limits(top["rate_limits"][1], relay) if "rate_limits" in top else RateLimits()
        )
        return Config(
            source=self.source,
            listen=listen,
            mode=mode,
            local_domains=local_domains,
            relay=relay,
            replies=replies,
            limits=limits,
            outbound=outbound,
            outbound_tables=tables,
            transport_table=self.transport_table,
            rate_limits=rate_limits,
            file_lists=tuple(self.file_lists),
            warnings=tuple(self.warnings),
            digest=self.digest.hexdigest(),
        )

    def endpoint(self, node: Node, path: str) -> Endpoint:
        text = self.string(node, path).strip()
        if text.startswith("unix:"):
            socket_path = text[5:]
            if not socket_path.startswith("/"):
                raise self.error(path, node, f"{text!r}: a unix socket path must be absolute")
            return Endpoint("unix", path=socket_path)
        match = _ENDPOINT_INET.match(text)
        if match is None:
            raise self.error(
                path, node, f"{text!r} is not inet:HOST:PORT, inet:[IPv6]:PORT or unix:/path"
            )
        port = int(match["port"])
        if not 0 < port < 65536:
            raise self.error(path, node, f"{text!r}: port must be 1 to 65535")
        host = match["v6"] or match["host"]
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise self.error(path, node, f"{text!r}: {host!r} is not an IP address") from None
        if (address.version == 6) != (match["v6"] is not None):
            raise self.error(
                path, node, f"{text!r}: write IPv6 addresses in brackets, inet:[::1]:PORT"
            )
        host = address.compressed
        return Endpoint("inet", host=host, port=port)

    def listen(self, node: Node) -> Listen:
        section = self.mapping(
            node,
            "listen",
            ("policy", "socketmap", "metrics", "control", "socketmap_allow_remote"),
        )
        if "policy" not in section:
            raise self.error("listen.policy", node, "missing (the policy listener is required)")
        allow_remote = False
        if "socketmap_allow_remote" in section:
            allow_remote = self.boolean(
                section.pop("socketmap_allow_remote")[1], "listen.socketmap_allow_remote"
            )
        endpoints = {
            key: self.endpoint(value, f"listen.{key}") for key, (_, value) in section.items()
        }
        control = endpoints.get("control")
        if control is not None and control.kind != "unix":
            raise self.error(
                "listen.control",
                section["control"][1],
                f"{control} must be a unix:/path socket: its file permissions (0600, the "
                "policyd user and root) are what keeps other users from resetting limits",
            )
        socketmap = endpoints.get("socketmap")
        if (
            socketmap is not None
            and socketmap.kind == "inet"
            and not allow_remote
            and not ipaddress.ip_address(socketmap.host).is_loopback
        ):
            raise self.error(
                "listen.socketmap",
                section["socketmap"][1],
                f"{socketmap} is not a loopback address: the socketmap serves passwords "
                "without authentication (set listen.socketmap_allow_remote: true to "
                "allow it anyway)",
            )
        seen: dict[str, str] = {}
        for key, endpoint in endpoints.items():
            if str(endpoint) in seen:
                raise self.error(
                    f"listen.{key}",
                    section[key][1],
                    f"same address as listen.{seen[str(endpoint)]}",
                )
            seen[str(endpoint)] = key
        return Listen(
            policy=endpoints["policy"],
            socketmap=socketmap,
            metrics=endpoints.get("metrics"),
            socketmap_allow_remote=allow_remote,
            control=control,
        )

    def relay(self, node: Node) -> RelayRules:
        section = self.mapping(node, "relay", ("allow", "never"))
        allow_authenticated = False
        allow_networks: list[IPNetwork] = []
        server_addresses: list[tuple[IPNetwork, int | None]] = []
        never_networks: list[IPNetwork] = []
        never_users: set[str] = set()
        if "allow" in section:
            allow = self.mapping(
                section["allow"][1],
                "relay.allow",
                ("authenticated", "client_networks", "server_addresses"),
            )
            if "authenticated" in allow:
                allow_authenticated = self.boolean(
                    allow["authenticated"][1], "relay.allow.authenticated"
                )
            if "client_networks" in allow:
                allow_networks = list(
                    self.entries(
                        allow["client_networks"][1], "relay.allow.client_networks", parse_network
                    )
                )
            if "server_addresses" in allow:
                server_addresses = list(
                    self.entries(
                        allow["server_addresses"][1],
                        "relay.allow.server_addresses",
                        parse_server_address,
                    )
                )
        if "never" in section:
            never = self.mapping(
                section["never"][1], "relay.never", ("client_networks", "sasl_usernames")
            )
            if "client_networks" in never:
                never_networks = list(
                    self.entries(
                        never["client_networks"][1], "relay.never.client_networks", parse_network
                    )
                )
            if "sasl_usernames" in never:
                never_users = set(
                    self.entries(
                        never["sasl_usernames"][1], "relay.never.sasl_usernames", _sasl_username
                    )
                )
        return RelayRules(
            allow_authenticated=allow_authenticated,
            allow_client_networks=NetworkSet(allow_networks),
            allow_server_addresses=ServerAddressSet(server_addresses),
            never_client_networks=NetworkSet(never_networks),
            never_sasl_usernames=frozenset(never_users),
        )

    def replies(self, node: Node) -> Replies:
        section = self.mapping(node, "replies", ("denied", "allowed", "local", "error"))
        checks: dict[str, Callable[[str], str | None]] = {
            "denied": _check_denied,
            "allowed": _check_allowed,
            "local": _check_local,
            "error": _check_error,
        }
        values: dict[str, str] = {}
        for key, (_, value_node) in section.items():
            path = f"replies.{key}"
            value = self.string(value_node, path).strip()
            problem = checks[key](value)
            if problem:
                raise self.error(path, value_node, f"{value!r} {problem}")
            values[key] = value
        return Replies(**values)

    def limits(self, node: Node) -> Limits:
        bounds: dict[str, tuple[float, float, bool]] = {
            "max_line_bytes": (512, 1 << 20, True),
            "max_request_bytes": (1024, 16 << 20, True),
            "max_attributes": (10, 10000, True),
            "request_timeout_seconds": (1, 3600, False),
            "idle_timeout_seconds": (1, 86400, False),
            "max_connections": (1, 1_000_000, True),
            "listen_backlog": (1, 65535, True),
        }
        section = self.mapping(node, "limits", tuple(bounds))
        values: dict[str, float] = {}
        for key, (_, value_node) in section.items():
            low, high, integral = bounds[key]
            value = self.number(value_node, f"limits.{key}", low, high)
            if integral and value != int(value):
                raise self.error(f"limits.{key}", value_node, "must be a whole number")
            values[key] = value
        defaults = Limits()
        limits = Limits(
            max_line_bytes=int(values.get("max_line_bytes", defaults.max_line_bytes)),
            max_request_bytes=int(values.get("max_request_bytes", defaults.max_request_bytes)),
            max_attributes=int(values.get("max_attributes", defaults.max_attributes)),
            request_timeout_seconds=values.get(
                "request_timeout_seconds", defaults.request_timeout_seconds
            ),
            idle_timeout_seconds=values.get("idle_timeout_seconds", defaults.idle_timeout_seconds),
            max_connections=int(values.get("max_connections", defaults.max_connections)),
            listen_backlog=int(values.get("listen_backlog", defaults.listen_backlog)),
        )
        if limits.max_request_bytes < limits.max_line_bytes:
            raise self.error(
                "limits.max_request_bytes", node, "must not be smaller than limits.max_line_bytes"
            )
        return limits

    def rate_limits(self, node: Node, relay: RelayRules) -> RateLimits:
        path = "rate_limits"
        section = self.mapping(node, path, ("backend", "on_backend_error", "exempt", "limits"))
        backend: Literal["memory"] | RedisBackend = "memory"
        if "backend" in section:
            backend = self.rate_limit_backend(section["backend"][1])
        on_error: BackendErrorPolicy = "local"
        if "on_backend_error" in section:
            value_node = section["on_backend_error"][1]
            on_error = self.choice(value_node, f"{path}.on_backend_error", BACKEND_ERROR_POLICIES)
        exempt_networks: list[IPNetwork] = []
        exempt_users: set[str] = set()
        if "exempt" in section:
            exempt = self.mapping(
                section["exempt"][1], f"{path}.exempt", ("client_networks", "sasl_usernames")
            )
            if "client_networks" in exempt:
                exempt_networks = list(
                    self.entries(
                        exempt["client_networks"][1],
                        f"{path}.exempt.client_networks",
                        parse_network,
                    )
                )
            if "sasl_usernames" in exempt:
                exempt_users = set(
                    self.entries(
                        exempt["sasl_usernames"][1], f"{path}.exempt.sasl_usernames", str.lower
                    )
                )
        limits: list[Limit] = []
        if "limits" in section:
            for index, item in enumerate(self.sequence(section["limits"][1], f"{path}.limits")):
                limit = self.rate_limit(item, f"{path}.limits[{index}]")
                if any(other.name == limit.name for other in limits):
                    raise self.error(
                        f"{path}.limits[{index}].name", item, f"duplicate name {limit.name!r}"
                    )
                limits.append(limit)
        return RateLimits(
            backend=backend,
            on_backend_error=on_error,
            exempt_client_networks=NetworkSet(exempt_networks),
            exempt_sasl_usernames=frozenset(exempt_users),
            limits=tuple(limits),
        )

    def choice(self, node: Node, path: str, allowed: tuple[T, ...]) -> T:
        value = self.string(node, path)
        for option in allowed:
            if value == option:
                return option
        raise self.error(
            path, node, f"must be one of {', '.join(map(str, allowed))}, got {value!r}"
        )

    def rate_limit_backend(self, node: Node) -> Literal["memory"] | RedisBackend:
        path = "rate_limits.backend"
        if isinstance(node, ScalarNode):
            value = self.string(node, path)
            if value != "memory":
                raise self.error(path, node, f"must be memory or {{redis: ADDRESS}}, got {value!r}")
            return "memory"
        section = self.mapping(
            node, path, ("redis", "username", "password_file", "password_env", "timeout")
        )
        if "redis" not in section:
            raise self.error(f"{path}.redis", node, "missing (unix:/path or inet:HOST:PORT)")
        address_node = section["redis"][1]
        address = self.string(address_node, f"{path}.redis").strip()
        if address.startswith("unix:"):
            if not address[5:].startswith("/"):
                raise self.error(f"{path}.redis", address_node, "needs an absolute path")
        elif address.startswith("inet:"):
            host, colon, port = address[5:].rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise self.error(f"{path}.redis", address_node, "must be inet:HOST:PORT")
        else:
            raise self.error(f"{path}.redis", address_node, "must be unix:/path or inet:HOST:PORT")
        values = {
            key: self.string(value_node, f"{path}.{key}")
            for key, (_, value_node) in section.items()
            if key in ("username", "password_file", "password_env")
        }
        password = None
        if "password_file" in values or "password_env" in values:
            password = self.password(section, values, node, path)
        timeout = 0.05
        if "timeout" in section:
            timeout = self.number(section["timeout"][1], f"{path}.timeout", 0.001, 1.0)
        return RedisBackend(address, values.get("username", ""), password, timeout)

    def rate_limit(self, node: Node, path: str) -> Limit:
        section = self.mapping(
            node,
            path,
            ("name", "applies_to", "key", "count", "rate", "burst", "action", "reply"),
        )
        for required in ("name", "applies_to", "key", "rate"):
            if required not in section:
                raise self.error(f"{path}.{required}", node, "missing")
        name_node = section["name"][1]
        name = self.string(name_node, f"{path}.name")
        if _LIMIT_NAME.fullmatch(name) is None:
            raise self.error(
                f"{path}.name", name_node, "must be 1-64 of a-z, 0-9, '-' and '_' (a metric label)"
            )
        applies_node = section["applies_to"][1]
        applies = [
            self.choice(item, f"{path}.applies_to", ALLOW_RULES)
            for item in self.sequence(applies_node, f"{path}.applies_to")
        ]
        if not applies:
            raise self.error(f"{path}.applies_to", applies_node, "must name at least one rule")
        key_node = section["key"][1]
        key = self.choice(key_node, f"{path}.key", LIMIT_KEYS)
        if key == "sasl_username" and set(applies) != {"relay.allow.authenticated"}:
            raise self.error(
                f"{path}.key",
                key_node,
                "sasl_username only exists for relay.allow.authenticated: apply this limit to "
                "that rule only, or key it by client_address or client_network",
            )
        count: CountKind = "recipients"
        if "count" in section:
            count = self.choice(section["count"][1], f"{path}.count", COUNT_KINDS)
        burst = 1
        if "burst" in section:
            burst_node = section["burst"][1]
            value = self.number(burst_node, f"{path}.burst", 1, 1_000_000)
            if value != int(value):
                raise self.error(f"{path}.burst", burst_node, "must be a whole number")
            burst = int(value)
        rate_node = section["rate"][1]
        try:
            rate = parse_rate(self.string(rate_node, f"{path}.rate"), burst)
        except RateError as err:
            raise self.error(f"{path}.rate", rate_node, str(err)) from None
        action: LimitAction = "defer"
        if "action" in section:
            action = self.choice(section["action"][1], f"{path}.action", LIMIT_ACTIONS)
        reply = DEFAULT_REPLIES[action]
        if "reply" in section:
            reply_node = section["reply"][1]
            reply = self.string(reply_node, f"{path}.reply").strip()
            problem = _check_limit_reply(action, reply)
            if problem:
                raise self.error(f"{path}.reply", reply_node, f"{reply!r} {problem}")
        return Limit(name, frozenset(applies), key, count, rate, action, reply)

    def outbound(self, node: Node, local_domains: DomainSet) -> Outbound:
        section = self.mapping(node, "outbound", ("default", "domains", "transport_table"))
        if "transport_table" in section:
            self.transport_table = self.transport_table_section(section["transport_table"][1])
        default = OutboundProfile()
        if "default" in section:
            default = self.profile(section["default"][1], "outbound.default")
            if default.auth != "none" and not default.nexthop:
                raise self.error(
                    "outbound.default.nexthop",
                    section["default"][1],
                    f"missing: a default with auth {default.auth} needs a smart host to log in "
                    "to (e.g. '[smtp.isp.example]:587')",
                )
        domains: list[tuple[str, OutboundProfile]] = []
        key_nodes: dict[str, Node] = {}
        if "domains" in section:
            domains_node = section["domains"][1]
            if not isinstance(domains_node, MappingNode):
                raise self.error("outbound.domains", domains_node, "expected a mapping")
            seen: dict[str, str] = {}
            for key_node, value_node in domains_node.value:
                raw = self.string(key_node, "outbound.domains")
                path = f"outbound.domains.{raw}"
                try:
                    domain = normalize_domain(raw)
                except DomainError as err:
                    raise self.error(path, key_node, str(err)) from None
                if domain.startswith("[") or raw.startswith("."):
                    raise self.error(path, key_node, "must be a domain name")
                if domain in seen:
                    raise self.error(
                        path, key_node, f"same domain as outbound.domains.{seen[domain]}"
                    )
                if domain in local_domains:
                    raise self.error(
                        path, key_node, "is a local domain: outbound profiles are for remote ones"
                    )
                seen[domain] = raw
                key_nodes[path] = key_node
                domains.append((domain, self.profile(value_node, path)))
        outbound = Outbound(default=default, domains=tuple(domains))
        try:
            self.outbound_tables = OutboundTables(outbound, local_domains)
        except CredentialConflict as err:
            raise self.error(err.second, key_nodes.get(err.second, node), str(err)) from None
        return outbound

    def transport_table_section(self, node: Node) -> TransportTableSettings:
        """``outbound.transport_table``: where and how policyd writes the static table."""
        path = "outbound.transport_table"
        section = self.mapping(node, path, ("path", "type", "postmap", "postfix_config_dir"))
        if "path" not in section:
            raise self.error(f"{path}.path", node, "missing (e.g. /var/lib/policyd/transport)")
        values: dict[str, str] = {}
        for key, (_, value_node) in section.items():
            value = self.string(value_node, f"{path}.{key}").strip()
            if any(c.isspace() for c in value) or "," in value:
                raise self.error(
                    f"{path}.{key}", value_node, f"{value!r} must not contain white space or ','"
                )
            values[key] = value
        table_path = self.resolve(values["path"])
        if values["path"].endswith("/") or table_path.name in ("", ".", ".."):
            raise self.error(
                f"{path}.path", section["path"][1], "must name a file, not a directory"
            )
        table_type: TableType = "hash"
        if "type" in values:
            wanted = values["type"]
            for known in TABLE_TYPES:
                if wanted == known:
                    table_type = known
                    break
            else:
                raise self.error(
                    f"{path}.type",
                    section["type"][1],
                    f"{wanted!r} is not one of {', '.join(TABLE_TYPES)}",
                )
        postmap = values.get("postmap", "")
        if "/" in postmap:
            postmap = str(self.resolve(postmap))
        config_dir = values.get("postfix_config_dir")
        return TransportTableSettings(
            path=table_path,
            type=table_type,
            postmap=postmap,
            postfix_config_dir=(
                str(self.resolve(config_dir)) if config_dir else DEFAULT_POSTFIX_CONFIG_DIR
            ),
        )

    def resolve(self, name: str) -> Path:
        """An absolute path: relative names are relative to the configuration's directory."""
        path = Path(name)
        if not path.is_absolute():
            path = self.base_dir / path
        return path.absolute()

    def profile(self, node: Node, path: str) -> OutboundProfile:
        section = self.mapping(
            node,
            path,
            (
                "auth",
                "username",
                "password_file",
                "password_env",
                "nexthop",
                "tls",
                "allow_plaintext",
            ),
        )
        if "auth" not in section:
            raise self.error(f"{path}.auth", node, "missing (none, cleartext or ntlm)")
        auth_node = section["auth"][1]
        auth = self.string(auth_node, f"{path}.auth")
        if auth not in AUTH_KINDS:
            raise self.error(f"{path}.auth", auth_node, f"{auth!r} is not none, cleartext or ntlm")
        kind: AuthKind = (
            "none" if auth == "none" else "cleartext" if auth == "cleartext" else "ntlm"
        )
        values: dict[str, str] = {
            key: self.string(section[key][1], f"{path}.{key}")
            for key in ("username", "password_file", "password_env", "nexthop", "tls")
            if key in section
        }
        nexthop = values.get("nexthop", "")
        if nexthop:
            problem = _check_nexthop(nexthop)
            if problem:
                raise self.error(f"{path}.nexthop", section["nexthop"][1], f"{nexthop!r} {problem}")
        if kind == "none":
            for key in ("username", "password_file", "password_env", "tls", "allow_plaintext"):
                if key in section:
                    raise self.error(f"{path}.{key}", section[key][1], "not used with auth: none")
            return OutboundProfile(path=path, nexthop=nexthop)
        if "username" not in values:
            raise self.error(f"{path}.username", node, f"missing (required for auth: {kind})")
        username = values["username"]
        if ":" in username or any(c.isspace() for c in username):
            raise self.error(
                f"{path}.username", section["username"][1], "must not contain ':' or white space"
            )
        tls: TlsLevel = "may"
        allow_plaintext = False
        if kind == "cleartext":
            tls_text = values.get("tls", "encrypt")
            if tls_text not in ("encrypt", "may"):
                raise self.error(
                    f"{path}.tls", section["tls"][1], f"{tls_text!r} is not encrypt or may"
                )
            tls = "encrypt" if tls_text == "encrypt" else "may"
            if "allow_plaintext" in section:
                allow_plaintext = self.boolean(
                    section["allow_plaintext"][1], f"{path}.allow_plaintext"
                )
            if tls != "encrypt" and not allow_plaintext:
                raise self.error(
                    f"{path}.tls",
                    section["tls"][1],
                    "cleartext authentication without TLS sends the password readably: use "
                    "tls: encrypt, or say allow_plaintext: true",
                )
        else:
            for key in ("tls", "allow_plaintext"):
                if key in section:
                    raise self.error(f"{path}.{key}", section[key][1], "only for auth: cleartext")
        password = self.password(section, values, node, path)
        return OutboundProfile(
            path=path,
            auth=kind,
            username=username,
            password=password,
            nexthop=nexthop,
            tls=tls,
            allow_plaintext=allow_plaintext,
        )

    def password(
        self,
        section: dict[str, tuple[ScalarNode, Node]],
        values: dict[str, str],
        node: Node,
        path: str,
    ) -> Secret:
        """Read the profile's password; errors and warnings never contain it."""
        if ("password_file" in values) == ("password_env" in values):
            raise self.error(
                f"{path}.password_file", node, "give exactly one of password_file, password_env"
            )
        if "password_env" in values:
            name = values["password_env"]
            value = os.environ.get(name, "")
            if not value:
                raise self.error(
                    f"{path}.password_env",
                    section["password_env"][1],
                    f"environment variable {name!r} is not set or empty",
                )
            where = f"environment variable {name!r}"
        else:
            file_node = section["password_file"][1]
            file_path = Path(values["password_file"])
            if not file_path.is_absolute():
                file_path = self.base_dir / file_path
            try:
                value = file_path.read_text(encoding="utf-8")
                mode = file_path.stat().st_mode
            except OSError as err:
                raise self.error(
                    f"{path}.password_file",
                    file_node,
                    f"cannot read {file_path}: {err.strerror or type(err).__name__}",
                ) from None
            except UnicodeDecodeError:
                raise self.error(
                    f"{path}.password_file", file_node, f"{file_path} is not valid UTF-8"
                ) from None
            self.check_trusted(file_path, f"{path}.password_file", file_node)
            if value.endswith("\n"):
                value = value[:-1]
                if value.endswith("\r"):
                    value = value[:-1]
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                self.warnings.append(
                    f"{path}.password_file: {file_path} is readable by others than its owner "
                    f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it"
                )
            where = str(file_path)
        if not value:
            raise self.error(f"{path}.password_file", node, f"the password in {where} is empty")
        if any(c in value for c in "\n\r\0"):
            raise self.error(
                f"{path}.password_file", node, f"the password in {where} spans several lines"
            )
        return Secret(value)


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return type(value).__name__


def _domain_entry(text: str) -> str:
    """Validate a domain list entry; ``DomainSet`` does the normalising."""
    DomainSet((text,))
    return text


_NEXTHOP = re.compile(r"^(?:\[(?P<literal>[^\[\]]+)\]|(?P<host>[^\[\]:]+))(?::(?P<port>\d+))?$")


def _check_nexthop(text: str) -> str | None:
    """None if ``text`` is a next hop as Postfix writes it: host, [host], either with :port."""
    match = _NEXTHOP.match(text)
    if match is None:
        return "is not a next hop (host, [host], host:port or [host]:port)"
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        return "has a port out of range (1-65535)"
    host = match["literal"] or match["host"]
    if match["literal"] is not None and host.lower().startswith("ipv6:"):
        host = host[5:]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            normalize_domain(host)
        except DomainError:
            return "does not name a host"
    return None


def _sasl_username(text: str) -> str:
    """SASL names in the never-list match case-insensitively: the stricter choice."""
    return text.casefold()


_LIMIT_NAME = re.compile(r"[a-z0-9_-]{1,64}")


#: A Postfix restriction class name (a main.cf parameter name of one's own).
_RESTRICTION_CLASS = re.compile(r"[a-z][a-z0-9_]*")


def _check_limit_reply(action: str, reply: str) -> str | None:
    """A limit's reply must do what its action says: defer 4xx, reject 5xx, hold a restriction
    class name."""
    match = _REJECT_CODE.match(reply)
    if action == "hold":
        if _RESTRICTION_CLASS.fullmatch(reply):
            return None
        return (
            "must name a smtpd_restriction_classes class of main.cf that holds and permits "
            "(default policyd_hold): Postfix's HOLD does not end the restriction list, so a "
            "bare HOLD would be followed by reject_unauth_destination, refusing the relay"
        )
    wanted = "4" if action == "defer" else "5"
    if match is None or not match["code"].startswith(wanted):
        return f"must be '{wanted}NN X.Y.Z text' for action {action}"
    if match["dsn"] and match["dsn"][0] != wanted:
        return "has a DSN class that does not match its reply code"
    return None


# Reply checks: each returns None when the action is acceptable for that verdict, else a reason.


def _check_denied(action: str) -> str | None:
    match = _REJECT_CODE.match(action)
    if match:
        if match["dsn"] and match["dsn"][0] != match["code"][0]:
            return "has a DSN class that does not match its reply code"
        return None
    word = action.split(" ", 1)[0].upper()
    if word in ("REJECT", "DEFER", "DEFER_IF_PERMIT"):
        return None
    return "is not a rejection (use '5NN X.Y.Z text', '4NN X.Y.Z text', REJECT or DEFER)"


def _check_error(action: str) -> str | None:
    match = _REJECT_CODE.match(action)
    if match and match["code"].startswith("4"):
        if match["dsn"] and not match["dsn"].startswith("4"):
            return "has a DSN class that does not match its reply code"
        return None
    if action.split(" ", 1)[0].upper() == "DEFER":
        return None
    return "is not a temporary failure (use '4NN X.Y.Z text' or DEFER)"


def _check_allowed(action: str) -> str | None:
    if action.split(" ", 1)[0].upper() in ("OK", "RELAY", "PERMIT"):
        return None
    return "is not a permit (use OK)"


def _check_local(action: str) -> str | None:
    if action.split(" ", 1)[0].upper() in ("DUNNO", "OK"):
        return None
    return "must be DUNNO (recommended) or OK"
