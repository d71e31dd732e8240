"""`storage.sql.pipeline`: statements sent without waiting (PostgreSQL's pipeline mode) give the
same answers and the same all-or-nothing as statements sent one by one, on both databases.

The booking transaction relies on it (`booking.appointments.book`): its writes and look-ups go
out together, and a SQLAlchemy statement that lands inside a pipeline must still see its rows.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from psycopg import pq
from sqlalchemy import Connection, event, select, text

from bookdav.booking import appointments as booking
from bookdav.storage import calendars, sql
from bookdav.storage.db import Database
from bookdav.storage.schema import collections
from tests.conftest import RunningServer
from tests.storage_fixtures import database  # noqa: F401 (fixture)
from tests.test_appointments import _api_instant, booking_body, count_bookings
from tests.test_availability import make_provider, next_monday

# A calendar of alice's at path :p, written raw (a taken path fails on the unique index).
_NEW_CALENDAR = (
    "INSERT INTO collections (path, owner, parent_path, tag, incarnation, modified_at)"
    " VALUES (:p, 'alice', 'alice', 'VCALENDAR', 'x', 0)"
)


def _make_calendar(conn: Connection, name: str) -> calendars.Collection:
    return calendars.create_collection(conn, f"alice/{name}", {"tag": "VCALENDAR"}, owner="alice")


def test_asked_queries_and_unread_writes_give_what_one_by_one_gives(
    database: Database,  # noqa: F811
) -> None:
    with database.write(["alice"]) as conn:
        first = _make_calendar(conn, "first")
        with sql.pipeline(conn):
            sql.execute(
                conn,
                "UPDATE collections SET revision = revision + 5 WHERE id = :id",
                {"id": first.id},
            )
            revision = sql.ask(
                conn, "SELECT revision FROM collections WHERE id = :id", {"id": first.id}
            )
            paths = sql.ask(conn, "SELECT path FROM collections WHERE parent_path = 'alice'")
            second = _make_calendar(conn, "second")  # SQLAlchemy and raw statements mixed
            named = sql.mappings(
                conn, "SELECT path, revision FROM collections WHERE id = :id", {"id": first.id}
            )
            assert named == [{"path": "alice/first", "revision": first.revision + 5}]
            assert paths() == [("alice/first",)]
            assert revision() == [(first.revision + 5,)]
        assert [c.path for c in calendars.child_collections(conn, "alice")] == [
            "alice/first",
            "alice/second",
        ]
        assert second.id != first.id


def test_a_sqlalchemy_statement_inside_a_pipeline_sees_its_rows(
    database: Database,  # noqa: F811
) -> None:
    with database.write(["alice"]) as conn:
        first = _make_calendar(conn, "first")
        with sql.pipeline(conn):
            sql.execute(conn, "UPDATE collections SET revision = 41")
            # Without the sync after SQLAlchemy statements this would read no rows at all.
            found = conn.execute(select(collections.c.revision).where(collections.c.id == first.id))
            assert found.scalar_one() == 41
            assert conn.execute(text("SELECT count(*) FROM collections")).scalar_one() == 2


def test_a_failing_pipelined_write_fails_the_block_and_leaves_nothing(
    database: Database,  # noqa: F811
) -> None:
    with database.write(["alice"]) as conn:
        kept = _make_calendar(conn, "kept")
    # The driver's own error (sqlite3 / psycopg): statements of `sql` bypass SQLAlchemy's wrapping.
    with (
        pytest.raises(Exception, match=r"(?i)unique|duplicate"),
        database.write(["alice"]) as conn,
        sql.pipeline(conn),
    ):
        sql.execute(conn, "UPDATE collections SET revision = 99")
        sql.execute(conn, _NEW_CALENDAR, {"p": "alice/new"})
        sql.execute(conn, _NEW_CALENDAR, {"p": "alice/kept"})  # the unique path: fails
        sql.execute(conn, _NEW_CALENDAR, {"p": "alice/after"})
    with database.read() as conn:
        assert [(c.path, c.revision) for c in calendars.child_collections(conn, "alice")] == [
            ("alice/kept", kept.revision)
        ]


@pytest.fixture(params=["sqlite", "postgresql"])
def any_server(request: pytest.FixtureRequest) -> RunningServer:
    return request.getfixturevalue("server" if request.param == "sqlite" else "pg_server")


def test_a_booking_that_needs_a_room_writes_it_into_the_rooms_calendar_too(
    any_server: RunningServer,
) -> None:
    """The room's calendar is found by a SQLAlchemy query inside the booking's pipelined writes:
    the booking lands in both calendars, and the room, now busy, refuses the next booking."""
    first, second = make_provider(any_server), make_provider(any_server)
    admin = any_server.add_user("admin")
    room = requests.post(
        f"{any_server.base_url}/api/v1/resources",
        auth=(admin, any_server.passwords[admin]),
        json={"name": "Room 1", "kind": "room", "timezone": "Europe/Berlin"},
    )
    assert room.status_code == 201, room.text
    for provider in (first, second):
        needs_room = requests.put(
            f"{any_server.base_url}/api/v1/services/{provider.service_id}",
            auth=provider.auth,
            json={"resources": [room.json()["resourceId"]]},
        )
        assert needs_room.status_code == 200, needs_room.text
    start = _api_instant(next_monday(8), 10)
    url = f"{any_server.base_url}/api/v1/appointments"
    booked = requests.post(url, json=booking_body(first, start))
    assert booked.status_code == 201, booked.text
    event = requests.get(
        f"{room.json()['calendarUrl']}{booked.json()['appointmentId']}.ics", auth=first.auth
    )
    assert event.status_code == 200, event.text
    assert f"X-BOOKDAV-APPOINTMENT-ID:{booked.json()['appointmentId']}" in event.text
    refused = requests.post(url, json=booking_body(second, start))
    assert refused.status_code == 409, refused.text
    assert count_bookings(first) == (1, 1)
    assert count_bookings(second) == (0, 0)


def _round_trips(trace: str) -> int:
    """How many times the client waited for the server: in libpq's protocol trace (a message a
    line, F from the client, B from the server), each turn from sending to receiving."""
    directions = [line.split("\t", 1)[0] for line in trace.splitlines()]
    return sum(1 for sent, got in itertools.pairwise(directions) if (sent, got) == ("F", "B"))


@contextlib.contextmanager
def _traced(db: Database, folder: Path) -> Iterator[list[Path]]:
    """libpq's protocol trace of every write transaction of `db` inside the block, a file each."""
    traces: list[Path] = []

    def _trace(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        traces.append(folder / f"trace-{len(traces)}.txt")
        dbapi_connection._bookdav_trace = open(traces[-1], "w")  # noqa: SIM115 (closed at checkin)
        dbapi_connection.pgconn.trace(dbapi_connection._bookdav_trace.fileno())
        dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)

    def _untrace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.pgconn.untrace()
        dbapi_connection._bookdav_trace.close()

    event.listen(db._write_engine, "checkout", _trace)
    event.listen(db._write_engine, "checkin", _untrace)
    try:
        yield traces
    finally:
        event.remove(db._write_engine, "checkout", _trace)
        event.remove(db._write_engine, "checkin", _untrace)


def test_a_pipelined_booking_takes_four_round_trips_on_postgresql(
    pg_server: RunningServer, tmp_path: Path
) -> None:
    """BEGIN; the locks with the provider's look-ups; the slot check with the notifications'
    look-ups; the writes with the COMMIT. Sent one block at a time it took nine."""
    provider = make_provider(pg_server)
    client = booking.Client("Ann Example", "ann@example.org", "UTC")
    db = Database(pg_server.database_url)

    def book(hour: int, held: list[str]) -> str:
        """Book at `hour` holding `held`; the protocol trace of that transaction."""
        start = int(datetime.fromisoformat(_api_instant(next_monday(8), hour)).timestamp())
        wanted = booking.BookingRequest(provider.service_id, provider.user_id, start, client)
        with _traced(db, tmp_path) as traces, db.write(held, pipelined=True) as conn:
            booking.book(conn, wanted, "http://bookdav.test", held)
        return traces[-1].read_text()

    try:
        held = [provider.username]
        try:
            book(10, held)
        except booking.LocksMissing as missing:  # the service's locks, learned
            held = missing.needed
            book(10, held)
        assert _round_trips(book(11, held)) == 4
    finally:
        db.close()
    assert count_bookings(provider) == (2, 2)


@pytest.mark.parametrize(
    ("principals", "expected"),
    [
        ([], 3),  # BEGIN; the statement; COMMIT
        (["alice"], 4),  # BEGIN; the lock; the statement; COMMIT
        (["alice", "bob", "carol"], 4),  # the three locks in one round trip
    ],
)
def test_a_plain_write_waits_once_for_its_locks_and_never_for_an_empty_pipeline(
    pg_server: RunningServer, tmp_path: Path, principals: list[str], expected: int
) -> None:
    """Most writes (outbox claims, sync runs, sessions) name no principal: psycopg syncs on
    entering and on leaving even an empty pipeline block, which once cost them a round trip."""
    db = Database(pg_server.database_url)
    try:
        with _traced(db, tmp_path) as traces, db.write(principals) as conn:
            assert sql.ask(conn, "SELECT 1")() == [(1,)]
        assert _round_trips(traces[-1].read_text()) == expected
    finally:
        db.close()


def test_a_pipelined_write_that_fails_at_the_commit_leaves_nothing(
    database: Database,  # noqa: F811
) -> None:
    """In a pipelined write an error surfaces at the next read or the commit, not where the
    statement was sent: the transaction still keeps nothing (SQLite: at once, as ever)."""
    with database.write(["alice"]) as conn:
        kept = _make_calendar(conn, "kept")
    with (
        pytest.raises(Exception, match=r"(?i)unique|duplicate"),
        database.write(["alice"], pipelined=True) as conn,
    ):
        sql.execute(conn, "UPDATE collections SET revision = 99")
        sql.execute(conn, _NEW_CALENDAR, {"p": "alice/new"})
        sql.execute(conn, _NEW_CALENDAR, {"p": "alice/kept"})  # the unique path: fails
    with database.read() as conn:
        assert [(c.path, c.revision) for c in calendars.child_collections(conn, "alice")] == [
            ("alice/kept", kept.revision)
        ]
