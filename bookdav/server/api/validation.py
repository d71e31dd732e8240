"""Reading JSON request bodies and query parameters, with errors that name the field."""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web

from bookdav.booking.errors import BookdavError, InvalidInput

JSON_TYPES = ("application/json", "application/problem+json")
# Dates and instants outside these years are refused: nobody books them, and date arithmetic at
# the edges of Python's calendar (year 9999 + 1 day) overflows.
EARLIEST_YEAR, LATEST_YEAR = 1970, 2200


class UnsupportedMediaType(BookdavError):
    status = 415
    title = "Unsupported Media Type"


async def json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or 415 (not JSON) / 400 (malformed, not an object)."""
    if request.content_type not in JSON_TYPES:
        raise UnsupportedMediaType(f"send application/json, not {request.content_type!r}")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput("body", f"malformed JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    return body


def text(
    body: dict[str, Any],
    name: str,
    *,
    required: bool = True,
    default: str = "",
    max_length: int = 200,
    min_length: int = 0,
) -> str:
    if name not in body or body[name] is None:
        if required:
            raise InvalidInput(name, "is required")
        return default
    value = body[name]
    if not isinstance(value, str):
        raise InvalidInput(name, "must be a string")
    value = value.strip()
    if len(value) > max_length:
        raise InvalidInput(name, f"must be at most {max_length} characters")
    if len(value) < min_length:
        raise InvalidInput(
            name,
            "must not be empty" if min_length == 1 else f"must be at least {min_length} characters",
        )
    return value


def integer(value: Any, name: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(name, "must be a whole number")
    if not minimum <= value <= maximum:
        raise InvalidInput(name, f"must be between {minimum} and {maximum}")
    return value


def object_field(body: dict[str, Any], name: str, *, required: bool = True) -> dict[str, Any]:
    if name not in body or body[name] is None:
        if required:
            raise InvalidInput(name, "is required")
        return {}
    value = body[name]
    if not isinstance(value, dict):
        raise InvalidInput(name, "must be an object")
    return value


def string_list(
    body: dict[str, Any], name: str, *, required: bool = True, max_items: int = 100
) -> list[str]:
    if name not in body or body[name] is None:
        if required:
            raise InvalidInput(name, "is required")
        return []
    value = body[name]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidInput(name, "must be a list of strings")
    if len(value) > max_items:
        raise InvalidInput(name, f"must have at most {max_items} entries")
    return list(dict.fromkeys(value))


def time_zone(value: Any, name: str = "timezone") -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(name, "must be an IANA time zone such as Europe/Berlin")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(name, f"{value!r} is not an IANA time zone") from exc
    return value


def iso_date(value: Any, name: str) -> date:
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise InvalidInput(name, "must be a date as YYYY-MM-DD")
    try:
        parsed = date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(name, f"{value!r} is not a calendar date") from exc
    _require_plausible_year(parsed.year, name)
    return parsed


def _require_plausible_year(year: int, name: str) -> None:
    if not EARLIEST_YEAR <= year <= LATEST_YEAR:
        raise InvalidInput(name, f"must be between the years {EARLIEST_YEAR} and {LATEST_YEAR}")


def iso_instant(value: Any, name: str) -> datetime:
    """An ISO 8601 date-time with an offset (or Z)."""
    if not isinstance(value, str):
        raise InvalidInput(name, "must be an ISO 8601 date-time with offset")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(name, "must be an ISO 8601 date-time with offset") from exc
    if parsed.tzinfo is None:
        raise InvalidInput(name, "must carry a UTC offset, e.g. 2030-01-07T09:00:00+01:00")
    _require_plausible_year(parsed.year, name)
    return parsed


def wall_time(value: Any, name: str) -> tuple[int, int]:
    """A wall-clock time "HH:MM" (24:00 allowed as the end of a day) as (hour, minute)."""
    if not isinstance(value, str) or not re.fullmatch(r"\d{2}:\d{2}", value):
        raise InvalidInput(name, "must be a time as HH:MM")
    hour, minute = int(value[:2]), int(value[3:])
    if not (0 <= hour <= 23 and 0 <= minute <= 59) and (hour, minute) != (24, 0):
        raise InvalidInput(name, f"{value!r} is not a time of day")
    return hour, minute


def query_int(request: web.Request, name: str, *, default: int, minimum: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidInput(name, "must be a whole number") from exc
    return integer(value, name, minimum=minimum, maximum=maximum)
