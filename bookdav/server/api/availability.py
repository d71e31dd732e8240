"""`/api/v1/providers/{providerId}/availability`: weekly working hours in, free slots out."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Hashable
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from sqlalchemy import Connection

from bookdav.booking import availability
from bookdav.booking.errors import Forbidden, InvalidInput, NotFound
from bookdav.booking.ical import (
    DAYS,
    InvalidCalendar,
    WeeklyHours,
    WorkingHours,
    parse_vavailability,
    vavailability,
)
from bookdav.booking.slots import Interval
from bookdav.booking.times import InstantFormatter
from bookdav.server.api import validation as v
from bookdav.server.api.validation import UnsupportedMediaType
from bookdav.server.auth import require_user
from bookdav.server.keys import DATABASE, SETTINGS
from bookdav.storage.users import User, user_by_id

routes = web.RouteTableDef()

CALENDAR_TYPE = "text/calendar"
MAX_TIME_SLOTS = 100


async def _provider(request: web.Request) -> User:
    provider_id = request.match_info["providerId"]
    provider = await request.app[DATABASE].run_read(user_by_id, provider_id)
    if provider is None or provider.role != "provider" or provider.status != "active":
        raise NotFound(f"no provider {provider_id}")
    return provider


def _hours_from_json(body: dict[str, Any], provider: User) -> WorkingHours:
    timezone = v.time_zone(body.get("timezone", provider.timezone))
    raw_slots = body.get("timeSlots")
    if not isinstance(raw_slots, list):
        raise InvalidInput("timeSlots", "is required: a list of {dayOfWeek, startTime, endTime}")
    if len(raw_slots) > MAX_TIME_SLOTS:
        raise InvalidInput("timeSlots", f"must have at most {MAX_TIME_SLOTS} entries")
    grouped: dict[tuple[tuple[int, int], tuple[int, int]], list[str]] = {}
    for index, slot in enumerate(raw_slots):
        name = f"timeSlots[{index}]"
        if not isinstance(slot, dict):
            raise InvalidInput(name, "must be an object")
        day = slot.get("dayOfWeek")
        if day not in DAYS:
            raise InvalidInput(f"{name}.dayOfWeek", "must be one of " + ", ".join(DAYS))
        start = v.wall_time(slot.get("startTime"), f"{name}.startTime")
        end = v.wall_time(slot.get("endTime"), f"{name}.endTime")
        if start == (24, 0):
            raise InvalidInput(f"{name}.startTime", "must be before 24:00")
        if end <= start:
            raise InvalidInput(f"{name}.endTime", "must be after startTime")
        days = grouped.setdefault((start, end), [])
        if day not in days:
            days.append(day)
    today = datetime.now(ZoneInfo(timezone)).date()
    valid_from = v.iso_date(body["validFrom"], "validFrom") if body.get("validFrom") else today
    valid_until = v.iso_date(body["validUntil"], "validUntil") if body.get("validUntil") else None
    if valid_until is not None and valid_until < valid_from:
        raise InvalidInput("validUntil", "must not be before validFrom")
    hours = tuple(
        WeeklyHours(tuple(sorted(days, key=DAYS.index)), start, end)
        for (start, end), days in sorted(grouped.items())
    )
    return WorkingHours(timezone, hours, valid_from, valid_until)


def _hours_json(provider: User, hours: WorkingHours | None) -> dict[str, Any]:
    if hours is None:
        return {"providerId": provider.id, "timezone": provider.timezone, "timeSlots": []}
    slots = [
        {"dayOfWeek": day, "startTime": block.start_text, "endTime": block.end_text}
        for block in hours.hours
        for day in block.days
    ]
    slots.sort(key=lambda slot: (DAYS.index(slot["dayOfWeek"]), slot["startTime"]))
    return {
        "providerId": provider.id,
        "timezone": hours.timezone,
        "timeSlots": slots,
        "validFrom": hours.valid_from.isoformat(),
        "validUntil": hours.valid_until.isoformat() if hours.valid_until else None,
    }


@routes.post("/api/v1/providers/{providerId}/availability")
async def set_availability(request: web.Request) -> web.Response:
    actor = await require_user(request, "provider", "admin")
    provider = await _provider(request)
    if actor.role != "admin" and actor.id != provider.id:
        raise Forbidden("you may only set your own working hours")
    if request.content_type == CALENDAR_TYPE:
        try:
            text = (await request.read()).decode("utf-8")
            hours = parse_vavailability(text, provider.timezone)
        except UnicodeDecodeError as exc:
            raise InvalidInput("body", "iCalendar must be UTF-8") from exc
        except InvalidCalendar as exc:
            raise InvalidInput("body", str(exc)) from exc
    elif request.content_type in v.JSON_TYPES:
        hours = _hours_from_json(await v.json_object(request), provider)
    else:
        raise UnsupportedMediaType("send application/json or text/calendar (VAVAILABILITY)")
    await request.app[DATABASE].run_write(
        availability.set_working_hours, provider, hours, principals=[provider.username]
    )
    return web.json_response(_hours_json(provider, hours), status=200)


@routes.get("/api/v1/providers/{providerId}/availability")
async def get_availability(request: web.Request) -> web.Response:
    if "serviceId" in request.query:
        return await _slots(request)
    provider = await _provider(request)
    database = request.app[DATABASE]
    if CALENDAR_TYPE in request.headers.get("Accept", ""):
        hours = await database.run_read(availability.working_hours, provider)
        if hours is None:
            raise NotFound(f"provider {provider.id} has set no working hours")
        return web.Response(text=vavailability(hours), content_type=CALENDAR_TYPE, charset="utf-8")
    hours = await database.run_read(availability.working_hours, provider)
    return web.json_response(_hours_json(provider, hours))


async def _slots(request: web.Request) -> web.Response:
    start_day = _query_date(request, "startDate")
    end_day = _query_date(request, "endDate")
    if end_day < start_day:
        raise InvalidInput("endDate", "must not be before startDate")
    max_days = request.app[SETTINGS].get("booking", "max_search_days")
    if (end_day - start_day).days + 1 > max_days:
        raise InvalidInput("endDate", f"a search may cover at most {max_days} days")
    zone = request.query.get("timezone")
    if zone is not None:
        v.time_zone(zone)
    provider_id, service_id = request.match_info["providerId"], request.query["serviceId"]

    def search(conn: Connection) -> tuple[availability.FoundSlots, str]:
        # The provider's zone is only known inside the unit of work: one snapshot, one thread hop.
        provider = user_by_id(conn, provider_id)
        shown_in = zone or (provider.timezone if provider else "UTC")
        window = availability.day_window(start_day, end_day, shown_in)
        return availability.find_slots(conn, provider_id, service_id, window), shown_in

    found, shown_in = await request.app[DATABASE].run_read(search)
    head = json.dumps(
        {"providerId": found.provider.id, "serviceId": found.service.id, "timezone": shown_in}
    )
    slots = ",".join(_rendered_slots(found, shown_in))
    return web.Response(text=f'{head[:-1]}, "slots": [{slots}]}}', content_type="application/json")


class _RenderedSlots:
    """Slot JSON by start, for one cached candidate list and zone: a month of slots is hundreds
    of formatted instants, the largest share of a search that hits the slot cache."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._entries: OrderedDict[Hashable, dict[int, str]] = OrderedDict()

    def fragments(self, key: Hashable, slots: list[Interval], zone: str) -> dict[int, str]:
        cached = self._entries.get(key)
        if cached is not None and all(start in cached for start, _ in slots):
            self._entries.move_to_end(key)
            return cached
        local = InstantFormatter(zone)
        rendered = {
            start: json.dumps({"startTime": local.format(start), "endTime": local.format(end)})
            for start, end in slots
        }
        self._entries[key] = rendered
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return rendered


_rendered = _RenderedSlots()


def _rendered_slots(found: availability.FoundSlots, zone: str) -> list[str]:
    if found.cache_key is None:
        local = InstantFormatter(zone)
        return [
            json.dumps({"startTime": local.format(start), "endTime": local.format(end)})
            for start, end in found.slots
        ]
    fragments = _rendered.fragments((found.cache_key, zone), found.slots, zone)
    return [fragments[start] for start, _ in found.slots]


def _query_date(request: web.Request, name: str) -> date:
    if name not in request.query:
        raise InvalidInput(name, "is required (YYYY-MM-DD)")
    return v.iso_date(request.query[name], name)
