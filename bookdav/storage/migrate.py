"""Schema migrations (Alembic): `bookdav db upgrade`, and `bookdav serve` on start."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from bookdav.storage.db import Database

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(database: Database) -> tuple[str | None, str | None]:
    """Bring the schema to the newest revision, under the write lock so processes don't race.
    Returns the revisions before and after."""
    config = _alembic_config()
    with database.write(["schema"]) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def current_revision(database: Database) -> str | None:
    with database.read() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()
