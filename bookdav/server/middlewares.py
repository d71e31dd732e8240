"""Middlewares: one structured log line per request, and errors as RFC 9457 problem+json."""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from bookdav.booking.errors import BookdavError, Unauthorized
from bookdav.logs import log_event
from bookdav.server.auth import basic_credentials

access_log = logging.getLogger("bookdav.access")
error_log = logging.getLogger("bookdav.server")

PROBLEM_JSON = "application/problem+json"


def problem(status: int, title: str, detail: str = "", **extra: object) -> web.Response:
    """An RFC 9457 problem document."""
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.json_response(body, status=status, content_type=PROBLEM_JSON)


def claimed_user(request: web.Request) -> str:
    """The login name a request presents (Basic auth), for the log; never the password."""
    credentials = basic_credentials(request.headers.get("Authorization", ""))
    return credentials[0] if credentials else ""


@web.middleware
async def request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        log_event(
            access_log,
            "request",
            method=request.method,
            path=request.path,
            status=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            user=claimed_user(request),
            remote=request.remote or "",
        )


@web.middleware
async def problem_details(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outside CalDAV, HTTP errors become problem+json and crashes a logged 500 problem."""
    if request.path.startswith("/dav"):
        return await handler(request)
    try:
        return await handler(request)
    except BookdavError as exc:
        response = problem(exc.status, exc.title, exc.detail, **exc.extra)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Basic realm="bookdav", charset="UTF-8"'
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text or ""
        if detail.startswith(f"{exc.status}:"):  # aiohttp's default body repeats the reason
            detail = ""
        return problem(exc.status, exc.reason, detail)
    except Exception:
        error_log.exception("unhandled error", extra={"fields": {"path": request.path}})
        return problem(500, "Internal Server Error", "The server failed; the error is logged.")
