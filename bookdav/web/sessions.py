"""Dashboard sign-ins: a random cookie token, stored only as its SHA-256 in `web_sessions`."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select

from bookdav.storage.schema import web_sessions
from bookdav.storage.users import User, user_by_id

SESSION_COOKIE = "bookdav_session"
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class WebSession:
    user: User
    csrf_secret: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(conn: Connection, user_id: str, now: int | None = None) -> str:
    """A new session for `user_id`; returns the cookie token (never stored as such)."""
    now = int(time.time()) if now is None else now
    token = secrets.token_urlsafe(32)
    conn.execute(delete(web_sessions).where(web_sessions.c.expires_at < now))
    conn.execute(
        insert(web_sessions).values(
            token_hash=_digest(token),
            user_id=user_id,
            csrf_secret=secrets.token_hex(32),
            created_at=now,
            expires_at=now + SESSION_SECONDS,
        )
    )
    return token


def session_for(conn: Connection, token: str, now: int | None = None) -> WebSession | None:
    now = int(time.time()) if now is None else now
    row = conn.execute(
        select(web_sessions).where(web_sessions.c.token_hash == _digest(token))
    ).first()
    if row is None or row.expires_at < now:
        return None
    user = user_by_id(conn, row.user_id)
    if user is None or user.status != "active":
        return None
    return WebSession(user, row.csrf_secret)


def end_session(conn: Connection, token: str) -> None:
    conn.execute(delete(web_sessions).where(web_sessions.c.token_hash == _digest(token)))
