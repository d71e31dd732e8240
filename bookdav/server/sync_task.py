"""The sync worker as part of a server process: pulls due busy sources on the `[sync]` interval.

Every `bookdav serve` process runs one; a source is claimed before it is pulled, so processes
sharing a database split the sources instead of pulling each twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from bookdav.server.keys import DATABASE, SETTINGS
from bookdav.sync import worker


async def sync_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the sync worker for the app's lifetime (after the database is opened), unless
    `[sync] worker = false`."""
    if not app[SETTINGS].get("sync", "worker"):
        yield
        return
    task = asyncio.create_task(worker.run_worker(app[DATABASE], app[SETTINGS]), name="sync-worker")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
