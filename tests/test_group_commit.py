"""SQLite's group commit: units of work that queue up commit together, yet each one succeeds or
fails alone, and no caller hears of success before the COMMIT."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Connection, text

from bookdav.storage.db import Database, WalCheckpointer


@pytest.fixture
def database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path}/group.sqlite3")
    with db.write() as conn:
        conn.execute(text("CREATE TABLE marks (n INTEGER PRIMARY KEY)"))
    yield db
    db.close()


class Refused(Exception):
    pass


def mark(conn: Connection, n: int) -> int:
    conn.execute(text("INSERT INTO marks (n) VALUES (:n)"), {"n": n})
    if n % 3 == 0:
        raise Refused(n)  # after writing: its row must not survive
    return n * 10


def stored(database: Database) -> set[int]:
    with database.read() as conn:
        return {n for (n,) in conn.execute(text("SELECT n FROM marks"))}


async def test_a_failing_unit_in_a_group_takes_only_its_own_writes_back(database: Database) -> None:
    gate = threading.Event()

    def hold(conn: Connection) -> None:
        gate.wait(10)  # the writer is busy: everything below queues up behind it

    held = asyncio.ensure_future(database.run_write(hold))
    await asyncio.sleep(0.05)
    units = [asyncio.ensure_future(database.run_write(mark, n)) for n in range(1, 41)]
    await asyncio.sleep(0.05)
    gate.set()
    await held
    outcomes = await asyncio.gather(*units, return_exceptions=True)
    assert database._group_writer is not None
    assert database._group_writer.largest_group > 10  # they really were committed as a group
    for n, outcome in zip(range(1, 41), outcomes, strict=True):
        if n % 3 == 0:
            assert isinstance(outcome, Refused)
        else:
            assert outcome == n * 10
    assert stored(database) == {n for n in range(1, 41) if n % 3}


async def test_a_unit_that_conflicts_with_an_earlier_one_in_its_group_fails_alone(
    database: Database,
) -> None:
    gate = threading.Event()
    held = asyncio.ensure_future(database.run_write(lambda conn: gate.wait(10)))
    await asyncio.sleep(0.05)
    # 100 and 101 twice each: the second insert of each key hits the primary key.
    units = [asyncio.ensure_future(database.run_write(mark, n)) for n in (100, 101, 100, 101)]
    await asyncio.sleep(0.05)
    gate.set()
    await held
    outcomes = await asyncio.gather(*units, return_exceptions=True)
    assert outcomes[:2] == [1000, 1010]
    assert all(isinstance(o, Exception) and "UNIQUE" in str(o) for o in outcomes[2:])
    assert {100, 101} <= stored(database)


async def test_a_unit_whose_caller_gave_up_before_it_ran_is_not_run(database: Database) -> None:
    """A caller cancelled while its unit still waited for the writer has nothing written, and the
    rest of the group is unaffected."""
    gate = threading.Event()
    held = asyncio.ensure_future(database.run_write(lambda conn: gate.wait(10)))
    await asyncio.sleep(0.05)
    units = {n: asyncio.ensure_future(database.run_write(mark, n)) for n in (200, 201, 202)}
    await asyncio.sleep(0.05)
    units[201].cancel()
    gate.set()
    await held
    assert await units[200] == 2000 and await units[202] == 2020
    assert units[201].cancelled()
    assert stored(database) >= {200, 202} and 201 not in stored(database)


def _in_the_file_itself(path: Path) -> set[int]:
    """The marks the database file holds without its write-ahead log (`immutable=1` reads the
    file alone): what a checkpoint has copied there."""
    probe = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return {n for (n,) in probe.execute("SELECT n FROM marks")}
    except sqlite3.DatabaseError:  # caught in the middle of a copy: look again
        return set()
    finally:
        probe.close()


def test_commits_reach_the_database_file_without_a_writer_copying_them(tmp_path: Path) -> None:
    """The committing writer no longer checkpoints (copy and fsync under the write lock) until
    the log passes the backstop; the checkpoint thread copies a few commits within moments."""
    path = tmp_path / "checkpointed.sqlite3"
    database = Database(f"sqlite:///{path}")
    try:
        with database.write() as conn:
            conn.execute(text("CREATE TABLE marks (n INTEGER PRIMARY KEY)"))
        for n in range(5):
            with database.write() as conn:
                conn.execute(text("INSERT INTO marks (n) VALUES (:n)"), {"n": n})
        with database.write() as conn:
            pages = conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
        assert pages == WalCheckpointer.WRITER_BACKSTOP_PAGES
        deadline = time.monotonic() + 10
        while _in_the_file_itself(path) != set(range(5)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _in_the_file_itself(path) == set(range(5))
        thread = database._checkpointer._thread if database._checkpointer else None
        assert thread is not None and thread.is_alive()
    finally:
        database.close()
    assert not thread.is_alive()  # close() stops it
