"""`/api/v1/services`: what clients can book, with duration, price and business rules."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from bookdav.booking.errors import Forbidden, InvalidInput, NotFound
from bookdav.booking.services import RULE_FIELDS, rules_from_json, rules_json, slug_for
from bookdav.notify import plan, templates
from bookdav.server.api import validation as v
from bookdav.server.auth import require_user
from bookdav.server.keys import DATABASE
from bookdav.storage import services as store
from bookdav.storage.resources import list_resources
from bookdav.storage.users import User, user_by_id

routes = web.RouteTableDef()

AMOUNT_PATTERN = re.compile(r"^\d{1,12}(\.\d{1,4})?$")
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")
MAX_DURATION_MINUTES = 24 * 60


def service_json(service: store.ServiceRecord) -> dict[str, Any]:
    return {
        "serviceId": service.id,
        "slug": service.slug,
        "name": service.name,
        "description": service.description,
        "duration": service.duration_minutes,
        "price": {"amount": service.price_amount, "currency": service.price_currency},
        "providerIds": list(service.provider_ids),
        "resources": list(service.resource_ids),
        "rules": rules_json(rules_from_json(service.rules)),
        "notifications": notification_settings_json(service.notifications),
    }


def _price(body: dict[str, Any]) -> tuple[str, str]:
    price = v.object_field(body, "price", required=False)
    amount = price.get("amount", "0")
    if not isinstance(amount, str) or not AMOUNT_PATTERN.match(amount):
        raise InvalidInput("price.amount", 'must be a decimal string such as "49.00"')
    currency = price.get("currency", "EUR")
    if not isinstance(currency, str) or not CURRENCY_PATTERN.match(currency):
        raise InvalidInput("price.currency", "must be an ISO 4217 code such as EUR")
    return amount, currency


def _rules(body: dict[str, Any]) -> dict[str, Any]:
    raw = v.object_field(body, "rules", required=False)
    unknown = sorted(set(raw) - set(RULE_FIELDS))
    if unknown:
        raise InvalidInput(f"rules.{unknown[0]}", "is not a known rule")
    rules: dict[str, Any] = {}
    for name, value in raw.items():
        _, minimum, maximum = RULE_FIELDS[name]
        if value is None and name == "slotIntervalMinutes":
            rules[name] = None
            continue
        rules[name] = v.integer(value, f"rules.{name}", minimum=minimum, maximum=maximum)
    return rules


def _notifications(body: dict[str, Any]) -> dict[str, Any]:
    """`notifications`: {"templates": {name: jinja2 source}, "reminderMinutes": [..] or null};
    every template must compile (400 naming it otherwise)."""
    raw = v.object_field(body, "notifications", required=False)
    unknown = sorted(set(raw) - {"templates", "reminderMinutes"})
    if unknown:
        raise InvalidInput(f"notifications.{unknown[0]}", "is not a known setting")
    result: dict[str, Any] = {}
    sources = v.object_field(raw, "templates", required=False)
    for name, source in sources.items():
        if not isinstance(source, str):
            raise InvalidInput(f"notifications.templates.{name}", "must be a string")
        try:
            templates.check(name, source)
        except templates.TemplateInvalid as exc:
            raise InvalidInput(f"notifications.templates.{name}", str(exc)) from exc
    if sources:
        result["templates"] = dict(sources)
    minutes = raw.get("reminderMinutes")
    if minutes is not None:
        if not isinstance(minutes, list) or len(minutes) > 10:
            raise InvalidInput("notifications.reminderMinutes", "must be a list of at most 10")
        result["reminderMinutes"] = sorted(
            {
                v.integer(m, "notifications.reminderMinutes", minimum=1, maximum=525_600)
                for m in minutes
            },
            reverse=True,
        )
    return result


def notification_settings_json(stored: dict[str, Any]) -> dict[str, Any]:
    return {
        "templates": stored.get("templates", {}),
        "reminderMinutes": stored.get("reminderMinutes"),
    }


async def _resource_ids(request: web.Request, body: dict[str, Any]) -> list[str]:
    """The resources every booking of the service needs; each must exist."""
    wanted = v.string_list(body, "resources", required=False, max_items=20)
    if wanted:
        found = await request.app[DATABASE].run_read(list_resources, wanted)
        missing = sorted(set(wanted) - {resource.id for resource in found})
        if missing:
            raise InvalidInput("resources", f"no resource {missing[0]}")
    return wanted


async def _provider_ids(request: web.Request, actor: User, body: dict[str, Any]) -> list[str]:
    """The providers of a service: a provider offers its own; an admin names providers."""
    given = v.string_list(body, "providerIds", required=False)
    if actor.role == "provider":
        if given and given != [actor.id]:
            raise Forbidden("a provider may only offer services under their own providerId")
        return [actor.id]
    if not given:
        raise InvalidInput("providerIds", "name at least one provider")
    roles = await request.app[DATABASE].run_read(store.provider_roles, given)
    for provider_id in given:
        if roles.get(provider_id) != "provider":
            raise InvalidInput("providerIds", f"{provider_id} is not a provider")
    return given


async def _editable_service(request: web.Request) -> tuple[User, store.ServiceRecord]:
    actor = await require_user(request, "provider", "admin")
    service = await request.app[DATABASE].run_read(
        store.get_service, request.match_info["serviceId"]
    )
    if service is None:
        raise NotFound(f"no service {request.match_info['serviceId']}")
    if actor.role != "admin" and actor.id not in service.provider_ids:
        raise Forbidden("you may only change services you offer")
    return actor, service


@routes.post("/api/v1/services")
async def create_service(request: web.Request) -> web.Response:
    actor = await require_user(request, "provider", "admin")
    body = await v.json_object(request)
    name = v.text(body, "name", min_length=1)
    description = v.text(body, "description", required=False, max_length=5000)
    if "duration" not in body:
        raise InvalidInput("duration", "is required")
    duration = v.integer(body["duration"], "duration", minimum=5, maximum=MAX_DURATION_MINUTES)
    amount, currency = _price(body)
    rules = _rules(body)
    notifications = _notifications(body)
    resource_ids = await _resource_ids(request, body)
    provider_ids = await _provider_ids(request, actor, body)
    service = await request.app[DATABASE].run_write(
        lambda conn: store.insert_service(
            conn,
            slug=slug_for(name),
            name=name,
            description=description,
            duration_minutes=duration,
            price_amount=amount,
            price_currency=currency,
            rules=rules,
            created_by=actor.id,
            provider_ids=provider_ids,
            resource_ids=resource_ids,
            notifications=notifications,
        )
    )
    return web.json_response(
        service_json(service), status=201, headers={"Location": f"/api/v1/services/{service.id}"}
    )


@routes.get("/api/v1/services")
async def list_services(request: web.Request) -> web.Response:
    limit = v.query_int(request, "limit", default=50, minimum=1, maximum=200)
    found = await request.app[DATABASE].run_read(
        lambda conn: store.list_services(
            conn,
            provider_id=request.query.get("providerId"),
            after_id=request.query.get("cursor") or None,
            limit=limit + 1,
        )
    )
    page = found[:limit]
    next_cursor = page[-1].id if len(found) > limit else None
    return web.json_response({"items": [service_json(s) for s in page], "nextCursor": next_cursor})


@routes.get("/api/v1/services/{serviceId}")
async def get_service(request: web.Request) -> web.Response:
    service = await request.app[DATABASE].run_read(
        store.get_service, request.match_info["serviceId"]
    )
    if service is None:
        raise NotFound(f"no service {request.match_info['serviceId']}")
    return web.json_response(service_json(service))


@routes.put("/api/v1/services/{serviceId}")
async def put_service(request: web.Request) -> web.Response:
    actor, service = await _editable_service(request)
    body = await v.json_object(request)
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = v.text(body, "name", min_length=1)
    if "description" in body:
        changes["description"] = v.text(body, "description", max_length=5000)
    if "duration" in body:
        changes["duration_minutes"] = v.integer(
            body["duration"], "duration", minimum=5, maximum=MAX_DURATION_MINUTES
        )
    if "price" in body:
        changes["price_amount"], changes["price_currency"] = _price(body)
    if "rules" in body:
        changes["rules"] = {**service.rules, **_rules(body)}
    if "notifications" in body:  # replaces the whole object: what you PUT is what is used
        changes["notifications"] = _notifications(body)
    resource_ids = await _resource_ids(request, body) if "resources" in body else None
    provider_ids = await _provider_ids(request, actor, body) if "providerIds" in body else None

    def unit_of_work(conn: Any) -> store.ServiceRecord | None:
        found = store.update_service(conn, service.id, provider_ids, resource_ids, **changes)
        if "notifications" in changes:  # reminders not yet sent follow the new offsets
            plan.replan_service_reminders(conn, service.id)
        return found

    # Re-planning reminders must not race a booking that read the old offsets: hold the locks a
    # booking of each of the service's providers takes (PostgreSQL; SQLite has one writer).
    principals: list[str] = []
    if "notifications" in changes:
        everyone = [*service.provider_ids, *(provider_ids or [])]
        principals = await request.app[DATABASE].run_read(_usernames, everyone)
    updated = await request.app[DATABASE].run_write(unit_of_work, principals=principals)
    assert updated is not None
    return web.json_response(service_json(updated))


def _usernames(conn: Any, user_ids: list[str]) -> list[str]:
    return [user.username for user_id in set(user_ids) if (user := user_by_id(conn, user_id))]


@routes.delete("/api/v1/services/{serviceId}")
async def delete_service(request: web.Request) -> web.Response:
    _, service = await _editable_service(request)
    await request.app[DATABASE].run_write(store.delete_service, service.id)
    return web.Response(status=204)
