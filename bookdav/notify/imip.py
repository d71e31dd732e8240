"""iMIP email (RFC 6047 over RFC 5546) for an appointment's outbox rows, built with stdlib `email`.

A client gets `multipart/mixed` holding a `multipart/alternative` (text, HTML and the
`text/calendar; method=...` part mail clients turn into Accept/Decline buttons) plus the same
calendar as `invite.ics`. The provider gets a short notice with the calendar as METHOD:PUBLISH.
The VEVENT is the one `bookdav.booking.ical` writes into CalDAV (same UID, SEQUENCE, ORGANIZER,
ATTENDEE with RSVP), with METHOD added. Every header made from a user's name, email or words
goes through `email.headerregistry` after control characters are removed, so no input can add a
header or a recipient.
"""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from zoneinfo import ZoneInfo

import icalendar

from bookdav.booking.ical import AppointmentEvent, Person, appointment_event
from bookdav.notify import templates
from bookdav.notify.errors import Undeliverable
from bookdav.storage.appointments import Appointment
from bookdav.storage.users import User

CLIENT_IMIP = "client.imip"
PROVIDER_NOTICE = "provider.notice"
CLIENT_REMINDER = "client.reminder"

# What each outbox event means to the client's calendar (RFC 5546 3.2): an update is a REQUEST
# with a higher SEQUENCE; a cancellation is CANCEL with STATUS:CANCELLED.
METHODS = {
    "appointment.created": "REQUEST",
    "appointment.rescheduled": "REQUEST",
    "appointment.cancelled": "CANCEL",
}


@dataclass(frozen=True)
class Outgoing:
    """One message ready for a transport: envelope and content."""

    message: EmailMessage
    sender: str
    recipients: tuple[str, ...]
    message_id: str


@dataclass(frozen=True)
class Context:
    """What an outbox row refers to, read from the database when it is delivered."""

    appointment: Appointment
    provider: User
    service_name: str
    cancellation_notice_minutes: int = 0
    service_templates: dict[str, str] = dataclasses.field(default_factory=dict)
    templates_dir: str = ""


def header_text(value: str) -> str:
    """`value` on one line: CR, LF and every other control character become spaces, runs of
    whitespace one space. A name can then never end a header and start another."""
    cleaned = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in value)
    return " ".join(cleaned.split())


def mailbox(name: str, email: str) -> Address:
    """A single address for a header; `Undeliverable` unless `email` is exactly one addr-spec
    (so "a@b, evil@x" cannot smuggle in a second recipient)."""
    if any(unicodedata.category(ch).startswith("C") or ch.isspace() for ch in email):
        raise Undeliverable(f"{email!r} is not an email address")
    try:
        address = Address(display_name=header_text(name), addr_spec=email)
    except (ValueError, IndexError, HeaderParseError) as exc:
        raise Undeliverable(f"{email!r} is not an email address") from exc
    if not address.username or not address.domain:
        raise Undeliverable(f"{email!r} is not an email address")
    return address


def message_id(outbox_id: int, sequence: int, from_address: str) -> str:
    """Stable per outbox row, so a retried delivery is recognisably the same message."""
    _, addr = parseaddr(from_address)
    domain = addr.rpartition("@")[2] or "bookdav.invalid"
    return f"<outbox-{outbox_id}.{sequence}@{header_text(domain).replace(' ', '')}>"


def event_for(context: Context, *, manage_url: str) -> AppointmentEvent:
    """The appointment as the client's calendar should hold it: the stored event's UID and
    SEQUENCE, ORGANIZER the provider, this client as the one ATTENDEE (a group's other members
    are none of this client's business)."""
    appointment, provider = context.appointment, context.provider
    exceptions = json.loads(appointment.exceptions or "{}")
    lines = [appointment.notes] if appointment.notes else []
    if manage_url:
        lines.append(f"Manage or cancel: {manage_url}")
    return AppointmentEvent(
        uid=appointment.event_uid,
        appointment_id=appointment.id,
        summary=header_text(f"{context.service_name} with {provider.name or provider.username}"),
        start_utc=appointment.start_utc,
        end_utc=appointment.end_utc,
        timezone=appointment.timezone,
        # Names go into CN parameters, where a line break would break the iCalendar text.
        organizer=Person(header_text(provider.name), provider.email),
        attendees=(Person(header_text(appointment.client_name), appointment.client_email),),
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


def calendar_with_method(event: AppointmentEvent, method: str) -> str:
    """`ical.appointment_event`'s VCALENDAR with METHOD (an iMIP object must carry one)."""
    calendar = icalendar.Calendar.from_ical(appointment_event(event))
    calendar.add("method", method)
    if method == "CANCEL":
        for vevent in calendar.walk("VEVENT"):
            vevent["status"] = icalendar.vText("CANCELLED")
    return str(calendar.to_ical().decode())


def when_text(appointment: Appointment, zone: str) -> str:
    """The appointment in `zone`: Mon 7 Jun 2027, 04:00-04:30 EDT (America/New_York)."""
    start = datetime.fromtimestamp(appointment.start_utc, ZoneInfo(zone))
    end = datetime.fromtimestamp(appointment.end_utc, ZoneInfo(zone))
    return f"{start:%a} {start.day} {start:%b %Y}, {start:%H:%M}-{end:%H:%M %Z} ({zone})"


def _event_name(payload: dict[str, object]) -> str:
    event = str(payload.get("event", ""))
    if event not in METHODS:
        raise Undeliverable(f"unknown outbox event {event!r}")
    return event


def _text_part(body: str, subtype: str, **params: str) -> EmailMessage:
    part = EmailMessage()
    # 7bit keeps short ASCII readable on the wire; anything else quoted-printable, so no
    # relay ever sees 8-bit data or an over-long line.
    plain = body.isascii() and all(len(line) <= 76 for line in body.splitlines())
    part.set_content(body, subtype=subtype, cte="7bit" if plain else "quoted-printable")
    for name, value in params.items():
        part.set_param(name, value)
    return part


def _headers(
    message: EmailMessage,
    *,
    sender: Address,
    to: Address,
    reply_to: Address | None,
    subject: str,
    msg_id: str,
) -> None:
    message["From"] = sender
    message["To"] = to
    if reply_to is not None:
        message["Reply-To"] = reply_to
    message["Subject"] = header_text(subject)
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = msg_id
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to us
    if "MIME-Version" not in message:  # a multipart built by hand does not get one by itself
        message["MIME-Version"] = "1.0"


def _sender(from_address: str, on_behalf_of: str) -> Address:
    name, addr = parseaddr(from_address)
    return mailbox(on_behalf_of or name or "bookdav", addr or from_address)


def policy_text(context: Context) -> str:
    """The service's cancellation policy in one sentence, for every client message."""
    notice = context.cancellation_notice_minutes
    provider_name = context.provider.name or context.provider.username
    if notice <= 0:
        return "Cancellation policy: you can cancel or move this appointment until it starts."
    amount = f"{notice // 60} hours" if notice % 60 == 0 and notice >= 120 else f"{notice} minutes"
    return (
        f"Cancellation policy: cancel or move at least {amount} ahead; "
        f"after that, please contact {provider_name}."
    )


def _client_values(context: Context, manage_url: str) -> dict[str, object]:
    appointment, provider = context.appointment, context.provider
    return {
        "service": context.service_name,
        "provider_name": provider.name or provider.username,
        "client_name": appointment.client_name,
        "when_client": when_text(appointment, appointment.client_timezone),
        "when_provider": when_text(appointment, appointment.timezone),
        "repeats": " (first of a series)" if appointment.recurrence else "",
        "confirmation_code": appointment.confirmation_code,
        "notes": appointment.notes,
        "manage_url": manage_url,
        "policy": policy_text(context),
        "cancelled": appointment.status == "cancelled",
    }


def _render(context: Context, name: str, values: dict[str, object]) -> str:
    return templates.render(
        name, values, folder=context.templates_dir, overrides=context.service_templates
    )


def _alternative_with_calendar(
    plain: str, body_html: str, calendar: str, method: str
) -> EmailMessage:
    alternative = EmailMessage()
    alternative.make_alternative()
    alternative.attach(_text_part(plain, "plain"))
    alternative.attach(_text_part(body_html, "html"))
    alternative.attach(_text_part(calendar, "calendar", method=method))
    message = EmailMessage()
    message.make_mixed()
    message.attach(alternative)
    message.add_attachment(
        calendar.encode(), maintype="application", subtype="ics", filename="invite.ics"
    )
    return message


def client_message(
    context: Context,
    payload: dict[str, object],
    *,
    outbox_id: int,
    from_address: str,
    manage_url: str,
) -> Outgoing:
    """The client's iMIP message for one outbox row (REQUEST for created/rescheduled, CANCEL)."""
    appointment, provider = context.appointment, context.provider
    event_name = _event_name(payload)
    method = METHODS[event_name]
    calendar = calendar_with_method(event_for(context, manage_url=manage_url), method)
    provider_name = provider.name or provider.username
    headline = {
        "appointment.created": "Your appointment is booked",
        "appointment.rescheduled": "Your appointment has moved",
        "appointment.cancelled": "Your appointment is cancelled",
    }[event_name]
    subject_prefix = {
        "appointment.created": "Invitation",
        "appointment.rescheduled": "Updated invitation",
        "appointment.cancelled": "Cancelled",
    }[event_name]
    values = _client_values(context, manage_url)
    values.update(headline=headline, event=event_name, cancelled=method == "CANCEL")
    message = _alternative_with_calendar(
        _render(context, "client.txt", values),
        _render(context, "client.html", values),
        calendar,
        method,
    )
    msg_id = message_id(outbox_id, appointment.sequence, from_address)
    _headers(
        message,
        sender=_sender(from_address, provider_name),
        to=mailbox(appointment.client_name, appointment.client_email),
        reply_to=mailbox(provider_name, provider.email),
        subject=f"{subject_prefix}: {context.service_name} with {provider_name}, "
        f"{values['when_client']}",
        msg_id=msg_id,
    )
    return Outgoing(message, _sender_addr(from_address), (appointment.client_email,), msg_id)


def _in_words(minutes: int) -> str:
    if minutes % 1440 == 0:
        days = minutes // 1440
        return "tomorrow" if days == 1 else f"in {days} days"
    if minutes % 60 == 0:
        hours = minutes // 60
        return "in 1 hour" if hours == 1 else f"in {hours} hours"
    return f"in {minutes} minutes"


def reminder_message(
    context: Context,
    payload: dict[str, object],
    *,
    outbox_id: int,
    from_address: str,
    manage_url: str,
) -> Outgoing:
    """A reminder of one occurrence: text and HTML only (the calendar already holds the event;
    a REQUEST here would look like a change)."""
    appointment, provider = context.appointment, context.provider
    provider_name = provider.name or provider.username
    occurrence_utc = int(str(payload["occurrenceStartUtc"]))
    offset = int(str(payload["offsetMinutes"]))
    length = appointment.end_utc - appointment.start_utc
    at_occurrence = dataclasses.replace(
        appointment, start_utc=occurrence_utc, end_utc=occurrence_utc + length
    )
    values = _client_values(dataclasses.replace(context, appointment=at_occurrence), manage_url)
    values["in_words"] = _in_words(offset)
    message = EmailMessage()
    message.make_alternative()
    message.attach(_text_part(_render(context, "reminder.txt", values), "plain"))
    message.attach(_text_part(_render(context, "reminder.html", values), "html"))
    # Stable per reminder (its row), whatever the appointment's later sequence.
    msg_id = message_id(outbox_id, 0, from_address)
    _headers(
        message,
        sender=_sender(from_address, provider_name),
        to=mailbox(appointment.client_name, appointment.client_email),
        reply_to=mailbox(provider_name, provider.email),
        subject=f"Reminder: {context.service_name} with {provider_name}, {values['when_client']}",
        msg_id=msg_id,
    )
    return Outgoing(message, _sender_addr(from_address), (appointment.client_email,), msg_id)


PROVIDER_VERBS = {
    "appointment.created": "New booking",
    "appointment.rescheduled": "Moved",
    "appointment.cancelled": "Cancelled",
    "appointment.replied": "Answered",
}


def provider_message(
    context: Context, payload: dict[str, object], *, outbox_id: int, from_address: str
) -> Outgoing:
    """The provider's notice: what changed, in the provider's zone, the calendar as PUBLISH (their
    own calendar already holds the event; this is for reading, not for answering)."""
    appointment, provider = context.appointment, context.provider
    event_name = str(payload.get("event", ""))
    if event_name not in PROVIDER_VERBS:
        raise Undeliverable(f"unknown outbox event {event_name!r}")
    verb = PROVIDER_VERBS[event_name]
    when = when_text(appointment, appointment.timezone)
    values: dict[str, object] = {
        "verb": verb,
        "service": context.service_name,
        "client": f"{header_text(appointment.client_name)} <{appointment.client_email}>",
        "when_provider": when,
        "when_client": when_text(appointment, appointment.client_timezone),
        "confirmation_code": appointment.confirmation_code,
        "reason": appointment.cancellation_reason if event_name == "appointment.cancelled" else "",
        "partstat": str(payload.get("partstat", "")) if event_name == "appointment.replied" else "",
        "notes": appointment.notes,
        "event": event_name,
    }
    message = EmailMessage()
    message.make_mixed()
    message.attach(_text_part(_render(context, "provider.txt", values), "plain"))
    calendar = calendar_with_method(event_for(context, manage_url=""), "PUBLISH")
    message.attach(_text_part(calendar, "calendar", method="PUBLISH"))
    # A reply does not change the sequence: its row id keeps the Message-ID apart.
    msg_id = message_id(outbox_id, appointment.sequence, from_address)
    _headers(
        message,
        sender=_sender(from_address, "bookdav"),
        to=mailbox(provider.name, provider.email),
        reply_to=mailbox(appointment.client_name, appointment.client_email),
        subject=f"{verb}: {context.service_name}, {appointment.client_name}, {when}",
        msg_id=msg_id,
    )
    return Outgoing(message, _sender_addr(from_address), (provider.email,), msg_id)


def _sender_addr(from_address: str) -> str:
    return parseaddr(from_address)[1] or from_address


def build(
    kind: str,
    context: Context,
    payload: dict[str, object],
    *,
    outbox_id: int,
    from_address: str,
    base_url: str,
) -> Outgoing:
    """The message for an outbox row of `kind`; `Undeliverable` for kinds this module lacks."""
    if kind == CLIENT_IMIP:
        manage_url = f"{base_url}/manage/{context.appointment.manage_token}" if base_url else ""
        return client_message(
            context, payload, outbox_id=outbox_id, from_address=from_address, manage_url=manage_url
        )
    if kind == PROVIDER_NOTICE:
        return provider_message(context, payload, outbox_id=outbox_id, from_address=from_address)
    if kind == CLIENT_REMINDER:
        manage_url = f"{base_url}/manage/{context.appointment.manage_token}" if base_url else ""
        return reminder_message(
            context, payload, outbox_id=outbox_id, from_address=from_address, manage_url=manage_url
        )
    raise Undeliverable(f"no message for outbox kind {kind!r}")
