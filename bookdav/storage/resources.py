"""The resources table (rooms, chairs, devices) and which resources a service needs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select

from bookdav.storage.schema import resources, service_resources

# The principal folder that holds every resource's calendar: /dav/resources/<slug>/.
RESOURCES_PRINCIPAL = "resources"


@dataclass(frozen=True)
class Resource:
    id: str
    slug: str
    name: str
    kind: str
    created_at: int

    @property
    def calendar_path(self) -> str:
        return f"{RESOURCES_PRINCIPAL}/{self.slug}"


def insert_resource(conn: Connection, *, slug: str, name: str, kind: str) -> Resource:
    resource = Resource(str(uuid.uuid4()), slug, name, kind, int(time.time()))
    conn.execute(
        insert(resources).values(
            id=resource.id, slug=slug, name=name, kind=kind, created_at=resource.created_at
        )
    )
    return resource


def resource_by_slug(conn: Connection, slug: str) -> Resource | None:
    row = conn.execute(select(resources).where(resources.c.slug == slug)).first()
    return Resource(**row._mapping) if row else None


def list_resources(conn: Connection, ids: Sequence[str] | None = None) -> list[Resource]:
    query = select(resources).order_by(resources.c.name, resources.c.id)
    if ids is not None:
        query = query.where(resources.c.id.in_(ids))
    return [Resource(**row._mapping) for row in conn.execute(query)]


def resources_of_service(conn: Connection, service_id: str) -> list[Resource]:
    ids = select(service_resources.c.resource_id).where(
        service_resources.c.service_id == service_id
    )
    rows = conn.execute(select(resources).where(resources.c.id.in_(ids)).order_by(resources.c.id))
    return [Resource(**row._mapping) for row in rows]


def set_service_resources(conn: Connection, service_id: str, resource_ids: Sequence[str]) -> None:
    conn.execute(delete(service_resources).where(service_resources.c.service_id == service_id))
    if resource_ids:
        conn.execute(
            insert(service_resources),
            [{"service_id": service_id, "resource_id": rid} for rid in resource_ids],
        )
