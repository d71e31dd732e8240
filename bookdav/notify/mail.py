"""The outbox handler for email: the client's iMIP invitation and reminders, the provider's notice."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from bookdav.booking.services import rules_from_json
from bookdav.logs import log_event
from bookdav.notify import imip, plan
from bookdav.notify.errors import Superseded, Undeliverable
from bookdav.notify.outbox import Job
from bookdav.storage import appointments as appointment_store
from bookdav.storage import sql
from bookdav.storage.users import user_by_id

log = logging.getLogger("bookdav.mail")

# A reminder found due this long after its occurrence began is pointless: it is dropped.
REMINDER_LATE_SECONDS = 0


# The service's and the provider's side of a message in one statement (a deleted service still
# has a name).
_SERVICE_AND_PREFERENCES = """
SELECT services.name, services.rules, services.templates, users.preferences
FROM services JOIN users ON users.id = :provider_id
WHERE services.id = :service_id
"""


@dataclass(frozen=True)
class Loaded:
    context: imip.Context
    provider_preferences: dict[str, Any]


def load_context(conn: Connection, appointment_id: str, templates_dir: str = "") -> Loaded | None:
    """Appointment, provider (with their preferences), service name, its cancellation notice and
    template overrides: three statements."""
    appointment = appointment_store.get_appointment(conn, appointment_id)
    if appointment is None:
        return None
    provider = user_by_id(conn, appointment.provider_id)
    row = sql.first(
        conn,
        _SERVICE_AND_PREFERENCES,
        {"provider_id": appointment.provider_id, "service_id": appointment.service_id},
    )
    if provider is None or row is None:
        return None
    name, rules, templates, preferences = row
    overrides = sql.json_object(templates).get("templates", {})
    context = imip.Context(
        appointment,
        provider,
        name,
        cancellation_notice_minutes=rules_from_json(json.loads(rules)).cancellation_notice_minutes,
        service_templates=overrides if isinstance(overrides, dict) else {},
        templates_dir=templates_dir,
    )
    return Loaded(context, sql.json_object(preferences))


def reminder_still_due(conn: Connection, job: Job, context: imip.Context) -> str | None:
    """Why a reminder must not go out (None: send it): the appointment was cancelled or changed
    since it was planned, its offset is no longer one of the service's, the occurrence is gone, or
    the occurrence has begun."""
    appointment, payload = context.appointment, job.row.payload
    occurrence = int(payload["occurrenceStartUtc"])
    if appointment.status != "confirmed":
        return f"appointment is {appointment.status}"
    if int(payload.get("sequence", -1)) != appointment.sequence:
        return f"appointment changed (sequence {appointment.sequence}); re-planned"
    if int(payload.get("offsetMinutes", 0)) not in plan.reminder_offsets(
        conn, appointment.service_id
    ):
        # Normally superseded when the service changed; this covers a booking racing that change.
        return "the service's reminder offsets changed"
    if not plan.occurrence_starts(conn, appointment, occurrence, occurrence + 1):
        return "the occurrence is no longer in the series"
    if job.now > occurrence + REMINDER_LATE_SECONDS:
        return "the occurrence has begun"
    return None


async def deliver(job: Job) -> None:
    """Build the row's message from the appointment as it is now and hand it to the transport."""
    row = job.row
    templates_dir = job.settings.get("mail", "templates_dir")
    loaded = await job.database.run_read(load_context, row.appointment_id or "", templates_dir)
    if loaded is None:
        raise Undeliverable(
            f"appointment {row.appointment_id} (or its provider or service) is gone"
        )
    context = loaded.context
    current = context.appointment.sequence
    if row.kind == imip.CLIENT_REMINDER:
        reason = await job.database.run_read(reminder_still_due, job, context)
        if reason:
            raise Superseded(reason)
    elif int(row.payload.get("sequence", current)) < current:
        raise Superseded(f"superseded by sequence {current}")
    if row.kind == imip.PROVIDER_NOTICE:
        chosen = loaded.provider_preferences.get("notifyByEmail")  # else `[mail] notify_providers`
        if not (
            chosen if isinstance(chosen, bool) else job.settings.get("mail", "notify_providers")
        ):
            raise Superseded("the provider chose no email notices")
    # Building the MIME message is CPU work of a millisecond or more: off the event loop, so a
    # backlog of mail after a rush does not stall the requests still coming in.
    outgoing = await asyncio.to_thread(
        imip.build,
        row.kind,
        context,
        row.payload,
        outbox_id=row.id,
        from_address=job.settings.get("mail", "from_address"),
        base_url=job.settings.public_base_url,
    )
    job.fields.update(to=",".join(outgoing.recipients), message_id=outgoing.message_id)
    await job.transport.send(outgoing.message, outgoing.sender, outgoing.recipients)
    log_event(log, "mail sent", **job.fields, transport=job.transport.description)
