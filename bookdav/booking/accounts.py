"""Accounts: creating users, and the calendars every provider gets with their account."""

from __future__ import annotations

import re
import secrets
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Connection

from bookdav.storage import calendars
from bookdav.storage.db import Database
from bookdav.storage.resources import RESOURCES_PRINCIPAL
from bookdav.storage.users import ROLES, User, hash_password, insert_user

USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Names of principal folders under /dav/ that are not people.
RESERVED_USERNAMES = frozenset({RESOURCES_PRINCIPAL})
EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+$")

# Every provider gets these under /dav/<username>/: (path segment, display name, components).
PROVIDER_CALENDARS = (
    ("appointments", "Appointments", "VEVENT"),
    ("availability", "Availability", "VEVENT"),
)


class InvalidAccount(ValueError):
    """A field of a new account is not acceptable; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def validate_account(username: str, email: str, role: str, timezone: str) -> None:
    if username in RESERVED_USERNAMES:
        raise InvalidAccount("username", f"{username!r} is reserved")
    if not USERNAME_PATTERN.match(username):
        raise InvalidAccount(
            "username", "use 1-64 lowercase letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    if not EMAIL_PATTERN.match(email) or len(email) > 320:
        raise InvalidAccount("email", f"{email!r} is not an email address")
    if role not in ROLES:
        raise InvalidAccount("role", f"must be one of {', '.join(ROLES)}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidAccount("timezone", f"{timezone!r} is not an IANA time zone") from exc


def create_account(
    conn: Connection,
    *,
    username: str,
    email: str,
    role: str,
    password_hash: str,
    name: str = "",
    timezone: str = "UTC",
) -> User:
    """The rows of a new account, and a provider's calendars; run under the username's lock."""
    user = insert_user(
        conn,
        username=username,
        email=email,
        role=role,
        password_hash=password_hash,
        name=name,
        timezone=timezone,
    )
    calendars.create_collection(conn, username, {})
    if role == "provider":
        for segment, display_name, components in PROVIDER_CALENDARS:
            calendars.create_collection(
                conn,
                f"{username}/{segment}",
                {
                    "tag": "VCALENDAR",
                    "D:displayname": display_name,
                    "C:supported-calendar-component-set": components,
                    "C:calendar-timezone-id": timezone,
                },
                timezone=timezone,
            )
    return user


def add_user(
    database: Database,
    *,
    username: str,
    email: str,
    role: str,
    password: str,
    name: str = "",
    timezone: str = "UTC",
) -> User:
    """Validate and create an account in one transaction; raises `InvalidAccount` or
    `UsernameTaken`. Blocking: call it from a thread in async code."""
    validate_account(username, email, role, timezone)
    password_hash = hash_password(password)  # slow by design: hash before taking any lock
    with database.write([username]) as conn:
        return create_account(
            conn,
            username=username,
            email=email,
            role=role,
            password_hash=password_hash,
            name=name,
            timezone=timezone,
        )
