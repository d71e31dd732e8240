"""The JSON API at /api/v1/: one module per resource, each with its own route table."""

from __future__ import annotations

from aiohttp import web

from bookdav.server.api import availability, resources, services, users

ROUTE_TABLES = (users.routes, services.routes, availability.routes, resources.routes)


def add_routes(app: web.Application) -> None:
    for table in ROUTE_TABLES:
        app.add_routes(table)
