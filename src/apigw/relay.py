"""The relay stage: the upstream's response, streamed to the client."""

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http import NO_BODY_CODES
from zope.interface import implementer

from apigw.headers import add_gateway_pairs, response_header_pairs

log = Logger()

COMPLETE = "complete"
# The upstream's answer broke before anything of it reached the client: the
# client can still be told so in an answer of the gateway's own.
FAILED = "failed"
# The upstream died mid-body: the client got a truncated answer.
CUT_SHORT = "cut_short"
# The client left before the whole body reached it.
CLIENT_GONE = "client_gone"


def relay(request, response, extra_headers, date, idle_timeout_s, clock, watchdog,
          send_timeout_s=60.0):
    """Stream `response` to the client; fires with how it ended (COMPLETE,
    FAILED, CUT_SHORT or CLIENT_GONE) once the client has it all or is gone.

    The status line and headers wait until the first body bytes, or the
    end of the read that brought them, parse cleanly: a framing error right
    after the head still lets the gateway answer 502 itself (FAILED).

    `extra_headers`: pairs the gateway adds (rate-limit headers); `date`:
    the Date value to add when the upstream sent none (RFC 9110 6.6.1). An
    upstream that goes quiet mid-body for idle_timeout_s is cut off, like
    nginx's proxy_read_timeout: nothing else would ever end that request.
    A client that takes nothing for send_timeout_s (nginx's send_timeout) is
    cut off too, which frees the upstream connection it held. `watchdog`
    (apigw.deadlines) checks both deadlines.
    """
    code = response.code
    raw = getattr(response, "raw_headers", None)
    if raw is None:  # an IResponse from elsewhere (Agent, in tests)
        raw = [(name, value) for name, values in response.headers.getAllRawHeaders()
               for value in values]
    pairs, names = response_header_pairs(raw, code)
    no_body = request.method == b"HEAD" or code in NO_BODY_CODES
    chunked = False
    if not no_body and b"content-length" not in names:
        if isinstance(response.length, int):
            # Agent (kept as the reference client) files Content-Length
            # away from its headers; its length attribute still knows it.
            pairs.append((b"Content-Length", b"%d" % response.length))
        elif request.clientproto == b"HTTP/1.1":
            chunked = True
            pairs.append((b"Transfer-Encoding", b"chunked"))
    if b"date" not in names:
        pairs.append((b"Date", date))
    add_gateway_pairs(pairs, extra_headers, request.request_id)
    done = defer.Deferred()
    response.deliverBody(_Relay(request, (code, response.phrase, pairs, chunked), no_body,
                                done, clock, idle_timeout_s, watchdog, send_timeout_s))
    return done


@implementer(IPushProducer)
class _Relay(Protocol):
    """Writes upstream body bytes to the client as they come.

    It is the client's producer, passing pause and resume on to the upstream
    transport: a slow client pauses the upstream socket instead of growing
    our buffers, and the stall deadline only runs while we are willing to
    read.
    """

    def __init__(self, request, head, no_body, done, clock, idle_timeout_s, watchdog,
                 send_timeout_s):
        self._request = request
        self._head = head  # (code, phrase, pairs, chunked) until written
        self._no_body = no_body
        self._done = done
        self._clock = clock
        self._idle_timeout_s = idle_timeout_s
        self._watchdog = watchdog
        # None while the client has paused us: a slow reader is not a
        # stalled upstream.
        self._deadline = None
        self._send_timeout_s = send_timeout_s
        # Set while the client has paused us: how long it may take nothing.
        self._send_deadline = None

    def connectionMade(self):
        if self._no_body:
            return  # nothing to stream: the pool gets the connection back
        self._request.registerProducer(self, True)
        self._request.when_gone(self.stopProducing)
        self._deadline = self._clock.seconds() + self._idle_timeout_s
        self._watchdog.watch(self)

    def _write_head(self):
        head, self._head = self._head, None
        self._request.start_response(*head)

    def read_done(self):
        # A head with no body bytes yet (a stream that starts later): send
        # it now rather than hold the client waiting.
        if self._head is not None and not self._request.client_gone:
            self._write_head()

    def pauseProducing(self):
        now = self._clock.seconds()
        self._deadline = None
        self._send_deadline = now + self._send_timeout_s
        self.transport.pauseProducing()

    def resumeProducing(self):
        self._send_deadline = None
        self.transport.resumeProducing()
        self._deadline = self._clock.seconds() + self._idle_timeout_s

    def stopProducing(self):
        self._watchdog.forget(self)
        self.transport.stopProducing()

    def check_deadline(self, now):
        if self._deadline is not None and now >= self._deadline:
            self._watchdog.forget(self)
            log.info("upstream body stalled for {timeout}s; cutting it off",
                     timeout=self._idle_timeout_s)
            self.transport.stopProducing()
        elif self._send_deadline is not None and now >= self._send_deadline:
            self._watchdog.forget(self)
            request = self._request
            log.info("request {request_id}: the client took nothing for {timeout}s;"
                     " closing it", request_id=request.request_id,
                     timeout=self._send_timeout_s)
            # Its connectionLost stops the upstream body (when_gone).
            request.transport.abortConnection()

    def dataReceived(self, data):
        request = self._request
        if request.client_gone:
            return
        if self._deadline is not None:
            self._deadline = self._clock.seconds() + self._idle_timeout_s
        if self._head is not None:
            # The head and the first bytes of the body in one write.
            head, self._head = self._head, None
            request.start_response(*head, data)
            return
        request.write(data)

    def connectionLost(self, reason):
        self._watchdog.forget(self)
        request = self._request
        if request.client_gone:
            self._done.callback(CLIENT_GONE)
            return
        if not self._no_body:
            request.unregisterProducer()
        # isinstance, not Failure.check: check() walks the class hierarchy
        # by name, on every response.
        complete = isinstance(reason.value, (ResponseDone, PotentialDataLoss))
        if self._head is not None:
            if not complete:
                self._done.callback(FAILED)
                return
            self._write_head()
        if complete:
            request.finish()
            self._done.callback(COMPLETE)
            return
        # The upstream died mid-body. Closing without finishing (no last
        # chunk, or short of Content-Length) tells the client the body is
        # truncated; what was sent still gets flushed.
        log.info("request {request_id}: upstream body cut short: {why}",
                 request_id=request.request_id, why=reason.getErrorMessage())
        request.loseConnection()
        self._done.callback(CUT_SHORT)
