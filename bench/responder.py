"""The floor: a minimal policy service in plain Python, for the benchmark to compare against.

``python bench/responder.py --listen 127.0.0.1:PORT`` answers Postfix policy requests with the
decisions of the benchmark's *small* configuration (``workload.small_lists()``), hard-coded
below as sets and dicts. It is the cheapest honest policy service one can write in Python: one
thread, one ``epoll`` loop over non-blocking sockets, each request framed on the empty line
(across partial reads, and several pipelined requests in one read), decided with a few set
lookups, and the replies to everything a read completed sent with one ``send``. No logging, no
metrics, no reload, no configuration file: everything policyd does beyond deciding is what the
comparison measures.

The decisions follow PRODUCT.md section 1 in policyd's order for plain addresses
(``user@domain``); any routing character in the recipient (``%``, ``!``, a second ``@``, a
source route, a quoted local part, a domain literal) makes it a relay attempt here, which is
never looser than policyd. The benchmark checks every reply against policyd's own ``decide()``.

Standard library only; it stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import resource
import select
import signal
import socket
import sys

# ---- the small configuration, hard-coded (keep in step with workload.small_lists()) ---------

EXACT_DOMAINS = frozenset({b"local.example", b"corp.example", b"shop.example"})
PARENT_DOMAINS = frozenset({b"local.example", b"corp.example"})  # ".local.example": subdomains
NEVER_SASL_USERNAMES = frozenset({"compromised@local.example"})  # compared casefolded

DUNNO = b"action=DUNNO\n\n"
ALLOWED = b"action=OK\n\n"
DENIED = b"action=550 5.7.1 Relaying Denied\n\n"


def _networks(*entries: str) -> dict[int, tuple[tuple[int, frozenset[int]], ...]]:
    """{address bits: ((prefix length, network numbers shifted right), ...)} for set lookups."""
    by_version: dict[int, dict[int, set[int]]] = {32: {}, 128: {}}
    for entry in entries:
        text, _, length = entry.partition("/")
        family = socket.AF_INET6 if ":" in text else socket.AF_INET
        bits = 128 if family == socket.AF_INET6 else 32
        prefix = int(length) if length else bits
        value = int.from_bytes(socket.inet_pton(family, text), "big")
        by_version[bits].setdefault(prefix, set()).add(value >> (bits - prefix))
    return {
        bits: tuple((prefix, frozenset(values)) for prefix, values in sorted(tables.items()))
        for bits, tables in by_version.items()
    }


ALLOW_NETWORKS = _networks(
    "127.0.0.0/8",
    "192.0.2.0/24",
    "172.16.0.0/12",
    "100.64.0.0/16",
    "203.0.113.7",
    "2001:db9:1::/48",
)
NEVER_NETWORKS = _networks("172.16.9.9", "198.19.200.0/24")
# relay.allow.server_addresses: 10.0.0.25 (any port), [2001:db8:25::25]:587.
SERVER_ADDRESSES = {
    (32, int.from_bytes(socket.inet_pton(socket.AF_INET, "10.0.0.25"), "big")): None,
    (128, int.from_bytes(socket.inet_pton(socket.AF_INET6, "2001:db8:25::25"), "big")): 587,
}

# ---- deciding --------------------------------------------------------------------------------


def parse_address(text: bytes) -> tuple[int, int] | None:
    """(bits, integer value) of an IPv4 or IPv6 address; None if it does not parse."""
    try:
        if b":" in text:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text.decode()), "big")
            if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d matches IPv4 entries
                return 32, value & 0xFFFFFFFF
            return 128, value
        return 32, int.from_bytes(socket.inet_pton(socket.AF_INET, text.decode()), "big")
    except (OSError, UnicodeDecodeError, ValueError):
        return None


Networks = dict[int, tuple[tuple[int, frozenset[int]], ...]]


def in_networks(address: tuple[int, int] | None, networks: Networks) -> bool:
    if address is None:
        return False
    bits, value = address
    return any((value >> (bits - prefix)) in table for prefix, table in networks[bits])


_ROUTING = (b"%", b"!", b"@", b'"', b":")


def is_local(recipient: bytes) -> bool:
    """True for a plain recipient whose domain is local; routing characters mean "relay"."""
    local_part, at, domain = recipient.rpartition(b"@")
    if not at:  # a bare local part (postmaster): local mail unless it routes somewhere
        return bool(recipient) and not any(c in recipient for c in _ROUTING)
    if any(c in local_part for c in _ROUTING) or domain.startswith(b"["):
        return False
    domain = domain.lower()
    if domain.endswith(b"."):
        domain = domain[:-1]
    if domain in EXACT_DOMAINS:
        return True
    dot = domain.find(b".")
    while dot >= 0:
        if domain[dot + 1 :] in PARENT_DOMAINS:
            return True
        dot = domain.find(b".", dot + 1)
    return False


def decide(attributes: dict[bytes, bytes]) -> bytes:
    """The reply for one request (its attributes as raw bytes)."""
    get = attributes.get
    if get(b"protocol_state", b"").upper() not in (b"RCPT", b"VRFY"):
        return DUNNO
    if is_local(get(b"recipient", b"")):
        return DUNNO
    client = parse_address(get(b"client_address", b""))
    if in_networks(client, NEVER_NETWORKS):
        return DENIED
    login = get(b"sasl_username", b"")
    if login:
        if login.decode("utf-8", "replace").casefold() in NEVER_SASL_USERNAMES:
            return DENIED
        return ALLOWED
    if in_networks(client, ALLOW_NETWORKS):
        return ALLOWED
    server = parse_address(get(b"server_address", b""))
    if server is not None and server in SERVER_ADDRESSES:
        port = SERVER_ADDRESSES[server]
        if port is None or get(b"server_port", b"") == str(port).encode():
            return ALLOWED
    return DENIED


# ---- framing and the loop --------------------------------------------------------------------

MAX_REQUEST = 64 * 1024  # a request larger than this closes the connection


def parse_request(block: bytes) -> dict[bytes, bytes]:
    """``name=value`` lines (no empty line) -> attributes; the first value of a name wins."""
    attributes: dict[bytes, bytes] = {}
    for line in block.split(b"\n"):
        name, equals, value = line.partition(b"=")
        if not equals:
            raise ValueError("attribute line without '='")
        attributes.setdefault(name, value)
    return attributes


def frame(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split complete requests off ``buffer``: (replies for them, the unfinished rest).

    A request is a run of non-empty lines ended by an empty line. Raises ValueError for an
    empty request or a line without ``=``.
    """
    replies = []
    start = 0
    while True:
        if buffer.startswith(b"\n", start):
            raise ValueError("empty request")
        end = buffer.find(b"\n\n", start)
        if end < 0:
            return replies, buffer[start:]
        replies.append(decide(parse_request(buffer[start:end])))
        start = end + 2


class Connection:
    __slots__ = ("buffer", "outgoing", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.outgoing = b""


def serve(listener: socket.socket) -> None:
    """Run the loop until SIGTERM/SIGINT."""
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    connections: dict[int, Connection] = {}
    listen_fd = listener.fileno()
    readable = select.EPOLLIN
    writable = select.EPOLLOUT

    def close(fd: int) -> None:
        conn = connections.pop(fd)
        poller.unregister(fd)
        conn.sock.close()

    try:
        while True:
            for fd, events in poller.poll():
                if fd == listen_fd:
                    while True:
                        try:
                            sock, _ = listener.accept()
                        except BlockingIOError:
                            break
                        except OSError as err:  # EMFILE and friends: try again later
                            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
                                break
                            raise
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        connections[sock.fileno()] = Connection(sock)
                        poller.register(sock.fileno(), readable)
                    continue
                conn = connections[fd]
                if events & writable:
                    try:
                        sent = conn.sock.send(conn.outgoing)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        close(fd)
                        continue
                    conn.outgoing = conn.outgoing[sent:]
                    if not conn.outgoing:
                        poller.modify(fd, readable)
                    continue
                try:
                    data = conn.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    close(fd)
                    continue
                if not data:
                    close(fd)
                    continue
                buffer = conn.buffer + data if conn.buffer else data
                try:
                    replies, conn.buffer = frame(buffer)
                except ValueError:
                    close(fd)
                    continue
                if len(conn.buffer) > MAX_REQUEST:
                    close(fd)
                    continue
                if not replies:
                    continue
                out = replies[0] if len(replies) == 1 else b"".join(replies)
                if conn.outgoing:  # still blocked: queue behind what is waiting
                    conn.outgoing += out
                    continue
                try:
                    sent = conn.sock.send(out)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    close(fd)
                    continue
                if sent < len(out):
                    conn.outgoing = out[sent:]
                    poller.modify(fd, writable)
    finally:
        for conn in connections.values():
            conn.sock.close()
        poller.close()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="e.g. 127.0.0.1:10050")
    parser.add_argument("--backlog", type=int, default=1024, help="listen backlog")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(args.backlog)
    listener.setblocking(False)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        serve(listener)
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
