"""The rows of external calendars: create, list, claim for a pull, record the outcome.

Plain functions over a SQLAlchemy `Connection`, like `bookdav.storage`. A busy source owns a
read-only mirror calendar at `<username>/ext-<id>`; deleting the source deletes the mirror. A
worker claims a due source by moving its `next_run_at` forward with a compare-and-set, so two
processes sharing the database never pull the same source at once.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from bookdav.storage import calendars
from bookdav.storage.schema import external_calendars, external_items, users
from bookdav.storage.users import User
from bookdav.sync.sources import safe_url

TYPES = ("caldav", "ics")
ROLES = ("busy", "destination")
MIRROR_PREFIX = "ext-"


@dataclass(frozen=True)
class ExternalCalendar:
    id: str
    provider_id: str
    provider_username: str
    type: str
    url: str
    role: str
    credentials: str | None
    show_titles: bool
    collection_path: str | None
    state: dict[str, Any]
    last_success_at: int | None
    last_error: str | None
    failures: int
    next_run_at: int
    created_at: int

    @property
    def short_id(self) -> str:
        return self.id.replace("-", "")[:12]


@dataclass(frozen=True)
class KnownItem:
    """What the last pull saw at a remote href: its ETag and the mirror item it became."""

    etag: str
    local_href: str


_COLUMNS = (*external_calendars.c, users.c.username)


def _from_row(row: Any) -> ExternalCalendar:
    m = row._mapping
    return ExternalCalendar(
        id=m["id"],
        provider_id=m["provider_id"],
        provider_username=m["username"],
        type=m["type"],
        url=m["url"],
        role=m["role"],
        credentials=m["credentials"],
        show_titles=bool(m["show_titles"]),
        collection_path=m["collection_path"],
        state=json.loads(m["state"] or "{}"),
        last_success_at=m["last_success_at"],
        last_error=m["last_error"],
        failures=m["failures"],
        next_run_at=m["next_run_at"],
        created_at=m["created_at"],
    )


def _select() -> Any:
    return select(*_COLUMNS).join(users, users.c.id == external_calendars.c.provider_id)


def mirror_name(url: str, type_: str) -> str:
    """The mirror calendar's display name: says where the busy time comes from."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or url
    return f"Busy from {host} ({'feed' if type_ == 'ics' else 'CalDAV'})"


def create_external_calendar(
    conn: Connection,
    provider: User,
    *,
    type_: str,
    url: str,
    role: str,
    credentials: str | None,
    show_titles: bool,
    now: int | None = None,
) -> ExternalCalendar:
    """The row and, for a busy source, its empty mirror calendar in the provider's zone; run
    under the provider's lock. Due at once, so the first pull happens on the worker's next turn."""
    now = int(time.time()) if now is None else now
    calendar_id = str(uuid.uuid4())
    collection_path = None
    if role == "busy":
        collection_path = f"{provider.username}/{MIRROR_PREFIX}{calendar_id.replace('-', '')[:12]}"
        calendars.create_collection(
            conn,
            collection_path,
            {
                "tag": "VCALENDAR",
                "D:displayname": mirror_name(url, type_),
                "C:supported-calendar-component-set": "VEVENT",
                # Without the query string: a publish link carries its secret there.
                "C:calendar-description": "Read-only: mirrored by bookdav from " + safe_url(url),
            },
            timezone=provider.timezone,
            now=now,
        )
    conn.execute(
        insert(external_calendars).values(
            id=calendar_id,
            provider_id=provider.id,
            type=type_,
            url=url,
            role=role,
            credentials=credentials,
            show_titles=show_titles,
            collection_path=collection_path,
            state="{}",
            failures=0,
            next_run_at=now,
            created_at=now,
        )
    )
    found = get_external_calendar(conn, calendar_id)
    assert found is not None
    return found


def get_external_calendar(conn: Connection, calendar_id: str) -> ExternalCalendar | None:
    row = conn.execute(_select().where(external_calendars.c.id == calendar_id)).first()
    return _from_row(row) if row else None


def calendars_of_provider(
    conn: Connection, provider_id: str, role: str | None = None
) -> list[ExternalCalendar]:
    query = _select().where(external_calendars.c.provider_id == provider_id)
    if role is not None:
        query = query.where(external_calendars.c.role == role)
    rows = conn.execute(query.order_by(external_calendars.c.created_at, external_calendars.c.id))
    return [_from_row(row) for row in rows]


def busy_sources(conn: Connection, *, username: str | None = None) -> list[ExternalCalendar]:
    """Every busy source (of one provider, if named), oldest first."""
    query = _select().where(external_calendars.c.role == "busy")
    if username is not None:
        query = query.where(users.c.username == username)
    rows = conn.execute(query.order_by(external_calendars.c.created_at, external_calendars.c.id))
    return [_from_row(row) for row in rows]


def due_sources(conn: Connection, now: int, limit: int = 20) -> list[ExternalCalendar]:
    rows = conn.execute(
        _select()
        .where(external_calendars.c.role == "busy", external_calendars.c.next_run_at <= now)
        .order_by(external_calendars.c.next_run_at)
        .limit(limit)
    )
    return [_from_row(row) for row in rows]


def claim(conn: Connection, source: ExternalCalendar, lease_until: int) -> bool:
    """Take the source for one pull if nobody moved its `next_run_at` since it was read."""
    result = conn.execute(
        update(external_calendars)
        .where(
            external_calendars.c.id == source.id,
            external_calendars.c.next_run_at == source.next_run_at,
        )
        .values(next_run_at=lease_until)
    )
    return bool(result.rowcount)


KEPT_STATE_KEYS = ("credentialKind",)


def kept_state(state: dict[str, Any]) -> dict[str, Any]:
    """The part of a source's state a pull does not own (it only replaces sync tokens)."""
    return {key: state[key] for key in KEPT_STATE_KEYS if key in state}


def record_success(
    conn: Connection, calendar_id: str, state: dict[str, Any], now: int, next_run_at: int
) -> None:
    conn.execute(
        update(external_calendars)
        .where(external_calendars.c.id == calendar_id)
        .values(
            state=json.dumps(state, sort_keys=True),
            last_success_at=now,
            last_error=None,
            failures=0,
            next_run_at=next_run_at,
        )
    )


def record_failure(conn: Connection, calendar_id: str, error: str, next_run_at: int) -> int:
    """Count one more failure in a row; returns the count."""
    conn.execute(
        update(external_calendars)
        .where(external_calendars.c.id == calendar_id)
        .values(
            last_error=error,
            failures=external_calendars.c.failures + 1,
            next_run_at=next_run_at,
        )
    )
    failures = conn.execute(
        select(external_calendars.c.failures).where(external_calendars.c.id == calendar_id)
    ).scalar()
    return int(failures or 0)


def delete_external_calendar(conn: Connection, source: ExternalCalendar) -> None:
    """The row, what it saw, and its mirror calendar; run under the provider's lock."""
    conn.execute(delete(external_items).where(external_items.c.calendar_id == source.id))
    conn.execute(delete(external_calendars).where(external_calendars.c.id == source.id))
    if source.collection_path:
        calendars.delete_collection(conn, source.collection_path)


def known_items(conn: Connection, calendar_id: str) -> dict[str, KnownItem]:
    rows = conn.execute(
        select(
            external_items.c.remote_href, external_items.c.etag, external_items.c.local_href
        ).where(external_items.c.calendar_id == calendar_id)
    )
    return {href: KnownItem(etag, local) for href, etag, local in rows}


def remember_item(
    conn: Connection, calendar_id: str, remote_href: str, etag: str, local_href: str
) -> None:
    forget_item(conn, calendar_id, remote_href)
    conn.execute(
        insert(external_items).values(
            calendar_id=calendar_id, remote_href=remote_href, etag=etag, local_href=local_href
        )
    )


def remember_items(conn: Connection, calendar_id: str, seen: list[tuple[str, str, str]]) -> None:
    """`remember_item` for many `(remote_href, etag, local_href)` at once (a first pull is
    thousands): one delete and one insert per 500."""
    latest = {remote_href: (etag, local_href) for remote_href, etag, local_href in seen}
    hrefs = list(latest)
    for start in range(0, len(hrefs), 500):
        batch = hrefs[start : start + 500]
        conn.execute(
            delete(external_items).where(
                external_items.c.calendar_id == calendar_id,
                external_items.c.remote_href.in_(batch),
            )
        )
        conn.execute(
            insert(external_items),
            [
                {
                    "calendar_id": calendar_id,
                    "remote_href": href,
                    "etag": latest[href][0],
                    "local_href": latest[href][1],
                }
                for href in batch
            ],
        )


def forget_item(conn: Connection, calendar_id: str, remote_href: str) -> None:
    conn.execute(
        delete(external_items).where(
            external_items.c.calendar_id == calendar_id,
            external_items.c.remote_href == remote_href,
        )
    )


def record_state(conn: Connection, calendar_id: str, extra: dict[str, Any]) -> None:
    """Merge `extra` into the source's state JSON (what has no column of its own)."""
    current = conn.execute(
        select(external_calendars.c.state).where(external_calendars.c.id == calendar_id)
    ).scalar()
    state = {**json.loads(current or "{}"), **extra}
    conn.execute(
        update(external_calendars)
        .where(external_calendars.c.id == calendar_id)
        .values(state=json.dumps(state, sort_keys=True))
    )
