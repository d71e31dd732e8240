"""API bearer tokens: created once (the secret is shown once), looked up by hash, revocable."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from bookdav.storage.schema import api_tokens, users
from bookdav.storage.users import User, user_from_row

TOKEN_PREFIX = "bdv_"


@dataclass(frozen=True)
class TokenInfo:
    id: str
    user_id: str
    name: str
    created_at: int
    revoked_at: int | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(conn: Connection, user_id: str, name: str = "") -> tuple[TokenInfo, str]:
    """A new token for a user: its record and the secret, which is never stored."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    info = TokenInfo(str(uuid.uuid4()), user_id, name, int(time.time()), None)
    conn.execute(
        insert(api_tokens).values(
            id=info.id,
            user_id=user_id,
            name=name,
            token_hash=_digest(secret),
            created_at=info.created_at,
        )
    )
    return info, secret


def user_for_token(conn: Connection, secret: str) -> User | None:
    """The active user a live token belongs to, or None."""
    row = conn.execute(
        select(users)
        .join(api_tokens, api_tokens.c.user_id == users.c.id)
        .where(
            api_tokens.c.token_hash == _digest(secret),
            api_tokens.c.revoked_at.is_(None),
            users.c.status == "active",
        )
    ).first()
    return user_from_row(row) if row else None


def list_tokens(conn: Connection, user_id: str) -> list[TokenInfo]:
    rows = conn.execute(
        select(
            api_tokens.c.id,
            api_tokens.c.user_id,
            api_tokens.c.name,
            api_tokens.c.created_at,
            api_tokens.c.revoked_at,
        )
        .where(api_tokens.c.user_id == user_id)
        .order_by(api_tokens.c.created_at, api_tokens.c.id)
    ).all()
    return [TokenInfo(*row) for row in rows]


def revoke_token(conn: Connection, user_id: str, token_id: str) -> bool:
    """Revoke one of a user's tokens; False if there is no such live token."""
    result = conn.execute(
        update(api_tokens)
        .where(
            api_tokens.c.id == token_id,
            api_tokens.c.user_id == user_id,
            api_tokens.c.revoked_at.is_(None),
        )
        .values(revoked_at=int(time.time()))
    )
    return result.rowcount == 1
