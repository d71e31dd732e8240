"""Appointment rows, idempotency keys and outbox rows: the tables a booking writes besides its VEVENT."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from bookdav.storage import sql
from bookdav.storage.schema import appointments, idempotency_keys, outbox

# Statuses that hold time: every one of them blocks the slot.
HOLDING_STATUSES = ("confirmed",)


@dataclass(frozen=True)
class Appointment:
    id: str
    service_id: str
    provider_id: str
    client_id: str | None
    client_name: str
    client_email: str
    client_timezone: str
    start_utc: int
    end_utc: int
    timezone: str
    recurrence: str | None
    status: str
    notes: str
    event_uid: str
    event_href: str
    sequence: int
    confirmation_code: str
    manage_token: str
    cancellation_reason: str | None
    created_at: int
    updated_at: int
    # Recurring appointments: cancelled and moved occurrences, {"exdates": [...], "moved": {...}}.
    exceptions: str = "{}"
    # The client's answer to the invitation (an iMIP REPLY): NEEDS-ACTION until they answer.
    client_partstat: str = "NEEDS-ACTION"


_FIELDS = [f.name for f in fields(Appointment)]


def _from_row(row: Any) -> Appointment:
    return Appointment(**{name: row._mapping[name] for name in _FIELDS})


# On every booking: through the driver (storage.sql), a tenth of a Core insert's cost.
_INSERT_APPOINTMENT = f"INSERT INTO appointments ({', '.join(_FIELDS)}) VALUES ({', '.join(':' + n for n in _FIELDS)})"


def appointment_from_row(row: Any) -> Appointment:
    """An `Appointment` from a full row of `appointments` (for queries of other modules)."""
    return _from_row(row)


def insert_appointment(conn: Connection, appointment: Appointment) -> None:
    sql.execute(conn, _INSERT_APPOINTMENT, {n: getattr(appointment, n) for n in _FIELDS})


def get_appointment(conn: Connection, appointment_id: str) -> Appointment | None:
    row = conn.execute(select(appointments).where(appointments.c.id == appointment_id)).first()
    return _from_row(row) if row else None


def appointment_by_token(conn: Connection, manage_token: str) -> Appointment | None:
    row = conn.execute(
        select(appointments).where(appointments.c.manage_token == manage_token)
    ).first()
    return _from_row(row) if row else None


def update_appointment(conn: Connection, appointment_id: str, **changes: Any) -> Appointment:
    changes["updated_at"] = int(time.time())
    conn.execute(update(appointments).where(appointments.c.id == appointment_id).values(**changes))
    found = get_appointment(conn, appointment_id)
    assert found is not None
    return found


def group_members(
    conn: Connection, service_id: str, provider_id: str, start_utc: int
) -> list[Appointment]:
    """The appointments holding one group slot (same service, provider and start)."""
    rows = conn.execute(
        select(appointments)
        .where(
            appointments.c.service_id == service_id,
            appointments.c.provider_id == provider_id,
            appointments.c.start_utc == start_utc,
            appointments.c.status.in_(HOLDING_STATUSES),
        )
        .order_by(appointments.c.created_at, appointments.c.id)
    )
    return [_from_row(row) for row in rows]


def group_slots_with_room(
    conn: Connection, service: Any, provider: Any, capacity: int, span: tuple[int, int]
) -> list[tuple[int, int]]:
    """(start, end) of this service's group slots in `span` holding fewer than `capacity`."""
    rows = conn.execute(
        select(appointments.c.start_utc, appointments.c.end_utc, func.count())
        .where(
            appointments.c.service_id == service.id,
            appointments.c.provider_id == provider.id,
            appointments.c.status.in_(HOLDING_STATUSES),
            appointments.c.start_utc < span[1],
            appointments.c.end_utc > span[0],
        )
        .group_by(appointments.c.start_utc, appointments.c.end_utc)
    )
    return [(start, end) for start, end, taken in rows if taken < capacity]


def list_appointments(
    conn: Connection,
    *,
    provider_id: str | None,
    client_id: str | None,
    start_from: int | None,
    start_before: int | None,
    statuses: Sequence[str] | None,
    after: tuple[int, str] | None,
    limit: int,
) -> list[Appointment]:
    """Appointments by start time (then id), filtered, after a (start_utc, id) cursor."""
    query = select(appointments)
    if provider_id is not None:
        query = query.where(appointments.c.provider_id == provider_id)
    if client_id is not None:
        query = query.where(appointments.c.client_id == client_id)
    if start_from is not None:
        query = query.where(appointments.c.end_utc > start_from)
    if start_before is not None:
        query = query.where(appointments.c.start_utc < start_before)
    if statuses:
        query = query.where(appointments.c.status.in_(statuses))
    if after is not None:
        start, appointment_id = after
        query = query.where(
            (appointments.c.start_utc > start)
            | ((appointments.c.start_utc == start) & (appointments.c.id > appointment_id))
        )
    rows = conn.execute(query.order_by(appointments.c.start_utc, appointments.c.id).limit(limit))
    return [_from_row(row) for row in rows]


def count_appointments(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(appointments)).scalar_one())


# --- idempotency ---------------------------------------------------------------------------------


def stored_response(conn: Connection, scope: str) -> tuple[str, int, str] | None:
    """(request hash, status, response JSON) first given for this scope, if any."""
    row = conn.execute(
        select(
            idempotency_keys.c.request_hash, idempotency_keys.c.status, idempotency_keys.c.response
        ).where(idempotency_keys.c.scope == scope)
    ).first()
    return (row.request_hash, row.status, row.response) if row else None


def store_response(
    conn: Connection, scope: str, request_hash: str, status: int, response: str
) -> None:
    conn.execute(
        insert(idempotency_keys).values(
            scope=scope,
            request_hash=request_hash,
            status=status,
            response=response,
            created_at=int(time.time()),
        )
    )


# --- outbox --------------------------------------------------------------------------------------


_OUTBOX_COLUMNS = (
    "kind",
    "appointment_id",
    "payload",
    "status",
    "attempts",
    "next_attempt_at",
    "created_at",
    "dedupe_key",
)


def insert_outbox_rows(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
    """Outbox rows (dicts of `_OUTBOX_COLUMNS`) in one statement, in the caller's transaction; a
    row whose `dedupe_key` is already stored is skipped (ON CONFLICT DO NOTHING: two planners
    racing never fail a transaction). Returns how many were inserted."""
    if not rows:
        return 0
    values = ", ".join(
        "(" + ", ".join(f":{column}_{n}" for column in _OUTBOX_COLUMNS) + ")"
        for n in range(len(rows))
    )
    parameters = {
        f"{column}_{n}": row.get(column) for n, row in enumerate(rows) for column in _OUTBOX_COLUMNS
    }
    cursor = sql.execute(
        conn,
        f"INSERT INTO outbox ({', '.join(_OUTBOX_COLUMNS)}) VALUES {values}"
        " ON CONFLICT (dedupe_key) DO NOTHING",
        parameters,
    )
    return int(cursor.rowcount)


def outbox_row(
    kind: str,
    appointment_id: str | None,
    payload: Mapping[str, Any],
    *,
    now: int,
    due: int | None = None,
    dedupe_key: str | None = None,
) -> dict[str, Any]:
    """One pending outbox row, due at `due` (default: now)."""
    return {
        "kind": kind,
        "appointment_id": appointment_id,
        "payload": json.dumps(payload, sort_keys=True),
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now if due is None else due,
        "created_at": now,
        "dedupe_key": dedupe_key,
    }


def enqueue(
    conn: Connection, appointment_id: str | None, messages: Sequence[tuple[str, dict[str, Any]]]
) -> None:
    """Outbox rows `(kind, payload)`, written in the caller's transaction: delivered only if that
    commits."""
    now = int(time.time())
    insert_outbox_rows(
        conn, [outbox_row(kind, appointment_id, payload, now=now) for kind, payload in messages]
    )


def outbox_kinds(conn: Connection, appointment_id: str) -> list[str]:
    rows = conn.execute(
        select(outbox.c.kind).where(outbox.c.appointment_id == appointment_id).order_by(outbox.c.id)
    )
    return [kind for (kind,) in rows]
