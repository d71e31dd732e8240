"""`/api/v1/resources`: rooms, chairs and devices a service may need, each with a calendar."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bookdav.booking.resources import create_resource
from bookdav.server.api import validation as v
from bookdav.server.auth import require_user
from bookdav.server.keys import DATABASE, SETTINGS
from bookdav.storage.resources import RESOURCES_PRINCIPAL, Resource, list_resources

routes = web.RouteTableDef()


def resource_json(resource: Resource, base_url: str) -> dict[str, Any]:
    return {
        "resourceId": resource.id,
        "name": resource.name,
        "kind": resource.kind,
        "calendarUrl": f"{base_url}/dav/{resource.calendar_path}/",
        "createdAt": resource.created_at,
    }


@routes.post("/api/v1/resources")
async def post_resource(request: web.Request) -> web.Response:
    await require_user(request, "admin", "provider")
    body = await v.json_object(request)
    name = v.text(body, "name", min_length=1)
    kind = v.text(body, "kind", min_length=1, max_length=40)
    timezone = v.time_zone(body.get("timezone", "UTC"))
    resource = await request.app[DATABASE].run_write(
        lambda conn: create_resource(conn, name=name, kind=kind, timezone=timezone),
        principals=[RESOURCES_PRINCIPAL],
    )
    base_url = request.app[SETTINGS].public_base_url
    return web.json_response(
        resource_json(resource, base_url),
        status=201,
        headers={"Location": f"/api/v1/resources/{resource.id}"},
    )


@routes.get("/api/v1/resources")
async def get_resources(request: web.Request) -> web.Response:
    await require_user(request, "admin", "provider")
    found = await request.app[DATABASE].run_read(list_resources)
    base_url = request.app[SETTINGS].public_base_url
    return web.json_response({"items": [resource_json(r, base_url) for r in found]})
