"""The admin web page, served under /admin/ui/ by the gateway itself.

Plain HTML, CSS and JavaScript shipped in this package (apigw/admin_ui/);
the Content-Security-Policy lets the page load nothing from anywhere but
this origin, so it works offline and leaks nothing to a CDN. Login trades
the master key for a session cookie (apigw.admin_session); the page then
reads and changes everything through the admin API itself (GET
/admin/status, /admin/keys, ...) with that cookie and its CSRF token.
Every answer here passes the admin API's address gate first.
"""

from importlib import resources

from klein import Klein
from twisted.logger import Logger
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from apigw.admin import AdminError, _answer, _answer_error, _json_body
from apigw.keys import KeyStoreUnavailable

ASSETS = {
    "index.html": b"text/html; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
}

SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
}


class AdminUI:
    app = Klein()
    log = Logger()

    def __init__(self, api):
        self._api = api
        self._sessions = api.sessions
        folder = resources.files("apigw") / "admin_ui"
        self._assets = {name: (folder / name).read_bytes() for name in ASSETS}

    def resource(self):
        return _Hardened(self.app.resource())

    def _gate(self, request):
        refusal = self._api.address_refusal(request)
        if refusal is not None:
            raise AdminError(403, refusal)

    def _session_json(self, session):
        return {"csrf_token": self._sessions.csrf_token(session),
                "expires_at": session.expires_at}

    @app.handle_errors(AdminError)
    def _error(self, request, failure):
        return _answer_error(request, failure.value.status, failure.value.message)

    @app.handle_errors(NotFound, MethodNotAllowed, RequestRedirect)
    def _routing_error(self, request, failure):
        refusal = self._api.address_refusal(request)
        if refusal is not None:
            return _answer_error(request, 403, refusal)
        if failure.check(MethodNotAllowed):
            return _answer_error(request, 405, "method not allowed here")
        return _answer_error(request, 404, "nothing of the admin page at this path")

    @app.handle_errors(KeyStoreUnavailable)
    def _store_down(self, request, failure):
        return _answer_error(request, 503, "the key store is unavailable; try again shortly")

    @app.handle_errors(Exception)
    def _unexpected(self, request, failure):
        self.log.failure("admin page {method} {uri}", failure, method=request.method,
                         uri=request.uri)
        return _answer_error(request, 500, "internal error in the admin page")

    # --- the files --------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def page(self, request):
        return self._file(request, "index.html")

    @app.route("/<string:name>", methods=["GET"])
    def asset(self, request, name):
        if name == "index.html" or name not in ASSETS:
            self._gate(request)
            raise AdminError(404, "nothing of the admin page at this path")
        return self._file(request, name)

    def _file(self, request, name):
        self._gate(request)
        request.setHeader(b"content-type", ASSETS[name])
        # Revalidated on every load: a new apigw must not run an old script.
        request.setHeader(b"cache-control", b"no-cache")
        return self._assets[name]

    # --- the session ------------------------------------------------------------

    @app.route("/session", methods=["GET"])
    async def session(self, request):
        """The CSRF token of a live session, for a page (re)loaded after login."""
        self._gate(request)
        session = self._sessions.from_request(request)
        if session is None or await self._sessions.ended(session):
            raise AdminError(403, "not logged in")
        return _answer(request, 200, self._session_json(session))

    @app.route("/login", methods=["POST"])
    async def login(self, request):
        self._gate(request)
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            # A cross-site form cannot send JSON without a CORS preflight,
            # which this origin never grants.
            raise AdminError(400, "the login must be a JSON body: {\"master_key\": \"...\"}")
        given = _json_body(request).get("master_key")
        if not isinstance(given, str) or not given:
            raise AdminError(400, "master_key must be a non-empty string")
        client = getattr(request.getClientAddress(), "host", "unix")
        if not self._api.master_key_matches(given):
            self.log.warn("admin page: wrong master key from {client}", client=client)
            raise AdminError(403, "wrong master key")
        session, value = self._sessions.issue()
        self._sessions.set_cookie(request, value, session.expires_at)
        self.log.info("admin page: login from {client}", client=client)
        return _answer(request, 200, self._session_json(session))

    @app.route("/logout", methods=["POST"])
    async def logout(self, request):
        self._gate(request)
        session = self._sessions.from_request(request)
        if session is not None:
            if not self._sessions.csrf_ok(session, request):
                raise AdminError(403, "logging out needs the session's X-CSRF-Token header")
            await self._sessions.end(session)
        self._sessions.clear_cookie(request)
        return _answer(request, 200, {"status": "logged out"})


class _Hardened(Resource):
    """Every answer of the page, errors included, with headers that keep
    it from loading foreign content or being framed."""

    isLeaf = True

    def __init__(self, klein_resource):
        super().__init__()
        self._klein = klein_resource

    def render(self, request):
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return self._klein.render(request)
