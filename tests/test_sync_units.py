"""The sync building blocks on their own: credential encryption, claiming a source (SQLite and
PostgreSQL), what a mirror copy keeps of a remote event, and how a feed splits by UID."""

from __future__ import annotations

import pytest

from bookdav.storage.db import Database
from bookdav.storage.users import User, insert_user
from bookdav.sync import crypto, mirror, sources, store
from tests.storage_fixtures import database  # noqa: F401  (fixture)
from tests.sync_servers import calendar, event


def test_credentials_round_trip_and_a_wrong_or_missing_key_is_refused() -> None:
    token = crypto.encrypt_credentials("key one", {"username": "u", "password": "p"})
    assert "p" not in token.split(".")  # opaque
    assert crypto.decrypt_credentials("key one", token) == {"username": "u", "password": "p"}
    with pytest.raises(crypto.UnreadableCredentials):
        crypto.decrypt_credentials("key two", token)
    with pytest.raises(crypto.MissingSecretKey):
        crypto.encrypt_credentials("", {"username": "u"})
    assert crypto.decrypt_credentials("", None) == {}


def _provider(db: Database) -> User:
    with db.write(["alice"]) as conn:
        return insert_user(
            conn, username="alice", email="a@example.org", role="provider",
            password_hash="x", name="Alice", timezone="Europe/Berlin",
        )  # fmt: skip


def test_two_workers_claiming_one_due_source_get_it_once(database: Database) -> None:  # noqa: F811
    provider = _provider(database)
    with database.write(["alice"]) as conn:
        source = store.create_external_calendar(
            conn, provider, type_="ics", url="https://x.example/a.ics", role="busy",
            credentials=None, show_titles=False, now=1000,
        )  # fmt: skip
    with database.read() as conn:
        seen_by_both = store.due_sources(conn, 2000)
    assert [s.id for s in seen_by_both] == [source.id]
    with database.write() as conn:
        first = store.claim(conn, seen_by_both[0], lease_until=2600)
    with database.write() as conn:
        second = store.claim(conn, seen_by_both[0], lease_until=2600)
    assert (first, second) == (True, False)
    with database.read() as conn:
        assert store.due_sources(conn, 2000) == []
        assert source.collection_path is not None
        assert source.collection_path.startswith("alice/ext-")
    with database.write(["alice"]) as conn:
        store.delete_external_calendar(conn, source)
    with database.read() as conn:
        from bookdav.storage import calendars

        assert calendars.get_collection(conn, source.collection_path) is None


def _source(show_titles: bool = False) -> store.ExternalCalendar:
    return store.ExternalCalendar(
        id="0d7f3c2e-1111-4222-8333-444455556666", provider_id="p", provider_username="alice",
        type="caldav", url="https://x.example/cal/", role="busy", credentials=None,
        show_titles=show_titles, collection_path="alice/ext-0d7f3c2e1111", state={},
        last_success_at=None, last_error=None, failures=0, next_run_at=0, created_at=0,
    )  # fmt: skip


def test_a_mirror_copy_keeps_the_times_and_drops_everything_else() -> None:
    remote = calendar(
        event(
            "DTSTART;TZID=Europe/Berlin:20270104T090000",
            "DTEND;TZID=Europe/Berlin:20270104T100000",
            "RRULE:FREQ=WEEKLY;COUNT=5",
            "EXDATE;TZID=Europe/Berlin:20270111T090000",
            "SUMMARY:Secret project",
            "DESCRIPTION:notes",
            "ATTENDEE:mailto:boss@example.org",
            uid="series@remote",
        ),
        event(
            "RECURRENCE-ID;TZID=Europe/Berlin:20270118T090000",
            "DTSTART;TZID=Europe/Berlin:20270118T120000",
            "DTEND;TZID=Europe/Berlin:20270118T130000",
            "TRANSP:TRANSPARENT",
            uid="series@remote",
        ),
    )
    block = mirror.busy_block(_source(), remote)
    assert block is not None
    uid, text = block
    assert uid == mirror.mirror_uid(_source(), "series@remote") and "series@remote" not in text
    for kept in ("RRULE:FREQ=WEEKLY;COUNT=5", "EXDATE;TZID=Europe/Berlin:20270111T090000",
                 "RECURRENCE-ID;TZID=Europe/Berlin:20270118T090000", "TRANSP:TRANSPARENT"):  # fmt: skip
        assert kept in text
    assert "Secret project" not in text and "notes" not in text and "ATTENDEE" not in text
    assert text.count("SUMMARY:Busy") == 2
    titled = mirror.busy_block(_source(show_titles=True), remote)
    assert titled is not None and "SUMMARY:Secret project" in titled[1]
    own = calendar(event("DTSTART:20270104T090000Z", uid="abc@bookdav"))
    assert mirror.busy_block(_source(), own) is None  # a booking bookdav pushed itself


def test_a_feed_splits_into_one_object_per_uid_and_rejects_what_is_not_icalendar() -> None:
    body = calendar(
        event("DTSTART:20270104T090000Z", "RRULE:FREQ=DAILY;COUNT=3", uid="a"),
        event("RECURRENCE-ID:20270105T090000Z", "DTSTART:20270105T150000Z", uid="a"),
        event("DTSTART;VALUE=DATE:20270110", uid="b"),
    ).encode()
    objects = sources.split_feed(body)
    assert sorted(o.href for o in objects) == ["uid:a", "uid:b"]
    assert next(o for o in objects if o.href == "uid:a").text.count("BEGIN:VEVENT") == 2
    assert sources.split_feed(body)[0].etag == objects[0].etag  # stable digests
    for garbage in (b"", b"<html>login</html>", b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\n"):
        with pytest.raises(sources.FeedRejected):
            sources.split_feed(garbage)


def test_hrefs_spelled_differently_by_a_server_compare_equal() -> None:
    assert sources.canonical_href("/cal/a%40b.ics") == sources.canonical_href("/cal/a@b.ics")
    assert sources.canonical_href("/cal/a b.ics") == sources.canonical_href("/cal/a%20b.ics")
    assert sources.canonical_href("/cal/a b.ics") == "/cal/a%20b.ics"
