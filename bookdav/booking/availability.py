"""A provider's availability: working hours in their Availability calendar, and free slot search.

Slot search reads only indexed columns (the occurrence index): the Availability calendar's
occurrences are the open hours, every other calendar's busy occurrences block time. iCalendar is
parsed when it is written, never here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection

from bookdav.booking.errors import NotFound
from bookdav.booking.ical import HOURS_UID_PREFIX, WorkingHours, hours_from_events
from bookdav.booking.ical import weekly_hours_events as build_weekly_events
from bookdav.booking.services import rules_from_json
from bookdav.booking.slots import MINUTE, Interval, SlotQuery, free_slots
from bookdav.storage import calendars
from bookdav.storage.calendars import Collection
from bookdav.storage.resources import resources_of_service
from bookdav.storage.services import ServiceRecord
from bookdav.storage.users import User

AVAILABILITY_CALENDAR = "availability"


@dataclass(frozen=True)
class ProviderCalendars:
    availability: Collection
    busy: tuple[Collection, ...]


def provider_calendars(conn: Connection, provider: User) -> ProviderCalendars:
    """The Availability calendar and every other calendar of the provider (all of them block)."""
    owned = [
        c for c in calendars.child_collections(conn, provider.username) if c.tag == "VCALENDAR"
    ]
    availability_path = f"{provider.username}/{AVAILABILITY_CALENDAR}"
    availability = next((c for c in owned if c.path == availability_path), None)
    if availability is None:
        raise NotFound(f"provider {provider.id} has no availability calendar")
    return ProviderCalendars(availability, tuple(c for c in owned if c.path != availability_path))


def set_working_hours(conn: Connection, provider: User, hours: WorkingHours) -> None:
    """Replace the weekly hours bookdav wrote; events the provider added by hand stay."""
    availability = provider_calendars(conn, provider).availability
    for item in calendars.all_items(conn, availability.id):
        if item.uid.startswith(HOURS_UID_PREFIX):
            calendars.delete_item(conn, availability, item.href)
    for uid, text in build_weekly_events(hours, provider.id):
        calendars.put_item(conn, availability, f"{uid}.ics", text)


def working_hours(conn: Connection, provider: User) -> WorkingHours | None:
    availability = provider_calendars(conn, provider).availability
    texts = [
        item.text
        for item in calendars.all_items(conn, availability.id)
        if item.uid.startswith(HOURS_UID_PREFIX)
    ]
    return hours_from_events(texts, provider.timezone)


def day_window(start_day: date, end_day: date, zone: str) -> tuple[int, int]:
    """[start_day 00:00, the day after end_day 00:00) in `zone`, as epoch seconds."""
    tz = ZoneInfo(zone)
    start = datetime.combine(start_day, datetime.min.time(), tz)
    end = datetime.combine(end_day + timedelta(days=1), datetime.min.time(), tz)
    return int(start.timestamp()), int(end.timestamp())


def search_slots(
    conn: Connection,
    provider: User,
    service: ServiceRecord,
    window: tuple[int, int],
    now: int | None = None,
) -> list[Interval]:
    """Free slots of `service` with `provider` starting inside `window`: inside the provider's
    hours, clear of every busy event of the provider and of each resource the service needs."""
    now = int(time.time()) if now is None else now
    rules = rules_from_json(service.rules)
    owned = provider_calendars(conn, provider)
    blocking = [c.id for c in owned.busy] + resource_calendar_ids(conn, service)
    window_start, window_end = window
    # Busy time just outside the window still blocks slots at its edges (buffers, long slots).
    reach = (
        service.duration_minutes + rules.buffer_before_minutes + rules.buffer_after_minutes
    ) * MINUTE
    open_hours = calendars.busy_intervals(
        conn, [owned.availability.id], window_start, window_end + reach
    )
    busy = calendars.busy_intervals(conn, blocking, window_start - reach, window_end + reach)
    query = SlotQuery(window_start, window_end, service.duration_minutes, rules)
    return free_slots(query, open_hours, busy, now)


def resource_calendar_ids(conn: Connection, service: ServiceRecord) -> list[int]:
    ids = []
    for resource in resources_of_service(conn, service.id):
        collection = calendars.get_collection(conn, resource.calendar_path)
        if collection is not None:
            ids.append(collection.id)
    return ids
