"""Working hours and free slots over /api/v1, against events written through CalDAV."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import requests

from tests.conftest import RunningServer
from tests.test_api_users import assert_problem

BERLIN = ZoneInfo("Europe/Berlin")
WEEKDAYS = ["MO", "TU", "WE", "TH", "FR"]


@dataclass
class Provider:
    server: RunningServer
    username: str
    user_id: str
    service_id: str

    @property
    def auth(self) -> tuple[str, str]:
        return self.username, self.server.passwords[self.username]

    @property
    def availability_url(self) -> str:
        return f"{self.server.base_url}/api/v1/providers/{self.user_id}/availability"

    def slots(self, start: date, end: date | None = None, zone: str | None = None) -> list[str]:
        params = {
            "serviceId": self.service_id,
            "startDate": start.isoformat(),
            "endDate": (end or start).isoformat(),
        }
        if zone:
            params["timezone"] = zone
        response = requests.get(self.availability_url, params=params)
        assert response.status_code == 200, response.text
        return [slot["startTime"] for slot in response.json()["slots"]]

    def put_event(self, body: str, calendar: str = "appointments") -> None:
        response = requests.put(
            f"{self.server.dav_url}{self.username}/{calendar}/{uuid.uuid4().hex}.ics",
            data=body.encode(),
            auth=self.auth,
            headers={"Content-Type": "text/calendar"},
        )
        assert response.status_code == 201, response.text


def vevent(*lines: str) -> str:
    inner = "\r\n".join(lines)
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//tests//EN\r\nBEGIN:VEVENT\r\n"
        f"UID:{uuid.uuid4()}\r\nDTSTAMP:20260101T000000Z\r\n{inner}\r\n"
        "END:VEVENT\r\nEND:VCALENDAR\r\n"
    )


def next_monday(weeks_ahead: int = 1) -> date:
    today = datetime.now(BERLIN).date()
    return today + timedelta(days=7 * weeks_ahead - today.weekday())


def stamp(day: date, hour: int, minute: int = 0) -> str:
    """A Berlin wall-clock time as an iCalendar UTC date-time."""
    local = datetime(day.year, day.month, day.day, hour, minute, tzinfo=BERLIN)
    return local.astimezone(ZoneInfo("UTC")).strftime("%Y%m%dT%H%M%SZ")


@pytest.fixture
def provider(server: RunningServer) -> Provider:
    return make_provider(server)


def make_provider(server: RunningServer) -> Provider:
    """A Europe/Berlin provider with Mon-Fri 09:00-17:00 hours and a 30-minute service."""
    username = server.add_user("provider", timezone="Europe/Berlin")
    auth = (username, server.passwords[username])
    user_id = requests.get(f"{server.base_url}/api/v1/users/me", auth=auth).json()["userId"]
    service = requests.post(
        f"{server.base_url}/api/v1/services",
        auth=auth,
        json={
            "name": "Consultation",
            "duration": 30,
            "price": {"amount": "50.00", "currency": "EUR"},
            "rules": {"minNoticeMinutes": 0, "maxAdvanceDays": 730},
        },
    )
    assert service.status_code == 201, service.text
    hours = requests.post(
        f"{server.base_url}/api/v1/providers/{user_id}/availability",
        auth=auth,
        json={
            "timezone": "Europe/Berlin",
            "validFrom": "2026-01-01",
            "timeSlots": [
                {"dayOfWeek": day, "startTime": "09:00", "endTime": "17:00"} for day in WEEKDAYS
            ],
        },
    )
    assert hours.status_code == 200, hours.text
    return Provider(server, username, user_id, service.json()["serviceId"])


def test_weekdays_nine_to_five_give_sixteen_half_hour_slots(provider: Provider) -> None:
    monday = next_monday()
    week = provider.slots(monday, monday + timedelta(days=6))
    by_day: dict[str, int] = {}
    for start in week:
        by_day[start[:10]] = by_day.get(start[:10], 0) + 1
    assert by_day == {(monday + timedelta(days=n)).isoformat(): 16 for n in range(5)}
    assert week[0].startswith(f"{monday.isoformat()}T09:00:00")


def test_an_event_typed_into_a_calendar_removes_exactly_its_slots(provider: Provider) -> None:
    monday = next_monday()
    before = provider.slots(monday)
    provider.put_event(
        vevent(f"DTSTART:{stamp(monday, 10)}", f"DTEND:{stamp(monday, 11)}", "SUMMARY:Dentist")
    )
    after = provider.slots(monday)
    assert len(before) - len(after) == 2
    assert sorted(set(before) - set(after)) == [
        f"{monday.isoformat()}T10:00:00{after[0][19:]}",
        f"{monday.isoformat()}T10:30:00{after[0][19:]}",
    ]


def test_working_hours_keep_wall_clock_time_across_both_dst_changes(provider: Provider) -> None:
    for first, last in [
        (date(2027, 3, 22), date(2027, 4, 2)),
        (date(2027, 10, 25), date(2027, 11, 5)),
    ]:
        berlin = provider.slots(first, last)
        assert {start[11:19] for start in berlin if start[11:19] < "09:30"} == {"09:00:00"}
        days = {start[:10] for start in berlin}
        assert len(days) == 10
        assert all(len([s for s in berlin if s.startswith(day)]) == 16 for day in days)
        offsets = {start[19:] for start in berlin}
        assert offsets == {"+01:00", "+02:00"}
        new_york = provider.slots(
            first - timedelta(days=1), last + timedelta(days=1), zone="America/New_York"
        )
        as_instants = {datetime.fromisoformat(s) for s in new_york}
        assert {datetime.fromisoformat(s) for s in berlin} <= as_instants
        assert len(as_instants) == len(berlin)


def test_hours_added_by_hand_in_the_availability_calendar_open_slots(provider: Provider) -> None:
    saturday = next_monday() + timedelta(days=5)
    assert provider.slots(saturday) == []
    provider.put_event(
        vevent(
            f"DTSTART:{stamp(saturday, 10)}",
            f"DTEND:{stamp(saturday, 12)}",
            "SUMMARY:Saturday clinic",
        ),
        calendar="availability",
    )
    assert len(provider.slots(saturday)) == 4


def test_recurring_busy_events_honour_exdate_and_overrides(provider: Provider) -> None:
    monday = next_monday(2)
    uid = f"weekly-{uuid.uuid4()}"
    body = (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//tests//EN\r\n"
        f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20260101T000000Z\r\n"
        f"DTSTART:{stamp(monday, 9)}\r\nDTEND:{stamp(monday, 10)}\r\n"
        f"RRULE:FREQ=DAILY;COUNT=5\r\nEXDATE:{stamp(monday + timedelta(days=1), 9)}\r\n"
        "END:VEVENT\r\n"
        f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20260101T000000Z\r\n"
        f"RECURRENCE-ID:{stamp(monday + timedelta(days=2), 9)}\r\n"
        f"DTSTART:{stamp(monday + timedelta(days=2), 15)}\r\n"
        f"DTEND:{stamp(monday + timedelta(days=2), 16)}\r\n"
        "END:VEVENT\r\nEND:VCALENDAR\r\n"
    )
    provider.put_event(body)
    counts = [len(provider.slots(monday + timedelta(days=n))) for n in range(5)]
    assert counts == [14, 16, 14, 14, 14]
    wednesday = provider.slots(monday + timedelta(days=2))
    assert not any("T15:" in start for start in wednesday)
    assert any("T09:00" in start for start in wednesday)


def test_all_day_and_multi_day_events_block_whole_days(provider: Provider) -> None:
    monday = next_monday(3)
    tuesday, wednesday = monday + timedelta(days=1), monday + timedelta(days=2)
    provider.put_event(
        vevent(
            f"DTSTART;VALUE=DATE:{monday:%Y%m%d}",
            f"DTEND;VALUE=DATE:{tuesday:%Y%m%d}",
            "SUMMARY:Holiday",
        )
    )
    provider.put_event(
        vevent(
            f"DTSTART:{stamp(wednesday, 12)}",
            f"DTEND:{stamp(wednesday + timedelta(days=1), 12)}",
            "SUMMARY:Conference",
        )
    )
    counts = [len(provider.slots(monday + timedelta(days=n))) for n in range(5)]
    assert counts == [0, 16, 6, 10, 16]


def test_transparent_and_cancelled_events_do_not_block(provider: Provider) -> None:
    monday = next_monday(4)
    provider.put_event(
        vevent(f"DTSTART:{stamp(monday, 9)}", f"DTEND:{stamp(monday, 12)}", "TRANSP:TRANSPARENT")
    )
    provider.put_event(
        vevent(f"DTSTART:{stamp(monday, 13)}", f"DTEND:{stamp(monday, 17)}", "STATUS:CANCELLED")
    )
    assert len(provider.slots(monday)) == 16


def test_buffers_notice_and_interval_rules_apply(provider: Provider) -> None:
    monday = next_monday(5)
    response = requests.put(
        f"{provider.server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={
            "rules": {
                "bufferBeforeMinutes": 15,
                "bufferAfterMinutes": 15,
                "slotIntervalMinutes": 60,
            }
        },
    )
    assert response.status_code == 200, response.text
    assert len(provider.slots(monday)) == 8
    # 11:00-11:30 itself is free, but its 15-minute buffer after reaches into the event.
    provider.put_event(vevent(f"DTSTART:{stamp(monday, 11, 40)}", f"DTEND:{stamp(monday, 12, 20)}"))
    starts = [s[11:16] for s in provider.slots(monday)]
    assert starts == ["09:00", "10:00", "13:00", "14:00", "15:00", "16:00"]


def test_vavailability_round_trips(provider: Provider) -> None:
    body = (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//tests//EN\r\n"
        "BEGIN:VAVAILABILITY\r\nUID:a1\r\nDTSTAMP:20260101T000000Z\r\n"
        "DTSTART;TZID=Europe/Berlin:20260105T000000\r\n"
        "BEGIN:AVAILABLE\r\nUID:a1-1\r\nDTSTAMP:20260101T000000Z\r\n"
        "DTSTART;TZID=Europe/Berlin:20260105T080000\r\nDTEND;TZID=Europe/Berlin:20260105T120000\r\n"
        "RRULE:FREQ=WEEKLY;BYDAY=MO,WE\r\nEND:AVAILABLE\r\n"
        "END:VAVAILABILITY\r\nEND:VCALENDAR\r\n"
    )
    stored = requests.post(
        provider.availability_url,
        data=body,
        auth=provider.auth,
        headers={"Content-Type": "text/calendar"},
    )
    assert stored.status_code == 200, stored.text
    monday = next_monday()
    assert len(provider.slots(monday)) == 8
    assert provider.slots(monday + timedelta(days=1)) == []
    as_ical = requests.get(provider.availability_url, headers={"Accept": "text/calendar"})
    assert as_ical.status_code == 200
    assert "BEGIN:VAVAILABILITY" in as_ical.text and "BYDAY=MO,WE" in as_ical.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"timeSlots": [{"dayOfWeek": "XX", "startTime": "09:00", "endTime": "10:00"}]},
            "timeSlots[0].dayOfWeek",
        ),
        (
            {"timeSlots": [{"dayOfWeek": "MO", "startTime": "11:00", "endTime": "10:00"}]},
            "timeSlots[0].endTime",
        ),
        (
            {"timeSlots": [{"dayOfWeek": "MO", "startTime": "9am", "endTime": "10:00"}]},
            "timeSlots[0].startTime",
        ),
        ({"timezone": "Nowhere/City", "timeSlots": []}, "timezone"),
        ({}, "timeSlots"),
    ],
)
def test_bad_working_hours_name_the_field_and_change_nothing(
    provider: Provider, body: dict[str, object], field: str
) -> None:
    before = provider.slots(next_monday())
    response = requests.post(provider.availability_url, json=body, auth=provider.auth)
    assert_problem(response, 400, field)
    assert provider.slots(next_monday()) == before


def test_malformed_vavailability_is_refused(provider: Provider) -> None:
    response = requests.post(
        provider.availability_url,
        data="BEGIN:VCALENDAR\r\nnonsense",
        auth=provider.auth,
        headers={"Content-Type": "text/calendar"},
    )
    assert_problem(response, 400, "body")


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"startDate": "2027-01-10", "endDate": "2027-01-01"}, 400, "endDate"),
        ({"startDate": "2027-01-01", "endDate": "2027-06-01"}, 400, "endDate"),
        ({"startDate": "tomorrow", "endDate": "2027-01-01"}, 400, "startDate"),
        (
            {"startDate": "2027-01-01", "endDate": "2027-01-02", "timezone": "Mars/Base"},
            400,
            "timezone",
        ),
        ({"endDate": "2027-01-02"}, 400, "startDate"),
    ],
)
def test_bad_slot_searches_are_problems(
    provider: Provider, params: dict[str, str], status: int, field: str
) -> None:
    response = requests.get(
        provider.availability_url, params={"serviceId": provider.service_id, **params}
    )
    assert_problem(response, status, field)


def test_unknown_provider_or_service_is_404(provider: Provider) -> None:
    assert_problem(
        requests.get(f"{provider.server.base_url}/api/v1/providers/{uuid.uuid4()}/availability"),
        404,
    )
    assert_problem(
        requests.get(
            provider.availability_url,
            params={
                "serviceId": str(uuid.uuid4()),
                "startDate": "2027-01-01",
                "endDate": "2027-01-02",
            },
        ),
        404,
    )


def test_only_the_provider_or_an_admin_sets_hours(provider: Provider) -> None:
    other = provider.server.add_user("provider")
    response = requests.post(
        provider.availability_url,
        auth=(other, provider.server.passwords[other]),
        json={"timeSlots": []},
    )
    assert_problem(response, 403)


def test_a_busy_resource_blocks_the_services_that_need_it(provider: Provider) -> None:
    server = provider.server
    admin = server.add_user("admin")
    room = requests.post(
        f"{server.base_url}/api/v1/resources",
        auth=(admin, server.passwords[admin]),
        json={"name": "Room 1", "kind": "room", "timezone": "Europe/Berlin"},
    )
    assert room.status_code == 201, room.text
    needs_room = requests.put(
        f"{server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={"resources": [room.json()["resourceId"]]},
    )
    assert needs_room.status_code == 200, needs_room.text
    assert needs_room.json()["resources"] == [room.json()["resourceId"]]
    monday = next_monday(6)
    calendar_url = room.json()["calendarUrl"]
    blocked = requests.put(
        f"{calendar_url}cleaning.ics",
        auth=provider.auth,
        headers={"Content-Type": "text/calendar"},
        data=vevent(f"DTSTART:{stamp(monday, 9)}", f"DTEND:{stamp(monday, 11)}").encode(),
    )
    assert blocked.status_code == 201, blocked.text
    assert len(provider.slots(monday)) == 12
    client = server.add_user("client")
    assert requests.get(
        f"{calendar_url}cleaning.ics", auth=(client, server.passwords[client])
    ).status_code in {403, 404}
    mkcalendar = requests.request(
        "MKCALENDAR", f"{server.dav_url}resources/mine/", auth=provider.auth
    )
    assert mkcalendar.status_code == 403
    delete = requests.delete(calendar_url, auth=provider.auth)
    assert delete.status_code == 403
    assert len(provider.slots(monday)) == 12


def test_services_refuse_unknown_resources(provider: Provider) -> None:
    response = requests.put(
        f"{provider.server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={"resources": [str(uuid.uuid4())]},
    )
    assert_problem(response, 400, "resources")
