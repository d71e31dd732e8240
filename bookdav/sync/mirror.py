"""Remote events as busy blocks in the provider's read-only mirror calendar.

A remote object becomes a copy that keeps only what decides time: DTSTART, DTEND/DURATION,
RRULE/RDATE/EXDATE, RECURRENCE-ID overrides, TRANSP and STATUS (the occurrence index makes
transparent and cancelled instances free), and the time zones they use; SUMMARY is "Busy" unless
the provider opted in to titles. Its UID is derived from the remote UID, its href from the
remote href, so the same remote event always lands on the same mirror item.

`prepare` converts and parses a pull's objects with no lock held; `apply` writes them into the
mirror in the caller's transaction (the provider's lock held):
items written through `bookdav.storage.calendars`, so the occurrence index, the collection's
revision and sync tokens move together and CalDAV clients see the change. An object that cannot
be read is skipped and logged, and its previous mirror (if any) stays.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import icalendar
import vobject
from sqlalchemy import Connection

from bookdav.logs import log_event
from bookdav.storage import calendars
from bookdav.sync import store
from bookdav.sync.sources import Changes, RemoteObject
from bookdav.sync.store import ExternalCalendar

log = logging.getLogger("bookdav.sync")

# Properties of a remote VEVENT the mirror keeps: they decide when the provider is busy.
TIME_PROPERTIES = (
    "DTSTART",
    "DTEND",
    "DURATION",
    "RRULE",
    "RDATE",
    "EXDATE",
    "RECURRENCE-ID",
    "TRANSP",
    "STATUS",
)
OWN_UID_SUFFIX = "@bookdav"  # appointments bookdav pushed to a destination come back here


class Unusable(ValueError):
    """A remote object the mirror cannot use (unparseable, no UID, no DTSTART)."""


@dataclass
class Applied:
    written: int = 0
    deleted: int = 0
    skipped: list[str] = field(default_factory=list)
    # (remote href, ETag, mirror href) seen by this pull, recorded in bulk at its end.
    seen: list[tuple[str, str, str]] = field(default_factory=list)


def mirror_uid(source: ExternalCalendar, remote_uid: str) -> str:
    digest = hashlib.sha256(f"{source.id}\n{remote_uid}".encode()).hexdigest()[:32]
    return f"{digest}@sync.bookdav"


def mirror_href(source: ExternalCalendar, remote_href: str) -> str:
    return hashlib.sha256(f"{source.id}\n{remote_href}".encode()).hexdigest()[:32] + ".ics"


def busy_block(source: ExternalCalendar, text: str) -> tuple[str, str] | None:
    """(mirror UID, mirror text) for a remote object; None if it holds no event to mirror (a
    task, or an appointment bookdav itself pushed). Raises `Unusable`."""
    try:
        remote = icalendar.Calendar.from_ical(text)
    except ValueError as exc:
        raise Unusable(f"unparseable: {exc}") from exc
    events = list(remote.walk("VEVENT"))
    if not events:
        return None
    remote_uid = str(events[0].get("UID") or "")
    if not remote_uid:
        raise Unusable("VEVENT without UID")
    if remote_uid.endswith(OWN_UID_SUFFIX):
        return None
    uid = mirror_uid(source, remote_uid)
    mirrored = icalendar.Calendar()
    mirrored.add("prodid", "-//bookdav//external calendar mirror//EN")
    mirrored.add("version", "2.0")
    for timezone in remote.walk("VTIMEZONE"):
        mirrored.add_component(timezone)
    for event in events:
        if "DTSTART" not in event:
            raise Unusable(f"VEVENT {remote_uid!r} without DTSTART")
        copy = icalendar.Event()
        copy.add("uid", uid)
        stamp = event.get("DTSTAMP")
        copy.add("dtstamp", stamp.dt if stamp is not None else dt.datetime.now(dt.UTC))
        for name in TIME_PROPERTIES:
            if name in event:
                copy[name] = event[name]
        summary = str(event.get("SUMMARY") or "") if source.show_titles else ""
        copy.add("summary", summary or "Busy")
        copy.add("class", "PRIVATE" if not source.show_titles else "PUBLIC")
        mirrored.add_component(copy)
    return uid, mirrored.to_ical().decode()


@dataclass
class Prepared:
    """A remote object turned into its mirror copy, parsed, before any lock is taken."""

    remote: RemoteObject
    uid: str = ""  # empty: nothing to mirror (a task, bookdav's own appointment)
    text: str = ""
    calendar: Any = None
    error: str = ""


def prepare(source: ExternalCalendar, changes: Changes) -> list[Prepared]:
    """Convert and parse every changed object: the CPU-heavy part of a pull (about 1.5 ms an
    event), done outside the transaction so the provider's lock is held only for the writes."""
    prepared = []
    for remote in changes.changed:
        try:
            block = busy_block(source, remote.text)
            if block is None:
                prepared.append(Prepared(remote))
                continue
            uid, text = block
            prepared.append(Prepared(remote, uid, text, vobject.readOne(text)))
        except (Unusable, vobject.base.ParseError, ValueError) as exc:
            prepared.append(Prepared(remote, error=f"{type(exc).__name__}: {exc}"[:300]))
    return prepared


def apply(
    conn: Connection, source: ExternalCalendar, changes: Changes, prepared: list[Prepared], now: int
) -> Applied:
    """Write one pull into the mirror calendar; the caller holds the provider's lock."""
    applied = Applied()
    path = source.collection_path
    if not path:
        raise ValueError(f"external calendar {source.id} has no mirror calendar")
    collection = calendars.get_collection(conn, path)
    if collection is None:  # re-create a mirror that went missing; the pull refills it
        collection = calendars.create_collection(
            conn,
            path,
            {
                "tag": "VCALENDAR",
                "D:displayname": store.mirror_name(source.url, source.type),
                "C:supported-calendar-component-set": "VEVENT",
            },
            now=now,
        )
    known = store.known_items(conn, source.id)
    for remote_href in changes.removed:
        item = known.get(remote_href)
        if item is None:
            continue
        if item.local_href and calendars.delete_item(conn, collection, item.local_href, now=now):
            applied.deleted += 1
        store.forget_item(conn, source.id, remote_href)
    for one in prepared:
        _mirror_one(conn, source, collection, one, known.get(one.remote.href), applied, now)
    store.remember_items(conn, source.id, applied.seen)
    return applied


def _mirror_one(
    conn: Connection,
    source: ExternalCalendar,
    collection: calendars.Collection,
    one: Prepared,
    previous: store.KnownItem | None,
    applied: Applied,
    now: int,
) -> None:
    remote = one.remote
    error = one.error
    if not error and not one.uid:
        if previous is not None and previous.local_href:
            calendars.delete_item(conn, collection, previous.local_href, now=now)
            applied.deleted += 1
        applied.seen.append((remote.href, remote.etag, ""))
        return
    href = mirror_href(source, remote.href)
    if not error:
        try:
            calendars.put_item(
                conn, collection, href, one.text, calendar=one.calendar, uid=one.uid, now=now
            )
        except (calendars.UidConflict, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
    if error:
        # One odd event must not stop the pull: skip it (its previous mirror stays), say why.
        applied.skipped.append(remote.href)
        log_event(
            log,
            "remote event skipped",
            logging.WARNING,
            source_id=source.id,
            provider=source.provider_username,
            remote_href=remote.href,
            reason=error,
        )
        return
    applied.seen.append((remote.href, remote.etag, href))
    applied.written += 1
