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

from bookdav.notify import outbox
from bookdav.server.keys import DATABASE, SETTINGS


async def outbox_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the outbox worker for the app's lifetime (after the database is opened)."""
    task = asyncio.create_task(
        outbox.run_worker(app[DATABASE], app[SETTINGS]), name="outbox-worker"
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
