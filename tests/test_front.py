"""The public listener's fast lane (apigw.front), in memory: which requests
it serves itself, which it leaves to twisted.web, and that a connection
behaves the same either way."""

import re

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
import pytest

from apigw.front import FrontChannel
from apigw.front_request import FrontRequest
from tests.memory_gateway import FakeClient, FakeResponse, connect, gateway_service

YAML = "services:\n  svc:\n    url: http://127.0.0.1:9\n    auth: false\n    rate_limit: null\n"


def _gateway():
    clock, client, records = Clock(), FakeClient(), []
    service = gateway_service(YAML, clock, client)
    service.access_log.record = records.append
    channel, transport = connect(service.site)
    return clock, client, records, channel, transport


def _answer(client, n, body=b"hello"):
    client.requests[n][4].callback(FakeResponse(200, body))


def test_plain_requests_take_the_fast_lane_on_one_kept_connection():
    """When a client sends two plain GETs one after the other, both are proxied on the same connection, and the upstream gets the header names as the client spelled them."""
    clock, client, records, channel, transport = _gateway()
    assert isinstance(channel, FrontChannel)
    channel.dataReceived(b"GET /svc/a?q=1 HTTP/1.1\r\nHost: gw\r\nx-Custom-NAME: v\r\n\r\n")
    [(_, method, path, headers, _)] = client.requests
    # twisted.web would have sent it as X-Custom-Name.
    assert (method, path, headers[b"x-Custom-NAME"]) == (b"GET", b"/a?q=1", b"v")
    _answer(client, 0)
    first = transport.value()
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\nhello")
    assert b"X-Request-ID: " in first and b"Date: " in first
    transport.clear()
    channel.dataReceived(b"GET /svc/b HTTP/1.1\r\nHost: gw\r\n\r\n")
    _answer(client, 1, b"again")
    assert transport.value().endswith(b"\r\n\r\nagain")
    assert not transport.disconnecting
    assert [(r["path"], r["status"], r["bytes_sent"]) for r in records] == \
        [("/svc/a?q=1", 200, 5), ("/svc/b", 200, 5)]


def test_an_empty_body_declared_with_content_length_0_is_proxied_with_it():
    """When a plain POST says Content-Length: 0, it is proxied on the fast lane with an empty body of declared length."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"POST /svc/p HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n")
    [(_, method, _, _, _)] = client.requests
    assert method == b"POST" and client.bodies == [b""]
    _answer(client, 0)
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")


def test_pipelined_requests_are_answered_one_at_a_time_in_order():
    """When a client pipelines two requests in one write, the second goes upstream only once the first is answered, and the answers come back in order."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"GET /svc/1 HTTP/1.1\r\nHost: gw\r\n\r\n"
                         b"GET /svc/2 HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert [r[2] for r in client.requests] == [b"/1"]
    _answer(client, 0, b"one")
    assert [r[2] for r in client.requests] == [b"/1", b"/2"]
    _answer(client, 1, b"two")
    answers = transport.value()
    assert answers.index(b"one") < answers.index(b"two")
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 2


@pytest.mark.parametrize("head, expected", [
    # A body: twisted.web reads it (the pipeline checks it at head time).
    (b"POST /svc/p HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc", b"HTTP/1.1 200 OK"),
    (b"GET /svc/c HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     b"HTTP/1.1 200 OK"),
    (b"GET /svc/old HTTP/1.0\r\nHost: gw\r\n\r\n", b"HTTP/1.0 200 OK"),
    (b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n", b'{"status": "ok"}'),
    (b"GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n", b"HTTP/1.1 404 "),
    (b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n", b"# TYPE gateway_requests_total counter"),
    (b"GET /admin/keys HTTP/1.1\r\nHost: gw\r\n\r\n", b"HTTP/1.1 403 "),
    # Malformed: refusing it is twisted.web's parser's job.
    (b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nBad Name: v\r\n\r\n", b"HTTP/1.1 400 "),
    (b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX\x00: v\r\n\r\n", b"HTTP/1.1 400 "),
    # A folded header line: twisted.web unfolds it.
    (b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX: a\r\n b\r\n\r\n", b"HTTP/1.1 200 OK"),
])
def test_other_requests_are_left_to_twisted_web_from_their_first_byte(head, expected):
    """When a request is not a plain bodyless HTTP/1.1 one for a service, twisted.web's channel takes the connection from that request's first byte and answers it as it always did."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(head)
    assert channel.handed_over
    if client.requests:
        _answer(client, 0)
    assert expected in transport.value()
    if b"Content-Length: 3" in head:
        assert client.bodies == [b"abc"]
    elif b"chunked" in head:
        assert client.bodies == [b""]


def test_bare_lf_line_ends_are_never_proxied():
    """When a head ends its lines with a bare LF, nothing goes upstream (twisted.web waits for CRLF, and the head deadline ends it)."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"GET /svc/x HTTP/1.1\nHost: gw\n\n")
    clock.advance(10.3)
    assert client.requests == []
    assert transport.value().startswith(b"HTTP/1.1 408 ")


def test_a_connection_handed_to_twisted_web_still_serves_what_follows():
    """When a plain GET follows a POST on the same connection, it is proxied too (by twisted.web, which now holds the connection)."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"GET /svc/1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    _answer(client, 0, b"one")
    channel.dataReceived(b"POST /svc/2 HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\n\r\nx")
    _answer(client, 1, b"two")
    channel.dataReceived(b"GET /svc/3 HTTP/1.1\r\nHost: gw\r\n\r\n")
    _answer(client, 2, b"three")
    answers = transport.value()
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 3 and answers.endswith(b"three")
    assert [r["status"] for r in records] == [200, 200, 200]
    # Counted once, whichever channel holds it.
    assert channel.site.connections.open == 1
    channel.connectionLost(Failure(ConnectionDone()))
    assert channel.site.connections.open == 0


@pytest.mark.parametrize("head", [
    b"GET /svc/x HTTP/1.1\r\n\r\n",  # refused at once: no Host
    b"TRACE /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n",  # refused at once: 405
])
def test_a_burst_of_pipelined_requests_answered_at_once_is_served_in_a_loop(head):
    """When a client pipelines 3,000 requests the gateway refuses at once, in one write, each gets its answer and its record, and none stays counted in flight."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(head * 3000)
    assert transport.value().count(b"HTTP/1.1 4") == 3000
    assert len(records) == 3000
    assert channel.site.pipeline._accounting.in_flight == 0
    assert not channel.handed_over and not transport.disconnecting


def test_connection_close_is_honoured_after_the_answer():
    """When a client asks Connection: close, its answer says so and the connection then closes."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert not transport.disconnecting
    _answer(client, 0)
    assert b"Connection: close\r\n" in transport.value()
    assert transport.disconnecting


def test_own_answers_on_the_fast_lane_are_complete_json():
    """When the gateway refuses a plain request itself (no Host), the client gets a JSON error with its length, Server and Date."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"HEAD /svc/x HTTP/1.1\r\n\r\n")
    channel.dataReceived(b"GET /svc/x HTTP/1.1\r\n\r\n")
    answers = transport.value()
    head, rest = answers.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Server: apigw" in head and b"Date: " in head and b"Content-Length: " in head
    # HEAD: no body, then the GET's answer with one.
    assert rest.startswith(b"HTTP/1.1 400 Bad Request\r\n") and rest.endswith(b"}")
    assert client.requests == []
    assert [r["status"] for r in records] == [400, 400]


def test_a_trickled_head_is_cut_off_at_the_head_deadline():
    """When a head is still incomplete after client_header_timeout, the client gets 408 and the connection closes."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"GET /svc/x HTTP/1.1\r\nHo")
    clock.advance(9.0)
    channel.dataReceived(b"st: g")
    assert transport.value() == b""
    clock.advance(1.3)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert transport.disconnecting
    assert client.requests == []


def test_an_idle_kept_connection_is_closed_after_keepalive_timeout():
    """When a kept-alive connection sends nothing for keepalive_timeout, the gateway closes it; until then it stays."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"GET /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    _answer(client, 0)
    clock.advance(59.0)
    assert not transport.disconnecting
    clock.advance(1.3)
    assert transport.disconnecting


def test_a_client_leaving_mid_request_cancels_the_upstream_call_and_is_logged_499():
    """When the client disconnects while the upstream has not answered, the upstream request is cancelled and the record says 499."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"GET /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    pending = client.requests[0][4]
    channel.connectionLost(Failure(ConnectionDone()))
    assert pending.called  # by its cancellation: the test never answered it
    assert [r["status"] for r in records] == [499]
    assert channel.site.connections.open == 0


def test_a_half_closed_client_still_gets_its_answer_then_the_connection_closes():
    """When the client shuts down its sending side after its request, the answer is still written, then the connection closes."""
    clock, client, records, channel, transport = _gateway()
    channel.dataReceived(b"GET /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    channel.readConnectionLost()
    assert not transport.disconnecting
    _answer(client, 0)
    assert transport.value().endswith(b"hello") and b"Connection: close" in transport.value()
    assert transport.disconnecting


def test_the_fast_lanes_request_holds_only_its_own_fields():
    """When a request has gone through the whole pipeline on the fast lane, it has no attribute beyond the slots it declares: no module can hang state on it."""
    clock, client, records, channel, transport = _gateway()
    seen = []
    process = channel.site.pipeline.process

    def recording(request, route=None):
        seen.append(request)
        process(request, route)

    channel.site.pipeline.process = recording
    channel.dataReceived(b"GET /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    _answer(client, 0)
    [request] = seen
    assert type(request) is FrontRequest and not hasattr(request, "__dict__")
    with pytest.raises(AttributeError):
        request.consumer = "anything"


HEADS = [
    b"GET /svc/a/b?x=1&y=%2F HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\n\r\n",
    b"HEAD /svc/h HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"DELETE /svc/d HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"OPTIONS /svc/o HTTP/1.1\r\nHost: gw\r\nOrigin: https://x\r\n\r\n",
    b"GET /svc HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/../admin/keys HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/%2e%2e/x HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX-Request-ID: keep-me.1\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX-Request-ID: not ok!\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 1.2.3.4\r\nForwarded: for=x\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nConnection: x-hop\r\nX-Hop: 1\r\nX-Keep: 2\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX_Consumer_ID: forged\r\nX-Consumer-ID: forged\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: a, b\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\n\r\n",
    b"TRACE /svc/x HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/x#frag HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nX-API-Key: secret\r\nProxy-Authorization: x\r\n\r\n",
    b"GET /svc/x HTTP/1.1\r\nHost: gw\r\nTE: trailers\r\nKeep-Alive: 5\r\n\r\n",
    # Whitespace around values is not part of them.
    b"GET /svc/x HTTP/1.1\r\nHost: gw \r\nX-A:  a \t\r\nX-Request-ID: keep-me.2 \r\n\r\n",
]


def _normalised(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    body = re.sub(rb'"request_id": "[0-9a-f]{32}"', b'"request_id": "*"', body)
    status, *lines = head.split(b"\r\n")
    fields = sorted((name.lower(), b"*" if name.lower() in (b"date", b"x-request-id") else value)
                    for name, _, value in (line.partition(b": ") for line in lines))
    return status, fields, body


@pytest.mark.parametrize("head", HEADS)
def test_both_lanes_send_the_same_upstream_and_give_the_same_answer(head):
    """When the same plain request goes through the fast lane and through twisted.web's, the upstream gets the same request and the client the same answer (header case and the generated id aside)."""
    seen = []
    for fast in (True, False):
        clock, client, records = Clock(), FakeClient(), []
        service = gateway_service(YAML, clock, client)
        service.access_log.record = records.append
        service.site.fast_lane = fast
        channel, transport = connect(service.site)
        channel.dataReceived(head)
        if client.requests:
            # An upstream sends no body to a HEAD.
            body = b"" if head.startswith(b"HEAD") else b"hello"
            client.requests[0][4].callback(FakeResponse(200, body, [(b"X-Up", b"1")]))
        upstream = [(method, path, sorted((n.lower(), b"*" if n.lower() == b"x-request-id"
                                           and b"keep-me" not in v else v)
                                          for n, v in headers.items()))
                    for _, method, path, headers, _ in client.requests]
        record = {k: v for k, v in records[0].items() if k not in ("request_id", "latency_ms")}
        seen.append((upstream, _normalised(transport.value()), record))
    assert seen[0] == seen[1]
