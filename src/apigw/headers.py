"""Which headers cross the gateway, in each direction, and which it adds.

Both directions work on lists of (name, value) byte pairs: the upstream
client writes the request's pairs as they are, and the relay copies the
upstream's pairs onto the client's response, so no header is parsed into
a mapping and out again on the way through.
"""

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})

# Never forwarded upstream: set by us (request id, Host, forwarding and
# consumer headers a client could otherwise forge), computed by the client
# library (Content-Length), or secret (the API key, and the master key that
# a careless admin script may send along to every path). Identity and
# forwarding headers other gateways set (Forwarded, X-Real-IP, Kong's
# X-Consumer-*/X-Credential-*) go too: an upstream may trust them.
_NOT_FORWARDED = HOP_BY_HOP | {
    b"host", b"content-length", b"x-api-key", b"x-master-key", b"x-request-id", b"expect",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix",
    b"x-forwarded-port", b"x-forwarded-server", b"forwarded", b"x-real-ip",
    b"x-client-ip", b"true-client-ip",
}
_NOT_FORWARDED_PREFIXES = (b"proxy-", b"x-consumer-", b"x-credential-", b"x-anonymous-")

# Ours to set on the way back: the request id, and framing the client's
# connection does its own way.
_NOT_RETURNED = HOP_BY_HOP | {b"x-request-id"}


def connection_tokens(values):
    """Header names listed in Connection values: hop-by-hop for this message only."""
    tokens = set()
    for value in values or ():
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def upstream_header_pairs(request_headers, client_ip, secure, request_id, service_name,
                          consumer=None, websocket=False):
    """The pairs sent upstream for a client's request, Host excepted (it
    depends on the target of each attempt).

    `websocket`: the request is a WebSocket handshake (apigw.websocket), the
    one case where the hop-by-hop Upgrade goes on, with Connection: Upgrade.
    """
    listed = connection_tokens(request_headers.getRawHeaders(b"connection"))
    pairs = []
    forwarded_for = []
    forwarded_host = None
    for name, values in request_headers.getAllRawHeaders():
        lower = name.lower()
        # A name with "_" becomes the same CGI/WSGI variable as its "-"
        # twin (X_Consumer_ID -> HTTP_X_CONSUMER_ID): nginx drops them too.
        # (find(), not `in`: 3.11's bytes `in` raises and clears an error inside.)
        if lower in _NOT_FORWARDED or lower in listed or lower.find(b"_") >= 0 \
                or lower.startswith(_NOT_FORWARDED_PREFIXES):
            if lower == b"x-forwarded-for":
                forwarded_for.extend(values)
            elif lower == b"host" and forwarded_host is None:
                forwarded_host = values[0]
            continue
        for value in values:
            pairs.append((name, value))
    forwarded_for.append(client_ip.encode("ascii", "replace"))
    pairs.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    pairs.append((b"X-Forwarded-Proto", b"https" if secure else b"http"))
    if forwarded_host is not None:
        pairs.append((b"X-Forwarded-Host", forwarded_host))
    pairs.append((b"X-Forwarded-Prefix", b"/" + service_name.encode("ascii")))
    pairs.append((b"X-Request-ID", request_id.encode("ascii")))
    if consumer is not None:
        pairs.append((b"X-Consumer-ID", consumer.id.encode("utf-8")))
        pairs.append((b"X-Consumer-Username", consumer.owner.encode("utf-8")))
    if websocket:
        pairs.append((b"Connection", b"Upgrade"))
        pairs.append((b"Upgrade", b"websocket"))
    return pairs


def switching_header_pairs(raw_headers):
    """The pairs of an upstream's 101 to a WebSocket handshake that reach
    the client: the usual ones, plus the Upgrade and Connection that make
    it a switch."""
    pairs, _ = response_header_pairs(raw_headers, 101)
    upgrade = [value for name, value in raw_headers if name.lower() == b"upgrade"]
    pairs.append((b"Connection", b"Upgrade"))
    pairs.append((b"Upgrade", upgrade[0] if upgrade else b"websocket"))
    return pairs


def response_header_pairs(raw_headers, status):
    """The upstream's response pairs that reach the client, in their order.

    Returns (pairs, names): `names` holds the lower-cased names kept, so the
    caller can tell what the upstream already set.
    """
    listed = None
    pairs = []
    names = set()
    for name, value in raw_headers:
        lower = name.lower()
        if lower in _NOT_RETURNED or lower.startswith(b"proxy-"):
            if lower == b"connection":
                listed = connection_tokens((value,)) if listed is None \
                    else listed | connection_tokens((value,))
            continue
        pairs.append((name, value))
        names.add(lower)
    if status == 204:
        # RFC 9110 8.6: never a Content-Length on a 204, whatever upstream says.
        listed = (listed or set()) | {b"content-length"}
    # Names listed in Connection are hop-by-hop too, wherever they came in
    # the head (nginx's "Connection: keep-alive" lists none that is kept).
    if listed is not None and not listed.isdisjoint(names):
        pairs = [(name, value) for name, value in pairs if name.lower() not in listed]
        names -= listed
    return pairs, names


def add_gateway_pairs(pairs, extra_headers, request_id):
    """What the gateway adds to every relayed head (a response or a 101):
    its own pairs (rate-limit headers), Via as a field of its own after any
    upstream Via (the same list, appended: RFC 9110 7.6.3), the request id."""
    pairs.extend(extra_headers)
    pairs.append((b"Via", b"1.1 apigw"))
    pairs.append((b"X-Request-ID", request_id.encode("ascii")))
