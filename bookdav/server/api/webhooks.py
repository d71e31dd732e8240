"""`/api/v1/webhooks`: a provider's (or an admin's) subscriptions to appointment events.

Each event becomes an outbox row per matching webhook in the booking transaction
(`bookdav.notify.plan`); the outbox worker POSTs it, signed, with retries (`bookdav.notify.webhook`).
The secret is write-only: it is never shown again.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from bookdav import net
from bookdav.booking.errors import Forbidden, InvalidInput, NotFound
from bookdav.logs import log_event
from bookdav.notify.plan import WEBHOOK_EVENTS
from bookdav.server.api import validation as v
from bookdav.server.auth import require_user
from bookdav.server.keys import DATABASE, SETTINGS
from bookdav.storage import webhooks as store

routes = web.RouteTableDef()
log = logging.getLogger("bookdav.api.webhooks")

MAX_URL_LENGTH = 2000
MIN_SECRET_LENGTH = 16
MAX_WEBHOOKS_PER_OWNER = 20


def webhook_json(hook: store.Webhook) -> dict[str, Any]:
    return {
        "webhookId": hook.id,
        "url": hook.url,
        "events": list(hook.events),
        "ownerId": hook.owner_id,
        "createdAt": hook.created_at,
    }


def _url(body: dict[str, Any]) -> str:
    url = v.text(body, "url", max_length=MAX_URL_LENGTH)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("url", "must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise InvalidInput("url", "must not carry credentials; use the secret")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise InvalidInput("url", "must not contain whitespace or control characters")
    return url


def _events(body: dict[str, Any]) -> list[str]:
    events = v.string_list(body, "events", max_items=len(WEBHOOK_EVENTS))
    if not events:
        raise InvalidInput("events", "name at least one event")
    unknown = [event for event in events if event not in WEBHOOK_EVENTS]
    if unknown:
        raise InvalidInput("events", f"{unknown[0]} is not one of {', '.join(WEBHOOK_EVENTS)}")
    return sorted(set(events), key=WEBHOOK_EVENTS.index)


@routes.post("/api/v1/webhooks")
async def create_webhook(request: web.Request) -> web.Response:
    actor = await require_user(request, "provider", "admin")
    body = await v.json_object(request)
    url = _url(body)
    try:
        await net.check_url(
            url, allow_private_networks=request.app[SETTINGS].allow_private_networks
        )
    except net.PrivateAddress as exc:
        raise InvalidInput("url", str(exc)) from exc
    events = _events(body)
    secret = v.text(body, "secret", min_length=MIN_SECRET_LENGTH, max_length=200)

    def unit_of_work(conn: Any) -> store.Webhook:
        # Under the owner's lock: the count and the insert cannot interleave with another POST.
        if len(store.list_webhooks(conn, actor.id)) >= MAX_WEBHOOKS_PER_OWNER:
            raise InvalidInput("url", f"at most {MAX_WEBHOOKS_PER_OWNER} webhooks per account")
        return store.insert_webhook(conn, actor.id, url, events, secret)

    hook = await request.app[DATABASE].run_write(unit_of_work, principals=[actor.username])
    log_event(log, "webhook created", webhook_id=hook.id, owner_id=actor.id, events=events)
    return web.json_response(
        webhook_json(hook), status=201, headers={"Location": f"/api/v1/webhooks/{hook.id}"}
    )


@routes.get("/api/v1/webhooks")
async def list_webhooks(request: web.Request) -> web.Response:
    actor = await require_user(request, "provider", "admin")
    hooks = await request.app[DATABASE].run_read(store.list_webhooks, actor.id)
    return web.json_response({"items": [webhook_json(hook) for hook in hooks]})


async def _own_webhook(request: web.Request) -> store.Webhook:
    actor = await require_user(request, "provider", "admin")
    hook = await request.app[DATABASE].run_read(store.get_webhook, request.match_info["webhookId"])
    if hook is None or hook.deleted_at is not None:
        raise NotFound(f"no webhook {request.match_info['webhookId']}")
    if hook.owner_id != actor.id and actor.role != "admin":
        raise Forbidden("this is not your webhook")
    return hook


@routes.get("/api/v1/webhooks/{webhookId}")
async def get_webhook(request: web.Request) -> web.Response:
    return web.json_response(webhook_json(await _own_webhook(request)))


@routes.delete("/api/v1/webhooks/{webhookId}")
async def delete_webhook(request: web.Request) -> web.Response:
    hook = await _own_webhook(request)
    if not await request.app[DATABASE].run_write(store.delete_webhook, hook.id):
        raise NotFound(f"no webhook {hook.id}")
    log_event(log, "webhook deleted", webhook_id=hook.id, owner_id=hook.owner_id)
    return web.Response(status=204)
