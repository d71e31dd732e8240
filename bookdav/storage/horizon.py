"""The rolling horizon of the occurrence index: open-ended RRULEs re-indexed before it runs out.

An open RRULE is indexed about two years ahead (`occurrences.HORIZON_SECONDS`, kept in the item's
`indexed_until`); past that, queries must expand the item itself, which is slow. These are the
units of work of the background job (`bookdav.server.background`) that, now and then, re-indexes
every item whose horizon falls within `REFRESH_AHEAD_SECONDS`: find a page of due items, then
re-index each collection's share of it in a write transaction of its own under the owner's lock,
so a pass never holds a lock for long and never blocks a booking for more than one small batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from sqlalchemy import Connection, and_, or_, select

from bookdav.storage import calendars
from bookdav.storage.schema import collections, items

# Half the indexed horizon: an item is re-indexed a year before its index runs out, so no query
# within the next year ever has to expand an item itself, even if a pass or two is missed.
REFRESH_AHEAD_SECONDS = 366 * 86400
BATCH_SIZE = 50


@dataclass(frozen=True)
class DueItem:
    """An item whose indexed horizon is near, and where it lives."""

    collection_id: int
    item_id: int
    owner: str


@dataclass(frozen=True)
class Batch:
    """Due items of one collection: re-indexed together under the owner's lock."""

    owner: str
    collection_id: int
    item_ids: tuple[int, ...]


@dataclass
class PassTotals:
    """What one pass did, for its log line."""

    due: int = 0
    reindexed: int = 0
    batches: int = 0
    collections: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)

    def add(self, batch: Batch, reindexed: int) -> None:
        self.due += len(batch.item_ids)
        self.reindexed += reindexed
        self.batches += 1
        self.collections.add(batch.collection_id)

    def as_fields(self) -> dict[str, Any]:
        return {
            "due": self.due,
            "reindexed": self.reindexed,
            "batches": self.batches,
            "collections": len(self.collections),
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
        }


def indexed_before(now: int) -> int:
    """Items indexed only up to before this instant are due for re-indexing."""
    return now + REFRESH_AHEAD_SECONDS


def due_items(
    conn: Connection,
    indexed_before: int,
    *,
    after: tuple[int, int] = (0, 0),
    limit: int = BATCH_SIZE,
) -> list[DueItem]:
    """The next page of due items after `(collection_id, item_id)`, in that order.

    Paging by position instead of re-asking "what is still due" ends every pass: an item whose
    horizon a re-index cannot move (a rule cut at `MAX_INDEXED_OCCURRENCES`) is visited once.
    """
    after_collection, after_item = after
    query = (
        select(items.c.collection_id, items.c.id, collections.c.owner)
        .join(collections, collections.c.id == items.c.collection_id)
        .where(
            items.c.indexed_until < indexed_before,
            or_(
                items.c.collection_id > after_collection,
                and_(items.c.collection_id == after_collection, items.c.id > after_item),
            ),
        )
        .order_by(items.c.collection_id, items.c.id)
        .limit(limit)
    )
    return [DueItem(*row) for row in conn.execute(query)]


def batches_of(due: Sequence[DueItem]) -> list[Batch]:
    """One batch per collection in a page of due items (the page is ordered by collection)."""
    batches = []
    for collection_id, grouped in groupby(due, key=lambda item: item.collection_id):
        group = list(grouped)
        item_ids = tuple(item.item_id for item in group)
        batches.append(Batch(owner=group[0].owner, collection_id=collection_id, item_ids=item_ids))
    return batches


def reindex_batch(conn: Connection, batch: Batch, *, indexed_before: int, now: int) -> int:
    """Re-index one batch; run inside `Database.write([batch.owner])`. Items changed or deleted
    since they were found are skipped or re-checked here, under the lock."""
    collection = calendars.get_collection_by_id(conn, batch.collection_id)
    if collection is None:
        return 0
    return calendars.reindex_items(
        conn, collection, indexed_before=indexed_before, item_ids=batch.item_ids, now=now
    )


__all__ = [
    "BATCH_SIZE",
    "REFRESH_AHEAD_SECONDS",
    "Batch",
    "DueItem",
    "PassTotals",
    "batches_of",
    "due_items",
    "indexed_before",
    "reindex_batch",
]
