"""The outbox worker as part of a server process: started with the app, cancelled on shutdown.

Every `bookdav serve` process runs one; on PostgreSQL they share the rows (`SKIP LOCKED`), on
SQLite they take turns at the single writer. A row whose send was cut short by shutdown keeps its
lease and is sent again once the lease expires (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from bookdav.notify import outbox, plan
from bookdav.server.keys import DATABASE, SETTINGS

OUTBOX_WAKE = web.AppKey("outbox_wake", asyncio.Event)


async def outbox_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the outbox worker for the app's lifetime (after the database is opened)."""
    plan.configure(app[SETTINGS].get("mail", "reminder_minutes"))
    wake = app[OUTBOX_WAKE] = asyncio.Event()
    poll_seconds = app[SETTINGS].get("mail", "poll_seconds")
    task = asyncio.create_task(
        outbox.run_worker(app[DATABASE], app[SETTINGS], wake, poll_seconds), name="outbox-worker"
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _wake_after(request: web.Request, status: int) -> None:
    if (
        request.method not in ("GET", "HEAD", "OPTIONS")
        and not request.path.startswith("/dav")
        and status < 400
        and OUTBOX_WAKE in request.app
    ):
        request.app[OUTBOX_WAKE].set()


@web.middleware
async def wake_outbox(request: web.Request, handler: Handler) -> web.StreamResponse:
    """After a successful write through the API or the pages (a booking, a move, a cancellation
    has committed by the time the handler returns; a page answers with a redirect), start an
    outbox pass now instead of at the next poll."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _wake_after(request, exc.status)
        raise
    _wake_after(request, response.status)
    return response
