"""The hand-written appointment VEVENT reads back, through `icalendar`, as exactly what was put in:
any name, note or summary (separators, quotes, line breaks, non-ASCII) and lines folded at 75
octets without splitting a character."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import icalendar
from hypothesis import given, settings
from hypothesis import strategies as st

from bookdav.booking.ical import AppointmentEvent, Person, appointment_event

# Text a person could type: any printable character, plus line breaks and tabs.
typed = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufeff")
    | st.sampled_from(["\n", "\t", ";", ",", "\\", '"', ":", "^"]),
    max_size=120,
)
names = typed.map(lambda s: " ".join(s.split()))  # names are one line, spaces squeezed
START = 1_815_000_000  # 2027-07-08


def event(name: str, summary: str, description: str, **changes: object) -> AppointmentEvent:
    base = AppointmentEvent(
        uid="b6f1@bookdav",
        appointment_id="b6f1",
        summary=summary,
        start_utc=START,
        end_utc=START + 1800,
        timezone="Europe/Berlin",
        organizer=Person(name, "provider@example.org"),
        attendees=(Person(name, "client@example.org"), Person("", "second@example.org")),
        description=description,
        url="https://book.example.org/manage/abc",
    )
    return AppointmentEvent(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def expected_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


@settings(max_examples=150, deadline=None)
@given(name=names, summary=typed, description=typed)
def test_any_text_reads_back_unchanged(name: str, summary: str, description: str) -> None:
    text = appointment_event(event(name, summary, description))
    for line in text.split("\r\n"):
        assert len(line.encode()) <= 75
    vevent = icalendar.Calendar.from_ical(text).walk("VEVENT")[0]
    assert str(vevent["summary"]) == expected_text(summary)
    assert str(vevent.get("description", "")) == expected_text(description)
    organizer = vevent["organizer"]
    assert str(organizer) == "mailto:provider@example.org"
    assert organizer.params.get("CN", "") == name.strip().replace("\\", "/")
    attendees = vevent["attendee"]
    assert [str(a) for a in attendees] == ["mailto:client@example.org", "mailto:second@example.org"]
    assert attendees[0].params["PARTSTAT"] == "NEEDS-ACTION"
    assert attendees[0].params["RSVP"] == "TRUE"
    assert vevent.decoded("dtstart") == datetime.fromtimestamp(START, UTC)
    assert vevent["uid"] == "b6f1@bookdav"
    assert str(vevent["x-bookdav-appointment-id"]) == "b6f1"


def test_a_series_is_written_in_the_provider_zone_with_exceptions_and_moves() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    week = 7 * 86400
    text = appointment_event(
        event(
            "Anna",
            "Cut",
            "",
            rrule="FREQ=WEEKLY;COUNT=4",
            exdates_utc=(START + week,),
            moved=((START + 2 * week, START + 2 * week + 3600, START + 2 * week + 5400),),
            sequence=3,
        )
    )
    calendar = icalendar.Calendar.from_ical(text)
    assert calendar.walk("VTIMEZONE")[0]["tzid"] == "Europe/Berlin"
    master, moved = calendar.walk("VEVENT")
    assert master.decoded("dtstart") == datetime.fromtimestamp(START, berlin)
    assert master.decoded("dtstart").tzinfo.key == "Europe/Berlin"
    assert master["rrule"]["COUNT"] == [4]
    assert master["exdate"].dts[0].dt == datetime.fromtimestamp(START + week, berlin)
    assert moved.decoded("recurrence-id") == datetime.fromtimestamp(START + 2 * week, berlin)
    assert moved.decoded("dtstart") == datetime.fromtimestamp(START + 2 * week + 3600, berlin)
    assert "rrule" not in moved
    assert master["sequence"] == moved["sequence"] == 3
