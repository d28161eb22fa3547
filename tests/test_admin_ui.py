"""The admin page's server side in memory (StubTreq, real SQLite store):
login, the session cookie, CSRF, logout across processes, the gates, and
GET /admin/status. The browser itself: test_admin_ui_browser.py."""

import ipaddress
import json

import pytest_twisted
from twisted.web.resource import Resource

from apigw.admin import AdminAPI
from apigw.admin_session import COOKIE, LIFETIME_S
from apigw.keys import Authenticator
from test_admin import LOOPBACK, MASTER, SERVICES, Client, clock, store  # noqa: F401 (fixtures)


class Page(Client):
    """Raw answers, cookies kept by hand as a browser would."""

    def __init__(self, resource):
        super().__init__(resource)
        self.cookie = None

    async def send(self, method, path, body=None, headers=None, content_type="application/json"):
        h = dict(headers or {})
        if content_type and body is not None:
            h["Content-Type"] = content_type
        if self.cookie is not None:
            h["Cookie"] = f"{COOKIE.decode()}={self.cookie}"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        d = self.stub.request(method, "http://localhost:8000" + path, headers=h, data=data,
                              allow_redirects=False)
        response = await self._settle(d)
        content = await self._settle(self.stub.content(response))
        for header in response.headers.getRawHeaders("set-cookie", []):
            name, _, rest = header.partition("=")
            if name == COOKIE.decode():
                self.cookie = rest.split(";")[0] or None
        return response, content

    async def login(self, key=MASTER):
        response, content = await self.send("POST", "/admin/ui/login", {"master_key": key})
        return response, json.loads(content)


def make(store, clock, admin_allow=LOOPBACK, status=None):
    api = AdminAPI(store, Authenticator(store, clock, cache_ttl_s=10), MASTER, admin_allow,
                   lambda: SERVICES, clock=clock, status=status)
    root = Resource()
    root.putChild(b"admin", api.resource())
    return root


@pytest_twisted.ensureDeferred
async def test_page_and_assets_are_served_with_a_strict_policy(store, clock):
    """When the page and its files are fetched, they come with types and a same-origin-only CSP."""
    page = Page(make(store, clock))
    for path, kind in [("/admin/ui/", "text/html"), ("/admin/ui/app.js", "text/javascript"),
                       ("/admin/ui/app.css", "text/css")]:
        response, content = await page.send("GET", path)
        assert response.code == 200, path
        assert response.headers.getRawHeaders("content-type")[0].startswith(kind)
        csp = response.headers.getRawHeaders("content-security-policy")[0]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert b"http://" not in content.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in content
    response, _ = await page.send("GET", "/admin/ui")
    assert response.code == 301 and response.headers.getRawHeaders("location") == ["ui/"]
    response, _ = await page.send("GET", "/admin/ui/nothing.js")
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_login_sets_a_strict_expiring_cookie(store, clock):
    """When the master key is right, the cookie is HttpOnly, SameSite=Strict, scoped to /admin and expiring."""
    page = Page(make(store, clock))
    response, body = await page.login()
    assert response.code == 200 and body["csrf_token"]
    assert body["expires_at"] == int(clock.seconds()) + LIFETIME_S
    (cookie,) = response.headers.getRawHeaders("set-cookie")
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age", "expires"} <= attributes
    assert "SameSite=strict" in cookie and "Path=/admin" in cookie
    assert "Secure" not in cookie  # plain HTTP here; TLS: test_admin_ui_browser
    assert MASTER not in cookie


@pytest_twisted.ensureDeferred
async def test_wrong_key_or_form_body_gets_no_session(store, clock):
    """When the key is wrong, or the login is not JSON, no cookie is set."""
    page = Page(make(store, clock))
    response, body = await page.login("not-the-key")
    assert response.code == 403 and body["error"] == "wrong master key"
    assert not response.headers.getRawHeaders("set-cookie")
    response, _ = await page.send("POST", "/admin/ui/login", b"master_key=" + MASTER.encode(),
                                  content_type="application/x-www-form-urlencoded")
    assert response.code == 400 and page.cookie is None


@pytest_twisted.ensureDeferred
async def test_the_cookie_opens_the_json_api_and_state_changes_need_csrf(store, clock):
    """When the page's cookie is sent, GETs work; a POST or DELETE without the CSRF token is 403."""
    page = Page(make(store, clock))
    _, session = await page.login()
    response, content = await page.send("GET", "/admin/keys")
    assert response.code == 200 and json.loads(content) == {"keys": []}
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        response, content = await page.send("POST", "/admin/keys", {"owner": "x"}, headers=headers)
        assert response.code == 403 and "X-CSRF-Token" in json.loads(content)["error"]
    assert await store.list_keys() == []
    token = {"X-CSRF-Token": session["csrf_token"]}
    response, content = await page.send("POST", "/admin/keys", {"owner": "x"}, headers=token)
    assert response.code == 201
    key_id = json.loads(content)["id"]
    response, _ = await page.send("DELETE", f"/admin/keys/{key_id}")
    assert response.code == 403
    response, _ = await page.send("DELETE", f"/admin/keys/{key_id}", headers=token)
    assert response.code == 200
    response, _ = await page.send("POST", "/admin/ui/logout")
    assert response.code == 403  # logout is a state change too


@pytest_twisted.ensureDeferred
async def test_logout_ends_the_session_on_every_process_sharing_the_store(store, clock):
    """When a session logs out on one process, another process with the same MASTER_KEY refuses its cookie."""
    first, second = Page(make(store, clock)), Page(make(store, clock))
    _, session = await first.login()
    second.cookie = first.cookie
    response, _ = await second.send("GET", "/admin/keys")
    assert response.code == 200  # signed, so any process accepts it
    stolen = first.cookie
    response, _ = await first.send("POST", "/admin/ui/logout",
                                   headers={"X-CSRF-Token": session["csrf_token"]})
    assert response.code == 200 and first.cookie is None
    response, content = await second.send("GET", "/admin/keys")
    assert response.code == 403 and "ended" in json.loads(content)["error"]
    second.cookie = stolen
    response, _ = await second.send("GET", "/admin/ui/session")
    assert response.code == 403


@pytest_twisted.ensureDeferred
async def test_expired_forged_or_foreign_cookies_are_refused(store, clock):
    """When the cookie has expired, is altered, or was signed under another MASTER_KEY, it opens nothing."""
    page = Page(make(store, clock))
    await page.login()
    good = page.cookie
    session_id, expires_at, signature = good.split(".")
    forged = [f"{session_id}.{int(expires_at) + 3600}.{signature}", f"x{good}", "garbage"]
    other = AdminAPI(store, None, "another-master-key", LOOPBACK, lambda: SERVICES, clock=clock)
    foreign_session, foreign = other.sessions.issue()
    for cookie in forged + [foreign]:
        page.cookie = cookie
        response, _ = await page.send("GET", "/admin/keys")
        assert response.code == 403, cookie
    page.cookie = good
    clock.advance(LIFETIME_S)
    response, content = await page.send("GET", "/admin/keys")
    assert response.code == 403 and "expired" in json.loads(content)["error"]


@pytest_twisted.ensureDeferred
async def test_outside_admin_allow_the_page_and_login_are_refused(store, clock):
    """When the caller is outside admin_allow, the page, its files and the login answer 403."""
    page = Page(make(store, clock, admin_allow=(ipaddress.ip_network("10.0.0.0/8"),)))
    for method, path in [("GET", "/admin/ui/"), ("GET", "/admin/ui/app.js"),
                         ("GET", "/admin/ui/session"), ("GET", "/admin/ui/nope")]:
        response, _ = await page.send(method, path)
        assert response.code == 403, path
    response, _ = await page.login()
    assert response.code == 403 and page.cookie is None


@pytest_twisted.ensureDeferred
async def test_status_needs_the_gates_and_answers_the_callable(store, clock):
    """When GET /admin/status is called with the master key, it answers what status() returns."""
    answer = {"generated_at": "x", "window_s": 0.0, "services": []}
    client = Client(make(store, clock, status=lambda: answer))
    response, body = await client.call("GET", "/admin/status")
    assert response.code == 200 and body == answer
    response, body = await client.call("GET", "/admin/status", key="wrong")
    assert response.code == 403
    response, body = await Client(make(store, clock)).call("GET", "/admin/status")
    assert response.code == 503


def test_cookie_is_secure_under_tls():
    """When the request came over TLS, the session cookie carries Secure; it is cleared the same way."""
    from twisted.internet.task import Clock
    from twisted.web.http import Request
    from twisted.web.test.requesthelper import DummyChannel

    from apigw.admin_session import Sessions

    sessions = Sessions(MASTER.encode(), None, Clock())
    request = Request(DummyChannel())
    request.isSecure = lambda: True
    session, value = sessions.issue()
    sessions.set_cookie(request, value, session.expires_at)
    sessions.clear_cookie(request)
    set_cookie, cleared = request.cookies
    assert b"; Secure" in set_cookie and b"; HttpOnly" in set_cookie
    assert b"Max-Age=0" in cleared and b"; Secure" in cleared
