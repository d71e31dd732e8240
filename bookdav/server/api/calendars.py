"""`/api/v1/providers/{providerId}/calendars`: a provider's external calendars.

Busy sources (CalDAV calendars, ICS feeds) are mirrored into read-only calendars that block
slots; destination calendars (CalDAV) receive every booking. The provider themself or an admin
manages them; credentials are encrypted with `[sync] secret_key` and never returned.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from bookdav.booking.errors import Forbidden, InvalidInput, NotFound, PolicyViolation
from bookdav.server.api import validation as v
from bookdav.server.auth import require_user
from bookdav.server.keys import DATABASE, SETTINGS
from bookdav.storage.users import User, user_by_id
from bookdav.sync import crypto, push, store, worker
from bookdav.sync.store import ExternalCalendar

routes = web.RouteTableDef()

OAUTH_FIELDS = ("tokenUrl", "clientId", "clientSecret", "refreshToken")


def _iso(instant: int | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(instant)) if instant else None


def calendar_json(source: ExternalCalendar, base_url: str) -> dict[str, Any]:
    credentials = source.state.get("credentialKind", "basic") if source.credentials else None
    return {
        "calendarId": source.id,
        "providerId": source.provider_id,
        "type": source.type,
        "url": source.url,
        "role": source.role,
        "showTitles": source.show_titles,
        "credentials": credentials,
        "mirrorUrl": f"{base_url}/dav/{source.collection_path}/"
        if source.collection_path
        else None,
        "lastSuccessAt": _iso(source.last_success_at),
        "lastError": source.last_error,
        "failures": source.failures,
        "nextRunAt": _iso(source.next_run_at) if source.role == "busy" else None,
        "createdAt": _iso(source.created_at),
    }


async def _provider(request: web.Request) -> tuple[User, User]:
    """(actor, provider): the provider themself or an admin."""
    actor = await require_user(request, "provider", "admin")
    provider_id = request.match_info["providerId"]
    provider = await request.app[DATABASE].run_read(user_by_id, provider_id)
    if provider is None or provider.role != "provider":
        raise NotFound(f"no provider {provider_id}")
    if actor.role != "admin" and actor.id != provider.id:
        raise Forbidden("you may only manage your own calendars")
    return actor, provider


async def _source(request: web.Request, provider: User) -> ExternalCalendar:
    calendar_id = request.match_info["calendarId"]
    source = await request.app[DATABASE].run_read(store.get_external_calendar, calendar_id)
    if source is None or source.provider_id != provider.id:
        raise NotFound(f"provider {provider.id} has no calendar {calendar_id}")
    return source


def _url(body: dict[str, Any]) -> str:
    url = v.text(body, "url", min_length=1, max_length=2000)
    if url.lower().startswith("webcal://"):  # what "subscribe" links of Google and Outlook say
        url = "https://" + url[len("webcal://") :]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("url", "must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise InvalidInput("url", "must not carry credentials: send username and password")
    return url


def _credentials(body: dict[str, Any]) -> dict[str, Any]:
    username = v.text(body, "username", required=False, max_length=320)
    password = v.text(body, "password", required=False, max_length=1000)
    if password and not username:
        raise InvalidInput("username", "is required with a password")
    oauth_body = body.get("oauth")
    if oauth_body is None:
        return {"username": username, "password": password} if username else {}
    if not isinstance(oauth_body, dict):
        raise InvalidInput(
            "oauth", "must be an object {tokenUrl, clientId, clientSecret, refreshToken}"
        )
    if username:
        raise InvalidInput("oauth", "give either oauth or username/password, not both")
    oauth = {name: v.text(oauth_body, name, min_length=1, max_length=4000) for name in OAUTH_FIELDS}
    token_url = urlsplit(oauth["tokenUrl"])
    if token_url.scheme not in ("http", "https") or not token_url.hostname:
        raise InvalidInput("oauth.tokenUrl", "must be an absolute http(s) URL")
    return {"oauth": oauth}


@routes.post("/api/v1/providers/{providerId}/calendars")
async def post_calendar(request: web.Request) -> web.Response:
    _actor, provider = await _provider(request)
    body = await v.json_object(request)
    type_ = body.get("type")
    if type_ not in store.TYPES:
        raise InvalidInput("type", "must be one of " + ", ".join(store.TYPES))
    role = body.get("role")
    if role not in store.ROLES:
        raise InvalidInput("role", "must be one of " + ", ".join(store.ROLES))
    if type_ == "ics" and role != "busy":
        raise InvalidInput("role", "an ICS feed is read-only: it can only be a busy source")
    url = _url(body)
    show_titles = body.get("showTitles", False)
    if not isinstance(show_titles, bool):
        raise InvalidInput("showTitles", "must be true or false")
    credentials = _credentials(body)
    token = None
    if credentials:
        secret_key = request.app[SETTINGS].get("sync", "secret_key")
        if not secret_key:
            raise PolicyViolation(
                "this server cannot store calendar credentials: its administrator must set "
                "[sync] secret_key first"
            )
        token = crypto.encrypt_credentials(secret_key, credentials)
    kind = "oauth" if "oauth" in credentials else "basic"

    def unit(conn: Any) -> ExternalCalendar:
        created = store.create_external_calendar(
            conn,
            provider,
            type_=type_,
            url=url,
            role=role,
            credentials=token,
            show_titles=show_titles,
        )
        if token:
            store.record_state(conn, created.id, {"credentialKind": kind})
        if role == "destination":
            push.enqueue_backfill(conn, created, int(time.time()))
        found = store.get_external_calendar(conn, created.id)
        assert found is not None
        return found

    source = await request.app[DATABASE].run_write(unit, principals=[provider.username])
    base_url = request.app[SETTINGS].public_base_url
    return web.json_response(
        calendar_json(source, base_url),
        status=201,
        headers={"Location": f"/api/v1/providers/{provider.id}/calendars/{source.id}"},
    )


@routes.get("/api/v1/providers/{providerId}/calendars")
async def list_calendars(request: web.Request) -> web.Response:
    _actor, provider = await _provider(request)
    found = await request.app[DATABASE].run_read(store.calendars_of_provider, provider.id)
    base_url = request.app[SETTINGS].public_base_url
    return web.json_response({"items": [calendar_json(s, base_url) for s in found]})


@routes.get("/api/v1/providers/{providerId}/calendars/{calendarId}")
async def get_calendar(request: web.Request) -> web.Response:
    _actor, provider = await _provider(request)
    source = await _source(request, provider)
    return web.json_response(calendar_json(source, request.app[SETTINGS].public_base_url))


@routes.delete("/api/v1/providers/{providerId}/calendars/{calendarId}")
async def delete_calendar(request: web.Request) -> web.Response:
    _actor, provider = await _provider(request)
    source = await _source(request, provider)
    await request.app[DATABASE].run_write(
        store.delete_external_calendar, source, principals=[provider.username]
    )
    return web.Response(status=204)


@routes.post("/api/v1/providers/{providerId}/calendars/{calendarId}/sync")
async def sync_calendar(request: web.Request) -> web.Response:
    """Pull a busy source now and answer with the outcome (for "refresh" buttons and tests)."""
    _actor, provider = await _provider(request)
    source = await _source(request, provider)
    if source.role != "busy":
        raise PolicyViolation("only busy sources are pulled; destinations are written on change")
    database, settings = request.app[DATABASE], request.app[SETTINGS]
    report = await worker.run_now(database, settings, source.id)
    updated = await database.run_read(store.get_external_calendar, source.id)
    if updated is None:
        raise NotFound(f"calendar {source.id} was removed meanwhile")
    document = calendar_json(updated, settings.public_base_url)
    document["cycle"] = report.as_json() if report else None
    return web.json_response(document)
