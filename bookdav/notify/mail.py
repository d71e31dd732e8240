"""The outbox handler for email: the client's iMIP invitation and reminders, the provider's notice."""

from __future__ import annotations

import asyncio
import dataclasses
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
from bookdav.storage import sql
from bookdav.storage.appointments import Appointment
from bookdav.storage.users import User

log = logging.getLogger("bookdav.mail")

# A reminder found due this long after its occurrence began is pointless: it is dropped.
REMINDER_LATE_SECONDS = 0


# Everything a message is built from, for a whole batch of rows, in one statement: the
# appointment, its provider (with their preferences) and its service (a deleted service still has
# a name and rules).
_APPOINTMENT_FIELDS = [f.name for f in dataclasses.fields(Appointment)]
_USER_FIELDS = [f.name for f in dataclasses.fields(User)]
_CONTEXTS = (
    "SELECT "
    + ", ".join(
        [f"appointments.{n}" for n in _APPOINTMENT_FIELDS]
        + [f"users.{n}" for n in _USER_FIELDS]
        + ["services.name", "services.rules", "services.templates", "users.preferences"]
    )
    + " FROM appointments JOIN users ON users.id = appointments.provider_id"
    " JOIN services ON services.id = appointments.service_id WHERE appointments.id IN :ids"
)


@dataclass(frozen=True)
class Loaded:
    context: imip.Context
    provider_preferences: dict[str, Any]


def load_contexts(
    conn: Connection, appointment_ids: list[str], templates_dir: str = ""
) -> dict[str, Loaded]:
    """Appointment id -> what its messages are built from; an appointment whose provider or
    service is gone is left out."""
    found: dict[str, Loaded] = {}
    if not appointment_ids:
        return found
    for row in sql.rows(conn, _CONTEXTS, {"ids": sorted(set(appointment_ids))}):
        appointment = Appointment(*row[: len(_APPOINTMENT_FIELDS)])
        rest = row[len(_APPOINTMENT_FIELDS) :]
        provider = User(*rest[: len(_USER_FIELDS)])
        name, rules, templates, preferences = rest[len(_USER_FIELDS) :]
        overrides = sql.json_object(templates).get("templates", {})
        context = imip.Context(
            appointment,
            provider,
            name,
            cancellation_notice_minutes=rules_from_json(
                json.loads(rules)
            ).cancellation_notice_minutes,
            service_templates=overrides if isinstance(overrides, dict) else {},
            templates_dir=templates_dir,
        )
        found[appointment.id] = Loaded(context, sql.json_object(preferences))
    return found


# A claimed batch's mail rows have their contexts read together, once (Job.batch_memo).
_MEMO_KEY = "mail.contexts"
MAIL_KINDS = (imip.CLIENT_IMIP, imip.PROVIDER_NOTICE, imip.CLIENT_REMINDER)


async def _loaded(job: Job) -> Loaded | None:
    """This row's context, read with every other mail row of the batch the first time one asks
    (an appointment missing from that read is gone)."""
    memo = job.batch_memo
    if _MEMO_KEY not in memo:
        wanted = [row.appointment_id for row in job.batch if row.kind in MAIL_KINDS]
        memo[_MEMO_KEY] = await job.database.run_read(
            load_contexts,
            [i for i in [*wanted, job.row.appointment_id] if i],
            job.settings.get("mail", "templates_dir"),
        )
    found: dict[str, Loaded] = memo[_MEMO_KEY]
    return found.get(job.row.appointment_id or "")


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
    loaded = await _loaded(job)
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
