"""`/api/v1/appointments`: book, read, list, reschedule, cancel; Idempotency-Key on POST."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from bookdav.booking import appointments as booking
from bookdav.booking.availability import provider_and_service
from bookdav.booking.errors import Conflict, Forbidden, InvalidInput, PolicyViolation
from bookdav.booking.times import InstantFormatter
from bookdav.server.api import validation as v
from bookdav.server.auth import current_user, require_user
from bookdav.server.bookings import write_booking
from bookdav.server.keys import DATABASE, SETTINGS
from bookdav.server.ratelimit import RateLimiter
from bookdav.storage import appointments as store
from bookdav.storage import sql
from bookdav.storage.appointments import Appointment
from bookdav.storage.users import User, user_by_id

routes = web.RouteTableDef()

GUEST_LIMITER = web.AppKey("guest_booking_limiter", RateLimiter)
FREQUENCIES = ("DAILY", "WEEKLY", "MONTHLY")
MAX_COUNT = booking.MAX_OCCURRENCES
STATUSES = ("confirmed", "cancelled", "completed", "no_show")


def appointment_json(appointment: Appointment, base_url: str) -> dict[str, Any]:
    """An appointment as the API shows it, times in the client's zone."""
    local = InstantFormatter(appointment.client_timezone)
    exceptions = json.loads(appointment.exceptions)
    return {
        "appointmentId": appointment.id,
        "confirmationCode": appointment.confirmation_code,
        "status": appointment.status,
        "startTime": local.format(appointment.start_utc),
        "endTime": local.format(appointment.end_utc),
        "serviceId": appointment.service_id,
        "providerId": appointment.provider_id,
        "client": {
            "clientId": appointment.client_id,
            "name": appointment.client_name,
            "email": appointment.client_email,
            "timezone": appointment.client_timezone,
        },
        "notes": appointment.notes,
        "recurrence": appointment.recurrence,
        "cancelledOccurrences": [local.format(t) for t in exceptions.get("exdates", [])],
        "movedOccurrences": [
            {
                "occurrence": local.format(int(original)),
                "startTime": local.format(start),
                "endTime": local.format(end),
            }
            for original, (start, end) in sorted(exceptions.get("moved", {}).items())
        ],
        "sequence": appointment.sequence,
        "cancellationReason": appointment.cancellation_reason,
        # The client's iMIP answer (RFC 5545 PARTSTAT), set by inbound replies.
        "clientResponse": appointment.client_partstat,
        "manageUrl": f"{base_url}/manage/{appointment.manage_token}",
    }


def _start(body: dict[str, Any], name: str = "startTime") -> int:
    instant = v.iso_instant(body.get(name), name)
    if instant.second or instant.microsecond:
        raise InvalidInput(name, "must be on a whole minute")
    return int(instant.timestamp())


async def _client(request: web.Request, actor: User | None, body: dict[str, Any]) -> booking.Client:
    """Who the appointment is for: a signed-in client books for itself; staff name a clientId;
    a guest gives {name, email, timezone}."""
    if "clientId" in body:
        client_id = v.text(body, "clientId", max_length=64)
        if actor is None:
            raise InvalidInput("clientId", "sign in to book for an account, or give client")
        if actor.role == "client" and client_id != actor.id:
            raise Forbidden("a client books only for themselves")
        client = await request.app[DATABASE].run_read(user_by_id, client_id)
        if client is None:
            raise InvalidInput("clientId", f"no user {client_id}")
        return booking.Client(client.name, client.email, client.timezone, client.id)
    if actor is not None and actor.role == "client":
        return booking.Client(actor.name, actor.email, actor.timezone, actor.id)
    details = v.object_field(body, "client")
    name = v.text(details, "name", min_length=1)
    email = v.text(details, "email", max_length=320)
    if "@" not in email or any(c.isspace() for c in email):
        raise InvalidInput("client.email", f"{email!r} is not an email address")
    timezone = v.time_zone(details.get("timezone", "UTC"), "client.timezone")
    return booking.Client(name, email, timezone)


def _recurrence(body: dict[str, Any]) -> booking.Recurrence | None:
    if body.get("recurrence") is None:
        return None
    raw = v.object_field(body, "recurrence")
    frequency = raw.get("frequency")
    if frequency not in FREQUENCIES:
        raise InvalidInput("recurrence.frequency", "must be one of " + ", ".join(FREQUENCIES))
    if ("count" in raw) == ("until" in raw):
        raise InvalidInput("recurrence", "give exactly one of count and until")
    if "count" in raw:
        count = v.integer(raw["count"], "recurrence.count", minimum=1, maximum=MAX_COUNT)
        return booking.Recurrence(frequency, count=count)
    return booking.Recurrence(frequency, until=v.iso_date(raw["until"], "recurrence.until"))


class PrincipalCache:
    """Which locks a booking takes, remembered per (provider, service): a provider's username
    never changes, and if a service gains a resource the booking says so (`LocksMissing`) and is
    run again holding it. Saves a read transaction per booking."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], list[str]] = {}

    async def principals(
        self, request: web.Request, provider_id: str, service_id: str
    ) -> list[str]:
        key = (provider_id, service_id)
        if key not in self._known:
            provider, service = await request.app[DATABASE].run_read(
                provider_and_service, provider_id, service_id
            )
            self.learn(key, booking.principals_for(service, provider))
        return self._known[key]

    def learn(self, key: tuple[str, str], principals: list[str]) -> None:
        if len(self._known) > 100_000:
            self._known.clear()
        self._known[key] = principals


PRINCIPALS = web.AppKey("booking_principals", PrincipalCache)


def _manage_base(request: web.Request) -> str:
    return request.app[SETTINGS].public_base_url


@routes.post("/api/v1/appointments")
async def create_appointment(request: web.Request) -> web.Response:
    actor = await current_user(request)
    if actor is None:
        request.app[GUEST_LIMITER].check(request.remote or "unknown")
    body = await v.json_object(request)
    service_id = v.text(body, "serviceId", max_length=64)
    provider_id = v.text(body, "providerId", max_length=64)
    start_utc = _start(body)
    notes = v.text(body, "notes", required=False, max_length=2000)
    client = await _client(request, actor, body)
    booking_request = booking.BookingRequest(
        service_id, provider_id, start_utc, client, notes, _recurrence(body)
    )
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 200:
        raise InvalidInput("Idempotency-Key", "must be 1 to 200 characters")
    scope = f"{actor.id if actor else 'guest:' + client.email}:{key}"
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    base_url = _manage_base(request)
    cache = request.app[PRINCIPALS]
    principals = await cache.principals(request, provider_id, service_id)

    def unit_of_work(
        conn: Connection, principals: Sequence[str], prepared: booking.Prepared | None
    ) -> tuple[int, str | Appointment]:
        """The answer's JSON, or (without a key, nothing to store) the appointment to build it
        from once the write lock is given back."""
        if key is not None:
            stored = store.stored_response(conn, scope)
            if stored is not None:
                if stored[0] != fingerprint:
                    raise PolicyViolation("this Idempotency-Key was used for another request")
                return stored[1], stored[2]
        booked = booking.book(conn, booking_request, base_url, principals, prepared=prepared)
        if key is None:
            return 201, booked.appointment
        answer = json.dumps(appointment_json(booked.appointment, base_url))
        sql.sync(conn)  # the booking's own errors first: a clash below is the key's
        try:
            store.store_response(conn, scope, fingerprint, 201, answer)
        except IntegrityError as exc:
            # The same key, at the same moment, for another provider: only one may win.
            raise Conflict("this Idempotency-Key is being used by another request") from exc
        return 201, answer

    status, outcome = await write_booking(
        request,
        booking_request,
        unit_of_work,
        principals,
        shortcut=key is None,  # a keyed retry may be owed its stored 201: no shortcut
        learned=lambda needed: cache.learn((provider_id, service_id), needed),
    )
    if isinstance(outcome, Appointment):
        answer, appointment_id = json.dumps(appointment_json(outcome, base_url)), outcome.id
    else:  # the JSON stored with the key (a replay) or just stored
        answer, appointment_id = outcome, json.loads(outcome)["appointmentId"]
    return web.Response(
        status=status,
        text=answer,
        content_type="application/json",
        headers={"Location": f"/api/v1/appointments/{appointment_id}"},
    )


async def _visible_appointment(request: web.Request) -> tuple[User | None, Appointment]:
    actor = await current_user(request)
    appointment = await request.app[DATABASE].run_read(
        booking.get_appointment_or_404, request.match_info["appointmentId"]
    )
    booking.require_access(actor, appointment, request.query.get("code"))
    return actor, appointment


@routes.get("/api/v1/appointments/{appointmentId}")
async def get_appointment(request: web.Request) -> web.Response:
    _, appointment = await _visible_appointment(request)
    return web.json_response(appointment_json(appointment, _manage_base(request)))


@routes.get("/api/v1/appointments")
async def list_appointments(request: web.Request) -> web.Response:
    actor = await require_user(request)
    provider_id = request.query.get("providerId")
    client_id = None
    if actor.role == "provider":
        if provider_id not in (None, actor.id):
            raise Forbidden("providers list their own appointments")
        provider_id = actor.id
    elif actor.role == "client":
        client_id = actor.id
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidInput("status", "must be one of " + ", ".join(STATUSES))
    start_from = _query_instant(request, "from")
    start_before = _query_instant(request, "to")
    limit = v.query_int(request, "limit", default=50, minimum=1, maximum=200)
    after = _cursor(request.query.get("cursor"))
    found = await request.app[DATABASE].run_read(
        lambda conn: store.list_appointments(
            conn,
            provider_id=provider_id,
            client_id=client_id,
            start_from=start_from,
            start_before=start_before,
            statuses=[status] if status else None,
            after=after,
            limit=limit + 1,
        )
    )
    page = found[:limit]
    next_cursor = f"{page[-1].start_utc}.{page[-1].id}" if len(found) > limit else None
    base_url = _manage_base(request)
    answer: dict[str, Any] = {
        "items": [appointment_json(a, base_url) for a in page],
        "nextCursor": next_cursor,
    }
    if provider_id is not None and start_from is not None and start_before is not None:
        answer["calendarEvents"] = await _calendar_events(
            request, provider_id, start_from, start_before
        )
    return web.json_response(answer)


async def _calendar_events(
    request: web.Request, provider_id: str, start_from: int, start_before: int
) -> list[dict[str, Any]]:
    """Appointments the provider typed into their calendar app (events with an ATTENDEE)."""

    def read(conn: Connection) -> tuple[User | None, list[dict[str, Any]]]:
        provider = user_by_id(conn, provider_id)
        if provider is None or provider.role != "provider":
            return provider, []
        return provider, booking.calendar_made_appointments(
            conn, provider, start_from, start_before
        )

    provider, events = await request.app[DATABASE].run_read(read)
    local = InstantFormatter(provider.timezone if provider else "UTC")
    for event in events:
        event["startTime"] = local.format(event.pop("startUtc"))
        event["endTime"] = local.format(event.pop("endUtc"))
    return events


def _query_instant(request: web.Request, name: str) -> int | None:
    if name not in request.query:
        return None
    return int(v.iso_instant(request.query[name], name).timestamp())


def _cursor(raw: str | None) -> tuple[int, str] | None:
    if not raw:
        return None
    start, _, appointment_id = raw.partition(".")
    if not start.isdigit() or not appointment_id:
        raise InvalidInput("cursor", "is not a cursor this server gave")
    return int(start), appointment_id


def _occurrence(request: web.Request) -> int | None:
    """`?occurrence=<startTime>`: one occurrence of a series, by its original start."""
    if "occurrence" not in request.query:
        return None
    return int(v.iso_instant(request.query["occurrence"], "occurrence").timestamp())


def _is_staff_of(actor: User | None, appointment: Appointment) -> bool:
    return actor is not None and (actor.role == "admin" or actor.id == appointment.provider_id)


@routes.put("/api/v1/appointments/{appointmentId}")
async def put_appointment(request: web.Request) -> web.Response:
    actor, appointment = await _visible_appointment(request)
    body = await v.json_object(request)
    known = {"startTime", "notes", "status"}
    if not known & set(body):
        raise InvalidInput("body", "change startTime, notes or status")
    if "status" in body:
        if not _is_staff_of(actor, appointment):
            raise Forbidden("only the provider or an admin records an outcome")
        if body["status"] not in ("completed", "no_show"):
            raise InvalidInput("status", "must be completed or no_show")
    start_utc = _start(body) if "startTime" in body else None
    notes = v.text(body, "notes", max_length=2000) if "notes" in body else None
    occurrence = _occurrence(request)
    if occurrence is not None and start_utc is None:
        raise InvalidInput("startTime", "is required to move an occurrence")
    database = request.app[DATABASE]
    provider, service = await database.run_read(
        provider_and_service, appointment.provider_id, appointment.service_id
    )
    base_url = _manage_base(request)

    def unit_of_work(conn: Connection) -> Appointment:
        current = appointment
        if notes is not None:
            current = booking.change_notes(conn, current.id, notes)
        if occurrence is not None and start_utc is not None:
            current = booking.change_occurrence(
                conn, current.id, occurrence, start_utc, False, base_url
            ).appointment
        elif start_utc is not None:
            current = booking.reschedule(conn, current.id, start_utc, base_url).appointment
        if "status" in body:
            current = booking.set_outcome(conn, current.id, body["status"])
        return current

    updated = await database.run_write(
        unit_of_work, principals=booking.principals_for(service, provider)
    )
    return web.json_response(appointment_json(updated, base_url))


@routes.delete("/api/v1/appointments/{appointmentId}")
async def delete_appointment(request: web.Request) -> web.Response:
    actor, appointment = await _visible_appointment(request)
    body = await v.json_object(request) if request.can_read_body else {}
    reason = v.text(body, "cancellationReason", required=False, max_length=2000)
    database = request.app[DATABASE]
    provider, service = await database.run_read(
        provider_and_service, appointment.provider_id, appointment.service_id
    )
    occurrence = _occurrence(request)
    by_client = not _is_staff_of(actor, appointment)
    if occurrence is None:
        cancelled = await database.run_write(
            booking.cancel,
            appointment.id,
            reason,
            by_client,
            _manage_base(request),
            principals=booking.principals_for(service, provider),
        )
    else:
        cancelled = await database.run_write(
            booking.change_occurrence,
            appointment.id,
            occurrence,
            None,
            by_client,
            _manage_base(request),
            principals=booking.principals_for(service, provider),
        )
    return web.json_response(appointment_json(cancelled.appointment, _manage_base(request)))
