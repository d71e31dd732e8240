"""The SQL calendar storage: collections, items, sync changes and time-range reads."""

from __future__ import annotations

import datetime as dt

import pytest

from bookdav.storage import calendars
from bookdav.storage.db import Database
from tests.storage_fixtures import database, event  # noqa: F401 (fixture)

CALENDAR_PROPS = {
    "tag": "VCALENDAR",
    "D:displayname": "Appointments",
    "C:supported-calendar-component-set": "VEVENT",
}


def utc(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp())


def timed(uid: str, start: str, end: str, *extra: str) -> str:
    return event(uid, f"DTSTART:{start}", f"DTEND:{end}", *extra)


@pytest.fixture
def calendar(database: Database) -> calendars.Collection:  # noqa: F811
    with database.write(["alice"]) as conn:
        calendars.create_collection(conn, "alice", {})
        return calendars.create_collection(conn, "alice/appointments", CALENDAR_PROPS)


def fresh(database: Database, path: str = "alice/appointments") -> calendars.Collection:  # noqa: F811
    with database.read() as conn:
        found = calendars.get_collection(conn, path)
    assert found is not None
    return found


def test_a_provider_gets_a_principal_folder_and_a_calendar(database: Database) -> None:  # noqa: F811
    with database.write(["alice"]) as conn:
        principal = calendars.create_collection(conn, "alice", {})
        again = calendars.create_collection(conn, "alice", {})
        cal = calendars.create_collection(conn, "alice/appointments", CALENDAR_PROPS)
    assert again.id == principal.id
    assert (cal.owner, cal.tag, cal.props["D:displayname"]) == (
        "alice",
        "VCALENDAR",
        "Appointments",
    )
    with database.read() as conn:
        assert [c.path for c in calendars.child_collections(conn, "alice")] == [
            "alice/appointments"
        ]
        assert [c.path for c in calendars.child_collections(conn, "")] == ["alice"]


def test_creating_with_props_replaces_the_collection_and_its_incarnation(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    with database.write(["alice"]) as conn:
        calendars.put_item(
            conn, calendar, "a.ics", timed("a", "20240101T090000Z", "20240101T100000Z")
        )
        replaced = calendars.create_collection(conn, "alice/appointments", CALENDAR_PROPS)
        assert calendars.all_items(conn, replaced.id) == []
    assert replaced.incarnation != calendar.incarnation


def test_put_replace_and_delete_items_raise_the_revision_and_record_changes(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    text = timed("a", "20240101T090000Z", "20240101T100000Z")
    with database.write(["alice"]) as conn:
        stored, replaced = calendars.put_item(conn, calendar, "a.ics", text)
    assert replaced is None
    assert stored.etag == calendars.item_etag(text)
    token_after_put = fresh(database).sync_token
    with database.write(["alice"]) as conn:
        newer = timed("a", "20240101T110000Z", "20240101T120000Z")
        _, replaced = calendars.put_item(conn, fresh(database), "a.ics", newer)
        calendars.put_item(
            conn, fresh(database), "b.ics", timed("b", "20240102T090000Z", "20240102T100000Z")
        )
    assert replaced is not None and replaced.text == text
    with database.read() as conn:
        token, changed = calendars.changes_since(conn, fresh(database), token_after_put)
        assert sorted(changed) == ["a.ics", "b.ics"]
        assert calendars.changes_since(conn, fresh(database), token) == (token, [])
    with database.write(["alice"]) as conn:
        assert calendars.delete_item(conn, fresh(database), "b.ics")
        assert not calendars.delete_item(conn, fresh(database), "b.ics")
    with database.read() as conn:
        _, changed = calendars.changes_since(conn, fresh(database), token)
        assert changed == ["b.ics"]
        assert set(calendars.get_items(conn, calendar.id, ["a.ics", "b.ics"])) == {"a.ics"}
        _, everything = calendars.changes_since(conn, fresh(database), "")
        assert everything == ["a.ics"]


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "http://bookdav.org/ns/sync/abc-1",
        "http://radicale.org/ns/sync/0123",
        "http://bookdav.org/ns/sync/" + "0" * 32 + "-1",
    ],
)
def test_foreign_or_malformed_sync_tokens_are_refused(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
    token: str,
) -> None:
    with database.read() as conn, pytest.raises(calendars.InvalidSyncToken):
        calendars.changes_since(conn, calendar, token)


def test_a_sync_token_from_the_future_is_refused(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    ahead = f"{calendars.SYNC_TOKEN_PREFIX}{calendar.incarnation}-{calendar.revision + 5}"
    with database.read() as conn, pytest.raises(calendars.InvalidSyncToken):
        calendars.changes_since(conn, calendar, ahead)


def test_a_uid_can_live_at_one_href_only(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    with database.write(["alice"]) as conn:
        calendars.put_item(
            conn, calendar, "a.ics", timed("same", "20240101T090000Z", "20240101T100000Z")
        )
        with pytest.raises(calendars.UidConflict):
            calendars.put_item(
                conn, calendar, "b.ics", timed("same", "20240101T090000Z", "20240101T100000Z")
            )
        assert calendars.has_uid(conn, calendar.id, "same")
        assert not calendars.has_uid(conn, calendar.id, "same", except_href="a.ics")


def test_time_range_finds_overlapping_events_only(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    with database.write(["alice"]) as conn:
        calendars.put_item(
            conn, calendar, "in.ics", timed("in", "20240110T090000Z", "20240110T100000Z")
        )
        calendars.put_item(
            conn, calendar, "edge.ics", timed("edge", "20240109T230000Z", "20240110T000000Z")
        )
        calendars.put_item(
            conn, calendar, "out.ics", timed("out", "20240111T090000Z", "20240111T100000Z")
        )
        calendars.put_item(
            conn, calendar, "week.ics", timed("week", "20240101T000000Z", "20240120T000000Z")
        )
    with database.read() as conn:
        found = calendars.items_in_range(conn, fresh(database), utc(2024, 1, 10), utc(2024, 1, 11))
    assert sorted((item.href, exact) for item, exact in found) == [
        ("in.ics", True),
        ("week.ics", True),
    ]


def test_an_open_rrule_is_found_exactly_within_and_as_a_candidate_beyond_its_horizon(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    weekly = event(
        "w",
        "DTSTART:20240101T090000Z",
        "DTEND:20240101T100000Z",
        "RRULE:FREQ=WEEKLY",
        "EXDATE:20240108T090000Z",
    )
    with database.write(["alice"]) as conn:
        stored, _ = calendars.put_item(conn, calendar, "w.ics", weekly, now=utc(2024, 1, 1))
    assert stored.indexed_until is not None
    with database.read() as conn:
        cal = fresh(database)
        hit = calendars.items_in_range(conn, cal, utc(2024, 1, 15), utc(2024, 1, 16))
        excluded = calendars.items_in_range(conn, cal, utc(2024, 1, 8), utc(2024, 1, 9))
        beyond = calendars.items_in_range(conn, cal, utc(2030, 1, 7), utc(2030, 1, 8))
        busy_beyond = calendars.busy_intervals(conn, [cal], utc(2030, 1, 7), utc(2030, 1, 8))
    assert [(i.href, exact) for i, exact in hit] == [("w.ics", True)]
    assert excluded == []
    assert [(i.href, exact) for i, exact in beyond] == [("w.ics", False)]
    assert busy_beyond == [(utc(2030, 1, 7, 9), utc(2030, 1, 7, 10))]


def test_busy_intervals_skip_free_time_and_include_long_events(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    with database.write(["alice"]) as conn:
        calendars.put_item(
            conn, calendar, "busy.ics", timed("b", "20240110T090000Z", "20240110T100000Z")
        )
        calendars.put_item(
            conn,
            calendar,
            "free.ics",
            timed("f", "20240110T110000Z", "20240110T120000Z", "TRANSP:TRANSPARENT"),
        )
        calendars.put_item(
            conn,
            calendar,
            "trip.ics",
            event("t", "DTSTART;VALUE=DATE:20231201", "DTEND;VALUE=DATE:20240201"),
        )
    with database.read() as conn:
        busy = calendars.busy_intervals(conn, [calendar], utc(2024, 1, 10), utc(2024, 1, 11))
    assert busy == [
        (utc(2023, 12, 1), utc(2024, 2, 1)),
        (utc(2024, 1, 10, 9), utc(2024, 1, 10, 10)),
    ]


def test_changing_the_calendar_zone_reindexes_floating_events(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    with database.write(["alice"]) as conn:
        calendars.put_item(
            conn, calendar, "f.ics", event("f", "DTSTART:20240110T090000", "DURATION:PT1H")
        )
        vtimezone = "BEGIN:VCALENDAR\r\nBEGIN:VTIMEZONE\r\nTZID:America/New_York\r\nEND:VTIMEZONE\r\nEND:VCALENDAR\r\n"
        calendars.set_props(conn, calendar, {**CALENDAR_PROPS, "C:calendar-timezone": vtimezone})
    with database.read() as conn:
        busy = calendars.busy_intervals(conn, [calendar], utc(2024, 1, 10), utc(2024, 1, 11))
    assert busy == [(utc(2024, 1, 10, 14), utc(2024, 1, 10, 15))]


def test_deleting_a_collection_deletes_what_is_inside(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    with database.write(["alice"]) as conn:
        calendars.put_item(
            conn, calendar, "a.ics", timed("a", "20240101T090000Z", "20240101T100000Z")
        )
        calendars.delete_collection(conn, "alice")
        assert calendars.get_collection(conn, "alice/appointments") is None
        assert calendars.items_in_range(conn, calendar, utc(2024, 1, 1), utc(2024, 1, 2)) == []


def test_moving_an_item_between_calendars(
    database: Database,  # noqa: F811
    calendar: calendars.Collection,
) -> None:
    with database.write(["alice"]) as conn:
        other = calendars.create_collection(conn, "alice/other", CALENDAR_PROPS)
        calendars.put_item(
            conn, calendar, "a.ics", timed("a", "20240101T090000Z", "20240101T100000Z")
        )
        calendars.move_item(conn, fresh(database), "a.ics", other, "moved.ics")
        assert calendars.get_item(conn, calendar.id, "a.ics") is None
        assert calendars.get_item(conn, other.id, "moved.ics") is not None
