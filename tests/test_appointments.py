"""Booking over /api/v1/appointments against the real server: atomic, idempotent, in calendars."""

from __future__ import annotations

import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from typing import Any

import caldav
import pytest
import requests
from sqlalchemy import func, select

from bookdav.booking.appointments import confirmation_code, new_appointment_id
from bookdav.storage.db import database_for
from bookdav.storage.schema import appointments, collections, items, outbox
from tests.conftest import RunningServer
from tests.test_api_users import assert_problem
from tests.test_availability import Provider, make_provider, next_monday, stamp, vevent


def _api_instant(day: Any, hour: int, minute: int = 0) -> str:
    """A Berlin wall-clock time as an API instant (in UTC)."""
    raw = stamp(day, hour, minute)  # 20270607T080000Z
    return f"{raw[0:4]}-{raw[4:6]}-{raw[6:8]}T{raw[9:11]}:{raw[11:13]}:{raw[13:15]}+00:00"


def booking_body(provider: Provider, start: str, **extra: Any) -> dict[str, Any]:
    return {
        "serviceId": provider.service_id,
        "providerId": provider.user_id,
        "startTime": start,
        "client": {
            "name": "Ann Example",
            "email": "ann@example.org",
            "timezone": "America/New_York",
        },
        **extra,
    }


def count_bookings(provider: Provider) -> tuple[int, int]:
    """(appointment rows, appointment VEVENTs) of this provider."""
    with database_for(provider.server.database_url).read() as conn:
        rows = conn.execute(
            select(func.count())
            .select_from(appointments)
            .where(appointments.c.provider_id == provider.user_id)
        ).scalar_one()
        events = conn.execute(
            select(func.count())
            .select_from(items)
            .join(collections, collections.c.id == items.c.collection_id)
            .where(
                collections.c.path == f"{provider.username}/appointments",
                items.c.text.contains("X-BOOKDAV-APPOINTMENT-ID"),
            )
        ).scalar_one()
    return rows, events


def book(provider: Provider, start: str, **extra: Any) -> requests.Response:
    return requests.post(
        f"{provider.server.base_url}/api/v1/appointments",
        json=booking_body(provider, start, **extra),
    )


@pytest.fixture
def provider(server: RunningServer) -> Provider:
    return make_provider(server)


def test_a_guest_books_a_free_slot_and_it_is_a_real_calendar_event(provider: Provider) -> None:
    monday = next_monday(7)
    response = book(provider, _api_instant(monday, 10), notes="First visit")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "confirmed"
    assert uuid.UUID(body["appointmentId"]).version == 7
    assert body["startTime"].endswith("-04:00") or body["startTime"].endswith("-05:00")
    assert body["client"]["timezone"] == "America/New_York"
    assert body["manageUrl"].startswith(provider.server.base_url + "/manage/")
    assert f"{monday.isoformat()}T10:00:00" not in " ".join(provider.slots(monday))

    principal = caldav.DAVClient(
        url=provider.server.dav_url,
        username=provider.username,
        password=provider.server.passwords[provider.username],
    ).principal()
    calendar = next(c for c in principal.calendars() if c.get_display_name() == "Appointments")
    event = calendar.event_by_uid(f"{body['appointmentId']}@bookdav")
    component = event.icalendar_component
    assert str(component["status"]) == "CONFIRMED"
    assert int(component["sequence"]) == 0
    assert str(component["organizer"]) == f"mailto:{provider.username}@example.org"
    attendee = component["attendee"]
    assert str(attendee) == "mailto:ann@example.org"
    assert attendee.params["RSVP"] == "TRUE" and attendee.params["PARTSTAT"] == "NEEDS-ACTION"
    assert str(component["x-bookdav-appointment-id"]) == body["appointmentId"]
    assert "Consultation" in str(component["summary"])
    assert body["manageUrl"] in str(component["description"])

    with database_for(provider.server.database_url).read() as conn:
        kinds = (
            conn.execute(
                select(outbox.c.kind).where(outbox.c.appointment_id == body["appointmentId"])
            )
            .scalars()
            .all()
        )
    # The invitation, the provider's notice, and the two default reminders (24 h and 1 h before).
    assert sorted(kinds) == ["client.imip", "client.reminder", "client.reminder", "provider.notice"]


def event_summary(provider: Provider, appointment_id: str) -> str:
    with database_for(provider.server.database_url).read() as conn:
        text = conn.execute(
            select(items.c.text).where(items.c.href == f"{appointment_id}.ics")
        ).scalar_one()
    return next(line for line in text.splitlines() if line.startswith("SUMMARY:"))


def test_a_booking_prepared_from_a_service_that_changed_since_is_built_again(
    provider: Provider,
) -> None:
    """The server prepares a booking's event before its transaction from what the previous
    booking of this provider and service read; renamed in between, the event has the new name."""
    monday = next_monday(12)
    first = book(provider, _api_instant(monday, 9)).json()
    assert event_summary(provider, first["appointmentId"]) == "SUMMARY:Consultation: Ann Example"
    renamed = requests.put(
        f"{provider.server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={"name": "Second opinion"},
    )
    assert renamed.status_code == 200, renamed.text
    second = book(provider, _api_instant(monday, 10)).json()
    assert event_summary(provider, second["appointmentId"]) == "SUMMARY:Second opinion: Ann Example"
    third = book(provider, _api_instant(monday, 11)).json()  # prepared from the new name
    assert event_summary(provider, third["appointmentId"]) == "SUMMARY:Second opinion: Ann Example"
    with database_for(provider.server.database_url).read() as conn:
        kinds = conn.execute(
            select(outbox.c.appointment_id, outbox.c.kind).where(
                outbox.c.appointment_id.in_([first["appointmentId"], third["appointmentId"]])
            )
        ).all()
    # Built before the transaction or in it, a booking owes the same rows.
    for appointment_id in (first["appointmentId"], third["appointmentId"]):
        assert sorted(kind for owner, kind in kinds if owner == appointment_id) == [
            "client.imip",
            "client.reminder",
            "client.reminder",
            "provider.notice",
        ]


def test_the_event_shows_in_sync_collection_right_after_the_201(provider: Provider) -> None:
    principal = caldav.DAVClient(
        url=provider.server.dav_url,
        username=provider.username,
        password=provider.server.passwords[provider.username],
    ).principal()
    calendar = next(c for c in principal.calendars() if c.get_display_name() == "Appointments")
    synced = calendar.objects_by_sync_token(load_objects=False)
    response = book(provider, _api_instant(next_monday(7), 11))
    assert response.status_code == 201
    updated, _ = synced.sync()
    assert [str(o.url).rsplit("/", 1)[1] for o in updated] == [
        f"{response.json()['appointmentId']}.ics"
    ]


def test_two_hundred_clients_racing_for_one_slot_get_one_booking(provider: Provider) -> None:
    start = _api_instant(next_monday(8), 9)
    barrier = threading.Barrier(50)

    def attempt(_: int) -> int:
        barrier.wait() if _ < 50 else None
        return book(provider, start).status_code

    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(attempt, range(200)))
    assert statuses.count(201) == 1, statuses
    assert statuses.count(409) == 199
    assert count_bookings(provider) == (1, 1)


def test_the_early_look_refuses_only_what_book_would_refuse(provider: Provider) -> None:
    """`refuse_early` (the stampede's shortcut on reader threads) says 409 for a taken slot, 422
    for a never-bookable one, and nothing for a free one; `book` still decides under the lock."""
    from bookdav.booking import appointments as booking
    from bookdav.server.api.validation import iso_instant

    taken = _api_instant(next_monday(8), 11)
    assert book(provider, taken).status_code == 201
    client = booking.Client("Early", "early@example.org", "UTC")

    def look(start: str) -> None:
        at = int(iso_instant(start, "start").timestamp())
        request = booking.BookingRequest(provider.service_id, provider.user_id, at, client)
        with database_for(provider.server.database_url).read() as conn:
            booking.refuse_early(conn, request)

    with pytest.raises(booking.SlotTaken):
        look(taken)
    with pytest.raises(booking.NotBookable):
        look(_api_instant(next_monday(8), 10, 15))  # off the grid
    look(_api_instant(next_monday(8), 12))  # free: no answer, `book` decides


def test_a_retried_request_with_the_same_idempotency_key_books_once(provider: Provider) -> None:
    url = f"{provider.server.base_url}/api/v1/appointments"
    body = booking_body(provider, _api_instant(next_monday(7), 14))
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    first = requests.post(url, json=body, headers=headers)
    again = requests.post(url, json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    other = requests.post(url, json={**body, "notes": "different"}, headers=headers)
    assert_problem(other, 422)
    assert count_bookings(provider)[0] == 1


def test_times_outside_hours_off_grid_or_too_soon_are_422(provider: Provider) -> None:
    monday = next_monday(7)
    assert_problem(book(provider, _api_instant(monday, 7)), 422)  # before hours
    assert_problem(book(provider, _api_instant(monday, 10, 15)), 422)  # off the 30-min grid
    assert_problem(book(provider, _api_instant(monday + timedelta(days=5), 10)), 422)  # Saturday
    assert_problem(book(provider, "2020-01-06T09:00:00+00:00"), 422)  # the past


def test_an_event_typed_into_a_calendar_makes_the_slot_409(provider: Provider) -> None:
    monday = next_monday(9)
    provider.put_event(vevent(f"DTSTART:{stamp(monday, 15)}", f"DTEND:{stamp(monday, 16)}"))
    response = book(provider, _api_instant(monday, 15, 30))
    assert_problem(response, 409)


def test_reschedule_keeps_the_uid_and_raises_the_sequence(provider: Provider) -> None:
    monday = next_monday(10)
    created = book(provider, _api_instant(monday, 9)).json()
    code = created["confirmationCode"]
    url = f"{provider.server.base_url}/api/v1/appointments/{created['appointmentId']}"
    moved = requests.put(
        url, params={"code": code}, json={"startTime": _api_instant(monday, 9, 30)}
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["sequence"] == 1
    slots = provider.slots(monday)
    assert any("T09:00:00" in s for s in slots) and not any("T09:30:00" in s for s in slots)
    taken = book(provider, _api_instant(monday, 10)).json()
    clash = requests.put(url, params={"code": code}, json={"startTime": taken["startTime"]})
    assert_problem(clash, 409)


def test_cancel_frees_the_slot_and_keeps_a_cancelled_event(provider: Provider) -> None:
    monday = next_monday(11)
    created = book(provider, _api_instant(monday, 11)).json()
    url = f"{provider.server.base_url}/api/v1/appointments/{created['appointmentId']}"
    cancelled = requests.delete(url, auth=provider.auth, json={"cancellationReason": "ill"})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert any("T11:00:00" in s for s in provider.slots(monday))
    event = requests.get(
        f"{provider.server.dav_url}{provider.username}/appointments/{created['appointmentId']}.ics",
        auth=provider.auth,
    )
    assert "STATUS:CANCELLED" in event.text and "SEQUENCE:1" in event.text
    assert book(provider, _api_instant(monday, 11)).status_code == 201


def test_a_client_inside_the_cancellation_notice_is_refused_naming_the_policy(
    provider: Provider,
) -> None:
    requests.put(
        f"{provider.server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={"rules": {"cancellationNoticeMinutes": 525_600}},
    ).raise_for_status()
    created = book(provider, _api_instant(next_monday(7), 16)).json()
    url = f"{provider.server.base_url}/api/v1/appointments/{created['appointmentId']}"
    refused = requests.delete(url, params={"code": created["confirmationCode"]}, json={})
    assert_problem(refused, 422)
    assert "525600" in refused.json()["detail"]
    assert requests.delete(url, auth=provider.auth, json={}).status_code == 200


def test_recurring_appointments_book_every_occurrence_or_none(provider: Provider) -> None:
    monday = next_monday(12)
    blocked = monday + timedelta(weeks=2)
    provider.put_event(vevent(f"DTSTART:{stamp(blocked, 13)}", f"DTEND:{stamp(blocked, 14)}"))
    refused = book(
        provider, _api_instant(monday, 13), recurrence={"frequency": "WEEKLY", "count": 4}
    )
    assert_problem(refused, 409)
    assert refused.json()["conflicts"] == [_api_instant(blocked, 13).replace("+00:00", "Z")]
    created = book(
        provider, _api_instant(monday, 14), recurrence={"frequency": "WEEKLY", "count": 4}
    )
    assert created.status_code == 201, created.text
    for week in range(4):
        day = monday + timedelta(weeks=week)
        assert not any("T14:00:00" in s for s in provider.slots(day)), week


def test_group_services_fill_one_event_up_to_capacity(provider: Provider) -> None:
    server = provider.server
    group = requests.post(
        f"{server.base_url}/api/v1/services",
        auth=provider.auth,
        json={
            "name": "Yoga class",
            "duration": 60,
            "rules": {"capacity": 3, "minNoticeMinutes": 0, "maxAdvanceDays": 730},
        },
    )
    assert group.status_code == 201
    start = _api_instant(next_monday(13), 10)
    body = {**booking_body(provider, start), "serviceId": group.json()["serviceId"]}

    def attempt(n: int) -> int:
        return requests.post(
            f"{server.base_url}/api/v1/appointments",
            json={**body, "client": {"name": f"Guest {n}", "email": f"g{n}@example.org"}},
        ).status_code

    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(attempt, range(10)))
    assert statuses.count(201) == 3 and statuses.count(409) == 7, statuses
    with database_for(server.database_url).read() as conn:
        texts = (
            conn.execute(select(items.c.text).where(items.c.text.contains("Yoga class")))
            .scalars()
            .all()
        )
    assert len(texts) == 1
    assert texts[0].count("ATTENDEE") == 3


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"startTime": "tomorrow"}, 400, "startTime"),
        ({"startTime": "2030-01-07T09:00:00"}, 400, "startTime"),
        ({"serviceId": 5}, 400, "serviceId"),
        ({"client": {"name": "x", "email": "not-mail"}}, 400, "client.email"),
        ({"client": None}, 400, "client"),
        ({"recurrence": {"frequency": "HOURLY", "count": 2}}, 400, "recurrence.frequency"),
        ({"recurrence": {"frequency": "WEEKLY"}}, 400, "recurrence"),
        ({"serviceId": str(uuid.uuid4())}, 404, None),
    ],
)
def test_bad_bookings_are_problems_and_write_nothing(
    provider: Provider, change: dict[str, Any], status: int, field: str | None
) -> None:
    body = {**booking_body(provider, _api_instant(next_monday(7), 15)), **change}
    response = requests.post(f"{provider.server.base_url}/api/v1/appointments", json=body)
    assert_problem(response, status, field)
    assert count_bookings(provider)[0] == 0


def test_strangers_cannot_read_an_appointment(provider: Provider) -> None:
    created = book(provider, _api_instant(next_monday(7), 12)).json()
    url = f"{provider.server.base_url}/api/v1/appointments/{created['appointmentId']}"
    assert_problem(requests.get(url), 404)
    other = provider.server.add_user("client")
    assert_problem(requests.get(url, auth=(other, provider.server.passwords[other])), 403)
    code = created["confirmationCode"]
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}", code)
    assert requests.get(url, params={"code": code}).status_code == 200
    assert requests.get(url, params={"code": f" {code.lower()} "}).status_code == 200  # as typed
    wrong = code[:-1] + ("1" if code.endswith("0") else "0")
    assert_problem(requests.get(url, params={"code": wrong}), 404)
    assert requests.get(url, auth=provider.auth).status_code == 200
    listed = requests.get(f"{provider.server.base_url}/api/v1/appointments", auth=provider.auth)
    assert [a["appointmentId"] for a in listed.json()["items"]] == [created["appointmentId"]]


def test_guests_past_the_rate_limit_get_429(tmp_path: Any) -> None:
    from tests.conftest import start_server

    limited = start_server(tmp_path / "limited", guest_bookings_per_minute=3)
    try:
        provider = make_provider(limited)
        statuses = [
            book(provider, _api_instant(next_monday(7), 9 + n)).status_code for n in range(5)
        ]
        assert statuses[:3] == [201, 201, 201]
        assert statuses[3:] == [429, 429]
        signed_in = requests.post(
            f"{limited.base_url}/api/v1/appointments",
            auth=provider.auth,
            json=booking_body(provider, _api_instant(next_monday(7), 15)),
        )
        assert signed_in.status_code == 201
    finally:
        limited.stop()


def test_a_weekly_series_keeps_its_wall_clock_time_across_the_dst_change(
    provider: Provider,
) -> None:
    first = date(2027, 10, 18)  # CEST; the next Monday is CET
    created = book(
        provider, _api_instant(first, 10), recurrence={"frequency": "WEEKLY", "until": "2027-11-01"}
    )
    assert created.status_code == 201, created.text
    for week in range(3):
        slots = provider.slots(first + timedelta(weeks=week))
        assert not any("T10:00:00" in s for s in slots), week
        assert any("T10:30:00" in s for s in slots), week


def test_one_occurrence_of_a_series_can_be_cancelled_or_moved(provider: Provider) -> None:
    monday = next_monday(15)
    created = book(
        provider, _api_instant(monday, 12), recurrence={"frequency": "WEEKLY", "count": 3}
    ).json()
    url = f"{provider.server.base_url}/api/v1/appointments/{created['appointmentId']}"
    second, third = monday + timedelta(weeks=1), monday + timedelta(weeks=2)
    cancelled = requests.delete(
        url, auth=provider.auth, json={}, params={"occurrence": _api_instant(second, 12)}
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "confirmed"
    assert len(cancelled.json()["cancelledOccurrences"]) == 1
    assert any("T12:00:00" in s for s in provider.slots(second))
    moved = requests.put(
        url,
        auth=provider.auth,
        params={"occurrence": _api_instant(third, 12)},
        json={"startTime": _api_instant(third, 15)},
    )
    assert moved.status_code == 200, moved.text
    third_slots = provider.slots(third)
    assert any("T12:00:00" in s for s in third_slots)
    assert not any("T15:00:00" in s for s in third_slots)
    assert not any("T12:00:00" in s for s in provider.slots(monday))
    event = requests.get(
        f"{provider.server.dav_url}{provider.username}/appointments/{created['appointmentId']}.ics",
        auth=provider.auth,
    ).text
    assert "EXDATE" in event and "RECURRENCE-ID" in event and "SEQUENCE:2" in event
    unknown = requests.delete(
        url, auth=provider.auth, json={}, params={"occurrence": _api_instant(third, 13)}
    )
    assert_problem(unknown, 404)


def test_an_event_with_an_attendee_typed_into_the_calendar_is_listed_and_blocks(
    provider: Provider,
) -> None:
    monday = next_monday(16)
    provider.put_event(
        vevent(
            f"DTSTART:{stamp(monday, 9)}",
            f"DTEND:{stamp(monday, 10)}",
            "SUMMARY:Walk-in Bob",
            "ORGANIZER:mailto:me@example.org",
            "ATTENDEE;CN=Bob:mailto:bob@example.org",
        )
    )
    provider.put_event(
        vevent(f"DTSTART:{stamp(monday, 11)}", f"DTEND:{stamp(monday, 12)}", "SUMMARY:Lunch alone")
    )
    listed = requests.get(
        f"{provider.server.base_url}/api/v1/appointments",
        auth=provider.auth,
        params={
            "providerId": provider.user_id,
            "from": _api_instant(monday, 0),
            "to": _api_instant(monday + timedelta(days=1), 0),
        },
    )
    assert listed.status_code == 200, listed.text
    events = listed.json()["calendarEvents"]
    assert [e["summary"] for e in events] == ["Walk-in Bob"]
    assert events[0]["attendees"] == ["bob@example.org"]
    assert events[0]["startTime"].startswith(f"{monday.isoformat()}T09:00:00")
    assert not any("T09:00:00" in s or "T11:00:00" in s for s in provider.slots(monday))


def test_one_idempotency_key_racing_for_two_providers_books_once(provider: Provider) -> None:
    other = make_provider(provider.server)
    key = str(uuid.uuid4())
    start = _api_instant(next_monday(17), 10)
    gate = threading.Barrier(2)

    def attempt(who: Provider) -> int:
        gate.wait()
        return requests.post(
            f"{who.server.base_url}/api/v1/appointments",
            json=booking_body(who, start),
            headers={"Idempotency-Key": key},
        ).status_code

    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(attempt, [provider, other]))
    assert statuses[0] == 201
    assert statuses[1] in (409, 422)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"startTime": "9999-12-31T23:00:00+00:00"}, "startTime"),
        ({"recurrence": {"frequency": "DAILY", "until": "9999-12-31"}}, "recurrence.until"),
    ],
)
def test_dates_at_the_edge_of_the_calendar_are_400_not_500(
    provider: Provider, change: dict[str, Any], field: str
) -> None:
    body = {**booking_body(provider, _api_instant(next_monday(7), 9)), **change}
    response = requests.post(f"{provider.server.base_url}/api/v1/appointments", json=body)
    assert_problem(response, 400, field)
    search = requests.get(
        provider.availability_url,
        params={
            "serviceId": provider.service_id,
            "startDate": "9999-12-30",
            "endDate": "9999-12-31",
        },
    )
    assert_problem(search, 400, "startDate")


def test_confirmation_codes_do_not_clash_in_a_busy_database() -> None:
    """A unique column: 60 random bits, where 32 (the former 8 hex digits) clashed by the birthday
    bound about once per hundred databases of ten thousand appointments."""
    codes = {confirmation_code() for _ in range(100_000)}
    assert len(codes) == 100_000
    assert all(len(code) == 14 and code.count("-") == 2 for code in codes)


def test_appointment_ids_are_version_7_uuids_in_the_order_they_were_made() -> None:
    """The id keys several unique indexes (the appointment, its event's href and UID, its
    reminders): ids that start with the time append there instead of landing on random pages."""
    made = [new_appointment_id(now_ms) for now_ms in (1_700_000_000_000, 1_700_000_000_001)]
    made += [new_appointment_id(1_800_000_000_000 + n) for n in range(1_000)]
    assert made == sorted(made)
    parsed = [uuid.UUID(text) for text in made]
    assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
    assert parsed[0].int >> 80 == 1_700_000_000_000  # the first 48 bits: Unix time in ms
    same_millisecond = {new_appointment_id(1_700_000_000_000) for _ in range(100_000)}
    assert len(same_millisecond) == 100_000  # 74 random bits apart
