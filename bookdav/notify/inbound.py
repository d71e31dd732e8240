"""Inbound iMIP: a client's `METHOD:REPLY` (Accept, Tentative, Decline in their mail app) applied to
the stored appointment.

Reached two ways: `bookdav mail ingest < message.eml` (an MTA pipe) and the LMTP listener that
`bookdav serve` starts when `[mail] inbound_listen` is set. Both call `ingest`.

A reply is applied only when its UID names an appointment, its ATTENDEE is that appointment's
client, and the message's From is the same address (case-insensitive); anything else is refused
with one line saying why, logged, and never applied. Outlook may omit ORGANIZER in replies, so it
is not required (Nextcloud server #53949). A reply to an older SEQUENCE than the stored one answers
a question no longer asked and is refused. ACCEPTED/TENTATIVE set the ATTENDEE's PARTSTAT (in
the VEVENT CalDAV clients see and on the appointment); DECLINED cancels through
`booking.cancel` as if the client cancelled (the slot frees, the CANCEL goes out, the provider is
told); inside the service's cancellation notice it is recorded as DECLINED and the provider is
told, but the appointment stands (the policy decides, not the mail app). All of it is one write
transaction under the provider's lock.

A REPLY about one occurrence of a series (RECURRENCE-ID, the occurrence's original start):
DECLINED cancels that occurrence (an EXDATE, through `booking.change_occurrence`, refused inside
the cancellation notice); ACCEPTED/TENTATIVE change nothing (PARTSTAT is kept per series).
"""

from __future__ import annotations

import email
import email.policy
import logging
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import getaddresses
from zoneinfo import ZoneInfo

import icalendar
from sqlalchemy import Connection, select

from bookdav.booking import appointments as booking
from bookdav.booking.availability import provider_and_service
from bookdav.booking.errors import BookdavError, Conflict, PolicyViolation
from bookdav.logs import log_event
from bookdav.notify import imip, plan
from bookdav.storage import appointments as appointment_store
from bookdav.storage.appointments import Appointment, appointment_from_row
from bookdav.storage.db import Database
from bookdav.storage.schema import appointments

log = logging.getLogger("bookdav.inbound")

ANSWERS = ("ACCEPTED", "TENTATIVE", "DECLINED")
MAX_MESSAGE_BYTES = 5 * 1024 * 1024


class Refused(Exception):
    """The message is not a reply bookdav may apply; the text says why in one line."""


@dataclass(frozen=True)
class Reply:
    sender: str
    uid: str
    attendee: str
    partstat: str
    sequence: int
    # RECURRENCE-ID: the original start of the one occurrence answered (None: the whole event).
    occurrence: datetime | None = None


@dataclass(frozen=True)
class Applied:
    appointment_id: str
    # "partstat", "cancelled", "declined-within-notice", "occurrence-cancelled", "unchanged"
    action: str
    partstat: str


def _calendar_parts(message: EmailMessage) -> list[str]:
    found = []
    for part in message.walk():
        if part.get_content_type() in ("text/calendar", "application/ics"):
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                found.append(payload.decode(part.get_content_charset() or "utf-8", "replace"))
    return found


def _recurrence_id(event: icalendar.cal.Component) -> datetime | None:
    if "recurrence-id" not in event:
        return None
    try:
        value = event.decoded("recurrence-id")
    except (ValueError, TypeError) as exc:
        raise Refused("the REPLY's RECURRENCE-ID cannot be read") from exc
    if not isinstance(value, datetime):
        raise Refused("a RECURRENCE-ID must be a date-time")
    return value


def _occurrence_utc(occurrence: datetime, zone: str) -> int:
    """A RECURRENCE-ID as UTC seconds; a floating one is in the appointment's zone."""
    if occurrence.tzinfo is None:
        occurrence = occurrence.replace(tzinfo=ZoneInfo(zone))
    return int(occurrence.timestamp())


def parse_reply(raw: bytes) -> Reply:
    """The REPLY a message carries; `Refused` if it carries none, or more than it should."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise Refused("message too large")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    try:
        senders = [addr for _, addr in getaddresses(message.get_all("From", [])) if addr]
    except (ValueError, IndexError) as exc:
        raise Refused("the From header cannot be read") from exc
    if len(senders) != 1:
        raise Refused("the message needs exactly one From address")
    for text in _calendar_parts(message):
        try:
            calendar = icalendar.Calendar.from_ical(text)
        except ValueError:
            continue
        if str(calendar.get("method", "")).upper() != "REPLY":
            continue
        events = list(calendar.walk("VEVENT"))
        if len(events) != 1:
            raise Refused("a REPLY must hold exactly one VEVENT")
        event = events[0]
        occurrence = _recurrence_id(event)
        attendees = event.get("attendee", [])
        attendees = attendees if isinstance(attendees, list) else [attendees]
        if len(attendees) != 1:
            raise Refused("a REPLY must name exactly one ATTENDEE")
        attendee = attendees[0]
        partstat = str(attendee.params.get("PARTSTAT", "")).upper()
        if partstat not in ANSWERS:
            raise Refused(f"PARTSTAT {partstat or '(none)'} is not an answer bookdav applies")
        address = str(attendee)
        if address.lower().startswith("mailto:"):
            address = address[7:]
        try:
            sequence = int(str(event.get("sequence", 0)))
        except ValueError as exc:
            raise Refused("the REPLY's SEQUENCE is not a number") from exc
        return Reply(
            sender=senders[0],
            uid=str(event.get("uid", "")),
            attendee=address.strip(),
            partstat=partstat,
            sequence=sequence,
            occurrence=occurrence,
        )
    raise Refused("no text/calendar part with METHOD:REPLY")


def find_appointment(conn: Connection, reply: Reply) -> Appointment:
    """The appointment the reply answers: its UID, and the attendee as its client (a group event
    has one UID and a client per appointment). `Refused` otherwise."""
    if not reply.uid:
        raise Refused("the REPLY has no UID")
    rows = conn.execute(
        select(appointments).where(appointments.c.event_uid == reply.uid).limit(1000)
    ).all()
    if not rows:
        raise Refused(f"no appointment has UID {reply.uid}")
    matching = [
        appointment_from_row(r)
        for r in rows
        if r.client_email.casefold() == reply.attendee.casefold()
    ]
    if not matching:
        raise Refused("the ATTENDEE of the REPLY is not the client of that appointment")
    if reply.sender.casefold() != reply.attendee.casefold():
        raise Refused("the sender is not the attendee who answers")
    return sorted(matching, key=lambda a: a.status != "confirmed")[0]


def apply_reply(conn: Connection, reply: Reply, manage_url_base: str) -> Applied:
    """Apply a checked reply in the caller's write transaction (holding the provider's lock)."""
    current = find_appointment(conn, reply)
    if current.status != "confirmed":
        if current.status == "cancelled" and reply.partstat == "DECLINED":
            return Applied(current.id, "unchanged", reply.partstat)  # the same answer twice
        raise Refused(f"the appointment is {current.status}")
    if reply.sequence < current.sequence:
        raise Refused(
            f"the REPLY answers SEQUENCE {reply.sequence}; the appointment is at {current.sequence}"
        )
    if reply.occurrence is not None:
        return _apply_to_occurrence(conn, current, reply, manage_url_base)
    if reply.partstat == "DECLINED":
        try:
            booking.cancel(
                conn,
                current.id,
                "declined by the client",
                by_client=True,
                manage_url_base=manage_url_base,
            )
        except PolicyViolation:
            _answer(conn, current, reply.partstat, manage_url_base)
            return Applied(current.id, "declined-within-notice", reply.partstat)
        appointment_store.update_appointment(conn, current.id, client_partstat="DECLINED")
        return Applied(current.id, "cancelled", reply.partstat)
    if current.client_partstat == reply.partstat:
        return Applied(current.id, "unchanged", reply.partstat)
    _answer(conn, current, reply.partstat, manage_url_base)
    return Applied(current.id, "partstat", reply.partstat)


def _apply_to_occurrence(
    conn: Connection, current: Appointment, reply: Reply, manage_url_base: str
) -> Applied:
    assert reply.occurrence is not None
    if not current.recurrence:
        raise Refused("RECURRENCE-ID names an occurrence, but the appointment does not repeat")
    if reply.partstat != "DECLINED":
        return Applied(current.id, "unchanged", reply.partstat)
    occurrence_utc = _occurrence_utc(reply.occurrence, current.timezone)
    try:
        booking.change_occurrence(conn, current.id, occurrence_utc, None, True, manage_url_base)
    except PolicyViolation as exc:
        raise Refused(f"not cancelled: {exc.detail}") from exc
    except Conflict:  # already cancelled: the same answer twice
        return Applied(current.id, "unchanged", reply.partstat)
    return Applied(current.id, "occurrence-cancelled", reply.partstat)


def _answer(conn: Connection, current: Appointment, partstat: str, manage_url_base: str) -> None:
    answered = booking.record_answer(conn, current.id, partstat, manage_url_base).appointment
    payload = {
        "event": "appointment.replied",
        "appointmentId": answered.id,
        "sequence": answered.sequence,
        "partstat": partstat,
    }
    appointment_store.enqueue(conn, answered.id, [(imip.PROVIDER_NOTICE, payload)])
    plan.enqueue_webhooks(conn, "appointment.replied", answered)


def _principals(conn: Connection, reply: Reply) -> list[str]:
    current = find_appointment(conn, reply)
    provider, service = provider_and_service(conn, current.provider_id, current.service_id)
    return booking.principals_for(service, provider)


async def ingest(database: Database, raw: bytes, manage_url_base: str) -> Applied:
    """Parse, check and apply one message; `Refused` (logged) when it may not be applied."""
    reply: Reply | None = None
    try:
        reply = parse_reply(raw)
        principals = await database.run_read(_principals, reply)
        applied = await database.run_write(
            apply_reply, reply, manage_url_base, principals=principals
        )
    except (Refused, BookdavError) as exc:
        log_event(
            log,
            "imip reply refused",
            logging.WARNING,
            reason=str(exc),
            sender=reply.sender if reply else None,
            uid=reply.uid if reply else None,
            partstat=reply.partstat if reply else None,
        )
        if isinstance(exc, Refused):
            raise
        raise Refused(str(exc)) from exc
    log_event(
        log,
        "imip reply applied",
        appointment_id=applied.appointment_id,
        action=applied.action,
        partstat=applied.partstat,
        sender=reply.sender,
        uid=reply.uid,
    )
    return applied
