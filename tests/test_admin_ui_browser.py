"""The admin page in a real headless browser: Debian's chromium driven by
chromedriver through selenium, against a gateway started as operators
start it (`twistd -n apigw`), with the admin API on its own TLS listener.

The tests run in file order and share one browser and one gateway: login,
services, keys, CSRF, logout, then admin_allow (which reloads the gateway
into refusing this address), then the check that no request of the whole
session left the gateway's origin. Screenshots of each view are written
to build/test-artifacts/admin-ui/ (or $APIGW_TEST_ARTIFACTS).
"""

import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import REPO, TWISTD, assert_no_secrets, free_port, wait_for_port
from tests.test_ops import _make_cert

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MASTER = "hunter2-master"  # watched by tests.secrets_guard
RECOVERY_S = 12
ARTIFACTS = Path(os.environ.get("APIGW_TEST_ARTIFACTS",
                                Path(REPO) / "build" / "test-artifacts" / "admin-ui"))

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install -e '.[test]')")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them: "
                "apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException, TimeoutException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

UNVERIFIED = ssl.create_default_context()
UNVERIFIED.check_hostname = False
UNVERIFIED.verify_mode = ssl.CERT_NONE


class _Upstream(BaseHTTPRequestHandler):
    def _answer(self):
        if "/slow" in self.path:
            time.sleep(0.05)
        status = 500 if "/fail" in self.path else 200
        body = json.dumps({"path": self.path}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def request(url, headers=None, method="GET", body=None):
    """(status, body bytes) over a fresh connection; HTTP errors are answers too."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10, context=UNVERIFIED
                                    if url.startswith("https") else None) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Gateway:
    def __init__(self, root):
        self.root = root
        self.upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
        threading.Thread(target=self.upstream.serve_forever, daemon=True).start()
        healthy = f"http://127.0.0.1:{self.upstream.server_port}"
        dead_billing, dead_legacy = free_port(), free_port()
        self.dead_billing = f"http://127.0.0.1:{dead_billing}"
        self.dead_legacy = f"http://127.0.0.1:{dead_legacy}"
        self.config = root / "gateway_config.yaml"
        self.services_yaml = (
            "services:\n"
            f"  orders:\n    url: \"{healthy}\"\n    auth: false\n    retries: 0\n"
            f"  accounts:\n    url: \"{healthy}\"\n    rate_limit: 500\n"
            f"  billing:\n    urls: [\"{healthy}\", \"{self.dead_billing}\"]\n"
            "    auth: false\n    retries: 0\n"
            f"  legacy:\n    url: \"{self.dead_legacy}\"\n    auth: false\n    retries: 0\n"
        )
        self.write_settings("")
        key, cert = _make_cert(root)
        self.port, self.admin_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin = f"https://localhost:{self.admin_port}"
        self.log = root / "gateway.log"
        env = dict(os.environ, MASTER_KEY=MASTER, DATABASE_URL=f"sqlite:///{root}/keys.db")
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "apigw", "--config", str(self.config),
                 "--port", f"tcp:{self.port}:interface=127.0.0.1",
                 "--admin-port", f"ssl:{self.admin_port}:interface=127.0.0.1:"
                                 f"privateKey={key}:certKey={cert}"],
                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_for_port(self.port, proc=self.process)
        wait_for_port(self.admin_port, proc=self.process)

    def write_settings(self, extra):
        self.config.write_text(
            self.services_yaml
            + "settings:\n  breaker_failure_threshold: 2\n  breaker_min_requests: 1\n"
            + f"  breaker_recovery_time: {RECOVERY_S}\n"
            + extra)

    def status(self):
        code, body = request(self.admin + "/admin/status", {"X-Master-Key": MASTER})
        assert code == 200, body
        return {s["name"]: s for s in json.loads(body)["services"]}

    def breaker(self, service, url):
        (target,) = [t for t in self.status()[service]["targets"] if t["url"] == url]
        return target["breaker"]

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.upstream.shutdown()
        self.upstream.server_close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = Gateway(tmp_path_factory.mktemp("admin-ui"))
    try:
        # Opened now; half_open once RECOVERY_S have passed (test_services...).
        for _ in range(2):
            assert request(gw.base + "/legacy/x")[0] == 502
        for path in ["/orders/a", "/orders/slow", "/orders/b", "/orders/fail", "/accounts/x"] * 4:
            request(gw.base + path)
        yield gw
    finally:
        gw.stop()
        assert_no_secrets(gw.log.read_text(errors="replace"), "the gateway's log")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1366,1000",
                 "--ignore-certificate-errors",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.requested = []
    try:
        yield driver
    finally:
        driver.quit()


def note_requests(driver):
    """Every URL the browser asked for since the last call (CDP network events)."""
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            driver.requested.append(message["params"]["request"]["url"])


def screenshot(driver, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))
    note_requests(driver)


def wait(driver, condition, timeout_s=15, what="the page"):
    try:
        # The page replaces its tables on every refresh.
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1,
                             ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: condition(d))
    except TimeoutException:
        screenshot(driver, "failure.png")
        raise AssertionError(f"{what} did not happen within {timeout_s}s") from None


def visible(driver, element_id):
    return driver.find_element(By.ID, element_id).is_displayed()


def log_in(driver, gateway, key=MASTER):
    driver.get(gateway.admin + "/admin/ui/")
    wait(driver, lambda d: visible(d, "login-view") or visible(d, "app-view"))
    if visible(driver, "app-view"):
        return
    field = driver.find_element(By.ID, "master-key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "login-button").click()


def session_cookie(driver):
    return driver.get_cookie("apigw_admin_session")


# --- login ---------------------------------------------------------------------

def test_wrong_key_is_refused(gateway, browser):
    """When the master key typed is wrong, the login form says so and no cookie is set."""
    browser.get(gateway.admin + "/admin/ui/")
    wait(browser, lambda d: visible(d, "login-view"), what="the login form")
    screenshot(browser, "login.png")
    log_in(browser, gateway, key="not-the-master-key")
    wait(browser, lambda d: visible(d, "login-error"), what="the login error")
    assert "wrong master key" in browser.find_element(By.ID, "login-error").text
    assert not visible(browser, "app-view")
    assert session_cookie(browser) is None
    screenshot(browser, "login-wrong-key.png")


def test_login_sets_a_secure_http_only_strict_cookie(gateway, browser):
    """When the right key is typed on a TLS listener, the page opens and the cookie is Secure, HttpOnly, SameSite=Strict and expiring."""
    log_in(browser, gateway)
    wait(browser, lambda d: visible(d, "app-view"), what="the app view")
    cookie = session_cookie(browser)
    assert cookie["httpOnly"] is True and cookie["secure"] is True
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    assert 7 * 3600 < cookie["expiry"] - time.time() <= 8 * 3600
    assert MASTER not in cookie["value"]
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly
    note_requests(browser)


# --- services ------------------------------------------------------------------

def _badge(driver, service, url):
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-service="{service}"]')
    for item in row.find_elements(By.CSS_SELECTOR, "li"):
        if item.get_attribute("data-target") == url:
            return item.find_element(By.CSS_SELECTOR, ".badge").get_attribute("data-breaker")
    return None


def test_services_show_targets_breaker_states_and_traffic(gateway, browser):
    """When targets fail, the page shows open and half-open breakers next to closed ones, with each service's traffic, refreshed by itself."""
    deadline = time.monotonic() + RECOVERY_S + 20
    while gateway.breaker("legacy", gateway.dead_legacy) != "half_open":
        assert time.monotonic() < deadline, "legacy's breaker never went half_open"
        time.sleep(0.2)
    # Now trip billing's dead target: open for the next RECOVERY_S seconds.
    for _ in range(4):
        request(gateway.base + "/billing/x")
    assert gateway.breaker("billing", gateway.dead_billing) == "open"
    log_in(browser, gateway)
    # No reload: the page's own refresh has to bring the new states in.
    wait(browser, lambda d: _badge(d, "billing", gateway.dead_billing) == "open"
         and _badge(d, "legacy", gateway.dead_legacy) == "half_open",
         timeout_s=RECOVERY_S - 2, what="the open and half-open breakers")
    healthy = f"http://127.0.0.1:{gateway.upstream.server_port}"
    assert _badge(browser, "billing", healthy) == "closed"
    assert _badge(browser, "orders", healthy) == "closed"
    orders = browser.find_element(By.CSS_SELECTOR, 'tr[data-service="orders"]')
    assert float(orders.find_element(By.CSS_SELECTOR, ".requests").text) > 0
    assert "%" in orders.find_element(By.CSS_SELECTOR, ".errors").text
    assert orders.find_element(By.CSS_SELECTOR, ".errors .bad-number")  # the /fail answers
    assert orders.find_element(By.CSS_SELECTOR, ".p99").text.endswith(" ms")
    assert "API key" in browser.find_element(By.CSS_SELECTOR, 'tr[data-service="accounts"]').text
    screenshot(browser, "services.png")


# --- keys ----------------------------------------------------------------------

def _key_row(driver, owner):
    for row in driver.find_elements(By.CSS_SELECTOR, "#keys tbody tr"):
        cells = row.find_elements(By.CSS_SELECTOR, "td.owner")
        if cells and cells[0].text == owner:
            return row
    return None


def test_create_copy_and_revoke_a_key(gateway, browser):
    """When a key is created it is shown once and copies to the clipboard; it works until revoked from the page."""
    log_in(browser, gateway)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#service-choices input"),
         what="the service choices")
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": gateway.admin,
        "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    browser.find_element(By.ID, "owner").send_keys("billing-team")
    browser.find_element(By.CSS_SELECTOR, '#service-choices input[value="accounts"]').click()
    browser.find_element(By.ID, "rate-limit").send_keys("50")
    browser.find_element(By.ID, "create").click()
    wait(browser, lambda d: visible(d, "new-key"), what="the new key")
    raw_key = browser.find_element(By.ID, "new-key-value").get_attribute("value")
    assert raw_key.startswith("agw_") and len(raw_key) > 40
    browser.find_element(By.ID, "copy").click()
    wait(browser, lambda d: visible(d, "copied"), what="the copy confirmation")
    pasted = browser.execute_async_script(
        "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done('ERR ' + e));")
    assert pasted == raw_key
    wait(browser, lambda d: _key_row(d, "billing-team") is not None, what="the key's row")
    row = _key_row(browser, "billing-team")
    assert "accounts" in row.text and "50" in row.text and "active" in row.text
    assert raw_key not in browser.find_element(By.ID, "keys").text  # only the prefix
    screenshot(browser, "new-key.png")
    assert request(gateway.base + "/accounts/x", {"X-API-Key": raw_key})[0] == 200

    browser.find_element(By.ID, "dismiss").click()
    assert not visible(browser, "new-key")
    revoke = row.find_element(By.CSS_SELECTOR, "button.danger")
    revoke.click()
    assert revoke.text == "Confirm revoke"
    revoke.click()
    wait(browser, lambda d: "revoked" in _key_row(d, "billing-team").text, what="the revocation")
    assert request(gateway.base + "/accounts/x", {"X-API-Key": raw_key})[0] == 401
    screenshot(browser, "keys-revoked.png")


# --- CSRF and logout -------------------------------------------------------------

def test_state_changes_without_the_csrf_token_are_refused(gateway, browser):
    """When the page's own origin posts with the cookie but without X-CSRF-Token, the admin API refuses."""
    log_in(browser, gateway)
    wait(browser, lambda d: visible(d, "app-view"))
    status, text = browser.execute_async_script("""
        const done = arguments[0];
        fetch("../keys", {method: "POST", credentials: "same-origin",
                          headers: {"Content-Type": "application/json"},
                          body: JSON.stringify({owner: "csrf-victim"})})
          .then(r => r.text().then(t => done([r.status, t])), e => done([0, String(e)]));
    """)
    assert status == 403 and "X-CSRF-Token" in json.loads(text)["error"]
    cookie = session_cookie(browser)["value"]
    code, _ = request(gateway.admin + "/admin/keys", method="POST", body={"owner": "csrf-victim"},
                      headers={"Cookie": f"apigw_admin_session={cookie}"})
    assert code == 403
    code, body = request(gateway.admin + "/admin/keys", {"X-Master-Key": MASTER})
    assert "csrf-victim" not in body.decode()
    note_requests(browser)


def test_logout_ends_the_session(gateway, browser):
    """When the operator logs out, the page returns to the login form and the old cookie opens nothing."""
    log_in(browser, gateway)
    wait(browser, lambda d: visible(d, "app-view"))
    cookie = session_cookie(browser)["value"]
    assert request(gateway.admin + "/admin/keys",
                   {"Cookie": f"apigw_admin_session={cookie}"})[0] == 200
    browser.find_element(By.ID, "logout").click()
    wait(browser, lambda d: visible(d, "login-view"), what="the login form after logout")
    assert session_cookie(browser) is None
    assert "signed out" in browser.find_element(By.ID, "login-error").text
    code, body = request(gateway.admin + "/admin/keys",
                         {"Cookie": f"apigw_admin_session={cookie}"})
    assert code == 403 and "ended" in json.loads(body)["error"]
    browser.refresh()
    wait(browser, lambda d: visible(d, "login-view"), what="the login form after a reload")
    screenshot(browser, "logged-out.png")


# --- admin_allow, then the whole session's requests ---------------------------------

def test_outside_admin_allow_the_page_is_refused(gateway, browser):
    """When admin_allow no longer covers the browser's address, the page and its API answer 403."""
    log_in(browser, gateway)
    wait(browser, lambda d: visible(d, "app-view"))
    gateway.write_settings('  admin_allow: ["10.0.0.0/8"]\n')
    gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while request(gateway.admin + "/admin/status", {"X-Master-Key": MASTER})[0] != 403:
        assert time.monotonic() < deadline, "the reload did not apply"
        time.sleep(0.1)
    browser.get(gateway.admin + "/admin/ui/")
    assert "may not use the admin API" in browser.find_element(By.TAG_NAME, "body").text
    cookie = session_cookie(browser)["value"]
    assert request(gateway.admin + "/admin/keys",
                   {"Cookie": f"apigw_admin_session={cookie}"})[0] == 403
    screenshot(browser, "outside-admin-allow.png")


def test_no_request_left_the_gateways_origin(gateway, browser):
    """When every request the browser made in this session is listed, all went to the gateway's own origin."""
    note_requests(browser)
    assert len(browser.requested) > 10, browser.requested
    # chrome:// is the browser's own start page, before the first navigation.
    network = [u for u in browser.requested if not u.startswith(("chrome:", "data:"))]
    foreign = [u for u in network if not u.startswith(gateway.admin + "/")]
    assert foreign == []
    assert any(u.endswith("/admin/ui/app.js") for u in browser.requested)
