"""The date picker and slot list: a month of free days and a day of free slots in the visitor's
zone, computed on the server with `booking.availability.find_slots`."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from sqlalchemy import Connection

from bookdav.booking import availability
from bookdav.booking.slots import Interval

SEARCH_DAYS = 62
SEARCH_ROUNDS = 6  # look about a year ahead for the first free day
WEEKDAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@lru_cache(maxsize=1)
def zone_names() -> tuple[str, ...]:
    skip = ("Etc/", "SystemV/", "posix/", "right/", "US/", "Canada/", "Brazil/", "Mexico/")
    names = {name for name in available_timezones() if "/" in name and not name.startswith(skip)}
    return ("UTC", *sorted(names))


def valid_zone(name: str | None) -> str | None:
    if not name or len(name) > 64:
        return None
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return name


def parse_month(raw: str | None) -> date | None:
    try:
        return datetime.strptime(raw or "", "%Y-%m").date()
    except ValueError:
        return None


def parse_day(raw: str | None) -> date | None:
    try:
        return date.fromisoformat(raw or "")
    except ValueError:
        return None


@dataclass(frozen=True)
class CalendarDay:
    day: date
    free: bool
    selected: bool
    slot_count: int


@dataclass(frozen=True)
class Picker:
    zone: str
    month: date  # the first of the month shown
    weeks: list[list[CalendarDay | None]]
    day: date | None
    slots: list[Interval]  # of `day`
    previous_month: date | None
    next_month: date
    first_free: Interval | None


def local_date(instant: int, zone: str) -> date:
    return datetime.fromtimestamp(instant, ZoneInfo(zone)).date()


def _month_slots(
    conn: Connection, provider_id: str, service_id: str, month: date, zone: str
) -> list[Interval]:
    last = month.replace(day=calendar.monthrange(month.year, month.month)[1])
    window = availability.day_window(month, last, zone)
    return availability.find_slots(conn, provider_id, service_id, window).slots


def first_free_slot(
    conn: Connection, provider_id: str, service_id: str, zone: str, after: int | None = None
) -> Interval | None:
    start = datetime.now(ZoneInfo(zone)).date()
    for _ in range(SEARCH_ROUNDS):
        end = start + timedelta(days=SEARCH_DAYS - 1)
        window = availability.day_window(start, end, zone)
        slots = availability.find_slots(conn, provider_id, service_id, window).slots
        for slot in slots:
            if after is None or slot[0] >= after:
                return slot
        start = end + timedelta(days=1)
    return None


def build_picker(
    conn: Connection,
    provider_id: str,
    service_id: str,
    zone: str,
    month: date | None,
    day: date | None,
) -> Picker:
    """One month (opening on the first free day when none is asked for) and one day's slots."""
    first_free = None
    if month is None and day is None:
        first_free = first_free_slot(conn, provider_id, service_id, zone)
        if first_free is not None:
            day = local_date(first_free[0], zone)
    if day is not None and month is None:
        month = day.replace(day=1)
    today = datetime.now(ZoneInfo(zone)).date()
    month = (month or today).replace(day=1)
    slots = _month_slots(conn, provider_id, service_id, month, zone)
    by_day: dict[date, list[Interval]] = {}
    for slot in slots:
        by_day.setdefault(local_date(slot[0], zone), []).append(slot)
    if day is not None and day.replace(day=1) != month:
        day = None
    weeks: list[list[CalendarDay | None]] = []
    for week in calendar.Calendar(firstweekday=0).monthdatescalendar(month.year, month.month):
        weeks.append(
            [
                CalendarDay(d, d in by_day, d == day, len(by_day.get(d, [])))
                if d.month == month.month
                else None
                for d in week
            ]
        )
    previous = (month - timedelta(days=1)).replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    return Picker(
        zone=zone,
        month=month,
        weeks=weeks,
        day=day,
        slots=by_day.get(day, []) if day else [],
        previous_month=previous if previous >= today.replace(day=1) else None,
        next_month=next_month,
        first_free=first_free,
    )


def next_free_slots(
    conn: Connection, provider_id: str, service_id: str, zone: str, after: int, count: int = 6
) -> list[Interval]:
    """Up to `count` free slots starting at or after `after` (the next two months)."""
    start = local_date(after, zone)
    window = availability.day_window(start, start + timedelta(days=SEARCH_DAYS - 1), zone)
    slots = availability.find_slots(conn, provider_id, service_id, window).slots
    return [slot for slot in slots if slot[0] >= after][:count]
