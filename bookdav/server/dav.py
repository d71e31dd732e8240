"""CalDAV at /dav/: Radicale mounted in-process through a small WSGI bridge of our own.

Our own bridge, not aiohttp-wsgi, because each of Radicale's mount pitfalls (ARCHITECTURE.md) is a
line here: SCRIPT_NAME=/dav with PATH_INFO unquoted as UTF-8, proxy headers stripped, the body
bounded before Radicale sees it, and a thread pool sized for Radicale's failed-login sleeps.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

import radicale
import radicale.config
from aiohttp import web
from radicale import item as radicale_item

from bookdav.config import Settings
from bookdav.server import dav_reports
from bookdav.server.keys import SETTINGS

DAV_PREFIX = "/dav"
RADICALE = web.AppKey("radicale", radicale.Application)
DAV_THREADS = web.AppKey("dav_threads", ThreadPoolExecutor)

# Headers that would let a client move Radicale's prefix or make it strip the prefix twice.
STRIPPED_HEADERS = frozenset(
    {"x-forwarded-host", "x-forwarded-proto", "x-forwarded-server", "x-script-name"}
)

routes = web.RouteTableDef()

# Radicale's own limit on RRULE COUNT, so our explanation of a refused PUT names it too.
RRULE_OCCURRENCE_LIMIT = int(
    radicale.config.DEFAULT_CONFIG_SCHEMA["server"]["max_vevent_rrule_occurrence"]["value"]
)


def radicale_configuration(settings: Settings) -> radicale.config.Configuration:
    configuration = radicale.config.load()
    url = settings.storage_url
    max_body = settings.get("server", "max_body_bytes")
    configuration.update(
        {
            "auth": {"type": "bookdav.plugins.auth", "url": url, "delay": "1"},
            "rights": {"type": "bookdav.plugins.rights", "url": url},
            "storage": {"type": "bookdav.plugins.storage", "url": url},
            "web": {"type": "none"},
            "hook": {"type": "none"},
            "server": {
                "max_content_length": str(max_body),
                "max_resource_size": str(max_body * 8 // 10),
            },
        },
        "bookdav",
        privileged=True,
    )
    return configuration


async def radicale_ctx(app: web.Application) -> AsyncIterator[None]:
    """Build Radicale and the threads it runs in; shut them down with the app."""
    settings = app[SETTINGS]
    app[RADICALE] = radicale.Application(radicale_configuration(settings))
    app[DAV_THREADS] = ThreadPoolExecutor(
        settings.get("server", "dav_threads"), thread_name_prefix="dav"
    )
    yield
    app[DAV_THREADS].shutdown(wait=True)


async def read_bounded_body(request: web.Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to be longer than `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    chunks: list[bytes] = []
    size = 0
    # Until EOF: one read() returns only what has arrived so far (a large PUT came in cut short).
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


def wsgi_environ(request: web.Request, body: bytes) -> dict[str, Any]:
    raw_path = request.raw_path.partition("?")[0]
    # Radicale expects PATH_INFO decoded as UTF-8 (PEP 3333's latin-1 breaks non-ASCII hrefs).
    path_info = unquote(raw_path[len(DAV_PREFIX) :], encoding="utf-8", errors="replace")
    host, _, port = (request.host or "localhost").rpartition(":")
    if not host or not port.isdigit():
        host, port = request.host or "localhost", "443" if request.secure else "80"
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": DAV_PREFIX,
        "PATH_INFO": path_info,
        "QUERY_STRING": request.query_string,
        "SERVER_NAME": host,
        "SERVER_PORT": port,
        "SERVER_PROTOCOL": f"HTTP/{request.version.major}.{request.version.minor}",
        "REMOTE_ADDR": request.remote or "",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": request.scheme,
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if "Content-Type" in request.headers:
        environ["CONTENT_TYPE"] = request.headers["Content-Type"]
    for name, value in request.headers.items():
        lowered = name.lower()
        if lowered in STRIPPED_HEADERS or lowered in {"content-type", "content-length"}:
            continue
        key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def call_radicale(
    application: radicale.Application, environ: dict[str, Any]
) -> tuple[int, list[tuple[str, str]], bytes]:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        captured["status"] = int(status.split(" ", 1)[0])
        captured["headers"] = headers

    chunks: Iterable[bytes] = application(environ, start_response)
    body = b"".join(chunks)
    return captured["status"], captured["headers"], body


def explain_bad_calendar(body: bytes) -> str:
    """Why Radicale refused a PUT body, found by reading it the way Radicale's PUT does."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"Bad Request: the body is not UTF-8 ({exc})"
    try:
        components = radicale_item.read_components(text)
        tag = "VADDRESSBOOK" if text.lstrip()[:11].upper() == "BEGIN:VCARD" else "VCALENDAR"
        radicale_item.check_and_sanitize_items(
            components, max_vevent_rrule_occurrence=RRULE_OCCURRENCE_LIMIT, tag=tag
        )
        for component in components:
            component.serialize()
    except Exception as exc:  # vobject raises many kinds; each message says what is wrong
        return f"Bad Request: malformed iCalendar: {exc}"
    return "Bad Request: the calendar object was refused"


@routes.route("*", DAV_PREFIX)
@routes.route("*", DAV_PREFIX + "/{tail:.*}")
async def dav(request: web.Request) -> web.Response:
    limit = request.app[SETTINGS].get("server", "max_body_bytes")
    body = await read_bounded_body(request, limit)
    if request.method == "REPORT":
        # Free-busy, calendar-query (with expand) and sync-collection from the index (see
        # dav_reports); None: Radicale answers.
        fast = await dav_reports.answer_report(request, body, request.app[RADICALE], DAV_PREFIX)
        if fast is not None:
            return fast
    environ = wsgi_environ(request, body)
    status, headers, answer = await asyncio.get_running_loop().run_in_executor(
        request.app[DAV_THREADS], call_radicale, request.app[RADICALE], environ
    )
    if request.method == "PUT" and status == 400:
        # Radicale says only "Bad Request"; tell the client what is wrong with its iCalendar.
        return web.Response(status=400, text=explain_bad_calendar(body))
    response = web.Response(status=status, body=answer)
    response.headers.popall("Content-Type", None)
    for name, value in headers:
        if name.lower() in {"content-length", "transfer-encoding", "connection"}:
            continue
        response.headers.add(name, value)
    return response


@routes.route("*", "/.well-known/caldav")
@routes.route("*", "/.well-known/carddav")
async def well_known(request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently(DAV_PREFIX + "/")
