"""The NTLM code the e2e NTLM server relies on (tests/e2e/ntlm.py), against published vectors.

If these fail, a passing NTLM end-to-end test would prove nothing: the server's verdict on the
client's response comes from exactly this MD4, DES and NTLMv1/v2 code.
"""

from __future__ import annotations

import pytest

from . import ntlm

pytestmark = pytest.mark.e2e

# MS-NLMP 4.2.1 common values (published example data, not secrets).
MS_USER, MS_DOMAIN, MS_PASSWORD = "User", "Domain", "Password"
MS_SERVER_CHALLENGE = bytes.fromhex("0123456789abcdef")
MS_CLIENT_CHALLENGE = bytes.fromhex("aaaaaaaaaaaaaaaa")


@pytest.mark.parametrize(
    ("message", "digest"),
    [
        (b"", "31d6cfe0d16ae931b73c59d7e0c089c0"),
        (b"a", "bde52cb31de33e46245e05fbdbd6fb24"),
        (b"abc", "a448017aaf21d8525fc10ae87aa6729d"),
        (b"message digest", "d9130a8164549fe818874806e1c7014b"),
        (b"abcdefghijklmnopqrstuvwxyz", "d79e1c308aa5bbcdeea8ed63df412da9"),
        (
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            "043f8582f241db351ce627e153e7f0e4",
        ),
        (b"1234567890" * 8, "e33b4ddc9c38f2199c3e7b164fcc0536"),
    ],
)
def test_md4_rfc1320_test_suite(message: bytes, digest: str) -> None:
    """MD4 gives the seven digests of RFC 1320's appendix A.5 test suite."""
    assert ntlm.md4(message).hex() == digest


def test_des_known_answer() -> None:
    """DES gives the classic FIPS 46 worked example (key 133457799BBCDFF1) and the
    all-zero-key vector."""
    key, plain = bytes.fromhex("133457799bbcdff1"), bytes.fromhex("0123456789abcdef")
    assert ntlm.des_encrypt_block(key, plain).hex() == "85e813540f0ab405"
    assert ntlm.des_encrypt_block(bytes(8), bytes(8)).hex() == "8ca64de9c1b123a7"


def test_ntlmv1_ms_nlmp_vectors() -> None:
    """NT hash, NTLMv1 NT response and LM response of MS-NLMP 4.2.2."""
    assert ntlm.nt_hash(MS_PASSWORD).hex() == "a4f49c406510bdcab6824ee7c30fd852"
    assert ntlm.lm_hash(MS_PASSWORD).hex() == "e52cac67419a9a224a3b108f3fa6cb6d"
    assert (
        ntlm.ntlmv1_response(MS_PASSWORD, MS_SERVER_CHALLENGE).hex()
        == "67c43011f30298a2ad35ece64f16331c44bdbed927841f94"
    )
    assert (
        ntlm.lmv1_response(MS_PASSWORD, MS_SERVER_CHALLENGE).hex()
        == "98def7b87f88aa5dafe2df779688a172def11c7d5ccdef13"
    )


def test_ntlmv2_ms_nlmp_vectors() -> None:
    """NTOWFv2, the LMv2 response and the NTProofStr of MS-NLMP 4.2.4."""
    key = ntlm.ntowf_v2(MS_PASSWORD, MS_USER, MS_DOMAIN)
    assert key.hex() == "0c868a403bfd7a93a3001ef22ef02e3f"
    lmv2 = ntlm.ntlmv2_proof(key, MS_SERVER_CHALLENGE, MS_CLIENT_CHALLENGE)
    assert lmv2.hex() == "86c35097ac9cec102554764a57cccc19"
    temp = bytes.fromhex(
        "0101000000000000" + "0000000000000000" + "aaaaaaaaaaaaaaaa" + "00000000"
        "02000c0044006f006d00610069006e00" + "01000c00530065007200760065007200"
        "0000000000000000"
    )
    assert (
        ntlm.ntlmv2_proof(key, MS_SERVER_CHALLENGE, temp).hex()
        == "68cd0ab851e51c96aabc927bebef6a1c"
    )


def _type3(flags: int, **kwargs: object) -> ntlm.Authenticate:
    message = ntlm.build_authenticate(flags, **kwargs)  # type: ignore[arg-type]
    return ntlm.Authenticate.parse(message, negotiated_flags=0)


@pytest.mark.parametrize("flags", [ntlm.NEGOTIATE_UNICODE, ntlm.NEGOTIATE_OEM])
def test_type3_fields_parse_in_unicode_and_oem(flags: int) -> None:
    """A type 3 message's user, domain and workstation read back the same whether the strings
    are UTF-16LE (UNICODE flag) or OEM, and verify_response recognises each response kind."""
    nt = ntlm.ntlmv1_response(MS_PASSWORD, MS_SERVER_CHALLENGE)
    auth = _type3(flags, user="CORP\\svc", domain="CORP", workstation="WS1", nt_response=nt)
    assert (auth.user, auth.domain, auth.workstation) == ("CORP\\svc", "CORP", "WS1")
    assert auth.unicode == bool(flags & ntlm.NEGOTIATE_UNICODE)
    assert ntlm.verify_response(auth, MS_SERVER_CHALLENGE, MS_PASSWORD) == "NTLMv1"
    assert ntlm.verify_response(auth, MS_SERVER_CHALLENGE, MS_PASSWORD + "x") is None


def test_verify_response_kinds() -> None:
    """verify_response accepts an NTLMv2 (NTProofStr + blob), an LMv2 and an LM-only v1
    response for the right password only."""
    key = ntlm.ntowf_v2(MS_PASSWORD, MS_USER, MS_DOMAIN)
    blob = bytes.fromhex("0101000000000000") + bytes(8) + MS_CLIENT_CHALLENGE + bytes(4)
    v2 = ntlm.ntlmv2_proof(key, MS_SERVER_CHALLENGE, blob) + blob
    lmv2 = ntlm.ntlmv2_proof(key, MS_SERVER_CHALLENGE, MS_CLIENT_CHALLENGE) + MS_CLIENT_CHALLENGE
    lmv1 = ntlm.lmv1_response(MS_PASSWORD, MS_SERVER_CHALLENGE)
    common = {"user": MS_USER, "domain": MS_DOMAIN}
    cases = {
        "NTLMv2": _type3(ntlm.NEGOTIATE_UNICODE, nt_response=v2, **common),
        "LMv2": _type3(ntlm.NEGOTIATE_UNICODE, lm_response=lmv2, **common),
        "LMv1": _type3(ntlm.NEGOTIATE_UNICODE, lm_response=lmv1, **common),
    }
    for kind, auth in cases.items():
        assert ntlm.verify_response(auth, MS_SERVER_CHALLENGE, MS_PASSWORD) == kind
        assert ntlm.verify_response(auth, MS_SERVER_CHALLENGE, "wrong") is None, kind


def test_challenge_names_the_target_domain() -> None:
    """The type 2 message carries the target name (UTF-16LE when the client offered
    Unicode, OEM otherwise) at the offsets Cyrus reads, and the 8-byte challenge."""
    for offered, encoding in ((ntlm.NEGOTIATE_UNICODE, "utf-16-le"), (ntlm.NEGOTIATE_OEM, "ascii")):
        message, flags = ntlm.build_challenge(offered | ntlm.NEGOTIATE_NTLM, b"C" * 8, "CORP")
        assert message[:12] == ntlm.SIGNATURE + b"\x02\x00\x00\x00"
        assert flags & offered and flags & ntlm.NEGOTIATE_NTLM
        length = int.from_bytes(message[12:14], "little")
        offset = int.from_bytes(message[16:20], "little")
        assert message[offset : offset + length].decode(encoding) == "CORP"
        assert message[24:32] == b"C" * 8
        assert int.from_bytes(message[20:24], "little") == flags


def test_negotiate_parses() -> None:
    """A type 1 message's flags and (OEM) domain/workstation read back."""
    parsed = ntlm.Negotiate.parse(ntlm.build_negotiate(0x207, "DOM", "WS"))
    assert (parsed.flags, parsed.domain, parsed.workstation) == (0x207, "DOM", "WS")
    assert ntlm.flag_names(0x207) == ["UNICODE", "OEM", "REQUEST_TARGET", "NTLM"]
    with pytest.raises(ntlm.NtlmError):
        ntlm.Negotiate.parse(b"NTLMSSP\x00\x03\x00\x00\x00" + bytes(20))
