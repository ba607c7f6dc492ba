"""Just enough NTLM (MS-NLMP) to play the server side of an SMTP AUTH NTLM exchange in tests.

The e2e NTLM server (``smtp_servers.py``) uses this to send a CHALLENGE (type 2) message, to
parse the client's NEGOTIATE (type 1) and AUTHENTICATE (type 3) messages field by field, and to
check the client's response against the account's password:

* **NTLMv1**: the 24-byte NT response is DES(NT hash, server challenge) (MS-NLMP 3.3.1, without
  extended session security); the LM response, if it is the only one, is checked the same way
  with the LM hash;
* **NTLMv2**: the NTProofStr (HMAC-MD5 keyed with NTOWFv2) of an NT response longer than 24
  bytes, and the 24-byte LMv2 response (MS-NLMP 3.3.2).

Python's hashlib has no MD4 on this OpenSSL (it lives in the "legacy" provider) and the
standard library has no DES, so both are implemented here in plain Python, slowly and only for
tests; ``test_ntlm_crypto.py`` checks them against RFC 1320, FIPS 46 and MS-NLMP 4.2 vectors.
Nothing here is meant for production use.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field

SIGNATURE = b"NTLMSSP\x00"

NEGOTIATE_UNICODE = 0x00000001
NEGOTIATE_OEM = 0x00000002
REQUEST_TARGET = 0x00000004
NEGOTIATE_NTLM = 0x00000200
NEGOTIATE_ALWAYS_SIGN = 0x00008000
TARGET_TYPE_DOMAIN = 0x00010000
NEGOTIATE_EXTENDED_SESSIONSECURITY = 0x00080000
NEGOTIATE_TARGET_INFO = 0x00800000

FLAG_NAMES = {
    NEGOTIATE_UNICODE: "UNICODE",
    NEGOTIATE_OEM: "OEM",
    REQUEST_TARGET: "REQUEST_TARGET",
    NEGOTIATE_NTLM: "NTLM",
    NEGOTIATE_ALWAYS_SIGN: "ALWAYS_SIGN",
    TARGET_TYPE_DOMAIN: "TARGET_TYPE_DOMAIN",
    NEGOTIATE_EXTENDED_SESSIONSECURITY: "EXTENDED_SESSIONSECURITY",
    NEGOTIATE_TARGET_INFO: "TARGET_INFO",
}


class NtlmError(ValueError):
    """A malformed NTLM message."""


def flag_names(flags: int) -> list[str]:
    """The names of the known flags set in ``flags`` (unknown bits as hex)."""
    names = [name for bit, name in FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~sum(FLAG_NAMES)
    if unknown:
        names.append(f"0x{unknown:08x}")
    return names


# ------------------------------------------------------------------------------------ MD4


def _rotl(value: int, shift: int) -> int:
    value &= 0xFFFFFFFF
    return ((value << shift) | (value >> (32 - shift))) & 0xFFFFFFFF


def md4(data: bytes) -> bytes:
    """MD4 (RFC 1320)."""
    message = bytearray(data)
    bit_length = (8 * len(data)) & 0xFFFFFFFFFFFFFFFF
    message.append(0x80)
    while len(message) % 64 != 56:
        message.append(0)
    message += struct.pack("<Q", bit_length)

    a, b, c, d = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476
    for offset in range(0, len(message), 64):
        x = struct.unpack("<16I", message[offset : offset + 64])
        aa, bb, cc, dd = a, b, c, d

        def f(x_: int, y: int, z: int) -> int:
            return (x_ & y) | (~x_ & z)

        def g(x_: int, y: int, z: int) -> int:
            return (x_ & y) | (x_ & z) | (y & z)

        def h(x_: int, y: int, z: int) -> int:
            return x_ ^ y ^ z

        for i in (0, 4, 8, 12):  # round 1
            a = _rotl(a + f(b, c, d) + x[i], 3)
            d = _rotl(d + f(a, b, c) + x[i + 1], 7)
            c = _rotl(c + f(d, a, b) + x[i + 2], 11)
            b = _rotl(b + f(c, d, a) + x[i + 3], 19)
        for i in (0, 1, 2, 3):  # round 2
            a = _rotl(a + g(b, c, d) + x[i] + 0x5A827999, 3)
            d = _rotl(d + g(a, b, c) + x[i + 4] + 0x5A827999, 5)
            c = _rotl(c + g(d, a, b) + x[i + 8] + 0x5A827999, 9)
            b = _rotl(b + g(c, d, a) + x[i + 12] + 0x5A827999, 13)
        for i in (0, 2, 1, 3):  # round 3
            a = _rotl(a + h(b, c, d) + x[i] + 0x6ED9EBA1, 3)
            d = _rotl(d + h(a, b, c) + x[i + 8] + 0x6ED9EBA1, 9)
            c = _rotl(c + h(d, a, b) + x[i + 4] + 0x6ED9EBA1, 11)
            b = _rotl(b + h(c, d, a) + x[i + 12] + 0x6ED9EBA1, 15)
        a = (a + aa) & 0xFFFFFFFF
        b = (b + bb) & 0xFFFFFFFF
        c = (c + cc) & 0xFFFFFFFF
        d = (d + dd) & 0xFFFFFFFF
    return struct.pack("<4I", a, b, c, d)


# ------------------------------------------------------------------------------------ DES

# FIPS 46-3 tables (1-based bit positions, most significant bit first).
_IP = (
    58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
    62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
    57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
    61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7,
)  # fmt: skip
_FP = (
    40, 8, 48, 16, 56, 24, 64, 32, 39, 7, 47, 15, 55, 23, 63, 31,
    38, 6, 46, 14, 54, 22, 62, 30, 37, 5, 45, 13, 53, 21, 61, 29,
    36, 4, 44, 12, 52, 20, 60, 28, 35, 3, 43, 11, 51, 19, 59, 27,
    34, 2, 42, 10, 50, 18, 58, 26, 33, 1, 41, 9, 49, 17, 57, 25,
)  # fmt: skip
_E = (
    32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11,
    12, 13, 12, 13, 14, 15, 16, 17, 16, 17, 18, 19, 20, 21, 20, 21,
    22, 23, 24, 25, 24, 25, 26, 27, 28, 29, 28, 29, 30, 31, 32, 1,
)  # fmt: skip
_P = (
    16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
    2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25,
)  # fmt: skip
_PC1 = (
    57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18,
    10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36,
    63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22,
    14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4,
)  # fmt: skip
_PC2 = (
    14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4,
    26, 8, 16, 7, 27, 20, 13, 2, 41, 52, 31, 37, 47, 55, 30, 40,
    51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32,
)  # fmt: skip
_SHIFTS = (1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1)
_SBOX = (
    (14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7,
     0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
     4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0,
     15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13),
    (15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10,
     3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
     0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15,
     13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9),
    (10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8,
     13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
     13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7,
     1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12),
    (7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15,
     13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
     10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4,
     3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14),
    (2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9,
     14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
     4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14,
     11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3),
    (12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11,
     10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
     9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6,
     4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13),
    (4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1,
     13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
     1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2,
     6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12),
    (13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7,
     1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
     7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8,
     2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11),
)  # fmt: skip


def _permute(value: int, table: tuple[int, ...], width: int) -> int:
    """Bit permutation: output bit i (MSB first) is input bit table[i] of a width-bit value."""
    out = 0
    for position in table:
        out = (out << 1) | ((value >> (width - position)) & 1)
    return out


def _des_subkeys(key: bytes) -> list[int]:
    cd = _permute(int.from_bytes(key, "big"), _PC1, 64)
    c, d = cd >> 28, cd & 0x0FFFFFFF
    subkeys = []
    for shift in _SHIFTS:
        c = ((c << shift) | (c >> (28 - shift))) & 0x0FFFFFFF
        d = ((d << shift) | (d >> (28 - shift))) & 0x0FFFFFFF
        subkeys.append(_permute((c << 28) | d, _PC2, 56))
    return subkeys


def des_encrypt_block(key: bytes, block: bytes) -> bytes:
    """DES (FIPS 46-3) encryption of one 8-byte block under an 8-byte key (parity ignored)."""
    if len(key) != 8 or len(block) != 8:
        raise ValueError("DES needs an 8-byte key and an 8-byte block")
    state = _permute(int.from_bytes(block, "big"), _IP, 64)
    left, right = state >> 32, state & 0xFFFFFFFF
    for subkey in _des_subkeys(key):
        mixed = _permute(right, _E, 32) ^ subkey
        sboxed = 0
        for box in range(8):
            six = (mixed >> (42 - 6 * box)) & 0x3F
            row = ((six >> 4) & 0b10) | (six & 1)
            column = (six >> 1) & 0x0F
            sboxed = (sboxed << 4) | _SBOX[box][16 * row + column]
        left, right = right, left ^ _permute(sboxed, _P, 32)
    return _permute((right << 32) | left, _FP, 64).to_bytes(8, "big")


def _des_key_from_7(seven: bytes) -> bytes:
    """Spread 56 key bits over 8 bytes (the low bit of each byte is parity, ignored by DES)."""
    bits = int.from_bytes(seven, "big")
    return bytes(((bits >> (49 - 7 * i)) & 0x7F) << 1 for i in range(8))


def desl(key16: bytes, challenge: bytes) -> bytes:
    """MS-NLMP DESL(): the 16-byte key, zero-padded to 21 bytes, as three DES keys."""
    key21 = key16 + bytes(21 - len(key16))
    return b"".join(
        des_encrypt_block(_des_key_from_7(key21[i : i + 7]), challenge) for i in (0, 7, 14)
    )


# ----------------------------------------------------------------------------- NTLM hashes


def nt_hash(password: str) -> bytes:
    """NTOWFv1: MD4 of the UTF-16LE password."""
    return md4(password.encode("utf-16-le"))


def lm_hash(password: str) -> bytes:
    """LMOWFv1: DES of "KGS!@#$%" under the upper-cased, 14-byte OEM password halves."""
    oem = password.upper().encode("latin-1", errors="replace")[:14].ljust(14, b"\x00")
    return b"".join(des_encrypt_block(_des_key_from_7(oem[i : i + 7]), b"KGS!@#$%") for i in (0, 7))


def ntowf_v2(password: str, user: str, domain: str) -> bytes:
    """NTOWFv2: HMAC-MD5(NT hash, UTF-16LE(upper(user) + domain))."""
    return hmac.digest(nt_hash(password), (user.upper() + domain).encode("utf-16-le"), "md5")


def ntlmv1_response(password: str, challenge: bytes) -> bytes:
    """The 24-byte NTLMv1 NT response (no extended session security)."""
    return desl(nt_hash(password), challenge)


def lmv1_response(password: str, challenge: bytes) -> bytes:
    """The 24-byte LM response."""
    return desl(lm_hash(password), challenge)


def ntlmv2_proof(key: bytes, challenge: bytes, blob: bytes) -> bytes:
    """HMAC-MD5(NTOWFv2, server challenge + blob): the first 16 bytes of a v2 response."""
    return hmac.digest(key, challenge + blob, "md5")


# -------------------------------------------------------------------------------- messages


def _buffer(message: bytes, offset: int) -> bytes:
    """The payload an 8-byte (len, maxlen, offset) security buffer at ``offset`` points to."""
    if len(message) < offset + 8:
        return b""
    length, _maxlen, start = struct.unpack_from("<HHI", message, offset)
    if length == 0:
        return b""
    if start + length > len(message):
        raise NtlmError(f"buffer at {offset} points outside the message")
    return message[start : start + length]


def _decode(raw: bytes, unicode: bool) -> str:
    return raw.decode("utf-16-le") if unicode else raw.decode("latin-1")


def _check_header(message: bytes, expected_type: int) -> None:
    if len(message) < 12 or message[:8] != SIGNATURE:
        raise NtlmError("not an NTLMSSP message")
    (message_type,) = struct.unpack_from("<I", message, 8)
    if message_type != expected_type:
        raise NtlmError(f"expected an NTLM type {expected_type} message, got type {message_type}")


@dataclass(frozen=True)
class Negotiate:
    """A parsed NEGOTIATE (type 1) message."""

    flags: int
    domain: str
    workstation: str

    @classmethod
    def parse(cls, message: bytes) -> Negotiate:
        _check_header(message, 1)
        if len(message) < 16:
            raise NtlmError("type 1 message too short")
        (flags,) = struct.unpack_from("<I", message, 12)
        # Type 1 strings are always OEM (MS-NLMP 2.2.1.1).
        return cls(
            flags=flags,
            domain=_decode(_buffer(message, 16), unicode=False),
            workstation=_decode(_buffer(message, 24), unicode=False),
        )


def build_challenge(
    negotiate_flags: int, challenge: bytes, target_name: str, computer_name: str = "MAIL"
) -> tuple[bytes, int]:
    """A CHALLENGE (type 2) message naming ``target_name`` as the domain; returns it with the
    flags it carries (Unicode strings if the client offered Unicode, OEM otherwise)."""
    unicode = bool(negotiate_flags & NEGOTIATE_UNICODE)
    flags = (
        (NEGOTIATE_UNICODE if unicode else NEGOTIATE_OEM)
        | REQUEST_TARGET
        | NEGOTIATE_NTLM
        | TARGET_TYPE_DOMAIN
        | NEGOTIATE_TARGET_INFO
    )
    target = target_name.encode("utf-16-le") if unicode else target_name.encode("latin-1")

    def av_pair(av_id: int, value: str) -> bytes:
        raw = value.encode("utf-16-le")
        return struct.pack("<HH", av_id, len(raw)) + raw

    # MsvAvNbDomainName (2), MsvAvNbComputerName (1), MsvAvEOL (0)
    target_info = av_pair(2, target_name) + av_pair(1, computer_name) + struct.pack("<HH", 0, 0)
    header_length = 48
    target_offset = header_length
    info_offset = target_offset + len(target)
    message = (
        SIGNATURE
        + struct.pack("<I", 2)
        + struct.pack("<HHI", len(target), len(target), target_offset)
        + struct.pack("<I", flags)
        + challenge
        + bytes(8)  # context
        + struct.pack("<HHI", len(target_info), len(target_info), info_offset)
        + target
        + target_info
    )
    return message, flags


@dataclass(frozen=True)
class Authenticate:
    """A parsed AUTHENTICATE (type 3) message."""

    flags: int
    unicode: bool
    lm_response: bytes = field(repr=False)
    nt_response: bytes = field(repr=False)
    domain: str
    user: str
    workstation: str
    session_key: bytes = field(repr=False)

    @classmethod
    def parse(cls, message: bytes, negotiated_flags: int) -> Authenticate:
        _check_header(message, 3)
        if len(message) < 52:
            raise NtlmError("type 3 message too short")
        # The flags field (offset 60) is missing in the oldest clients' 52-byte header.
        lowest_payload = min(
            (struct.unpack_from("<I", message, off + 4)[0] for off in (12, 20, 28, 36, 44, 52)
             if len(message) >= off + 8 and struct.unpack_from("<H", message, off)[0]),
            default=len(message),
        )  # fmt: skip
        if lowest_payload >= 64 and len(message) >= 64:
            (flags,) = struct.unpack_from("<I", message, 60)
        else:
            flags = negotiated_flags
        unicode = bool(flags & NEGOTIATE_UNICODE)
        return cls(
            flags=flags,
            unicode=unicode,
            lm_response=_buffer(message, 12),
            nt_response=_buffer(message, 20),
            domain=_decode(_buffer(message, 28), unicode),
            user=_decode(_buffer(message, 36), unicode),
            workstation=_decode(_buffer(message, 44), unicode),
            session_key=_buffer(message, 52) if lowest_payload >= 60 else b"",
        )


def verify_response(auth: Authenticate, challenge: bytes, password: str) -> str | None:
    """Which response in ``auth`` proves knowledge of ``password`` for ``challenge``:
    "NTLMv2", "NTLMv1", "LMv2", "LMv1", or None if none does.

    NTLMv2/LMv2 are keyed with the user and domain fields as the client sent them.
    """
    nt, lm = auth.nt_response, auth.lm_response
    if len(nt) > 24:
        key = ntowf_v2(password, auth.user, auth.domain)
        if hmac.compare_digest(nt[:16], ntlmv2_proof(key, challenge, nt[16:])):
            return "NTLMv2"
        return None
    if len(nt) == 24:
        if hmac.compare_digest(nt, ntlmv1_response(password, challenge)):
            return "NTLMv1"
        return None
    if len(lm) == 24:
        key = ntowf_v2(password, auth.user, auth.domain)
        if hmac.compare_digest(lm[:16], ntlmv2_proof(key, challenge, lm[16:])):
            return "LMv2"
        if hmac.compare_digest(lm, lmv1_response(password, challenge)):
            return "LMv1"
    return None


def build_negotiate(flags: int, domain: str = "", workstation: str = "") -> bytes:
    """A NEGOTIATE (type 1) message as a client sends it (OEM strings after a 32-byte header)."""
    domain_raw, workstation_raw = domain.encode("latin-1"), workstation.encode("latin-1")
    return (
        SIGNATURE
        + struct.pack("<II", 1, flags)
        + struct.pack("<HHI", len(domain_raw), len(domain_raw), 32)
        + struct.pack("<HHI", len(workstation_raw), len(workstation_raw), 32 + len(domain_raw))
        + domain_raw
        + workstation_raw
    )


def build_authenticate(
    flags: int,
    *,
    user: str,
    domain: str,
    workstation: str = "",
    lm_response: bytes = b"",
    nt_response: bytes = b"",
) -> bytes:
    """An AUTHENTICATE (type 3) message laid out like Cyrus SASL's: a 64-byte header (with
    the flags at offset 60), then LM, NT, domain, user, workstation; strings in UTF-16LE when
    ``flags`` has UNICODE, OEM otherwise."""
    unicode = bool(flags & NEGOTIATE_UNICODE)
    payloads = [
        lm_response,
        nt_response,
        domain.encode("utf-16-le" if unicode else "latin-1"),
        user.encode("utf-16-le" if unicode else "latin-1"),
        workstation.encode("utf-16-le" if unicode else "latin-1"),
        b"",  # session key
    ]
    header = SIGNATURE + struct.pack("<I", 3)
    offset = 64
    for payload in payloads:
        header += struct.pack("<HHI", len(payload), len(payload), offset)
        offset += len(payload)
    header += struct.pack("<I", flags)
    return header + b"".join(payloads)


@dataclass
class NtlmExchange:
    """What one client sent during an AUTH NTLM exchange, as the test server recorded it."""

    negotiate: Negotiate | None = None
    challenge_flags: int = 0
    target_name: str = ""
    authenticate: Authenticate | None = None
    response_kind: str | None = None  # verify_response()'s answer for the account's password
    accepted: bool = False
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The fields that matter, without the (password-derived) responses."""
        parts = []
        if self.negotiate is not None:
            parts.append(f"type1 flags={'|'.join(flag_names(self.negotiate.flags))}")
        parts.append(f"challenge target={self.target_name!r}")
        if self.authenticate is not None:
            auth = self.authenticate
            parts.append(
                f"type3 user={auth.user!r} domain={auth.domain!r} "
                f"workstation={auth.workstation!r} unicode={auth.unicode} "
                f"nt_response={len(auth.nt_response)}B lm_response={len(auth.lm_response)}B"
            )
        parts.append(f"verified={self.response_kind} accepted={self.accepted}")
        if self.errors:
            parts.append(f"errors={self.errors}")
        return " ".join(parts)
