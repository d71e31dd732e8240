"""What a change to an appointment plans beyond the two iMIP rows: reminders and webhook calls.

`rows_after_change` runs inside the booking transaction (called from `booking.appointments._announce`),
so a reminder or a webhook delivery exists exactly when the change it follows committed. Reminder
rows carry a `dedupe_key` (appointment, occurrence start, offset, sequence): inserting one twice,
from the transaction or from the periodic planner of the outbox worker, leaves one row, so each
reminder is sent at most once per state of the appointment, across restarts and processes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, select, update

from bookdav.storage import sql
from bookdav.storage.appointments import (
    Appointment,
    appointment_from_row,
    insert_outbox_rows,
    outbox_row,
)
from bookdav.storage.schema import (
    appointments,
    collections,
    items,
    occurrences,
    outbox,
    users,
)

REMINDER = "client.reminder"
WEBHOOK = "webhook"

# The events a webhook may subscribe to (each is also an outbox row's "event").
WEBHOOK_EVENTS = (
    "appointment.created",
    "appointment.rescheduled",
    "appointment.cancelled",
    "appointment.replied",
)
# How far ahead reminders are planned: the transaction and the planner both look this far past
# the largest offset; a recurring series gets its later reminders from the planner.
PLAN_AHEAD_SECONDS = 2 * 86400
# The process's default reminder offsets ([mail] reminder_minutes), set by `configure`.
_default_reminder_minutes: tuple[int, ...] = (1440, 60)


def parse_minutes(text: str) -> tuple[int, ...]:
    """ "1440, 60" -> (1440, 60); ValueError names what is wrong."""
    values = []
    for part in text.split(","):
        if not part.strip():
            continue
        value = int(part.strip())
        if not 0 < value <= 525_600:
            raise ValueError(f"reminder offset {value} is not between 1 and 525600 minutes")
        values.append(value)
    return tuple(sorted(set(values), reverse=True))


def configure(reminder_minutes: str) -> None:
    """Set the process default offsets (from `[mail] reminder_minutes`)."""
    global _default_reminder_minutes
    _default_reminder_minutes = parse_minutes(reminder_minutes)


def service_overrides(conn: Connection, service_id: str) -> dict[str, Any]:
    return sql.json_object(
        sql.scalar(conn, "SELECT templates FROM services WHERE id = :id", {"id": service_id})
    )


def reminder_offsets(
    conn: Connection, service_id: str, overrides: dict[str, Any] | None = None
) -> tuple[int, ...]:
    """The service's `reminderMinutes` if it set them, else the process default. `overrides`:
    the service's settings if the caller has them (saves reading them again)."""
    if overrides is None:
        overrides = service_overrides(conn, service_id)
    return _offsets_from(overrides)


def _offsets_from(overrides: dict[str, Any]) -> tuple[int, ...]:
    chosen = overrides.get("reminderMinutes")
    if isinstance(chosen, list) and all(isinstance(m, int) for m in chosen):
        return tuple(sorted(set(chosen), reverse=True))
    return _default_reminder_minutes


def occurrence_starts(
    conn: Connection, appointment: Appointment, start: int, end: int
) -> list[int]:
    """Starts of the appointment's live occurrences within [start, end): a single appointment's
    own start, a series' from the occurrence index (EXDATEs gone, moved ones at their new time)."""
    if appointment.status != "confirmed":
        return []
    if not appointment.recurrence:
        return [appointment.start_utc] if start <= appointment.start_utc < end else []
    rows = conn.execute(
        select(occurrences.c.start_utc)
        .select_from(
            occurrences.join(items, items.c.id == occurrences.c.item_id)
            .join(collections, collections.c.id == items.c.collection_id)
            .join(users, users.c.username == collections.c.owner)
        )
        .where(
            items.c.uid == appointment.event_uid,
            users.c.id == appointment.provider_id,
            occurrences.c.busy.is_(True),
            occurrences.c.start_utc >= start,
            occurrences.c.start_utc < end,
        )
        .distinct()
    )
    return sorted(row.start_utc for row in rows)


def reminder_key(appointment: Appointment, occurrence_utc: int, offset_minutes: int) -> str:
    return f"{appointment.id}:{occurrence_utc}:{offset_minutes}:{appointment.sequence}"


def plan_reminders(conn: Connection, appointment: Appointment, now: int | None = None) -> int:
    """Insert the reminders of the coming window not yet planned; returns how many were new.
    A reminder whose time has already passed is not planned (a booking 30 minutes ahead gets no
    "in an hour" reminder)."""
    now = int(time.time()) if now is None else now
    return insert_once(conn, reminder_rows(conn, appointment, now))


def reminder_rows(
    conn: Connection,
    appointment: Appointment,
    now: int,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The outbox rows of `plan_reminders` (each with its `dedupe_key`), not yet inserted."""
    offsets = reminder_offsets(conn, appointment.service_id, overrides)
    if not offsets:
        return []
    # A single appointment gets all its reminders now; a series those of the coming window (the
    # outbox worker's planner adds the later ones as the window moves).
    horizon = now + max(offsets) * 60 + PLAN_AHEAD_SECONDS
    if not appointment.recurrence:
        horizon = max(horizon, appointment.start_utc + 1)
    return _reminder_rows(
        appointment, now, offsets, occurrence_starts(conn, appointment, now, horizon)
    )


def single_reminder_rows(
    appointment: Appointment, now: int, overrides: dict[str, Any]
) -> list[dict[str, Any]]:
    """`reminder_rows` of a confirmed single (not recurring) appointment whose service's settings
    the caller has: nothing to read, so it can be built before the transaction."""
    assert appointment.status == "confirmed" and not appointment.recurrence
    offsets = _offsets_from(overrides)
    starts = [appointment.start_utc] if now <= appointment.start_utc else []
    return _reminder_rows(appointment, now, offsets, starts) if offsets else []


def _reminder_rows(
    appointment: Appointment, now: int, offsets: tuple[int, ...], starts: list[int]
) -> list[dict[str, Any]]:
    rows = []
    for occurrence_utc in starts:
        for offset in offsets:
            due = occurrence_utc - offset * 60
            if due < now - 60:
                continue
            payload = {
                "event": "appointment.reminder",
                "appointmentId": appointment.id,
                "sequence": appointment.sequence,
                "occurrenceStartUtc": occurrence_utc,
                "offsetMinutes": offset,
            }
            key = reminder_key(appointment, occurrence_utc, offset)
            rows.append(
                outbox_row(
                    REMINDER, appointment.id, payload, now=now, due=max(due, now), dedupe_key=key
                )
            )
    return rows


def insert_once(conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
    """Insert outbox rows, skipping any whose `dedupe_key` exists; how many were new."""
    return insert_outbox_rows(conn, rows)


# Runs in every booking transaction (usually finding nothing): through the driver, see storage.sql.
_LIVE_HOOKS = (
    "SELECT webhooks.id, webhooks.events FROM webhooks JOIN users ON users.id = webhooks.owner_id"
    " WHERE webhooks.deleted_at IS NULL"
    " AND (webhooks.owner_id = :provider_id OR users.role = 'admin')"
    " ORDER BY webhooks.created_at"
)


def enqueue_webhooks(
    conn: Connection, event: str, appointment: Appointment, now: int | None = None
) -> int:
    """One outbox row per live webhook subscribed to `event`: the provider's own hooks and every
    admin's. The body is fixed now, so a retry signs and sends the same bytes."""
    now = int(time.time()) if now is None else now
    return insert_outbox_rows(conn, webhook_rows(conn, event, appointment, now))


def webhook_rows(
    conn: Connection, event: str, appointment: Appointment, now: int
) -> list[dict[str, Any]]:
    """The outbox rows of `enqueue_webhooks`, not yet inserted."""
    return ask_webhook_rows(conn, event, appointment, now)()


def ask_webhook_rows(
    conn: Connection, event: str, appointment: Appointment, now: int
) -> Callable[[], list[dict[str, Any]]]:
    """`webhook_rows` in two steps: the query is sent now, the rows are built when the returned
    function is called (see `sql.ask`)."""
    hooks = sql.ask(conn, _LIVE_HOOKS, {"provider_id": appointment.provider_id})

    def build() -> list[dict[str, Any]]:
        body = {
            "event": event,
            "occurredAt": now,
            "appointment": webhook_appointment(appointment),
        }
        rows = []
        for hook_id, events in hooks():
            if event not in json.loads(events):
                continue
            delivery_id = str(uuid.uuid4())
            payload = {"event": event, "hookId": hook_id, "deliveryId": delivery_id, "body": body}
            rows.append(outbox_row(WEBHOOK, appointment.id, payload, now=now))
        return rows

    return build


def webhook_appointment(appointment: Appointment) -> dict[str, Any]:
    """What a webhook says about an appointment (no manage token: a webhook is not the client)."""
    return {
        "appointmentId": appointment.id,
        "serviceId": appointment.service_id,
        "providerId": appointment.provider_id,
        "status": appointment.status,
        "startUtc": appointment.start_utc,
        "endUtc": appointment.end_utc,
        "timezone": appointment.timezone,
        "recurrence": appointment.recurrence,
        "sequence": appointment.sequence,
        "clientName": appointment.client_name,
        "clientEmail": appointment.client_email,
        "confirmationCode": appointment.confirmation_code,
        "cancellationReason": appointment.cancellation_reason,
    }


def rows_after_change(
    conn: Connection,
    event: str,
    appointment: Appointment,
    now: int,
    overrides: dict[str, Any] | None = None,
    reminders: list[dict[str, Any]] | None = None,
) -> Callable[[], list[dict[str, Any]]]:
    """For the booking transaction (`booking.appointments._announce` inserts them with the iMIP
    rows, in one statement): reminders for the new state (the old state's are superseded by the
    sequence), and the webhook deliveries. `overrides`: the service's settings, if at hand;
    `reminders`: the reminder rows, if built already (`single_reminder_rows`). The webhooks'
    query is sent now; the returned function fetches it and gives the rows (see `sql.ask`)."""
    if reminders is None:
        reminders = (
            reminder_rows(conn, appointment, now, overrides)
            if appointment.status == "confirmed"
            else []
        )
    webhooks = ask_webhook_rows(conn, event, appointment, now)
    return lambda: reminders + webhooks()


def replan_service_reminders(conn: Connection, service_id: str, now: int | None = None) -> int:
    """After a service's reminder offsets changed (in the same transaction): supersede the pending
    reminders of its appointments whose offset is no longer wanted, and plan the new offsets'.
    A superseded row gives up its `dedupe_key`, so an offset chosen again is planned again.
    Returns how many rows were superseded."""
    now = int(time.time()) if now is None else now
    wanted = set(reminder_offsets(conn, service_id))
    of_service = select(appointments.c.id).where(appointments.c.service_id == service_id)
    pending = conn.execute(
        select(outbox.c.id, outbox.c.payload).where(
            outbox.c.kind == REMINDER,
            outbox.c.status == "pending",
            outbox.c.appointment_id.in_(of_service),
        )
    ).all()
    unwanted = [
        row.id for row in pending if json.loads(row.payload).get("offsetMinutes") not in wanted
    ]
    if unwanted:
        conn.execute(
            update(outbox)
            .where(outbox.c.id.in_(unwanted), outbox.c.status == "pending")
            .values(
                status="superseded",
                last_error="the service's reminder offsets changed",
                dedupe_key=None,
            )
        )
    live = conn.execute(
        select(appointments).where(
            appointments.c.service_id == service_id,
            appointments.c.status == "confirmed",
            (appointments.c.start_utc >= now) | appointments.c.recurrence.is_not(None),
        )
    ).all()
    for row in live:
        plan_reminders(conn, appointment_from_row(row), now)
    return len(unwanted)


def series_to_plan(conn: Connection, now: int) -> list[str]:
    """Ids of confirmed recurring series that may have an occurrence in the planning window."""
    return list(
        conn.execute(
            select(appointments.c.id)
            .where(
                appointments.c.status == "confirmed",
                appointments.c.recurrence.is_not(None),
                appointments.c.start_utc < now + 366 * 86400,
            )
            .order_by(appointments.c.id)
        ).scalars()
    )


def plan_series_batch(conn: Connection, appointment_ids: Sequence[str], now: int) -> int:
    """Plan the reminders of these series (re-read inside this transaction: a series cancelled
    since the listing gets none)."""
    rows = conn.execute(select(appointments).where(appointments.c.id.in_(appointment_ids))).all()
    return sum(plan_reminders(conn, appointment_from_row(row), now) for row in rows)


def plan_series_reminders(conn: Connection, now: int | None = None) -> int:
    """The periodic planner in one transaction (tests, small installs): reminders of confirmed
    recurring series whose occurrences entered the window. Idempotent (dedupe keys); returns how
    many rows are new. The worker runs the same in batches (`outbox.plan_reminders_pass`)."""
    now = int(time.time()) if now is None else now
    return plan_series_batch(conn, series_to_plan(conn, now), now)
