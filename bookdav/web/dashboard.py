"""The provider dashboard at `/app/`: sign in with the CalDAV credentials; the coming week's
appointments (outcome, cancel), weekly hours, services, and the links to share and subscribe."""

from __future__ import annotations

import logging
import time
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from sqlalchemy import Connection

from bookdav.booking import appointments as booking
from bookdav.booking.availability import set_working_hours, working_hours
from bookdav.booking.errors import Forbidden, NotFound
from bookdav.booking.ical import DAYS, WeeklyHours, WorkingHours
from bookdav.booking.services import rules_from_json, slug_for
from bookdav.logs import log_event
from bookdav.server.keys import CREDENTIALS, DATABASE, SETTINGS
from bookdav.storage import services as service_store
from bookdav.storage.appointments import Appointment, list_appointments
from bookdav.storage.services import ServiceRecord
from bookdav.web import csrf
from bookdav.web.render import WEB, form_data, html_errors, render, set_cookie
from bookdav.web.sessions import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    WebSession,
    create_session,
    end_session,
    session_for,
)

routes = web.RouteTableDef()
log = logging.getLogger("bookdav.web")

DAY_NAMES = dict(
    zip(
        DAYS,
        ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
        strict=True,
    )
)
WEEK_DAYS = 8  # today and the coming week
MAX_SERVICE_MINUTES = 24 * 60


async def _session(request: web.Request) -> WebSession:
    token = request.cookies.get(SESSION_COOKIE, "")
    found = await request.app[DATABASE].run_read(session_for, token) if token else None
    if found is None:
        raise web.HTTPSeeOther("/app/login")
    if found.user.role != "provider":
        raise Forbidden("The dashboard is for providers.")
    return found


async def _posted(request: web.Request) -> tuple[WebSession, dict[str, str]]:
    session = await _session(request)
    form = await form_data(request)
    csrf.check_session(session.csrf_secret, form.get(csrf.FIELD, ""))
    return session, form


def _page(
    request: web.Request,
    session: WebSession,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
) -> web.Response:
    context = {"user": session.user, "section": template.removesuffix(".html"), **context}
    return render(
        request, f"app/{template}", context, status=status, session_csrf=session.csrf_secret
    )


# --- signing in ----------------------------------------------------------------------------


@routes.get("/app")
async def app_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently("/app/")


@routes.get("/app/login")
@html_errors
async def login_page(request: web.Request) -> web.StreamResponse:
    return render(request, "app/login.html", {"username": "", "error": ""})


@routes.post("/app/login")
@html_errors
async def login(request: web.Request) -> web.StreamResponse:
    request.app[WEB].limiter.check(request.remote or "unknown")
    form = await form_data(request)
    csrf.check_public(request, request.app[WEB].secret, form.get(csrf.FIELD, ""))
    username = form.get("username", "").strip()
    password = form.get("password", "")
    database = request.app[DATABASE]
    user = None
    if username and password and len(username) <= 64 and len(password) <= 1024:
        user = await database.run_read(request.app[CREDENTIALS].verify, username, password)
    if user is None or user.role != "provider":
        log_event(log, "dashboard login refused", username=username, remote=request.remote or "")
        error = (
            "Wrong username or password."
            if user is None
            else "The dashboard is for providers; this account is not one."
        )
        context = {"username": username, "error": error}
        return render(request, "app/login.html", context, status=401)
    token = await database.run_write(create_session, user.id)
    log_event(log, "dashboard login", username=user.username)
    response = web.HTTPSeeOther("/app/")
    set_cookie(request, response, SESSION_COOKIE, token, SESSION_SECONDS)
    raise response


@routes.post("/app/logout")
@html_errors
async def logout(request: web.Request) -> web.StreamResponse:
    await _posted(request)
    await request.app[DATABASE].run_write(end_session, request.cookies.get(SESSION_COOKIE, ""))
    response = web.HTTPSeeOther("/app/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


# --- appointments --------------------------------------------------------------------------


@routes.get("/app/")
@html_errors
async def home(request: web.Request) -> web.StreamResponse:
    session = await _session(request)
    provider = session.user
    zone = ZoneInfo(provider.timezone)
    today = datetime.now(zone).date()
    start = int(datetime.combine(today, datetime.min.time(), zone).timestamp())
    end = int(
        datetime.combine(today + timedelta(days=WEEK_DAYS), datetime.min.time(), zone).timestamp()
    )

    def read(conn: Connection) -> tuple[list[Appointment], dict[str, ServiceRecord]]:
        found = list_appointments(
            conn,
            provider_id=provider.id,
            client_id=None,
            start_from=start,
            start_before=end,
            statuses=None,
            after=None,
            limit=500,
        )
        offered = service_store.list_services(
            conn, provider_id=provider.id, after_id=None, limit=500
        )
        return found, {s.id: s for s in offered}

    found, services = await request.app[DATABASE].run_read(read)
    days: dict[date, list[Appointment]] = {}
    for appointment in found:
        days.setdefault(datetime.fromtimestamp(appointment.start_utc, zone).date(), []).append(
            appointment
        )
    context = {
        "today": today,
        "days": sorted(days.items()),
        "services": services,
        "zone": provider.timezone,
        "now": time.time(),
        "message": request.query.get("done", ""),
        "booking_url": f"{request.app[SETTINGS].public_base_url}/book/{provider.username}",
    }
    return _page(request, session, "home.html", context)


async def _own_appointment(request: web.Request, session: WebSession) -> Appointment:
    appointment = await request.app[DATABASE].run_read(
        booking.get_appointment_or_404, request.match_info["appointmentId"]
    )
    if appointment.provider_id != session.user.id:
        raise NotFound("No such appointment.")
    return appointment


@routes.post("/app/appointments/{appointmentId}/outcome")
@html_errors
async def outcome(request: web.Request) -> web.StreamResponse:
    session, form = await _posted(request)
    appointment = await _own_appointment(request, session)
    status = form.get("status", "")
    if status not in ("completed", "no_show"):
        raise web.HTTPSeeOther("/app/")
    await request.app[DATABASE].run_write(
        booking.set_outcome, appointment.id, status, principals=[session.user.username]
    )
    log_event(log, "dashboard outcome", appointment_id=appointment.id, status=status)
    raise web.HTTPSeeOther("/app/?done=outcome")


@routes.post("/app/appointments/{appointmentId}/cancel")
@html_errors
async def cancel(request: web.Request) -> web.StreamResponse:
    session, form = await _posted(request)
    appointment = await _own_appointment(request, session)
    reason = form.get("reason", "").strip()[:2000]
    database = request.app[DATABASE]
    service = await database.run_read(service_store.get_service, appointment.service_id)
    principals = (
        booking.principals_for(service, session.user) if service else [session.user.username]
    )
    await database.run_write(
        booking.cancel,
        appointment.id,
        reason,
        False,
        request.app[SETTINGS].public_base_url,
        principals=principals,
    )
    log_event(log, "dashboard cancellation", appointment_id=appointment.id)
    raise web.HTTPSeeOther("/app/?done=cancelled")


# --- weekly hours --------------------------------------------------------------------------


BLOCKS_PER_DAY = 2  # the editor shows two blocks a day (e.g. a lunch break)


def _hours_rows(hours: WorkingHours | None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Editor rows per weekday, and the days whose hours the editor cannot show whole (more
    blocks than it has, or open until midnight), set through the API or a calendar app."""
    blocks: dict[str, list[tuple[str, str]]] = {day: [] for day in DAYS}
    for block in hours.hours if hours else ():
        for day in block.days:
            blocks[day].append((block.start_text, block.end_text))
    rows: dict[str, dict[str, Any]] = {}
    partial = []
    for day in DAYS:
        found = sorted(blocks[day])
        if len(found) > BLOCKS_PER_DAY or any(end == "24:00" for _, end in found):
            partial.append(DAY_NAMES[day])
        first = found[0] if found else ("09:00", "17:00")
        second = found[1] if len(found) > 1 else ("", "")
        rows[day] = {
            "open": bool(found),
            "start": first[0],
            "end": first[1],
            "start2": second[0],
            "end2": second[1],
        }
    return rows, partial


@routes.get("/app/hours")
@html_errors
async def hours_page(request: web.Request) -> web.StreamResponse:
    session = await _session(request)
    hours = await request.app[DATABASE].run_read(working_hours, session.user)
    rows, partial = _hours_rows(hours)
    context = {
        "rows": rows,
        "partial": partial,
        "errors": {},
        "day_names": DAY_NAMES,
        "saved": "saved" in request.query,
    }
    return _page(request, session, "hours.html", context)


def _wall(text: str) -> tuple[int, int] | None:
    try:
        moment = datetime.strptime(text, "%H:%M")
    except ValueError:
        return None
    return moment.hour, moment.minute


@routes.post("/app/hours")
@html_errors
async def save_hours(request: web.Request) -> web.StreamResponse:
    session, form = await _posted(request)
    provider = session.user
    rows: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    grouped: dict[tuple[tuple[int, int], tuple[int, int]], list[str]] = {}
    for day in DAYS:
        row = {
            key: form.get(f"{day}_{key}", "").strip() for key in ("start", "end", "start2", "end2")
        }
        opened = form.get(f"{day}_open") == "on"
        rows[day] = {"open": opened, **row}
        if not opened:
            continue
        name = DAY_NAMES[day]
        start, end = _wall(row["start"]), _wall(row["end"])
        if start is None or end is None:
            errors[day] = f"{name}: give opening and closing times as HH:MM."
            continue
        if end <= start:
            errors[day] = f"{name}: closing time must be after opening time."
            continue
        grouped.setdefault((start, end), []).append(day)
        if not row["start2"] and not row["end2"]:
            continue
        start2, end2 = _wall(row["start2"]), _wall(row["end2"])
        if start2 is None or end2 is None:
            errors[day] = f"{name}: give both times of the second block as HH:MM, or neither."
        elif start2 < end:
            errors[day] = f"{name}: the second block must start after the first one closes."
        elif end2 <= start2:
            errors[day] = f"{name}: the second block must close after it opens."
        else:
            grouped.setdefault((start2, end2), []).append(day)
    if errors:
        context = {
            "rows": rows,
            "partial": [],
            "errors": errors,
            "day_names": DAY_NAMES,
            "saved": False,
        }
        return _page(request, session, "hours.html", context, status=400)
    today = datetime.now(ZoneInfo(provider.timezone)).date()
    hours = WorkingHours(
        provider.timezone,
        tuple(WeeklyHours(tuple(days), s, e) for (s, e), days in sorted(grouped.items())),
        today,
    )
    await request.app[DATABASE].run_write(
        set_working_hours, provider, hours, principals=[provider.username]
    )
    log_event(log, "dashboard hours saved", username=provider.username, blocks=len(hours.hours))
    raise web.HTTPSeeOther("/app/hours?saved=1")


# --- services ------------------------------------------------------------------------------


def _service_values(service: ServiceRecord) -> dict[str, str]:
    rules = rules_from_json(service.rules)
    return {
        "name": service.name,
        "duration": str(service.duration_minutes),
        "description": service.description,
        "notice": str(rules.min_notice_minutes),
    }


def _validate_service(form: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    values = {
        "name": form.get("name", "").strip(),
        "duration": form.get("duration", "").strip(),
        "description": form.get("description", "").strip(),
        "notice": form.get("notice", "").strip() or "0",
    }
    errors: dict[str, str] = {}
    if not values["name"] or len(values["name"]) > 200:
        errors["name"] = "Give the service a name (up to 200 characters)."
    if not values["duration"].isdigit() or not 5 <= int(values["duration"]) <= MAX_SERVICE_MINUTES:
        errors["duration"] = f"Duration is whole minutes from 5 to {MAX_SERVICE_MINUTES}."
    if len(values["description"]) > 5000:
        errors["description"] = "Keep the description under 5000 characters."
    if not values["notice"].isdigit() or int(values["notice"]) > 525_600:
        errors["notice"] = "Minimum notice is whole minutes (0 for none)."
    return values, errors


async def _services_page(
    request: web.Request,
    session: WebSession,
    *,
    status: int = 200,
    editing: str = "",
    values: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
) -> web.Response:
    offered = await request.app[DATABASE].run_read(
        lambda conn: service_store.list_services(
            conn, provider_id=session.user.id, after_id=None, limit=500
        )
    )
    forms = []
    for service in sorted(offered, key=lambda s: s.name.lower()):
        mine = editing == service.id
        forms.append(
            {
                "service": service,
                "fields": values if mine and values else _service_values(service),
                "field_errors": errors if mine and errors else {},
            }
        )
    blank = {"name": "", "duration": "30", "description": "", "notice": "60"}
    context = {
        "forms": forms,
        "new_values": values if editing == "new" and values else blank,
        "new_errors": errors if editing == "new" and errors else {},
        "saved": request.query.get("done", ""),
    }
    return _page(request, session, "services.html", context, status=status)


@routes.get("/app/services")
@html_errors
async def services_page(request: web.Request) -> web.StreamResponse:
    return await _services_page(request, await _session(request))


@routes.post("/app/services")
@html_errors
async def create_service(request: web.Request) -> web.StreamResponse:
    session, form = await _posted(request)
    values, errors = _validate_service(form)
    if errors:
        return await _services_page(
            request, session, status=400, editing="new", values=values, errors=errors
        )
    provider = session.user
    await request.app[DATABASE].run_write(
        lambda conn: service_store.insert_service(
            conn,
            slug=slug_for(values["name"]),
            name=values["name"],
            description=values["description"],
            duration_minutes=int(values["duration"]),
            price_amount="0",
            price_currency="EUR",
            rules={"minNoticeMinutes": int(values["notice"])},
            created_by=provider.id,
            provider_ids=[provider.id],
        )
    )
    log_event(log, "dashboard service created", username=provider.username)
    raise web.HTTPSeeOther("/app/services?done=created")


async def _own_service(request: web.Request, session: WebSession) -> ServiceRecord:
    service = await request.app[DATABASE].run_read(
        service_store.get_service, request.match_info["serviceId"]
    )
    if service is None or session.user.id not in service.provider_ids:
        raise NotFound("No such service.")
    return service


@routes.post("/app/services/{serviceId}")
@html_errors
async def update_service(request: web.Request) -> web.StreamResponse:
    session, form = await _posted(request)
    service = await _own_service(request, session)
    values, errors = _validate_service(form)
    if errors:
        return await _services_page(
            request, session, status=400, editing=service.id, values=values, errors=errors
        )
    rules = {**service.rules, "minNoticeMinutes": int(values["notice"])}
    await request.app[DATABASE].run_write(
        service_store.update_service,
        service.id,
        None,
        None,
        name=values["name"],
        description=values["description"],
        duration_minutes=int(values["duration"]),
        rules=rules,
    )
    raise web.HTTPSeeOther("/app/services?done=saved")


@routes.post("/app/services/{serviceId}/delete")
@html_errors
async def delete_service(request: web.Request) -> web.StreamResponse:
    session, _ = await _posted(request)
    service = await _own_service(request, session)
    await request.app[DATABASE].run_write(service_store.delete_service, service.id)
    raise web.HTTPSeeOther("/app/services?done=deleted")


# --- links and calendar set-up -------------------------------------------------------------


@routes.get("/app/links")
@html_errors
async def links_page(request: web.Request) -> web.StreamResponse:
    session = await _session(request)
    base = request.app[SETTINGS].public_base_url
    context = {
        "booking_url": f"{base}/book/{session.user.username}",
        "dav_base": f"{base}/dav/",
        "dav_url": f"{base}/dav/{session.user.username}/",
    }
    return _page(request, session, "links.html", context)
