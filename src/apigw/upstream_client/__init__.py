"""apigw's own HTTP/1.1 upstream client, in three roles kept apart behind
public contracts, as twisted.web.client keeps them:

- framing: `connection.UpstreamConnection`, one keep-alive connection with
  one explicit `state`, framed by httptools (Node's llhttp), and the
  `UpstreamResponse` it delivers;
- reuse: `ConnectionPool`, keyed by the already-parsed `apigw.config.Target`;
- target to endpoint: `endpoints.EndpointMaker`, once per target.

`FastAgent` is an IAgent over the pool for callers that have only a URI.
Agent spends most of a proxied request's client-side CPU re-parsing the URL,
building an endpoint and running Deferred state machines per request; here
one Deferred per request is all the plumbing.
"""

from apigw.upstream_client.agent import FastAgent
from apigw.upstream_client.connection import HeadTooLarge, UpstreamConnection, WrongBodyLength
from apigw.upstream_client.endpoints import EndpointMaker
from apigw.upstream_client.pool import ConnectionPool, NotRetried
from apigw.upstream_client.response import UpstreamResponse

__all__ = [
    "ConnectionPool", "EndpointMaker", "FastAgent", "HeadTooLarge", "NotRetried",
    "UpstreamConnection",
    "UpstreamResponse", "WrongBodyLength",
]
