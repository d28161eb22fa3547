"""Request bodies as producers the upstream client can send (again)."""

from twisted.internet import defer
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

# Bodies up to this size are sent from memory in one write.
SMALL_BODY = 64 * 1024


@implementer(IBodyProducer)
class BytesProducer:
    """A small body written in one go; no cooperator round trip."""

    # The upstream pool may send it again after a stale connection.
    restartable = True

    def __init__(self, data):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def body_producer(request):
    """A fresh producer for the buffered request body (one per attempt), or
    None for a request that has no body at all."""
    length = request.body_length
    if length == 0 and not request.requestHeaders.hasHeader(b"transfer-encoding") \
            and not request.requestHeaders.hasHeader(b"content-length"):
        return None
    request.content.seek(0)
    if length <= SMALL_BODY:
        return BytesProducer(request.content.read())
    # FileBodyProducer closes its file when done or stopped; a retry must
    # still be able to read the body again.
    return FileBodyProducer(_KeepOpen(request.content))


class _KeepOpen:
    """A view of a file whose close() leaves the file open."""

    def __init__(self, f):
        self._f = f

    def read(self, *args):
        return self._f.read(*args)

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self):
        return self._f.tell()

    def close(self):
        pass
