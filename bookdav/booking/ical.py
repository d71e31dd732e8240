"""All iCalendar bookdav writes or reads outside CalDAV, built with `icalendar`'s typed API.

Working hours are weekly recurring VEVENTs in the provider's Availability calendar (every calendar
app can show and edit those); RFC 7953 VAVAILABILITY is accepted and produced at the API edge and
translated to and from the same weekly hours here.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time as time_module
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import icalendar

PRODID = "-//bookdav//bookdav//EN"
DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
HOURS_UID_PREFIX = "bookdav-hours-"


class InvalidCalendar(ValueError):
    """iCalendar text that cannot be read, or lacks what bookdav needs; says what is wrong."""


@dataclass(frozen=True)
class WeeklyHours:
    """Open from `start` to `end` (wall-clock, `end` may be 24:00) on each of `days`."""

    days: tuple[str, ...]
    start: tuple[int, int]
    end: tuple[int, int]

    @property
    def start_text(self) -> str:
        return f"{self.start[0]:02d}:{self.start[1]:02d}"

    @property
    def end_text(self) -> str:
        return f"{self.end[0]:02d}:{self.end[1]:02d}"


@dataclass(frozen=True)
class WorkingHours:
    timezone: str
    hours: tuple[WeeklyHours, ...]
    valid_from: date
    valid_until: date | None = None


def _calendar() -> icalendar.Calendar:
    calendar = icalendar.Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    return calendar


def _first_day_on_or_after(day: date, weekdays: Sequence[str]) -> date:
    wanted = {DAYS.index(code) for code in weekdays}
    while day.weekday() not in wanted:
        day += timedelta(days=1)
    return day


def _local(day: date, wall: tuple[int, int], zone: ZoneInfo) -> datetime:
    if wall == (24, 0):
        return datetime.combine(day + timedelta(days=1), time(0, 0), zone)
    return datetime.combine(day, time(*wall), zone)


def weekly_hours_events(hours: WorkingHours, provider_id: str) -> list[tuple[str, str]]:
    """One `(uid, iCalendar text)` per distinct opening time, recurring weekly on its days."""
    zone = ZoneInfo(hours.timezone)
    objects = []
    for index, block in enumerate(hours.hours):
        first_day = _first_day_on_or_after(hours.valid_from, block.days)
        event = icalendar.Event()
        uid = f"{HOURS_UID_PREFIX}{index}-{provider_id}"
        event.add("uid", uid)
        event.add("dtstamp", datetime.now(ZoneInfo("UTC")))
        event.add("summary", "Working hours")
        event.add("dtstart", _local(first_day, block.start, zone))
        event.add("dtend", _local(first_day, block.end, zone))
        rule: dict[str, object] = {"freq": "weekly", "byday": list(block.days)}
        if hours.valid_until is not None:
            last = _local(hours.valid_until, (24, 0), zone).astimezone(ZoneInfo("UTC"))
            rule["until"] = last
        event.add("rrule", rule)
        event.add("transp", "OPAQUE")
        event.add("x-bookdav-availability", "weekly")
        calendar = _calendar()
        calendar.add_component(event)
        calendar.add_missing_timezones()
        objects.append((uid, calendar.to_ical().decode()))
    return objects


def vavailability(hours: WorkingHours) -> str:
    """Working hours as an RFC 7953 VAVAILABILITY."""
    zone = ZoneInfo(hours.timezone)
    calendar = _calendar()
    availability = icalendar.Availability()
    availability.add("uid", f"{HOURS_UID_PREFIX}availability")
    availability.add("dtstamp", datetime.now(ZoneInfo("UTC")))
    availability.add("dtstart", datetime.combine(hours.valid_from, time(0, 0), zone))
    if hours.valid_until is not None:
        availability.add("dtend", _local(hours.valid_until, (24, 0), zone))
    for index, block in enumerate(hours.hours):
        first_day = _first_day_on_or_after(hours.valid_from, block.days)
        available = icalendar.Available()
        available.add("uid", f"{HOURS_UID_PREFIX}{index}")
        available.add("dtstamp", datetime.now(ZoneInfo("UTC")))
        available.add("dtstart", _local(first_day, block.start, zone))
        available.add("dtend", _local(first_day, block.end, zone))
        available.add("rrule", {"freq": "weekly", "byday": list(block.days)})
        availability.add_component(available)
    calendar.add_component(availability)
    calendar.add_missing_timezones()
    return calendar.to_ical().decode()


def parse_vavailability(text: str, default_timezone: str) -> WorkingHours:
    """Weekly hours from an RFC 7953 VAVAILABILITY body; `InvalidCalendar` says what is wrong."""
    try:
        calendar = icalendar.Calendar.from_ical(text)
    except ValueError as exc:
        raise InvalidCalendar(f"not iCalendar: {exc}") from exc
    found = [c for c in calendar.walk("VAVAILABILITY")]
    if len(found) != 1:
        raise InvalidCalendar("expected exactly one VAVAILABILITY component")
    availability = found[0]
    blocks = [c for c in availability.subcomponents if c.name == "AVAILABLE"]
    if not blocks:
        raise InvalidCalendar("VAVAILABILITY has no AVAILABLE component")
    timezone = default_timezone
    hours: list[WeeklyHours] = []
    first_days: list[date] = []
    for number, block in enumerate(blocks, start=1):
        start, end = _available_times(block, number)
        if isinstance(start.tzinfo, ZoneInfo):
            timezone = start.tzinfo.key
        days = _weekly_days(block, start, number)
        hours.append(WeeklyHours(days, (start.hour, start.minute), _end_wall(start, end, number)))
        first_days.append(start.date())
    valid_until = None
    if availability.get("dtend") is not None:
        valid_until = availability.decoded("dtend").date() - timedelta(days=1)
    return WorkingHours(timezone, tuple(hours), min(first_days), valid_until)


def _available_times(block: icalendar.cal.Component, number: int) -> tuple[datetime, datetime]:
    try:
        start = block.decoded("dtstart")
        end = block.decoded("dtend") if "dtend" in block else start + block.decoded("duration")
    except (KeyError, ValueError) as exc:
        raise InvalidCalendar(f"AVAILABLE #{number} needs DTSTART and DTEND or DURATION") from exc
    if not isinstance(start, datetime) or not isinstance(end, datetime):
        raise InvalidCalendar(f"AVAILABLE #{number}: DTSTART and DTEND must be date-times")
    if end <= start:
        raise InvalidCalendar(f"AVAILABLE #{number}: DTEND must be after DTSTART")
    return start, end


def _end_wall(start: datetime, end: datetime, number: int) -> tuple[int, int]:
    if end.date() == start.date():
        return end.hour, end.minute
    if end.date() == start.date() + timedelta(days=1) and (end.hour, end.minute) == (0, 0):
        return 24, 0
    raise InvalidCalendar(f"AVAILABLE #{number}: a block must end on the day it starts")


def _weekly_days(block: icalendar.cal.Component, start: datetime, number: int) -> tuple[str, ...]:
    rule = block.get("rrule")
    if rule is None:
        return (DAYS[start.weekday()],)
    frequency = [str(f).upper() for f in rule.get("FREQ", [])]
    if frequency != ["WEEKLY"]:
        raise InvalidCalendar(f"AVAILABLE #{number}: only weekly RRULEs are supported")
    days = tuple(str(day).upper() for day in rule.get("BYDAY", [])) or (DAYS[start.weekday()],)
    if any(day not in DAYS for day in days):
        raise InvalidCalendar(f"AVAILABLE #{number}: BYDAY must list plain weekdays (MO..SU)")
    return days


def hours_from_events(texts: Iterable[str], timezone: str) -> WorkingHours | None:
    """The working hours bookdav wrote (its weekly events), read back; None if there are none."""
    hours: list[WeeklyHours] = []
    first_days: list[date] = []
    until: date | None = None
    for text in texts:
        event = next(iter(icalendar.Calendar.from_ical(text).walk("VEVENT")))
        start, end = event.decoded("dtstart"), event.decoded("dtend")
        if isinstance(start.tzinfo, ZoneInfo):
            timezone = start.tzinfo.key
        rule = event.get("rrule")
        days = tuple(str(day).upper() for day in rule.get("BYDAY", []))
        hours.append(WeeklyHours(days, (start.hour, start.minute), _end_wall(start, end, 0)))
        first_days.append(start.date())
        if rule.get("UNTIL"):
            until = rule["UNTIL"][0].astimezone(ZoneInfo(timezone)).date() - timedelta(days=1)
    if not hours:
        return None
    return WorkingHours(timezone, tuple(hours), min(first_days), until)


@dataclass(frozen=True)
class Person:
    name: str
    email: str
    # An attendee's answer (RFC 5545 PARTSTAT); a new or moved appointment asks again.
    partstat: str = "NEEDS-ACTION"


@dataclass(frozen=True)
class AppointmentEvent:
    """What the VEVENT of an appointment says; `ical.appointment_event` writes it."""

    uid: str
    appointment_id: str
    summary: str
    start_utc: int
    end_utc: int
    timezone: str
    organizer: Person
    attendees: tuple[Person, ...]
    sequence: int = 0
    status: str = "CONFIRMED"
    description: str = ""
    url: str = ""
    rrule: str | None = None
    exdates_utc: tuple[int, ...] = ()
    # Moved occurrences of a series: (original start, new start, new end), as RECURRENCE-IDs.
    moved: tuple[tuple[int, int, int], ...] = ()


def _one_line(text: str) -> str:
    """Control characters (CR, LF, ...) folded to spaces: a name is one line in any calendar."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


def appointment_event(event: AppointmentEvent) -> str:
    """The appointment as a VCALENDAR: stable UID, ORGANIZER = provider, one ATTENDEE per client
    (RSVP, PARTSTAT), SEQUENCE, STATUS. A single appointment is written in UTC (every client
    shows it in its own zone); a recurring one in the provider's zone with its VTIMEZONE, so it
    keeps its wall-clock time across DST.

    Written by hand rather than through `icalendar`'s object model: the shape is fixed, and this
    runs inside every booking's write transaction, where building and folding the objects cost a
    third of the transaction (tests parse the output back with `icalendar`)."""
    zone = event.timezone if event.rrule else "UTC"
    lines = ["BEGIN:VCALENDAR", f"PRODID:{PRODID}", "VERSION:2.0"]
    stamp = _utc_text(int(time_module.time()))
    lines += _vevent_lines(event, zone, stamp, recurrence_id=None)
    for original, start, end in event.moved:
        moved = dataclasses.replace(event, start_utc=start, end_utc=end, rrule=None, exdates_utc=())
        lines += _vevent_lines(moved, zone, stamp, recurrence_id=original)
    lines.append("END:VCALENDAR")
    text = "".join(_fold(line) for line in lines)
    if not event.rrule:
        return text
    # Building a VTIMEZONE from zoneinfo costs ~2 ms; its text never changes for a zone.
    head, begin, tail = text.partition("BEGIN:VEVENT\r\n")
    return head + _vtimezone_text(event.timezone) + begin + tail


def _vevent_lines(
    event: AppointmentEvent, zone: str, stamp: str, recurrence_id: int | None
) -> list[str]:
    lines = [
        "BEGIN:VEVENT",
        f"UID:{_text_value(event.uid)}",
        f"DTSTAMP:{stamp}",
        _instant_line("DTSTART", event.start_utc, zone),
        _instant_line("DTEND", event.end_utc, zone),
        f"SUMMARY:{_text_value(event.summary)}",
        f"SEQUENCE:{int(event.sequence)}",
        f"STATUS:{_one_line(event.status)}",
        f"ORGANIZER{_person_params(event.organizer)}:mailto:{_one_line(event.organizer.email)}",
    ]
    for attendee in event.attendees:
        answer = _one_line(attendee.partstat).upper() or "NEEDS-ACTION"
        rsvp = "TRUE" if answer == "NEEDS-ACTION" else "FALSE"
        params = f"{_person_params(attendee)};ROLE=REQ-PARTICIPANT;PARTSTAT={answer};RSVP={rsvp}"
        lines.append(f"ATTENDEE{params}:mailto:{_one_line(attendee.email)}")
    if event.description:
        lines.append(f"DESCRIPTION:{_text_value(event.description)}")
    if event.url:
        lines.append(f"URL:{_one_line(event.url)}")
    if event.rrule:
        lines.append(f"RRULE:{_one_line(event.rrule)}")
    lines.extend(_instant_line("EXDATE", exdate, zone) for exdate in event.exdates_utc)
    if recurrence_id is not None:
        lines.append(_instant_line("RECURRENCE-ID", recurrence_id, zone))
    lines.append(f"X-BOOKDAV-APPOINTMENT-ID:{_text_value(event.appointment_id)}")
    lines.append("END:VEVENT")
    return lines


def _utc_text(instant: int) -> str:
    return time_module.strftime("%Y%m%dT%H%M%SZ", time_module.gmtime(instant))


def _instant_line(name: str, instant: int, zone: str) -> str:
    """`NAME:20270607T070000Z` in UTC, else `NAME;TZID=Europe/Berlin:20270607T090000`."""
    if zone == "UTC":
        return f"{name}:{_utc_text(instant)}"
    local = datetime.fromtimestamp(instant, ZoneInfo(zone))
    return f"{name};TZID={zone}:{local:%Y%m%dT%H%M%S}"


_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", ";": "\\;", ",": "\\,", "\n": "\\n"})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_PLAIN_PARAM = re.compile(r"[^\x00-\x1f\x7f\";:,]*")


def _text_value(text: str) -> str:
    """An RFC 5545 TEXT value: line breaks as \\n, the separators escaped, other controls gone."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub(" ", text).translate(_TEXT_ESCAPES)


def _person_params(person: Person) -> str:
    """`;CN=...` for a named person: one line, quoted when it holds `;:,`, a DQUOTE as RFC 6868's
    `^'` (and `^` as `^^`). A backslash becomes `/`: parameters have no escape for it, and parsers
    disagree on what one means (the name itself is kept unchanged in the appointment row)."""
    if not person.name:
        return ""
    name = _one_line(person.name).replace("\\", "/").replace("^", "^^").replace('"', "^'")
    return f";CN={name}" if _PLAIN_PARAM.fullmatch(name) else f';CN="{name}"'


def _fold(line: str) -> str:
    """One content line with its CRLF, folded at 75 octets without splitting a UTF-8 sequence."""
    if len(line) <= 75 and line.isascii():
        return line + "\r\n"
    data = line.encode()
    pieces = []
    limit = 75
    while len(data) > limit:
        cut = limit
        while data[cut] & 0xC0 == 0x80:  # never inside a multi-byte character
            cut -= 1
        pieces.append(data[:cut])
        data = data[cut:]
        limit = 74  # continuation lines start with a space
    pieces.append(data)
    return b"\r\n ".join(pieces).decode() + "\r\n"


@functools.lru_cache(maxsize=64)
def _vtimezone_text(zone: str) -> str:
    return icalendar.Timezone.from_tzinfo(ZoneInfo(zone)).to_ical().decode()
