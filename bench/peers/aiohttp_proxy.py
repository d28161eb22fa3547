"""A minimal aiohttp reverse proxy, the bench's reference for "a Python proxy
done the usual asyncio way": /<service>/rest?query -> <upstream>/rest?query.

    python aiohttp_proxy.py --port P --service S --upstream http://127.0.0.1:U [--uvloop]

One pooled ClientSession (keep-alive), the body streamed both ways, hop-by-hop
headers dropped, no access log. Runs from bench/.venv-peers (aiohttp, uvloop).
"""

import argparse
import asyncio

from aiohttp import ClientError, ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web
from yarl import URL

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
              "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding",
              "upgrade"}


def end_to_end(headers, drop=()):
    named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    return [(k, v) for k, v in headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in named and k.lower() not in drop]


def make_app(service, upstream):
    prefix = f"/{service}"

    async def session_ctx(app):
        # No cookie jar (upstream cookies are the clients'), no added headers,
        # no decompression: the bytes pass through as they came.
        app["session"] = ClientSession(
            connector=TCPConnector(limit=256, keepalive_timeout=60),
            cookie_jar=DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=ClientTimeout(total=None, sock_connect=5, sock_read=60))
        yield
        await app["session"].close()

    async def proxy(request):
        tail = request.raw_path[len(prefix):]  # path and query, still encoded
        target = URL(upstream + (tail if tail.startswith("/") else "/" + tail), encoded=True)
        body = request.content if request.body_exists else None
        try:
            up = await request.app["session"].request(
                request.method, target, headers=end_to_end(request.headers, {"host"}),
                data=body, allow_redirects=False)
        except (ClientError, asyncio.TimeoutError):
            return web.json_response({"error": "upstream unavailable"}, status=502)
        async with up:
            response = web.StreamResponse(status=up.status, reason=up.reason)
            response.headers.extend(end_to_end(up.headers))
            await response.prepare(request)
            # Failing from here on (upstream gone mid-body), aiohttp drops the connection.
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", prefix, proxy)
    app.router.add_route("*", prefix + "/{tail:.*}", proxy)
    return app


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8080")
    p.add_argument("--uvloop", action="store_true", help="uvloop's event loop policy")
    args = p.parse_args()
    if args.uvloop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(args.service, args.upstream.rstrip("/")), host="127.0.0.1",
                port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
