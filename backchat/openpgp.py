"""The primary-key fingerprints of an ASCII-armored OpenPGP public key, in pure Python.

apt trusts every primary key in a ``Signed-By`` keyring, so a repository's key is pinned
by the list of its primary fingerprints: exactly one, the expected one. A v4 fingerprint
is the SHA-1 of ``0x99``, the key packet's two-byte length and the packet body (RFC 4880
12.2; what ``gpg --show-keys --with-colons`` prints on its ``fpr`` line after ``pub``).
Only the framing is parsed (armor, CRC-24, packet headers); nothing here checks
signatures: apt does that with the keyring this vouches for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterator

BEGIN = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
END = "-----END PGP PUBLIC KEY BLOCK-----"
PUBLIC_KEY, SECRET_KEY, SECRET_SUBKEY = 6, 5, 7


class NotAKey(ValueError):
    """The text is not one ASCII-armored OpenPGP public key block (says why)."""


def crc24(data: bytes) -> int:
    """The armor checksum (RFC 4880 6.1)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def dearmor(text: str) -> bytes:
    """The binary key inside one armored public key block (checksum verified when present)."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines or lines[0] != BEGIN or lines[-1] != END or lines.count(BEGIN) != 1:
        raise NotAKey("it is not one ASCII-armored public key block (-----BEGIN PGP PUBLIC KEY BLOCK-----)")
    body = lines[1:-1]
    if "" in body:  # armor headers (Version:, Comment:) end at the first blank line
        body = body[body.index("") + 1:]
    checksum = None
    if body and body[-1].startswith("=") and len(body[-1]) == 5:
        checksum = body.pop()
    try:
        data = base64.b64decode("".join(body), validate=True)
        expected = int.from_bytes(base64.b64decode(checksum[1:], validate=True), "big") if checksum else None
    except (binascii.Error, ValueError):
        raise NotAKey("its armor is not valid base64") from None
    if expected is not None and crc24(data) != expected:
        raise NotAKey("its armor checksum does not match (the file is damaged)")
    return data


def packets(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, body) of each OpenPGP packet, old and new header formats (RFC 4880 4.2)."""
    at = 0
    try:
        while at < len(data):
            first = data[at]
            if not first & 0x80:
                raise NotAKey(f"byte {at} does not start an OpenPGP packet")
            if first & 0x40:  # new format
                tag, octet = first & 0x3F, data[at + 1]
                if octet < 192:
                    length, at = octet, at + 2
                elif octet < 224:
                    length, at = ((octet - 192) << 8) + data[at + 2] + 192, at + 3
                elif octet == 255:
                    length, at = int.from_bytes(data[at + 2:at + 6], "big"), at + 6
                else:
                    raise NotAKey("it uses partial body lengths, which key packets never do")
            else:  # old format: the low two bits say how many length bytes follow
                tag, size = (first >> 2) & 0x0F, first & 0x03
                if size == 3:
                    raise NotAKey("it uses an indeterminate packet length")
                count = (1, 2, 4)[size]
                length, at = int.from_bytes(data[at + 1:at + 1 + count], "big"), at + 1 + count
            body = data[at:at + length]
            if len(body) != length:
                raise IndexError
            at += length
            yield tag, body
    except IndexError:
        raise NotAKey("it ends in the middle of a packet (truncated)") from None


def primary_fingerprints(text: str) -> list[str]:
    """Upper-case hex v4 fingerprint of every primary key in an armored public key block."""
    found = []
    for tag, body in packets(dearmor(text)):
        if tag in (SECRET_KEY, SECRET_SUBKEY):
            raise NotAKey("it holds a secret key")
        if tag == PUBLIC_KEY:
            if not body or body[0] != 4:
                raise NotAKey(f"it is a version {body[0] if body else '?'} key; only v4 keys (40-hex fingerprints) are supported")
            found.append(hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).hexdigest().upper())
    if not found:
        raise NotAKey("it holds no public key")
    return found
