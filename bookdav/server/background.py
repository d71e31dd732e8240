"""Background work of a server process: keeping the occurrence index's horizon rolling.

`horizon_ctx` (an aiohttp `cleanup_ctx`) starts one asyncio task with the app and cancels it on
shutdown. The task runs a pass on start and then daily; each pass works in small batches through
the database's own threads (`Database.run_read` / `run_write`), so it queues with requests instead
of competing with them. Several processes on one database may each run passes: a batch re-checks,
under the owner's lock, what is still due, so the second one finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from bookdav.logs import log_event
from bookdav.server.keys import DATABASE
from bookdav.storage import horizon
from bookdav.storage.db import Database

log = logging.getLogger("bookdav.background")

HORIZON_INTERVAL_SECONDS = 24 * 3600


async def horizon_pass(
    database: Database, *, now: int | None = None, batch_size: int = horizon.BATCH_SIZE
) -> horizon.PassTotals:
    """Re-index every item whose indexed horizon ends within a year of `now`; log the counts."""
    now = int(time.time()) if now is None else now
    indexed_before = horizon.indexed_before(now)
    totals = horizon.PassTotals()
    after = (0, 0)
    while due := await database.run_read(
        horizon.due_items, indexed_before, after=after, limit=batch_size
    ):
        for batch in horizon.batches_of(due):
            reindexed = await database.run_write(
                horizon.reindex_batch,
                batch,
                indexed_before=indexed_before,
                now=now,
                principals=[batch.owner],
            )
            totals.add(batch, reindexed)
        after = (due[-1].collection_id, due[-1].item_id)
    log_event(log, "occurrence horizon extended", **totals.as_fields())
    return totals


async def _horizon_loop(database: Database) -> None:
    while True:
        try:
            await horizon_pass(database)
        except Exception:
            # A failed pass (database away for a moment) must not end the task: tomorrow's pass
            # still finds everything due, as nothing was marked done.
            log.exception("occurrence horizon pass failed")
        await asyncio.sleep(HORIZON_INTERVAL_SECONDS)


async def horizon_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the horizon task for the app's lifetime."""
    task = asyncio.create_task(_horizon_loop(app[DATABASE]), name="occurrence-horizon")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
