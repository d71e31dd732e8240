"""The HTML side of bookdav: booking-link pages for clients (`/book/`, `/manage/`) and the
provider dashboard (`/app/`), server-rendered with jinja2; scripts only enhance."""

from __future__ import annotations

from aiohttp import web

from bookdav.server.keys import SETTINGS
from bookdav.server.ratelimit import RateLimiter
from bookdav.web import dashboard, public
from bookdav.web.csrf import load_secret
from bookdav.web.render import STATIC, WEB, WebState, environment, html_error_pages

__all__ = ["add_routes", "html_error_pages"]


def add_routes(app: web.Application) -> None:
    settings = app[SETTINGS]
    app[WEB] = WebState(
        templates=environment(),
        secret=load_secret(settings.base_dir / "var"),
        limiter=RateLimiter(settings.get("booking", "guest_bookings_per_minute")),
    )
    app.add_routes(public.routes)
    app.add_routes(dashboard.routes)
    app.router.add_static("/assets/", STATIC, name="assets")
