"""Booking, rescheduling and cancelling: each one unit of work under the provider's lock.

Inside the transaction, after the lock: re-check the slot against working hours, rules and every
busy occurrence (the occurrence index, so an event typed into a phone a second ago counts), then
write the VEVENT (into the provider's Appointments calendar and each resource's calendar), the
appointment row and its outbox rows. A lost race is `SlotTaken` (409), a time that was never
bookable `NotBookable` (422). Nothing here awaits: the web layer runs each function whole on a
database thread (`Database.run_write`), so the lock is held for microseconds of Python, not for
network round trips.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
from sqlalchemy import Connection

from bookdav.booking.availability import (
    APPOINTMENTS_CALENDAR,
    ProviderCalendars,
    provider_and_service,
    provider_calendars,
    resource_calendars,
)
from bookdav.booking.errors import Conflict, Forbidden, NotFound, PolicyViolation
from bookdav.booking.ical import AppointmentEvent, Person, appointment_event
from bookdav.booking.services import rules_from_json
from bookdav.booking.slots import DAY, MINUTE, Interval, Rules, SlotQuery, free_slots, merge
from bookdav.notify import plan as notify_plan
from bookdav.storage import appointments as store
from bookdav.storage import calendars, sql
from bookdav.storage import occurrences as occ
from bookdav.storage.appointments import Appointment
from bookdav.storage.calendars import Collection
from bookdav.storage.resources import RESOURCES_PRINCIPAL
from bookdav.storage.services import ServiceRecord
from bookdav.storage.users import User
from bookdav.sync import push

MAX_OCCURRENCES = 104  # two years of a weekly series
# Crockford's base32 (no I, L, O or U to misread), for confirmation codes.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class SlotTaken(Conflict):
    """Someone (a booking, or an event in a calendar) holds this time now."""

    title = "Slot no longer available"


class NotBookable(PolicyViolation):
    """Outside working hours, off the slot grid, or against the service's rules."""

    title = "Not bookable"


@dataclass(frozen=True)
class Client:
    name: str
    email: str
    timezone: str
    user_id: str | None = None


@dataclass(frozen=True)
class Recurrence:
    """Repeat DAILY, WEEKLY or MONTHLY, `count` times or until the end of `until` (a date in the
    provider's zone)."""

    frequency: str
    count: int | None = None
    until: date | None = None

    def rrule(self, zone: str) -> str:
        if self.count is not None:
            return f"FREQ={self.frequency};COUNT={self.count}"
        assert self.until is not None
        # RFC 5545: with a zoned DTSTART, UNTIL is given in UTC.
        day_after = datetime.combine(
            self.until + timedelta(days=1), datetime.min.time(), ZoneInfo(zone)
        )
        last = (day_after - timedelta(seconds=1)).astimezone(UTC)
        return f"FREQ={self.frequency};UNTIL={last:%Y%m%dT%H%M%SZ}"


@dataclass(frozen=True)
class BookingRequest:
    service_id: str
    provider_id: str
    start_utc: int
    client: Client
    notes: str = ""
    recurrence: Recurrence | None = None


class LocksMissing(Conflict):
    """The transaction does not hold every lock this booking needs (the service gained a
    resource since the caller looked): run it again holding `needed`."""

    def __init__(self, needed: list[str]) -> None:
        super().__init__("the service changed while booking; send the request again")
        self.needed = needed


@dataclass(frozen=True)
class Booked:
    appointment: Appointment
    service: ServiceRecord
    provider: User


def principals_for(service: ServiceRecord, provider: User) -> list[str]:
    """The locks a booking of `service` with `provider` takes (provider, and resources if any)."""
    return [provider.username] + ([RESOURCES_PRINCIPAL] if service.resource_ids else [])


@dataclass(frozen=True)
class Prepared:
    """A single booking's appointment and VEVENT, built before the transaction from what the
    last booking of the same provider and service read (`prepare`). `book` uses them only if the
    provider and service it reads under the lock are still exactly those: the work moves out of
    the one-writer-at-a-time section, the outcome does not change."""

    provider: User
    service: ServiceRecord
    manage_url_base: str
    appointment: Appointment
    text: str
    times: occ.ItemTimes
    planned: Planned


# (provider id, service id) -> the provider and service the last booking read under its lock.
_LAST_READ: dict[tuple[str, str], tuple[User, ServiceRecord]] = {}
_LAST_READ_LIMIT = 10_000


def prepare(
    request: BookingRequest, manage_url_base: str, now: int | None = None
) -> Prepared | None:
    """Build a single, non-group booking's appointment and VEVENT outside any transaction, if an
    earlier booking of this provider and service was seen (else None: `book` builds them)."""
    seen = _LAST_READ.get((request.provider_id, request.service_id))
    if seen is None or request.recurrence is not None:
        return None
    provider, service = seen
    if rules_from_json(service.rules).capacity > 1:
        return None
    now = int(time.time()) if now is None else now
    appointment = _new_appointment(request, provider, service, now)
    text, times = _event(appointment, provider, service, [appointment], manage_url_base)
    planned = _planned(appointment, service, now)
    return Prepared(provider, service, manage_url_base, appointment, text, times, planned)


def new_appointment_id(now_ms: int | None = None) -> str:
    """A UUID version 7 (RFC 9562): 48 bits of Unix time in milliseconds, then 74 random bits.

    The appointment's id is also its event's href (`<id>.ics`) and UID (`<id>@bookdav`), and
    every one of those is the key of a unique index (appointments, items, item changes, reminder
    rows' dedupe keys). Random (version 4) keys land each new booking on a random leaf page of
    each of those B-trees, so a commit writes a page per index per booking and the pages touched
    grow with the tables. Keys that start with the time append next to each other: a group of
    bookings committed together shares those pages. The id is no secret (reading an appointment
    needs a signed-in party or the confirmation code); it tells when it was booked, to the
    millisecond, and 74 random bits still make it unguessable."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    value = (
        (ms & (1 << 48) - 1) << 80
        | 0x7 << 76  # version 7
        | secrets.randbits(12) << 64
        | 0b10 << 62  # the RFC 9562 variant
        | secrets.randbits(62)
    )
    return str(uuid.UUID(int=value))


def confirmation_code() -> str:
    """12 characters of Crockford's base32 in groups of four (60 bits), for a unique column.

    It used to be 8 hex digits (32 bits): by the birthday bound two appointments of a database
    holding ten thousand share one about once in a hundred such databases, and the booking that
    draws the clash fails on the unique index. 60 bits keep that below one in 10^11 a booking
    with ten million stored."""
    bits = secrets.randbits(60)
    raw = "".join(CODE_ALPHABET[(bits >> shift) & 31] for shift in range(55, -1, -5))
    return f"{raw[:4]}-{raw[4:8]}-{raw[8:]}"


def _new_appointment(
    request: BookingRequest, provider: User, service: ServiceRecord, now: int
) -> Appointment:
    appointment_id = new_appointment_id()
    return Appointment(
        id=appointment_id,
        service_id=service.id,
        provider_id=provider.id,
        client_id=request.client.user_id,
        client_name=request.client.name,
        client_email=request.client.email,
        client_timezone=request.client.timezone,
        start_utc=request.start_utc,
        end_utc=request.start_utc + service.duration_minutes * MINUTE,
        timezone=provider.timezone,
        recurrence=request.recurrence.rrule(provider.timezone) if request.recurrence else None,
        status="confirmed",
        notes=request.notes,
        event_uid=f"{appointment_id}@bookdav",
        event_href=f"{appointment_id}.ics",
        sequence=0,
        confirmation_code=confirmation_code(),
        manage_token=secrets.token_urlsafe(24),
        cancellation_reason=None,
        created_at=now,
        updated_at=now,
    )


def book(
    conn: Connection,
    request: BookingRequest,
    manage_url_base: str,
    held: Sequence[str],
    now: int | None = None,
    prepared: Prepared | None = None,
) -> Booked:
    """Book one appointment (or a recurring series) atomically; see the module docstring.
    `held` are the principals whose locks the transaction holds; `prepared`, from `prepare`.

    On PostgreSQL the whole booking is one pipeline: each read waits once for everything sent
    before it, and nothing else waits. In a write with `pipelined=True` (`Database.write`) that
    makes 4 round trips with the BEGIN, the locks and the COMMIT (docs/architecture.md)."""
    with sql.pipeline(conn):
        return _book(conn, request, manage_url_base, held, now, prepared)


def _book(
    conn: Connection,
    request: BookingRequest,
    manage_url_base: str,
    held: Sequence[str],
    now: int | None,
    prepared: Prepared | None,
) -> Booked:
    now = int(time.time()) if now is None else now
    with sql.pipeline(conn):  # the provider, the service and the calendars in one round trip
        collections = calendars.ask_collections_of_user(conn, request.provider_id)
        provider, service = provider_and_service(conn, request.provider_id, request.service_id)
        owned = provider_calendars(conn, provider, collections())
    if len(_LAST_READ) >= _LAST_READ_LIMIT:
        _LAST_READ.clear()
    _LAST_READ[(request.provider_id, request.service_id)] = (provider, service)
    needed = principals_for(service, provider)
    if not set(needed) <= set(held):
        raise LocksMissing(needed)
    rules = rules_from_json(service.rules)
    if (
        prepared is not None
        and prepared.provider == provider
        and prepared.service == service
        and prepared.manage_url_base == manage_url_base
    ):
        appointment, text, times = prepared.appointment, prepared.text, prepared.times
        attendees, planned = [appointment], prepared.planned
    else:
        planned = None
        appointment = _new_appointment(request, provider, service, now)
        attendees = [appointment]
        if rules.capacity > 1 and not request.recurrence:
            # A group slot: one VEVENT, one ATTENDEE per booking, never more than `capacity`.
            members = store.group_members(conn, service.id, provider.id, appointment.start_utc)
            if len(members) >= rules.capacity:
                raise SlotTaken(f"all {rules.capacity} places at this time are taken")
            if members:  # join the event the first booking made
                appointment = dataclasses.replace(
                    appointment,
                    event_uid=members[0].event_uid,
                    event_href=members[0].event_href,
                    sequence=members[0].sequence,
                )
            attendees = [*members, appointment]
        text, times = _event(attendees[0], provider, service, attendees, manage_url_base)
    ignoring = appointment.event_uid if len(attendees) > 1 else None  # the group's own event
    # Asked before the check, so on PostgreSQL they ride with its read, not a round trip after.
    announce = _ask_announcement(conn, "appointment.created", appointment, service, planned)
    _require_bookable(conn, provider, service, rules, times.occurrences, now, ignoring, owned)
    fresh = len(attendees) == 1  # a new event (not joining a group's): new UUID href and UID
    with sql.pipeline(conn):  # the writes go out together (PostgreSQL: with the commit)
        _write_event(conn, provider, service, appointment, text, times, owned, fresh=fresh)
        store.insert_appointment(conn, appointment)
        announce()
    return Booked(appointment, service, provider)


def reschedule(
    conn: Connection,
    appointment_id: str,
    start_utc: int,
    manage_url_base: str,
    now: int | None = None,
) -> Booked:
    """Move an appointment: same UID, SEQUENCE + 1, the new time checked like a new booking."""
    now = int(time.time()) if now is None else now
    current = _live(conn, appointment_id)
    provider, service = provider_and_service(conn, current.provider_id, current.service_id)
    rules = rules_from_json(service.rules)
    if rules.capacity > 1:
        raise PolicyViolation("a place in a group cannot be moved: cancel it and book another")
    moved = dataclasses.replace(
        current,
        start_utc=start_utc,
        end_utc=start_utc + (current.end_utc - current.start_utc),
        sequence=current.sequence + 1,
        exceptions="{}",
        client_partstat="NEEDS-ACTION",  # a new time is a new question (RFC 5546 2.1.4)
    )
    text, times = _event(moved, provider, service, [moved], manage_url_base)
    owned = _require_bookable(
        conn, provider, service, rules, times.occurrences, now, ignoring_uid=current.event_uid
    )
    _write_event(conn, provider, service, moved, text, times, owned)
    updated = store.update_appointment(
        conn,
        current.id,
        start_utc=moved.start_utc,
        end_utc=moved.end_utc,
        sequence=moved.sequence,
        exceptions="{}",
        client_partstat=moved.client_partstat,
    )
    _announce(conn, "appointment.rescheduled", updated, service)
    return Booked(updated, service, provider)


def cancel(
    conn: Connection,
    appointment_id: str,
    reason: str,
    by_client: bool,
    manage_url_base: str,
    now: int | None = None,
) -> Booked:
    """Cancel: the VEVENT stays with STATUS:CANCELLED (history and sync); the time is free at
    once. A client inside the service's cancellation notice is refused, naming the policy."""
    now = int(time.time()) if now is None else now
    current = get_appointment_or_404(conn, appointment_id)
    provider, service = provider_and_service(conn, current.provider_id, current.service_id)
    if current.status == "cancelled":
        return Booked(current, service, provider)
    if current.status != "confirmed":
        raise Conflict(f"a {current.status} appointment cannot be cancelled")
    notice = rules_from_json(service.rules).cancellation_notice_minutes
    if by_client and current.start_utc - now < notice * MINUTE:
        raise PolicyViolation(
            f"the cancellation policy of this service: cancel at least {notice} minutes ahead; "
            "contact the provider instead",
            policy={"cancellationNoticeMinutes": notice},
        )
    cancelled = dataclasses.replace(
        current, status="cancelled", sequence=current.sequence + 1, cancellation_reason=reason
    )
    members = [m for m in _event_members(conn, current, service) if m.id != current.id]
    if members:  # a group keeps its event; this attendee leaves it
        text, times = _event(members[0], provider, service, members, manage_url_base)
    else:
        text, times = _event(cancelled, provider, service, [cancelled], manage_url_base)
    _write_event(conn, provider, service, cancelled, text, times)
    updated = store.update_appointment(
        conn,
        current.id,
        status="cancelled",
        sequence=cancelled.sequence,
        cancellation_reason=reason,
    )
    _announce(conn, "appointment.cancelled", updated, service)
    return Booked(updated, service, provider)


def change_occurrence(
    conn: Connection,
    appointment_id: str,
    occurrence_utc: int,
    new_start_utc: int | None,
    by_client: bool,
    manage_url_base: str,
    now: int | None = None,
) -> Booked:
    """Cancel (`new_start_utc` None: an EXDATE) or move (a RECURRENCE-ID override) one occurrence
    of a recurring appointment, named by its original start. The series keeps its UID; SEQUENCE
    rises."""
    now = int(time.time()) if now is None else now
    current = _live(conn, appointment_id)
    if not current.recurrence:
        raise PolicyViolation("occurrence applies to recurring appointments only")
    provider, service = provider_and_service(conn, current.provider_id, current.service_id)
    rules = rules_from_json(service.rules)
    plain = dataclasses.replace(current, exceptions="{}")
    originals = {o.start_utc for o in _event(plain, provider, service, [plain], "")[1].occurrences}
    if occurrence_utc not in originals:
        raise NotFound(f"the series has no occurrence starting {_iso(occurrence_utc)}")
    exceptions = json.loads(current.exceptions)
    exdates: list[int] = exceptions.get("exdates", [])
    moved: dict[str, list[int]] = exceptions.get("moved", {})
    if occurrence_utc in exdates:
        raise Conflict("that occurrence is already cancelled")
    if new_start_utc is None:
        if by_client and occurrence_utc - now < rules.cancellation_notice_minutes * MINUTE:
            raise PolicyViolation(
                "the cancellation policy of this service: cancel at least "
                f"{rules.cancellation_notice_minutes} minutes ahead",
                policy={"cancellationNoticeMinutes": rules.cancellation_notice_minutes},
            )
        exdates.append(occurrence_utc)
        moved.pop(str(occurrence_utc), None)
    else:
        length = current.end_utc - current.start_utc
        moved[str(occurrence_utc)] = [new_start_utc, new_start_utc + length]
    changed = dataclasses.replace(
        current,
        sequence=current.sequence + 1,
        exceptions=json.dumps({"exdates": sorted(exdates), "moved": moved}, sort_keys=True),
    )
    text, times = _event(changed, provider, service, [changed], manage_url_base)
    if new_start_utc is not None:
        wanted = [o for o in times.occurrences if o.start_utc == new_start_utc]
        others = [o for o in times.occurrences if o.start_utc != new_start_utc]
        if any(o.start_utc < new_start_utc + length and o.end_utc > new_start_utc for o in others):
            raise SlotTaken("another occurrence of this series holds that time")
        _require_bookable(
            conn, provider, service, rules, wanted, now, ignoring_uid=current.event_uid
        )
    _write_event(conn, provider, service, changed, text, times)
    updated = store.update_appointment(
        conn, current.id, sequence=changed.sequence, exceptions=changed.exceptions
    )
    _announce(conn, "appointment.rescheduled", updated, service)
    return Booked(updated, service, provider)


def record_answer(
    conn: Connection, appointment_id: str, partstat: str, manage_url_base: str
) -> Booked:
    """The client answered the invitation (ACCEPTED, TENTATIVE or DECLINED without cancelling):
    their ATTENDEE's PARTSTAT in the stored VEVENT and the appointment row. SEQUENCE stays (an
    answer is not a change of the event); the caller announces it."""
    current = _live(conn, appointment_id)
    provider, service = provider_and_service(conn, current.provider_id, current.service_id)
    answered = dataclasses.replace(current, client_partstat=partstat)
    members = [
        answered if m.id == current.id else m for m in _event_members(conn, current, service)
    ]
    text, times = _event(members[0], provider, service, members, manage_url_base)
    _write_event(conn, provider, service, answered, text, times)
    updated = store.update_appointment(conn, current.id, client_partstat=partstat)
    return Booked(updated, service, provider)


def calendar_made_appointments(
    conn: Connection, provider: User, start_utc: int, end_utc: int
) -> list[dict[str, Any]]:
    """Events with an ATTENDEE that the provider put into their Appointments calendar with a
    calendar app (not booked through bookdav), overlapping the window: they are appointments too.
    Parsed here, on a listing, never on the booking or slot path."""
    appointments_path = f"{provider.username}/{APPOINTMENTS_CALENDAR}"
    collection = calendars.get_collection(conn, appointments_path)
    if collection is None:
        return []
    found = []
    for item, _ in calendars.items_in_range(conn, collection, start_utc, end_utc, "VEVENT"):
        if "ATTENDEE" not in item.text or "X-BOOKDAV-APPOINTMENT-ID" in item.text:
            continue
        event = next(iter(icalendar.Calendar.from_ical(item.text).walk("VEVENT")), None)
        if event is None:
            continue
        attendees = event.get("attendee", [])
        attendees = attendees if isinstance(attendees, list) else [attendees]
        found.append(
            {
                "uid": item.uid,
                "href": item.href,
                "summary": str(event.get("summary", "")),
                "startUtc": item.start_utc,
                "endUtc": item.end_utc,
                "status": str(event.get("status", "CONFIRMED")).lower(),
                "attendees": [str(a).removeprefix("mailto:") for a in attendees],
            }
        )
    return sorted(found, key=lambda entry: entry["startUtc"])


def set_outcome(conn: Connection, appointment_id: str, status: str) -> Appointment:
    """The provider marks an appointment completed or no_show (nothing changes in calendars)."""
    current = get_appointment_or_404(conn, appointment_id)
    if current.status == "cancelled":
        raise Conflict("a cancelled appointment has no outcome")
    return store.update_appointment(conn, current.id, status=status)


def change_notes(conn: Connection, appointment_id: str, notes: str) -> Appointment:
    return store.update_appointment(
        conn, get_appointment_or_404(conn, appointment_id).id, notes=notes
    )


def get_appointment_or_404(conn: Connection, appointment_id: str) -> Appointment:
    found = store.get_appointment(conn, appointment_id)
    if found is None:
        raise NotFound(f"no appointment {appointment_id}")
    return found


def _live(conn: Connection, appointment_id: str) -> Appointment:
    current = get_appointment_or_404(conn, appointment_id)
    if current.status != "confirmed":
        raise Conflict(f"a {current.status} appointment cannot be changed")
    return current


def _event_members(
    conn: Connection, appointment: Appointment, service: ServiceRecord
) -> list[Appointment]:
    if rules_from_json(service.rules).capacity > 1:
        return store.group_members(conn, service.id, appointment.provider_id, appointment.start_utc)
    return [appointment]


def _event(
    appointment: Appointment,
    provider: User,
    service: ServiceRecord,
    attendees: Sequence[Appointment],
    manage_url_base: str,
) -> tuple[str, occ.ItemTimes]:
    """The VEVENT text and its index entries (computed, not parsed, for a single event). A group
    event (several attendees) carries no one client's manage link or notes."""
    group = rules_from_json(service.rules).capacity > 1
    manage_url = "" if group else f"{manage_url_base}/manage/{appointment.manage_token}"
    lines = [f"Manage or cancel: {manage_url}"] if manage_url else []
    if appointment.notes and not group:
        lines.insert(0, appointment.notes)
    summary = service.name if group else f"{service.name}: {appointment.client_name}"
    exceptions = json.loads(appointment.exceptions)
    event = AppointmentEvent(
        uid=appointment.event_uid,
        appointment_id=appointment.id,
        summary=summary,
        start_utc=appointment.start_utc,
        end_utc=appointment.end_utc,
        timezone=appointment.timezone,
        organizer=Person(provider.name, provider.email),
        attendees=tuple(
            Person(a.client_name, a.client_email, a.client_partstat) for a in attendees
        ),
        sequence=appointment.sequence,
        status="CANCELLED" if appointment.status == "cancelled" else "CONFIRMED",
        description="\n\n".join(lines),
        url=manage_url,
        rrule=appointment.recurrence,
        exdates_utc=tuple(exceptions.get("exdates", [])),
        moved=tuple(
            (int(original), start, end)
            for original, (start, end) in sorted(exceptions.get("moved", {}).items())
        ),
    )
    text = appointment_event(event)
    if appointment.recurrence:
        zone = occ.zone_named(appointment.timezone)
        return text, occ.item_times(text, zone, appointment.start_utc + 3 * 366 * 86400)
    busy = event.status != "CANCELLED"
    only = occ.Occurrence(appointment.start_utc, appointment.end_utc, busy)
    return text, occ.ItemTimes("VEVENT", only.start_utc, only.end_utc, (only,), False, None)


def refuse_early(conn: Connection, request: BookingRequest, now: int | None = None) -> None:
    """A read-only look, outside any lock, at whether a single booking could still succeed:
    raises `SlotTaken` or `NotBookable` as `book` would, else returns. Only ever an early "no"
    for a slot that is taken as it is asked for (hundreds of clients after one slot): `book`
    decides under the lock, whatever this said."""
    if request.recurrence is not None:
        return
    now = int(time.time()) if now is None else now
    provider, service = provider_and_service(conn, request.provider_id, request.service_id)
    rules = rules_from_json(service.rules)
    if rules.capacity > 1:
        return  # a group slot fills up place by place: `book` counts them
    end_utc = request.start_utc + service.duration_minutes * MINUTE
    wanted = [occ.Occurrence(request.start_utc, end_utc, True)]
    _require_bookable(conn, provider, service, rules, wanted, now)


def _require_bookable(
    conn: Connection,
    provider: User,
    service: ServiceRecord,
    rules: Rules,
    wanted: Sequence[occ.Occurrence],
    now: int,
    ignoring_uid: str | None = None,
    owned: ProviderCalendars | None = None,
) -> ProviderCalendars:
    """Each wanted occurrence must be a free slot now: else `NotBookable` or `SlotTaken`, listing
    the occurrences at fault. `owned`: the provider's calendars, if read already in this
    transaction; returns them (read if not given), for the write."""
    if not wanted:
        raise NotBookable("the recurrence yields no occurrence")
    if len(wanted) > MAX_OCCURRENCES:
        raise NotBookable(f"a series may have at most {MAX_OCCURRENCES} occurrences")
    owned = owned or provider_calendars(conn, provider)
    blocking = [*owned.busy, *resource_calendars(conn, service)]
    not_bookable, taken = [], []
    for occurrence in wanted:
        verdict = _slot_verdict(
            conn,
            owned.availability,
            blocking,
            service,
            rules,
            occurrence.start_utc,
            now,
            ignoring_uid,
        )
        if verdict == "not bookable":
            not_bookable.append(occurrence.start_utc)
        elif verdict == "taken":
            taken.append(occurrence.start_utc)
    if not_bookable:
        raise NotBookable(
            "outside working hours, off the slot grid, or against the service's rules",
            conflicts=[_iso(start) for start in not_bookable],
        )
    if taken:
        raise SlotTaken("this time is no longer free", conflicts=[_iso(start) for start in taken])
    return owned


def _slot_verdict(
    conn: Connection,
    availability: Collection,
    blocking: Sequence[Collection],
    service: ServiceRecord,
    rules: Rules,
    start_utc: int,
    now: int,
    ignoring_uid: str | None,
) -> str:
    """Free, taken (busy now: 409) or not bookable (never a slot: 422). Only the wanted start is
    a candidate, but a day either side is read, so touching blocks of working hours merge as they
    do in slot search and the slot grid starts where they start."""
    window = (start_utc, start_utc + 1)
    duration = service.duration_minutes * MINUTE
    found = calendars.busy_intervals_by_collection(
        conn,
        [availability, *blocking],
        start_utc - DAY - rules.buffer_before_minutes * MINUTE,
        start_utc + duration + rules.buffer_after_minutes * MINUTE + DAY,
        ignoring_uid=ignoring_uid,
        fresh=True,  # read by `_require_bookable` in this transaction, before any write
    )
    open_hours = merge(found.pop(availability.id))
    busy = [interval for intervals in found.values() for interval in intervals]
    wanted: Interval = (start_utc, start_utc + service.duration_minutes * MINUTE)
    query = SlotQuery(window[0], window[1], service.duration_minutes, rules)
    if wanted in free_slots(query, open_hours, busy, now):
        return "free"  # the common case: one pass
    return "taken" if wanted in free_slots(query, open_hours, [], now) else "not bookable"


def _write_event(
    conn: Connection,
    provider: User,
    service: ServiceRecord,
    appointment: Appointment,
    text: str,
    times: occ.ItemTimes,
    owned: ProviderCalendars | None = None,
    *,
    fresh: bool = False,
) -> None:
    """The same VEVENT into the provider's Appointments calendar and each resource's calendar.
    `owned`: the provider's calendars, if the caller has just read them; `fresh`: a new event
    whose href and UID were made from a new UUID (see `calendars.add_new_item`)."""
    appointments_path = f"{provider.username}/{APPOINTMENTS_CALENDAR}"
    owned = owned or provider_calendars(conn, provider)
    targets = [c for c in owned.busy if c.path == appointments_path]
    if not targets:
        raise NotFound(f"provider {provider.id} has no appointments calendar")
    for collection in [*targets, *resource_calendars(conn, service)]:
        write = calendars.add_new_item if fresh else calendars.put_item
        write(
            conn, collection, appointment.event_href, text, uid=appointment.event_uid, times=times
        )


def _announce(
    conn: Connection,
    event: str,
    appointment: Appointment,
    service: ServiceRecord | None = None,
    planned: Planned | None = None,
) -> None:
    """Every outbox row the change owes, in one statement of the same transaction: the client's
    invitation and the provider's notice, each destination calendar's write, the reminders and the
    webhook deliveries. `service`: the appointment's, if the caller has it; `planned`: the rows
    that need no reading, if built already (`_planned`)."""
    _ask_announcement(conn, event, appointment, service, planned)()


def _ask_announcement(
    conn: Connection,
    event: str,
    appointment: Appointment,
    service: ServiceRecord | None = None,
    planned: Planned | None = None,
) -> Callable[[], None]:
    """`_announce` in two steps: its look-ups are sent now (inside `sql.pipeline` they go out
    with the caller's next read), and the returned function reads them and inserts the rows."""
    now = planned.now if planned else int(time.time())
    destinations = push.ask_destination_rows(conn, event, appointment, now)
    after_change = notify_plan.rows_after_change(
        conn,
        event,
        appointment,
        now,
        service.notifications if service else None,
        reminders=planned.reminders if planned else None,
    )

    def insert() -> None:
        rows = [
            *(planned.messages if planned else _messages(event, appointment, now)),
            *destinations(),
            *after_change(),
        ]
        store.insert_outbox_rows(conn, rows)

    return insert


@dataclass(frozen=True)
class Planned:
    """The outbox rows of a new single appointment that need nothing read: built with it."""

    now: int
    messages: list[dict[str, Any]]
    reminders: list[dict[str, Any]]


def _messages(event: str, appointment: Appointment, now: int) -> list[dict[str, Any]]:
    """The client's invitation and the provider's notice."""
    payload = {"event": event, "appointmentId": appointment.id, "sequence": appointment.sequence}
    return [
        store.outbox_row("client.imip", appointment.id, payload, now=now),
        store.outbox_row("provider.notice", appointment.id, payload, now=now),
    ]


def _planned(appointment: Appointment, service: ServiceRecord, now: int) -> Planned:
    return Planned(
        now,
        _messages("appointment.created", appointment, now),
        notify_plan.single_reminder_rows(appointment, now, service.notifications),
    )


def may_see(user: User | None, appointment: Appointment, code: str | None) -> bool:
    """The provider, an admin, the client, or anyone holding the confirmation code or token."""
    if code and (
        code == appointment.manage_token or code.strip().upper() == appointment.confirmation_code
    ):
        return True
    if user is None:
        return False
    return user.role == "admin" or user.id in (appointment.provider_id, appointment.client_id)


def require_access(user: User | None, appointment: Appointment, code: str | None) -> None:
    if not may_see(user, appointment, code):
        if user is None:
            raise NotFound(f"no appointment {appointment.id}")  # don't confirm it exists
        raise Forbidden("this is not your appointment")


def _iso(instant: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(instant))
