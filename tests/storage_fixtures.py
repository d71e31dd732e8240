"""Fixtures for the calendar-storage tests: a fresh database (SQLite, and PostgreSQL when
`BOOKDAV_TEST_DATABASE_URL` is set) and small iCalendar builders.

PostgreSQL tests run in their own schema (`search_path`), so they never touch other tests' tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from bookdav.storage.db import Database, database_for, normalize_url
from bookdav.storage.schema import metadata
from tests.conftest import require_postgres

POSTGRES_SCHEMA = "bookdav_storage_tests"
BACKENDS = ["sqlite", "postgresql"]


def _postgres_url() -> str:
    url = normalize_url(require_postgres())
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {POSTGRES_SCHEMA}"))
    engine.dispose()
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{POSTGRES_SCHEMA}"


def fresh_database(backend: str, folder: Path) -> Database:
    """An empty calendar database of the given backend, with every table created."""
    url = f"sqlite:///{folder}/storage.sqlite3" if backend == "sqlite" else _postgres_url()
    database = database_for(url)
    with database.write(["schema"]) as conn:
        if backend == "postgresql":
            metadata.drop_all(conn)
        metadata.create_all(conn)
    return database


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    db = fresh_database(request.param, tmp_path)
    yield db
    # Engines stay registered in `database_for`; disposing frees their connections.
    db._write_engine.dispose()
    db._read_engine.dispose()


def vcalendar(*components: str) -> str:
    """A VCALENDAR around the given component texts, with CRLF line ends."""
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//bookdav//tests//EN"]
    for component in components:
        lines.extend(line for line in component.strip().splitlines() if line.strip())
    lines.append("END:VCALENDAR")
    return "\r\n".join(lines) + "\r\n"


def vevent(uid: str, *properties: str) -> str:
    """A VEVENT with this UID and the given property lines."""
    return "\n".join(
        ["BEGIN:VEVENT", f"UID:{uid}", "DTSTAMP:20240101T000000Z", *properties, "END:VEVENT"]
    )


def event(uid: str, *properties: str) -> str:
    """A one-VEVENT calendar object."""
    return vcalendar(vevent(uid, *properties))
