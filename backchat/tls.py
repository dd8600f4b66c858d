"""HTTPS for the front door: a small CA on the controller and a certificate per host.

Browsers block an ``http://`` iframe inside an ``https://`` Backstage page, so every host
whose services leave its loopback gets an HTTPS front door (the ``frontdoor`` service of
the compose file). Its certificate is the user's own (``tls_cert_file`` and
``tls_key_file``), or, by default, one signed by a CA made once on the controller in
``tls_ca_dir``: ``ca.key`` (0600, never printed) and ``ca.crt``, the file browsers and
Backstage's backend are told to trust. Each host's certificate names what browsers and
the controller call it (``public_address``, its inventory and SSH names) and is kept
beside the CA, so a re-run sends the same bytes; it is re-issued when those names change
or when fewer than ``RENEW_DAYS`` are left.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backchat import local_files
from backchat.addresses import behind_front_door
from backchat.secrets import Secret

CA_DAYS = 3650
HOST_DAYS = 397  # what browsers accept for a server certificate
RENEW_DAYS = 30
# Where the front door finds its certificate, inside its container.
CONTAINER_DIR = "/etc/backchat/tls"
# Where the deploy puts them on the host, relative to stack_dir.
HOST_DIR = "tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"


@dataclass(frozen=True)
class HostCertificate:
    cert_pem: str  # the host's certificate (and, with a user's own, its chain)
    key_pem: Secret
    trust: str | None  # the CA file that verifies it; None: the system's trust store


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate_authority(ca_dir: str):
    """The controller's CA (private key, certificate), made on first use."""
    directory = local_files.private_dir(Path(ca_dir))
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"backchat CA ({os.uname().nodename})")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        local_files.write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        local_files.write_new(key_path, _key_pem(key), 0o600)
    if key_path.is_symlink() or key_path.stat().st_mode & 0o077:
        raise ValueError(f"{key_path} can be read by others. Fix: chmod 600 {key_path}")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


def alt_names(names) -> list[x509.GeneralName]:
    """Subject alternative names for what a host is called: IPs as IPs, the rest as DNS."""
    result: list[x509.GeneralName] = []
    for name in dict.fromkeys(name.strip("[]") for name in names if name):
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
                result.append(x509.DNSName(name))
    return result


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "host"


def host_certificate(cfg, host_name: str, names) -> HostCertificate:
    """This host's certificate: the user's own, or ours for ``names`` (issued or reused)."""
    if cfg.tls_cert_file:
        return HostCertificate(
            Path(cfg.tls_cert_file).read_text(), Secret(Path(cfg.tls_key_file).read_text()), None
        )
    ca_key, ca_cert = certificate_authority(cfg.tls_ca_dir)
    wanted = alt_names(names)
    hosts_dir = local_files.private_dir(Path(cfg.tls_ca_dir) / "hosts")
    cert_path, key_path = hosts_dir / f"{_slug(host_name)}.crt", hosts_dir / f"{_slug(host_name)}.key"
    if not (cert_path.exists() and key_path.exists()) or _needs_new(cert_path, ca_cert, wanted):
        key = ec.generate_private_key(ec.SECP256R1())
        first = next((str(name.value) for name in wanted), host_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first[:64])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=HOST_DAYS))
            .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        local_files.replace(key_path, _key_pem(key), 0o600)
        local_files.replace(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return HostCertificate(cert_path.read_text(), Secret(key_path.read_text()), str(Path(cfg.tls_ca_dir) / "ca.crt"))


def _needs_new(cert_path: Path, ca_cert, wanted: list[x509.GeneralName]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return True
    return (
        cert.issuer != ca_cert.subject
        or sorted(map(str, names)) != sorted(map(str, wanted))
        or cert.not_valid_after_utc - _now() < datetime.timedelta(days=RENEW_DAYS)
    )


def ca_certificate(ca_dir: str) -> str:
    """The certificate (PEM) of the CA in ``ca_dir``, which the hosts' certificates are
    checked against (made there first, if need be, as for any host)."""
    _, cert = certificate_authority(ca_dir)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def trust(cfg) -> str | bool:
    """What verify trusts for this host's HTTPS: our CA file, else the system's store."""
    if not behind_front_door(cfg):
        return True
    return True if cfg.tls_cert_file else str(Path(cfg.tls_ca_dir) / "ca.crt")
