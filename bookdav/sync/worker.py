"""Pulling busy sources: one cycle per source, and the interval loop inside `bookdav serve`.

A cycle claims the source (compare-and-set on `next_run_at`, so two processes never pull one
source at once), reads what the mirror knows, asks the remote for what changed (no transaction
open meanwhile), then writes the mirror, the new sync state and `last_success_at` in ONE write
transaction under the provider's lock: a failure anywhere leaves the mirror and the state as
they were, and the next cycle asks again from the same point. Failures are counted, the error is
kept in `last_error`, and the next try backs off exponentially (30 s doubling, at most an hour).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from sqlalchemy import Connection

from bookdav.config import Settings
from bookdav.logs import log_event
from bookdav.storage.db import Database
from bookdav.sync import crypto, mirror, sources, store
from bookdav.sync.store import ExternalCalendar

log = logging.getLogger("bookdav.sync")

LEASE_SECONDS = 600
RETRY_BASE_SECONDS = 30
RETRY_MAX_SECONDS = 3600
POLL_SECONDS = 5.0
MAX_ERROR_CHARS = 500


@dataclass
class CycleReport:
    """What one pull of one source did, for the log, the CLI and the API."""

    source_id: str
    provider: str
    type: str
    url: str
    ok: bool
    written: int = 0
    deleted: int = 0
    skipped: int = 0
    requests: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    remote_seconds: float = 0.0  # of `seconds`, waiting for the remote
    error: str | None = None
    failures: int = 0
    next_run_at: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "written": self.written,
            "deleted": self.deleted,
            "skipped": self.skipped,
            "requests": self.requests,
            "bytesReceived": self.bytes_received,
            "seconds": round(self.seconds, 3),
            "remoteSeconds": round(self.remote_seconds, 3),
            "error": self.error,
        }

    def line(self) -> str:
        head = f"{self.provider} {self.source_id[:8]} {self.type} {self.url}:"
        traffic = f"{self.requests} requests, {self.bytes_received} bytes, {self.seconds:.2f} s"
        if self.ok:
            return (
                f"{head} ok: {self.written} written, {self.deleted} removed, "
                f"{self.skipped} skipped; {traffic}"
            )
        return f"{head} FAILED ({self.failures} in a row, next try in {self.next_in()} s): {self.error}; {traffic}"

    def next_in(self) -> int:
        return max(0, self.next_run_at - int(time.time()))


def retry_delay_seconds(failures: int) -> int:
    return int(min(RETRY_BASE_SECONDS * 2 ** max(failures - 1, 0), RETRY_MAX_SECONDS))


async def sync_source(
    database: Database,
    settings: Settings,
    source: ExternalCalendar,
    *,
    session: aiohttp.ClientSession | None = None,
) -> CycleReport:
    """Pull one (claimed) busy source into its mirror and record the outcome; never raises for
    a remote's fault."""
    started = time.perf_counter()
    report = CycleReport(
        source.id, source.provider_username, source.type, sources.safe_url(source.url), ok=False
    )
    owned_session = session is None
    session = session or sources.new_session(allow_private_networks=settings.allow_private_networks)
    client: sources.Client | None = None
    try:
        credentials = crypto.decrypt_credentials(
            settings.get("sync", "secret_key"), source.credentials
        )
        client = sources.Client(
            session,
            sources.Credentials.from_dict(credentials),
            allow_private_networks=settings.allow_private_networks,
        )
        known = await database.run_read(
            lambda conn: {h: k.etag for h, k in store.known_items(conn, source.id).items()}
        )
        pull = sources.pull_feed if source.type == "ics" else sources.pull_caldav
        asked = time.perf_counter()
        changes = await pull(client, source.url, source.state, known)
        report.remote_seconds = time.perf_counter() - asked
        prepared = await asyncio.to_thread(mirror.prepare, source, changes)
        now = int(time.time())
        interval = settings.get("sync", "interval_seconds")

        def unit(conn: Connection) -> mirror.Applied:
            applied = mirror.apply(conn, source, changes, prepared, now)
            state = {**changes.state, **store.kept_state(source.state)}
            store.record_success(conn, source.id, state, now, now + interval)
            return applied

        applied = await database.run_write(unit, principals=[source.provider_username])
        report.ok = True
        report.written, report.deleted = applied.written, applied.deleted
        report.skipped = len(applied.skipped)
        report.next_run_at = now + interval
    except (
        sources.RemoteError,
        crypto.MissingSecretKey,
        crypto.UnreadableCredentials,
        aiohttp.ClientError,
        TimeoutError,
        ValueError,
    ) as exc:
        await _failed(database, source, report, exc)
    except Exception as exc:  # a bug or the database: still recorded, and logged with a trace
        log.exception("sync cycle failed", extra={"fields": {"source_id": source.id}})
        with contextlib.suppress(Exception):
            await _failed(database, source, report, exc)
    finally:
        if owned_session:
            await session.close()
    if client is not None:
        report.requests = client.traffic.requests
        report.bytes_received = client.traffic.bytes_received
    report.seconds = time.perf_counter() - started
    if report.ok:
        log_event(
            log,
            "external calendar pulled",
            source_id=source.id,
            provider=source.provider_username,
            type=source.type,
            url=report.url,
            written=report.written,
            deleted=report.deleted,
            skipped=report.skipped,
            requests=report.requests,
            bytes=report.bytes_received,
            seconds=round(report.seconds, 3),
        )
    return report


async def _failed(
    database: Database, source: ExternalCalendar, report: CycleReport, exc: BaseException
) -> None:
    error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    failures = source.failures + 1
    next_run_at = int(time.time()) + retry_delay_seconds(failures)
    report.failures = await database.run_write(store.record_failure, source.id, error, next_run_at)
    report.error, report.next_run_at = error, next_run_at
    log_event(
        log,
        "external calendar pull failed",
        logging.WARNING,
        source_id=source.id,
        provider=source.provider_username,
        type=source.type,
        url=report.url,
        error=error,
        failures=report.failures,
        retry_in=next_run_at - int(time.time()),
    )


async def claim_and_sync(
    database: Database,
    settings: Settings,
    source: ExternalCalendar,
    *,
    session: aiohttp.ClientSession | None = None,
) -> CycleReport | None:
    """Claim `source` as read and pull it; None if another process claimed it first."""
    lease_until = int(time.time()) + LEASE_SECONDS
    if not await database.run_write(store.claim, source, lease_until):
        return None
    return await sync_source(database, settings, source, session=session)


async def run_now(
    database: Database,
    settings: Settings,
    calendar_id: str,
    *,
    session: aiohttp.ClientSession | None = None,
) -> CycleReport | None:
    """Pull one source now, due or not (the API's "sync now", `bookdav sync run`); None if it is
    gone. It is claimed like any pull; a worker pulling it at the same moment is harmless: both
    apply under the provider's lock and the mirror's writes are idempotent."""
    for _attempt in range(3):
        source = await database.run_read(store.get_external_calendar, calendar_id)
        if source is None or source.role != "busy":
            return None
        report = await claim_and_sync(database, settings, source, session=session)
        if report is not None:
            return report
    return None


async def run_cycle(
    database: Database, settings: Settings, *, username: str | None = None
) -> list[CycleReport]:
    """Pull every busy source (of one provider), due or not: `bookdav sync run`."""
    found = await database.run_read(lambda conn: store.busy_sources(conn, username=username))
    reports = []
    async with sources.new_session(
        allow_private_networks=settings.allow_private_networks
    ) as session:
        for source in found:
            report = await run_now(database, settings, source.id, session=session)
            if report is not None:
                reports.append(report)
    return reports


async def run_due(database: Database, settings: Settings, now: int | None = None) -> int:
    """Pull the sources due now; returns how many were pulled."""
    now = int(time.time()) if now is None else now
    due = await database.run_read(store.due_sources, now)
    pulled = 0
    if not due:
        return 0
    async with sources.new_session(
        allow_private_networks=settings.allow_private_networks
    ) as session:
        for source in due:
            if await claim_and_sync(database, settings, source, session=session) is not None:
                pulled += 1
    return pulled


async def run_worker(
    database: Database, settings: Settings, poll_seconds: float = POLL_SECONDS
) -> None:
    """Pull due sources until cancelled."""
    poll = min(poll_seconds, math.ceil(settings.get("sync", "interval_seconds") / 2))
    log_event(log, "sync worker started", interval=settings.get("sync", "interval_seconds"))
    while True:
        try:
            await run_due(database, settings)
        except Exception:
            # The task must outlive a database hiccup: a claimed source's lease expires.
            log.exception("sync pass failed")
        await asyncio.sleep(poll)
