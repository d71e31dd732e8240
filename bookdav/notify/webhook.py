"""The outbox handler for webhooks: POST the event's JSON, signed with the hook's secret.

The body was fixed when the row was written (`plan.enqueue_webhooks`), so every retry sends the
same bytes with the same signature and the same `X-Bookdav-Delivery` id (receivers deduplicate
on it: delivery is at least once). Headers:

    X-Bookdav-Event: appointment.created
    X-Bookdav-Delivery: <uuid, one per row>
    X-Bookdav-Signature: sha256=<hex HMAC-SHA256 of the raw body, keyed with the secret>

A 2xx answer is success; anything else (or no answer within the timeout) is retried with the
outbox's backoff. Redirects are not followed. Only the status goes into `last_error`, never the
receiver's body. Unless `[server] allow_private_networks` is on, a hook whose host is a non-public
IP literal fails at once and a name resolving to one is refused at connection time (`bookdav.net`):
the name was checked when the hook was created, but may resolve differently now.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

import aiohttp

from bookdav import net
from bookdav.logs import log_event
from bookdav.notify.errors import Superseded, Undeliverable
from bookdav.notify.outbox import Job
from bookdav.storage.webhooks import get_webhook

log = logging.getLogger("bookdav.webhook")

TIMEOUT_SECONDS = 10.0


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def body_bytes(payload: dict[str, object]) -> bytes:
    return json.dumps(payload["body"], sort_keys=True, separators=(",", ":")).encode()


async def deliver(job: Job) -> None:
    payload = job.row.payload
    hook = await job.database.run_read(get_webhook, str(payload.get("hookId", "")))
    if hook is None or hook.deleted_at is not None:
        raise Superseded("the webhook was deleted")
    if "body" not in payload:
        raise Undeliverable("webhook row without a body")
    body = body_bytes(payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "bookdav-webhook",
        "X-Bookdav-Event": str(payload.get("event", "")),
        "X-Bookdav-Delivery": str(payload.get("deliveryId", "")),
        "X-Bookdav-Signature": signature(hook.secret, body),
    }
    job.fields.update(webhook_id=hook.id, url=hook.url, delivery_id=headers["X-Bookdav-Delivery"])
    allow_private = job.settings.allow_private_networks
    if not allow_private:
        try:
            net.refuse_private_literal(hook.url)
        except net.PrivateAddress as exc:
            raise Undeliverable(str(exc)) from exc
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    async with (
        net.client_session(allow_private_networks=allow_private, timeout=timeout) as session,
        session.post(hook.url, data=body, headers=headers, allow_redirects=False) as response,
    ):
        if not 200 <= response.status < 300:
            raise RuntimeError(f"the receiver answered HTTP {response.status}")
    log_event(log, "webhook delivered", **job.fields, status=response.status)
