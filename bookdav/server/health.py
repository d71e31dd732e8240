"""`GET /healthz`: 200 while the database answers, 503 otherwise (for load balancers)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from sqlalchemy import Connection, text

from bookdav.server.keys import DATABASE

routes = web.RouteTableDef()

HEALTH_TIMEOUT_SECONDS = 5.0


def _select_one(conn: Connection) -> None:
    conn.execute(text("SELECT 1"))


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    database = request.app[DATABASE]
    try:
        await asyncio.wait_for(database.run_read(_select_one), HEALTH_TIMEOUT_SECONDS)
    except Exception as exc:  # any failure to answer is "unhealthy", by definition
        return web.json_response(
            {"status": "unavailable", "detail": type(exc).__name__}, status=503
        )
    return web.json_response({"status": "ok"})
