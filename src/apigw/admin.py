"""The admin API: a Klein app issuing and revoking API keys.

Every call passes two gates before routing matters: the caller's address
must be inside `admin_allow`, and `X-Master-Key` must match MASTER_KEY
(compared in constant time). Without MASTER_KEY every call is refused.
Instead of the header, the admin web page (apigw.admin_ui) sends its
session cookie, plus its CSRF token on every call that changes state
(apigw.admin_session).
"""

import hmac
import json
import unicodedata

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from werkzeug.exceptions import BadHost, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from apigw.addresses import allowed
from apigw.admin_session import COOKIE, SAFE_METHODS, Sessions
from apigw.errors import error_body, request_id_for
from apigw.keys import KeyStoreUnavailable

MAX_BODY_BYTES = 64 * 1024
MAX_OWNER_CHARS = 120
MAX_EXPIRES_IN_S = 100 * 365 * 24 * 3600  # keeps expires_at a printable date
MAX_RATE_LIMIT = 2**31 - 1
KEY_FIELDS = ("owner", "services", "expires_in", "rate_limit")


class AdminError(Exception):
    """Answered as JSON `{"error": message, "request_id": ...}`."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class AdminAPI:
    app = Klein()
    log = Logger()

    def __init__(self, store, authenticator, master_key, admin_allow, service_names,
                 reload=None, clock=None, status=None, key_changed=None):
        """`admin_allow`: networks, or a callable returning the current ones;
        `service_names`: callable returning the configured service names;
        `reload`: callable (may return a Deferred) giving the new config;
        `status`: callable returning GET /admin/status's answer;
        `key_changed(key_id)`: after a key changed here (by default this
        process's cache forgets it; the gateway also tells its siblings)."""
        self._store = store
        self._authenticator = authenticator
        # None: every call is refused (apigw.startup logs that once).
        self._master_key = master_key.encode("utf-8") if master_key else None
        self._admin_allow = admin_allow if callable(admin_allow) else (lambda: admin_allow)
        self._service_names = service_names
        self._reload = reload
        self._key_changed = key_changed if key_changed is not None else (
            lambda key_id: self._authenticator.invalidate(key_id))
        self._clock = clock if clock is not None else _wall_clock()
        self._status = status
        self.sessions = Sessions(self._master_key, store, self._clock)

    def resource(self):
        """Mount as the child `admin` of the public root."""
        # Here, not at the top: the page answers with this module's helpers.
        from apigw.admin_ui import AdminUI

        return _UrlGate(self, self.app.resource(), AdminUI(self).resource())

    def root_resource(self):
        """The whole tree of the --admin-port listener: /admin/... and JSON 404s."""
        root = _NotFoundRoot()
        root.putChild(b"admin", self.resource())
        return root

    # --- gates and answers ----------------------------------------------------

    def address_refusal(self, request):
        """Why the caller's address may not use the admin API, else None;
        then why the admin API is off altogether, else None."""
        if not allowed(request.getClientAddress(), self._admin_allow()):
            return "this address may not use the admin API"
        if self._master_key is None:
            return "the admin API is disabled because MASTER_KEY is not set"
        return None

    def master_key_matches(self, given):
        given = given.encode("utf-8") if isinstance(given, str) else given
        return self._master_key is not None and hmac.compare_digest(given, self._master_key)

    def _refusal(self, request):
        refusal = self.address_refusal(request)
        if refusal is not None:
            return refusal
        given = request.getHeader(b"x-master-key")
        if given is None:
            return self._session_refusal(request)
        if not self.master_key_matches(given):
            return "wrong X-Master-Key"
        return None

    def _session_refusal(self, request):
        if request.getCookie(COOKIE) is None:
            return "missing X-Master-Key header"
        session = self.sessions.from_request(request)
        if session is None:
            return "the admin page session has expired or is not valid; log in again"
        if request.method not in SAFE_METHODS and not self.sessions.csrf_ok(session, request):
            return "this call changes state and needs the session's X-CSRF-Token header"
        return None

    async def _gate(self, request):
        refusal = self._refusal(request)
        if refusal is not None:
            raise AdminError(403, refusal)
        if request.getHeader(b"x-master-key") is None:
            # Signed and unexpired, but it may have been logged out since.
            if await self.sessions.ended(self.sessions.from_request(request)):
                raise AdminError(403, "the admin page session has ended; log in again")

    @app.handle_errors(AdminError)
    def _admin_error(self, request, failure):
        return _answer_error(request, failure.value.status, failure.value.message)

    # RequestRedirect: werkzeug's answer to a doubled slash (/keys/%2Fx).
    @app.handle_errors(NotFound, MethodNotAllowed, RequestRedirect)
    def _routing_error(self, request, failure):
        # The gates come first so that no one learns the routes without the key.
        refusal = self._refusal(request)
        if refusal is not None:
            return _answer_error(request, 403, refusal)
        if failure.check(MethodNotAllowed):
            allowed = ", ".join(failure.value.valid_methods or ())
            request.setHeader(b"allow", allowed.encode("ascii"))
            return _answer_error(request, 405, f"method not allowed here (allowed: {allowed})")
        return _answer_error(request, 404, "no admin endpoint at this path")

    @app.handle_errors(KeyStoreUnavailable)
    def _store_down(self, request, failure):
        return _answer_error(request, 503, "the key store is unavailable; try again shortly")

    @app.handle_errors(Exception)
    def _unexpected(self, request, failure):
        self.log.failure("admin {method} {uri}", failure, method=request.method,
                         uri=request.uri)
        return _answer_error(request, 500, "internal error in the admin API")

    # --- endpoints --------------------------------------------------------------

    @app.route("/generate_key", methods=["POST"])
    @app.route("/keys", methods=["POST"])
    async def create_key(self, request):
        await self._gate(request)
        spec = key_spec(_json_body(request), set(self._service_names()))
        record, raw_key = await self._store.create_key(**spec)
        self.log.info("admin: created API key {id} ({prefix}...) for {owner}",
                      id=record.id, prefix=record.prefix, owner=record.owner)
        return _answer(request, 201, created_key_json(record, raw_key, self._clock.seconds()))

    @app.route("/keys", methods=["GET"])
    async def list_keys(self, request):
        await self._gate(request)
        now = self._clock.seconds()
        records = await self._store.list_keys()
        return _answer(request, 200, key_list_json(records, now))

    @app.route("/keys/<string:key_id>", methods=["GET"])
    async def get_key(self, request, key_id):
        await self._gate(request)
        record = await self._store.get_key(key_id)
        if record is None:
            raise AdminError(404, "no API key has this id")
        return _answer(request, 200, record.to_json(self._clock.seconds()))

    @app.route("/keys/<string:key_id>", methods=["DELETE"])
    async def revoke_key(self, request, key_id):
        await self._gate(request)
        if not await self._store.revoke_key(key_id):
            raise AdminError(404, "no API key has this id")
        # At once here; other processes hear of it from the database's
        # notification or their supervisor (docs/revocation.md).
        self._key_changed(key_id)
        self.log.info("admin: revoked API key {id}", id=key_id)
        record = await self._store.get_key(key_id)
        return _answer(request, 200, record.to_json(self._clock.seconds()))

    @app.route("/reload", methods=["POST"])
    async def reload(self, request):
        await self._gate(request)
        if self._reload is None:
            raise AdminError(503, "reloading is not available in this process")
        try:
            config = await defer.maybeDeferred(self._reload)
        except Exception as e:  # the reload reports what is wrong; old config kept
            raise AdminError(400, f"reload failed, old configuration kept: {e}") from None
        if isinstance(config, (list, tuple)):
            names = sorted(config)
        elif getattr(config, "services", None) is not None:
            names = sorted(config.services)
        else:
            names = sorted(self._service_names())
        return _answer(request, 200, {"status": "reloaded", "services": names})

    @app.route("/status", methods=["GET"])
    async def status(self, request):
        await self._gate(request)
        if self._status is None:
            raise AdminError(503, "the status is not available in this process")
        return _answer(request, 200, await defer.maybeDeferred(self._status))

    @app.route("/openapi.json", methods=["GET"])
    async def openapi(self, request):
        await self._gate(request)
        # Here, not at the top: the document reads this module's limits.
        from apigw.openapi import rendered

        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-request-id", _request_id(request).encode("ascii"))
        return rendered()


# --- the JSON shapes, shared with the apigw command -----------------------------

def created_key_json(record, raw_key, now):
    """The answer to POST /admin/keys: the only time the raw key is shown."""
    view = record.to_json(now)
    body = {"id": record.id, "api_key": raw_key}
    body.update({k: view[k] for k in
                 ("owner", "prefix", "services", "expires_at", "rate_limit", "created_at")})
    return body


def key_list_json(records, now):
    """The answer to GET /admin/keys."""
    return {"keys": [r.to_json(now) for r in records]}


# --- helpers -------------------------------------------------------------------

def _wall_clock():
    from twisted.internet import reactor

    return reactor


def _request_id(request):
    # The gateway's requests name themselves; a bare twisted.web request
    # (the admin app served on its own) gets one for this answer.
    return getattr(request, "request_id", None) or request_id_for(request)


def _answer(request, status, payload):
    body = json.dumps(payload).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"x-request-id", _request_id(request).encode("ascii"))
    # A new key appears in this body exactly once; no cache may keep it.
    request.setHeader(b"cache-control", b"no-store")
    return body


def _answer_error(request, status, message):
    request_id = _request_id(request)
    body = error_body(message, request_id)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"x-request-id", request_id.encode("ascii"))
    return body


class _UrlGate(Resource):
    """Klein answers a URL, Host or method that is not UTF-8 with an HTML 400,
    and a Host such as `a..b` with an HTML 500, logging a traceback for each:
    a free log flood for anyone. Answer these like every other admin error,
    gates first."""

    isLeaf = True
    # What the pipeline counts these requests as.
    account_label = "admin"

    def __init__(self, api, klein_resource, page_resource):
        super().__init__()
        self._api = api
        self._klein = klein_resource
        self._page = page_resource

    def render(self, request):
        try:
            request.getRequestHostname().decode("utf-8")
            request.method.decode("utf-8")
            b"/".join(request.prepath + request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            problem = "the URL is not valid UTF-8"
        else:
            try:
                return self._route(request)
            except BadHost:  # raised before anything is routed or written
                problem = "the Host header is not a valid host name"
        refusal = self._api._refusal(request)
        if refusal is not None:
            return _answer_error(request, 403, refusal)
        return _answer_error(request, 400, problem)


    def _route(self, request):
        if request.postpath[:1] != [b"ui"]:
            return self._klein.render(request)
        if request.postpath == [b"ui"]:
            # The page's relative links need the trailing slash.
            request.setResponseCode(301)
            request.setHeader(b"location", b"ui/")
            return b""
        request.prepath.append(request.postpath.pop(0))
        return self._page.render(request)


class _NotFoundRoot(Resource):
    def getChild(self, name, request):
        return self

    def render(self, request):
        return _answer_error(request, 404, "no admin endpoint at this path")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _json_body(request):
    raw = request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise AdminError(400, "the request body is larger than 64 KiB")
    if not raw.strip():
        raise AdminError(400, 'the request body must be a JSON object such as {"owner": "..."}')
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise AdminError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        # json decodes nested arrays recursively: 64 KiB of "[" is enough.
        raise AdminError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise AdminError(400, f"the request body must be a JSON object, not {_kind(body)}")
    return body


def _kind(value):
    return {
        type(None): "null", bool: "a boolean", int: "a number", float: "a number",
        str: "a string", list: "a list", dict: "an object",
    }.get(type(value), type(value).__name__)


def key_spec(body, known_services):
    """Checked create_key arguments from a request body, or AdminError 400."""
    unknown = sorted(set(body) - set(KEY_FIELDS))
    if unknown:
        raise AdminError(400, f"unknown field {unknown[0]!r} (known: {', '.join(KEY_FIELDS)})")
    owner = body.get("owner")
    if not isinstance(owner, str):
        raise AdminError(400, f"owner must be a string, not {_kind(owner)}")
    if not owner.strip():
        raise AdminError(400, "owner must not be empty")
    if len(owner) > MAX_OWNER_CHARS:
        raise AdminError(400, f"owner must be at most {MAX_OWNER_CHARS} characters")
    if any(unicodedata.category(c) == "Cs" for c in owner):
        # A lone surrogate ("\ud800" in JSON) cannot be stored or sent as UTF-8.
        raise AdminError(400, "owner must be valid Unicode text")
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in owner):
        # The owner travels upstream in X-Consumer-Username and into log
        # lines: no line breaks (\n, NEL, U+2028) or other controls.
        raise AdminError(400, "owner must not contain control characters")

    services = body.get("services")
    if services is not None:
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise AdminError(400, "services must be a list of service names")
        if not services:
            raise AdminError(400, "services must not be empty; leave it out to allow every service")
        missing = [s for s in services if s not in known_services]
        if missing:
            raise AdminError(400, f"no service named {missing[0]!r} is configured")
        services = list(dict.fromkeys(services))

    expires_in = body.get("expires_in")
    if expires_in is not None:
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
            raise AdminError(400, f"expires_in must be a number of seconds, not {_kind(expires_in)}")
        if not 0 < expires_in <= MAX_EXPIRES_IN_S:
            raise AdminError(400, f"expires_in must be more than 0 and at most "
                                  f"{MAX_EXPIRES_IN_S} seconds")

    rate_limit = body.get("rate_limit")
    if rate_limit is not None:
        if isinstance(rate_limit, bool) or not isinstance(rate_limit, int):
            raise AdminError(400, f"rate_limit must be an integer, not {_kind(rate_limit)}")
        if not 0 < rate_limit <= MAX_RATE_LIMIT:
            raise AdminError(400, f"rate_limit must be a positive integer up to {MAX_RATE_LIMIT}")
    return {"owner": owner, "services": services, "expires_in_s": expires_in,
            "rate_limit": rate_limit}
