"""A write that fails halfway leaves nothing behind; bad or oversized requests store nothing.

Failures are injected into the storage layer under a real `radicale.Application` on our plugin.
Radicale turns a `ValueError` from storage into a 400/409 *response* and then leaves its lock
normally, so the request's transaction commits: storage calls must undo their own partial work,
not count on an exception reaching the transaction. Both kinds of failure are injected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from sqlalchemy import select

from bookdav.storage import calendars
from bookdav.storage.db import Database
from bookdav.storage.schema import collections, item_changes, items, occurrences
from tests.conftest import RunningServer
from tests.storage_fixtures import database, event, vcalendar, vevent  # noqa: F401 (fixture)
from tests.test_storage_radicale import CALENDAR, Client, client, timed  # noqa: F401 (fixture)

Snapshot = dict[str, list[tuple[Any, ...]]]
# Radicale answers a RuntimeError with 500 and a ValueError with 400 or 409.
INJECTED = [RuntimeError, ValueError]
MKCALENDAR_BODY = """<?xml version="1.0"?><C:mkcalendar xmlns:D="DAV:"
  xmlns:C="urn:ietf:params:xml:ns:caldav"><D:set><D:prop>
  <D:displayname>New</D:displayname></D:prop></D:set></C:mkcalendar>"""


def snapshot(db: Database) -> Snapshot:
    """Every row of every calendar table (revisions and incarnations included)."""
    with db.read() as conn:
        return {
            table.name: sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
            for table in (collections, items, item_changes, occurrences)
        }


def fail_after(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    exception: type[Exception],
    *,
    calls_before_failing: int = 0,
) -> None:
    """Make `calendars.<name>` run for real, then raise `exception` (after some good calls)."""
    original: Callable[..., Any] = getattr(calendars, name)
    calls = 0

    def run_then_fail(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        result = original(*args, **kwargs)
        calls += 1
        if calls > calls_before_failing:
            raise exception(f"injected failure in {name}")
        return result

    monkeypatch.setattr(calendars, name, run_then_fail)


@dataclass
class Store:
    """Radicale on our plugin, as alice, and the database under it."""

    client: Client
    database: Database

    def snapshot(self) -> Snapshot:
        return snapshot(self.database)


@pytest.fixture
def store(client: Client, database: Database) -> Store:  # noqa: F811
    """The test calendar with one event in it, so a failure has something to damage."""
    response = client.put("kept.ics", timed("kept", "20300105T090000Z", "20300105T100000Z"))
    assert response.status == 201, response.text
    return Store(client, database)


def is_failure(status: int) -> bool:
    return status >= 400


@pytest.mark.parametrize("exception", INJECTED)
def test_a_put_failing_after_the_item_row_leaves_nothing_behind(
    store: Store, monkeypatch: pytest.MonkeyPatch, exception: type[Exception]
) -> None:
    before = store.snapshot()
    # The item row is in; its occurrences are written, then the unit of work fails.
    fail_after(monkeypatch, "_insert_occurrences", exception)

    response = store.client.put("new.ics", timed("new", "20300106T090000Z", "20300106T100000Z"))

    assert is_failure(response.status)
    assert store.snapshot() == before
    monkeypatch.undo()
    assert store.client.request("GET", CALENDAR + "new.ics").status == 404


@pytest.mark.parametrize("exception", INJECTED)
def test_a_failed_overwrite_keeps_the_old_version_and_its_index(
    store: Store, monkeypatch: pytest.MonkeyPatch, exception: type[Exception]
) -> None:
    before = store.snapshot()
    fail_after(monkeypatch, "_record_change", exception)

    response = store.client.put("kept.ics", timed("kept", "20300201T090000Z", "20300201T100000Z"))

    assert is_failure(response.status)
    assert store.snapshot() == before
    monkeypatch.undo()
    assert store.client.query("20300105T000000Z", "20300106T000000Z") == {CALENDAR + "kept.ics"}
    assert "DTSTART:20300105T090000Z" in store.client.request("GET", CALENDAR + "kept.ics").text


@pytest.mark.parametrize("exception", INJECTED)
def test_a_mkcalendar_failing_halfway_creates_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch, exception: type[Exception]
) -> None:
    bob = Client(store.client.app, user="bob")
    # Radicale creates a principal's folder on first sight, in a request of its own.
    assert bob.request("PROPFIND", "/bob/", DEPTH="0").status == 207
    before = store.snapshot()
    # The calendar row is inserted, then the unit of work fails.
    fail_after(monkeypatch, "create_collection", exception)

    response = bob.request("MKCALENDAR", "/bob/new/", MKCALENDAR_BODY)

    assert is_failure(response.status)
    assert store.snapshot() == before


@pytest.mark.parametrize("exception", INJECTED)
def test_a_whole_calendar_put_failing_halfway_keeps_the_old_calendar(
    store: Store, monkeypatch: pytest.MonkeyPatch, exception: type[Exception]
) -> None:
    before = store.snapshot()
    # Replacing a calendar deletes the old one first; the second of three items then fails.
    fail_after(monkeypatch, "put_item", exception, calls_before_failing=1)
    whole = vcalendar(
        *(
            vevent(f"whole-{n}", f"DTSTART:2030030{n}T090000Z", f"DTEND:2030030{n}T100000Z")
            for n in (1, 2, 3)
        )
    )

    response = store.client.request("PUT", CALENDAR, whole)

    assert is_failure(response.status)
    assert store.snapshot() == before


def test_a_unit_of_work_that_raises_inside_db_write_is_rolled_back(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = store.snapshot()
    fail_after(monkeypatch, "_insert_occurrences", RuntimeError)

    with pytest.raises(RuntimeError, match="injected"), store.database.write(["alice"]) as conn:
        collection = calendars.get_collection(conn, CALENDAR.strip("/"))
        assert collection is not None
        calendars.put_item(
            conn, collection, "direct.ics", timed("direct", "20300107T090000Z", "20300107T100000Z")
        )

    assert store.snapshot() == before


# --- the real server -----------------------------------------------------------------------------


@pytest.fixture
def provider(server: RunningServer) -> str:
    return server.add_user("provider")


def put_text(server: RunningServer, user: str, href: str, body: Any) -> requests.Response:
    return requests.put(
        f"{server.dav_url}{user}/appointments/{href}",
        data=body,
        auth=(user, server.passwords[user]),
        headers={"Content-Type": "text/calendar"},
        timeout=60,
    )


MALFORMED = {
    "not iCalendar": "this is not a calendar",
    "bad DTSTART": event("bad-date", "DTSTART:tomorrow-ish", "DTEND:20300101T100000Z"),
    "unterminated": "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nUID:x\r\n",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_icalendar_is_refused_with_400_and_stores_nothing(
    server: RunningServer, provider: str, body: str
) -> None:
    response = put_text(server, provider, "bad.ics", body.encode())

    assert response.status_code == 400
    got = requests.get(
        f"{server.dav_url}{provider}/appointments/bad.ics",
        auth=(provider, server.passwords[provider]),
        timeout=60,
    )
    assert got.status_code == 404


def test_malformed_icalendar_400_says_what_is_wrong(server: RunningServer, provider: str) -> None:
    response = put_text(server, provider, "bad.ics", MALFORMED["bad DTSTART"].encode())

    assert response.status_code == 400
    assert "DTSTART" in response.text
    until_before_start = event(
        "until@tests",
        "DTSTART:20300101T100000Z",
        "DTEND:20300101T110000Z",
        "RRULE:FREQ=DAILY;UNTIL=20290101T000000Z",
    )
    refused = put_text(server, provider, "until.ics", until_before_start.encode())
    assert refused.status_code == 400
    assert "UNTIL < DTSTART" in refused.text


def large_event(uid: str, description_lines: int) -> bytes:
    """A valid event made large by a long, folded DESCRIPTION."""
    folded = "".join(" " + "x" * 70 + "\r\n" for _ in range(description_lines))
    text = event(uid, "DTSTART:20300101T090000Z", "DTEND:20300101T100000Z", "DESCRIPTION:big")
    return text.replace("DESCRIPTION:big\r\n", "DESCRIPTION:big\r\n" + folded).encode()


def test_a_large_valid_body_is_stored_whole(server: RunningServer, provider: str) -> None:
    body = large_event("large@tests", 10_000)  # about 730 KB, well under the 10 MiB limit

    response = put_text(server, provider, "large.ics", body)

    assert response.status_code == 201, response.text
    got = requests.get(
        f"{server.dav_url}{provider}/appointments/large.ics",
        auth=(provider, server.passwords[provider]),
        timeout=60,
    )
    assert got.status_code == 200
    assert len(got.content) > 700_000


def test_an_oversized_chunked_body_is_refused_with_413_and_stores_nothing(
    server: RunningServer, provider: str
) -> None:
    chunk = b"x" * (1024 * 1024)

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the limit must hold while the body streams in.
        for _ in range(11):
            yield chunk

    response = put_text(server, provider, "big.ics", chunks())

    assert response.status_code == 413
    got = requests.get(
        f"{server.dav_url}{provider}/appointments/big.ics",
        auth=(provider, server.passwords[provider]),
        timeout=60,
    )
    assert got.status_code == 404
