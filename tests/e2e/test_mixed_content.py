"""Mixed content (issue 15): the Backchat page of an ``https://`` Backstage frames the GUI.

Browsers block an ``http://`` iframe inside an ``https://`` page. Here a real Backstage
backend (tests/e2e/test_backstage_backend.py's app and stand-in bundle, which iframes
``ai_server.url`` as the Backchat plugin does) serves its page over https
(``backend.https`` with a certificate from backchat's CA, as an admin configures it), with
the CSP and ``ai_server.url`` of the app-config.local.yaml backchat writes. Headless
Chromium trusts that CA through an NSS db (certutil, Debian package libnss3-tools): every
handshake is verified, none is waved through.

- With the front door (``tls`` on, the default): the GUI URL the deploy computes is
  https, through Debian's nginx running the frontdoor.conf the deploy writes
  (testbed/frontdoor.py). The GUI behind the door is a stand-in page server (GuiStandIn:
  Chatbot UI itself cannot be built in CI, its source is on GitHub); its page tells the
  parent it loaded. Chromium loads it in the iframe with no CSP violation and no mixed
  content message.
- Without it (``tls`` off: the GUI published as plain http): the same https page, the
  iframe is blocked as mixed content, and Chromium's console says so, though our CSP
  allows the frame and the GUI answers over http (the check above fails on it).
- Chromium without the CA: the page itself does not load (the trust is real).

Skips as test_backstage_backend.py does (npm, Chromium), and without nginx or certutil;
with BACKCHAT_REQUIRE_REALHOSTS=1 (CI) it fails instead.
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import pytest

from backchat import tls
from tests.e2e.test_backstage_backend import (  # noqa: F401  (fixtures)
    ADDRESS, App, browser_visit, check_gui_loads, chromium, gui, make_cfg, npm_root, parse_csp, served_page,
    unavailable,
)
from testbed import backstage_backend as bb
from testbed import frontdoor as fd
from testbed.llama_server import free_port

pytestmark = [pytest.mark.npm, pytest.mark.browser, pytest.mark.usefixtures("chromium")]

BACKSTAGE = "backstage.test"  # the Backstage origin's name; Chromium maps it to 127.0.0.1
NAMES = (BACKSTAGE, ADDRESS)
MIXED = "Mixed Content"  # how Chromium's console starts its mixed-content messages


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    if fd.missing_requirements():
        unavailable(fd.missing_requirements())
    if shutil.which(bb.CERTUTIL) is None:
        unavailable(bb.NO_CERTUTIL)
    return tmp_path_factory.mktemp("lab") / "ca"


@pytest.fixture(scope="module")
def backstage_https(ca_dir, tmp_path_factory) -> bb.Https:
    """Backstage's certificate, from the lab's CA (it could be any CA the browsers trust)."""
    cfg = make_cfg(tls=True, tls_ca_dir=str(ca_dir))
    certificate = tls.host_certificate(cfg, BACKSTAGE, [BACKSTAGE, "127.0.0.1"])
    directory = tmp_path_factory.mktemp("backstage-tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_text(certificate.cert_pem)
    key.touch(mode=0o600)
    key.write_text(certificate.key_pem.reveal())
    return bb.Https(cert, key, Path(certificate.trust))


@pytest.fixture(scope="module")
def browser_home(backstage_https, tmp_path_factory) -> Path:
    return bb.trusting_home(backstage_https.ca, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def https_gui_app(npm_root, gui, ca_dir, backstage_https, tmp_path_factory):
    """Backstage over https with what backchat writes for a host behind its front door, and
    that door (nginx, the lab CA's certificate for the host) in front of the GUI."""
    with bb.app_directory() as root:
        app = App(root, tmp_path_factory.mktemp("https-gui"), npm_root, free_port(), https=backstage_https,
                  tls=True, tls_ca_dir=str(ca_dir))
        door = fd.FrontDoor(tmp_path_factory.mktemp("door"), app.cfg, {"chatbot-ui": f"127.0.0.1:{gui.port}"},
                            [ADDRESS])
        with door, app.backend:
            yield app


def page_url(app: App) -> str:
    return f"https://{BACKSTAGE}:{app.backend.port}/"


def mixed_content(result: dict) -> list[str]:
    return [line for line in result["console"] if MIXED in line]


def check_frames_the_gui_without_mixed_content(app: App, result: dict) -> None:
    assert result["navigationError"] is None and result["status"] == 200, result
    check_gui_loads(app, result)
    assert mixed_content(result) == [], result["console"]


def test_the_https_page_frames_the_gui_through_the_front_door(https_gui_app, npm_root, browser_home):
    app = https_gui_app
    assert app.backend.url.startswith("https://") and app.gui == f"https://{ADDRESS}:{app.cfg.chatbot_ui_port}"
    headers, _ = served_page(app.backend)
    assert parse_csp(headers["content-security-policy"])["frame-src"] == ["'self'", app.gui]
    result = browser_visit(app, npm_root, page_url(app), NAMES, browser_home)
    bb.TIMINGS["browser (https page, https GUI)"] = result["seconds"]
    check_frames_the_gui_without_mixed_content(app, result)
    assert app.gui + "/" in result["frames"], result["frames"]


def test_the_https_page_does_not_load_without_the_lab_ca(https_gui_app, npm_root, tmp_path):
    """Mutation of the browser's trust: a fresh HOME, no NSS db: the handshake fails."""
    result = browser_visit(https_gui_app, npm_root, page_url(https_gui_app), NAMES, tmp_path)
    with pytest.raises(AssertionError):
        check_frames_the_gui_without_mixed_content(https_gui_app, result)
    assert "net::ERR_CERT_AUTHORITY_INVALID" in (result["navigationError"] or ""), result


def test_an_http_gui_in_the_https_page_is_blocked_as_mixed_content(make_https_app, gui, npm_root, browser_home):
    """Mutation of the deploy: ``tls`` off, the GUI served as plain http."""
    app = make_https_app()
    assert app.gui == f"http://{ADDRESS}:{gui.port}"
    with urllib.request.urlopen(f"http://127.0.0.1:{gui.port}/", timeout=10) as answer:
        assert answer.status == 200, "the GUI answers over http: only the browser blocks it"
    with app.backend:
        headers, _ = served_page(app.backend)
        csp = parse_csp(headers["content-security-policy"])
        result = browser_visit(app, npm_root, page_url(app), NAMES, browser_home)
    bb.TIMINGS["browser (https page, http GUI)"] = result["seconds"]
    assert csp["frame-src"] == ["'self'", app.gui] and "upgrade-insecure-requests" not in csp, csp
    with pytest.raises(AssertionError):
        check_frames_the_gui_without_mixed_content(app, result)
    assert result["status"] == 200 and result["aiServerUrl"] == app.gui and result["gui"] is None, result
    assert result["violations"] == [], "blocked by our CSP, not as mixed content"
    blocked = mixed_content(result)
    assert any(f"requested an insecure frame '{app.gui}/'" in line and "has been blocked" in line
               for line in blocked), result["console"]


@pytest.fixture
def make_https_app(npm_root, gui, backstage_https, tmp_path):
    """Backstage over https with what backchat writes for a host with ``tls`` off."""
    with bb.app_directory() as root:
        yield lambda: App(root, tmp_path, npm_root, gui.port, https=backstage_https)
