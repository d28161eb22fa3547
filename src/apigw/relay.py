"""The relay stage: the upstream's response, streamed to the client."""

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http import NO_BODY_CODES
from zope.interface import implementer

from apigw.headers import response_header_pairs

log = Logger()

COMPLETE = "complete"
# The upstream died mid-body: the client got a truncated answer.
CUT_SHORT = "cut_short"
# The client left before the whole body reached it.
CLIENT_GONE = "client_gone"


def relay(request, response, extra_headers, date, idle_timeout_s, clock):
    """Stream `response` to the client; fires with how it ended (COMPLETE,
    CUT_SHORT or CLIENT_GONE) once the client has it all or is gone.

    `extra_headers`: pairs the gateway adds (rate-limit headers); `date`:
    the Date value to add when the upstream sent none (RFC 9110 6.6.1). An
    upstream that goes quiet mid-body for idle_timeout_s is cut off, like
    nginx's proxy_read_timeout: nothing else would ever end that request.
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
    pairs.extend(extra_headers)
    pairs.append((b"X-Request-ID", request.request_id.encode("ascii")))
    request.start_response(code, response.phrase, pairs, chunked)
    done = defer.Deferred()
    if no_body:
        # No body follows; let the pool have the connection back.
        response.deliverBody(_Discard(request, done))
        return done
    response.deliverBody(_Relay(request, done, clock, idle_timeout_s))
    return done


class _Discard(Protocol):
    def __init__(self, request, done):
        self._request = request
        self._done = done

    def connectionLost(self, reason):
        request = self._request
        if request.client_gone:
            self._done.callback(CLIENT_GONE)
            return
        request.finish()
        self._done.callback(COMPLETE)


@implementer(IPushProducer)
class _Relay(Protocol):
    """Writes upstream body bytes to the client as they come.

    It is the client's producer, passing pause and resume on to the upstream
    transport: a slow client pauses the upstream socket instead of growing
    our buffers, and the idle timer only runs while we are willing to read.
    """

    def __init__(self, request, done, clock, idle_timeout_s):
        self._request = request
        self._done = done
        self._clock = clock
        self._idle_timeout_s = idle_timeout_s
        self._timer = None

    def connectionMade(self):
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._client_gone)
        self._arm()

    def _client_gone(self, _):
        # The client left mid-body: stop reading from the upstream.
        self.stopProducing()

    def pauseProducing(self):
        self._disarm()
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()
        self._arm()

    def stopProducing(self):
        self._disarm()
        self.transport.stopProducing()

    def _arm(self):
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout_s)
        else:
            self._timer = self._clock.callLater(self._idle_timeout_s, self._stalled)

    def _disarm(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stalled(self):
        self._timer = None
        log.info("upstream body stalled for {timeout}s; cutting it off",
                 timeout=self._idle_timeout_s)
        self.transport.stopProducing()

    def dataReceived(self, data):
        request = self._request
        if not request.client_gone:
            self._arm()
            request.write(data)

    def connectionLost(self, reason):
        self._disarm()
        request = self._request
        if request.client_gone:
            self._done.callback(CLIENT_GONE)
            return
        request.unregisterProducer()
        # isinstance, not Failure.check: check() walks the class hierarchy
        # by name, on every response.
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
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
