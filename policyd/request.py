"""The policy request as policyd sees it: frozen, parsed once, free of bytes.

Postfix sends ``name=value`` attributes (see SMTPD_POLICY_README); this module keeps the ones a
relay decision needs, under Postfix's own names, with the addresses already parsed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

from policyd.networks import IPAddress, parse_client_address

#: The states in which Postfix asks about a recipient; every other state is not a relay decision.
RELAY_STATES = frozenset({"RCPT", "VRFY"})


class PolicyRequest(NamedTuple):
    """One ``smtpd_access_policy`` request: immutable, built once per request.

    ``client_ip``/``server_ip`` are ``None`` when the attribute is absent or does not parse;
    ``server_port`` is ``None`` when absent or not a port number. Text attributes are ``""`` when
    absent, as Postfix sends them for empty values. (A named tuple rather than a frozen
    dataclass: it is built for every request, and a tuple is built several times faster.)
    """

    protocol_state: str = ""
    client_address: str = ""
    client_ip: IPAddress | None = None
    server_address: str = ""
    server_ip: IPAddress | None = None
    server_port: int | None = None
    sasl_username: str = ""
    sender: str = ""
    recipient: str = ""
    queue_id: str = ""
    instance: str = ""

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, str]) -> PolicyRequest:
        """Build a request from decoded attributes; unknown attributes are ignored."""
        get = attributes.get
        client_address = get("client_address", "")
        server_address = get("server_address", "")
        # tuple.__new__ directly: the named tuple's own __new__ is one more Python call.
        return _new_tuple(
            cls,
            (
                get("protocol_state", "").upper(),
                client_address,
                parse_client_address(client_address),
                server_address,
                parse_client_address(server_address),
                _parse_port(get("server_port", "")),
                get("sasl_username", ""),
                get("sender", ""),
                get("recipient", ""),
                get("queue_id", ""),
                get("instance", ""),
            ),
        )


_new_tuple = tuple.__new__


@functools.lru_cache(maxsize=1024)
def _parse_port(text: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    port = int(text)
    return port if 0 < port < 65536 else None
