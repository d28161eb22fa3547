"""Sessions of the admin web page: signed cookies, CSRF tokens, logout.

A session cookie carries its own id and expiry, signed with HMAC-SHA256
under a key derived from MASTER_KEY, so any gateway process can check it
alone: with --workers, or several nodes sharing MASTER_KEY, a login on one
is a login on all, and there is no session table to keep in step.

A signature cannot be taken back, so logout writes the session's id to
the key store's table of ended sessions (shared by every process, like
the keys) until the session would have expired anyway; every request made
with the cookie looks there. A list of ended sessions rather than one
rotating nonce because a nonce ends every operator's session at once.
Changing MASTER_KEY ends them all too: the signing key comes from it.

The CSRF token is an HMAC of the session id under a second derived key.
The page reads it from /admin/ui/session and sends it as X-CSRF-Token on
every call that changes something; another site can neither read it nor,
with SameSite=Strict, make the browser send the cookie.
"""

import base64
import hashlib
import hmac
import secrets

import attr
from twisted.web import http

COOKIE = b"apigw_admin_session"
COOKIE_PATH = b"/admin"
CSRF_HEADER = b"x-csrf-token"
# A working day: long enough for a page left open, short enough that a
# cookie left behind on a shared machine stops working by the next one.
LIFETIME_S = 8 * 3600
SAFE_METHODS = frozenset({b"GET", b"HEAD"})


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Session:
    id: str
    expires_at: int


def _derive(master_key, purpose):
    return hmac.new(master_key, b"apigw admin page " + purpose, hashlib.sha256).digest()


def _b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class Sessions:
    """Issues and checks the page's sessions; `master_key` is bytes or None
    (then no session is ever valid), `store` a KeyStore (or None in tests
    that never log out across processes)."""

    def __init__(self, master_key, store, clock, lifetime_s=LIFETIME_S):
        self._signing = _derive(master_key, b"session") if master_key else None
        self._csrf = _derive(master_key, b"csrf") if master_key else None
        self._store = store
        self._clock = clock
        self.lifetime_s = lifetime_s
        # Logouts seen by this process: honoured even while the store is down.
        self._ended_here = {}

    def issue(self):
        """A new session and its cookie value."""
        session = Session(secrets.token_urlsafe(18),
                          int(self._clock.seconds()) + int(self.lifetime_s))
        return session, f"{session.id}.{session.expires_at}.{self._sign(session)}"

    def _sign(self, session):
        text = f"{session.id}.{session.expires_at}".encode("ascii")
        return _b64(hmac.new(self._signing, text, hashlib.sha256).digest())

    def from_request(self, request):
        """The request's unexpired, correctly signed session, else None. Whether
        it has been ended by a logout is `ended()`'s question."""
        raw = request.getCookie(COOKIE)
        if raw is None or self._signing is None:
            return None
        try:
            session_id, expires_at, signature = raw.decode("ascii").split(".")
            session = Session(session_id, int(expires_at))
        except (UnicodeDecodeError, ValueError):
            return None
        if not hmac.compare_digest(signature, self._sign(session)):
            return None
        if session.expires_at <= self._clock.seconds():
            return None
        return session

    def csrf_token(self, session):
        return _b64(hmac.new(self._csrf, session.id.encode("ascii"), hashlib.sha256).digest())

    def csrf_ok(self, session, request):
        given = request.getHeader(CSRF_HEADER)
        if given is None:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace") if isinstance(given, str)
                                   else given, self.csrf_token(session).encode("ascii"))

    async def ended(self, session):
        """True once a logout ended it, here or on any process sharing the store."""
        if session.id in self._ended_here:
            return True
        if self._store is None:
            return False
        return await self._store.session_ended(session.id)

    async def end(self, session):
        now = self._clock.seconds()
        self._ended_here = {i: t for i, t in self._ended_here.items() if t > now}
        self._ended_here[session.id] = session.expires_at
        if self._store is not None:
            await self._store.end_session(session.id, session.expires_at)

    def set_cookie(self, request, value, expires_at):
        request.addCookie(
            COOKIE, value.encode("ascii"), path=COOKIE_PATH,
            max_age=str(int(expires_at - self._clock.seconds())).encode("ascii"),
            expires=http.datetimeToString(expires_at),
            # Under TLS the cookie must never travel in clear text.
            secure=request.isSecure(), httpOnly=True, sameSite="strict",
        )

    def clear_cookie(self, request):
        request.addCookie(COOKIE, b"", path=COOKIE_PATH, max_age=b"0",
                          expires=http.datetimeToString(0),
                          secure=request.isSecure(), httpOnly=True, sameSite="strict")
