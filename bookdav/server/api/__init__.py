"""The JSON API at /api/v1/: one module per resource, each with its own route table."""

from __future__ import annotations

from aiohttp import web

from bookdav.server.api import (
    appointments,
    availability,
    calendars,
    outbox,
    resources,
    services,
    users,
    webhooks,
)
from bookdav.server.bookings import IN_FLIGHT, SLOT_GATES, InFlight, SlotGates
from bookdav.server.keys import SETTINGS
from bookdav.server.ratelimit import RateLimiter

ROUTE_TABLES = (
    users.routes,
    services.routes,
    availability.routes,
    resources.routes,
    appointments.routes,
    calendars.routes,
    webhooks.routes,
    outbox.routes,
)


def add_routes(app: web.Application) -> None:
    settings = app[SETTINGS]
    app[appointments.PRINCIPALS] = appointments.PrincipalCache()
    app[IN_FLIGHT] = InFlight()
    app[SLOT_GATES] = SlotGates()
    app[appointments.GUEST_LIMITER] = RateLimiter(
        settings.get("booking", "guest_bookings_per_minute")
    )
    for table in ROUTE_TABLES:
        app.add_routes(table)
