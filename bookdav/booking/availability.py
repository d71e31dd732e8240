"""A provider's availability: working hours in their Availability calendar, and free slot search.

Slot search reads only indexed columns (the occurrence index): the Availability calendar's
occurrences are the open hours, every other calendar's busy occurrences block time. iCalendar is
parsed when it is written, never here.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import Connection

from bookdav.booking.errors import NotFound
from bookdav.booking.ical import HOURS_UID_PREFIX, WorkingHours, hours_from_events
from bookdav.booking.ical import weekly_hours_events as build_weekly_events
from bookdav.booking.services import rules_from_json
from bookdav.booking.slots import (
    MINUTE,
    UNLIMITED_DAYS,
    Interval,
    Rules,
    SlotQuery,
    free_slots,
    within_notice_and_advance,
)
from bookdav.storage import calendars
from bookdav.storage.appointments import group_slots_with_room
from bookdav.storage.calendars import Collection
from bookdav.storage.resources import resources_of_service
from bookdav.storage.services import ServiceRecord, provider_with_service, service_offered_by
from bookdav.storage.users import User, user_by_id

AVAILABILITY_CALENDAR = "availability"
APPOINTMENTS_CALENDAR = "appointments"


@dataclass(frozen=True)
class ProviderCalendars:
    availability: Collection
    busy: tuple[Collection, ...]


def provider_calendars(
    conn: Connection, provider: User, collections: Sequence[Collection] | None = None
) -> ProviderCalendars:
    """The Availability calendar and every other calendar of the provider (all of them block).
    `collections`: the provider's collections, if the caller has read them already."""
    if collections is None:
        collections = calendars.child_collections(conn, provider.username)
    owned = [c for c in collections if c.tag == "VCALENDAR"]
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


def provider_and_service(
    conn: Connection, provider_id: str, service_id: str
) -> tuple[User, ServiceRecord]:
    """The active provider and a live service they offer, or `NotFound` (one query; on a miss,
    one by one to say what is missing)."""
    found = provider_with_service(conn, provider_id, service_id)
    if found is not None and found[0].role == "provider" and found[0].status == "active":
        return found
    provider = user_by_id(conn, provider_id)
    if provider is None or provider.role != "provider" or provider.status != "active":
        raise NotFound(f"no provider {provider_id}")
    service = service_offered_by(conn, service_id, provider_id)
    if service is None:
        raise NotFound(f"provider {provider_id} offers no service {service_id}")
    return provider, service


@dataclass(frozen=True)
class FoundSlots:
    provider: User
    service: ServiceRecord
    slots: list[Interval]
    # Identifies the cached candidate list these slots were cut from (None: not cached), so the
    # web layer may cache their rendering under it too.
    cache_key: Hashable | None


def find_slots(
    conn: Connection,
    provider_id: str,
    service_id: str,
    window: tuple[int, int],
    now: int | None = None,
) -> FoundSlots:
    """The provider, the service and its free slots starting inside `window`, in one snapshot:
    inside the provider's hours, clear of every busy event of the provider and of each resource
    the service needs. Raises `NotFound` for an unknown provider or a service they don't offer.

    The candidates (every free slot, before the notice and advance rules) are cached under the
    revisions of the calendars they come from; the rules that depend on the clock are applied
    to them on every call."""
    now = int(time.time()) if now is None else now
    provider, service = provider_and_service(conn, provider_id, service_id)
    rules = rules_from_json(service.rules)
    owned = provider_calendars(conn, provider)
    blocking = list(owned.busy) + resource_calendars(conn, service)
    # Busy time just outside the window still blocks slots at its edges (buffers, long slots).
    reach = (
        service.duration_minutes + rules.buffer_before_minutes + rules.buffer_after_minutes
    ) * MINUTE
    span = (window[0] - reach, window[1] + reach)
    timeless = dataclasses.replace(rules, min_notice_minutes=0, max_advance_days=UNLIMITED_DAYS)
    query = SlotQuery(window[0], window[1], service.duration_minutes, timeless)
    if rules.capacity > 1:
        # A group slot stays bookable until full: its own event must not block it.
        open_hours = calendars.busy_intervals(conn, [owned.availability], *span)
        busy = _without_open_groups(conn, service, provider, rules, blocking, span)
        candidates = free_slots(query, open_hours, busy, window[0])
        return FoundSlots(
            provider, service, within_notice_and_advance(candidates, rules, now), None
        )
    key = (_revisions([owned.availability]), _revisions(blocking), span, query)
    cached = _candidates.get(key)
    if cached is None:
        open_hours = calendars.busy_intervals(conn, [owned.availability], *span)
        busy = calendars.busy_intervals(conn, blocking, *span)
        cached = free_slots(query, open_hours, busy, window[0])
        _candidates.put(key, cached)
    return FoundSlots(provider, service, within_notice_and_advance(cached, rules, now), key)


def _without_open_groups(
    conn: Connection,
    service: ServiceRecord,
    provider: User,
    rules: Rules,
    blocking: Sequence[Collection],
    span: tuple[int, int],
) -> list[Interval]:
    """Busy time, less one copy of each group event of this service that still has room."""
    busy = calendars.busy_intervals(conn, blocking, *span)
    for start_utc, end_utc in group_slots_with_room(conn, service, provider, rules.capacity, span):
        if (start_utc, end_utc) in busy:
            busy.remove((start_utc, end_utc))
    return busy


def _revisions(owned: Iterable[Collection]) -> tuple[tuple[int, str, int], ...]:
    return tuple(sorted((c.id, c.incarnation, c.revision) for c in owned))


class SlotCache:
    """Candidate slots, keyed by the revisions of the calendars they were computed from.

    Every write to a calendar, from any process, raises its revision inside the same transaction,
    and the key is read in the same snapshot as the intervals would be: a changed calendar is a
    new key, never a stale answer.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._entries: OrderedDict[Hashable, list[Interval]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> list[Interval] | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: list[Interval]) -> None:
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


_candidates = SlotCache()


def resource_calendars(conn: Connection, service: ServiceRecord) -> list[Collection]:
    if not service.resource_ids:
        return []
    found = []
    for resource in resources_of_service(conn, service.id):
        collection = calendars.get_collection(conn, resource.calendar_path)
        if collection is not None:
            found.append(collection)
    return found
