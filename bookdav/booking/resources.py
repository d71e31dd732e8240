"""Resources (rooms, chairs, devices): each one a calendar that bookings and people can fill."""

from __future__ import annotations

from sqlalchemy import Connection

from bookdav.booking.services import slug_for
from bookdav.storage import calendars
from bookdav.storage.resources import RESOURCES_PRINCIPAL, Resource, insert_resource


def create_resource(conn: Connection, *, name: str, kind: str, timezone: str) -> Resource:
    """The resource row and its calendar; run under the resources principal's lock."""
    resource = insert_resource(conn, slug=slug_for(name), name=name, kind=kind)
    calendars.create_collection(conn, RESOURCES_PRINCIPAL, {})
    calendars.create_collection(
        conn,
        resource.calendar_path,
        {
            "tag": "VCALENDAR",
            "D:displayname": name,
            "C:supported-calendar-component-set": "VEVENT",
        },
        timezone=timezone,
    )
    return resource
