"""The response an upstream connection delivers: an IResponse whose body
flows to the caller's protocol at the pace that protocol can take."""

from twisted.internet.interfaces import IPushProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

__all__ = ["UpstreamResponse"]

# Body bytes held for a caller that has not called deliverBody yet, before
# the socket is paused.
_BUFFER_LIMIT = 64 * 1024


@implementer(IResponse, IPushProducer)
class UpstreamResponse:
    """An IResponse; also the producer the body protocol's transport is, so a
    paused consumer pauses the upstream socket.

    `raw_headers` is every header line as received: (name, value) byte pairs
    in order, names in their own case, duplicates kept. `headers` is a
    Headers built from them on first use, so a caller reading only
    `raw_headers` never pays for one. Neither hides Content-Length,
    Connection or Transfer-Encoding, as Agent does: dropping hop-by-hop
    headers is the caller's job.

    `source` is what reads the body off the wire (the connection): it has
    pause_reading(), resume_reading() and stop_reading(), and reports with
    body_received(data) and body_finished(reason), the last exactly once.
    """

    __slots__ = ("code", "phrase", "version", "raw_headers", "length", "previousResponse",
                 "_headers", "_source", "_protocol", "_buffer", "_buffered", "_reason",
                 "_delivered", "_consumer_paused")
    request = None

    def __init__(self, source, code, phrase, version, raw_headers, length):
        self.code = code
        self.phrase = phrase
        self.version = version
        self.raw_headers = raw_headers
        self.length = length
        self.previousResponse = None
        self._headers = None
        self._source = source
        self._protocol = None
        self._buffer = None
        self._buffered = 0
        self._reason = None
        self._delivered = False
        self._consumer_paused = False

    @property
    def headers(self):
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers()
            for name, value in self.raw_headers:
                headers.addRawHeader(name, value)
        return headers

    def setPreviousResponse(self, response):
        self.previousResponse = response

    def deliverBody(self, protocol):
        if self._delivered:
            raise RuntimeError("the response body was already delivered")
        self._delivered = True
        protocol.makeConnection(self)
        self._protocol = protocol
        if self._buffer:
            buffer, self._buffer = self._buffer, None
            for data in buffer:
                protocol.dataReceived(data)
        reason = self._reason
        if reason is not None:
            self._reason = None
            self._protocol = None
            protocol.connectionLost(reason)
        elif self._source is not None and not self._consumer_paused:
            self._source.resume_reading()

    # What the source calls.

    def body_received(self, data):
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
            return
        if self._buffer is None:
            self._buffer = []
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > _BUFFER_LIMIT and self._source is not None:
            self._source.pause_reading()

    def read_done(self):
        """The source parsed a whole read of the wire without error: passed
        on to a body protocol that asks (`read_done()`), so it can hold
        back what it would have to take back after a framing error."""
        protocol = self._protocol
        if protocol is not None:
            read_done = getattr(protocol, "read_done", None)
            if read_done is not None:
                read_done()

    def body_finished(self, reason):
        # From here on the source may carry another response: never call it.
        self._source = None
        protocol = self._protocol
        if protocol is None:
            self._reason = reason
        else:
            self._protocol = None
            protocol.connectionLost(reason)

    # IPushProducer, for the body protocol.

    def pauseProducing(self):
        self._consumer_paused = True
        if self._source is not None:
            self._source.pause_reading()

    def resumeProducing(self):
        self._consumer_paused = False
        if self._source is not None:
            self._source.resume_reading()

    def stopProducing(self):
        if self._source is not None:
            self._source.stop_reading()

    def take_over(self, protocol):
        """For a 101 answer to a request that asked to upgrade: the
        connection leaves the pool for good, and `protocol` gets it (see
        UpstreamConnection.take_over). Not calling it, call stopProducing()
        to close the connection."""
        if self.code != 101 or self._source is None:
            raise RuntimeError("only a 101 answer's connection can be taken over")
        source, self._source = self._source, None
        source.take_over(protocol)
