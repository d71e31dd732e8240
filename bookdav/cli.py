"""The `bookdav` command: serve, manage users, migrate the database, sync external calendars.

Every command finds its configuration at `--config PATH`, else `$BOOKDAV_CONFIG`, else
`./config.ini`. Failures a user can fix (a bad setting, a port in use, an unreachable database)
end with one clear line on stderr and a non-zero exit code, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from bookdav import __version__
from bookdav.config import ConfigError, Settings, find_config_path, load_settings
from bookdav.logs import log_event, setup_logging
from bookdav.storage.db import Database, DatabaseUnavailable, database_for
from bookdav.storage.users import ROLES, UsernameTaken

if TYPE_CHECKING:
    from aiohttp import web

    from bookdav.web.demo import Demo

log = logging.getLogger("bookdav")


class Fatal(Exception):
    """Stop the command with this one-line message."""


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="config file (default: $BOOKDAV_CONFIG, else ./config.ini)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bookdav", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bookdav {__version__}")
    _add_config_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (CalDAV, API, pages)")
    _add_config_option(serve)
    serve.add_argument("--host", help="listen address (overrides [server] host)")
    serve.add_argument("--port", help="listen port (overrides [server] port)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="create a demo provider with hours and services if there is no provider yet",
    )

    user = commands.add_parser("user", help="manage accounts")
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = user_commands.add_parser("add", help="create an account")
    _add_config_option(add)
    add.add_argument("username")
    add.add_argument("--email", required=True)
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--name", default="")
    add.add_argument("--timezone", default="UTC", help="IANA zone, e.g. Europe/Berlin")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from stdin (else one is generated and printed)",
    )

    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser("create", help="create a bearer token for a user")
    _add_config_option(create)
    create.add_argument("username")
    create.add_argument("--name", default="", help="what the token is for")

    mail = commands.add_parser("mail", help="mail")
    mail_commands = mail.add_subparsers(dest="mail_command", required=True, metavar="ACTION")
    ingest = mail_commands.add_parser(
        "ingest", help="apply an iMIP REPLY read from stdin (exit 1 with the reason if refused)"
    )
    _add_config_option(ingest)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="apply schema migrations")
    _add_config_option(upgrade)

    sync = commands.add_parser("sync", help="external calendars")
    sync_commands = sync.add_subparsers(dest="sync_command", required=True, metavar="ACTION")
    sync_run = sync_commands.add_parser(
        "run", help="pull every busy source once now, one progress line per source"
    )
    _add_config_option(sync_run)
    sync_run.add_argument("--provider", metavar="USERNAME", help="only this provider's sources")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == [SIBLING_COMMAND]:
        return _sibling()
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        setup_logging(settings.get("logging", "level"), settings.get("logging", "format"))
        if args.command == "serve":
            return _serve(settings, demo=args.demo)
        if args.command == "user":
            return _user_add(settings, args)
        if args.command == "token":
            return _token_create(settings, args)
        if args.command == "sync":
            return _sync_run(settings, args)
        if args.command == "mail":
            return _mail_ingest(settings)
        if args.command == "db":
            database = _open_database(settings)
            _migrate(database)
            print(f"database is at schema revision {_current_revision(database)}")
            return 0
    except (ConfigError, Fatal) as exc:
        print(f"bookdav: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    return 2


def _mail_ingest(settings: Settings) -> int:
    from bookdav.notify import inbound, plan

    plan.configure(settings.get("mail", "reminder_minutes"))
    database = _open_database(settings)
    raw = sys.stdin.buffer.read(inbound.MAX_MESSAGE_BYTES + 1)
    try:
        applied = asyncio.run(inbound.ingest(database, raw, settings.public_base_url))
    except inbound.Refused as exc:
        raise Fatal(f"reply refused: {exc}") from exc
    print(
        f"reply applied: {applied.action} {applied.partstat} appointment {applied.appointment_id}"
    )
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[tuple[str, str], str] = {}
    if getattr(args, "host", None):
        overrides["server", "host"] = args.host
    if getattr(args, "port", None):
        overrides["server", "port"] = args.port
    return load_settings(find_config_path(getattr(args, "config", None)), overrides=overrides)


def _in_memory(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def _display_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _open_database(settings: Settings) -> Database:
    url = settings.storage_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(str(parsed.database)).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Fatal(f"cannot create the database folder {folder}: {exc.strerror}") from exc
    try:
        database = database_for(url)
        database.ping()
    except DatabaseUnavailable as exc:
        raise Fatal(f"cannot reach the database {_display_url(url)}: {exc}") from exc
    except Exception as exc:  # a malformed URL or a missing driver
        raise Fatal(f"cannot open the database {_display_url(url)}: {exc}") from exc
    return database


def _migrate(database: Database) -> None:
    from bookdav.storage import migrate

    try:
        before, after = migrate.upgrade(database)
    except Exception as exc:
        raise Fatal(f"database migration failed: {exc}") from exc
    if before != after:
        log_event(log, "database schema migrated", before=before or "empty", after=after)


def _current_revision(database: Database) -> str | None:
    from bookdav.storage import migrate

    return migrate.current_revision(database)


def _user_add(settings: Settings, args: argparse.Namespace) -> int:
    from bookdav.booking.accounts import InvalidAccount, add_user, generate_password

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise Fatal("--password-stdin: no password on stdin")
        generated = False
    else:
        password, generated = generate_password(), True
    database = _open_database(settings)
    _migrate(database)
    try:
        user = add_user(
            database,
            username=args.username,
            email=args.email,
            role=args.role,
            password=password,
            name=args.name,
            timezone=args.timezone,
        )
    except InvalidAccount as exc:
        raise Fatal(str(exc)) from exc
    except UsernameTaken as exc:
        raise Fatal(f"username {exc} is taken") from exc
    print(f"created {user.role} {user.username} (id {user.id})")
    if generated:
        print(f"password: {password}")
    return 0


def _token_create(settings: Settings, args: argparse.Namespace) -> int:
    from bookdav.storage.tokens import create_token
    from bookdav.storage.users import user_by_username

    database = _open_database(settings)
    _migrate(database)
    with database.write([args.username]) as conn:
        user = user_by_username(conn, args.username)
        if user is None:
            raise Fatal(f"no user {args.username}")
        info, secret = create_token(conn, user.id, args.name)
    print(f"token {info.id} for {user.username} (shown once):\n{secret}")
    return 0


def _sync_run(settings: Settings, args: argparse.Namespace) -> int:
    """One pull of each busy source; exit 1 if any failed (each failure is also recorded)."""
    from bookdav.sync import worker

    database = _open_database(settings)
    _migrate(database)
    reports = asyncio.run(worker.run_cycle(database, settings, username=args.provider))
    for report in reports:
        print(report.line(), flush=True)
    failed = sum(not report.ok for report in reports)
    print(f"{len(reports)} sources pulled, {failed} failed")
    return 1 if failed else 0


def _bootstrap_admin(database: Database) -> None:
    """On first start with no users, create `admin` with a random password, shown once."""
    from bookdav.booking.accounts import add_user, generate_password
    from bookdav.storage.users import count_users

    with database.read() as conn:
        if count_users(conn):
            return
    password = generate_password()
    try:
        add_user(
            database,
            username="admin",
            email="admin@localhost",
            role="admin",
            password=password,
            name="Administrator",
        )
    except UsernameTaken:
        return  # another process sharing the database got there first
    log_event(
        log,
        "admin account created; the password is shown only this once",
        level=logging.WARNING,
        username="admin",
        password=password,
    )


def _serve(settings: Settings, demo: bool = False) -> int:
    # Claim the port first: a port in use fails before anything is written to the database.
    processes = settings.get("server", "processes")
    if processes > 1 and _in_memory(settings.storage_url):
        raise ConfigError(
            "[server] processes: several processes need a database they can share "
            "(a SQLite file or PostgreSQL), not an in-memory SQLite database"
        )
    listener = _listen(
        settings.get("server", "host"), settings.get("server", "port"), reuse_port=processes > 1
    )
    database = _open_database(settings)
    _migrate(database)
    _bootstrap_admin(database)
    demo_account = None
    if demo:
        from bookdav.web.demo import ensure_demo

        demo_account = ensure_demo(database)
        if demo_account is None:
            log_event(
                log,
                "--demo: the database has providers already; no demo made",
                level=logging.WARNING,
            )
    if processes == 1:
        return asyncio.run(_run_server(settings, listener, demo_account))
    from bookdav.server import processes as siblings_of

    settings = _with_actual_port(settings, listener)
    try:
        siblings = siblings_of.start_siblings(settings, processes - 1)
    except siblings_of.SiblingFailed as exc:
        raise Fatal(str(exc)) from exc
    try:
        return asyncio.run(_run_server(settings, listener, demo_account))
    finally:
        siblings_of.stop_siblings(siblings)


# `python -m bookdav _sibling`: a further server process started by `_serve` (not for users).
SIBLING_COMMAND = "_sibling"


def _sibling() -> int:
    from bookdav.server import processes as siblings_of

    settings = siblings_of.read_sibling_settings(sys.stdin.buffer)
    setup_logging(settings.get("logging", "level"), settings.get("logging", "format"))
    try:
        listener = _listen(
            settings.get("server", "host"), settings.get("server", "port"), reuse_port=True
        )
    except Fatal as exc:
        print(f"bookdav: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_run_server(settings, listener, sibling=True))


# Connections the kernel queues before they are accepted. asyncio's default (100, aiohttp's 128)
# overflows when hundreds of clients connect at once (a popular slot opening): the SYNs past it are
# dropped and retried a full second later, which was the whole p99 of the 500-client benchmark.
LISTEN_BACKLOG = 2048


def _listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server(
            (host, port), family=family, backlog=LISTEN_BACKLOG, reuse_port=reuse_port
        )
    except OSError as exc:
        raise Fatal(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


async def _run_server(
    settings: Settings,
    listener: socket.socket,
    demo: Demo | None = None,
    *,
    sibling: bool = False,
) -> int:
    from aiohttp import web

    from bookdav.server import processes
    from bookdav.server.app import create_app

    actual_port = listener.getsockname()[1]
    settings = _with_actual_port(settings, listener)
    runner = web.AppRunner(create_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, listener, backlog=LISTEN_BACKLOG).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if sibling:
        log_event(
            log, "sibling process up", listen=f"{settings.get('server', 'host')}:{actual_port}"
        )
        processes.say_ready()
        processes.watch_lifeline(sys.stdin.buffer, lambda: loop.call_soon_threadsafe(stop.set))
        return await _serve_until(stop, runner)
    host = settings.get("server", "host")
    base = settings.public_base_url
    log_event(
        log,
        "bookdav is up",
        version=__version__,
        listen=f"{host}:{actual_port}",
        caldav=f"{base}/dav/",
        api=f"{base}/api/v1/",
        config=settings.source,
    )
    print(
        f"bookdav {__version__} listening on http://{host}:{actual_port}\n"
        f"  CalDAV: {base}/dav/\n  API:    {base}/api/v1/",
        flush=True,
    )
    if demo is not None:
        login = f" (sign in as {demo.username}" + (
            f", password {demo.password})" if demo.password else ")"
        )
        print(f"  Book:   {base}/book/{demo.username}\n  Dashboard: {base}/app/{login}", flush=True)
    return await _serve_until(stop, runner)


# The collector's thresholds once the server is up (CPython's defaults: 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 50)


def _tune_gc() -> None:
    """Once the server is up: everything loaded so far (modules, Radicale, SQLAlchemy, the app)
    lives as long as the process, so it is moved out of the collector's sight (`gc.freeze`), and
    young collections run every 50,000 allocations instead of 700 (the older generations every 20
    and 50 of those). A booking allocates thousands
    of objects, so with the defaults the collector ran several times a booking and every few
    hundred bookings walked the whole heap. Side by side (bench/booking.py, SQLite, 3 pairs of
    runs): one process 676-720 -> 760-876 bookings/s and p99 183-200 -> 102-136 ms; two processes
    749-823 -> 835-1,025/s and p99 144-161 -> 104-124 ms."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _serve_until(stop: asyncio.Event, runner: web.AppRunner) -> int:
    _tune_gc()
    try:
        await stop.wait()
    finally:
        log_event(log, "shutting down")
        await runner.cleanup()
    return 0


def _with_actual_port(settings: Settings, listener: socket.socket) -> Settings:
    """With port 0 the kernel picked one: the public URL (unless configured) names it."""
    if settings.get("server", "base_url"):
        return settings
    return _with_port(settings, listener.getsockname()[1])


def _with_port(settings: Settings, port: int) -> Settings:
    values = {section: dict(options) for section, options in settings.values.items()}
    values["server"]["port"] = port
    return Settings(values=values, base_dir=settings.base_dir, source=settings.source)


if __name__ == "__main__":
    sys.exit(main())
