"""Smoke test of the benchmark's servers and load client: correctness only, nothing timed.

``make bench`` compares policyd with ``bench/responder.py`` and Debian's postfwd2 on the same
rules; its figures mean something only if every server gives the answers policyd's own
``decide()`` gives. Here each of the three answers a few hundred benchmark requests over real
loopback connections, and every reply must be the expected one. postfwd2 is installed by the
test command (``scripts/install-system-deps.sh``): a missing postfwd2 is a failure, not a skip.
The bounds on requests and seconds only keep a broken server from hanging the suite.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import responder  # noqa: E402
import workload  # noqa: E402
from load import run_load  # noqa: E402
from run import build_request_pool  # noqa: E402
from server import (  # noqa: E402
    PolicydServer,
    PostfwdServer,
    ResponderServer,
    ServerProcess,
    free_port,
    postfwd_command,
)

from policyd.config import load_config  # noqa: E402

REQUESTS = 300
CONNECTIONS = 5


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: postfwd2 runs as nobody when started as root and must read here.
    path = Path(tempfile.mkdtemp(prefix="policyd-bench-smoke-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def small(workdir: Path) -> tuple[int, Path, list[tuple[bytes, bytes]]]:
    """The small benchmark configuration and its request pool with the expected replies."""
    lists = workload.small_lists()
    port = free_port()
    path = workload.write_config(workdir, "small", lists, port)
    pool, _ = build_request_pool(load_config(path), lists)
    return port, path, pool


def _server(
    kind: str, workdir: Path, small: tuple[int, Path, list[tuple[bytes, bytes]]]
) -> ServerProcess:
    port, path, _ = small
    if kind == "policyd":
        return PolicydServer(path, port, workdir / "policyd.log")
    if kind == "responder":
        return ResponderServer(free_port(), workdir / "responder.log")
    if postfwd_command() is None:
        pytest.fail(
            "postfwd2 not found: install Debian's postfwd package "
            "(`make test` or `bash scripts/install-system-deps.sh` does)",
            pytrace=False,
        )
    return PostfwdServer(workdir / "postfwd2", free_port(), children=CONNECTIONS + 2)


@pytest.mark.parametrize("kind", ["policyd", "responder", "postfwd2"])
def test_every_answer_is_the_expected_one(
    kind: str, workdir: Path, small: tuple[int, Path, list[tuple[bytes, bytes]]]
) -> None:
    """policyd, the responder and postfwd2 give, for each of a few hundred benchmark requests
    over persistent connections, exactly the reply policyd's ``decide()`` computes."""
    pool = small[2][:REQUESTS]  # each connection sends its own slice: every request once
    server = _server(kind, workdir, small)
    try:
        server.start(timeout=30)
        result = run_load(server.port, pool, CONNECTIONS, REQUESTS, max_seconds=30)
    finally:
        server.stop()
    assert result.errors == []
    assert result.mismatch_examples == []
    assert result.mismatches == 0
    assert result.requests == REQUESTS
    # The pool exercises every kind of answer, so a server that says DUNNO to all would fail.
    answers = {expected for _, expected in pool}
    assert answers == {responder.DUNNO, responder.ALLOWED, responder.DENIED}


def test_responder_frames_partial_and_pipelined_requests(
    workdir: Path, small: tuple[int, Path, list[tuple[bytes, bytes]]]
) -> None:
    """The responder answers requests that arrive one byte at a time and several in one
    write, one reply per request, in order."""
    pool = small[2][:6]
    server = ResponderServer(free_port(), workdir / "responder-framing.log")
    try:
        server.start(timeout=30)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"".join(request for request, _ in pool[:3]))  # pipelined
            for byte in pool[3][0]:  # one byte per write
                sock.sendall(bytes([byte]))
            sock.sendall(pool[4][0] + pool[5][0][:7])  # a request and the start of the next
            sock.sendall(pool[5][0][7:])
            expected = b"".join(reply for _, reply in pool)
            received = b""
            while len(received) < len(expected):
                data = sock.recv(65536)
                if not data:
                    break
                received += data
    finally:
        server.stop()
    assert received == expected


def test_responder_framing_without_sockets() -> None:
    """``frame()`` splits complete requests off a buffer, keeps the unfinished rest, and
    rejects an empty request or a line without ``=``."""
    request = b"request=smtpd_access_policy\nprotocol_state=CONNECT\n\n"
    replies, rest = responder.frame(request + request + request[:10])
    assert replies == [responder.DUNNO, responder.DUNNO]
    assert rest == request[:10]
    replies, rest = responder.frame(rest + request[10:])
    assert (replies, rest) == ([responder.DUNNO], b"")
    for bad in (b"\n", b"request=smtpd_access_policy\nnot an attribute\n\n"):
        with pytest.raises(ValueError):
            responder.frame(bad)
