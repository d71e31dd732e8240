"""The outbox handler for email: the client's iMIP invitation and the provider's notice."""

from __future__ import annotations

import logging

from sqlalchemy import Connection, select

from bookdav.logs import log_event
from bookdav.notify import imip
from bookdav.notify.errors import Superseded, Undeliverable
from bookdav.notify.outbox import Job
from bookdav.storage import appointments as appointment_store
from bookdav.storage.schema import services
from bookdav.storage.users import user_by_id

log = logging.getLogger("bookdav.mail")


def load_context(conn: Connection, appointment_id: str) -> imip.Context | None:
    """Appointment, provider and service name (a deleted service still has a name)."""
    appointment = appointment_store.get_appointment(conn, appointment_id)
    if appointment is None:
        return None
    provider = user_by_id(conn, appointment.provider_id)
    service_name = conn.execute(
        select(services.c.name).where(services.c.id == appointment.service_id)
    ).scalar_one_or_none()
    if provider is None or service_name is None:
        return None
    return imip.Context(appointment, provider, service_name)


async def deliver(job: Job) -> None:
    """Build the row's message from the appointment as it is now and hand it to the transport."""
    row = job.row
    context = await job.database.run_read(load_context, row.appointment_id or "")
    if context is None:
        raise Undeliverable(
            f"appointment {row.appointment_id} (or its provider or service) is gone"
        )
    current = context.appointment.sequence
    if int(row.payload.get("sequence", current)) < current:
        raise Superseded(f"superseded by sequence {current}")
    outgoing = imip.build(
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
