"""The pages clients see: `/book/{username}` (services), `/book/{username}/{slug}` (date picker
and slots), the booking form, and `/manage/{token}` (confirmation, .ics, reschedule, cancel).

Everything works with plain links and forms; the script only detects the visitor's zone.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import Connection

from bookdav.booking import appointments as booking
from bookdav.booking.errors import NotFound, PolicyViolation
from bookdav.booking.services import rules_from_json
from bookdav.logs import log_event
from bookdav.server.bookings import write_booking
from bookdav.server.keys import DATABASE, SETTINGS
from bookdav.storage import calendars
from bookdav.storage.appointments import Appointment, appointment_by_token
from bookdav.storage.services import ServiceRecord, get_service, list_services
from bookdav.storage.users import User, user_by_id, user_by_username
from bookdav.web import csrf, picker
from bookdav.web.render import WEB, form_data, html_errors, render, set_cookie

routes = web.RouteTableDef()
log = logging.getLogger("bookdav.web")

ZONE_COOKIE = "bookdav_tz"
TAKEN_NOTICE = "Sorry, that time was just taken. Please choose another one."
NOT_BOOKABLE_NOTICE = "That time cannot be booked. Please choose one of the free times."
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_NAME = 200
MAX_EMAIL = 320
MAX_NOTES = 2000


# --- lookups -------------------------------------------------------------------------------


def _provider(conn: Connection, username: str) -> User:
    provider = user_by_username(conn, username)
    if provider is None or provider.role != "provider" or provider.status != "active":
        raise NotFound(f"There is no booking page called “{username}”.")
    return provider


def _offered(conn: Connection, provider: User) -> list[ServiceRecord]:
    services = list_services(conn, provider_id=provider.id, after_id=None, limit=500)
    return sorted(services, key=lambda s: (s.duration_minutes, s.name))


def _provider_and_service(conn: Connection, username: str, slug: str) -> tuple[User, ServiceRecord]:
    provider = _provider(conn, username)
    for service in _offered(conn, provider):
        if service.slug == slug:
            return provider, service
    raise NotFound(f"{provider.name or provider.username} offers no service “{slug}”.")


@dataclass(frozen=True)
class Managed:
    appointment: Appointment
    provider: User
    service: ServiceRecord | None


def _managed(conn: Connection, token: str) -> Managed:
    appointment = appointment_by_token(conn, token) if 8 <= len(token) <= 100 else None
    if appointment is None:
        raise NotFound("This manage link is not known. Check the link in your confirmation email.")
    provider = user_by_id(conn, appointment.provider_id)
    if provider is None:
        raise NotFound("The provider of this appointment no longer exists.")
    return Managed(appointment, provider, get_service(conn, appointment.service_id))


# --- helpers -------------------------------------------------------------------------------


def visitor_zone(request: web.Request, fallback: str) -> tuple[str, bool]:
    """(zone, chosen): `?tz=`, else the remembered cookie, else `fallback` (not chosen, so the
    script may detect the browser's zone)."""
    asked = picker.valid_zone(request.query.get("tz"))
    if asked:
        return asked, True
    remembered = picker.valid_zone(request.cookies.get(ZONE_COOKIE))
    if remembered:
        return remembered, True
    return fallback, False


def remember_zone(request: web.Request, response: web.Response, zone: str) -> web.Response:
    if request.cookies.get(ZONE_COOKIE) != zone:
        set_cookie(request, response, ZONE_COOKIE, zone, 365 * 24 * 3600)
    return response


def minutes_text(minutes: int) -> str:
    if minutes and minutes % 1440 == 0:
        days = minutes // 1440
        return f"{days} day{'s' if days > 1 else ''}"
    if minutes and minutes % 60 == 0:
        hours = minutes // 60
        return f"{hours} hour{'s' if hours > 1 else ''}"
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def policy_text(service: ServiceRecord | None) -> str:
    notice = rules_from_json(service.rules if service else {}).cancellation_notice_minutes
    if notice == 0:
        return "You can reschedule or cancel online until the appointment starts."
    return (
        f"You can reschedule or cancel online up to {minutes_text(notice)} before the start; "
        "after that, please contact the provider."
    )


def _base_url(request: web.Request) -> str:
    return request.app[SETTINGS].public_base_url


def _limit(request: web.Request) -> None:
    request.app[WEB].limiter.check(request.remote or "unknown")


def _check_csrf(request: web.Request, form: dict[str, str]) -> None:
    csrf.check_public(request, request.app[WEB].secret, form.get(csrf.FIELD, ""))


def _start_param(raw: str | None) -> int | None:
    if raw is None or not raw.isdigit() or len(raw) > 12:
        return None
    return int(raw)


async def _picker_page(
    request: web.Request,
    provider_id: str,
    service_id: str,
    zone: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    notice: str = "",
    after: int | None = None,
) -> web.Response:
    """The month, the chosen day's slots, and (after a lost race) the next free slots."""
    month = picker.parse_month(request.query.get("month"))
    day = picker.parse_day(request.query.get("day"))
    if after is not None:
        day = picker.local_date(after, zone)
        month = None

    def read(conn: Connection) -> tuple[picker.Picker, list[tuple[int, int]]]:
        shown = picker.build_picker(conn, provider_id, service_id, zone, month, day)
        following = (
            picker.next_free_slots(conn, provider_id, service_id, zone, after)
            if after is not None
            else []
        )
        return shown, following

    shown, following = await request.app[DATABASE].run_read(read)
    context = {
        **context,
        "picker": shown,
        "zone": zone,
        "zones": picker.zone_names(),
        "weekday_names": picker.WEEKDAY_NAMES,
        "notice": notice,
        "next_slots": following,
    }
    return render(request, "picker.html", context, status=status)


# --- booking -------------------------------------------------------------------------------


@routes.get("/book/{username}")
@html_errors
async def services_page(request: web.Request) -> web.StreamResponse:
    username = request.match_info["username"]

    def read(conn: Connection) -> tuple[User, list[ServiceRecord]]:
        provider = _provider(conn, username)
        return provider, _offered(conn, provider)

    provider, services = await request.app[DATABASE].run_read(read)
    return render(request, "services.html", {"provider": provider, "services": services})


@routes.get("/book/{username}/{slug}")
@html_errors
async def slots_page(request: web.Request) -> web.StreamResponse:
    provider, service = await request.app[DATABASE].run_read(
        _provider_and_service, request.match_info["username"], request.match_info["slug"]
    )
    zone, chosen = visitor_zone(request, provider.timezone)
    context = {
        "provider": provider,
        "service": service,
        "mode": "book",
        "page_path": request.path,
        "zone_chosen": chosen,
        "title": f"Book {service.name}",
    }
    response = await _picker_page(request, provider.id, service.id, zone, context)
    return remember_zone(request, response, zone) if chosen else response


def _details_context(
    provider: User, service: ServiceRecord, start: int, zone: str, values: dict[str, str]
) -> dict[str, Any]:
    return {
        "provider": provider,
        "service": service,
        "start": start,
        "end": start + service.duration_minutes * 60,
        "zone": zone,
        "values": values,
        "errors": {},
        "back": f"/book/{provider.username}/{service.slug}",
    }


@routes.get("/book/{username}/{slug}/details")
@html_errors
async def details_page(request: web.Request) -> web.StreamResponse:
    provider, service = await request.app[DATABASE].run_read(
        _provider_and_service, request.match_info["username"], request.match_info["slug"]
    )
    zone, _ = visitor_zone(request, provider.timezone)
    start = _start_param(request.query.get("start"))
    if start is None:
        raise web.HTTPSeeOther(f"/book/{provider.username}/{service.slug}")
    context = _details_context(provider, service, start, zone, {})
    return render(request, "details.html", context)


def _validate_details(form: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    values = {
        "name": form.get("name", "").strip(),
        "email": form.get("email", "").strip(),
        "notes": form.get("notes", "").strip(),
    }
    errors: dict[str, str] = {}
    if not values["name"]:
        errors["name"] = "Enter your name."
    elif len(values["name"]) > MAX_NAME:
        errors["name"] = f"Use at most {MAX_NAME} characters."
    if not values["email"]:
        errors["email"] = "Enter your email address, so we can send the confirmation."
    elif len(values["email"]) > MAX_EMAIL or not EMAIL_PATTERN.match(values["email"]):
        errors["email"] = "Enter an email address like name@example.com."
    if len(values["notes"]) > MAX_NOTES:
        errors["notes"] = f"Use at most {MAX_NOTES} characters (now {len(values['notes'])})."
    return values, errors


@routes.post("/book/{username}/{slug}/details")
@html_errors
async def book(request: web.Request) -> web.StreamResponse:
    _limit(request)
    form = await form_data(request)
    _check_csrf(request, form)
    database = request.app[DATABASE]
    provider, service = await database.run_read(
        _provider_and_service, request.match_info["username"], request.match_info["slug"]
    )
    zone = picker.valid_zone(form.get("tz")) or provider.timezone
    start = _start_param(form.get("start"))
    if start is None:
        raise web.HTTPSeeOther(f"/book/{provider.username}/{service.slug}")
    values, errors = _validate_details(form)
    if errors:
        context = _details_context(provider, service, start, zone, values)
        context["errors"] = errors
        return render(request, "details.html", context, status=400)
    wanted = booking.BookingRequest(
        service.id,
        provider.id,
        start,
        booking.Client(values["name"], values["email"], zone),
        values["notes"],
    )
    base_url = _base_url(request)

    def unit_of_work(
        conn: Connection, principals: Sequence[str], prepared: booking.Prepared | None
    ) -> booking.Booked:
        return booking.book(conn, wanted, base_url, principals, prepared=prepared)

    try:
        booked = await write_booking(
            request, wanted, unit_of_work, booking.principals_for(service, provider)
        )
    except (booking.SlotTaken, booking.NotBookable) as exc:
        log_event(log, "web booking lost its slot", provider=provider.username, reason=str(exc))
        notice = TAKEN_NOTICE if isinstance(exc, booking.SlotTaken) else NOT_BOOKABLE_NOTICE
        context = {
            "provider": provider,
            "service": service,
            "mode": "book",
            "page_path": f"/book/{provider.username}/{service.slug}",
            "zone_chosen": True,
            "title": f"Book {service.name}",
        }
        return await _picker_page(
            request,
            provider.id,
            service.id,
            zone,
            context,
            status=exc.status,
            notice=notice,
            after=start,
        )
    appointment = booked.appointment
    log_event(
        log,
        "web booking made",
        appointment_id=appointment.id,
        provider=provider.username,
        service=service.slug,
    )
    raise web.HTTPSeeOther(f"/manage/{appointment.manage_token}?booked=1")


# --- manage links --------------------------------------------------------------------------


def _manage_context(request: web.Request, managed: Managed, zone: str) -> dict[str, Any]:
    appointment = managed.appointment
    return {
        "appointment": appointment,
        "provider": managed.provider,
        "service": managed.service,
        "zone": zone,
        "provider_zone": appointment.timezone,
        "policy": policy_text(managed.service),
        "manage_url": f"{_base_url(request)}/manage/{appointment.manage_token}",
        "token": appointment.manage_token,
        "booked": "booked" in request.query,
        "moved": "moved" in request.query,
        "error": "",
        "can_change": _changeable(managed, time.time()),
    }


@routes.get("/manage/{token}")
@html_errors
async def manage_page(request: web.Request) -> web.StreamResponse:
    managed = await request.app[DATABASE].run_read(_managed, request.match_info["token"])
    zone, _ = visitor_zone(request, managed.appointment.client_timezone)
    return render(request, "manage.html", _manage_context(request, managed, zone))


@routes.get("/manage/{token}/appointment.ics")
@html_errors
async def manage_ics(request: web.Request) -> web.StreamResponse:
    def read(conn: Connection) -> str:
        managed = _managed(conn, request.match_info["token"])
        folder = calendars.get_collection(conn, f"{managed.provider.username}/appointments")
        item = (
            calendars.get_item(conn, folder.id, managed.appointment.event_href) if folder else None
        )
        if item is None:
            raise NotFound("The calendar entry of this appointment is gone.")
        return item.text

    text = await request.app[DATABASE].run_read(read)
    return web.Response(
        text=text,
        content_type="text/calendar",
        charset="utf-8",
        headers={"Content-Disposition": 'attachment; filename="appointment.ics"'},
    )


def _changeable(managed: Managed, now: float) -> bool:
    try:
        _require_changeable(managed, now)
    except PolicyViolation:
        return False
    return True


def _require_changeable(managed: Managed, now: float) -> None:
    appointment = managed.appointment
    if appointment.status != "confirmed":
        raise PolicyViolation(f"This appointment is {appointment.status.replace('_', '-')}.")
    notice = rules_from_json(managed.service.rules if managed.service else {})
    if appointment.start_utc - now < notice.cancellation_notice_minutes * 60:
        raise PolicyViolation(
            "It is too late to change this appointment online. " + policy_text(managed.service)
        )


@routes.get("/manage/{token}/reschedule")
@html_errors
async def reschedule_page(request: web.Request) -> web.StreamResponse:
    managed = await request.app[DATABASE].run_read(_managed, request.match_info["token"])
    zone, _ = visitor_zone(request, managed.appointment.client_timezone)
    try:
        _require_changeable(managed, time.time())
    except PolicyViolation as exc:
        return _manage_error(request, managed, zone, exc.detail, exc.status)
    return await _reschedule_picker(request, managed, zone)


async def _reschedule_picker(
    request: web.Request,
    managed: Managed,
    zone: str,
    *,
    status: int = 200,
    notice: str = "",
    after: int | None = None,
) -> web.Response:
    service = managed.service
    if service is None:
        raise NotFound("This service is no longer offered; contact the provider.")
    context = {
        "provider": managed.provider,
        "service": service,
        "mode": "reschedule",
        "appointment": managed.appointment,
        "page_path": request.path if after is None else f"{request.path}",
        "zone_chosen": True,
        "title": f"Reschedule {service.name}",
        "token": managed.appointment.manage_token,
    }
    return await _picker_page(
        request,
        managed.provider.id,
        service.id,
        zone,
        context,
        status=status,
        notice=notice,
        after=after,
    )


async def _manage_post(request: web.Request) -> tuple[dict[str, str], Managed, str]:
    """What every POST to a manage link checks and reads first: the rate limit, the form and its
    CSRF token, the appointment, and the visitor's zone."""
    _limit(request)
    form = await form_data(request)
    _check_csrf(request, form)
    managed = await request.app[DATABASE].run_read(_managed, request.match_info["token"])
    zone = picker.valid_zone(form.get("tz")) or managed.appointment.client_timezone
    return form, managed, zone


def _manage_error(
    request: web.Request, managed: Managed, zone: str, error: str, status: int
) -> web.StreamResponse:
    """The manage page again, saying why the change was refused."""
    context = _manage_context(request, managed, zone)
    context["error"] = error
    return render(request, "manage.html", context, status=status)


@routes.post("/manage/{token}/reschedule")
@html_errors
async def reschedule(request: web.Request) -> web.StreamResponse:
    form, managed, zone = await _manage_post(request)
    database = request.app[DATABASE]
    start = _start_param(form.get("start"))
    if start is None:
        raise web.HTTPSeeOther(f"/manage/{managed.appointment.manage_token}/reschedule")
    try:
        _require_changeable(managed, time.time())
    except PolicyViolation as exc:
        return _manage_error(request, managed, zone, exc.detail, exc.status)
    assert managed.service is not None
    principals = booking.principals_for(managed.service, managed.provider)
    try:
        await database.run_write(
            booking.reschedule,
            managed.appointment.id,
            start,
            _base_url(request),
            principals=principals,
        )
    except (booking.SlotTaken, booking.NotBookable) as exc:
        taken = isinstance(exc, booking.SlotTaken)
        return await _reschedule_picker(
            request,
            managed,
            zone,
            status=exc.status,
            notice=TAKEN_NOTICE if taken else NOT_BOOKABLE_NOTICE,
            after=start,
        )
    log_event(log, "web reschedule", appointment_id=managed.appointment.id)
    raise web.HTTPSeeOther(f"/manage/{managed.appointment.manage_token}?moved=1")


@routes.post("/manage/{token}/cancel")
@html_errors
async def cancel(request: web.Request) -> web.StreamResponse:
    form, managed, zone = await _manage_post(request)
    database = request.app[DATABASE]
    reason = form.get("reason", "").strip()
    if len(reason) > MAX_NOTES:
        return _manage_error(
            request, managed, zone, f"Keep the reason under {MAX_NOTES} characters.", 400
        )
    assert managed.service is not None or managed.appointment.status != "confirmed"
    try:
        _require_changeable(managed, time.time())
        principals = (
            booking.principals_for(managed.service, managed.provider)
            if managed.service
            else [managed.provider.username]
        )
        await database.run_write(
            booking.cancel,
            managed.appointment.id,
            reason,
            True,
            _base_url(request),
            principals=principals,
        )
    except PolicyViolation as exc:
        return _manage_error(request, managed, zone, exc.detail, exc.status)
    log_event(log, "web cancellation", appointment_id=managed.appointment.id)
    raise web.HTTPSeeOther(f"/manage/{managed.appointment.manage_token}")
