"""The controller's CA and each host's certificate (backchat/tls.py)."""

from __future__ import annotations

import datetime
import stat

import pytest
from cryptography import x509

from backchat import tls
from tests.cfg import make_cfg


@pytest.fixture
def cfg(tmp_path):
    return make_cfg(tls=True, tls_ca_dir=str(tmp_path / "ca"))


def sans(pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return sorted(map(str, cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value))


def test_the_ca_is_made_once_private_and_reused(cfg, tmp_path):
    first = tls.host_certificate(cfg, "ai-01", ["ai-01.lab", "10.0.0.5"])
    ca = tmp_path / "ca"
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.stat().st_mode) == 0o700
    assert first.trust == str(ca / "ca.crt")
    key_before = (ca / "ca.key").read_bytes()
    again = tls.host_certificate(cfg, "ai-01", ["ai-01.lab", "10.0.0.5"])
    assert again.cert_pem == first.cert_pem and again.key_pem == first.key_pem, "a re-run sends the same bytes"
    assert (ca / "ca.key").read_bytes() == key_before
    assert "BEGIN" not in repr(first.key_pem), "the key never prints"


def test_the_certificate_names_the_host_and_is_signed_by_the_ca(cfg, tmp_path):
    issued = tls.host_certificate(cfg, "@local", ["ai-01.lab", "10.0.0.5", "[::1]", "not a name!"])
    assert sans(issued.cert_pem) == sorted([
        "<DNSName(value='ai-01.lab')>", "<IPAddress(value=10.0.0.5)>", "<IPAddress(value=::1)>"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_new_names_or_a_near_expiry_issue_a_new_certificate(cfg, tmp_path, monkeypatch):
    first = tls.host_certificate(cfg, "ai-01", ["ai-01.lab"])
    renamed = tls.host_certificate(cfg, "ai-01", ["ai-01.lab", "ai-01.example.com"])
    assert renamed.cert_pem != first.cert_pem and "ai-01.example.com" in str(sans(renamed.cert_pem))
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=tls.HOST_DAYS - tls.RENEW_DAYS + 1)
    monkeypatch.setattr(tls, "_now", lambda: later)
    renewed = tls.host_certificate(cfg, "ai-01", ["ai-01.lab", "ai-01.example.com"])
    assert renewed.cert_pem != renamed.cert_pem


def test_a_ca_directory_others_can_read_is_refused(cfg, tmp_path):
    (tmp_path / "ca").mkdir(mode=0o755)
    (tmp_path / "ca").chmod(0o755)
    with pytest.raises(ValueError, match="chmod 700"):
        tls.host_certificate(cfg, "ai-01", ["ai-01.lab"])


def test_your_own_certificate_is_used_as_it_is(tmp_path):
    (tmp_path / "cert.pem").write_text("CERT")
    (tmp_path / "key.pem").write_text("KEY")
    own = make_cfg(tls=True, tls_cert_file=str(tmp_path / "cert.pem"), tls_key_file=str(tmp_path / "key.pem"))
    issued = tls.host_certificate(own, "ai-01", ["ai-01.lab"])
    assert (issued.cert_pem, issued.key_pem.reveal(), issued.trust) == ("CERT", "KEY", None)
    assert tls.trust(own) is True, "your own certificate: the system's trust store"


def test_cert_and_key_go_together(tmp_path):
    from backchat.settings import SettingsError

    (tmp_path / "cert.pem").write_text("CERT")
    with pytest.raises(SettingsError, match="go together"):
        make_cfg(tls_cert_file=str(tmp_path / "cert.pem"))
