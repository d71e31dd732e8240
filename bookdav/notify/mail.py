"""The outbox handler for email: the client's iMIP invitation and reminders, the provider's notice."""

from __future__ import annotations

import asyncio
import json
import logging

from sqlalchemy import Connection, select

from bookdav.booking.services import rules_from_json
from bookdav.logs import log_event
from bookdav.notify import imip, plan
from bookdav.notify.errors import Superseded, Undeliverable
from bookdav.notify.outbox import Job
from bookdav.storage import appointments as appointment_store
from bookdav.storage.schema import services
from bookdav.storage.users import user_by_id, user_preferences

log = logging.getLogger("bookdav.mail")

# A reminder found due this long after its occurrence began is pointless: it is dropped.
REMINDER_LATE_SECONDS = 0


def load_context(
    conn: Connection, appointment_id: str, templates_dir: str = ""
) -> imip.Context | None:
    """Appointment, provider, service name (a deleted service still has a name), its cancellation
    notice and template overrides."""
    appointment = appointment_store.get_appointment(conn, appointment_id)
    if appointment is None:
        return None
    provider = user_by_id(conn, appointment.provider_id)
    row = conn.execute(
        select(services.c.name, services.c.rules).where(services.c.id == appointment.service_id)
    ).first()
    if provider is None or row is None:
        return None
    overrides = plan.service_overrides(conn, appointment.service_id).get("templates", {})
    return imip.Context(
        appointment,
        provider,
        row.name,
        cancellation_notice_minutes=rules_from_json(
            json.loads(row.rules)
        ).cancellation_notice_minutes,
        service_templates=overrides if isinstance(overrides, dict) else {},
        templates_dir=templates_dir,
    )


def provider_wants_email(conn: Connection, provider_id: str, default: bool) -> bool:
    """The provider's `notifyByEmail` preference, else `[mail] notify_providers`."""
    chosen = user_preferences(conn, provider_id).get("notifyByEmail")
    return chosen if isinstance(chosen, bool) else default


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
    context = await job.database.run_read(load_context, row.appointment_id or "", templates_dir)
    if context is None:
        raise Undeliverable(
            f"appointment {row.appointment_id} (or its provider or service) is gone"
        )
    current = context.appointment.sequence
    if row.kind == imip.CLIENT_REMINDER:
        reason = await job.database.run_read(reminder_still_due, job, context)
        if reason:
            raise Superseded(reason)
    elif int(row.payload.get("sequence", current)) < current:
        raise Superseded(f"superseded by sequence {current}")
    if row.kind == imip.PROVIDER_NOTICE and not await job.database.run_read(
        provider_wants_email,
        context.provider.id,
        job.settings.get("mail", "notify_providers"),
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
