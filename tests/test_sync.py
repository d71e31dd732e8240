"""Busy time pulled from external calendars: real Xandikos and Radicale servers and an ICS feed on
loopback, a real `bookdav serve`; each cycle is triggered through the API (or the CLI)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import (
    RunningServer,
    bookdav_command,
    clean_env,
    require_postgres,
    start_server,
)
from tests.sync_servers import (
    RADICALE_USER,
    DavServer,
    FeedServer,
    calendar,
    event,
    free_port,
    start_radicale,
    start_xandikos,
)
from tests.test_api_users import assert_problem
from tests.test_appointments import booking_body
from tests.test_availability import BERLIN, Provider, make_provider, next_monday, stamp

# The remotes of these tests live on loopback, which a production server refuses to reach. The
# tests trigger each pull themselves, so the server's own worker (tested on its own) stays off.
SYNC_SECTION = (
    "[sync]\nsecret_key = test-only-secret-key-0123456789\ninterval_seconds = 3600\n"
    "allow_private_networks = true\nworker = false\n"
)


@pytest.fixture(scope="module")
def sync_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("sync-server"), extra=SYNC_SECTION)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pg_sync_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("pg-sync-server"),
        database_url=require_postgres(),
        extra=SYNC_SECTION,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def xandikos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DavServer]:
    server = start_xandikos(tmp_path_factory.mktemp("xandikos"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def radicale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DavServer]:
    server = start_radicale(tmp_path_factory.mktemp("radicale"))
    yield server
    server.stop()


@pytest.fixture
def feed() -> Iterator[FeedServer]:
    server = FeedServer()
    yield server
    server.stop()


@pytest.fixture
def provider(sync_server: RunningServer) -> Provider:
    return make_provider(sync_server)


def calendars_url(provider: Provider) -> str:
    return f"{provider.server.base_url}/api/v1/providers/{provider.user_id}/calendars"


def add_calendar(provider: Provider, **body: Any) -> dict[str, Any]:
    response = requests.post(calendars_url(provider), json=body, auth=provider.auth)
    assert response.status_code == 201, response.text
    return dict(response.json())


def add_busy_caldav(provider: Provider, remote: DavServer, **extra: Any) -> dict[str, Any]:
    credentials = {"username": remote.auth[0], "password": remote.auth[1]} if remote.auth else {}
    return add_calendar(
        provider, type="caldav", url=remote.calendar_url, role="busy", **credentials, **extra
    )


def sync(provider: Provider, source: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(
        f"{calendars_url(provider)}/{source['calendarId']}/sync", auth=provider.auth
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def hours_free(provider: Provider, day: date) -> set[str]:
    """The HH:MM of each free slot that day."""
    return {slot[11:16] for slot in provider.slots(day)}


def berlin(day: date, hour: int) -> str:
    return datetime(day.year, day.month, day.day, hour, tzinfo=BERLIN).isoformat()


def remote_name() -> str:
    return f"{uuid.uuid4().hex}.ics"


def test_a_remote_caldav_event_blocks_its_slot_after_one_cycle_and_deleting_it_frees_it(
    provider: Provider, xandikos: DavServer
) -> None:
    monday = next_monday(3)
    source = add_busy_caldav(provider, xandikos)
    assert sync(provider, source)["cycle"]["ok"]
    assert {"10:00", "10:30"} <= hours_free(provider, monday)
    name = remote_name()
    xandikos.put(name, calendar(event(f"DTSTART:{stamp(monday, 10)}", f"DTEND:{stamp(monday, 11)}",
                                      "SUMMARY:Board meeting")))  # fmt: skip

    cycle = sync(provider, source)["cycle"]
    assert cycle == {**cycle, "ok": True, "written": 1, "deleted": 0}
    free = hours_free(provider, monday)
    assert "10:00" not in free and "10:30" not in free and "11:00" in free
    # The booking's own re-check sees the mirror too, not only slot search.
    taken = requests.post(
        f"{provider.server.base_url}/api/v1/appointments",
        json=booking_body(provider, berlin(monday, 10)),
    )
    assert taken.status_code == 409, taken.text

    xandikos.delete(name)
    cycle = sync(provider, source)["cycle"]
    assert cycle["deleted"] == 1
    assert {"10:00", "10:30"} <= hours_free(provider, monday)


def test_all_day_and_weekly_remote_events_block_the_day_and_every_week(
    provider: Provider, radicale: DavServer
) -> None:
    monday = next_monday(5)
    tuesday = monday + timedelta(days=1)
    source = add_busy_caldav(provider, radicale)
    all_day, all_day_uid = remote_name(), str(uuid.uuid4())
    radicale.put(all_day, calendar(event(
        f"DTSTART;VALUE=DATE:{tuesday:%Y%m%d}",
        f"DTEND;VALUE=DATE:{tuesday + timedelta(days=1):%Y%m%d}",
        "SUMMARY:Conference",
        uid=all_day_uid,
    )))  # fmt: skip
    radicale.put(remote_name(), calendar(event(
        f"DTSTART;TZID=Europe/Berlin:{monday:%Y%m%d}T140000",
        f"DTEND;TZID=Europe/Berlin:{monday:%Y%m%d}T150000",
        "RRULE:FREQ=WEEKLY;COUNT=3",
        "SUMMARY:Weekly review",
    )))  # fmt: skip
    assert sync(provider, source)["cycle"]["written"] == 2

    assert hours_free(provider, tuesday) == set()
    for week in range(3):
        free = hours_free(provider, monday + timedelta(weeks=week))
        assert "14:00" not in free and "14:30" not in free and "15:00" in free, week
    assert "14:00" in hours_free(provider, monday + timedelta(weeks=3))  # COUNT=3 ended

    # Made transparent remotely ("show as free"): the day is free again after one cycle.
    radicale.put(all_day, calendar(event(
        f"DTSTART;VALUE=DATE:{tuesday:%Y%m%d}",
        f"DTEND;VALUE=DATE:{tuesday + timedelta(days=1):%Y%m%d}",
        "TRANSP:TRANSPARENT",
        "SUMMARY:Conference (optional)",
        uid=all_day_uid,
    )))  # fmt: skip
    assert sync(provider, source)["cycle"]["written"] == 1
    assert len(hours_free(provider, tuesday)) == 16


def test_titles_stay_private_unless_the_provider_opts_in_and_the_mirror_is_read_only(
    provider: Provider, xandikos: DavServer
) -> None:
    monday = next_monday(7)
    xandikos.put(remote_name(), calendar(event(
        f"DTSTART:{stamp(monday, 9)}", f"DTEND:{stamp(monday, 10)}", "SUMMARY:Therapy session",
        "DESCRIPTION:very private", "LOCATION:Somewhere",
    )))  # fmt: skip
    hidden = add_busy_caldav(provider, xandikos)
    shown = add_busy_caldav(provider, xandikos, showTitles=True)
    sync(provider, hidden), sync(provider, shown)
    dav = provider.server.dav_url + provider.username
    hidden_path = hidden["mirrorUrl"].split("/dav/", 1)[1]
    shown_path = shown["mirrorUrl"].split("/dav/", 1)[1]
    for path, title_visible in ((hidden_path, False), (shown_path, True)):
        report = requests.request(
            "REPORT",
            f"{provider.server.dav_url}{path}",
            auth=provider.auth,
            headers={"Depth": "1", "Content-Type": "application/xml"},
            data=(
                '<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">'
                "<D:prop><C:calendar-data/></D:prop><C:filter>"
                '<C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter>'
                "</C:filter></C:calendar-query>"
            ),
        )
        assert report.status_code == 207, report.text
        assert ("Therapy session" in report.text) is title_visible
        assert "very private" not in report.text and "Somewhere" not in report.text
        assert ("SUMMARY:Busy" in report.text) is not title_visible
    write = requests.put(
        f"{provider.server.dav_url}{hidden_path}mine.ics",
        data=calendar(event(f"DTSTART:{stamp(monday, 12)}", f"DTEND:{stamp(monday, 13)}")),
        auth=provider.auth,
        headers={"Content-Type": "text/calendar"},
    )
    assert write.status_code == 403
    assert (
        requests.delete(f"{provider.server.dav_url}{hidden_path}", auth=provider.auth).status_code
        == 403
    )
    assert (
        requests.request(
            "PROPFIND", dav + "/", auth=provider.auth, headers={"Depth": "1"}
        ).status_code
        == 207
    )


def test_a_feed_is_pulled_with_etags_and_garbage_is_rejected_keeping_the_blocks(
    provider: Provider, feed: FeedServer
) -> None:
    monday = next_monday(9)
    feed.body = calendar(
        event(f"DTSTART:{stamp(monday, 9)}", f"DTEND:{stamp(monday, 10)}", "SUMMARY:A"),
        event(f"DTSTART:{stamp(monday, 13)}", f"DTEND:{stamp(monday, 14)}", "SUMMARY:B"),
        event(f"DTSTART:{stamp(monday, 15)}", f"DTEND:{stamp(monday, 16)}", "TRANSP:TRANSPARENT"),
    ).encode()
    source = add_calendar(provider, type="ics", url=feed.url, role="busy")
    assert sync(provider, source)["cycle"]["ok"]
    blocked = {"09:00", "09:30", "13:00", "13:30"}
    assert not blocked & hours_free(provider, monday)
    assert {"15:00", "15:30"} <= hours_free(provider, monday)

    before = feed.requests
    unchanged = sync(provider, source)["cycle"]
    assert feed.requests - before == 1 and feed.not_modified >= 1
    assert unchanged == {**unchanged, "requests": 1, "written": 0, "deleted": 0}
    assert unchanged["bytesReceived"] == 0

    feed.body = b"<html><body>Sign in to view this calendar</body></html>"
    rejected = sync(provider, source)
    assert rejected["cycle"]["ok"] is False
    assert "not an iCalendar feed" in rejected["lastError"]
    assert rejected["failures"] == 1
    assert not blocked & hours_free(provider, monday)  # the previous blocks stay
    assert "FeedRejected" in provider.server.log_text()

    feed.body = calendar(
        event(f"DTSTART:{stamp(monday, 9)}", f"DTEND:{stamp(monday, 10)}", "SUMMARY:A"),
        event("DTSTART:BROKEN", "SUMMARY:odd one"),
    ).encode()
    recovered = sync(provider, source)
    assert (
        recovered["cycle"]["ok"] and recovered["failures"] == 0 and recovered["lastError"] is None
    )
    assert recovered["cycle"]["skipped"] == 1  # the odd event, logged; the rest went on
    assert '"remote event skipped"' in provider.server.log_text()
    free = hours_free(provider, monday)
    assert "09:00" not in free and {"13:00", "13:30"} <= free


def test_a_remote_that_is_down_or_answers_500_or_401_backs_off_and_says_why(
    provider: Provider, feed: FeedServer, radicale: DavServer
) -> None:
    monday = next_monday(11)
    feed.body = calendar(
        event(f"DTSTART:{stamp(monday, 9)}", f"DTEND:{stamp(monday, 10)}")
    ).encode()
    source = add_calendar(provider, type="ics", url=feed.url, role="busy")
    assert sync(provider, source)["cycle"]["ok"]

    feed.status = 500
    first = sync(provider, source)
    second = sync(provider, source)
    assert "answered 500" in first["lastError"]
    assert (first["failures"], second["failures"]) == (1, 2)
    wait_first = _seconds_until(first["nextRunAt"])
    wait_second = _seconds_until(second["nextRunAt"])
    assert 20 <= wait_first <= 31 and 50 <= wait_second <= 61  # 30 s, then 60 s
    assert "09:00" not in hours_free(provider, monday)  # nothing lost meanwhile

    down = add_calendar(
        provider, type="caldav", url=f"http://127.0.0.1:{free_port()}/cal/", role="busy"
    )
    refused = sync(provider, down)
    assert refused["failures"] == 1 and "ClientConnectorError" in refused["lastError"]

    wrong = add_calendar(
        provider, type="caldav", url=radicale.calendar_url, role="busy",
        username=RADICALE_USER[0], password="wrong",
    )  # fmt: skip
    unauthorized = sync(provider, wrong)
    assert unauthorized["failures"] == 1 and "401" in unauthorized["lastError"]

    listed = requests.get(calendars_url(provider), auth=provider.auth).json()["items"]
    by_id = {item["calendarId"]: item for item in listed}
    assert by_id[wrong["calendarId"]]["lastError"] == unauthorized["lastError"]
    assert by_id[source["calendarId"]]["lastSuccessAt"] is not None
    assert requests.get(f"{provider.server.base_url}/healthz").status_code == 200

    feed.status = 200
    assert sync(provider, source)["failures"] == 0


def _seconds_until(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - time.time()


def test_a_thousand_remote_events_sync_in_one_cycle_and_an_unchanged_cycle_costs_one_request(
    provider: Provider, tmp_path: Path
) -> None:
    from tests.sync_servers import many_events

    radicale = start_radicale(tmp_path / "bulk")
    try:
        body = calendar(*(text for _uid, text in many_events(1000)))
        response = requests.put(
            radicale.calendar_url, data=body.encode(), auth=radicale.auth,
            headers={"Content-Type": "text/calendar"},
        )  # fmt: skip
        assert response.status_code in (200, 201), response.text
        source = add_busy_caldav(provider, radicale)
        first = sync(provider, source)["cycle"]
        assert first["ok"] and first["written"] == 1000
        assert first["seconds"] < 20
        assert first["requests"] <= 12  # one sync-collection REPORT, ten multigets
        second = sync(provider, source)["cycle"]
        assert second["requests"] == 1 and second["written"] == 0
        assert second["bytesReceived"] < 2000
    finally:
        radicale.stop()


def test_calendars_api_validates_and_never_returns_secrets(
    provider: Provider, server: RunningServer, sync_server: RunningServer
) -> None:
    url = calendars_url(provider)
    for body, field in [
        ({"type": "exchange", "url": "https://x.example/", "role": "busy"}, "type"),
        ({"type": "ics", "url": "ftp://x.example/a.ics", "role": "busy"}, "url"),
        ({"type": "ics", "url": "https://x.example/a.ics", "role": "destination"}, "role"),
        ({"type": "caldav", "url": "https://x.example/", "role": "mirror"}, "role"),
        ({"type": "caldav", "url": "https://u:p@x.example/", "role": "busy"}, "url"),
        ({"type": "caldav", "url": "https://x.example/", "role": "busy", "password": "p"},
         "username"),
        ({"type": "caldav", "url": "https://x.example/", "role": "busy", "oauth": {}},
         "tokenUrl"),
    ]:  # fmt: skip
        assert_problem(requests.post(url, json=body, auth=provider.auth), 400, field)
    made = add_calendar(
        provider, type="caldav", url="https://caldav.example.org/cal/", role="destination",
        username="me", password="app-password-123",
    )  # fmt: skip
    assert made["credentials"] == "basic" and made["mirrorUrl"] is None
    webcal = add_calendar(
        provider, type="ics", url="webcal://calendar.example.org/f.ics", role="busy"
    )
    assert webcal["url"] == "https://calendar.example.org/f.ics"
    listing = requests.get(url, auth=provider.auth)
    assert "app-password-123" not in listing.text and "app-password-123" not in str(made)
    stranger = make_provider(sync_server)
    assert_problem(requests.get(url, auth=stranger.auth), 403)
    admin = sync_server.add_user("admin")
    as_admin = requests.get(url, auth=(admin, sync_server.passwords[admin]))
    assert as_admin.status_code == 200 and len(as_admin.json()["items"]) == 2

    # A server without [sync] secret_key refuses credentials, with a reason.
    elsewhere = make_provider(server)
    refused = requests.post(
        calendars_url(elsewhere),
        json={"type": "caldav", "url": "https://x.example/", "role": "busy",
              "username": "u", "password": "p"},
        auth=elsewhere.auth,
    )  # fmt: skip
    assert_problem(refused, 422)
    assert "secret_key" in refused.json()["detail"]


def test_deleting_a_source_removes_its_mirror_and_frees_the_time(
    provider: Provider, feed: FeedServer
) -> None:
    monday = next_monday(13)
    feed.body = calendar(
        event(f"DTSTART:{stamp(monday, 9)}", f"DTEND:{stamp(monday, 10)}")
    ).encode()
    source = add_calendar(provider, type="ics", url=feed.url, role="busy")
    sync(provider, source)
    assert "09:00" not in hours_free(provider, monday)
    deleted = requests.delete(
        f"{calendars_url(provider)}/{source['calendarId']}", auth=provider.auth
    )
    assert deleted.status_code == 204
    assert "09:00" in hours_free(provider, monday)
    assert requests.request("PROPFIND", source["mirrorUrl"], auth=provider.auth).status_code == 404
    assert requests.get(calendars_url(provider), auth=provider.auth).json()["items"] == []


def test_sync_run_pulls_each_source_once_with_a_progress_line(
    provider: Provider, feed: FeedServer
) -> None:
    monday = next_monday(15)
    feed.body = calendar(
        event(f"DTSTART:{stamp(monday, 11)}", f"DTEND:{stamp(monday, 12)}")
    ).encode()
    add_calendar(provider, type="ics", url=feed.url, role="busy")
    result = subprocess.run(
        bookdav_command(
            "sync", "run", "--config", str(provider.server.config_path),
            "--provider", provider.username,
        ),
        capture_output=True, text=True, env=clean_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(f"{provider.username} ") and " ok: 1 written" in lines[0]
    assert "secret-feed-token" not in result.stdout  # the feed's query string is a secret
    assert lines[1] == "1 sources pulled, 0 failed"
    assert "11:00" not in hours_free(provider, monday)


def test_oauth_bearer_tokens_are_fetched_and_refreshed_when_the_remote_says_401(
    provider: Provider, feed: FeedServer
) -> None:
    monday = next_monday(17)
    feed.body = calendar(
        event(f"DTSTART:{stamp(monday, 9)}", f"DTEND:{stamp(monday, 10)}")
    ).encode()
    feed.bearer = "access-1"
    token_url = feed.url.split("/calendar.ics")[0] + "/token"
    oauth = {
        "tokenUrl": token_url,
        "clientId": "c",
        "clientSecret": "s",
        "refreshToken": "refresh-1",
    }
    source = add_calendar(provider, type="ics", url=feed.url, role="busy", oauth=oauth)
    assert source["credentials"] == "oauth"
    assert sync(provider, source)["cycle"]["ok"]
    assert feed.token_requests == 1
    feed.bearer = "access-2"  # the access token expired early: one refresh, then on
    feed.body += b"\r\n"
    assert sync(provider, source)["cycle"]["ok"]
    assert feed.token_requests == 2
    assert "09:00" not in hours_free(provider, monday)


def test_without_sync_collection_or_with_a_refused_token_a_pull_falls_back_and_stays_right(
    provider: Provider, xandikos: DavServer
) -> None:
    from sqlalchemy import update

    from bookdav.storage.db import database_for
    from bookdav.storage.schema import external_calendars

    monday = next_monday(19)
    source = add_busy_caldav(provider, xandikos)
    database = database_for(provider.server.database_url)

    def set_state(state: str) -> None:
        with database.write() as conn:
            conn.execute(
                update(external_calendars)
                .where(external_calendars.c.id == source["calendarId"])
                .values(state=state)
            )

    # A sync token the server does not know: it starts over with a full listing.
    set_state('{"mode": "sync", "syncToken": "http://example.invalid/ns/sync/42"}')
    assert sync(provider, source)["cycle"]["ok"]

    # The CTag path (servers without RFC 6578): one PROPFIND when nothing changed.
    set_state('{"mode": "ctag"}')
    assert sync(provider, source)["cycle"]["ok"]
    again = sync(provider, source)["cycle"]
    assert again["requests"] == 1 and again["written"] == again["deleted"] == 0
    name = remote_name()
    xandikos.put(
        name, calendar(event(f"DTSTART:{stamp(monday, 15)}", f"DTEND:{stamp(monday, 16)}"))
    )
    added = sync(provider, source)["cycle"]
    assert added["written"] == 1 and added["requests"] == 3  # CTag, ETags, one multiget
    assert "15:00" not in hours_free(provider, monday)
    xandikos.delete(name)
    assert sync(provider, source)["cycle"]["deleted"] == 1
    assert "15:00" in hours_free(provider, monday)


def test_the_worker_inside_serve_pulls_on_its_interval_without_being_asked(
    tmp_path: Path, feed: FeedServer
) -> None:
    running = start_server(
        tmp_path / "interval",
        extra="[sync]\nsecret_key = k-0123456789abcdef\ninterval_seconds = 1\n"
        "allow_private_networks = true\n",
    )
    try:
        provider = make_provider(running)
        monday = next_monday(21)
        feed.body = calendar(
            event(f"DTSTART:{stamp(monday, 9)}", f"DTEND:{stamp(monday, 10)}")
        ).encode()
        add_calendar(provider, type="ics", url=feed.url, role="busy")
        deadline = time.monotonic() + 30
        while "09:00" in hours_free(provider, monday):
            assert time.monotonic() < deadline, "the worker never pulled"
            time.sleep(0.3)
        feed.body = calendar().encode()  # the remote event is gone: freed on a later turn
        while "09:00" not in hours_free(provider, monday):
            assert time.monotonic() < deadline, "the worker never pulled again"
            time.sleep(0.3)
        assert '"external calendar pulled"' in running.log_text()
    finally:
        running.stop()


def test_by_default_a_source_cannot_make_the_server_reach_its_own_network(
    server: RunningServer, feed: FeedServer
) -> None:
    provider = make_provider(server)  # a server with the default [sync] settings
    for url in (feed.url, feed.url.replace("127.0.0.1", "localhost"), "http://10.1.2.3/cal.ics"):
        source = add_calendar(provider, type="ics", url=url, role="busy")
        refused = sync(provider, source)
        assert refused["cycle"]["ok"] is False
        assert "non-public address" in refused["lastError"], refused["lastError"]
    assert feed.requests == 0


def test_on_postgresql_remote_events_block_and_free_slots_and_feeds_pull_incrementally(
    pg_sync_server: RunningServer, xandikos: DavServer, feed: FeedServer
) -> None:
    test_a_remote_caldav_event_blocks_its_slot_after_one_cycle_and_deleting_it_frees_it(
        make_provider(pg_sync_server), xandikos
    )
    test_a_feed_is_pulled_with_etags_and_garbage_is_rejected_keeping_the_blocks(
        make_provider(pg_sync_server), feed
    )
