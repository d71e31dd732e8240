"""`/api/v1/outbox`: what the outbox did with each notification (mail, reminder, webhook), so a
provider or an admin sees what failed and why. Read-only; an admin sees every row, a provider the
rows of their own appointments."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from sqlalchemy import Connection, select

from bookdav.booking.errors import InvalidInput
from bookdav.notify import outbox as worker
from bookdav.server.api import validation as v
from bookdav.server.auth import require_user
from bookdav.server.keys import DATABASE
from bookdav.storage.schema import appointments, outbox

routes = web.RouteTableDef()

STATUSES = (worker.PENDING, worker.SENDING, worker.SENT, worker.FAILED, worker.SUPERSEDED)


def outbox_json(row: Any) -> dict[str, Any]:
    payload = json.loads(row.payload)
    return {
        "outboxId": row.id,
        "kind": row.kind,
        "event": payload.get("event"),
        "appointmentId": row.appointment_id,
        "status": row.status,
        "attempts": row.attempts,
        "lastError": row.last_error,
        "nextAttemptAt": row.next_attempt_at,
        "createdAt": row.created_at,
    }


def rows_for(
    conn: Connection,
    provider_id: str | None,
    status: str | None,
    appointment_id: str | None,
    after_id: int,
    limit: int,
) -> list[Any]:
    query = (
        select(outbox)
        .select_from(outbox.outerjoin(appointments, appointments.c.id == outbox.c.appointment_id))
        .where(outbox.c.id > after_id)
    )
    if provider_id is not None:
        query = query.where(appointments.c.provider_id == provider_id)
    if status is not None:
        query = query.where(outbox.c.status == status)
    if appointment_id is not None:
        query = query.where(outbox.c.appointment_id == appointment_id)
    return list(conn.execute(query.order_by(outbox.c.id).limit(limit)))


@routes.get("/api/v1/outbox")
async def list_outbox(request: web.Request) -> web.Response:
    actor = await require_user(request, "provider", "admin")
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidInput("status", f"must be one of {', '.join(STATUSES)}")
    limit = v.query_int(request, "limit", default=50, minimum=1, maximum=200)
    after = v.query_int(request, "cursor", default=0, minimum=0, maximum=2**62)
    found = await request.app[DATABASE].run_read(
        rows_for,
        None if actor.role == "admin" else actor.id,
        status,
        request.query.get("appointmentId") or None,
        after,
        limit + 1,
    )
    page = found[:limit]
    next_cursor = page[-1].id if len(found) > limit else None
    return web.json_response(
        {"items": [outbox_json(row) for row in page], "nextCursor": next_cursor}
    )
