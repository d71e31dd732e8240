"""Rendering pages: the jinja2 environment, the CSRF cookie, and HTML error pages."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from aiohttp import web

from bookdav.booking.errors import BookdavError
from bookdav.server.keys import SETTINGS
from bookdav.server.ratelimit import RateLimiter
from bookdav.web import csrf

error_log = logging.getLogger("bookdav.server")

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


@dataclass
class WebState:
    templates: jinja2.Environment
    secret: bytes
    limiter: RateLimiter


WEB = web.AppKey("web", WebState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["local_time"] = local_time
    env.filters["local_day"] = local_day
    env.filters["local_date_iso"] = local_date_iso
    env.filters["local_short_day"] = local_short_day
    return env


def local_time(instant: int, zone: str) -> str:
    return datetime.fromtimestamp(instant, ZoneInfo(zone)).strftime("%H:%M")


def local_day(instant: int, zone: str) -> str:
    moment = datetime.fromtimestamp(instant, ZoneInfo(zone))
    return f"{moment:%A} {moment.day} {moment:%B %Y}"


def local_short_day(instant: int, zone: str) -> str:
    moment = datetime.fromtimestamp(instant, ZoneInfo(zone))
    return f"{moment:%a} {moment.day} {moment:%b}"


def local_date_iso(instant: int, zone: str) -> str:
    return datetime.fromtimestamp(instant, ZoneInfo(zone)).date().isoformat()


def secure_cookies(request: web.Request) -> bool:
    """`Secure` on cookies when the request came over TLS or the public URL is https."""
    return request.secure or request.app[SETTINGS].public_base_url.startswith("https://")


def set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=secure_cookies(request),
    )


def render(
    request: web.Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    session_csrf: str | None = None,
) -> web.Response:
    """A page; public pages get a CSRF cookie if the visitor has none yet."""
    state = request.app[WEB]
    new_cookie = None
    if session_csrf is not None:
        token = csrf.session_token(session_csrf)
    else:
        token, new_cookie = csrf.public_token(request, state.secret)
    body = state.templates.get_template(template).render(
        csrf_field=csrf.FIELD, csrf_token=token, request_path=request.path, **context
    )
    response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    if new_cookie is not None:
        set_cookie(request, response, csrf.CSRF_COOKIE, new_cookie, 7 * 24 * 3600)
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    )
    return response


@dataclass(frozen=True)
class Link:
    href: str
    text: str


def error_page(
    request: web.Request, status: int, title: str, detail: str, link: Link | None = None
) -> web.Response:
    response = render(
        request,
        "error.html",
        {"status": status, "title": title, "detail": detail, "link": link},
        status=status,
    )
    return response


# Paths people open in a browser: what no route answers there gets an HTML page, not JSON.
PAGE_PREFIXES = ("/book/", "/manage/", "/app/")


def is_page_path(path: str) -> bool:
    return path in ("/", "/book", "/manage", "/app") or path.startswith(PAGE_PREFIXES)


def way_on(path: str) -> Link:
    """Where someone who reached a page that does not exist can go instead."""
    parts = path.strip("/").split("/")
    if parts[0] == "book" and len(parts) > 2 and parts[1]:
        return Link(f"/book/{parts[1]}", "See this provider's services")
    if parts[0] == "manage":
        return Link("/app/login", "Providers: sign in to the dashboard")
    return Link("/app/", "Go to the dashboard")


@web.middleware
async def html_error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An HTTP error on a page path (no route, a method it does not take) is an HTML page with a
    way on; the API keeps problem+json and /dav/ is not touched."""
    if not is_page_path(request.path):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            title = "Page not found"
            detail = (
                "There is no page at this address. If you followed a link, it may be "
                "incomplete: copy the whole link from your email and try again."
            )
        else:
            title, detail = exc.reason, "This page cannot be used this way."
        response = error_page(request, exc.status, title, detail, way_on(request.path))
        response.headers.update(
            {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        )
        return response


def html_errors(handler: Handler) -> Handler:
    """Domain errors become an HTML page with their status instead of problem+json."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BookdavError as exc:
            response = error_page(request, exc.status, exc.title, exc.detail or exc.title)
            retry = exc.extra.get("retryAfterSeconds")
            if retry is not None:
                response.headers["Retry-After"] = str(retry)
            return response
        except web.HTTPException:
            raise
        except Exception:
            error_log.exception("unhandled error", extra={"fields": {"path": request.path}})
            return error_page(
                request,
                500,
                "Something went wrong",
                "The server failed and the error is logged. Please try again in a moment.",
            )

    return wrapped


async def form_data(request: web.Request) -> dict[str, str]:
    """The posted form as text fields (a repeated field keeps its last value)."""
    posted = await request.post()
    return {key: value for key, value in posted.items() if isinstance(value, str)}
