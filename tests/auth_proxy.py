"""A reverse proxy that adds `Authorization: Bearer <token>` to every request.

The MCP conformance suite cannot send a bearer token; the tests put this in front of Scribe's
HTTP transport. Everything else (Host, Origin, bodies, SSE streams) passes through unchanged.

    python auth_proxy.py LISTEN_PORT UPSTREAM_URL TOKEN
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

HOP_BY_HOP = ("authorization", "content-length", "transfer-encoding", "content-encoding")


async def serve(port: int, upstream: str, token: str) -> None:
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Authorization"] = f"Bearer {token}"
        async with session.request(request.method, upstream + request.rel_url.path_qs, headers=headers,
                                   data=await request.read(), allow_redirects=False) as reply:
            response = web.StreamResponse(status=reply.status, headers={
                k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP})
            await response.prepare(request)
            async for chunk in reply.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
