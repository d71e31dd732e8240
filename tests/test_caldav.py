"""CalDAV through the real server, driven by the `caldav` client library (and raw HTTP where a
client library would hide what is on the wire)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from urllib.parse import quote, unquote

import caldav
import pytest
import requests
from caldav.lib.error import AuthorizationError

from tests.conftest import RunningServer


def event_text(uid: str, start: str, end: str, summary: str = "Meeting") -> str:
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//bookdav tests//EN\r\n"
        f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20300101T000000Z\r\n"
        f"DTSTART:{start}\r\nDTEND:{end}\r\nSUMMARY:{summary}\r\n"
        "END:VEVENT\r\nEND:VCALENDAR\r\n"
    )


def client_for(
    server: RunningServer, username: str, password: str | None = None
) -> caldav.DAVClient:
    return caldav.DAVClient(
        url=server.dav_url,
        username=username,
        password=password if password is not None else server.passwords[username],
    )


@pytest.fixture
def provider(server: RunningServer) -> str:
    return server.add_user("provider")


def test_discovery_through_well_known_finds_the_principal_and_provider_calendars(
    server: RunningServer, provider: str
) -> None:
    client = caldav.DAVClient(
        url=f"{server.base_url}/.well-known/caldav",
        username=provider,
        password=server.passwords[provider],
    )
    principal = client.principal()
    assert str(principal.url).rstrip("/").endswith(f"/dav/{provider}")
    names = {calendar.get_display_name() for calendar in principal.calendars()}
    assert {"Appointments", "Availability"} <= names


def test_well_known_redirects_permanently_to_dav(server: RunningServer) -> None:
    response = requests.get(f"{server.base_url}/.well-known/caldav", allow_redirects=False)
    assert response.status_code == 301
    assert response.headers["Location"].endswith("/dav/")


def test_event_lifecycle_put_get_update_delete(server: RunningServer, provider: str) -> None:
    principal = client_for(server, provider).principal()
    calendar = principal.make_calendar(name="Work", cal_id="work")
    uid = f"{uuid.uuid4()}@tests"
    saved = calendar.save_event(event_text(uid, "20300105T100000Z", "20300105T110000Z"))

    fetched = calendar.event_by_uid(uid)
    assert "SUMMARY:Meeting" in fetched.data

    saved.load()
    saved.icalendar_component["summary"] = "Moved meeting"
    saved.save()
    assert "Moved meeting" in calendar.event_by_uid(uid).data

    saved.delete()
    with pytest.raises(caldav.lib.error.NotFoundError):
        calendar.event_by_uid(uid)


def test_time_range_search_returns_only_overlapping_events(
    server: RunningServer, provider: str
) -> None:
    calendar = client_for(server, provider).principal().make_calendar(name="Range", cal_id="range")
    calendar.save_event(event_text("inside@tests", "20300310T090000Z", "20300310T100000Z"))
    calendar.save_event(event_text("outside@tests", "20300420T090000Z", "20300420T100000Z"))
    found = calendar.search(
        start=datetime(2030, 3, 9, tzinfo=UTC),
        end=datetime(2030, 3, 11, tzinfo=UTC),
        event=True,
    )
    assert [event.icalendar_component["uid"] for event in found] == ["inside@tests"]


def test_sync_token_reports_changes_and_deletions(server: RunningServer, provider: str) -> None:
    calendar = client_for(server, provider).principal().make_calendar(name="Sync", cal_id="sync")
    first = calendar.save_event(event_text("one@tests", "20300601T090000Z", "20300601T100000Z"))
    synced = calendar.objects_by_sync_token(load_objects=True)
    assert len(list(synced)) == 1
    token_before = synced.sync_token

    calendar.save_event(event_text("two@tests", "20300602T090000Z", "20300602T100000Z"))
    first.delete()
    updated, deleted = synced.sync()
    assert synced.sync_token != token_before
    assert [unquote(str(obj.url).rsplit("/", 1)[1]) for obj in updated] == ["two@tests.ics"]
    assert [unquote(str(obj.url).rsplit("/", 1)[1]) for obj in deleted] == ["one@tests.ics"]


def test_event_with_non_ascii_href_round_trips(server: RunningServer, provider: str) -> None:
    auth = (provider, server.passwords[provider])
    calendar_url = f"{server.dav_url}{provider}/appointments/"
    href = "Zahnärzt-ÜBUNG-日本.ics"
    url = calendar_url + quote(href)
    body = event_text("umlaut@tests", "20300701T090000Z", "20300701T100000Z", "Übung")
    put = requests.put(
        url, data=body.encode(), auth=auth, headers={"Content-Type": "text/calendar; charset=utf-8"}
    )
    assert put.status_code == 201, put.text
    got = requests.get(url, auth=auth)
    assert got.status_code == 200
    assert "SUMMARY:Übung" in got.text
    listing = requests.request(
        "PROPFIND",
        calendar_url,
        auth=auth,
        headers={"Depth": "1"},
        data=b'<?xml version="1.0"?><propfind xmlns="DAV:"><prop><getetag/></prop></propfind>',
    )
    assert listing.status_code == 207
    assert quote(href) in listing.text


def test_wrong_password_is_refused_with_401(server: RunningServer, provider: str) -> None:
    with pytest.raises(AuthorizationError):
        client_for(server, provider, password="not-the-password").principal()
    response = requests.request(
        "PROPFIND", f"{server.dav_url}{provider}/", auth=(provider, "wrong"), headers={"Depth": "0"}
    )
    assert response.status_code == 401
    assert "Basic" in response.headers.get("WWW-Authenticate", "")


def test_a_user_cannot_read_or_write_another_users_calendars(server: RunningServer) -> None:
    alice, bob = server.add_user("provider"), server.add_user("provider")
    alice_auth = (alice, server.passwords[alice])
    bob_calendar = f"{server.dav_url}{bob}/appointments/"
    requests.put(
        bob_calendar + "private.ics",
        data=event_text("private@tests", "20300801T090000Z", "20300801T100000Z"),
        auth=(bob, server.passwords[bob]),
        headers={"Content-Type": "text/calendar"},
    ).raise_for_status()

    read = requests.get(bob_calendar + "private.ics", auth=alice_auth)
    listing = requests.request("PROPFIND", bob_calendar, auth=alice_auth, headers={"Depth": "1"})
    write = requests.put(
        bob_calendar + "intruder.ics",
        data=event_text("intruder@tests", "20300801T090000Z", "20300801T100000Z"),
        auth=alice_auth,
        headers={"Content-Type": "text/calendar"},
    )
    delete = requests.delete(bob_calendar + "private.ics", auth=alice_auth)
    assert read.status_code in {403, 404}
    assert listing.status_code in {403, 404}
    assert write.status_code in {403, 404}
    assert delete.status_code in {403, 404}
    still_there = requests.get(bob_calendar + "private.ics", auth=(bob, server.passwords[bob]))
    assert still_there.status_code == 200


def test_admins_reach_no_more_than_their_own_calendars(server: RunningServer) -> None:
    admin, provider = server.add_user("admin"), server.add_user("provider")
    response = requests.request(
        "PROPFIND",
        f"{server.dav_url}{provider}/appointments/",
        auth=(admin, server.passwords[admin]),
        headers={"Depth": "1"},
    )
    assert response.status_code in {403, 404}
