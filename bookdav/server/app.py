"""The aiohttp app factory: routes, middlewares, and the resources the app opens and closes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from bookdav import web as pages
from bookdav.config import Settings
from bookdav.server import api, background, dav, health, inbound_task, outbox_task, sync_task
from bookdav.server.keys import CREDENTIALS, DATABASE, SETTINGS
from bookdav.server.middlewares import problem_details, request_log
from bookdav.storage.db import database_for
from bookdav.storage.users import CredentialCheck


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    # The process-wide Database: Radicale's plugins reach the same one through database_for().
    app[DATABASE] = database_for(app[SETTINGS].storage_url)
    yield


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[
            request_log,
            problem_details,
            pages.html_error_pages,
            outbox_task.wake_outbox,
        ],
        client_max_size=settings.get("server", "max_body_bytes"),
    )
    app[SETTINGS] = settings
    app[CREDENTIALS] = CredentialCheck()
    app.cleanup_ctx.append(database_ctx)
    app.cleanup_ctx.append(dav.radicale_ctx)
    app.cleanup_ctx.append(background.horizon_ctx)
    app.cleanup_ctx.append(outbox_task.outbox_ctx)
    app.cleanup_ctx.append(sync_task.sync_ctx)
    app.cleanup_ctx.append(inbound_task.inbound_ctx)
    app.add_routes(health.routes)
    app.add_routes(dav.routes)
    api.add_routes(app)
    pages.add_routes(app)
    return app
