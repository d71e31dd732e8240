"""PostgreSQL connections cut while idle in the pool (a server restart, an idle timeout) are
replaced before use instead of failing the next request."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bookdav.storage import db as db_module
from bookdav.storage.db import Database
from tests.conftest import require_postgres


def test_a_connection_killed_while_idle_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    url = require_postgres()
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_SECONDS", 0.0)
    database = Database(url)
    try:
        with database.read() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        admin = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with database.read() as conn:  # the pooled connection is dead: a new one serves
            assert conn.execute(text("SELECT 41 + 1")).scalar_one() == 42
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        database.close()
