"""An armored key's primary fingerprints, checked against what gpg says of the same keys."""

import base64

import pytest

from backchat import openpgp

# Two throwaway ed25519 keys made for these tests with gpg 2.2.40 (--quick-gen-key); the
# fingerprints are gpg's own (--with-colons, the fpr lines).
KEY_A_FINGERPRINT = "E13FE0A3513C09342ADF22B0306F13010A822AF6"
KEY_B_FINGERPRINT = "2041753FAB7C856F0E89D1E0FCECFB0684AB465D"
KEY_A = """\
-----BEGIN PGP PUBLIC KEY BLOCK-----

mDMEawdnMBYJKwYBBAHaRw8BAQdACoN9z2tpJWXDVDC/ElugdEykHvkSQyfKwwWT
xdC9ywS0JHVuaXQgdGVzdCBrZXkgQSA8YUBiYWNrY2hhdC5pbnZhbGlkPoiQBBMW
CAA4FiEE4T/go1E8CTQq3yKwMG8TAQqCKvYFAmsHZzACGwMFCwkIBwIGFQoJCAsC
BBYCAwECHgECF4AACgkQMG8TAQqCKvZw+QEAvaeETxbuDfKLKGDvEtyOooc1teSU
G4+59gLbSGSzfaEBAKHSDG1n5YY/JI7SpIjtNLO2BaMstQ3FrFowAn1E8lwO
=8hfj
-----END PGP PUBLIC KEY BLOCK-----
"""
KEYS_A_AND_B = """\
-----BEGIN PGP PUBLIC KEY BLOCK-----

mDMEawdnMBYJKwYBBAHaRw8BAQdACoN9z2tpJWXDVDC/ElugdEykHvkSQyfKwwWT
xdC9ywS0JHVuaXQgdGVzdCBrZXkgQSA8YUBiYWNrY2hhdC5pbnZhbGlkPoiQBBMW
CAA4FiEE4T/go1E8CTQq3yKwMG8TAQqCKvYFAmsHZzACGwMFCwkIBwIGFQoJCAsC
BBYCAwECHgECF4AACgkQMG8TAQqCKvZw+QEAvaeETxbuDfKLKGDvEtyOooc1teSU
G4+59gLbSGSzfaEBAKHSDG1n5YY/JI7SpIjtNLO2BaMstQ3FrFowAn1E8lwOmDME
awdnNRYJKwYBBAHaRw8BAQdAAC2GTU0F2MRG9WVaqvhW25R3kwxegn+2N5KA6OuS
k9C0JHVuaXQgdGVzdCBrZXkgQiA8YkBiYWNrY2hhdC5pbnZhbGlkPoiQBBMWCAA4
FiEEIEF1P6t8hW8OidHg/Oz7BoSrRl0FAmsHZzUCGwMFCwkIBwIGFQoJCAsCBBYC
AwECHgECF4AACgkQ/Oz7BoSrRl122QEA5DQ17j0iNEc+hQY/Z4xpUFzv6epPXB/j
7OtsvxYIhu0A/i8g+YELt8qWUE2bhiKgppW8OAPa5edcOYdEXsopLEAE
=hp49
-----END PGP PUBLIC KEY BLOCK-----
"""


def armor(data: bytes) -> str:
    checksum = base64.b64encode(openpgp.crc24(data).to_bytes(3, "big")).decode()
    body = base64.b64encode(data).decode()
    lines = [body[at:at + 64] for at in range(0, len(body), 64)]
    return "\n".join([openpgp.BEGIN, "", *lines, f"={checksum}", openpgp.END]) + "\n"


def test_the_fingerprint_is_gpgs():
    assert openpgp.primary_fingerprints(KEY_A) == [KEY_A_FINGERPRINT]


def test_every_primary_key_is_counted():
    assert openpgp.primary_fingerprints(KEYS_A_AND_B) == [KEY_A_FINGERPRINT, KEY_B_FINGERPRINT]


def test_armor_headers_and_crlf_are_read():
    with_header = KEY_A.replace(openpgp.BEGIN + "\n", openpgp.BEGIN + "\nComment: a header\n").replace("\n", "\r\n")
    assert openpgp.primary_fingerprints(with_header) == [KEY_A_FINGERPRINT]


def test_new_format_packet_headers_give_the_same_fingerprint():
    data = openpgp.dearmor(KEY_A)
    (tag, body), *rest = openpgp.packets(data)
    assert tag == openpgp.PUBLIC_KEY and data[0] & 0x40 == 0, "gpg writes the old format: reframe it"
    reframed = bytes([0xC0 | tag, len(body)]) + body + data[len(data) - sum(len(b) + 2 for _, b in rest):]
    assert openpgp.primary_fingerprints(armor(reframed)) == [KEY_A_FINGERPRINT]


def test_crc24_of_nothing_is_its_initial_value():
    assert openpgp.crc24(b"") == 0xB704CE


@pytest.mark.parametrize(
    "text, words",
    [
        ("<html><body>404 Not Found</body></html>", "not one ASCII-armored public key block"),
        ("", "not one ASCII-armored public key block"),
        (KEY_A + KEY_A, "not one ASCII-armored public key block"),
        (KEY_A.replace("PUBLIC KEY", "PRIVATE KEY"), "not one ASCII-armored public key block"),
        (KEY_A.replace("mDMEawdn", "mDMEawdm"), "checksum does not match"),
        (KEY_A.replace("mDMEawdn", "mDMEawd!"), "not valid base64"),
    ],
)
def test_what_is_not_one_public_key_block_is_refused(text, words):
    with pytest.raises(openpgp.NotAKey, match=words):
        openpgp.primary_fingerprints(text)


@pytest.mark.parametrize(
    "data, words",
    [
        (openpgp.dearmor(KEY_A)[:-10], "truncated"),
        (b"\x00" + openpgp.dearmor(KEY_A), "does not start an OpenPGP packet"),
        (bytes([0x94, 3]) + b"\x04\x00\x00", "secret key"),  # old format, tag 5, one length byte
        (bytes([0x99, 0, 3]) + b"\x05\x00\x00", "version 5 key"),
        (bytes([0xB4, 1]) + b"x", "holds no public key"),  # a user id alone
        (bytes([0xC6, 0xE1]) + b"\x04", "partial body lengths"),
    ],
)
def test_what_is_not_a_v4_public_key_is_refused(data, words):
    with pytest.raises(openpgp.NotAKey, match=words):
        openpgp.primary_fingerprints(armor(data))
