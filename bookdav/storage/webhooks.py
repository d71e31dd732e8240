"""The webhooks table: where a provider (or an admin, for every provider) wants events POSTed."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from bookdav.storage.schema import webhooks


@dataclass(frozen=True)
class Webhook:
    id: str
    owner_id: str
    url: str
    events: tuple[str, ...]
    secret: str
    created_at: int
    deleted_at: int | None


def _from_row(row: object) -> Webhook:
    mapping = row._mapping  # type: ignore[attr-defined]
    return Webhook(
        id=mapping["id"],
        owner_id=mapping["owner_id"],
        url=mapping["url"],
        events=tuple(json.loads(mapping["events"])),
        secret=mapping["secret"],
        created_at=mapping["created_at"],
        deleted_at=mapping["deleted_at"],
    )


def insert_webhook(
    conn: Connection, owner_id: str, url: str, events: Sequence[str], secret: str
) -> Webhook:
    hook = Webhook(str(uuid.uuid4()), owner_id, url, tuple(events), secret, int(time.time()), None)
    conn.execute(
        insert(webhooks).values(
            id=hook.id,
            owner_id=owner_id,
            url=url,
            events=json.dumps(list(events)),
            secret=secret,
            created_at=hook.created_at,
        )
    )
    return hook


def get_webhook(conn: Connection, webhook_id: str) -> Webhook | None:
    row = conn.execute(select(webhooks).where(webhooks.c.id == webhook_id)).first()
    return _from_row(row) if row else None


def list_webhooks(conn: Connection, owner_id: str) -> list[Webhook]:
    rows = conn.execute(
        select(webhooks)
        .where(webhooks.c.owner_id == owner_id, webhooks.c.deleted_at.is_(None))
        .order_by(webhooks.c.created_at, webhooks.c.id)
    ).all()
    return [_from_row(row) for row in rows]


def delete_webhook(conn: Connection, webhook_id: str) -> bool:
    """Mark deleted (deliveries already queued are then skipped); False if it was not live."""
    result = conn.execute(
        update(webhooks)
        .where(webhooks.c.id == webhook_id, webhooks.c.deleted_at.is_(None))
        .values(deleted_at=int(time.time()))
    )
    return bool(result.rowcount)
