"""Hot statements run straight on the DBAPI connection underneath a SQLAlchemy `Connection`.

SQLAlchemy's execution layer costs 20-35 us a statement here (cache key, execution context,
result wrapping) where sqlite3 itself takes 2-4 us. A booking runs about fourteen statements and
a slot search several, so those go through this module: each is one SQL text written with `:name`
parameters (and `IN :names` for a list), turned once into the driver's own style (sqlite3's
`:name`, psycopg's `%(name)s`). They run on the same connection, in the same transaction, as the
SQLAlchemy statements around them; rows come back as plain tuples.

On PostgreSQL every statement is a round trip, and a round trip costs more client and server CPU
than most of the statements themselves. Inside `pipeline(conn)` the statements of this module are
sent without waiting for their answers (psycopg's pipeline mode): a write nobody reads goes out
with the next read, and a read that is fetched waits once for everything queued before it. On
SQLite, which has no round trips, `pipeline` changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection

_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")
_LIST_PARAMETER = re.compile(r"\bIN :(\w+)", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def _driver_sql(sql: str, dialect: str, list_sizes: tuple[tuple[str, int], ...]) -> str:
    """`sql` in the driver's parameter style, each list parameter as `(:name__0, :name__1...)`."""
    sizes = dict(list_sizes)

    def expand(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in sizes:
            return match.group(0)
        return "IN (" + ", ".join(f":{name}__{i}" for i in range(sizes[name])) + ")"

    sql = _LIST_PARAMETER.sub(expand, sql)
    if dialect == "sqlite":
        return sql
    return _PARAMETER.sub(r"%(\1)s", sql.replace("%", "%%"))


@functools.lru_cache(maxsize=1024)
def _takes_lists(sql: str) -> bool:
    return _LIST_PARAMETER.search(sql) is not None


def _prepare(
    conn: Connection, sql: str, params: Mapping[str, Any]
) -> tuple[str, Mapping[str, Any]]:
    if not _takes_lists(sql):  # most statements: no parameter to look at
        return _driver_sql(sql, conn.dialect.name, ()), params
    lists = [(name, value) for name, value in params.items() if isinstance(value, list | tuple)]
    if not lists:
        return _driver_sql(sql, conn.dialect.name, ()), params
    flat = {name: value for name, value in params.items() if not isinstance(value, list | tuple)}
    for name, values in lists:
        if not values:
            raise ValueError(f"list parameter {name!r} is empty")
        flat.update((f"{name}__{i}", value) for i, value in enumerate(values))
    sizes = tuple(sorted((name, len(values)) for name, values in lists))
    return _driver_sql(sql, conn.dialect.name, sizes), flat


def execute(conn: Connection, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    """Run one statement; returns the driver's cursor (rowcount, fetchone, fetchall)."""
    driver_sql, driver_params = _prepare(conn, sql, params or {})
    return conn.connection.driver_connection.execute(driver_sql, driver_params)  # type: ignore[union-attr]


@contextlib.contextmanager
def pipeline(conn: Connection) -> Iterator[None]:
    """Statements of this module inside the block don't wait for their answers until one is
    fetched (PostgreSQL); leaving the block waits for all of them and raises the first error.
    Only for statements run through this module: SQLAlchemy's execution reads a result's
    description as soon as it executes, which a pipelined statement does not have yet.

    A block inside another one joins it: its statements wait for the outer block's next fetch
    or end (psycopg would sync on entering and leaving an inner block, a round trip each, even
    with nothing to send)."""
    if conn.dialect.name != "postgresql":
        yield
        return
    driver = conn.connection.driver_connection
    if open_pipeline(driver) is not None:
        yield
        return
    with driver.pipeline():  # type: ignore[union-attr]
        yield


def open_pipeline(driver_connection: Any) -> Any | None:
    """psycopg's pipeline open on this DBAPI connection, or None (none open, or sqlite3). It is
    psycopg's private attribute, so it is read here and nowhere else."""
    return getattr(driver_connection, "_pipeline", None)


def sync(conn: Connection) -> None:
    """Wait for every statement sent so far in the open pipeline, raising the first error
    where it is called (nothing to wait for outside a pipeline, or on SQLite)."""
    pipeline = open_pipeline(conn.connection.driver_connection)
    if pipeline is not None:
        pipeline.sync()


def execute_many(conn: Connection, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """One statement for many parameter sets (plain values only)."""
    if not rows:
        return
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(_driver_sql(sql, conn.dialect.name, ()), rows)
    finally:
        cursor.close()


def rows(
    conn: Connection, sql: str, params: Mapping[str, Any] | None = None
) -> list[tuple[Any, ...]]:
    return list(execute(conn, sql, params).fetchall())


def ask(
    conn: Connection, sql: str, params: Mapping[str, Any] | None = None
) -> Callable[[], list[tuple[Any, ...]]]:
    """Send a query now and fetch its rows later, by calling what this returns: inside
    `pipeline`, queries asked one after the other cost one round trip together. The rows are
    the database's state where the query stands among the statements, as if fetched at once
    (sqlite3 would step a cursor only when fetched, seeing later writes: it is read now)."""
    cursor = execute(conn, sql, params)
    if conn.dialect.name == "sqlite":
        found = list(cursor.fetchall())
        return lambda: found
    return lambda: list(cursor.fetchall())


def first(
    conn: Connection, sql: str, params: Mapping[str, Any] | None = None
) -> tuple[Any, ...] | None:
    row = execute(conn, sql, params).fetchone()
    return tuple(row) if row is not None else None


def scalar(conn: Connection, sql: str, params: Mapping[str, Any] | None = None) -> Any:
    row = execute(conn, sql, params).fetchone()
    return None if row is None else row[0]


def mappings(
    conn: Connection, sql: str, params: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Rows as column name -> value (for `SELECT table.*`, whose column list may grow)."""
    cursor = execute(conn, sql, params)
    found = cursor.fetchall()  # first: inside `pipeline`, the description comes with the rows
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in found]


def json_object(raw: str | None) -> dict[str, Any]:
    """A JSON-object column's value (stored as text): {} when empty, malformed or not an object."""
    try:
        found = json.loads(raw or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
