"""The Alembic migrations produce exactly the schema declared in bookdav.storage.schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from bookdav.storage import migrate
from bookdav.storage.db import Database
from bookdav.storage.schema import metadata
from tests.conftest import postgres_url


def _assert_migrations_match_schema(database: Database) -> None:
    migrate.upgrade(database)
    with database.read() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []
    assert migrate.current_revision(database) == migrate.head_revision()


def test_migrations_match_the_schema_on_sqlite(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path}/migrated.sqlite3")
    try:
        _assert_migrations_match_schema(database)
        migrate.upgrade(database)  # a second run changes nothing
    finally:
        database.close()


def test_migrations_match_the_schema_on_postgresql() -> None:
    url = postgres_url()
    if not url:
        pytest.skip("PostgreSQL variant: set BOOKDAV_TEST_DATABASE_URL to run it")
    database = Database(url)
    try:
        _assert_migrations_match_schema(database)
    finally:
        database.close()
