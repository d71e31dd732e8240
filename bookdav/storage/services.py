"""The services table and which providers offer each service."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Table, delete, insert, select, update

from bookdav.storage import sql
from bookdav.storage.resources import set_service_resources
from bookdav.storage.schema import service_providers, service_resources, services, users
from bookdav.storage.users import User


@dataclass(frozen=True)
class ServiceRecord:
    id: str
    slug: str
    name: str
    description: str
    duration_minutes: int
    price_amount: str
    price_currency: str
    rules: dict[str, Any]
    created_by: str
    provider_ids: tuple[str, ...] = field(default=())
    resource_ids: tuple[str, ...] = field(default=())
    # Notification overrides (`services.templates`): {"templates": {name: source},
    # "reminderMinutes": [...]}.
    notifications: dict[str, Any] = field(default_factory=dict)


def _linked(
    conn: Connection, link: Table, column: str, service_ids: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """For each service, the ids in `link.<column>` (its providers, or its resources)."""
    found: dict[str, list[str]] = {service_id: [] for service_id in service_ids}
    rows = conn.execute(
        select(link.c.service_id, link.c[column])
        .where(link.c.service_id.in_(service_ids))
        .order_by(link.c[column])
    )
    for service_id, linked_id in rows:
        found[service_id].append(linked_id)
    return {service_id: tuple(ids) for service_id, ids in found.items()}


def _records(conn: Connection, rows: Sequence[Any]) -> list[ServiceRecord]:
    service_ids = [row.id for row in rows]
    providers = _linked(conn, service_providers, "provider_id", service_ids)
    needs = _linked(conn, service_resources, "resource_id", service_ids)
    return [_record(row, providers[row.id], needs[row.id]) for row in rows]


def _record(
    row: Any, provider_ids: tuple[str, ...], resource_ids: tuple[str, ...]
) -> ServiceRecord:
    return ServiceRecord(
        id=row.id,
        slug=row.slug,
        name=row.name,
        description=row.description,
        duration_minutes=row.duration_minutes,
        price_amount=row.price_amount,
        price_currency=row.price_currency,
        rules=json.loads(row.rules),
        created_by=row.created_by,
        provider_ids=provider_ids,
        resource_ids=resource_ids,
        notifications=json.loads(row.templates or "{}"),
    )


def insert_service(
    conn: Connection,
    *,
    slug: str,
    name: str,
    description: str,
    duration_minutes: int,
    price_amount: str,
    price_currency: str,
    rules: dict[str, Any],
    created_by: str,
    provider_ids: Sequence[str],
    resource_ids: Sequence[str] = (),
    notifications: dict[str, Any] | None = None,
) -> ServiceRecord:
    service_id = str(uuid.uuid4())
    now = int(time.time())
    conn.execute(
        insert(services).values(
            id=service_id,
            slug=slug,
            name=name,
            description=description,
            duration_minutes=duration_minutes,
            price_amount=price_amount,
            price_currency=price_currency,
            rules=json.dumps(rules, sort_keys=True),
            templates=json.dumps(notifications or {}, sort_keys=True),
            created_by=created_by,
            created_at=now,
            updated_at=now,
        )
    )
    _set_providers(conn, service_id, provider_ids)
    set_service_resources(conn, service_id, resource_ids)
    service = get_service(conn, service_id)
    assert service is not None
    return service


def _set_providers(conn: Connection, service_id: str, provider_ids: Sequence[str]) -> None:
    conn.execute(delete(service_providers).where(service_providers.c.service_id == service_id))
    if provider_ids:
        conn.execute(
            insert(service_providers),
            [{"service_id": service_id, "provider_id": pid} for pid in provider_ids],
        )


def get_service(conn: Connection, service_id: str) -> ServiceRecord | None:
    rows = conn.execute(
        select(services).where(services.c.id == service_id, services.c.deleted_at.is_(None))
    ).all()
    return _records(conn, rows)[0] if rows else None


# The booking path's queries as text (a third of the cost of the same Core selects, measured).
_SERVICE_OFFERED = (
    "SELECT services.* FROM services JOIN service_providers"
    " ON service_providers.service_id = services.id"
    " WHERE services.id = :service_id AND services.deleted_at IS NULL"
    " AND service_providers.provider_id = :provider_id"
)
_SERVICE_RESOURCES = (
    "SELECT resource_id FROM service_resources WHERE service_id = :service_id ORDER BY resource_id"
)


def service_offered_by(conn: Connection, service_id: str, provider_id: str) -> ServiceRecord | None:
    """The live service if `provider_id` offers it (two queries: slot search and booking); its
    `provider_ids` holds only that provider."""
    parameters = {"service_id": service_id, "provider_id": provider_id}
    found = sql.mappings(conn, _SERVICE_OFFERED, parameters)
    if not found:
        return None
    needs = tuple(row[0] for row in sql.rows(conn, _SERVICE_RESOURCES, parameters))
    return _record(SimpleNamespace(**found[0]), (provider_id,), needs)


_USER_FIELDS = tuple(User.__dataclass_fields__)
# The booking path's first read, one round trip: the provider, the service (if the provider offers
# it and it is live) and its resources (a row each, or one row with NULL).
_PROVIDER_WITH_SERVICE = (
    "SELECT "
    + ", ".join(f"users.{name} AS user_{name}" for name in _USER_FIELDS)
    + ", services.*, service_resources.resource_id AS needs_resource_id"
    " FROM users JOIN service_providers ON service_providers.provider_id = users.id"
    " JOIN services ON services.id = service_providers.service_id"
    " LEFT JOIN service_resources ON service_resources.service_id = services.id"
    " WHERE users.id = :provider_id AND services.id = :service_id"
    " AND services.deleted_at IS NULL ORDER BY needs_resource_id"
)


def provider_with_service(
    conn: Connection, provider_id: str, service_id: str
) -> tuple[User, ServiceRecord] | None:
    """The user `provider_id` and the live service they offer, in one query; None if there is no
    such pair (the caller asks again, one by one, to say which part is missing)."""
    rows = sql.mappings(
        conn, _PROVIDER_WITH_SERVICE, {"provider_id": provider_id, "service_id": service_id}
    )
    if not rows:
        return None
    first = rows[0]
    user = User(*(first[f"user_{name}"] for name in _USER_FIELDS))
    needs = tuple(row["needs_resource_id"] for row in rows if row["needs_resource_id"] is not None)
    service_columns = {
        key: value
        for key, value in first.items()
        if not key.startswith("user_") and key != "needs_resource_id"
    }
    return user, _record(SimpleNamespace(**service_columns), (provider_id,), needs)


def list_services(
    conn: Connection, *, provider_id: str | None, after_id: str | None, limit: int
) -> list[ServiceRecord]:
    """Live services ordered by id, optionally of one provider, after a cursor."""
    query = select(services).where(services.c.deleted_at.is_(None))
    if provider_id is not None:
        query = query.where(
            services.c.id.in_(
                select(service_providers.c.service_id).where(
                    service_providers.c.provider_id == provider_id
                )
            )
        )
    if after_id is not None:
        query = query.where(services.c.id > after_id)
    rows = conn.execute(query.order_by(services.c.id).limit(limit)).all()
    return _records(conn, rows)


def update_service(
    conn: Connection,
    service_id: str,
    provider_ids: Sequence[str] | None,
    resource_ids: Sequence[str] | None = None,
    **changes: Any,
) -> ServiceRecord | None:
    if "rules" in changes:
        changes["rules"] = json.dumps(changes["rules"], sort_keys=True)
    if "notifications" in changes:
        changes["templates"] = json.dumps(changes.pop("notifications"), sort_keys=True)
    conn.execute(
        update(services)
        .where(services.c.id == service_id)
        .values(**changes, updated_at=int(time.time()))
    )
    if provider_ids is not None:
        _set_providers(conn, service_id, provider_ids)
    if resource_ids is not None:
        set_service_resources(conn, service_id, resource_ids)
    return get_service(conn, service_id)


def delete_service(conn: Connection, service_id: str) -> None:
    """Hide a service from listing and booking; appointments made with it keep referring to it."""
    conn.execute(
        update(services).where(services.c.id == service_id).values(deleted_at=int(time.time()))
    )


def provider_roles(conn: Connection, user_ids: Sequence[str]) -> dict[str, str]:
    """Role of each existing active user among `user_ids`."""
    rows = conn.execute(
        select(users.c.id, users.c.role).where(users.c.id.in_(user_ids), users.c.status == "active")
    )
    return {user_id: role for user_id, role in rows}
