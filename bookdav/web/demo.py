"""`bookdav serve --demo`: a provider with Mon-Fri 09:00-17:00 hours and two services, so the
first command gives a booking link that works."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import select

from bookdav.booking.accounts import add_user, generate_password
from bookdav.booking.availability import set_working_hours
from bookdav.booking.ical import WeeklyHours, WorkingHours
from bookdav.storage import services as service_store
from bookdav.storage.db import Database
from bookdav.storage.schema import users
from bookdav.storage.users import UsernameTaken, user_by_username

DEMO_USERNAME = "demo"
DEMO_TIMEZONE = "Europe/Berlin"
DEMO_SERVICES = (
    ("intro-call", "Intro call", 30, "A short first conversation."),
    ("consultation", "Consultation", 60, "An hour to work through your question."),
)


@dataclass(frozen=True)
class Demo:
    username: str
    password: str | None  # None: the account existed before this start


def ensure_demo(database: Database) -> Demo | None:
    """Create the demo provider if the database has no provider; return the demo account if
    there is one. Blocking: call before the event loop starts."""
    with database.read() as conn:
        existing = user_by_username(conn, DEMO_USERNAME)
        providers = conn.execute(select(users.c.id).where(users.c.role == "provider")).first()
    if existing is not None:
        return Demo(existing.username, None) if existing.role == "provider" else None
    if providers is not None:
        return None
    password = generate_password()
    try:
        provider = add_user(
            database,
            username=DEMO_USERNAME,
            email="demo@localhost",
            role="provider",
            password=password,
            name="Demo Provider",
            timezone=DEMO_TIMEZONE,
        )
    except UsernameTaken:
        return Demo(DEMO_USERNAME, None)  # another process made it a moment ago
    today = datetime.now(ZoneInfo(DEMO_TIMEZONE)).date()
    hours = WorkingHours(
        DEMO_TIMEZONE, (WeeklyHours(("MO", "TU", "WE", "TH", "FR"), (9, 0), (17, 0)),), today
    )
    with database.write([provider.username]) as conn:
        set_working_hours(conn, provider, hours)
        for slug, name, minutes, description in DEMO_SERVICES:
            service_store.insert_service(
                conn,
                slug=slug,
                name=name,
                description=description,
                duration_minutes=minutes,
                price_amount="0",
                price_currency="EUR",
                rules={"minNoticeMinutes": 60, "cancellationNoticeMinutes": 60},
                created_by=provider.id,
                provider_ids=[provider.id],
            )
    return Demo(provider.username, password)
