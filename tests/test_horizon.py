"""The occurrence index's rolling horizon: open RRULEs are re-indexed before their index runs out."""

from __future__ import annotations

import asyncio
import calendar
import logging
import time

import pytest
from aiohttp import web
from sqlalchemy import func, select

from bookdav.server import background
from bookdav.server.keys import DATABASE
from bookdav.storage import calendars, horizon
from bookdav.storage import occurrences as occ
from bookdav.storage.db import Database
from bookdav.storage.schema import occurrences
from tests.storage_fixtures import database, event  # noqa: F401 (fixture)

DAY = 86_400
# 2030-01-01T00:00:00Z, a Tuesday.
T0 = calendar.timegm((2030, 1, 1, 0, 0, 0))
PATH = "alice/cal"


def weekly(uid: str, dtstart: str = "20300101T090000Z") -> str:
    return event(uid, f"DTSTART:{dtstart}", "DURATION:PT1H", "RRULE:FREQ=WEEKLY")


def make_calendar(database: Database) -> calendars.Collection:  # noqa: F811
    with database.write(["alice"]) as conn:
        return calendars.create_collection(conn, PATH, {"tag": "VCALENDAR"}, now=T0)


def put(database: Database, href: str, text: str, *, now: int) -> None:  # noqa: F811
    with database.write(["alice"]) as conn:
        collection = calendars.get_collection(conn, PATH)
        assert collection is not None
        calendars.put_item(conn, collection, href, text, now=now)


def indexed_until(database: Database, href: str) -> int | None:  # noqa: F811
    with database.read() as conn:
        collection = calendars.get_collection(conn, PATH)
        assert collection is not None
        item = calendars.get_item(conn, collection.id, href)
        assert item is not None
        return item.indexed_until


def found_in(database: Database, start: int, end: int) -> dict[str, bool]:  # noqa: F811
    """href -> whether the index is certain, for a time-range query."""
    with database.read() as conn:
        collection = calendars.get_collection(conn, PATH)
        assert collection is not None
        found = calendars.items_in_range(conn, collection, start, end, "VEVENT")
        return {item.href: certain for item, certain in found}


def indexed_occurrences(database: Database, start: int, end: int) -> int:  # noqa: F811
    with database.read() as conn:
        return conn.execute(
            select(func.count()).where(
                occurrences.c.start_utc >= start, occurrences.c.start_utc < end
            )
        ).scalar_one()


async def test_one_pass_extends_a_near_horizon_and_later_queries_use_the_index(
    database: Database,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_calendar(database)
    put(database, "old.ics", weekly("old"), now=T0)
    later = T0 + 400 * DAY  # the old series' horizon is now less than a year away
    put(database, "fresh.ics", weekly("fresh", "20310206T090000Z"), now=later)
    put(database, "once.ics", event("once", "DTSTART:20300102T090000Z", "DURATION:PT1H"), now=T0)
    old_horizon = indexed_until(database, "old.ics")
    assert old_horizon == T0 + occ.HORIZON_SECONDS
    fresh_horizon = indexed_until(database, "fresh.ics")
    past_old_horizon = (old_horizon + 30 * DAY, old_horizon + 37 * DAY)
    assert found_in(database, *past_old_horizon)["old.ics"] is False  # must expand the item
    with database.read() as conn:
        token_before = calendars.get_collection(conn, PATH).sync_token  # type: ignore[union-attr]

    with caplog.at_level(logging.INFO, logger="bookdav.background"):
        totals = await background.horizon_pass(database, now=later)

    assert (totals.due, totals.reindexed, totals.batches) == (1, 1, 1)
    assert indexed_until(database, "old.ics") == later + occ.HORIZON_SECONDS
    assert indexed_until(database, "fresh.ics") == fresh_horizon  # not due: untouched
    assert indexed_until(database, "once.ics") is None
    found = found_in(database, *past_old_horizon)
    assert found == {"old.ics": True, "fresh.ics": True}  # both answered from the index
    assert indexed_occurrences(database, *past_old_horizon) == 2
    with database.read() as conn:
        assert calendars.get_collection(conn, PATH).sync_token == token_before  # type: ignore[union-attr]
    (record,) = [r for r in caplog.records if r.getMessage() == "occurrence horizon extended"]
    assert record.fields["reindexed"] == 1  # type: ignore[attr-defined]
    assert record.fields["collections"] == 1  # type: ignore[attr-defined]


async def test_a_pass_works_in_batches_and_ends_even_when_a_horizon_cannot_move(
    database: Database,  # noqa: F811
) -> None:
    make_calendar(database)
    for n in range(7):
        put(database, f"series-{n}.ics", weekly(f"series-{n}"), now=T0)
    # Every minute since 1990: the index stops at MAX_INDEXED_OCCURRENCES, long before "now",
    # and no re-index moves it. The pass must still end.
    put(
        database,
        "capped.ics",
        event("capped", "DTSTART:19900101T000000Z", "DURATION:PT1M", "RRULE:FREQ=MINUTELY"),
        now=T0,
    )
    capped_horizon = indexed_until(database, "capped.ics")

    totals = await asyncio.wait_for(
        background.horizon_pass(database, now=T0 + 400 * DAY, batch_size=3), timeout=60
    )

    assert totals.due == 8
    assert totals.batches == 3
    assert indexed_until(database, "capped.ics") == capped_horizon
    for n in range(7):
        assert indexed_until(database, f"series-{n}.ics") == T0 + 400 * DAY + occ.HORIZON_SECONDS


async def test_the_server_task_runs_a_pass_on_start_and_stops_with_the_app(
    database: Database,  # noqa: F811
) -> None:
    make_calendar(database)
    now = int(time.time())
    put(database, "old.ics", weekly("old"), now=now - 400 * DAY)
    app = web.Application()
    app[DATABASE] = database
    lifetime = background.horizon_ctx(app)

    await lifetime.__anext__()
    deadline = time.monotonic() + 30
    while (indexed_until(database, "old.ics") or 0) < horizon.indexed_before(now):
        assert time.monotonic() < deadline, "the start-up pass never re-indexed the item"
        await asyncio.sleep(0.05)
    with pytest.raises(StopAsyncIteration):
        await lifetime.__anext__()
