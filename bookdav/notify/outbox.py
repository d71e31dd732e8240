"""The outbox worker: delivers the `outbox` rows bookings write, at least once, with retries.

A pass claims due rows in one short write transaction (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so
several processes share the work without waiting on each other; SQLite: the single writer makes
the plain select safe) and leases them (`status='sending'`, `next_attempt_at = now + lease`). Mail
(or a webhook, or a remote calendar write: `handlers()` maps each row's kind to the coroutine that
delivers it) is built and sent outside any transaction; then the row is marked `sent`, or retried later with
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select, update

from bookdav.config import Settings
from bookdav.logs import log_event
from bookdav.notify import imip
from bookdav.notify.delivery import Transport, transport_for
from bookdav.notify.errors import Superseded, Undeliverable
from bookdav.storage.db import Database
from bookdav.storage.schema import outbox

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
# How often the worker plans the reminders of recurring series (the window is two days wide).
PLAN_INTERVAL_SECONDS = 600

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


def due_rows(status: str, now: int, limit: int) -> Any:
    """The oldest `limit` due rows of one status, locked (skipping rows another worker holds):
    an index range scan in the index's order that stops after `limit` rows."""
    return (
        select(
            outbox.c.id, outbox.c.kind, outbox.c.appointment_id, outbox.c.payload, outbox.c.attempts
        )
        .where(outbox.c.status == status, outbox.c.next_attempt_at <= now)
        .order_by(outbox.c.next_attempt_at, outbox.c.id)
        .limit(limit)
        # SQLite renders no FOR UPDATE; there the transaction is the only writer anyway.
        .with_for_update(skip_locked=True)
    )


def claim_due(
    conn: Connection, now: int, limit: int = BATCH_SIZE, lease_seconds: int = LEASE_SECONDS
) -> list[Claimed]:
    """Lease up to `limit` due rows, oldest first, counting the attempt now (so a message that
    kills its worker every time still ends up failed). Expired leases (a worker died) come
    before pending rows.

    Each status is read on its own, in the order of the `(status, next_attempt_at)` index: the
    two together (`status IN (...) ORDER BY next_attempt_at`) made the database sort every due
    row to find the oldest twenty (SQLite's plan: a temp B-tree; PostgreSQL's: a sequential scan
    and a sort), under the write lock, and after a rush of bookings tens of thousands are due."""
    rows: list[Any] = []
    for status in (SENDING, PENDING):
        if len(rows) < limit:
            rows += conn.execute(due_rows(status, now, limit - len(rows))).all()
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


def retry_delay_seconds(attempts: int, rng: random.Random | None = None) -> int:
    """Backoff after the `attempts`-th failure, with jitter (half to all of the nominal wait), so
    messages that failed together do not all come back at the same moment."""
    nominal = min(RETRY_BASE_SECONDS * RETRY_FACTOR ** max(attempts - 1, 0), RETRY_MAX_SECONDS)
    return max(1, math.ceil(nominal * (rng or random).uniform(0.5, 1.0)))


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


@dataclass
class Job:
    """One claimed row on its way out, with what a handler needs to deliver it. A handler adds
    what it learns (recipient, message id) to `fields`, which the outcome's log line carries."""

    row: Claimed
    database: Database
    settings: Settings
    transport: Transport
    now: int
    fields: dict[str, Any]
    # The rows claimed with this one, and a dict the batch's handlers share: a handler may read
    # what all of them need once (mail reads every message's appointment in one statement).
    batch: list[Claimed] = field(default_factory=list)
    batch_memo: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Job], Awaitable[None]]


def handlers() -> dict[str, Handler]:
    """Outbox kind -> the coroutine that delivers it. A handler returns on success, raises
    `Superseded` or `Undeliverable`, and any other exception means "retry later"."""
    from bookdav.notify import mail, plan, webhook
    from bookdav.sync import push

    return {
        imip.CLIENT_IMIP: mail.deliver,
        imip.PROVIDER_NOTICE: mail.deliver,
        push.KIND: push.deliver,
        imip.CLIENT_REMINDER: mail.deliver,
        plan.WEBHOOK: webhook.deliver,
    }


async def run_once(
    database: Database,
    settings: Settings,
    *,
    transport: Transport | None = None,
    now: int | None = None,
) -> int:
    """Deliver every row due now, batch by batch; returns how many rows were delivered."""
    transport = transport or transport_for(settings)
    table = handlers()
    delivered = 0
    while True:
        moment = int(time.time()) if now is None else now
        claimed = await database.run_write(claim_due, moment)
        if not claimed:
            return delivered
        memo: dict[str, Any] = {}
        for row in claimed:
            job = Job(row, database, settings, transport, moment, _fields(row), claimed, memo)
            try:
                delivered += await _deliver(job, table.get(row.kind))
            except Exception:
                # Only bookkeeping can fail here (delivery errors are handled inside): the row
                # keeps its lease and is retried when it expires; the rest of the batch goes on.
                log.exception("outbox row %s: delivery bookkeeping failed", row.id)
        if len(claimed) < BATCH_SIZE:
            return delivered


def _fields(row: Claimed) -> dict[str, Any]:
    return {
        "outbox_id": row.id,
        "kind": row.kind,
        "outbox_event": row.payload.get("event"),
        "appointment_id": row.appointment_id,
        "attempt": row.attempts,
    }


async def _deliver(job: Job, handler: Handler | None) -> bool:
    row, database, fields = job.row, job.database, job.fields
    try:
        if handler is None:
            raise Undeliverable(f"no handler for outbox kind {row.kind!r}")
        await handler(job)
    except Superseded as exc:
        await database.run_write(finish, row, SUPERSEDED, error=str(exc))
        log_event(log, "outbox row superseded", **fields, reason=str(exc))
        return False
    except Exception as exc:
        await _failed(job, exc)
        return False
    await database.run_write(finish, row, SENT)
    log_event(log, "outbox row delivered", **fields)
    return True


async def _failed(job: Job, exc: Exception) -> None:
    row, fields = job.row, job.fields
    error = _error_text(exc)
    max_attempts = job.settings.get("mail", "max_attempts") or MAX_ATTEMPTS
    if isinstance(exc, Undeliverable) or row.attempts >= max_attempts:
        await job.database.run_write(finish, row, FAILED, error=error)
        log_event(log, "outbox row failed", logging.ERROR, **fields, status=FAILED, error=error)
        return
    retry_at = job.now + retry_delay_seconds(row.attempts)
    await job.database.run_write(finish, row, PENDING, error=error, next_attempt_at=retry_at)
    log_event(
        log,
        "outbox row deferred",
        logging.WARNING,
        **fields,
        error=error,
        retry_in=retry_at - job.now,
    )


async def plan_reminders_pass(database: Database, batch_size: int = 50) -> int:
    """Plan the reminders of recurring series that entered the planning window (idempotent), in
    short write transactions of `batch_size` series, so bookings queue behind none of them long."""
    from bookdav.notify import plan

    now = int(time.time())
    series = await database.run_read(plan.series_to_plan, now)
    planned = 0
    for start in range(0, len(series), batch_size):
        planned += await database.run_write(
            plan.plan_series_batch, series[start : start + batch_size], now
        )
    if planned:
        log_event(log, "reminders planned", count=planned)
    return planned


async def run_worker(
    database: Database,
    settings: Settings,
    wake: asyncio.Event | None = None,
    poll_seconds: float = POLL_SECONDS,
) -> None:
    """Poll for due rows until cancelled; `wake.set()` starts a pass at once. Every
    `PLAN_INTERVAL_SECONDS` it also plans the reminders of recurring series."""
    wake = wake or asyncio.Event()
    transport = transport_for(settings)
    log_event(log, "outbox worker started", transport=transport.description)
    planned_at = 0.0
    while True:
        pause = poll_seconds
        try:
            if time.monotonic() - planned_at >= PLAN_INTERVAL_SECONDS:
                planned_at = time.monotonic()
                await plan_reminders_pass(database)
            if await database.run_read(any_due, int(time.time())):
                await run_once(database, settings, transport=transport)
        except Exception:
            # The task must outlive a database hiccup; leased rows come back when leases expire.
            log.exception("outbox pass failed")
            pause = ERROR_PAUSE_SECONDS
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), pause)
        wake.clear()
