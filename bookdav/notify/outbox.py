"""The outbox worker: delivers the `outbox` rows bookings write, at least once, with retries.

A pass claims due rows in one short write transaction (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so
several processes share the work without waiting on each other; SQLite: the single writer makes
the plain select safe) and leases them (`status='sending'`, `next_attempt_at = now + lease`). Mail
is built and sent outside any transaction; then the row is marked `sent`, or retried later with
exponential backoff and jitter, or `failed` after `MAX_ATTEMPTS`. A process that dies mid-send
leaves a lease that expires, and the next pass sends again: a duplicate is possible, a loss is
not (the Message-ID is stable per row, so a duplicate is recognisable).

A row older than its appointment's current SEQUENCE is `superseded`, not sent: its appointment
row now describes a later state, and the newer row (written in the same transaction as that
state) carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select, update

from bookdav.config import Settings
from bookdav.logs import log_event
from bookdav.notify import imip
from bookdav.notify.delivery import Transport, transport_for
from bookdav.storage import appointments as appointment_store
from bookdav.storage.db import Database
from bookdav.storage.schema import outbox, services
from bookdav.storage.users import user_by_id

log = logging.getLogger("bookdav.outbox")

MAX_ATTEMPTS = 10
# Retry n (1-based) waits about RETRY_BASE_SECONDS * RETRY_FACTOR**(n-1), capped: 5 s, 20 s,
# 80 s, ~5 min, ~21 min, ~1.4 h, then 6 h; ten attempts span about a day of mail outage.
RETRY_BASE_SECONDS = 5.0
RETRY_FACTOR = 4.0
RETRY_MAX_SECONDS = 6 * 3600.0
# How long a claimed row belongs to its worker; past it another pass may send it again.
LEASE_SECONDS = 300
BATCH_SIZE = 20
POLL_SECONDS = 0.5
# After a pass fails as a whole (database away), wait longer before the next one.
ERROR_PAUSE_SECONDS = 5.0
MAX_ERROR_CHARS = 1000

PENDING, SENDING, SENT, FAILED, SUPERSEDED = "pending", "sending", "sent", "failed", "superseded"


@dataclass(frozen=True)
class Claimed:
    """A leased outbox row; `attempts` counts this attempt and fences later updates."""

    id: int
    kind: str
    appointment_id: str | None
    payload: dict[str, Any]
    attempts: int


def _due(now: int) -> Any:
    # An expired lease ('sending' past next_attempt_at) is due again: its worker is gone.
    return outbox.c.status.in_((PENDING, SENDING)) & (outbox.c.next_attempt_at <= now)


def any_due(conn: Connection, now: int) -> bool:
    """Whether a pass has work: a cheap read, so idle polling never takes the write lock."""
    return conn.execute(select(outbox.c.id).where(_due(now)).limit(1)).first() is not None


def claim_due(
    conn: Connection, now: int, limit: int = BATCH_SIZE, lease_seconds: int = LEASE_SECONDS
) -> list[Claimed]:
    """Lease up to `limit` due rows, oldest first, counting the attempt now (so a message that
    kills its worker every time still ends up failed)."""
    rows = conn.execute(
        select(
            outbox.c.id, outbox.c.kind, outbox.c.appointment_id, outbox.c.payload, outbox.c.attempts
        )
        .where(_due(now))
        .order_by(outbox.c.next_attempt_at, outbox.c.id)
        .limit(limit)
        # SQLite renders no FOR UPDATE; there the transaction is the only writer anyway.
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return []
    conn.execute(
        update(outbox)
        .where(outbox.c.id.in_([row.id for row in rows]))
        .values(
            status=SENDING,
            attempts=outbox.c.attempts + 1,
            next_attempt_at=now + lease_seconds,
        )
    )
    return [
        Claimed(row.id, row.kind, row.appointment_id, json.loads(row.payload), row.attempts + 1)
        for row in rows
    ]


def finish(
    conn: Connection,
    claimed: Claimed,
    status: str,
    *,
    error: str | None = None,
    next_attempt_at: int | None = None,
) -> bool:
    """Record the outcome if this worker still holds the lease (status and attempt unchanged);
    False when another pass took the row over after the lease expired."""
    values: dict[str, Any] = {"status": status, "last_error": error}
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    result = conn.execute(
        update(outbox)
        .where(
            outbox.c.id == claimed.id,
            outbox.c.status == SENDING,
            outbox.c.attempts == claimed.attempts,
        )
        .values(**values)
    )
    return bool(result.rowcount)


def load_contexts(conn: Connection, appointment_ids: Sequence[str]) -> dict[str, imip.Context]:
    """Appointment, provider and service name of each id (a deleted service still has a name)."""
    found: dict[str, imip.Context] = {}
    for appointment_id in set(appointment_ids):
        appointment = appointment_store.get_appointment(conn, appointment_id)
        if appointment is None:
            continue
        provider = user_by_id(conn, appointment.provider_id)
        service_name = conn.execute(
            select(services.c.name).where(services.c.id == appointment.service_id)
        ).scalar_one_or_none()
        if provider is not None and service_name is not None:
            found[appointment_id] = imip.Context(appointment, provider, service_name)
    return found


def retry_delay_seconds(attempts: int, rng: random.Random | None = None) -> int:
    """Backoff after the `attempts`-th failure, with jitter (half to all of the nominal wait), so
    messages that failed together do not all come back at the same moment."""
    nominal = min(RETRY_BASE_SECONDS * RETRY_FACTOR ** max(attempts - 1, 0), RETRY_MAX_SECONDS)
    return max(1, math.ceil(nominal * (rng or random).uniform(0.5, 1.0)))


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


async def run_once(
    database: Database,
    settings: Settings,
    *,
    transport: Transport | None = None,
    now: int | None = None,
) -> int:
    """Deliver every row due now, batch by batch; returns how many messages were sent."""
    transport = transport or transport_for(settings)
    sent = 0
    while True:
        moment = int(time.time()) if now is None else now
        claimed = await database.run_write(claim_due, moment)
        if not claimed:
            return sent
        ids = [c.appointment_id for c in claimed if c.appointment_id]
        contexts = await database.run_read(load_contexts, ids)
        for row in claimed:
            try:
                sent += await _deliver(database, settings, transport, row, contexts, moment)
            except Exception:
                # Only bookkeeping can fail here (sending errors are handled inside): the row
                # keeps its lease and is retried when it expires; the rest of the batch goes on.
                log.exception("outbox row %s: delivery bookkeeping failed", row.id)
        if len(claimed) < BATCH_SIZE:
            return sent


async def _deliver(
    database: Database,
    settings: Settings,
    transport: Transport,
    row: Claimed,
    contexts: dict[str, imip.Context],
    now: int,
) -> bool:
    fields: dict[str, Any] = {
        "outbox_id": row.id,
        "kind": row.kind,
        "outbox_event": row.payload.get("event"),
        "appointment_id": row.appointment_id,
        "attempt": row.attempts,
    }
    context = contexts.get(row.appointment_id or "")
    if context is None:
        error = f"appointment {row.appointment_id} (or its provider or service) is gone"
        await database.run_write(finish, row, FAILED, error=error)
        log_event(log, "mail not sent", logging.WARNING, **fields, status=FAILED, error=error)
        return False
    current = context.appointment.sequence
    if int(row.payload.get("sequence", current)) < current:
        await database.run_write(finish, row, SUPERSEDED, error=f"superseded by sequence {current}")
        log_event(log, "mail superseded", **fields, sequence=current)
        return False
    try:
        outgoing = imip.build(
            row.kind,
            context,
            row.payload,
            outbox_id=row.id,
            from_address=settings.get("mail", "from_address"),
            base_url=settings.public_base_url,
        )
        fields.update(to=",".join(outgoing.recipients), message_id=outgoing.message_id)
        await transport.send(outgoing.message, outgoing.sender, outgoing.recipients)
    except Exception as exc:
        await _failed(database, row, exc, now, fields)
        return False
    await database.run_write(finish, row, SENT)
    log_event(log, "mail sent", **fields, transport=transport.description)
    return True


async def _failed(
    database: Database, row: Claimed, exc: Exception, now: int, fields: dict[str, Any]
) -> None:
    error = _error_text(exc)
    if isinstance(exc, imip.Undeliverable) or row.attempts >= MAX_ATTEMPTS:
        await database.run_write(finish, row, FAILED, error=error)
        log_event(log, "mail failed", logging.ERROR, **fields, status=FAILED, error=error)
        return
    retry_at = now + retry_delay_seconds(row.attempts)
    await database.run_write(finish, row, PENDING, error=error, next_attempt_at=retry_at)
    log_event(log, "mail deferred", logging.WARNING, **fields, error=error, retry_in=retry_at - now)


async def run_worker(
    database: Database,
    settings: Settings,
    wake: asyncio.Event | None = None,
    poll_seconds: float = POLL_SECONDS,
) -> None:
    """Poll for due rows until cancelled; `wake.set()` starts a pass at once."""
    wake = wake or asyncio.Event()
    transport = transport_for(settings)
    log_event(log, "outbox worker started", transport=transport.description)
    while True:
        pause = poll_seconds
        try:
            if await database.run_read(any_due, int(time.time())):
                await run_once(database, settings, transport=transport)
        except Exception:
            # The task must outlive a database hiccup; leased rows come back when leases expire.
            log.exception("outbox pass failed")
            pause = ERROR_PAUSE_SECONDS
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), pause)
        wake.clear()
