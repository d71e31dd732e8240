"""Destination calendars: every booking, reschedule and cancellation written to a remote CalDAV
calendar through the outbox (kind `sync.push`), so a remote outage delays a write, never loses it.

The booking transaction enqueues one row per destination (`destination_rows`). The
handler PUTs the appointment's event as it is *now* (so retries and reordering converge on the
latest state) at `<collection>/<uid>.ics`: `If-None-Match: *` the first time, `If-Match` with the
ETag the last write got afterwards; on a 412 it reads the remote ETag and overwrites once (bookdav
owns that event). A cancellation is a PUT with STATUS:CANCELLED, not a DELETE: the remote keeps
the history and every calendar shows it as cancelled, and a late retry can never resurrect it.
ORGANIZER/ATTENDEE are left out, so a scheduling server (Google, iCloud, Fastmail) does not email
the client a second invitation. 5xx, 401/403, timeouts and network errors raise: the outbox
retries with backoff.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import icalendar
from sqlalchemy import Connection, or_, select

from bookdav.logs import log_event
from bookdav.notify.errors import Superseded, Undeliverable
from bookdav.storage import appointments as appointment_store
from bookdav.storage import calendars, sql
from bookdav.storage.appointments import Appointment
from bookdav.storage.schema import appointments
from bookdav.storage.users import user_by_id
from bookdav.sync import crypto, sources, store

if TYPE_CHECKING:
    from bookdav.notify.outbox import Job

log = logging.getLogger("bookdav.sync")

KIND = "sync.push"
APPOINTMENTS_CALENDAR = "appointments"
# Statuses that say our document will never be accepted: retrying cannot help.
REFUSED = (400, 405, 411, 413, 415, 422)
LEFT_OUT = ("ORGANIZER", "ATTENDEE", "URL")


# Runs in every booking transaction (usually finding nothing): through the driver, see storage.sql.
_DESTINATIONS = (
    "SELECT id FROM external_calendars WHERE provider_id = :provider_id AND role = 'destination'"
    " ORDER BY created_at, id"
)


def destination_rows(
    conn: Connection, event: str, appointment: Appointment, now: int
) -> list[dict[str, Any]]:
    """One outbox row per destination calendar of the appointment's provider, for the booking's
    transaction to insert (none if the provider has none)."""
    return ask_destination_rows(conn, event, appointment, now)()


def ask_destination_rows(
    conn: Connection, event: str, appointment: Appointment, now: int
) -> Callable[[], list[dict[str, Any]]]:
    """`destination_rows` in two steps: the query is sent now, the rows are built when the
    returned function is called (see `sql.ask`)."""
    destinations = sql.ask(conn, _DESTINATIONS, {"provider_id": appointment.provider_id})
    return lambda: [
        appointment_store.outbox_row(
            KIND,
            appointment.id,
            {
                "event": event,
                "appointmentId": appointment.id,
                "sequence": appointment.sequence,
                "calendarId": calendar_id,
            },
            now=now,
        )
        for (calendar_id,) in destinations()
    ]


def enqueue_backfill(conn: Connection, destination: store.ExternalCalendar, now: int) -> int:
    """A new destination gets the provider's confirmed appointments that are not over yet (one
    row per event: a group's bookings share one), through the same outbox as new bookings."""
    rows = conn.execute(
        select(appointments.c.id, appointments.c.event_uid, appointments.c.sequence)
        .where(
            appointments.c.provider_id == destination.provider_id,
            appointments.c.status == "confirmed",
            or_(appointments.c.end_utc > now, appointments.c.recurrence.is_not(None)),
        )
        .order_by(appointments.c.start_utc)
    ).all()
    by_event = {
        event_uid: (appointment_id, sequence) for appointment_id, event_uid, sequence in rows
    }
    for appointment_id, sequence in by_event.values():
        payload = {
            "event": "calendar.connected",
            "appointmentId": appointment_id,
            "sequence": sequence,
            "calendarId": destination.id,
        }
        appointment_store.enqueue(conn, appointment_id, [(KIND, payload)])
    return len(by_event)


def resource_name(uid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", uid) + ".ics"


def _load(
    conn: Connection, calendar_id: str, appointment_id: str
) -> tuple[store.ExternalCalendar | None, Appointment | None, str | None, str]:
    destination = store.get_external_calendar(conn, calendar_id)
    appointment = appointment_store.get_appointment(conn, appointment_id)
    text = None
    known_etag = ""
    if appointment is not None:
        provider = user_by_id(conn, appointment.provider_id)
        if provider is not None:
            collection = calendars.get_collection(
                conn, f"{provider.username}/{APPOINTMENTS_CALENDAR}"
            )
            item = (
                calendars.get_item(conn, collection.id, appointment.event_href)
                if collection
                else None
            )
            text = item.text if item else None
    if destination is not None and appointment is not None:
        known = store.known_items(conn, destination.id).get(resource_name(appointment.event_uid))
        known_etag = known.etag if known else ""
    return destination, appointment, text, known_etag


def remote_text(text: str) -> str:
    """The event as the destination gets it: without scheduling properties and the manage link."""
    calendar = icalendar.Calendar.from_ical(text)
    for event in calendar.walk("VEVENT"):
        for name in LEFT_OUT:
            event.pop(name, None)
    return calendar.to_ical().decode()


async def deliver(job: Job) -> None:
    payload: dict[str, Any] = job.row.payload
    calendar_id = str(payload.get("calendarId") or "")
    appointment_id = str(payload.get("appointmentId") or job.row.appointment_id or "")
    destination, appointment, text, known_etag = await job.database.run_read(
        _load, calendar_id, appointment_id
    )
    if destination is None or destination.role != "destination":
        raise Superseded(f"destination calendar {calendar_id} was removed")
    if appointment is None or text is None:
        raise Undeliverable(f"appointment {appointment_id} (or its event) is gone")
    if int(payload.get("sequence", appointment.sequence)) < appointment.sequence:
        raise Superseded(f"superseded by sequence {appointment.sequence}")
    name = resource_name(appointment.event_uid)
    url = sources.resource_url(destination.url, name)
    credentials = crypto.decrypt_credentials(
        job.settings.get("sync", "secret_key"), destination.credentials
    )
    job.fields.update(calendar_id=destination.id, destination=sources.safe_url(url))
    body = remote_text(text)
    allow_private = job.settings.allow_private_networks
    async with sources.new_session(allow_private_networks=allow_private) as session:
        client = sources.Client(
            session,
            sources.Credentials.from_dict(credentials),
            allow_private_networks=allow_private,
        )
        etag = await _put(client, url, body, known_etag)
    await job.database.run_write(
        store.remember_item, destination.id, name, etag, appointment.event_href
    )
    log_event(
        log,
        "appointment written to destination calendar",
        calendar_id=destination.id,
        provider_id=destination.provider_id,
        appointment_id=appointment.id,
        appointment_event=payload.get("event"),
        destination=sources.safe_url(url),
        status=appointment.status,
    )


async def _put(client: sources.Client, url: str, body: str, known_etag: str) -> str:
    """PUT with a precondition; on 412 read the remote ETag and overwrite once. The new ETag
    (empty if the server sent none)."""
    condition = {"If-Match": known_etag} if known_etag else {"If-None-Match": "*"}
    status, headers = await _try_put(client, url, body, condition)
    if status == 412:
        current = await _remote_etag(client, url)
        condition = {"If-Match": current} if current else {"If-None-Match": "*"}
        status, headers = await _try_put(client, url, body, condition)
    if status == 412:
        raise sources.RemoteError(f"PUT {sources.safe_url(url)}: precondition failed twice")
    return headers.get("ETag", "")


async def _try_put(
    client: sources.Client, url: str, body: str, condition: dict[str, str]
) -> tuple[int, Any]:
    status, headers, _body = await client.request(
        "PUT",
        url,
        body=body.encode(),
        headers={"Content-Type": "text/calendar; charset=utf-8", **condition},
        ok=(200, 201, 204, 412, *REFUSED),
    )
    if status in REFUSED:
        raise Undeliverable(f"PUT {sources.safe_url(url)}: the server refused it ({status})")
    return status, headers


async def _remote_etag(client: sources.Client, url: str) -> str:
    status, headers, _body = await client.request("GET", url, ok=(200, 404, 410))
    return str(headers.get("ETag", "")) if status == 200 else ""
