"""How bookdav reaches its database: one data-access layer for Radicale's threads and aiohttp.

Queries are plain functions over a SQLAlchemy Core `Connection` (sync). A unit of work runs whole
inside `Database.write(principals)` / `Database.read()`; async code hands the whole function to a
thread with `await db.run_write(fn, ...)` / `await db.run_read(fn, ...)`. Measured on this machine,
running a unit of work whole on a thread beats statement-by-statement async drivers by 2-2.5x
(docs/architecture.md), and it keeps one copy of every query.

Writers lock the principals they touch inside the transaction: SQLite `BEGIN IMMEDIATE` (one writer
at a time; in-process writers queue on a mutex instead of spinning in SQLite's busy handler);
PostgreSQL `pg_advisory_xact_lock` per principal, taken in sorted order so two writers never
deadlock. Readers never wait for writers (SQLite WAL, PostgreSQL MVCC).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeGuard, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import QueuePool

from bookdav.logs import log_event
from bookdav.storage import sql

P = ParamSpec("P")
T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000

log = logging.getLogger("bookdav.storage")


class DatabaseUnavailable(Exception):
    """The database could not be reached or opened."""


def principal_lock_key(principal: str) -> int:
    """A stable signed 64-bit key for `pg_advisory_xact_lock`, from a principal name."""
    digest = hashlib.blake2b(principal.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def normalize_url(url: str) -> str:
    """Pick the sync drivers: pysqlite for SQLite, psycopg 3 for PostgreSQL."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres", "postgresql+psycopg2"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername == "sqlite+aiosqlite":
        parsed = parsed.set(drivername="sqlite")
    return parsed.render_as_string(hide_password=False)


class Database:
    """Engines, locks and worker threads for one database URL. Build one per process and URL."""

    def __init__(self, url: str, *, writer_threads: int | None = None) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        # A file database's WAL is copied into the file by a thread of its own, off the write lock.
        self._checkpointer = (
            WalCheckpointer(parsed.database)
            if self.is_sqlite and _is_plain_path(parsed.database)
            else None
        )
        if self.is_sqlite:
            self._write_engine = self._sqlite_engine(
                begin="BEGIN IMMEDIATE",
                autocheckpoint=WalCheckpointer.WRITER_BACKSTOP_PAGES
                if self._checkpointer
                else None,
            )
            self._read_engine = self._sqlite_engine(begin="BEGIN")
        else:
            engine = create_engine(self.url, pool_size=24, max_overflow=16, pool_timeout=60)
            _ping_when_idle(engine)
            _sync_pipeline_before_reading(engine)
            self._write_engine = self._read_engine = engine
        # SQLite takes one writer at a time anyway: a single writer thread and a mutex (shared
        # with other processes on the same file) queue writers cheaply; PostgreSQL writers run in
        # parallel under per-principal locks.
        self._sqlite_writer_mutex = (
            SqliteWriteLock(parsed.database) if self.is_sqlite else contextlib.nullcontext()
        )
        threads = writer_threads or (1 if self.is_sqlite else 16)
        self._writer_pool = ThreadPoolExecutor(threads, thread_name_prefix="db-write")
        self._group_writer = GroupWriter(self) if self.is_sqlite else None
        # Readers mostly wait on the database (a round trip a statement on PostgreSQL).
        self._reader_pool = ThreadPoolExecutor(
            8 if self.is_sqlite else 16, thread_name_prefix="db-read"
        )

    def _sqlite_engine(self, *, begin: str, autocheckpoint: int | None = None) -> Engine:
        engine = create_engine(
            self.url,
            poolclass=QueuePool,
            pool_size=16,
            max_overflow=32,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own is DEFERRED, late).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            if autocheckpoint is not None:
                cursor.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Connection) -> None:
            connection.exec_driver_sql(begin)

        return engine

    @property
    def dialect(self) -> str:
        return "sqlite" if self.is_sqlite else "postgresql"

    @contextlib.contextmanager
    def write(
        self, principals: Iterable[str] = (), *, pipelined: bool = False
    ) -> Iterator[Connection]:
        """A write transaction holding the lock of every named principal; commits on success.

        `pipelined` (PostgreSQL): the whole transaction is one `sql.pipeline`, so the locks go
        out with the unit's first read and the COMMIT with its last writes, instead of a round
        trip each. Only for units written for it: a statement of `sql` there raises its error
        at the next read, `sql.sync` or the commit, and its `rowcount` is not known before."""
        if self.is_sqlite:
            with self._sqlite_writer_mutex, self._write_engine.begin() as conn:
                yield conn
            if self._checkpointer is not None:
                self._checkpointer.poke()
            return
        with self._write_engine.begin() as conn:
            keys = sorted({principal_lock_key(p) for p in principals})
            if not keys and not pipelined:
                # No pipeline block at all: psycopg syncs on entering and leaving even an empty
                # one, a round trip for nothing in every write that locks no principal.
                yield conn
                return
            with sql.pipeline(conn):  # the locks: one round trip (after psycopg's BEGIN)
                for key in keys:
                    sql.execute(conn, "SELECT pg_advisory_xact_lock(:key)", {"key": key})
                if pipelined:
                    yield conn
                    # Sent with what is still unsent, and waited for as the pipeline ends;
                    # SQLAlchemy's commit then finds the transaction over (psycopg: a no-op).
                    sql.execute(conn, "COMMIT")
                    return
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot, never blocked by writers."""
        with self._read_engine.begin() as conn:
            yield conn

    async def run_write(
        self,
        fn: Callable[..., T],
        *args: Any,
        principals: Iterable[str] = (),
        pipelined: bool = False,
        **kwargs: Any,
    ) -> T:
        """Run `fn(conn, *args, **kwargs)` whole inside `write(principals, pipelined=...)` on a
        writer thread. On SQLite, units of work that queue up while one commits are committed
        together (each in its own savepoint: see `GroupWriter`); to the caller that is the same."""
        if self._group_writer is not None:
            unit: Callable[[Connection], T] = lambda conn: fn(conn, *args, **kwargs)  # noqa: E731
            return await asyncio.wrap_future(self._group_writer.submit(unit))
        principals = tuple(principals)

        def unit_of_work() -> T:
            with self.write(principals, pipelined=pipelined) as conn:
                return fn(conn, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._writer_pool, unit_of_work)

    async def run_read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(conn, *args, **kwargs)` whole inside `read()` on a reader thread."""

        def unit_of_work() -> T:
            with self.read() as conn:
                return fn(conn, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, unit_of_work)

    def ping(self) -> None:
        """Raise `DatabaseUnavailable` unless the database answers a trivial query."""
        try:
            with self._read_engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            raise DatabaseUnavailable(_first_line(exc)) from exc

    def close(self) -> None:
        if self._group_writer is not None:
            self._group_writer.stop()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)
        if isinstance(self._sqlite_writer_mutex, SqliteWriteLock):
            self._sqlite_writer_mutex.close()
        self._write_engine.dispose()
        if self._read_engine is not self._write_engine:
            self._read_engine.dispose()


# A pooled PostgreSQL connection idle longer than this is checked (SELECT 1) before use, so one
# that a server restart or an idle timeout cut is replaced instead of failing a request. A busy
# connection is not: SQLAlchemy's pool_pre_ping would add a round trip to every transaction.
PING_AFTER_IDLE_SECONDS = 10.0


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", 0.0) < PING_AFTER_IDLE_SECONDS:
            return
        try:
            dbapi_connection.execute("SELECT 1")
            dbapi_connection.rollback()
        except Exception as exc:
            # The pool discards this connection and checks out another (documented behaviour).
            raise DisconnectionError(_first_line(exc)) from exc


def _sync_pipeline_before_reading(engine: Engine) -> None:
    """A SQLAlchemy statement run inside `sql.pipeline` waits for its own answer first.

    SQLAlchemy reads a result's description right after executing; in psycopg's pipeline mode
    the answer is not there yet, and the statement would look as if it returned no rows. So
    after a SQLAlchemy statement on a pipelined connection the pipeline is synced (one round
    trip, as outside a pipeline): SQLAlchemy code stays correct anywhere, and only the statements
    of `sql` gain from the pipeline."""

    @event.listens_for(engine, "after_cursor_execute")
    def _after(*args: Any) -> None:
        pipeline = sql.open_pipeline(args[1].connection)
        if pipeline is not None:
            pipeline.sync()


def _is_plain_path(database: str | None) -> TypeGuard[str]:
    """A database file named by its path (not in memory, not a `file:` URI)."""
    return database not in (None, "", ":memory:") and not database.startswith("file:")


class WalCheckpointer:
    """Copies what writers committed to SQLite's write-ahead log into the database file, on a
    thread of its own, so that no writer does it while holding the write lock.

    SQLite's default has the committing connection checkpoint once the log passes 1,000 pages:
    copy them into the file and fsync both files, inside its COMMIT, so inside our write lock.
    A booking storm writes 40-60 KiB of log a booking, so that was every 70-100 bookings, and
    every writer of every process waited for the copy and the two fsyncs. Here each write pokes
    this thread, which waits `DELAY` for more commits to gather, then runs a PASSIVE checkpoint
    (which never waits for readers or writers) from its own connection.

    A passive checkpoint leaves the log's newest pages if commits keep coming, and the log only
    starts again from its beginning once everything in it was copied. So writers still
    checkpoint, as a backstop, past `WRITER_BACKSTOP_PAGES` (about 40 MB): by then nearly all of
    it is copied, and that checkpoint finishes the little left. Durability is unchanged:
    `synchronous=NORMAL`, with the fsyncs where SQLite puts them."""

    DELAY = 0.05
    WRITER_BACKSTOP_PAGES = 10_000

    def __init__(self, path: str) -> None:
        self._path = path
        self._wanted = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def poke(self) -> None:
        """Something was committed: checkpoint soon (the thread starts with the first write)."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stopping:
                    self._thread = threading.Thread(
                        target=self._run, name="db-checkpoint", daemon=True
                    )
                    self._thread.start()
        self._wanted.set()

    def stop(self) -> None:
        with self._start_lock:
            self._stopping = True
            thread = self._thread
        self._wanted.set()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            while True:
                self._wanted.wait()
                if self._stopping:
                    return
                time.sleep(self.DELAY)  # let the commits of a burst gather
                self._wanted.clear()  # a commit from here on asks for the next round
                if self._stopping:
                    return
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # busy or failing: the writers' backstop remains
                    log_event(
                        log, "WAL checkpoint failed", logging.WARNING, reason=_first_line(exc)
                    )
        finally:
            connection.close()


class SqliteWriteLock:
    """One SQLite writer at a time, across the threads of this process and across processes.

    SQLite serialises writers itself, but a writer that finds the database locked polls in its
    busy handler, sleeping 1, 2, 5 ... 100 ms between tries: with several `bookdav serve`
    processes on one file, that sleep became the p99. So a writer first takes this lock: a mutex
    for the threads of the process, then `flock` on `<database>-writelock` for the processes,
    which the kernel hands to the next waiter the moment it is released. Writers that bypass it
    (another program) still meet SQLite's own lock and busy timeout: this is about waiting well,
    never about correctness. In-memory databases have one process: the mutex alone.
    """

    def __init__(self, database_path: str | None) -> None:
        self._mutex = threading.Lock()
        self._path = f"{database_path}-writelock" if _is_plain_path(database_path) else None
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._mutex.acquire()
        if self._path is None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks with the GIL released
        except BaseException:
            self._mutex.release()
            raise

    def __exit__(self, *_exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class GroupWriter:
    """SQLite's one writer thread, with group commit.

    A COMMIT was the largest single cost of a booking on SQLite (about a sixth of the writer
    thread's time under load), and only one writer runs at a time anyway. So the thread takes the
    next unit of work and every other one already waiting (up to `MAX_GROUP`), runs them one after
    the other in one transaction, each inside its own SAVEPOINT, and commits once. A unit that
    raises is rolled back to its savepoint and gets its exception; the others are unaffected, as
    if each had its own transaction (they run in order and see each other's writes, as serial
    transactions would). No caller hears of success before the COMMIT has succeeded; if it fails,
    every unit of the group gets the error and nothing of it is stored. Nobody waits for a group
    to fill: a lone unit commits at once.
    """

    MAX_GROUP = 64

    def __init__(self, database: Database) -> None:
        self._database = database
        self._jobs: queue.SimpleQueue[tuple[Callable[[Connection], Any], Future[Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="db-write", daemon=True)
        self._started = False
        self._start_lock = threading.Lock()
        self.largest_group = 0  # for tests and curiosity

    def submit(self, fn: Callable[[Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        if not self._started:
            with self._start_lock:
                if not self._started:
                    self._thread.start()
                    self._started = True
        self._jobs.put((fn, future))
        return future

    def stop(self) -> None:
        if self._started:
            self._jobs.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            group = [first]
            stopping = False
            while len(group) < self.MAX_GROUP:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                group.append(job)
            self._commit([job for job in group if job[1].set_running_or_notify_cancel()])
            if stopping:
                return

    def _commit(self, group: list[tuple[Callable[[Connection], Any], Future[Any]]]) -> None:
        if not group:
            return
        self.largest_group = max(self.largest_group, len(group))
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self._database.write() as conn:
                if len(group) == 1:
                    outcomes.append(_outcome(group[0][0], conn))
                else:
                    for fn, _ in group:
                        sql.execute(conn, "SAVEPOINT bookdav_unit")
                        outcome = _outcome(fn, conn)
                        if not outcome[0]:
                            sql.execute(conn, "ROLLBACK TO SAVEPOINT bookdav_unit")
                        sql.execute(conn, "RELEASE SAVEPOINT bookdav_unit")
                        outcomes.append(outcome)
                if len(group) == 1 and not outcomes[0][0]:
                    raise outcomes[0][1]  # a lone unit: its own transaction rolls back
        except BaseException as exc:
            for _, future in group:
                future.set_exception(exc)
            return
        for (_, future), (ok, value) in zip(group, outcomes, strict=True):
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


def _outcome(fn: Callable[[Connection], Any], conn: Connection) -> tuple[bool, Any]:
    try:
        return True, fn(conn)
    except Exception as exc:
        return False, exc


def _first_line(exc: BaseException) -> str:
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


_databases: dict[str, Database] = {}
_databases_lock = threading.Lock()


def database_for(url: str) -> Database:
    """The process-wide `Database` for a URL. Radicale builds several `Storage` objects per app, and
    the web layer needs the same engines, so engines live here, at module level."""
    key = normalize_url(url)
    with _databases_lock:
        database = _databases.get(key)
        if database is None:
            database = _databases[key] = Database(key)
        return database


def close_all() -> None:
    with _databases_lock:
        for database in _databases.values():
            database.close()
        _databases.clear()
